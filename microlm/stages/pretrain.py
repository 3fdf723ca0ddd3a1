"""Stage A5 ``pretrain``: pretrain the TransformerLM on the token files (``microlm.train``; torchrun for DDP).

Brings two sections: ``model`` (the shape every later MicroLM stage loads) and ``pretrain`` (its loop).
"""

from __future__ import annotations

from microlm.config import stage_config
from microlm.errors import ConfigError, MicroLMError
from microlm.model.config import ModelConfig
from microlm.stages.registry import Stage, StageRun
from microlm.train.settings import TrainConfig, trajectory_config


def check_train(name: str, tc: TrainConfig, model: ModelConfig) -> None:
    """A training loop's settings, and its sequences fit the model."""
    problems = tc.problems()
    if problems:
        raise ConfigError(f"{name}: {problems[0]}")
    if tc.seq_len > model.max_seq_len:
        raise ConfigError(f"{name}.seq_len ({tc.seq_len}) exceeds model.max_seq_len ({model.max_seq_len})")


def check(cfg) -> None:
    check_train("pretrain", cfg.pretrain, cfg.model)
    try:
        cfg.model.validate()
    except MicroLMError as e:
        raise ConfigError(f"model: {e}") from None


def build(run: StageRun) -> dict | None:
    """Train (or resume) the model; manifest metrics, ``None`` when the run stopped before
    ``max_steps`` (``--stop-after``) or on ranks other than 0."""
    from microlm.train.pretrain import pretrain

    cfg = run.cfg
    r = pretrain(cfg.model, cfg.pretrain, run.up["tokens"], run.up["tokenizer"], run.out, seed=cfg.seed,
                 resume=run.options["resume"], progress=run.progress, stop_after=run.options["stop_after"],
                 dist=run.dist)
    if not r or run.cut_short(cfg.pretrain.max_steps):
        return None
    return {k: r[k] for k in ("params", "steps", "tokens_seen", "tokens_per_s", "final_train_loss", "final_val_loss",
                              "final_val_bpb", "unigram_entropy", "speed")}


def fmt_loss(x) -> str:
    return "n/a" if x is None else f"{x:.3f}"


STAGE = Stage(
    "pretrain", "A5", "pretrain the TransformerLM (runs under torchrun for DDP)",
    build=build, section=TrainConfig, more_sections={"model": ModelConfig}, check=check,
    upstream=("tokenizer", "tokens"), sections=("model", "pretrain"),
    key=lambda cfg, o: {"model": stage_config(cfg, "model"), "seed": cfg.seed, "train": trajectory_config(cfg.pretrain)},
    outputs=("ckpt/model.safetensors", "metrics.jsonl", "report.json"), files={"ckpt": "ckpt", "curves": "curves.png"},
    notebook="05_pretrain", train="pretrain",
    summary=lambda m: (f"{m['params']:,} params, {m['steps']} steps, val loss {fmt_loss(m['final_val_loss'])}, "
                       f"bpb {fmt_loss(m['final_val_bpb'])}, unigram entropy {fmt_loss(m['unigram_entropy'])}, "
                       f"{m['tokens_per_s']} tokens/s"))
