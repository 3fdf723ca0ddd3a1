"""Atomic file writes and small helpers shared by every stage."""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import multiprocessing as mp
import os
import re
import shutil
import tempfile
from collections import deque
from collections.abc import Iterator
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import IO, Any

import orjson
import xxhash

from microlm.errors import MicroLMError

_UMASK = os.umask(0o022)
os.umask(_UMASK)
FILE_MODE = 0o666 & ~_UMASK  # what open() would give: 0644 under the usual umask (readable by a serving user)
DIR_MODE = 0o777 & ~_UMASK
COMPLETE = ".complete"  # written into a staged folder once its content is whole


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _staged_siblings(out_dir: Path) -> list[tuple[str, int, Path]]:
    """``(kind, pid, path)`` of the ``.<name>.tmp-<pid>`` / ``.<name>.old-<pid>`` folders beside ``out_dir``."""
    out = []
    if out_dir.parent.is_dir():
        for p in out_dir.parent.glob(f".{out_dir.name}.*-*"):
            kind, _, pid = p.name[len(out_dir.name) + 2:].partition("-")
            if kind in ("tmp", "old") and pid.isdigit():
                out.append((kind, int(pid), p))
    return out


def recover_dir(out_dir: str | os.PathLike) -> bool:
    """Repair what a killed ``staged_dir`` left beside ``out_dir`` (dead writers only): when ``out_dir``
    is gone — a kill between the two renames — the newest complete ``.tmp-<pid>`` (else the ``.old-<pid>``)
    becomes ``out_dir`` again; the other leftovers are deleted.  True when something was restored."""
    out_dir = Path(out_dir)
    dead = [(k, pid, p) for k, pid, p in _staged_siblings(out_dir) if not _pid_alive(pid)]
    restored = False
    if not out_dir.exists():
        done = sorted((p for k, _, p in dead if k == "tmp" and (p / COMPLETE).exists()), key=lambda p: p.stat().st_mtime)
        old = [p for k, _, p in dead if k == "old"]
        pick = done[-1] if done else (old[0] if old else None)
        if pick is not None:
            os.replace(pick, out_dir)
            restored = True
    for _, _, p in dead:
        if p.exists():
            shutil.rmtree(p, ignore_errors=True)
    return restored


@contextlib.contextmanager
def atomic_open(path: str | os.PathLike, mode: str = "w", encoding: str | None = "utf-8") -> Iterator[IO]:
    """Open a temp file next to ``path``; rename it over ``path`` only if the block succeeds."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.fchmod(fd, FILE_MODE)  # mkstemp makes 0600; a replaced file should read like any other
    binary = "b" in mode
    try:
        try:
            with os.fdopen(fd, mode, encoding=None if binary else encoding) as f:
                yield f
                f.flush()
                os.fsync(f.fileno())
        except OSError as e:
            if e.filename is None:  # a write to an open file names none: say which file it was for
                raise OSError(e.errno, e.strerror, str(path)) from e
            raise
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


@contextlib.contextmanager
def reported_write(path: str | os.PathLike, what: str = "writing") -> Iterator[None]:
    """A failed write in the block, raised as the ``OSError`` it is and naming ``path``: safetensors and
    ``torch.save`` hide the errno (a full disk, a file-size limit) and a write to an open file names no
    file, so the CLI could only say "?"; ``what`` goes into the message with the free space left."""
    path = Path(path)
    try:
        yield
    except OSError as e:
        if e.filename is None:
            raise OSError(e.errno, e.strerror, str(path)) from e
        raise
    except Exception as e:  # safetensors' SafetensorError, torch's RuntimeError
        text = str(e)
        m = re.search(r"os error (\d+)", text)
        if m is None and not (type(e).__name__ == "SafetensorError" or re.search(r"\bwrit", text)):
            raise
        code = int(m.group(1)) if m else errno.ENOSPC
        try:
            free = f"{shutil.disk_usage(path.parent).free // 2**20} MiB free on that disk"
        except OSError:
            free = "free space unknown"
        raise OSError(code, f"{os.strerror(code)} while {what} ({free})", str(path)) from None


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


def load_json_file(path: str | os.PathLike, what: str = "JSON file", expect: type = dict) -> Any:
    """A JSON file that someone else (a user, a hub download) wrote: a bad one is a one-line
    ``MicroLMError`` naming the file and where it breaks."""
    try:
        text = Path(path).read_bytes().decode("utf-8")
    except UnicodeDecodeError as e:
        raise MicroLMError(f"{what} {path} is not UTF-8 text (byte {e.start})") from None
    try:
        obj = json.loads(text)
    except json.JSONDecodeError as e:
        raise MicroLMError(f"{what} {path} is not valid JSON (line {e.lineno}, column {e.colno}: {e.msg})") from None
    if not isinstance(obj, expect):
        raise MicroLMError(f"{what} {path} holds a JSON {type(obj).__name__}, expected a JSON "
                           f"{'object' if expect is dict else expect.__name__}")
    return obj


def iter_json_lines(path: str | os.PathLike) -> Iterator[tuple[int, str, Any]]:
    """``(line number, line, parsed)`` of a JSONL file; a cut, binary or malformed line is a one-line
    ``MicroLMError`` naming the file and line (a blank line too: these files are written by code)."""
    n = 0
    try:
        with open(path, encoding="utf-8") as f:
            for n, line in enumerate(f, 1):
                try:
                    yield n, line, orjson.loads(line)
                except orjson.JSONDecodeError as e:
                    raise MicroLMError(f"{path}:{n}: not a JSON line ({str(e).split(':')[0]}); "
                                       f"the file is damaged — run the step that writes it again") from None
    except UnicodeDecodeError as e:
        raise MicroLMError(f"{path}:{n + 1}: not UTF-8 text (byte {e.start} of the line block); the file is "
                           f"damaged — run the step that writes it again") from None


def read_jsonl(path: str | os.PathLike, limit: int | None = None, *, hint: str = "") -> Iterator[dict]:
    """The rows of a JSONL file written by code, as dicts (the first ``limit``): a missing file, a
    damaged line or a row that is not an object is a one-line ``MicroLMError`` naming file and line
    (``hint``: what to run to write the file again)."""
    if not Path(path).is_file():
        raise MicroLMError(f"missing {path}" + (f": {hint}" if hint else ""))
    for k, (n, _, row) in enumerate(iter_json_lines(path), 1):
        if not isinstance(row, dict):
            raise MicroLMError(f"{path}:{n}: expected a JSON object, got a {type(row).__name__}")
        yield row
        if limit and k >= limit:
            return


def share(folder: str | os.PathLike) -> None:
    """Give ``folder`` and everything in it the modes ``open``/``mkdir`` give (0644/0755 under the usual
    umask): some writers (safetensors, ``mkstemp``) make 0600 files another account could not read."""
    folder = Path(folder)
    folder.chmod(DIR_MODE)
    for p in folder.rglob("*"):
        p.chmod(DIR_MODE if p.is_dir() else FILE_MODE)


def replace_dir(tmp_dir: str | os.PathLike, out_dir: str | os.PathLike) -> None:
    """Put the finished ``tmp_dir`` where ``out_dir`` is, replacing any old one (two renames)."""
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
    out_dir = Path(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    recover_dir(out_dir)  # leftovers of a killed earlier writer
    tmp = out_dir.with_name(f".{out_dir.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        yield tmp
        share(tmp)
        (tmp / COMPLETE).touch()  # from here on a kill leaves a folder recover_dir can put back
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    replace_dir(tmp, out_dir)


@contextlib.contextmanager
def staged_writes(tmp: str | os.PathLike, out_dir: str | os.PathLike, what: str = "writing", *,
                  weights: str = "model.safetensors") -> Iterator[None]:
    """Writes into ``staged_dir``'s folder ``tmp`` for ``out_dir``: a failed one is the ``OSError`` it is
    (``reported_write``) naming the file as ``out_dir`` would hold it — the staging folder is gone by
    the time the message is read — and, for a writer that names no file (``save_pretrained`` writes
    through open files), the newest file in ``tmp``: the one being written.  safetensors names no file
    and removes what it wrote: its failure names ``weights``."""
    tmp, out_dir = Path(tmp), Path(out_dir)
    raised: list[BaseException] = []
    try:
        with reported_write(tmp, what):
            try:
                yield
            except Exception as e:
                raised.append(e)
                raise
    except OSError as e:
        name = Path(e.filename) if e.filename else tmp
        if name == tmp and raised and type(raised[0]).__name__ == "SafetensorError":
            name = tmp / weights
        elif name == tmp:
            files = [p for p in tmp.rglob("*") if p.is_file()]
            if files:  # timestamps tick coarsely: of files written in one tick, the last created
                name = max(files, key=lambda p: (p.stat().st_mtime_ns, p.stat().st_ino))
        if name == tmp or tmp in name.parents:
            name = out_dir / name.relative_to(tmp)
        raise OSError(e.errno, e.strerror, str(name)) from e


# --------------------------------------------------------------------------- content digests

DIGEST_MAX = 8 << 20  # files up to this size are recorded with a content digest, larger ones by size + mtime
MANIFEST = "manifest.json"  # a stage folder's description of itself (microlm.stages): never part of its content


def file_digest(path: str | os.PathLike, chunk: int = 1 << 22) -> str:
    """xxh3-128 of a file's content (GB/s: cheap enough to hash the whole corpus every run)."""
    h = xxhash.xxh3_128()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def fingerprint(obj: Any) -> str:
    """A stable hash of any JSON-serialisable object (config sections, input digests, versions)."""
    blob = json.dumps(obj, sort_keys=True, ensure_ascii=False, default=str).encode("utf-8")
    return hashlib.sha256(blob).hexdigest()[:16]


def folder_files(folder: str | os.PathLike) -> dict[str, dict]:
    """Every file in a folder (not a stage manifest, not dot-files): ``{relative path: {"size",
    "digest"}}`` — or ``{"size", "mtime_ns"}`` for files over ``DIGEST_MAX``."""
    root = Path(folder)
    out = {}
    for p in sorted(root.rglob("*")):
        rel = p.relative_to(root)
        if not p.is_file() or rel.name == MANIFEST or any(part.startswith(".") for part in rel.parts):
            continue
        st = p.stat()
        out[rel.as_posix()] = ({"size": st.st_size, "digest": file_digest(p)} if st.st_size <= DIGEST_MAX
                               else {"size": st.st_size, "mtime_ns": st.st_mtime_ns})
    return out


def files_unchanged(folder: str | os.PathLike, files: dict[str, dict]) -> bool:
    """True when every file of a ``folder_files`` listing is still there, unchanged."""
    for rel, want in files.items():
        p = Path(folder) / rel
        try:
            st = p.stat()
        except OSError:
            return False
        if st.st_size != want["size"]:
            return False
        if "digest" in want and file_digest(p) != want["digest"]:
            return False
        if "mtime_ns" in want and st.st_mtime_ns != want["mtime_ns"]:
            return False
    return True
