"""The training loop shared by pretraining, SFT and both LoRAs (stage A7's and the IE LoRA of B3).

AdamW (decoupled weight decay; no decay on norms and biases, embeddings as configured), linear warmup
then cosine decay, gradient accumulation, clipping, bf16 autocast (``microlm.hw``), optional
``torch.compile``, DDP under ``torchrun``; periodic evaluation and sample generations; atomic
checkpoints every ``ckpt_interval`` steps; metrics as JSONL.

**Exact resume.** Batches are a pure function of ``(seed, step)`` (the batch source draws them from
``numpy.random.default_rng([seed, step])``), and the checkpoint holds weights, AdamW state and the
torch RNG, so ``resume=True`` continues bit-identically on CPU (tested by killing a run).
"""

from __future__ import annotations

import contextlib
import json
import math
import time
from collections.abc import Callable
from pathlib import Path
from typing import Protocol

import torch
from tqdm.auto import tqdm

from microlm.errors import MicroLMError
from microlm.hw import (
    autocast,
    device_kind,
    machine_busy,
    precision_probe,
    resolve_compile,
    resolve_precision,
)
from microlm.model.checkpoint import load_checkpoint, save_checkpoint
from microlm.train.dist import DistInfo
from microlm.train.settings import TrainConfig, trajectory_config

__all__ = ["Trainer", "BatchSource", "lr_at", "param_groups", "trajectory_config"]


class BatchSource(Protocol):
    def get(self, step: int, micro: int, n_micro: int, rank: int, world: int) -> tuple[torch.Tensor, ...]:
        """The ``micro``-th of ``n_micro`` micro-batches of process ``rank`` at optimizer step ``step``."""


def lr_at(step: int, c: TrainConfig) -> float:
    """Linear warmup over ``warmup_steps``, then cosine decay from ``lr`` to ``min_lr`` at ``max_steps``."""
    if c.warmup_steps and step < c.warmup_steps:
        return c.lr * (step + 1) / c.warmup_steps  # step + 1: the first step already moves the weights
    progress = min(1.0, (step - c.warmup_steps) / max(1, c.max_steps - c.warmup_steps))
    return c.min_lr + 0.5 * (c.lr - c.min_lr) * (1.0 + math.cos(math.pi * progress))


def param_groups(model: torch.nn.Module, weight_decay: float, decay_embeddings: bool = False) -> list[dict]:
    """Two AdamW groups: matrices decay; norms, biases (and embeddings unless configured) do not."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        if p.dim() < 2 or (not decay_embeddings and "embed" in name):
            no_decay.append(p)
        else:
            decay.append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


class Trainer:
    def __init__(self, model: torch.nn.Module, tc: TrainConfig, out_dir: str | Path, *, batches: BatchSource,
                 dist: DistInfo | None = None, seed: int = 0, run_meta: dict | None = None,
                 evaluate: Callable[[torch.nn.Module], dict] | None = None,
                 sample: Callable[[torch.nn.Module], list[str]] | None = None, progress: bool = True,
                 tokens_per_step: int | None = None, flops_per_token: float | None = None,
                 on_step: Callable[[int, dict], None] | None = None, trainable_only: bool = False):
        self.tc = tc
        self.trainable_only = trainable_only  # checkpoints hold the trainable weights only (adapters)
        self.dist = dist or DistInfo()
        self.out = Path(out_dir)
        self.batches = batches
        self.seed = seed
        self.run_meta = run_meta or {}
        self.evaluate = evaluate
        self.sample = sample
        self.progress = progress
        self.on_step = on_step
        world = self.dist.world_size
        micro = tc.micro_batch_size or max(1, tc.batch_size // world)
        if tc.batch_size % (micro * world):
            raise MicroLMError(f"batch_size {tc.batch_size} is not a multiple of micro_batch_size {micro} × "
                               f"{world} process(es)")
        self.micro = micro
        self.n_micro = tc.batch_size // (micro * world)
        self.tokens_per_step = tokens_per_step or tc.batch_size * tc.seq_len
        self.flops_per_token = flops_per_token
        self.device = self.dist.device
        self.model = model.to(self.device)
        self.raw_model = self.model
        self.optimizer = torch.optim.AdamW(param_groups(self.model, tc.weight_decay, tc.decay_embeddings),
                                           lr=tc.lr, betas=(tc.beta1, tc.beta2),
                                           fused=True)  # one kernel for all parameters (CUDA and CPU)
        self.compiled, self.compile_why = resolve_compile(tc.compile, self.device, tc.max_steps * self.tokens_per_step)
        if self.compiled:
            self.model = torch.compile(self.model)
        if self.dist.distributed:
            from torch.nn.parallel import DistributedDataParallel as DDP

            self.model = DDP(self.model, device_ids=[self.dist.local_rank] if self.device.startswith("cuda") else None)
        self.precision = resolve_precision(tc.precision, self.device)
        self.amp = autocast(tc.precision, self.device)

    def speed_setup(self) -> dict:
        """How this run was made fast, for its report: precision (with ``auto``'s probe), compile, threads,
        and whether the machine was busy (then its tokens/s are not speed figures)."""
        out = {"precision": self.precision, "compile": self.compiled, "compile_why": self.compile_why,
               "threads": torch.get_num_threads(), **machine_busy()}
        if self.tc.precision == "auto" and device_kind(self.device) == "cpu":
            out["precision_probe"] = {k: v for k, v in precision_probe().items() if k not in ("key", "cached")}
        return out

    # ------------------------------------------------------------------ bookkeeping
    @property
    def ckpt_dir(self) -> Path:
        return self.out / "ckpt"

    @property
    def metrics_path(self) -> Path:
        return self.out / "metrics.jsonl"

    def _state(self, step: int, extra: dict) -> dict:
        return {"step": step, "seed": self.seed, "train": trajectory_config(self.tc), **self.run_meta, **extra}

    def _log(self, rec: dict) -> None:
        if self.dist.is_main:
            with open(self.metrics_path, "a", encoding="utf-8") as f:
                f.write(json.dumps(rec, ensure_ascii=False) + "\n")

    def _truncate_metrics(self, step: int) -> None:
        """Drop metric lines written after the checkpoint we resume from."""
        if not self.dist.is_main or not self.metrics_path.exists():
            return
        keep = [line for line in self.metrics_path.read_text(encoding="utf-8").splitlines()
                if line.strip() and json.loads(line).get("step", 0) <= step]
        self.metrics_path.write_text("".join(k + "\n" for k in keep), encoding="utf-8")

    def _save(self, step: int, extra: dict) -> None:
        if self.dist.is_main:
            save_checkpoint(self.ckpt_dir, self.raw_model, self.optimizer, self._state(step, extra),
                            trainable_only=self.trainable_only)
        if self.dist.distributed:
            torch.distributed.barrier()

    # ------------------------------------------------------------------ one step
    def train_step(self, step: int) -> dict:
        tc = self.tc
        lr = lr_at(step, tc)
        for g in self.optimizer.param_groups:
            g["lr"] = lr
        self.model.train()
        self.optimizer.zero_grad(set_to_none=True)
        total = torch.zeros((), device=self.device)
        for m in range(self.n_micro):
            batch = [t.to(self.device, non_blocking=True) for t in
                     self.batches.get(step, m, self.n_micro, self.dist.rank, self.dist.world_size)]
            # DDP all-reduces gradients on the last micro-batch only; before it they accumulate locally
            sync = (m == self.n_micro - 1) or not self.dist.distributed
            ctx = contextlib.nullcontext() if sync else self.model.no_sync()
            with ctx, self.amp:
                _, loss = self.model(*batch)
                loss = loss / self.n_micro  # the summed gradients are then those of the whole step's batch
            loss.backward()
            total += loss.detach()
        if self.dist.distributed:  # for the logged loss only: DDP has already averaged the gradients
            torch.distributed.all_reduce(total, op=torch.distributed.ReduceOp.AVG)
        grad_norm = (torch.nn.utils.clip_grad_norm_(self.model.parameters(), tc.grad_clip) if tc.grad_clip > 0
                     else torch.zeros(()))
        loss_value = float(total)
        if not math.isfinite(loss_value):  # checked before optimizer.step: a NaN never reaches the weights
            raise MicroLMError(f"loss became {loss_value} at step {step}; stopped without saving — the last good "
                               f"checkpoint is {self.ckpt_dir} (lower the lr or check the data)")
        self.optimizer.step()
        return {"loss": loss_value, "lr": lr, "grad_norm": float(grad_norm)}

    # ------------------------------------------------------------------ the loop
    def fit(self, *, resume: bool = False, stop_after: int | None = None) -> dict:
        """Train to ``max_steps`` (or ``stop_after`` steps, for tests), evaluating and checkpointing."""
        tc = self.tc
        self.out.mkdir(parents=True, exist_ok=True)
        start = 0
        if resume:
            state = load_checkpoint(self.ckpt_dir, self.raw_model, self.optimizer,
                                    expect={k: v for k, v in self._state(0, {}).items() if k != "step"},
                                    trainable_only=self.trainable_only)
            start = int(state["step"])
            self._truncate_metrics(start)
            if self.dist.is_main:
                print(f"resumed from {self.ckpt_dir} at step {start}")
        elif self.dist.is_main and self.metrics_path.exists():
            self.metrics_path.unlink()
        end = tc.max_steps if stop_after is None else min(tc.max_steps, stop_after)
        bar = None
        if self.progress and self.dist.is_main:
            bar = tqdm(total=tc.max_steps, initial=start, desc="train", unit="step", mininterval=1.0)
        last_eval: dict = {}
        t_last, tok_last = time.perf_counter(), 0
        t0 = time.perf_counter()
        for step in range(start, end):
            rec = self.train_step(step)
            done = step + 1
            tok_last += self.tokens_per_step
            if done % tc.log_interval == 0 or done == end:
                now = time.perf_counter()
                rec.update(step=done, tokens=done * self.tokens_per_step,
                           tokens_per_s=round(tok_last / max(now - t_last, 1e-9), 1),
                           elapsed_s=round(now - t0, 2))
                if self.flops_per_token:
                    rec["flops_per_s"] = rec["tokens_per_s"] * self.flops_per_token
                t_last, tok_last = now, 0
                self._log({"type": "train", **rec})
            if bar is not None:
                bar.update(1)
                bar.set_postfix(loss=f"{rec['loss']:.3f}", lr=f"{rec['lr']:.1e}")
            if self.on_step is not None:
                self.on_step(done, rec)
            is_eval = done % tc.eval_interval == 0 or done == tc.max_steps
            if is_eval and self.dist.is_main and self.evaluate is not None:
                last_eval = {"type": "eval", "step": done, **self.evaluate(self.raw_model)}
                if self.sample is not None:
                    last_eval["samples"] = self.sample(self.raw_model)
                self._log(last_eval)
                if bar is not None:
                    bar.write(f"step {done}: " + ", ".join(f"{k} {v:.4g}" for k, v in last_eval.items()
                                                           if isinstance(v, float)))
            if done % tc.ckpt_interval == 0 or done == tc.max_steps:
                self._save(done, {"last_eval": {k: v for k, v in last_eval.items() if k != "samples"}})
        if bar is not None:
            bar.close()
        return {"steps": end, "last_eval": last_eval}
