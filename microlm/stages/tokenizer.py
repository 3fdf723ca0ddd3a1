"""Stage A3 ``tokenizer``: train the byte-level BPE tokenizer on the corpus train split (``microlm.tokenizer``)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import regex

from microlm.config import require, stage_config
from microlm.errors import ConfigError
from microlm.io import file_digest
from microlm.stages.registry import Stage, StageRun
from microlm.tokenizer.bpe import resolve_pattern


@dataclass
class TokenizerConfig:
    """Stage A3: byte-level BPE trained on the corpus stage's train split."""

    vocab_size: int = 6400  # counts the special tokens and the 256 bytes
    special_tokens: list[str] = field(default_factory=lambda: ["<|endoftext|>", "<|im_start|>", "<|im_end|>"])
    pattern: str = "qwen2"  # a name in microlm.tokenizer.PATTERNS (gpt2 | qwen2) or a regex
    workers: int = 2  # pre-tokenisation processes
    compare_hf: bool = True  # also train HF tokenizers' BpeTrainer (MiniMind's recipe) for the report


def check(cfg) -> None:
    t = cfg.tokenizer
    require([
        (t.vocab_size >= len(set(t.special_tokens)) + 256,
         "tokenizer.vocab_size must be >= 256 + the number of special tokens"),
        (t.vocab_size <= 65536, "tokenizer.vocab_size must be <= 65536 (token files are uint16)"),
        ("<|endoftext|>" in t.special_tokens, "tokenizer.special_tokens must include <|endoftext|> (EOS)"),
        (all(t.special_tokens) and len(set(t.special_tokens)) == len(t.special_tokens),
         "tokenizer.special_tokens must be distinct non-empty strings"),
        (t.workers >= 1, "tokenizer.workers must be >= 1"),
    ])
    try:
        regex.compile(resolve_pattern(t.pattern))
    except regex.error as e:
        raise ConfigError(f"tokenizer.pattern is not a valid regex ({e})") from None


def qwen_tokenizer(cfg) -> Path | None:
    """Qwen2.5's ``tokenizer.json`` in the data bundle, when there is one (compression baseline, IE token counts)."""
    from microlm.data.sources import data_root
    from microlm.tokenizer.training import qwen_tokenizer_path

    return qwen_tokenizer_path(data_root(cfg.data.root))


def build(run: StageRun) -> dict:
    """Train and save the tokenizer (ours + Hugging Face files) and its compression report."""
    from microlm.tokenizer.training import train_tokenizer

    report = train_tokenizer(run.cfg.tokenizer, run.up["corpus"], run.out, qwen_tokenizer=qwen_tokenizer(run.cfg),
                             progress=run.progress)
    return {"vocab_size": report["vocab_size"], "train_s": report["train_s"], "peak_rss_mb": report["peak_rss_mb"],
            "compression": {k: v["chars_per_token"] for k, v in report["compression"].items()}}


def _qwen_digest(cfg) -> list:
    q = qwen_tokenizer(cfg)
    return [file_digest(q)] if q else []


STAGE = Stage(
    "tokenizer", "A3", "train the byte-level BPE tokenizer on the corpus train split",
    build=build, section=TokenizerConfig, check=check, upstream=("corpus",), sections=("tokenizer",),
    key=lambda cfg, o: {"tokenizer": stage_config(cfg, "tokenizer"), "qwen": _qwen_digest(cfg)},
    outputs=("vocab.json", "merges.txt", "tokenizer.json", "tokenizer_config.json", "report.json"),
    notebook="02_bpe_from_scratch", aliases=("train-tokenizer",), version=2,
    summary=lambda m: (f"vocab {m['vocab_size']}, trained in {m['train_s']} s; val chars/token: "
                       + "  ".join(f"{k} {v:.3f}" for k, v in m["compression"].items())))
