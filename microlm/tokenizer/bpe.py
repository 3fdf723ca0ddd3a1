"""Byte-level BPE training, written from scratch (stage A3).

``train_bpe(path, vocab_size, special_tokens) -> (vocab, merges)`` with the id layout
``[special tokens] [256 single bytes] [merges in creation order]``.

The algorithm, and why it is fast in pure Python:

1. **Pre-tokenise in parallel.** The file is cut into ``workers`` pieces at special-token (or, for
   JSONL, line) boundaries; each process splits its text at the special tokens (so no merge ever
   crosses one), runs the pre-tokenisation regex and returns a ``Counter`` of chunks.  Training then
   works on *unique* chunks ("words") weighted by their counts.
2. **Count pairs once**, and index each pair to the words that contain it.
3. **Merge incrementally.** The best pair comes off a heap (lazy deletion: a stale entry is
   re-pushed with its current count when it surfaces).  Merging touches only the words in the pair's
   index, and only the pairs *next to* each merged occurrence change count, so one merge costs
   O(occurrences), not O(corpus) as in a recount-per-merge trainer.

Ties between equally frequent pairs go to the lexicographically greater ``(left_bytes, right_bytes)``,
the rule of the CS336 reference, so the merge list is deterministic and comparable.
"""

from __future__ import annotations

import heapq
import json
import os
from collections import Counter
from collections.abc import Iterable, Iterator
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import regex

from microlm.errors import MicroLMError
from microlm.io import atomic_open
from microlm.tokenizer.bytes_unicode import bytes_to_text

__all__ = ["GPT2_PATTERN", "QWEN2_PATTERN", "PATTERNS", "train_bpe", "train_bpe_from_counts",
           "pretokenize_counts", "find_chunk_boundaries", "split_on_special", "special_regex",
           "resolve_pattern", "iter_file_texts"]

# GPT-2's pre-tokenizer (also HF ``ByteLevel(use_regex=True)``): letters, numbers and other symbols
# in separate runs, an optional leading space glued to the run.
GPT2_PATTERN = r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""
# Qwen2's: single digits (numbers tokenise uniformly), case-insensitive contractions, one symbol
# allowed to lead a letter run, newlines grouped separately from spaces.
QWEN2_PATTERN = (r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"""
                 r"""|\s*[\r\n]+|\s+(?!\S)|\s+""")
PATTERNS = {"gpt2": GPT2_PATTERN, "qwen2": QWEN2_PATTERN}


def resolve_pattern(pattern: str) -> str:
    """A name from ``PATTERNS`` or a regex itself."""
    return PATTERNS.get(pattern, pattern)


def special_regex(special_tokens: Iterable[str]) -> regex.Pattern | None:
    """A regex that finds special tokens, longest first (so overlapping tokens match the longer one)."""
    toks = sorted(set(special_tokens), key=len, reverse=True)
    if not toks:
        return None
    return regex.compile("(" + "|".join(regex.escape(t) for t in toks) + ")")


def split_on_special(text: str, special_re: regex.Pattern | None) -> list[str]:
    """``text`` split at special tokens, keeping them as their own items (at odd indices)."""
    return [text] if special_re is None else special_re.split(text)


def find_chunk_boundaries(path: str | os.PathLike, n: int, separator: bytes) -> list[int]:
    """Byte offsets cutting ``path`` into at most ``n`` pieces, each starting right after ``separator``.

    A piece never splits a separator (or a UTF-8 character, since the separator is ASCII-safe
    bytes), so pieces can be decoded and pre-tokenised independently.
    """
    size = os.path.getsize(path)
    if n <= 1 or size == 0:
        return [0, size]
    step = size // n
    bounds = [0]
    with open(path, "rb") as f:
        for i in range(1, n):
            pos = max(i * step, bounds[-1])
            f.seek(pos)
            buf = b""
            while True:
                block = f.read(1 << 16)
                if not block:
                    pos = size
                    break
                buf += block
                j = buf.find(separator)
                if j >= 0:
                    pos = pos + j + len(separator)
                    break
                keep = len(separator) - 1  # a separator may straddle two reads: keep its possible start
                pos += len(buf) - keep
                buf = buf[len(buf) - keep:] if keep else b""
            bounds.append(pos)
    bounds.append(size)
    return sorted(set(bounds))


def iter_file_texts(path: str | os.PathLike, start: int = 0, end: int | None = None,
                    block_bytes: int = 1 << 22) -> Iterator[str]:
    """Texts in ``[start, end)`` of a file: ``{"text"}`` records for ``.jsonl``, else raw text blocks
    cut at line ends (a block never splits a line, so never a special token or a character)."""
    path = str(path)
    is_jsonl = path.endswith(".jsonl")
    with open(path, "rb") as f:
        f.seek(start)
        remaining = (end if end is not None else os.path.getsize(path)) - start
        pending = b""
        pos = start  # the file offset of ``data[0]`` (what an error names)
        while remaining > 0 or pending:
            block = f.read(min(block_bytes, remaining)) if remaining > 0 else b""
            remaining -= len(block)
            data = pending + block
            if remaining > 0:
                cut = data.rfind(b"\n") + 1
                if cut == 0:  # a line longer than a block: keep reading
                    pending = data
                    continue
                data, pending = data[:cut], data[cut:]
            else:
                pending = b""
            if is_jsonl:
                at = pos
                for line in data.split(b"\n"):
                    if line.strip():
                        try:
                            yield json.loads(line)["text"]
                        except (ValueError, KeyError, TypeError):
                            raise MicroLMError(f"{path}: the line at byte {at} is not a {{\"text\"}} JSONL record "
                                               f"(fix or remove that line)") from None
                    at += len(line) + 1
            else:
                yield data.decode("utf-8", errors="replace")
            pos += len(data)
            if not block and not pending:
                break


def _count_piece(args: tuple[str, int, int, str, tuple[str, ...]]) -> Counter:
    path, start, end, pattern, specials = args
    pat = regex.compile(pattern)
    sre = special_regex(specials)
    counts: Counter = Counter()
    for text in iter_file_texts(path, start, end):
        for i, part in enumerate(split_on_special(text, sre)):
            if i % 2 == 0 and part:
                counts.update(pat.findall(part))
    return counts


def pretokenize_counts(path: str | os.PathLike, special_tokens: Iterable[str] = (), *,
                       pattern: str = GPT2_PATTERN, workers: int = 1) -> Counter:
    """Counts of pre-tokenised chunks in a text or ``{"text"}`` JSONL file, special tokens removed."""
    path = str(path)
    if not os.path.isfile(path):
        raise MicroLMError(f"tokenizer training input not found: {path}")
    specials = tuple(special_tokens)
    pattern = resolve_pattern(pattern)
    if path.endswith(".jsonl") or not specials:
        sep = b"\n"
    else:
        sep = max(specials, key=len).encode("utf-8")  # documents end with the EOS token
    bounds = find_chunk_boundaries(path, max(1, workers) * 4 if workers > 1 else 1, sep)
    jobs = [(path, a, b, pattern, specials) for a, b in zip(bounds, bounds[1:], strict=False) if b > a]
    total: Counter = Counter()
    if workers > 1 and len(jobs) > 1:
        with ProcessPoolExecutor(max_workers=workers) as ex:
            for c in ex.map(_count_piece, jobs):
                total.update(c)
    else:
        for job in jobs:
            total.update(_count_piece(job))
    return total


def _rank_key(b: bytes) -> tuple[int, ...]:
    """An order-reversing key: ``a > b`` as bytes  ⇔  ``_rank_key(a) < _rank_key(b)``."""
    return tuple(255 - x for x in b) + (256,)  # 256 > any 255 - x: a proper prefix (smaller) keys larger


def train_bpe(input_path: str | os.PathLike, vocab_size: int, special_tokens: list[str], *,
              pattern: str = GPT2_PATTERN, workers: int | None = None,
              progress: bool = False) -> tuple[dict[int, bytes], list[tuple[bytes, bytes]]]:
    """Train a byte-level BPE on a text file (documents separated by a special token) or a
    ``{"text"}`` JSONL file.  ``vocab_size`` counts the special tokens and the 256 bytes.

    ``workers``: pre-tokenisation processes (default: CPU count).
    """
    specials = list(dict.fromkeys(special_tokens))
    if vocab_size < len(specials) + 256:
        raise MicroLMError(f"vocab_size {vocab_size} < {len(specials)} special tokens + 256 bytes")
    workers = os.cpu_count() or 1 if workers is None else workers
    counts = pretokenize_counts(input_path, specials, pattern=pattern, workers=workers)
    return train_bpe_from_counts(counts, vocab_size, specials, progress=progress)


def train_bpe_from_counts(counts: dict[str, int] | Counter, vocab_size: int, special_tokens: list[str], *,
                          progress: bool = False, on_merge=None
                          ) -> tuple[dict[int, bytes], list[tuple[bytes, bytes]]]:
    """The merge loop on pre-tokenised chunk counts (see the module docstring).

    ``on_merge(step, (left, right), count)`` is called after every merge (the notebook uses it to
    show training step by step).
    """
    specials = list(dict.fromkeys(special_tokens))
    vocab: dict[int, bytes] = {i: s.encode("utf-8") for i, s in enumerate(specials)}
    off = len(vocab)
    for b in range(256):
        vocab[off + b] = bytes([b])
    n_merges = vocab_size - len(vocab)
    if n_merges < 0:
        raise MicroLMError(f"vocab_size {vocab_size} < {len(specials)} special tokens + 256 bytes")
    byte_ids = [off + b for b in range(256)]

    # unique words as lists of ids, their counts, and the pair statistics
    words: list[list[int]] = []
    freqs: list[int] = []
    pair_counts: dict[tuple[int, int], int] = {}
    where: dict[tuple[int, int], list[int]] = {}
    for chunk, c in counts.items():
        w = [byte_ids[b] for b in chunk.encode("utf-8")]
        if len(w) < 2:
            continue
        wi = len(words)
        words.append(w)
        freqs.append(c)
        for p in zip(w, w[1:], strict=False):
            pair_counts[p] = pair_counts.get(p, 0) + c
            lst = where.get(p)
            if lst is None:
                where[p] = [wi]
            elif lst[-1] != wi:
                lst.append(wi)

    rk = {i: _rank_key(v) for i, v in vocab.items()}
    # a min-heap: -count pops the most frequent pair first, the rank keys break ties toward the greater bytes
    heap = [(-c, rk[a], rk[b], a, b) for (a, b), c in pair_counts.items()]
    heapq.heapify(heap)
    merges: list[tuple[bytes, bytes]] = []

    bar = None
    if progress:
        from tqdm.auto import tqdm
        bar = tqdm(total=n_merges, desc="bpe merges", unit="merge", mininterval=0.5)

    push = heapq.heappush
    pop = heapq.heappop
    for step in range(n_merges):
        best = None
        while heap:
            negc, _, _, a, b = pop(heap)
            cur = pair_counts.get((a, b), 0)
            if cur <= 0:
                continue
            if cur != -negc:  # stale: the count fell since this entry was pushed
                push(heap, (-cur, rk[a], rk[b], a, b))
                continue
            best = (a, b)
            break
        if best is None:  # every word is a single token: nothing left to merge
            break
        a, b = best
        new_id = len(vocab)
        vocab[new_id] = vocab[a] + vocab[b]
        rk[new_id] = _rank_key(vocab[new_id])
        merges.append((vocab[a], vocab[b]))
        count = pair_counts.pop(best)
        touched: dict[tuple[int, int], int] = {}
        seen_words = where.pop(best)
        last = -1
        pc_get = pair_counts.get
        for wi in sorted(set(seen_words)) if len(seen_words) > 1 else seen_words:
            if wi == last:
                continue
            last = wi
            w = words[wi]
            try:
                i = w.index(a)
            except ValueError:  # the pair left this word through an earlier merge
                continue
            f = freqs[wi]
            # merge in place, left to right; each occurrence swaps its neighbour pairs
            # (x, a) → (x, new) and (b, y) → (new, y).  Consecutive occurrences need no special
            # case: the next one sees the already-merged token as its left neighbour.
            while True:
                if i + 1 < len(w) and w[i + 1] == b:
                    if i > 0:
                        x = w[i - 1]
                        p = (x, a)
                        if p != best:
                            pair_counts[p] -= f
                            touched[p] = 1
                        p = (x, new_id)
                        pair_counts[p] = pc_get(p, 0) + f
                        touched[p] = 1
                        lst = where.get(p)
                        if lst is None:
                            where[p] = [wi]
                        elif lst[-1] != wi:
                            lst.append(wi)
                    if i + 2 < len(w):
                        y = w[i + 2]
                        p = (b, y)
                        if p != best:
                            pair_counts[p] -= f
                            touched[p] = 1
                        p = (new_id, y)
                        pair_counts[p] = pc_get(p, 0) + f
                        touched[p] = 1
                        lst = where.get(p)
                        if lst is None:
                            where[p] = [wi]
                        elif lst[-1] != wi:
                            lst.append(wi)
                    w[i] = new_id
                    del w[i + 1]
                try:
                    i = w.index(a, i + 1)
                except ValueError:
                    break
        # the merged pair itself may show up as a neighbour when a == b; it is gone either way
        pair_counts.pop(best, None)
        touched.pop(best, None)
        for p in touched:
            c = pair_counts.get(p, 0)
            if c > 0:
                push(heap, (-c, rk[p[0]], rk[p[1]], p[0], p[1]))
            else:
                pair_counts.pop(p, None)
                where.pop(p, None)
        if on_merge is not None:
            on_merge(step, merges[-1], count)
        if bar is not None:
            bar.update(1)
    if bar is not None:
        bar.close()
    return vocab, merges


def save_vocab_merges(vocab: dict[int, bytes], merges: list[tuple[bytes, bytes]], out_dir: str | Path,
                      special_tokens: Iterable[str] = ()) -> None:
    """GPT-2 style ``vocab.json`` ({token text: id}, bytes in byte-to-unicode text, special tokens as
    themselves) and ``merges.txt`` (one pair a line)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    with atomic_open(out / "vocab.json", "w") as f:
        specials = {t.encode("utf-8"): t for t in special_tokens}
        json.dump({specials.get(v) or bytes_to_text(v): k for k, v in sorted(vocab.items())}, f,
                  ensure_ascii=False, indent=0)
    with atomic_open(out / "merges.txt", "w") as f:
        f.write("#version: 0.2\n")
        for a, b in merges:
            f.write(f"{bytes_to_text(a)} {bytes_to_text(b)}\n")
