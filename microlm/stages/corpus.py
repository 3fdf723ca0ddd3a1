"""Stage A1–A2 ``corpus``: clean · dedup · split · EOS the pretraining corpus (``microlm.data``)."""

from __future__ import annotations

from dataclasses import dataclass, field

from microlm.config import require, stage_config
from microlm.stages.registry import Option, Stage, StageRun


@dataclass
class DedupConfig:
    exact: bool = True
    near: bool = True
    threshold: float = 0.8  # estimated Jaccard of character shingles at which a doc is a near-duplicate
    num_perm: int = 128
    shingle_size: int = 5
    bands: int | None = None  # None: chosen to minimise false positives + negatives at `threshold`
    verify: bool = True  # check LSH candidates against the stored signatures


@dataclass
class CorpusConfig:
    """Stage A1–A2: clean · dedup · split · EOS."""

    min_chars: int = 20
    max_chars: int = 20000
    max_line_bytes: int = 4 * 1024 * 1024
    min_cjk_ratio: float = 0.3
    max_dup_line_ratio: float = 0.3
    max_dup_ngram_ratio: float = 0.5
    strip_markup: bool = True
    val_fraction: float = 0.01
    eos: str = "<|endoftext|>"
    workers: int = 2
    batch_size: int = 1000
    exclude_heldout_tasks: bool = True  # leave out the paragraphs whose sentences evaluate SFT/LoRA tasks
    dedup: DedupConfig = field(default_factory=DedupConfig)


def check(cfg) -> None:
    c = cfg.corpus
    require([
        (0 <= c.min_chars <= c.max_chars, "corpus.min_chars must be <= corpus.max_chars"),
        (0.0 <= c.min_cjk_ratio <= 1.0, "corpus.min_cjk_ratio must be in [0, 1]"),
        (0.0 < c.max_dup_line_ratio <= 1.0, "corpus.max_dup_line_ratio must be in (0, 1]"),
        (0.0 < c.max_dup_ngram_ratio <= 1.0, "corpus.max_dup_ngram_ratio must be in (0, 1]"),
        (0.0 <= c.val_fraction < 1.0, "corpus.val_fraction must be in [0, 1)"),
        (c.workers >= 0, "corpus.workers must be >= 0 (0 = in-process)"),
        (c.batch_size >= 1, "corpus.batch_size must be >= 1"),
        (c.max_line_bytes >= 1024, "corpus.max_line_bytes must be >= 1024"),
        (0.0 < c.dedup.threshold < 1.0, "corpus.dedup.threshold must be in (0, 1)"),
        (c.dedup.num_perm in (32, 64, 128, 256, 512, 1024), "corpus.dedup.num_perm must be a power of two in [32, 1024]"),
        (c.dedup.shingle_size >= 1, "corpus.dedup.shingle_size must be >= 1"),
        (c.dedup.bands is None or (c.dedup.bands >= 1 and c.dedup.num_perm % c.dedup.bands == 0),
         "corpus.dedup.bands must divide corpus.dedup.num_perm"),
    ])


def corpus_sources(cfg, inputs: list[str] | None = None) -> list:
    """Explicit ``inputs``, else ``data.pretrain`` under the data root, else the embedded corpus."""
    from microlm.data.sources import data_root, resolve_sources

    root = None if inputs else data_root(cfg.data.root)
    return resolve_sources(cfg.data.pretrain, root, inputs)


def _inputs(cfg, options: dict) -> list:
    return [s.path for s in corpus_sources(cfg, options.get("input"))]


def build(run: StageRun) -> dict:
    """Clean, dedup and split the sources into ``train.jsonl``/``val.jsonl`` + ``report.json``."""
    from microlm.data.prepare_pretrain import prepare_pretrain

    cfg = run.cfg
    report = prepare_pretrain(cfg.corpus, run.out, corpus_sources(cfg, run.options.get("input")),
                              seed=cfg.seed, max_records=cfg.data.max_records, profile=cfg.profile,
                              progress=run.progress)
    metrics = {k: report[k] for k in ("records_in", "records_out", "train_docs", "val_docs", "drops")}
    metrics["records_per_s"] = report["throughput"]["records_per_s"]
    return metrics


STAGE = Stage(
    "corpus", "A1–A2", "clean · dedup · split · EOS the pretraining corpus",
    build=build, section=CorpusConfig, check=check, outputs=("train.jsonl", "val.jsonl", "report.json"),
    sections=("corpus",), key=lambda cfg, o: {"corpus": stage_config(cfg, "corpus"),
                                              "max_records": cfg.data.max_records, "seed": cfg.seed},
    inputs=_inputs, notebook="01_corpus", aliases=("prepare-pretrain",), version=2,
    options=(Option("input", "read these files instead of data.pretrain under MICROLM_DATA", many=True),),
    summary=lambda m: (f"records in {m['records_in']:,} → out {m['records_out']:,} (train {m['train_docs']:,}, "
                       f"val {m['val_docs']:,}); drops {m['drops']}; {m['records_per_s']:,} records/s"))
