"""The stage graph: each stage knows its inputs, fingerprints them, and is skipped when unchanged.

Notebooks and the CLI call the same functions: ``corpus(cfg)`` returns the stage folder, building
it (and, in later stages, whatever it depends on) at the chosen profile when it is missing or stale.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

from microlm.config import Config, stage_config
from microlm.runs import file_digest, fingerprint, is_fresh, read_manifest, write_manifest

__all__ = ["corpus", "require", "manifest", "read_manifest", "STAGES"]

log = logging.getLogger("microlm")

# bump when a stage's code changes what it writes, so old artifacts are rebuilt
STAGE_VERSIONS = {"corpus": 1}


def corpus(cfg: Config, *, force: bool = False, inputs: list[str] | None = None, progress: bool = True,
           out_dir: str | Path | None = None) -> Path:
    """Stage A1–A2: ``runs/<profile>/corpus/{train,val}.jsonl`` + ``report.json``."""
    from microlm.data.prepare_pretrain import corpus_sources, prepare_pretrain

    stage_dir = Path(out_dir) if out_dir else cfg.run_path / "corpus"
    sources = corpus_sources(cfg, inputs)
    src_info = [{"path": s.path, "format": s.format, "digest": file_digest(s.path)} for s in sources]
    conf = {"corpus": stage_config(cfg, "corpus"), "max_records": cfg.data.max_records, "seed": cfg.seed}
    fp = fingerprint({"v": STAGE_VERSIONS["corpus"], "config": conf,
                      "inputs": [(i["format"], i["digest"]) for i in src_info]})
    if not force and is_fresh(stage_dir, fp):
        log.info("corpus: up to date (%s), skipped", stage_dir)
        return stage_dir
    started = time.time()
    report = prepare_pretrain(cfg, stage_dir, sources=sources, progress=progress)
    metrics = {k: report[k] for k in ("records_in", "records_out", "train_docs", "val_docs", "drops")}
    metrics["records_per_s"] = report["throughput"]["records_per_s"]
    write_manifest(stage_dir, stage="corpus", fp=fp, config=conf, inputs=src_info,
                   outputs=["train.jsonl", "val.jsonl", "report.json"], metrics=metrics, started=started)
    return stage_dir


STAGES = {"corpus": corpus}


def require(stage: str, cfg: Config, **kw) -> Path:
    """The folder of ``stage`` at this profile, built if missing or stale (for notebooks)."""
    return STAGES[stage](cfg, **kw)


def manifest(stage: str, cfg: Config) -> dict | None:
    return read_manifest(cfg.run_path / stage)
