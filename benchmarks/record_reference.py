"""Record a finished pretraining run as the reference curve the course compares against.

``python benchmarks/record_reference.py [profile]`` reads ``runs/<profile>/pretrain/`` and writes
``data/reference_curves/pretrain_<profile>.json`` (eval steps, val loss/bpb, train loss every log
step, config, seed, machine).  Notebook 05 overlays it and checks a same-seed run lands on it.
"""

from __future__ import annotations

import platform
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from microlm.config import load_config  # noqa: E402
from microlm.io import read_json, write_json  # noqa: E402
from microlm.train.pretrain import read_metrics  # noqa: E402


def main() -> None:
    profile = sys.argv[1] if len(sys.argv) > 1 else "cpu"
    cfg = load_config(profile)
    run = cfg.run_path / "pretrain"
    train, evals = read_metrics(run)
    report = read_json(run / "report.json")
    if report["steps"] != cfg.pretrain.max_steps:
        raise SystemExit(f"{run} is not a finished run ({report['steps']} of {cfg.pretrain.max_steps} steps)")
    out = {
        "profile": profile,
        "seed": cfg.seed,
        "config": {"model": cfg.model.to_dict(), "steps": cfg.pretrain.max_steps},
        "pretrain": {k: v for k, v in cfg.pretrain.__dict__.items()},
        "eval_steps": [r["step"] for r in evals],
        "val_loss": [round(r["val_loss"], 4) for r in evals],
        "val_bpb": [round(r["val_bpb"], 4) for r in evals],
        "train_steps": [r["step"] for r in train],
        "train_loss": [round(r["loss"], 4) for r in train],
        "unigram_entropy": report["unigram_entropy"],
        "tokens_per_s": report["tokens_per_s"],
        "machine": f"{platform.machine()}, {__import__('os').cpu_count()} CPUs",
    }
    path = REPO / "data" / "reference_curves" / f"pretrain_{profile}.json"
    write_json(path, out)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
