"""Benchmark of stages B1–B2 (the InstructIE data pipeline, steps 01–06).

1. **The whole pipeline** on all of ``$MICROLM_DATA/ie`` (+ the project-written records) and on a
   **171K-record scale-up**: the real sources plus one InstructIE file of new records, each the
   concatenation of two real records of the same topic (text and triples) — real language and
   real triples, texts distinct enough to pass the near-duplicate filter, so every step does the
   full work.  Each run is a fresh process: seconds per step, records per step, peak RSS.
   Step 06 measures token lengths on a seeded ~10,000-example sample per split (the evaluation
   prompts in full) — the full count is the ``cpu`` profile's setting and is timed on the real set.
2. **Near-duplicate filtering**, the costliest rule: ours (``microlm.data.dedup``: one-permutation
   MinHash + banded LSH, batched NumPy) vs ``datasketch`` ``MinHash`` + ``MinHashLSH`` at the same
   threshold and permutations, keep-first, on the same texts; the share of equal decisions.

Target (issue 7): ≤ 60 s for 171K records on 2 cores, memory flat.  Writes
``benchmarks/results/ie_data.json``.  Usage: ``python benchmarks/bench_ie_data.py [--quick]``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from microlm.io import write_json  # noqa: E402

RUN = r"""
import json, resource, sys, time
from pathlib import Path
from microlm.stages import load_config
from microlm.ie.pipeline import run_step
from microlm.stages import upstream
from microlm.stages.ie_data import pipeline
cfg = load_config("cpu", json.loads(sys.argv[1]))
out = Path(sys.argv[2])
steps = {}
for s in range(1, 7):
    t0 = time.time()
    st = run_step(pipeline(cfg), s, out, tokenizer_dir=upstream("tokenizer", cfg))
    steps[st["step"]] = {"seconds": round(time.time() - t0, 2), "records": st["records"],
                         "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)}
print(json.dumps(steps))
"""


def run_pipeline(overrides: dict, out: Path) -> dict:
    t0 = time.time()
    p = subprocess.run([sys.executable, "-c", RUN, json.dumps(overrides), str(out)], capture_output=True,
                       text=True, cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)})
    if p.returncode:
        raise SystemExit(p.stderr[-3000:])
    steps = json.loads(p.stdout.strip().splitlines()[-1])
    return {"wall_s": round(time.time() - t0, 1), "steps": steps,
            "total_step_s": round(sum(s["seconds"] for s in steps.values()), 1),
            "peak_rss_mb": max(s["peak_rss_mb"] for s in steps.values())}


def scale_up(standardized: Path, target: int, out: Path, seed: int, max_chars: int) -> int:
    """InstructIE lines (``cate``, ``text``, ``relation``) of ``target`` new records, each two real
    records of one topic joined (their texts and triples)."""
    by_topic: dict[str, list[dict]] = {}
    with open(standardized, encoding="utf-8") as f:
        for line in f:
            r = json.loads(line)
            by_topic.setdefault(r["cate"], []).append(r)
    topics = [t for t, rs in by_topic.items() if len(rs) >= 2]
    weights = [len(by_topic[t]) for t in topics]
    rng = random.Random(seed)
    n = 0
    with open(out, "w", encoding="utf-8") as f:
        while n < target:
            t = rng.choices(topics, weights)[0]
            a, b = rng.sample(by_topic[t], 2)
            text = a["text"] + b["text"]
            if len(text) > max_chars:
                continue
            f.write(json.dumps({"cate": t, "text": text, "relation": a["relation"] + b["relation"]},
                               ensure_ascii=False) + "\n")
            n += 1
    return n


def near_dup_compare(texts: list[str], threshold: float, num_perm: int, seed: int) -> dict:
    import numpy as np
    from datasketch import MinHash, MinHashLSH

    from microlm.data.dedup import Deduplicator, MinHasher

    t0 = time.time()
    hasher = MinHasher(num_perm, 5, seed=seed)
    dedup = Deduplicator(exact=False, near=True, threshold=threshold, num_perm=num_perm, seed=seed)
    ours = []
    for b in range(0, len(texts), 2048):
        chunk = texts[b:b + 2048]
        ours.extend(dedup.process(np.zeros(len(chunk), dtype=np.uint64), hasher.signatures(chunk)).keep)
    t_ours = time.time() - t0
    t0 = time.time()
    lsh = MinHashLSH(threshold=threshold, num_perm=num_perm)
    theirs = []
    for i, t in enumerate(texts):
        m = MinHash(num_perm=num_perm, seed=seed)
        m.update_batch([t[j:j + 5].encode("utf-8") for j in range(max(1, len(t) - 4))])
        dup = bool(lsh.query(m))
        theirs.append(not dup)
        if not dup:
            lsh.insert(str(i), m)
    t_theirs = time.time() - t0
    agree = sum(a == b for a, b in zip(ours, theirs, strict=True)) / len(texts)
    return {"texts": len(texts), "ours_s": round(t_ours, 2), "datasketch_s": round(t_theirs, 2),
            "speedup": round(t_theirs / t_ours, 2), "ours_dropped": len(texts) - sum(map(bool, ours)),
            "datasketch_dropped": len(texts) - sum(theirs), "decisions_equal": round(agree, 5)}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true", help="a 60K scale-up, no full-count render")
    ap.add_argument("--records", type=int, default=171_000)
    args = ap.parse_args()
    data = os.environ.get("MICROLM_DATA")
    if not data or not (Path(data) / "ie").is_dir():
        raise SystemExit("set MICROLM_DATA to the dataset bundle (the benchmark scales up its IE records)")
    total = 60_000 if args.quick else args.records
    res: dict = {"machine": {"cpus": os.cpu_count(), "python": platform.python_version()}, "target_records": total}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        print("1. the real IE sources (token lengths of every example)", flush=True)
        real = run_pipeline({}, tmp / "real")
        res["real"] = real
        print(json.dumps(real, ensure_ascii=False), flush=True)
        n_real = real["steps"]["01_standardize"]["records"]
        root = tmp / "root"
        (root / "scaleup").mkdir(parents=True)
        (root / "ie").symlink_to(Path(data).resolve() / "ie")
        n_new = scale_up(tmp / "real" / "01_standardized.jsonl", total - n_real, root / "scaleup" / "joined.jsonl",
                         seed=1234, max_chars=512)
        from microlm.stages import load_config

        sources = dict(load_config("cpu").ie_data.sources) | {"scaleup/joined.jsonl": "instructie"}
        print(f"2. scale-up: {n_real:,} real + {n_new:,} joined records", flush=True)
        big = run_pipeline({"data.root": str(root), "ie_data.sources": sources,
                            "ie_data.token_sample": 10000}, tmp / "big")
        res["scaleup"] = big
        print(json.dumps(big, ensure_ascii=False), flush=True)
        texts = []
        with open(tmp / "big" / "01_standardized.jsonl", encoding="utf-8") as f:
            seen = set()
            for line in f:
                r = json.loads(line)
                if r["id"] not in seen:
                    seen.add(r["id"])
                    texts.append(r["text"])
        print(f"3. near-dup: ours vs datasketch on {len(texts):,} texts", flush=True)
        res["near_dup"] = near_dup_compare(texts, 0.9, 128, seed=1234)
        print(json.dumps(res["near_dup"]), flush=True)
    s171 = big["total_step_s"]
    res["summary"] = {"scaleup_records": big["steps"]["01_standardize"]["records"], "scaleup_seconds": s171,
                      "target_seconds": 60, "meets_target": s171 <= 60,
                      "peak_rss_mb_real": real["peak_rss_mb"], "peak_rss_mb_scaleup": big["peak_rss_mb"],
                      "rss_ratio": round(big["peak_rss_mb"] / real["peak_rss_mb"], 2),
                      "records_ratio": round(big["steps"]["01_standardize"]["records"] / n_real, 2)}
    print(json.dumps(res["summary"]))
    write_json(REPO / "benchmarks" / "results" / ("ie_data_quick.json" if args.quick else "ie_data.json"), res)


if __name__ == "__main__":
    main()
