"""Benchmark of stages A6–A7: one training step of LoRA vs full-parameter SFT, same run.

For the ``cpu`` profile's model and the 31.7M reference: median step time (forward + backward +
AdamW over the trainable parameters) and peak RSS (VmHWM) of a fresh child process per variant, with
LoRA r=8 on q/k/v/o.  (Both variants run in the same invocation; the machine is otherwise idle.)

Writes ``benchmarks/results/lora.json``.  Usage: ``python benchmarks/bench_lora.py [--quick]``.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from microlm.io import write_json  # noqa: E402


def child(preset: str, variant: str, seq: int, batch: int, steps: int) -> None:
    import torch

    from microlm.model import MODEL_PRESETS, TransformerLM
    from microlm.model.lora import LoRAConfig, apply_lora

    def hwm() -> float:
        for line in open("/proc/self/status"):
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
        return 0.0

    torch.manual_seed(0)
    model = TransformerLM(MODEL_PRESETS[preset])
    if variant == "lora":
        apply_lora(model, LoRAConfig(r=8, alpha=16, targets=["q", "k", "v", "o"]))
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4)
    x = torch.randint(0, 6400, (batch, seq + 1))
    before = hwm()
    times = []
    for _ in range(steps + 1):
        t0 = time.perf_counter()
        _, loss = model(x[:, :-1], x[:, 1:])
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - t0)
    print(json.dumps({"step_s": round(statistics.median(times[1:]), 4), "trainable": sum(p.numel() for p in params),
                      "peak_rss_mb": round(hwm(), 1), "rss_before_steps_mb": round(before, 1)}))


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        a = sys.argv[2:]
        child(a[0], a[1], int(a[2]), int(a[3]), int(a[4]))
        return
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    args = ap.parse_args()
    steps = 2 if args.quick else 5
    results: dict = {"host": {"cpus": os.cpu_count()}, "quick": args.quick, "lora": "r=8, alpha=16, q/k/v/o"}
    for preset, seq, batch in (("microlm-cpu", 256, 16), ("microlm-31.7m", 512, 4)):
        row = {}
        for variant in ("full", "lora"):
            r = subprocess.run([sys.executable, __file__, "--child", preset, variant, str(seq), str(batch), str(steps)],
                               capture_output=True, text=True)
            if r.returncode:
                raise SystemExit(r.stderr[-2000:])
            row[variant] = json.loads(r.stdout.strip().splitlines()[-1])
        row["step_time_ratio_full_over_lora"] = round(row["full"]["step_s"] / row["lora"]["step_s"], 2)
        row["peak_rss_saving_mb"] = round(row["full"]["peak_rss_mb"] - row["lora"]["peak_rss_mb"], 1)
        results[preset] = row
        print(f"[bench] {preset} (seq {seq}, batch {batch}): full {row['full']['step_s']} s/step "
              f"{row['full']['peak_rss_mb']} MB, {row['full']['trainable']:,} trainable | LoRA {row['lora']['step_s']} "
              f"s/step {row['lora']['peak_rss_mb']} MB, {row['lora']['trainable']:,} trainable | "
              f"×{row['step_time_ratio_full_over_lora']} faster", flush=True)
    name = "lora_quick.json" if args.quick else "lora.json"
    write_json(REPO / "benchmarks" / "results" / name, results)
    print(f"[bench] wrote benchmarks/results/{name}")


if __name__ == "__main__":
    main()
