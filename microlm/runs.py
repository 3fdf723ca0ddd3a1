"""Run directories and per-stage manifests.

Every stage writes ``runs/<profile>/<stage>/`` and a ``manifest.json`` in it: the stage config, a
fingerprint of its inputs (content hashes of files, or the upstream stage's fingerprint), the code
version of the stage, metrics and timings.  A stage whose fingerprint is unchanged and whose outputs
exist is skipped.
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import json
import os
import platform
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import xxhash

from microlm.io import read_json, write_json

if TYPE_CHECKING:
    from microlm.config import Config

MANIFEST = "manifest.json"


@dataclass
class StageRun:
    """What a stage's ``build`` function gets from the registry (``microlm.stages``): the config, its
    output folder, its upstream stages' folders, the stage's CLI options and (training stages) the
    process group."""

    name: str
    cfg: Config
    out: Path
    up: dict[str, Path]
    progress: bool = True
    options: dict[str, Any] = field(default_factory=dict)
    dist: Any = None  # microlm.train.dist.DistInfo for training stages
    force: bool = False  # --force: every part is built again (a multi-run stage keeps no finished sub-run)


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


def read_manifest(stage_dir: str | os.PathLike) -> dict | None:
    path = Path(stage_dir) / MANIFEST
    if not path.is_file():
        return None
    try:
        return read_json(path)
    except (OSError, json.JSONDecodeError):
        return None


DIGEST_MAX = 8 << 20  # files up to this size are recorded with a content digest, larger ones by size + mtime


def folder_files(stage_dir: str | os.PathLike) -> dict[str, dict]:
    """Every file a stage left in its folder (not the manifest, not dot-files): ``{relative path:
    {"size", "digest"}}`` — or ``{"size", "mtime_ns"}`` for files over ``DIGEST_MAX``."""
    root = Path(stage_dir)
    out = {}
    for p in sorted(root.rglob("*")):
        rel = p.relative_to(root)
        if not p.is_file() or rel.name == MANIFEST or any(part.startswith(".") for part in rel.parts):
            continue
        st = p.stat()
        out[rel.as_posix()] = ({"size": st.st_size, "digest": file_digest(p)} if st.st_size <= DIGEST_MAX
                               else {"size": st.st_size, "mtime_ns": st.st_mtime_ns})
    return out


def files_unchanged(stage_dir: str | os.PathLike, files: dict[str, dict]) -> bool:
    for rel, want in files.items():
        p = Path(stage_dir) / rel
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


def is_fresh(stage_dir: str | os.PathLike, fp: str) -> bool:
    """True when the stage finished with this fingerprint and every file it wrote is still there,
    unchanged (content digest, or size + mtime for big files)."""
    m = read_manifest(stage_dir)
    if not m or m.get("fingerprint") != fp:
        return False
    if not all((Path(stage_dir) / o).exists() for o in m.get("outputs", [])):
        return False
    return files_unchanged(stage_dir, m.get("files", {}))


def write_manifest(stage_dir: str | os.PathLike, *, stage: str, fp: str, config: dict, inputs: list[dict],
                   outputs: list[str], metrics: dict, started: float, upstream: dict | None = None,
                   peak_rss_mb: int | None = None) -> dict:
    from microlm.hw import cpu_name

    m = {
        "stage": stage,
        "fingerprint": fp,
        "config": config,
        "upstream": upstream or {},
        "inputs": inputs,
        "outputs": outputs,
        "files": folder_files(stage_dir),
        "metrics": metrics,
        "timings": {"seconds": round(time.time() - started, 3)},
        "memory": {"peak_rss_mb": peak_rss_mb},  # this process's VmHWM while the stage built (not its servers')
        "created": _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds"),
        "host": {"python": platform.python_version(), "machine": platform.machine(), "cpus": os.cpu_count(),
                 "cpu": cpu_name(), "cores_in_use": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity")
                 else os.cpu_count()},
    }
    write_json(Path(stage_dir) / MANIFEST, m)
    return m


def resolve_ref(ref: str | None, up: dict[str, Path]) -> str | None:
    """A model/adapter reference → a path or hub id: ``hf`` = the hf stage's folder,
    ``ie_lora:<run>`` = that run's adapter, ``ie_merged:<run>`` = that merged folder; else as given."""
    if ref is None:
        return None
    stage, _, sub = ref.partition(":")
    if stage in up:
        base = up[stage]
        if stage == "ie_lora":
            return str(base / sub / "adapter")
        return str(base / sub) if sub else str(base)
    return ref
