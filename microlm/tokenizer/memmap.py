"""Corpus JSONL → ``uint16`` token files with a document index (the ``tokens`` stage, A4), and a window
sampler over them.

Layout of ``tokens/``::

    train.bin   uint16 token ids, documents back to back, each ending with <|endoftext|>
    train.idx   int64 offsets: document k is bin[idx[k]:idx[k+1]]  (len = docs + 1)
    val.bin / val.idx
    meta.json   dtype, vocab size, eos id, counts, the tokenizer's digest

The sampler (``TokenWindows``) re-opens the memmap for every batch, as nanoGPT does, so memory
stays flat however long training runs, and it never reads more than the sampled windows.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np

from microlm.errors import MicroLMError
from microlm.io import atomic_open, batched
from microlm.tokenizer.tokenizer import Tokenizer

__all__ = ["DTYPE", "check_vocab_fits", "encode_documents", "write_token_file", "TokenWindows",
           "read_index", "open_tokens"]

DTYPE = np.uint16

_TOK = None


def check_vocab_fits(vocab_size: int, dtype=DTYPE) -> None:
    """Refuse a vocabulary whose ids do not fit the token file's dtype."""
    limit = int(np.iinfo(dtype).max) + 1
    if vocab_size > limit:
        raise MicroLMError(f"vocabulary of {vocab_size} ids does not fit {np.dtype(dtype).name} token files "
                           f"(at most {limit}); use a smaller vocab")


def _init_worker(tok_dir: str) -> None:
    global _TOK
    _TOK = Tokenizer.load(tok_dir)


def _encode_batch(lines: list[bytes]) -> tuple[np.ndarray, np.ndarray, int]:
    """Token ids for a batch of ``{"text"}`` lines: body as plain text (``encode_ordinary``: special
    token strings in scraped text stay text), then exactly one EOS id — the ``<|endoftext|>`` the
    corpus stage appends as text is stripped and replaced by the id.  Returns (ids, per-doc
    lengths, malformed lines)."""
    tok = _TOK
    eos_text = "<|endoftext|>"
    eos = tok.eos_id
    out: list[int] = []
    lens: list[int] = []
    bad = 0
    for line in lines:
        try:
            text = json.loads(line)["text"]
            if not isinstance(text, str):
                raise TypeError
        except (ValueError, KeyError, TypeError):
            bad += 1
            continue
        if text.endswith(eos_text):
            text = text[: -len(eos_text)]
        n0 = len(out)
        out.extend(tok.encode_ordinary(text))
        out.append(eos)
        lens.append(len(out) - n0)
    return np.asarray(out, dtype=DTYPE), np.asarray(lens, dtype=np.int64), bad


def _batches(path: Path, batch_docs: int) -> Iterator[list[bytes]]:
    with open(path, "rb") as f:
        yield from batched((line for line in f if line.strip()), batch_docs)


def encode_documents(jsonl: str | os.PathLike, tok_dir: str | os.PathLike, *, workers: int = 2,
                     batch_docs: int = 256, progress: bool = False) -> Iterator[tuple[np.ndarray, np.ndarray, int]]:
    """Encode a ``{"text"}`` JSONL file in batches, in file order, over ``workers`` processes."""
    jsonl = Path(jsonl)
    if not jsonl.is_file():
        raise MicroLMError(f"corpus split not found: {jsonl}")
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=jsonl.stat().st_size, desc=f"tokenize {jsonl.name}", unit="B", unit_scale=True,
                   mininterval=0.5)

    def tick(batch):
        if bar is not None:
            bar.update(sum(len(x) for x in batch))
        return batch

    try:
        if workers <= 1:
            _init_worker(str(tok_dir))
            for batch in _batches(jsonl, batch_docs):
                yield _encode_batch(tick(batch))
        else:
            with ProcessPoolExecutor(max_workers=workers, initializer=_init_worker, initargs=(str(tok_dir),)) as ex:
                # bounded look-ahead keeps memory flat while both processes stay busy
                pending = []
                for batch in _batches(jsonl, batch_docs):
                    pending.append(ex.submit(_encode_batch, tick(batch)))
                    if len(pending) >= 4 * workers:
                        yield pending.pop(0).result()
                for fut in pending:
                    yield fut.result()
    finally:
        if bar is not None:
            bar.close()


def write_token_file(jsonl: str | os.PathLike, tok_dir: str | os.PathLike, out_bin: str | os.PathLike, *,
                     workers: int = 2, batch_docs: int = 256, progress: bool = False) -> dict:
    """Write ``out_bin`` (uint16 ids) and the matching ``.idx`` (int64 document offsets) atomically."""
    out_bin = Path(out_bin)
    docs = 0
    tokens = 0
    bad = 0
    offsets = [np.zeros(1, dtype=np.int64)]
    with atomic_open(out_bin, "wb") as f:
        for ids, lens, nbad in encode_documents(jsonl, tok_dir, workers=workers, batch_docs=batch_docs,
                                                progress=progress):
            f.write(ids.tobytes())
            if len(lens):  # each document's end = the next one's start, counted over the whole file
                offsets.append(tokens + np.cumsum(lens))
            tokens += int(ids.size)
            docs += int(lens.size)
            bad += nbad
    idx = np.concatenate(offsets)
    with atomic_open(out_bin.with_suffix(".idx"), "wb") as f:
        f.write(idx.astype(np.int64).tobytes())
    return {"docs": docs, "tokens": tokens, "malformed": bad}


def read_index(bin_path: str | os.PathLike) -> np.ndarray:
    return np.fromfile(Path(bin_path).with_suffix(".idx"), dtype=np.int64)


def open_tokens(bin_path: str | os.PathLike) -> np.memmap:
    p = Path(bin_path)
    if not p.is_file():
        raise MicroLMError(f"token file not found: {p} (run `microlm tokens`)")
    if p.stat().st_size == 0:
        return np.zeros(0, dtype=DTYPE)
    return np.memmap(p, dtype=DTYPE, mode="r")


class TokenWindows:
    """Random ``(x, y)`` training windows from a token file: ``y`` is ``x`` shifted by one.

    ``batch(batch_size)`` re-opens the memmap each call (no page cache held between calls) and
    gathers only the sampled windows.  Deterministic for a given ``seed``.
    """

    def __init__(self, bin_path: str | os.PathLike, block_size: int, *, seed: int = 0):
        self.path = Path(bin_path)
        self.block_size = int(block_size)
        n = len(open_tokens(self.path))
        if n < self.block_size + 1:
            raise MicroLMError(f"{self.path.name} has {n} tokens, fewer than block_size + 1 = {self.block_size + 1}")
        self.n_tokens = n
        self.rng = np.random.default_rng(seed)

    def batch(self, batch_size: int) -> tuple[np.ndarray, np.ndarray]:
        data = open_tokens(self.path)
        starts = self.rng.integers(0, self.n_tokens - self.block_size, size=batch_size)
        offs = starts[:, None] + np.arange(self.block_size + 1)[None, :]  # (B, T + 1) token indices
        win = data[offs].astype(np.int64)  # reads only these windows from the file
        del data
        return win[:, :-1], win[:, 1:]  # x, y: (B, T)

    def torch_batch(self, batch_size: int, device: str = "cpu"):
        import torch

        x, y = self.batch(batch_size)
        x, y = torch.from_numpy(x), torch.from_numpy(y)
        if device.startswith("cuda"):  # pinned host memory lets the copy overlap the GPU's work
            return x.pin_memory().to(device, non_blocking=True), y.pin_memory().to(device, non_blocking=True)
        return x.to(device), y.to(device)
