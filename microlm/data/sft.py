"""SFT data (stage A6): MiniMind ``{"conversations": [{"role", "content"}, ...]}`` → ChatML ids + loss mask.

Each message is ``<|im_start|>{role}\\n{content}<|im_end|>\\n``; ``role\\ncontent`` is encoded as one
piece of plain text with ``encode_ordinary`` (a ``<|im_end|>`` inside a sample stays characters;
otherwise exactly what ``Tokenizer.encode_chat`` and transformers' ``apply_chat_template`` produce),
and the loss is taken **only on assistant tokens, including each ``<|im_end|>``** — the model learns
to answer and to stop, not to predict the user.  A token that straddles the header newline and the
first content byte counts as content.

Truncation never cuts inside a turn: a conversation longer than the context keeps its leading whole
turns as long as one assistant turn survives (counted as ``truncated``); if even the first assistant
turn does not fit, the record is dropped (``turn_longer_than_context``).

Batches are **padded**, not packed: SFT conversations are short and uneven, and packing several into
one window would let attention cross conversations unless every batch carried a block-diagonal mask.
Padding (with ``<|endoftext|>``, label -100) keeps each conversation alone in its row; the cost is
the padded positions, which the length report shows.
"""

from __future__ import annotations

import gzip
import json
from collections import Counter
from dataclasses import dataclass, field

import numpy as np
import torch

from microlm.errors import MicroLMError
from microlm.paths import REPO_ROOT

__all__ = ["ROLES", "SFTDrop", "parse_conversation", "encode_conversation", "SFTExample", "encode_records",
           "SFTBatches", "show_mask", "IGNORE"]

ROLES = ("system", "user", "assistant")
IGNORE = -100


class SFTDrop(Exception):
    """A record that cannot be used; ``reason`` is counted in the report."""

    def __init__(self, reason: str, detail: str = ""):
        super().__init__(reason if not detail else f"{reason}: {detail}")
        self.reason = reason


def parse_conversation(record: dict | str) -> list[dict]:
    """Validate one record; return its messages.  Raises ``SFTDrop`` with a reason."""
    if isinstance(record, str):
        try:
            record = json.loads(record)
        except ValueError:
            raise SFTDrop("malformed_json") from None
    conv = record.get("conversations") if isinstance(record, dict) else None
    if not isinstance(conv, list) or not conv:
        raise SFTDrop("missing_conversations")
    out = []
    for m in conv:
        if not isinstance(m, dict) or not isinstance(m.get("role"), str) or not isinstance(m.get("content"), str):
            raise SFTDrop("malformed_message")
        if m["role"] not in ROLES:
            raise SFTDrop("unknown_role", m["role"])
        if not m["content"].strip():
            raise SFTDrop("empty_content", m["role"])
        out.append({"role": m["role"], "content": m["content"]})
    if not any(m["role"] == "assistant" for m in out):
        raise SFTDrop("no_assistant_turn")
    return out


def _turn(tok, m: dict) -> tuple[list[int], list[int]]:
    """Ids and 0/1 loss mask of one ChatML turn."""
    start, end = tok.special_ids["<|im_start|>"], tok.special_ids["<|im_end|>"]
    body = tok.encode_ordinary(f"{m['role']}\n{m['content']}")
    trained = m["role"] == "assistant"
    header = len(f"{m['role']}\n".encode())
    mask, pos = [], 0
    for i in body:
        pos += len(tok.vocab[i])  # bytes so far: a token is content once it reaches past "role\n"
        mask.append(1 if trained and pos > header else 0)
    nl = tok.encode_ordinary("\n")
    return [start, *body, end, *nl], [0, *mask, 1 if trained else 0, *([0] * len(nl))]


def encode_conversation(tok, messages: list[dict], max_len: int) -> tuple[list[int], list[int], bool]:
    """``(ids, mask, truncated)`` for a validated conversation, at most ``max_len`` tokens."""
    ids: list[int] = []
    mask: list[int] = []
    truncated = False
    for m in messages:
        t_ids, t_mask = _turn(tok, m)
        if len(ids) + len(t_ids) > max_len:
            truncated = True
            break
        ids += t_ids
        mask += t_mask
    if not any(mask):
        raise SFTDrop("turn_longer_than_context", f"first assistant turn does not fit {max_len} tokens")
    # a dangling user turn after the last kept assistant turn teaches nothing: cut back to it
    last = max(i for i, v in enumerate(mask) if v)
    nl = len(tok.encode_ordinary("\n"))
    cut = min(len(ids), last + 1 + nl)
    if cut < len(ids):  # turns after the last assistant answer are dropped too
        truncated = True
        ids, mask = ids[:cut], mask[:cut]
    return ids, mask, truncated


@dataclass
class SFTExample:
    ids: list[int]
    mask: list[int]


@dataclass
class SFTReport:
    records: int = 0
    kept: int = 0
    truncated: int = 0
    drops: Counter = field(default_factory=Counter)
    tokens: int = 0
    trained_tokens: int = 0

    def __add__(self, other: SFTReport) -> SFTReport:
        return SFTReport(self.records + other.records, self.kept + other.kept, self.truncated + other.truncated,
                         self.drops + other.drops, self.tokens + other.tokens,
                         self.trained_tokens + other.trained_tokens)

    def to_dict(self) -> dict:
        return {"records": self.records, "kept": self.kept, "truncated": self.truncated,
                "drops": dict(self.drops), "tokens": self.tokens, "trained_tokens": self.trained_tokens}


def encode_records(tok, records, max_len: int, max_kept: int | None = None) -> tuple[list[SFTExample], SFTReport]:
    """Encode an iterable of records (dicts or JSON lines); bad ones are counted by reason.
    ``max_kept``: stop once that many conversations are usable (held-out sets: the first N that fit)."""
    rep = SFTReport()
    out = []
    for rec in records:
        if max_kept is not None and rep.kept >= max_kept:
            break
        rep.records += 1
        try:
            ids, mask, truncated = encode_conversation(tok, parse_conversation(rec), max_len)
        except SFTDrop as d:
            rep.drops[d.reason] += 1
            continue
        rep.kept += 1
        rep.truncated += int(truncated)
        rep.tokens += len(ids)
        rep.trained_tokens += sum(mask)
        out.append(SFTExample(ids, mask))
    return out, rep


class SFTBatches:
    """Padded next-token batches of conversations; batch ``s`` is a pure function of ``(seed, s)``
    (so resume is exact and DDP ranks split one global batch, as in pretraining)."""

    def __init__(self, examples: list[SFTExample], batch_size: int, pad_id: int, seed: int,
                 weights: list[float] | None = None):
        if not examples:
            raise MicroLMError("no usable SFT conversations")
        self.examples, self.batch_size, self.pad_id, self.seed = examples, batch_size, pad_id, seed
        self.p = None if weights is None else np.asarray(weights, dtype=np.float64) / float(np.sum(weights))

    def rows(self, step: int) -> np.ndarray:
        rng = np.random.default_rng([self.seed, step])
        if self.p is None:  # uniform over the examples
            return rng.integers(0, len(self.examples), self.batch_size)
        return rng.choice(len(self.examples), self.batch_size, p=self.p)

    def collate(self, rows) -> tuple[torch.Tensor, torch.Tensor]:
        exs = [self.examples[int(r)] for r in rows]
        width = max(len(e.ids) for e in exs) - 1  # inputs lose the last token, targets the first
        x = torch.full((len(exs), width), self.pad_id, dtype=torch.long)  # (B, T), right-padded
        y = torch.full((len(exs), width), IGNORE, dtype=torch.long)  # (B, T): pads never train
        for i, e in enumerate(exs):
            n = len(e.ids) - 1
            x[i, :n] = torch.tensor(e.ids[:-1])
            tgt = torch.tensor(e.ids[1:])
            keep = torch.tensor(e.mask[1:], dtype=torch.bool)  # the target's own mask bit: assistant tokens only
            y[i, :n] = torch.where(keep, tgt, torch.full_like(tgt, IGNORE))
        return x, y

    def get(self, step: int, micro: int, n_micro: int, rank: int, world: int):
        return self.collate(self.rows(step)[rank::world][micro::n_micro])


def show_mask(tok, ex: SFTExample, trained: str = "[{}]") -> str:
    """The conversation as text with each run of trained tokens wrapped (default ``[...]``)."""
    out = []
    k = 0
    while k < len(ex.ids):
        j = k
        while j < len(ex.ids) and ex.mask[j] == ex.mask[k]:
            j += 1
        text = tok.decode_bytes(ex.ids[k:j]).decode("utf-8", "replace")
        out.append(trained.format(text) if ex.mask[k] else text)
        k = j
    return "".join(out)


# ---------------------------------------------------------------------------- sources
def read_sft_file(path) -> list[dict | str]:
    """Records of one SFT file (``.jsonl`` or ``.jsonl.gz``).  BELLE's eval format
    ``{"question", "std_answer"}`` becomes a one-turn conversation."""
    opener = gzip.open if str(path).endswith(".gz") else open
    out: list[dict | str] = []
    with opener(path, "rt", encoding="utf-8", errors="replace") as f:
        for line in f:
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except ValueError:
                out.append(line)  # counted as malformed_json by encode_records
                continue
            if isinstance(rec, dict) and "question" in rec and "std_answer" in rec and "conversations" not in rec:
                rec = {"conversations": [{"role": "user", "content": str(rec["question"])},
                                         {"role": "assistant", "content": str(rec["std_answer"])}]}
            if isinstance(rec, dict) and rec.get("source") == "llamafactory_identity":
                for m in rec.get("conversations", []):
                    if isinstance(m, dict) and isinstance(m.get("content"), str):
                        m["content"] = m["content"].replace("{{name}}", "MicroLM").replace("{{author}}",
                                                                                          "the MicroLM course")
            out.append(rec)
    return out


def embedded_sft_records() -> list[dict]:
    """The fresh-machine default of general conversations, written for the project:
    ``data/sft/chat_zh.jsonl`` (everyday questions, facts, arithmetic, idioms, advice, a few
    multi-turn chats) + ``data/sft/identity.jsonl``.  The derived tasks (``microlm/data/tasks.py``)
    are added to this — and to the bundle's SFT files — by the SFT stage."""
    return [r for name in ("chat_zh.jsonl", "identity.jsonl") for r in read_sft_file(REPO_ROOT / "data" / "sft" / name)]
