"""Atomic file writes and small helpers shared by every stage."""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any

import orjson


@contextlib.contextmanager
def atomic_open(path: str | os.PathLike, mode: str = "w", encoding: str | None = "utf-8") -> Iterator[IO]:
    """Open a temp file next to ``path``; rename it over ``path`` only if the block succeeds."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    binary = "b" in mode
    try:
        with os.fdopen(fd, mode, encoding=None if binary else encoding) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def batched(items, size: int) -> Iterator[list]:
    """Lists of ``size`` consecutive items (the last one shorter), lazily."""
    buf: list = []
    for x in items:
        buf.append(x)
        if len(buf) >= size:
            yield buf
            buf = []
    if buf:
        yield buf


def ordered_map(fn, chunks, workers: int) -> Iterator:
    """``fn(chunk)`` for each chunk, in order: in ``workers`` forked processes when > 1 (they see
    the parent's module globals as they were when the pool started), with at most ``2 × workers``
    chunks in flight, so memory stays flat and ``chunks`` is consumed lazily."""
    import multiprocessing as mp
    from collections import deque
    from concurrent.futures import ProcessPoolExecutor

    if workers <= 1 or "fork" not in mp.get_all_start_methods():
        yield from map(fn, chunks)
        return
    with ProcessPoolExecutor(workers, mp_context=mp.get_context("fork")) as ex:
        pending: deque = deque()
        for c in chunks:
            pending.append(ex.submit(fn, c))
            if len(pending) > 2 * workers:
                yield pending.popleft().result()
        while pending:
            yield pending.popleft().result()


def json_line(obj: Any) -> str:
    """One JSONL row (UTF-8 characters kept, newline added) — orjson: ~5× the stdlib's speed on the
    IE pipeline's million-row files."""
    return orjson.dumps(obj).decode("utf-8") + "\n"


def parse_json_line(line: str | bytes) -> Any:
    """A JSONL row back (orjson; raises ``ValueError`` on malformed input like ``json.loads``)."""
    return orjson.loads(line)


def write_json(path: str | os.PathLike, obj: Any) -> None:
    """Write ``obj`` as pretty UTF-8 JSON, atomically."""
    with atomic_open(path, "w") as f:
        json.dump(obj, f, ensure_ascii=False, indent=2, sort_keys=False)
        f.write("\n")


def read_json(path: str | os.PathLike) -> Any:
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def replace_dir(tmp_dir: str | os.PathLike, out_dir: str | os.PathLike) -> None:
    """Put the finished ``tmp_dir`` where ``out_dir`` is, replacing any old one (two renames)."""
    import shutil

    tmp_dir, out_dir = Path(tmp_dir), Path(out_dir)
    if out_dir.exists():
        old = out_dir.with_name(f".{out_dir.name}.old-{os.getpid()}")
        os.replace(out_dir, old)
        os.replace(tmp_dir, out_dir)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp_dir, out_dir)


@contextlib.contextmanager
def staged_dir(out_dir: str | os.PathLike) -> Iterator[Path]:
    """A fresh folder beside ``out_dir`` to write a stage into; it replaces ``out_dir`` when the
    block succeeds and is deleted when it fails, so a stage folder is never half-written."""
    import shutil

    out_dir = Path(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_dir.with_name(f".{out_dir.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    replace_dir(tmp, out_dir)
