"""The byte-level BPE tokenizer (stage A4): encode, decode, stream, chat template, save/load.

Two ways to encode, as tiktoken and Hugging Face ``tokenizers`` have:

* ``encode(text)`` splits ``text`` on the tokenizer's special tokens (leftmost, longest match first,
  as HF's added tokens) and gives them their ids: for text *we* write — a ChatML template, a
  control marker.  It equals the exported ``tokenizer.json`` / ``AutoTokenizer`` on every text.
* ``encode_ordinary(text)`` treats everything as plain characters: for text someone else wrote (a
  user's message, a scraped document, an SFT sample), so nobody can inject ``<|im_end|>`` or
  ``<|im_start|>system`` through what they type.  ``encode_chat`` adds the control ids itself and
  encodes message contents this way.
"""

from __future__ import annotations

import codecs
import json
import os
from collections.abc import Iterable, Iterator
from itertools import repeat
from pathlib import Path

import regex

from microlm.errors import MicroLMError
from microlm.io import write_json
from microlm.tokenizer.bpe import GPT2_PATTERN, resolve_pattern, save_vocab_merges, special_regex
from microlm.tokenizer.bytes_unicode import text_to_bytes
from microlm.tokenizer.chat_template import CHAT_TEMPLATE, render_chat
from microlm.tokenizer.hf import write_hf_tokenizer

__all__ = ["Tokenizer", "StreamDecoder", "token_text", "CHAT_TEMPLATE", "render_chat", "DEFAULT_SPECIAL_TOKENS"]

DEFAULT_SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
_NO_RANK = 1 << 62


def stop_ids_of(tok) -> list[int]:
    """The ids that end a generation: ``<|im_end|>`` (end of a chat turn) and ``<|endoftext|>``."""
    return [tok.special_ids[s] for s in ("<|im_end|>", "<|endoftext|>") if s in tok.special_ids]


def _is_whole(b: bytes) -> bool:
    try:
        b.decode("utf-8")
        return True
    except UnicodeDecodeError:
        return False


def char_safe(a: bytes, b: bytes) -> bool:
    """True when merge ``(a, b)`` joins whole characters, or stays inside one character (in valid
    UTF-8 a byte sequence with no lead byte after its first byte lies within one character)."""
    if _is_whole(a) and _is_whole(b):
        return True
    ab = a + b
    return all(0x80 <= x < 0xC0 for x in ab[1:]) and len(ab) <= 4


def token_text(b: bytes) -> str:
    """``b`` as text when it is whole UTF-8 characters, else its bytes in hex (``<e4 b8>``)."""
    try:
        return b.decode("utf-8")
    except UnicodeDecodeError:
        return "<" + b.hex(" ") + ">"


class Tokenizer:
    """Byte-level BPE over ``vocab: {id: bytes}`` and ``merges: [(bytes, bytes)]`` (in rank order)."""

    def __init__(self, vocab: dict[int, bytes], merges: list[tuple[bytes, bytes]],
                 special_tokens: list[str] | None = None, *, pattern: str = GPT2_PATTERN,
                 cache_size: int = 20_000, char_first: bool = True):
        self.vocab: dict[int, bytes] = dict(vocab)
        self.merges = list(merges)
        self.pattern = resolve_pattern(pattern)
        self._pat = regex.compile(self.pattern)
        self.byte_to_id: dict[bytes, int] = {}
        for i, b in sorted(self.vocab.items()):
            self.byte_to_id.setdefault(b, i)
        # special tokens: reuse their id when their bytes are already in the vocab, else append
        self.special_tokens: list[str] = list(dict.fromkeys(special_tokens or []))
        self.special_ids: dict[str, int] = {}
        for s in self.special_tokens:
            b = s.encode("utf-8")
            if b not in self.byte_to_id:
                i = max(self.vocab, default=-1) + 1
                self.vocab[i] = b
                self.byte_to_id[b] = i
            self.special_ids[s] = self.byte_to_id[b]
        self._id_special = {i: s for s, i in self.special_ids.items()}
        missing = [x for x in range(256) if bytes([x]) not in self.byte_to_id]
        if missing:
            raise MicroLMError(f"vocab lacks {len(missing)} single bytes (e.g. {missing[0]}); not a byte-level BPE")
        self._byte_ids = [self.byte_to_id[bytes([x])] for x in range(256)]
        # pair of ids → (rank, merged id)
        self._rank: dict[tuple[int, int], int] = {}
        self._merged: list[int] = []
        for r, (a, b) in enumerate(self.merges):
            try:
                pair = (self.byte_to_id[a], self.byte_to_id[b])
                m = self.byte_to_id[a + b]
            except KeyError:
                raise MicroLMError(f"merge {r} ({a!r}, {b!r}) refers to a token missing from the vocab") from None
            self._rank.setdefault(pair, r)
            self._merged.append(m)
        self._cache: dict[str, list[int]] = {}
        self._char_cache: dict[str, list[int]] = {}
        self._single: dict[str, int] = {}
        unsafe = sorted({a + b for a, b in self.merges if not char_safe(a, b)}, key=len, reverse=True)
        self._unsafe_re = regex.compile(b"|".join(regex.escape(u) for u in unsafe)) if unsafe else None
        self._char_first = char_first  # False: always merge from bytes (slower, same ids; for tests)
        self._cache_size = cache_size
        # leftmost match, longest first among those starting there: HF's added-token split
        self._special_re = special_regex(self.special_tokens)
        # the proper prefixes of special tokens: a text ending in one may still grow into a token
        self._special_prefixes = {s[:k] for s in self.special_tokens for k in range(1, len(s))}
        self._max_special = max((len(s) for s in self.special_tokens), default=0)

    # ------------------------------------------------------------------ properties
    @property
    def vocab_size(self) -> int:
        return max(self.vocab) + 1

    @property
    def eos_id(self) -> int | None:
        return self.special_ids.get("<|endoftext|>")

    def __len__(self) -> int:
        return len(self.vocab)

    def __repr__(self) -> str:
        return f"Tokenizer(vocab={len(self.vocab)}, merges={len(self.merges)}, special={self.special_tokens})"

    # ------------------------------------------------------------------ encoding
    def _merge_loop(self, ids: list[int]) -> list[int]:
        """Apply merges in rank order: the lowest-ranked adjacent pair, all its occurrences left to
        right, until no adjacent pair has a merge.  ``ranks[k]`` is the rank of ``(ids[k], ids[k+1])``
        and is updated only around each merged position."""
        if len(ids) < 2:
            return ids
        rank_get = self._rank.get
        merged = self._merged
        ranks = list(map(rank_get, zip(ids, ids[1:], strict=False), repeat(_NO_RANK)))
        while True:
            r = min(ranks)
            if r == _NO_RANK:
                return ids
            new = merged[r]
            i = ranks.index(r)
            while i >= 0:
                # ids[i], ids[i+1] → new; the pairs on either side get new ranks
                ids[i] = new
                del ids[i + 1]
                del ranks[i]
                if i > 0:
                    ranks[i - 1] = rank_get((ids[i - 1], new), _NO_RANK)
                if i < len(ranks):
                    ranks[i] = rank_get((new, ids[i + 1]), _NO_RANK)
                try:
                    i = ranks.index(r, i + 1)
                except ValueError:
                    i = -1
            if len(ids) < 2:
                return ids

    def _char_ids(self, ch: str) -> list[int]:
        """A character's bytes merged on their own (cached)."""
        ids = self._char_cache.get(ch)
        if ids is None:
            ids = self._merge_loop([self._byte_ids[x] for x in ch.encode("utf-8")])
            if len(self._char_cache) < self._cache_size:
                self._char_cache[ch] = ids
                if len(ids) == 1:
                    self._single[ch] = ids[0]
        return ids

    def _encode_chunk(self, chunk: str) -> list[int]:
        cached = self._cache.get(chunk)
        if cached is not None:
            return cached
        raw = chunk.encode("utf-8")
        if self._char_first and (self._unsafe_re is None or self._unsafe_re.search(raw) is None):
            # Every merge that can apply here stays inside one character or joins whole characters,
            # so merging each character on its own first and then the characters gives exactly the
            # byte-level result (merges apply in rank order and a character's token always comes
            # before any merge that uses it) — with a sequence 3× shorter for Chinese.
            try:
                ids = list(map(self._single.__getitem__, chunk))
            except KeyError:
                ids = []
                for ch in chunk:
                    ids.extend(self._char_ids(ch))
        else:
            ids = [self._byte_ids[x] for x in raw]
        ids = self._merge_loop(ids)
        if len(chunk) <= 64:  # long unique clauses rarely repeat; do not let them churn the cache
            if len(self._cache) >= self._cache_size:
                self._cache.clear()
            self._cache[chunk] = ids
        return ids

    def _extend_plain(self, text: str, out: list[int]) -> None:
        enc = self._encode_chunk
        for chunk in self._pat.findall(text):
            out.extend(enc(chunk))

    @staticmethod
    def _check_text(text) -> None:
        if not isinstance(text, str):
            raise MicroLMError(f"encode expects str, got {type(text).__name__}")

    def encode(self, text: str) -> list[int]:
        """Token ids of ``text``, its special tokens as their ids: ``text`` is split at every special
        token (leftmost first; of those starting at the same place the longest), exactly as the
        exported ``tokenizer.json`` does.  For trusted text only (templates, control markers); text
        from users or data goes through ``encode_ordinary``."""
        self._check_text(text)
        out: list[int] = []
        if self._special_re is None:
            self._extend_plain(text, out)
            return out
        for k, part in enumerate(self._special_re.split(text)):
            if k % 2:
                out.append(self.special_ids[part])
            elif part:
                self._extend_plain(part, out)
        return out

    def encode_ordinary(self, text: str) -> list[int]:
        """Token ids of ``text`` as plain characters: a special token's text in it stays characters
        (``<|im_end|>`` typed by a user is not the control token)."""
        self._check_text(text)
        out: list[int] = []
        self._extend_plain(text, out)
        return out

    def _safe_cut(self, buf: str, ordinary: bool) -> int:
        """A cut point in ``buf`` such that ``encode(buf[:cut]) + encode(buf[cut:] + more)`` equals
        ``encode(buf + more)`` for any ``more``.

        The special tokens found up to the first place ``p`` where ``buf`` ends in the beginning of
        a special token (which ``more`` may complete, and which would then win over any match at or
        after it) are final; the text from the last of them to ``p`` is ordinary text that ends
        either at ``p`` (when a special token follows) or somewhere in ``more``.  Cutting it before
        its second-to-last pre-token keeps the pre-tokens on both sides of the cut the same in both
        cases."""
        n = len(buf)
        seg, p = 0, n
        if not ordinary and self._special_re is not None:
            partial = [s for s in range(max(0, n - self._max_special + 1), n) if buf[s:] in self._special_prefixes]
            for m in self._special_re.finditer(buf):
                if any(seg <= s <= m.start() for s in partial):
                    break
                seg = m.end()
            p = next((s for s in partial if s >= seg), n)
        starts = [seg + m.start() for m in self._pat.finditer(buf[seg:p])]
        return starts[-2] if len(starts) >= 2 else seg

    def encode_iterable(self, iterable: Iterable[str] | str | os.PathLike, *, ordinary: bool = False,
                        chunk_chars: int = 1 << 16) -> Iterator[int]:
        """Ids of the concatenated strings (e.g. the lines of an open file), exactly those of
        ``encode`` (``encode_ordinary`` when ``ordinary``) on the whole text, holding only about
        ``chunk_chars`` characters at a time — a special token split across pieces or chunks is
        still found.  A path (``str`` naming an existing file or ``PathLike``) is opened and read
        line by line."""
        if isinstance(iterable, os.PathLike) or (isinstance(iterable, str) and os.path.isfile(iterable)):
            with open(iterable, encoding="utf-8", errors="replace", newline="") as f:
                yield from self.encode_iterable(f, ordinary=ordinary, chunk_chars=chunk_chars)
            return
        if isinstance(iterable, str):
            raise MicroLMError("encode_iterable takes an iterable of strings or a path to a file; "
                               "use encode() for a single string")
        enc = self.encode_ordinary if ordinary else self.encode
        buf = ""
        pieces: list[str] = []
        size = 0
        for piece in iterable:
            pieces.append(piece)
            size += len(piece)
            if size < chunk_chars:
                continue
            buf += "".join(pieces)
            pieces.clear()
            cut = self._safe_cut(buf, ordinary)
            if cut > 0:
                yield from enc(buf[:cut])
                buf = buf[cut:]
            size = len(buf)
        buf += "".join(pieces)
        if buf:
            yield from enc(buf)

    # ------------------------------------------------------------------ decoding
    def decode_bytes(self, ids: Iterable[int]) -> bytes:
        try:
            return b"".join([self.vocab[i] for i in ids])
        except KeyError as e:
            raise MicroLMError(f"token id {e.args[0]} is not in the vocabulary (size {self.vocab_size})") from None
        except TypeError:
            raise MicroLMError("decode expects an iterable of int token ids") from None

    def decode(self, ids: Iterable[int]) -> str:
        """Text of ``ids``; bytes that are not valid UTF-8 become U+FFFD (never an exception)."""
        return self.decode_bytes(ids).decode("utf-8", errors="replace")

    def stream_decoder(self) -> StreamDecoder:
        return StreamDecoder(self)

    def id_to_token(self, i: int) -> str:
        """A readable form of token ``i``: special tokens and whole characters as text, a token
        that is part of a character as its bytes, e.g. ``<e4 b8>``."""
        if i in self._id_special:
            return self._id_special[i]
        return token_text(self.vocab[i])

    # ------------------------------------------------------------------ chat
    def encode_chat(self, messages: list[dict], *, add_generation_prompt: bool = False) -> list[int]:
        """ChatML ids: the template's control tokens are special, roles and message contents are
        plain text (``encode_ordinary``: a ``<|im_end|>`` typed by a user stays characters)."""
        ids: list[int] = []
        start, end = self.special_ids["<|im_start|>"], self.special_ids["<|im_end|>"]
        for m in messages:
            render_chat([m])  # validates the message shape
            ids.append(start)
            ids.extend(self.encode_ordinary(f"{m['role']}\n{m['content']}"))
            ids.append(end)
            ids.extend(self.encode_ordinary("\n"))
        if add_generation_prompt:
            ids.append(start)
            ids.extend(self.encode_ordinary("assistant\n"))
        return ids

    # ------------------------------------------------------------------ files
    @classmethod
    def from_files(cls, vocab_path: str | os.PathLike, merges_path: str | os.PathLike,
                   special_tokens: list[str] | None = None, *, pattern: str = GPT2_PATTERN) -> Tokenizer:
        """GPT-2 style ``vocab.json`` ({token text: id}) and ``merges.txt`` ("a b" per line)."""
        try:
            raw = json.loads(Path(vocab_path).read_text(encoding="utf-8"))
            lines = Path(merges_path).read_text(encoding="utf-8").splitlines()
        except FileNotFoundError as e:
            raise MicroLMError(f"tokenizer file not found: {e.filename}") from None
        except json.JSONDecodeError as e:
            raise MicroLMError(f"{vocab_path}: invalid JSON ({e.msg})") from None
        specials = set(special_tokens or [])
        vocab = {int(i): (t.encode("utf-8") if t in specials else text_to_bytes(t)) for t, i in raw.items()}
        merges = []
        for n, line in enumerate(lines):
            if not line or line.startswith("#version"):
                continue
            parts = line.split(" ")
            if len(parts) != 2:
                raise MicroLMError(f"{merges_path}:{n + 1}: expected two tokens, got {line!r}")
            merges.append((text_to_bytes(parts[0]), text_to_bytes(parts[1])))
        return cls(vocab, merges, special_tokens, pattern=pattern)

    def save(self, out_dir: str | os.PathLike) -> Path:
        """``vocab.json``, ``merges.txt``, ``tokenizer.json`` + ``tokenizer_config.json`` (Hugging Face)
        and ``microlm_tokenizer.json`` (pattern and special tokens, for ``Tokenizer.load``)."""
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        save_vocab_merges(self.vocab, self.merges, out, special_tokens=self.special_tokens)
        write_json(out / "microlm_tokenizer.json", {"pattern": self.pattern, "special_tokens": self.special_tokens,
                                                     "vocab_size": self.vocab_size, "merges": len(self.merges)})
        write_hf_tokenizer(self, out)
        return out

    @classmethod
    def load(cls, path: str | os.PathLike) -> Tokenizer:
        """A tokenizer folder written by ``save``."""
        d = Path(path)
        meta_path = d / "microlm_tokenizer.json"
        if not meta_path.is_file():
            raise MicroLMError(f"not a MicroLM tokenizer folder (no microlm_tokenizer.json): {d}")
        meta = json.loads(meta_path.read_text(encoding="utf-8"))
        return cls.from_files(d / "vocab.json", d / "merges.txt", meta["special_tokens"], pattern=meta["pattern"])


class StreamDecoder:
    """Turns ids into text as they arrive, never emitting half a UTF-8 character.

    ``feed(id)`` returns the text completed so far (possibly ``""`` while a character is split
    across tokens); ``flush()`` returns what is left (an incomplete tail becomes U+FFFD).
    """

    def __init__(self, tokenizer: Tokenizer):
        self.tok = tokenizer
        self._dec = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def feed(self, token_id: int | Iterable[int]) -> str:
        ids = [token_id] if isinstance(token_id, int) else list(token_id)
        return self._dec.decode(self.tok.decode_bytes(ids))

    def flush(self) -> str:
        return self._dec.decode(b"", final=True)
