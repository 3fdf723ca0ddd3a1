"""Pretraining the TransformerLM on the token files (``pretrain``: what the ``pretrain`` stage, A5, runs;
``torchrun`` for DDP): window batches, evaluation with bits per byte, samples, the report."""

from __future__ import annotations

import contextlib
import math
import time
from pathlib import Path

import numpy as np
import torch

from microlm.errors import MicroLMError
from microlm.hw import autocast
from microlm.infer.generate import GenerationConfig, generate_ids
from microlm.io import write_json
from microlm.model import TransformerLM
from microlm.tokenizer import Tokenizer
from microlm.tokenizer.memmap import open_tokens
from microlm.train.curves import plot_curves, read_metrics
from microlm.train.dist import DistInfo, distributed
from microlm.train.settings import trajectory_config
from microlm.train.trainer import Trainer

__all__ = ["WindowBatches", "Evaluator", "Sampler", "pretrain", "unigram_entropy", "check_token_range"]

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
        # (batch_size,) window starts; each window needs seq_len + 1 tokens (inputs and the next one)
        return np.random.default_rng([self.seed, step]).integers(0, self.n - self.seq_len - 1, self.batch_size)

    def gather(self, starts: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        data = open_tokens(self.path)  # re-opened per batch: flat memory, as nanoGPT
        # (B, 1) + (T + 1,) -> (B, T + 1) indices: every window read in one gather
        win = torch.from_numpy(data[starts[:, None] + np.arange(self.seq_len + 1)].astype(np.int64))
        return win[:, :-1], win[:, 1:]  # x, y: (B, T); y[:, t] is the token after x[:, t]

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
            # (B, T, V) -> (B·T, V) against (B·T,)
            loss = torch.nn.functional.cross_entropy(logits.float().flatten(0, 1), y.to(self.device).flatten(),
                                                     reduction="sum")
            nll += float(loss)
            n_tok += y.numel()
            n_bytes += int(self.byte_len[y].sum())  # the text the targets stand for
        model.train(was)
        val = nll / n_tok
        # bits per byte: total nats → bits, over the bytes predicted — comparable across tokenizers
        return {"val_loss": val, "val_ppl": math.exp(min(val, 50.0)),
                "val_bpb": nll / math.log(2) / max(n_bytes, 1)}


class Sampler:
    """A few continuations of fixed prompts (seeded sampling, so curves and samples are reproducible)."""

    def __init__(self, tokenizer, prompts: list[str], n_tokens: int, device: str, seed: int = 0):
        self.tok, self.prompts, self.n, self.device, self.seed = tokenizer, prompts, n_tokens, device, seed

    def __call__(self, model: TransformerLM) -> list[str]:
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


def pretrain(mc, tc, tokens_dir: Path, tok_dir: Path, out_dir: Path, *, seed: int, resume: bool = False,
             progress: bool = True, stop_after: int | None = None, dist: DistInfo | None = None) -> dict:
    """Train (or resume) the model ``mc`` (a ``ModelConfig``) with the loop ``tc`` (a ``TrainConfig``)
    on ``tokens_dir``'s token files; write ``report.json``."""
    with distributed(tc.device, dist) as dist:
        tok = Tokenizer.load(tok_dir)
        if tok.vocab_size != mc.vocab_size:
            raise MicroLMError(f"the tokenizer in {tok_dir} has {tok.vocab_size} ids but tokenizer.vocab_size is "
                               f"{mc.vocab_size}: train the tokenizer again (microlm tokenizer --force)")
        train_bin, val_bin = tokens_dir / "train.bin", tokens_dir / "val.bin"
        for p in (train_bin, val_bin):
            check_token_range(p, mc.vocab_size)
        torch.manual_seed(seed)
        model = TransformerLM(mc)
        n_params = model.num_parameters()
        batches = WindowBatches(train_bin, tc.seq_len, tc.batch_size, seed)
        micro = tc.micro_batch_size or max(1, tc.batch_size // dist.world_size)
        amp = autocast(tc.precision, dist.device)
        evaluator = Evaluator(val_bin, tc.seq_len, micro, tc.eval_batches, seed, byte_lengths(tok),
                              dist.device, amp)
        sampler = Sampler(tok, tc.sample_prompts, tc.sample_tokens, dist.device, seed) if tc.sample_tokens else None
        trainer = Trainer(model, tc, out_dir, batches=batches, dist=dist, seed=seed,
                          run_meta={"model": mc.to_dict()}, evaluate=evaluator, sample=sampler, progress=progress,
                          flops_per_token=model.flops_per_token(tc.seq_len))
        t0 = time.time()
        result = trainer.fit(resume=resume, stop_after=stop_after)
        seconds = time.time() - t0
        report = {}
        if dist.is_main:
            report = summarize(out_dir, mc, tc, seed, n_params, train_bin, seconds, result, dist.world_size,
                               speed=trainer.speed_setup())
        return report


def summarize(out_dir: Path, mc, tc, seed: int, n_params: int, train_bin: Path, seconds: float, result: dict,
              world: int, speed: dict | None = None) -> dict:
    train, evals = read_metrics(out_dir)
    h1 = unigram_entropy(train_bin, mc.vocab_size)
    tps = [r["tokens_per_s"] for r in train[1:]] or [r["tokens_per_s"] for r in train]
    last = evals[-1] if evals else {}
    report = {
        "params": n_params,
        "model": mc.to_dict(),
        "steps": result["steps"],
        "tokens_seen": result["steps"] * tc.batch_size * tc.seq_len,
        "seconds_this_run": round(seconds, 1),
        "tokens_per_s": round(float(np.median(tps)), 1) if tps else None,
        "processes": world,
        "precision": trajectory_config(tc)["precision"],
        "speed": speed or {},  # precision (auto's probe), compile, threads, busy: what the tokens/s were measured with
        "final_train_loss": train[-1]["loss"] if train else None,
        "final_val_loss": last.get("val_loss"),
        "final_val_bpb": last.get("val_bpb"),
        "unigram_entropy": h1,
        "samples": last.get("samples", []),
        "seed": seed,
    }
    write_json(Path(out_dir) / "report.json", report)
    plot_curves(out_dir, train, evals, h1)
    return report


