"""Benchmark: fp32 vs bf16 autocast pretraining — the same seed, data and steps, through the course's
own ``Trainer`` — loss curves and tokens/s of each, and MFU against each dtype's measured GEMM peak.

Data: the ``tokens`` stage of the profile (``runs/<profile>/tokens``, built if missing).
Model: the profile's model at its ``pretrain.seq_len`` where this CPU multiplies bf16 natively
(``microlm.hw.cpu_bf16``); where it does not, bf16 runs a fallback ~80× slower than fp32 on the
products, so a small model (dim 128, 2 layers, seq 128) is compared instead and the result says so.

Notebook 05 plots the two curves from ``benchmarks/results/precision.json``.
Usage: ``python benchmarks/bench_precision.py [--profile cpu] [--steps N] [--quick]``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import statistics
import sys
import tempfile
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from roofline import gemm_peak  # noqa: E402

from microlm import stages  # noqa: E402
from microlm.hw import cpu_bf16  # noqa: E402
from microlm.io import write_json  # noqa: E402
from microlm.model import TransformerLM  # noqa: E402
from microlm.stages import load_config  # noqa: E402
from microlm.train.pretrain import WindowBatches  # noqa: E402
from microlm.train.trainer import Trainer  # noqa: E402

SMALL = {"dim": 128, "n_layers": 2, "n_heads": 2, "hidden_dim": 342, "max_seq_len": 128}


def run(model_cfg, tc, train_bin: Path, seed: int) -> list[dict]:
    torch.manual_seed(seed)
    model = TransformerLM(model_cfg)
    batches = WindowBatches(train_bin, tc.seq_len, tc.batch_size, seed)
    with tempfile.TemporaryDirectory() as d:
        Trainer(model, tc, d, batches=batches, seed=seed, progress=False,
                flops_per_token=model.flops_per_token(tc.seq_len)).fit()
        return [json.loads(line) for line in (Path(d) / "metrics.jsonl").read_text().splitlines()]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--profile", default="cpu")
    ap.add_argument("--steps", type=int, default=None)
    ap.add_argument("--quick", action="store_true")
    args = ap.parse_args()
    torch.set_num_threads(os.cpu_count() or 1)
    cfg = load_config(args.profile)
    tokens = stages.upstream("tokens", cfg)
    native, why = cpu_bf16()
    mc, tc = cfg.model, cfg.pretrain
    if native:
        steps = args.steps or (20 if args.quick else 150)
        scale = f"the {args.profile} profile's model"
    else:
        mc = dataclasses.replace(mc, **SMALL)
        tc = dataclasses.replace(tc, seq_len=SMALL["max_seq_len"], batch_size=8)
        steps = args.steps or (10 if args.quick else 60)
        scale = "a small model (bf16 is a slow fallback on this CPU)"
    tc = dataclasses.replace(tc, max_steps=steps, warmup_steps=max(1, steps // 10), log_interval=1,
                             eval_interval=10 ** 9, ckpt_interval=10 ** 9, sample_tokens=0, device="cpu")
    print(f"[bench] bf16 native: {native} ({why}); comparing on {scale}: {mc.dim}×{mc.n_layers}, "
          f"seq {tc.seq_len}, batch {tc.batch_size}, {steps} steps", flush=True)
    peaks = {d: gemm_peak(d)["gflops"] for d in ("fp32", "bf16")}
    curves = {}
    for precision in ("fp32", "bf16"):
        rows = [r for r in run(mc, dataclasses.replace(tc, precision=precision), tokens / "train.bin", cfg.seed)
                if r.get("type") == "train"]
        tps = statistics.median(r["tokens_per_s"] for r in rows[1:])
        fpt = TransformerLM(mc).flops_per_token(tc.seq_len)
        # MFU against the dtype's own GEMM peak; a fallback has no peak worth the name (its rate
        # depends on the shapes), so no MFU for it
        mfu = round(fpt * tps / (peaks[precision] * 1e9), 4) if native or precision == "fp32" else None
        curves[precision] = {"steps": [r["step"] for r in rows], "loss": [round(r["loss"], 4) for r in rows],
                             "tokens_per_s": round(tps, 1), "mfu_vs_own_peak": mfu}
        print(f"[bench] {precision}: {tps:,.0f} tok/s, final loss {rows[-1]['loss']:.4f}, MFU "
              + (f"{mfu:.1%} of its {peaks[precision]} GFLOP/s peak" if mfu is not None else "n/a (fallback)"),
              flush=True)
    a, b = curves["fp32"]["loss"], curves["bf16"]["loss"]
    tail = max(1, len(a) // 4)
    diff = {"max_abs": round(max(abs(x - y) for x, y in zip(a, b, strict=True)), 4),
            "last_quarter_mean_abs": round(statistics.fmean(abs(x - y) for x, y in zip(a[-tail:], b[-tail:],
                                                                                    strict=True)), 4)}
    speed = round(curves["bf16"]["tokens_per_s"] / curves["fp32"]["tokens_per_s"], 3)
    print(f"[bench] bf16 / fp32 tokens/s: x{speed}; |loss difference|: max {diff['max_abs']}, "
          f"last quarter mean {diff['last_quarter_mean_abs']}", flush=True)
    out = {"host": {"cpus": os.cpu_count(), "python": platform.python_version(), "torch": torch.__version__,
                    "machine": platform.machine(), "processor": platform.processor(), "threads": torch.get_num_threads()},
           "bf16_native": native, "bf16_why": why, "scale": scale, "profile": args.profile,
           "model": mc.to_dict(), "seq_len": tc.seq_len, "batch_size": tc.batch_size, "steps": steps,
           "gemm_peak_gflops": peaks, "curves": curves, "loss_difference": diff, "bf16_over_fp32_tokens_per_s": speed,
           "quick": args.quick}
    name = "precision_quick.json" if args.quick else "precision.json"
    write_json(REPO / "benchmarks" / "results" / name, out)
    print(f"[bench] wrote benchmarks/results/{name}")


if __name__ == "__main__":
    main()
