"""Stage A4 ``tokens``: encode the corpus splits into uint16 token files + a document index."""

from __future__ import annotations

from dataclasses import dataclass

from microlm.config import require
from microlm.stages.registry import Stage, StageRun


@dataclass
class TokensConfig:
    """Stage A4: corpus JSONL → uint16 token files + document index."""

    workers: int = 2
    batch_docs: int = 256


def check(cfg) -> None:
    require([(cfg.tokens.workers >= 1, "tokens.workers must be >= 1"),
             (cfg.tokens.batch_docs >= 1, "tokens.batch_docs must be >= 1")])


def build(run: StageRun) -> dict:
    """``{train,val}.bin`` + ``.idx`` and ``meta.json``."""
    from microlm.tokenizer.training import tokenize_corpus

    tc = run.cfg.tokens
    meta = tokenize_corpus(run.up["corpus"], run.up["tokenizer"], run.out, workers=tc.workers,
                           batch_docs=tc.batch_docs, progress=run.progress)
    return {**{k: meta[k] for k in ("tokens_total", "tokens_per_s", "vocab_size")},
            "docs": {k: v["docs"] for k, v in meta["splits"].items()}}


STAGE = Stage(
    "tokens", "A4", "encode the corpus splits into uint16 token files + index",
    build=build, section=TokensConfig, check=check, upstream=("corpus", "tokenizer"), sections=("tokens",),
    key=lambda cfg, o: {},  # workers and batch size do not change the bytes written (tested)
    outputs=("train.bin", "train.idx", "val.bin", "val.idx", "meta.json"),
    files={"train": "train.bin", "val": "val.bin", "train_index": "train.idx", "val_index": "val.idx"},
    notebook="03_tokens",
    aliases=("tokenize",),
    summary=lambda m: (f"{m['tokens_total']:,} tokens, docs {m['docs']}; {m['tokens_per_s']:,} tokens/s"))
