"""Benchmark: the pretraining step, ours against the step before issue 28, on this machine.

Rows per model (the ``cpu`` profile's 6.4M model at its 8 × 512 batch, and the 31.7M reference at
4 × 512), each through the course's own ``Trainer.train_step`` on the ``tokens`` stage's real data:

* ``baseline``: the step as it was — eager, SDPA's fused CPU attention, for-each AdamW;
* ``eager``: ours without compiling (bf16: the explicit-softmax attention; fused AdamW);
* ``compiled``: ours under ``torch.compile`` (what ``compile: auto`` picks for the ``cpu`` course).

in fp32 and in bf16 autocast (bf16 only where the CPU multiplies it natively).  Steps of every row are
interleaved (round robin, two steps each) so a neighbour's load falls on all rows alike; tokens/s is
the median over rounds, MFU = FLOPs per token × tokens/s ÷ the dtype's GEMM peak measured in the same
run.  Each row starts from the same weights and batches, so its losses over the measured steps are
compared with its dtype's baseline (``max_loss_diff``): the speed-ups must not change what is learned.
The machine's load is read before and after; a busy machine's numbers are flagged, not speed figures.

Usage: ``python benchmarks/bench_train.py [--rounds 6] [--models cpu,31.7m] [--quick]``.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from roofline import gemm_peak  # noqa: E402

from microlm import hw, stages  # noqa: E402
from microlm.io import write_json  # noqa: E402
from microlm.model import MODEL_PRESETS, TransformerLM  # noqa: E402
from microlm.model.transformer import Attention  # noqa: E402
from microlm.stages import load_config  # noqa: E402
from microlm.train import trainer as trainer_mod  # noqa: E402
from microlm.train.pretrain import WindowBatches  # noqa: E402
from microlm.train.trainer import Trainer  # noqa: E402


@contextlib.contextmanager
def baseline_step(on: bool):
    """The step before issue 28: SDPA attention under bf16 too, for-each (unfused) AdamW."""
    if not on:
        yield
        return
    real = trainer_mod.torch.optim.AdamW

    def unfused(*a, **k):
        return real(*a, **{**k, "fused": False})
    trainer_mod.torch.optim.AdamW = unfused
    try:
        yield
    finally:
        trainer_mod.torch.optim.AdamW = real


class Row:
    def __init__(self, name, mc, tc, batches, seed, out, mode):
        self.name, self.mode, self.precision = name, mode, tc.precision
        self.explicit = mode != "baseline"
        torch.manual_seed(seed)
        with baseline_step(mode == "baseline"):
            self.trainer = Trainer(TransformerLM(mc), dataclasses.replace(tc, compile=mode == "compiled"), out,
                                   batches=batches, seed=seed, progress=False)
        self.times, self.losses, self.step = [], [], 0
        self.fpt = TransformerLM(mc).flops_per_token(tc.seq_len)

    def run(self, n: int, timed: bool = True) -> float:
        Attention.explicit_cpu_bf16 = self.explicit
        t0 = time.perf_counter()
        for _ in range(n):
            self.losses.append(self.trainer.train_step(self.step)["loss"])
            self.step += 1
        dt = (time.perf_counter() - t0) / n
        if timed:
            self.times.append(dt)
        return dt


def bench_model(label, mc, tc, train_bin, seed, rounds, precisions, peaks):
    rows = []
    with tempfile.TemporaryDirectory() as d:
        for precision in precisions:
            ptc = dataclasses.replace(tc, precision=precision)
            for mode in ("baseline", "eager", "compiled"):
                if precision == "fp32" and mode == "eager":
                    continue  # fp32 attention is SDPA in both: ours eager = baseline + fused AdamW
                r = Row(f"{precision} {mode}", mc, ptc, WindowBatches(train_bin, tc.seq_len, tc.batch_size, seed),
                        seed, Path(d) / f"{precision}-{mode}", mode)
                t0 = time.perf_counter()
                r.run(2, timed=False)  # warm-up: oneDNN kernels, and the compilation
                r.warmup_s = time.perf_counter() - t0
                print(f"[bench] {label} {r.name}: warm-up {r.warmup_s:.1f} s", flush=True)
                rows.append(r)
        for i in range(rounds):
            for r in rows:
                r.run(2)
            print(f"[bench] {label} round {i + 1}/{rounds}", flush=True)
    out = []
    tokens = tc.batch_size * tc.seq_len
    for r in rows:
        tps = tokens / statistics.median(r.times)
        base = next(b for b in rows if b.precision == r.precision and b.mode == "baseline")
        diff = max(abs(a - b) for a, b in zip(r.losses, base.losses, strict=True))
        mfu = r.fpt * tps / (peaks[r.precision] * 1e9)
        out.append({"model": label, "precision": r.precision, "mode": r.mode, "tokens_per_s": round(tps, 1),
                    "mfu_vs_own_peak": round(mfu, 4), "warmup_s": round(r.warmup_s, 1),
                    "spread": round(min(r.times) / max(r.times), 2), "max_loss_diff_vs_baseline": round(diff, 4),
                    "steps": r.step, "loss_first_last": [round(r.losses[0], 4), round(r.losses[-1], 4)]})
    for row in out:
        base = next(b for b in out if b["precision"] == row["precision"] and b["mode"] == "baseline")
        row["vs_baseline"] = round(row["tokens_per_s"] / base["tokens_per_s"], 3)
        print(f"[bench] {label:6s} {row['precision']} {row['mode']:9s} {row['tokens_per_s']:8,.0f} tok/s  "
              f"MFU {row['mfu_vs_own_peak']:.1%}  ×{row['vs_baseline']:.2f} baseline  "
              f"max |Δloss| {row['max_loss_diff_vs_baseline']}", flush=True)
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=6)
    ap.add_argument("--models", default="cpu,31.7m")
    ap.add_argument("--quick", action="store_true", help="2 rounds, the cpu model only")
    args = ap.parse_args()
    if args.quick:
        args.rounds, args.models = 2, "cpu"
    torch.set_num_threads(len(os.sched_getaffinity(0)))
    cfg = load_config("cpu")
    train_bin = stages.upstream("tokens", cfg) / "train.bin"
    native, why = hw.cpu_bf16()
    precisions = ("fp32", "bf16") if native else ("fp32",)
    before = hw.machine_busy()
    peaks = {d: gemm_peak(d)["gflops"] for d in precisions}
    print(f"[bench] {hw.cpu_name()}, {torch.get_num_threads()} threads; GEMM peaks {peaks} GFLOP/s; bf16: {why}; "
          f"load {before['load_1m']}", flush=True)
    models = {"cpu": (cfg.model, cfg.pretrain),
              "31.7m": (dataclasses.replace(MODEL_PRESETS["microlm-31.7m"], vocab_size=cfg.model.vocab_size),
                        dataclasses.replace(cfg.pretrain, batch_size=4))}
    rows = []
    for label in args.models.split(","):
        mc, tc = models[label]
        tc = dataclasses.replace(tc, warmup_steps=10, max_steps=1000, device="cpu", log_interval=10 ** 9)
        rows += bench_model(label, mc, tc, train_bin, cfg.seed, args.rounds, precisions, peaks)
    after = hw.machine_busy()
    result = {"host": {"cpu": hw.cpu_name(), "cpus": os.cpu_count(), "threads": torch.get_num_threads(),
                       "torch": torch.__version__},
              "bf16_native": native, "bf16_why": why, "gemm_peak_gflops": peaks,
              "precision_probe": {k: v for k, v in hw.precision_probe().items() if k != "key"},
              "load_before": before, "load_after": after, "busy": before["busy"] or after["busy"],
              "rounds": args.rounds, "rows": rows, "quick": args.quick}
    name = "train_quick.json" if args.quick else "train.json"
    write_json(REPO / "benchmarks" / "results" / name, result)
    print(f"[bench] wrote benchmarks/results/{name}" + (" (machine busy: not speed figures)" if result["busy"] else ""))


if __name__ == "__main__":
    main()
