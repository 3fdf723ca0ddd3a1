"""Stage A6 ``sft``: full-parameter SFT from the pretraining checkpoint (``microlm.train.sft``; torchrun-able)."""

from __future__ import annotations

import glob
from dataclasses import dataclass, field

from microlm.config import require, stage_config
from microlm.data.tasks import TASKS
from microlm.errors import ConfigError
from microlm.stages.pretrain import check_train, fmt_loss
from microlm.stages.registry import Stage, StageRun
from microlm.train.settings import TrainConfig, trajectory_config


@dataclass
class SFTDataConfig:
    """Stage A6 data: MiniMind ``{"conversations"}`` JSONL under the data root (else the embedded set)."""

    files: list[str] = field(default_factory=lambda: ["sft/*.jsonl.gz"])
    heldout: list[str] = field(default_factory=lambda: ["sft/belle_eval_set.jsonl.gz"])  # never trained on
    max_records: int | None = None  # training conversations (None = all)
    val_records: int = 200  # held-out conversations used for the SFT val loss
    show_answers: int = 5  # held-out questions answered before and after SFT in the report
    tasks: list[str] = field(default_factory=lambda: ["places", "persons"])  # derived tasks (microlm/data/tasks.py)
    task_records: int = 1500  # training conversations per derived task
    task_eval: int = 100  # held-out conversations per derived task, scored before and after SFT
    min_task_share: float = 0.85  # at least this share of sampled conversations are task ones (short answers)


def _sft_train() -> TrainConfig:
    return TrainConfig(batch_size=16, seq_len=256, max_steps=300, lr=5e-4, min_lr=5e-5, warmup_steps=20,
                       eval_interval=100, ckpt_interval=100, sample_tokens=0)


@dataclass
class SFTConfig:
    """Stage A6: full-parameter SFT — its data (``sft.data``) and its training loop (``sft.train``)."""

    data: SFTDataConfig = field(default_factory=SFTDataConfig)
    train: TrainConfig = field(default_factory=_sft_train)


def check(cfg) -> None:
    check_train("sft.train", cfg.sft.train, cfg.model)
    sd = cfg.sft.data
    if sd.val_records < 1 or (sd.max_records is not None and sd.max_records < 1):
        raise ConfigError("sft.data.val_records and sft.data.max_records must be >= 1")
    for task in sd.tasks:
        if task not in TASKS:
            raise ConfigError(f"unknown derived task {task!r} (known: {', '.join(TASKS)})")
    require([(0.0 <= sd.min_task_share < 1.0, "sft.data.min_task_share must be in [0, 1)"),
             (sd.task_records >= 0 and sd.task_eval >= 1,
              "sft.data.task_records must be >= 0; sft.data.task_eval >= 1")])


def sft_files(cfg) -> list[str]:
    """The SFT files under the data root (training and held out); none without a data root."""
    from microlm.data.sources import data_root

    root = data_root(cfg.data.root)
    pats = cfg.sft.data.files + cfg.sft.data.heldout
    return sorted({p for pat in pats for p in glob.glob(str(root / pat))}) if root else []


def build(run: StageRun) -> dict | None:
    """SFT; manifest metrics, ``None`` when the run stopped early (``--stop-after``) or on ranks other than 0."""
    from microlm.data.sources import data_root
    from microlm.train.sft import run_sft

    cfg = run.cfg
    r = run_sft(cfg.sft.data, cfg.sft.train, cfg.model, run.up["pretrain"], run.up["tokenizer"], run.out,
                seed=cfg.seed, data_root=data_root(cfg.data.root), resume=run.options["resume"],
                progress=run.progress, stop_after=run.options["stop_after"], dist=run.dist)
    if not r or run.cut_short(cfg.sft.train.max_steps):
        return None
    return {**{k: r[k] for k in ("steps", "base_val_loss", "first_val_loss", "final_val_loss", "final_train_loss")},
            "kept": r["train_data"]["kept"],
            "task_f1": {t: [v["before"]["f1"], v["after"]["f1"]] for t, v in r["tasks"].items()}}


STAGE = Stage(
    "sft", "A6", "full-parameter SFT from the pretraining checkpoint (torchrun-able)",
    build=build, section=SFTConfig, check=check, upstream=("tokenizer", "pretrain"), sections=("sft",),
    key=lambda cfg, o: {"data": stage_config(cfg, "sft")["data"], "seed": cfg.seed,
                        "train": trajectory_config(cfg.sft.train)},
    inputs=lambda cfg, o: sft_files(cfg), outputs=("ckpt/model.safetensors", "metrics.jsonl", "report.json"),
    files={"ckpt": "ckpt", "curves": "curves.png"}, notebook="06_sft", train="sft.train", version=3,
    summary=lambda m: (f"{m['kept']:,} conversations, {m['steps']} steps, held-out loss {fmt_loss(m['base_val_loss'])} "
                       f"-> {fmt_loss(m['final_val_loss'])}; "
                       + ", ".join(f"{t} F1 {b:.2f} -> {a:.2f}" for t, (b, a) in m.get("task_f1", {}).items())))
