"""The training loop's settings (``TrainConfig``), shared by every training stage; no torch import."""

from __future__ import annotations

from dataclasses import dataclass, field

from microlm.hw import resolve_precision


@dataclass
class TrainConfig:
    """The training loop shared by pretraining, SFT and LoRA (stage A5 uses section ``pretrain``)."""

    batch_size: int = 32  # sequences per optimizer step, over all processes and micro-steps
    micro_batch_size: int | None = None  # per process per micro-step; None = batch_size / processes
    seq_len: int = 256
    max_steps: int = 1000
    lr: float = 1e-3
    min_lr: float = 1e-4
    warmup_steps: int = 50
    weight_decay: float = 0.1
    decay_embeddings: bool = False  # norms and biases never decay; embeddings only if this is true
    beta1: float = 0.9
    beta2: float = 0.95
    grad_clip: float = 1.0  # 0 = off
    precision: str = "fp32"  # fp32 | bf16 (autocast, CUDA or CPU) | auto (bf16 where native: microlm.hw)
    compile: bool | str = False  # torch.compile the model: true | false | auto (long runs, where it can: microlm.hw)
    device: str = "auto"  # auto | cpu | cuda
    eval_interval: int = 100
    eval_batches: int = 10
    ckpt_interval: int = 100
    log_interval: int = 10
    sample_tokens: int = 48  # tokens generated from each prompt at eval points (0 = none)
    sample_prompts: list[str] = field(default_factory=lambda: ["中国的首都是", "今天天气"])

    def problems(self) -> list[str]:
        """What is wrong with these settings (empty: nothing)."""
        checks = [
            (self.batch_size >= 1, "batch_size must be >= 1"),
            (self.micro_batch_size is None or 1 <= self.micro_batch_size <= self.batch_size,
             "micro_batch_size must be in [1, batch_size]"),
            (self.seq_len >= 2, "seq_len must be >= 2"),
            (self.max_steps >= 1, "max_steps must be >= 1"),
            (self.lr > 0 and 0 <= self.min_lr <= self.lr, "need lr > 0 and 0 <= min_lr <= lr"),
            (0 <= self.warmup_steps <= self.max_steps, "warmup_steps must be in [0, max_steps]"),
            (self.weight_decay >= 0, "weight_decay must be >= 0"),
            (0 <= self.beta1 < 1 and 0 <= self.beta2 < 1, "beta1 and beta2 must be in [0, 1)"),
            (self.grad_clip >= 0, "grad_clip must be >= 0"),
            (self.precision in ("auto", "fp32", "bf16"), "precision must be auto, fp32 or bf16"),
            (self.compile in (True, False, "auto"), "compile must be true, false or auto"),
            (self.device in ("auto", "cpu", "cuda") or self.device.startswith("cuda:"), "device must be auto, cpu or cuda"),
            (min(self.eval_interval, self.eval_batches, self.ckpt_interval, self.log_interval) >= 1,
             "eval_interval, eval_batches, ckpt_interval and log_interval must be >= 1"),
            (self.sample_tokens >= 0, "sample_tokens must be >= 0"),
        ]
        return [msg for ok, msg in checks if not ok]


def trajectory_config(c: TrainConfig) -> dict:
    """The training settings that change the loss curve (what a stage's fingerprint and a resumed run
    must match; logging, eval and checkpoint intervals do not count)."""
    keys = ("batch_size", "seq_len", "max_steps", "lr", "min_lr", "warmup_steps", "weight_decay",
            "decay_embeddings", "beta1", "beta2", "grad_clip")
    # the precision this machine runs (``auto`` resolved): bf16 and fp32 curves drift apart
    return {**{k: getattr(c, k) for k in keys}, "precision": resolve_precision(c.precision, c.device)}
