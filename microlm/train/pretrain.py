"""Stage A5: pretrain the TransformerLM on the token files (``microlm pretrain``; ``torchrun`` for DDP)."""

from __future__ import annotations

import contextlib
import json
import math
import time
from pathlib import Path

import numpy as np
import torch

from microlm.config import Config, trajectory_config
from microlm.errors import MicroLMError
from microlm.hw import autocast
from microlm.io import write_json
from microlm.model import TransformerLM
from microlm.runs import StageRun
from microlm.tokenizer.memmap import open_tokens
from microlm.train.dist import DistInfo, distributed
from microlm.train.trainer import Trainer

__all__ = ["WindowBatches", "Evaluator", "Sampler", "pretrain", "unigram_entropy", "check_token_range",
           "build"]

EVAL_SEED_OFFSET = 1_000_003


class WindowBatches:
    """Random next-token windows; the global batch of step ``s`` is a pure function of ``(seed, s)``,
    split over processes (``rank::world``) and micro-steps, so 1 process × 2 micro-steps and
    2 processes × 1 see exactly the same rows, and a resumed run sees the batches it would have."""

    def __init__(self, bin_path: str | Path, seq_len: int, batch_size: int, seed: int):
        self.path = Path(bin_path)
        self.seq_len, self.batch_size, self.seed = seq_len, batch_size, seed
        self.n = len(open_tokens(self.path))
        if self.n < seq_len + 2:
            raise MicroLMError(f"{self.path} has {self.n} tokens; need more than seq_len + 1 = {seq_len + 1}")

    def starts(self, step: int) -> np.ndarray:
        return np.random.default_rng([self.seed, step]).integers(0, self.n - self.seq_len - 1, self.batch_size)

    def gather(self, starts: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        data = open_tokens(self.path)  # re-opened per batch: flat memory, as nanoGPT
        win = torch.from_numpy(data[starts[:, None] + np.arange(self.seq_len + 1)].astype(np.int64))
        return win[:, :-1], win[:, 1:]

    def get(self, step: int, micro: int, n_micro: int, rank: int, world: int):
        rows = self.starts(step)[rank::world][micro::n_micro]
        return self.gather(rows)


def unigram_entropy(bin_path: str | Path, vocab_size: int) -> float:
    """Entropy (nats/token) of the token unigram distribution: the loss of a model that ignores context."""
    counts = np.bincount(np.asarray(open_tokens(bin_path)), minlength=vocab_size).astype(np.float64)
    p = counts[counts > 0] / counts.sum()
    return float(-(p * np.log(p)).sum())


def check_token_range(bin_path: str | Path, vocab_size: int) -> int:
    data = open_tokens(bin_path)
    top = int(data.max()) if len(data) else 0
    if top >= vocab_size:
        raise MicroLMError(f"{bin_path} holds token id {top} >= vocab_size {vocab_size} (tokenizer.vocab_size); "
                           "encode the corpus again with this tokenizer (microlm tokens --force)")
    return top


class Evaluator:
    """Loss, perplexity and bits per byte on fixed val windows (the same windows at every eval)."""

    def __init__(self, bin_path: str | Path, seq_len: int, batch_size: int, n_batches: int, seed: int,
                 byte_len: np.ndarray, device: str, amp=None):
        self.src = WindowBatches(bin_path, seq_len, batch_size, seed + EVAL_SEED_OFFSET)
        self.n_batches = n_batches
        self.byte_len = torch.from_numpy(byte_len.astype(np.int64))
        self.device = device
        self.amp = amp

    @torch.no_grad()
    def __call__(self, model: torch.nn.Module) -> dict:
        was = model.training
        model.eval()
        nll, n_tok, n_bytes = 0.0, 0, 0
        for i in range(self.n_batches):
            x, y = self.src.gather(self.src.starts(i))
            with self.amp or contextlib.nullcontext():
                logits, _ = model(x.to(self.device))
            loss = torch.nn.functional.cross_entropy(logits.float().flatten(0, 1), y.to(self.device).flatten(),
                                                     reduction="sum")
            nll += float(loss)
            n_tok += y.numel()
            n_bytes += int(self.byte_len[y].sum())
        model.train(was)
        val = nll / n_tok
        return {"val_loss": val, "val_ppl": math.exp(min(val, 50.0)),
                "val_bpb": nll / math.log(2) / max(n_bytes, 1)}


class Sampler:
    """A few continuations of fixed prompts (seeded sampling, so curves and samples are reproducible)."""

    def __init__(self, tokenizer, prompts: list[str], n_tokens: int, device: str, seed: int = 0):
        self.tok, self.prompts, self.n, self.device, self.seed = tokenizer, prompts, n_tokens, device, seed

    def __call__(self, model: TransformerLM) -> list[str]:
        from microlm.infer.generate import GenerationConfig, generate_ids

        out = []
        for p in self.prompts:
            ids = self.tok.encode_ordinary(p)  # prompts are plain text, as the corpus is
            n = min(self.n, model.cfg.max_seq_len - len(ids))
            # its own seeded generator: sampling never moves the training RNG
            gen = GenerationConfig(max_new_tokens=n, temperature=0.8, top_k=20, top_p=1.0, repetition_penalty=1.0,
                                   seed=self.seed)
            new = generate_ids(model, [ids], gen, stop_ids=[self.tok.eos_id], pad_id=self.tok.eos_id)[0]
            out.append(self.tok.decode(ids + new))
        model.train()
        return out


def byte_lengths(tokenizer) -> np.ndarray:
    """Bytes of text each id stands for (special tokens: 0), for bits-per-byte."""
    lens = np.zeros(tokenizer.vocab_size, dtype=np.int64)
    for i, b in tokenizer.vocab.items():
        lens[i] = 0 if i in tokenizer.special_ids.values() else len(b)
    return lens


def pretrain(cfg: Config, tokens_dir: Path, tok_dir: Path, out_dir: Path, *, resume: bool = False,
             progress: bool = True, stop_after: int | None = None, dist: DistInfo | None = None) -> dict:
    """Train (or resume) the model of ``cfg.model`` with ``cfg.pretrain``; write ``report.json``."""
    from microlm.tokenizer import Tokenizer

    tc, mc = cfg.pretrain, cfg.model
    with distributed(tc.device, dist) as dist:
        tok = Tokenizer.load(tok_dir)
        if tok.vocab_size != mc.vocab_size:
            raise MicroLMError(f"the tokenizer in {tok_dir} has {tok.vocab_size} ids but tokenizer.vocab_size is "
                               f"{mc.vocab_size}: train the tokenizer again (microlm tokenizer --force)")
        train_bin, val_bin = tokens_dir / "train.bin", tokens_dir / "val.bin"
        for p in (train_bin, val_bin):
            check_token_range(p, mc.vocab_size)
        torch.manual_seed(cfg.seed)
        model = TransformerLM(mc)
        n_params = model.num_parameters()
        batches = WindowBatches(train_bin, tc.seq_len, tc.batch_size, cfg.seed)
        micro = tc.micro_batch_size or max(1, tc.batch_size // dist.world_size)
        amp = autocast(tc.precision, dist.device)
        evaluator = Evaluator(val_bin, tc.seq_len, micro, tc.eval_batches, cfg.seed, byte_lengths(tok),
                              dist.device, amp)
        sampler = Sampler(tok, tc.sample_prompts, tc.sample_tokens, dist.device, cfg.seed) if tc.sample_tokens else None
        trainer = Trainer(model, tc, out_dir, batches=batches, dist=dist, seed=cfg.seed,
                          run_meta={"model": mc.to_dict()}, evaluate=evaluator, sample=sampler, progress=progress,
                          flops_per_token=model.flops_per_token(tc.seq_len))
        t0 = time.time()
        result = trainer.fit(resume=resume, stop_after=stop_after)
        seconds = time.time() - t0
        report = {}
        if dist.is_main:
            report = summarize(out_dir, cfg, n_params, train_bin, seconds, result, dist.world_size)
        return report


def build(run: StageRun) -> dict | None:
    """The ``pretrain`` stage (registry entry in ``microlm.stages``): manifest metrics, ``None`` when
    the run stopped early (``--stop-after``) or on ranks other than 0."""
    r = pretrain(run.cfg, run.up["tokens"], run.up["tokenizer"], run.out, resume=run.options["resume"],
                 progress=run.progress, stop_after=run.options["stop_after"], dist=run.dist)
    if not r or run.options["stop_after"] is not None:
        return None
    return {k: r[k] for k in ("params", "steps", "tokens_seen", "tokens_per_s", "final_train_loss", "final_val_loss",
                              "final_val_bpb", "unigram_entropy")}


def read_metrics(out_dir: Path) -> tuple[list[dict], list[dict]]:
    train, evals = [], []
    path = Path(out_dir) / "metrics.jsonl"
    if path.exists():
        for line in path.read_text(encoding="utf-8").splitlines():
            if line.strip():
                rec = json.loads(line)
                (evals if rec.get("type") == "eval" else train).append(rec)
    return train, evals


def loss_fields(train: list[dict], evals: list[dict], base_eval: dict | None) -> dict:
    """Held-out loss before training, at the first and last eval, and the last train loss."""
    return {"base_val_loss": base_eval["val_loss"] if base_eval else None,
            "first_val_loss": evals[0]["val_loss"] if evals else None,
            "final_val_loss": evals[-1]["val_loss"] if evals else None,
            "final_train_loss": train[-1]["loss"] if train else None}


def summarize(out_dir: Path, cfg: Config, n_params: int, train_bin: Path, seconds: float, result: dict,
              world: int) -> dict:
    train, evals = read_metrics(out_dir)
    h1 = unigram_entropy(train_bin, cfg.model.vocab_size)
    tps = [r["tokens_per_s"] for r in train[1:]] or [r["tokens_per_s"] for r in train]
    last = evals[-1] if evals else {}
    report = {
        "params": n_params,
        "model": cfg.model.to_dict(),
        "steps": result["steps"],
        "tokens_seen": result["steps"] * cfg.pretrain.batch_size * cfg.pretrain.seq_len,
        "seconds_this_run": round(seconds, 1),
        "tokens_per_s": round(float(np.median(tps)), 1) if tps else None,
        "processes": world,
        "precision": trajectory_config(cfg.pretrain)["precision"],
        "final_train_loss": train[-1]["loss"] if train else None,
        "final_val_loss": last.get("val_loss"),
        "final_val_bpb": last.get("val_bpb"),
        "unigram_entropy": h1,
        "samples": last.get("samples", []),
        "seed": cfg.seed,
    }
    write_json(Path(out_dir) / "report.json", report)
    plot_curves(out_dir, train, evals, h1)
    return report


def plot_curves(out_dir: Path, train: list[dict], evals: list[dict], h1: float | None = None) -> Path | None:
    """``curves.png``: train and val loss against tokens seen (needs matplotlib)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    from microlm.plotting import use_cjk_font

    use_cjk_font()
    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.plot([r["step"] for r in train], [r["loss"] for r in train], label="train loss")
    if evals:
        ax.plot([r["step"] for r in evals], [r["val_loss"] for r in evals], "o-", label="val loss")
    if h1:
        ax.axhline(h1, color="gray", ls="--", label="unigram entropy")
    ax.set_xlabel("step")
    ax.set_ylabel("loss (nats/token)")
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    path = Path(out_dir) / "curves.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
