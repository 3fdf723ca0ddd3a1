"""Stage A7 ``lora``: LoRA adapters on the SFT model, for a derived task SFT never saw (``microlm.train.lora``)."""

from __future__ import annotations

from dataclasses import dataclass, field

from microlm.config import stage_config
from microlm.data.tasks import TASKS
from microlm.errors import ConfigError
from microlm.model.config import LoRAConfig
from microlm.stages.pretrain import check_train
from microlm.stages.registry import Stage, StageRun
from microlm.train.settings import TrainConfig, trajectory_config


def _lora_train() -> TrainConfig:
    return TrainConfig(batch_size=16, seq_len=256, max_steps=200, lr=2e-3, min_lr=2e-4, warmup_steps=10,
                       weight_decay=0.0, eval_interval=50, ckpt_interval=50, sample_tokens=0)


@dataclass
class LoRASection(LoRAConfig):
    """Stage A7: the adapters (r, alpha, dropout, targets), the task they learn — a derived task
    (``microlm/data/tasks.py``) that SFT never saw (not in ``sft.data.tasks``) — and the training loop
    (``lora.train``)."""

    task: str = "orgs"
    train_records: int = 2000
    eval_records: int = 100
    train: TrainConfig = field(default_factory=_lora_train)


def check(cfg) -> None:
    check_train("lora.train", cfg.lora.train, cfg.model)
    lc = cfg.lora
    if lc.r < 1 or lc.alpha <= 0 or not 0 <= lc.dropout < 1 or not lc.targets:
        raise ConfigError("lora: need r >= 1, alpha > 0, 0 <= dropout < 1 and at least one target")
    if lc.task not in TASKS:
        raise ConfigError(f"unknown derived task {lc.task!r} (known: {', '.join(TASKS)})")
    if lc.task in cfg.sft.data.tasks:
        raise ConfigError(f"lora.task {lc.task!r} is also in sft.data.tasks: the adapter must learn a task "
                          f"the SFT model has not seen")
    if lc.train_records < 1 or lc.eval_records < 1:
        raise ConfigError("lora.train_records and lora.eval_records must be >= 1")


def build(run: StageRun) -> dict | None:
    """Train the adapters; manifest metrics, ``None`` when stopped before ``max_steps`` (``--stop-after``) or on ranks > 0."""
    from microlm.train.lora import run_lora

    cfg = run.cfg
    r = run_lora(cfg.lora, cfg.model, run.up["sft"], run.up["tokenizer"], run.out, seed=cfg.seed,
                 resume=run.options["resume"], progress=run.progress, stop_after=run.options["stop_after"],
                 dist=run.dist)
    if not r or run.cut_short(cfg.lora.train.max_steps):
        return None
    return {"adapter_params": r["params"]["adapter_params"], "percent_of_base": r["params"]["percent_of_base"],
            "task": r["task"], "f1_before": r["before"]["f1"], "f1_after": r["after"]["f1"],
            "exact_match_before": r["before"]["exact_match"], "exact_match_after": r["after"]["exact_match"]}


STAGE = Stage(
    "lora", "A7", "train LoRA adapters on the SFT model (a derived task SFT never saw: lora.task)",
    build=build, section=LoRASection, check=check, upstream=("tokenizer", "sft"), sections=("lora",),
    key=lambda cfg, o: {"lora": {k: v for k, v in stage_config(cfg, "lora").items() if k != "train"},
                        "seed": cfg.seed, "train": trajectory_config(cfg.lora.train)},
    outputs=("adapter/adapter_model.safetensors", "metrics.jsonl", "report.json"),
    files={"adapter": "adapter", "ckpt": "ckpt", "curves": "curves.png"}, notebook="07_lora_math",
    train="lora.train", version=3,
    summary=lambda m: (f"{m['adapter_params']:,} trainable ({m['percent_of_base']} % of the base); held-out "
                       f"{m['task']}: F1 {m['f1_before']:.3f} -> {m['f1_after']:.3f}, exact match "
                       f"{m['exact_match_before']:.3f} -> {m['exact_match_after']:.3f}"))
