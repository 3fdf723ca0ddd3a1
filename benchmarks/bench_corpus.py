"""Benchmark of stage A1–A2 (corpus): throughput, memory, MinHash speed/accuracy, near-dup quality.

Measures ours and the named baselines in the same run and prints the ratios:

1. **MinHash signatures** on real documents: ours (one-permutation hashing + densification, NumPy,
   batched) vs ``datasketch.MinHash`` (classic K permutations) vs ``rensa`` (Rust; per-document
   ``RMinHash`` and the bulk ``digest_matrix_from_token_sets``) — docs/s and estimation error
   against the exact Jaccard on edited pairs.
2. **Near-dup quality** on planted duplicates (edited copies of real documents at known Jaccard):
   precision and recall of our Deduplicator vs ``datasketch.MinHashLSH`` at the same threshold.
3. **The whole stage** on the ``$MICROLM_DATA/pretrain`` bundle and on **1.41M records** made by
   replicating the real records with small perturbations: records/s, peak RSS (main and workers),
   dedup-index bytes per kept record.

Writes ``benchmarks/results/corpus.json``.  Usage: ``python benchmarks/bench_corpus.py [--quick]``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from microlm.data import clean  # noqa: E402
from microlm.data.dedup import Deduplicator, MinHasher, estimate_jaccard, jaccard  # noqa: E402
from microlm.data.sources import Drop, iter_lines, parse_line  # noqa: E402
from microlm.io import write_json  # noqa: E402
from microlm.stages import load_config  # noqa: E402
from microlm.stages.corpus import corpus_sources  # noqa: E402

WORK = REPO / "benchmarks" / "work"
K, SHINGLE, THRESHOLD = 128, 5, 0.8


def real_sources():
    return corpus_sources(load_config("cpu"))


def iter_texts(src):
    """Parsed (not yet cleaned) texts of one source; unusable lines are skipped."""
    for _, raw in iter_lines(src, 1 << 22):
        try:
            t = parse_line(src.format, raw)
        except Drop:
            continue
        if t:
            yield t


def load_docs(n: int, min_len: int = 80) -> list[str]:
    srcs = real_sources()
    per = max(n // len(srcs), 1) * 3
    out = []
    for s in srcs:
        got = 0
        for t in iter_texts(s):
            t = clean.normalize(t)
            if min_len <= len(t) <= 3000:
                out.append(t)
                got += 1
                if got >= per:
                    break
    random.Random(0).shuffle(out)
    seen, uniq = set(), []
    for t in out:
        if t not in seen:
            seen.add(t)
            uniq.append(t)
    return uniq[:n]


def shingles(t: str) -> list[str]:
    return [t[i : i + SHINGLE] for i in range(max(len(t) - SHINGLE + 1, 1))]


def edit(t: str, n: int, rng: random.Random) -> str:
    c = list(t)
    for _ in range(n):
        op = rng.random()
        i = rng.randrange(len(c))
        if op < 0.6:
            c[i] = rng.choice("的一是了我不人在他有这个上们来到时大地为子中")
        elif op < 0.8:
            del c[i]
        else:
            c.insert(i, rng.choice("，。的了"))
    return "".join(c)


# ------------------------------------------------------------------------------------------------
def bench_minhash(docs: list[str]) -> dict:
    import datasketch
    import rensa

    res = {}
    ours = MinHasher(K, SHINGLE, seed=1)
    t = time.perf_counter()
    for i in range(0, len(docs), 1000):
        ours.signatures(docs[i : i + 1000])
    res["ours_docs_per_s"] = len(docs) / (time.perf_counter() - t)

    sub = docs[: min(len(docs), 5000)]
    proto = datasketch.MinHash(num_perm=K, seed=1)
    perm, scheme = proto.permutations, proto.scheme
    t = time.perf_counter()
    for d in sub:
        m = datasketch.MinHash(num_perm=K, seed=1, permutations=perm, scheme=scheme)
        m.update_batch([s.encode("utf-8") for s in shingles(d)])
        m.digest()
    res["datasketch_docs_per_s"] = len(sub) / (time.perf_counter() - t)

    t = time.perf_counter()
    for d in docs:
        m = rensa.RMinHash(num_perm=K, seed=1)
        m.update(shingles(d))
        m.digest()
    res["rensa_docs_per_s"] = len(docs) / (time.perf_counter() - t)

    t = time.perf_counter()
    for i in range(0, len(docs), 1000):
        rensa.RMinHash.digest_matrix_from_token_sets([shingles(d) for d in docs[i : i + 1000]], K, 1)
    res["rensa_bulk_docs_per_s"] = len(docs) / (time.perf_counter() - t)

    # estimation error on edited pairs
    rng = random.Random(5)
    errs = {"ours": [], "datasketch": [], "rensa": []}
    for d in docs[:1500]:
        e = edit(d, rng.randint(1, max(len(d) // 8, 2)), rng)
        j = jaccard(d, e, SHINGLE)
        a, b = ours.signatures([d, e])
        errs["ours"].append(estimate_jaccard(a, b) - j)
        ma, mb = (datasketch.MinHash(num_perm=K, seed=1, permutations=perm, scheme=scheme) for _ in range(2))
        ma.update_batch([s.encode() for s in shingles(d)])
        mb.update_batch([s.encode() for s in shingles(e)])
        errs["datasketch"].append(ma.jaccard(mb) - j)
        ra, rb = rensa.RMinHash(K, 1), rensa.RMinHash(K, 1)
        ra.update(shingles(d))
        rb.update(shingles(e))
        errs["rensa"].append(ra.jaccard(rb) - j)
    for k, v in errs.items():
        v = np.array(v)
        res[f"{k}_error_mean"] = float(v.mean())
        res[f"{k}_error_std"] = float(v.std())
        res[f"{k}_error_mae"] = float(np.abs(v).mean())
    res["n_docs"] = len(docs)
    res["speedup_vs_datasketch"] = res["ours_docs_per_s"] / res["datasketch_docs_per_s"]
    res["speedup_vs_rensa"] = res["ours_docs_per_s"] / res["rensa_docs_per_s"]
    res["speedup_vs_rensa_bulk"] = res["ours_docs_per_s"] / res["rensa_bulk_docs_per_s"]
    return res


# ------------------------------------------------------------------------------------------------
def bench_quality(docs: list[str]) -> dict:
    """Planted near duplicates at known similarity; precision/recall at THRESHOLD."""
    import datasketch

    rng = random.Random(11)
    base = docs[:4000]
    copies, origin, true_j = [], [], []
    for i, d in enumerate(base[:2000]):
        n_edits = rng.choice([1, 2, 3, 5, 8, 12, 20, 40])  # from ~0.99 down to ~0.3 similarity
        e = edit(d, min(n_edits, max(len(d) // 4, 1)), rng)
        copies.append(e)
        origin.append(i)
        true_j.append(jaccard(d, e, SHINGLE))
    true_j = np.array(true_j)
    mh = MinHasher(K, SHINGLE, seed=3)

    def run_ours():
        dd = Deduplicator(exact=False, near=True, threshold=THRESHOLD, num_perm=K, seed=3)
        allx = base + copies
        flags, matches, kept_pos = [], [], []
        for i in range(0, len(allx), 1000):
            chunk = allx[i : i + 1000]
            dec = dd.process(np.arange(i, i + len(chunk), dtype=np.uint64), mh.signatures(chunk))
            flags += (~dec.keep).tolist()
            matches += dec.match.tolist()
            kept_pos += (i + np.flatnonzero(dec.keep)).tolist()
        # kept ids -> positions in base + copies
        pos = [kept_pos[m] if m >= 0 else -1 for m in matches[len(base):]]
        return np.array(flags[len(base):]), np.array(pos), dd

    def run_datasketch():
        lsh = datasketch.MinHashLSH(threshold=THRESHOLD, num_perm=K)
        proto = datasketch.MinHash(num_perm=K, seed=3)
        perm, scheme = proto.permutations, proto.scheme
        flags, matches = [], []
        for idx, d in enumerate(base + copies):
            m = datasketch.MinHash(num_perm=K, seed=3, permutations=perm, scheme=scheme)
            m.update_batch([s.encode() for s in shingles(d)])
            hits = lsh.query(m)
            if idx >= len(base):
                flags.append(bool(hits))
                matches.append(min(hits) if hits else -1)
            if not hits:
                lsh.insert(idx, m)
        return np.array(flags), np.array(matches), lsh

    def score(flags, matches):
        pos = true_j >= THRESHOLD
        allx = base + copies
        # a flag is correct if the kept document it was matched to really is >= THRESHOLD similar
        correct = np.array([bool(f) and m >= 0 and jaccard(allx[m], c, SHINGLE) >= THRESHOLD
                            for f, m, c in zip(flags, matches, copies, strict=True)])
        precision = int(correct.sum()) / max(int(flags.sum()), 1)
        recall = int((correct & pos).sum()) / max(int(pos.sum()), 1)
        buckets = {}
        for lo, hi in [(0.0, 0.6), (0.6, 0.7), (0.7, 0.8), (0.8, 0.85), (0.85, 0.9), (0.9, 0.95), (0.95, 1.01)]:
            sel = (true_j >= lo) & (true_j < hi)
            buckets[f"{lo:.2f}-{min(hi, 1.0):.2f}"] = {"pairs": int(sel.sum()),
                                                       "flagged": round(float(flags[sel].mean()), 4) if sel.any() else None}
        # the same, leaving out the +-0.05 band around the threshold where the estimate's noise decides
        clear = np.abs(true_j - THRESHOLD) >= 0.05
        rec_clear = int((correct & pos & clear).sum()) / max(int((pos & clear).sum()), 1)
        fp_clear = int((flags & ~correct & clear).sum())
        prec_clear = int((correct & clear).sum()) / max(int((flags & clear).sum()), 1)
        return {"precision": round(precision, 4), "recall": round(recall, 4), "flagged": int(flags.sum()),
                "positives": int(pos.sum()), "precision_outside_pm0.05": round(prec_clear, 4),
                "recall_outside_pm0.05": round(rec_clear, 4), "false_positives_outside_pm0.05": fp_clear,
                "flag_rate_by_true_jaccard": buckets}

    t = time.perf_counter()
    f, m, dd = run_ours()
    ours = score(f, m) | {"seconds": round(time.perf_counter() - t, 2), "bands": dd.bands, "rows": dd.rows}
    t = time.perf_counter()
    f, m, lsh = run_datasketch()
    ds = score(f, m) | {"seconds": round(time.perf_counter() - t, 2), "bands": lsh.b, "rows": lsh.r}
    return {"planted_pairs": len(copies), "threshold": THRESHOLD, "ours": ours, "datasketch_lsh": ds}


# ------------------------------------------------------------------------------------------------
def make_synthetic(n_target: int, path: Path) -> int:
    """Replicate the real records with small perturbations up to ``n_target`` records."""
    srcs = real_sources()
    rng = random.Random(7)
    n = 0
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        copy = 0
        while n < n_target:
            for s in srcs:
                for t in iter_texts(s):
                    if copy:
                        # perturb: a few random character edits + a copy tag, like re-crawled pages
                        t = edit(t, 1 + rng.randrange(3), rng) if len(t) > 4 else t
                        t = f"{t}（{copy}）" if rng.random() < 0.5 else t
                    f.write(json.dumps({"text": t}, ensure_ascii=False) + "\n")
                    n += 1
                    if n >= n_target:
                        return n
            copy += 1
    return n


def run_stage(inputs: list[str] | None, label: str) -> dict:
    """Run the stage in a fresh process (so peak RSS is this run's) and return its report."""
    out = WORK / f"corpus_{label}"
    code = (
        "import json,sys; from microlm.stages import load_config; "
        "from microlm.data.prepare_pretrain import prepare_pretrain; from microlm.stages.corpus import corpus_sources; "
        f"cfg=load_config('cpu'); r=prepare_pretrain(cfg.corpus, {str(out)!r}, corpus_sources(cfg, {inputs!r}), "
        "seed=cfg.seed, max_records=cfg.data.max_records, profile=cfg.profile, progress=False); "
        "print(json.dumps({k: r[k] for k in ('records_in','records_out','drops','throughput','memory','duplicates')}))"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO)
    if r.returncode:
        raise SystemExit(r.stderr[-2000:])
    rep = json.loads(r.stdout.strip().splitlines()[-1])
    rep["memory"]["peak_rss_total_mb"] = round(rep["memory"]["peak_rss_main_mb"] + rep["memory"]["peak_rss_worker_mb"], 1)
    return rep


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true", help="small sizes (minutes -> seconds); not for the README")
    ap.add_argument("--records", type=int, default=1_410_000)
    args = ap.parse_args()
    if not os.environ.get("MICROLM_DATA"):
        raise SystemExit("set MICROLM_DATA to the real data bundle (e.g. ../shared/datasets)")
    n_docs = 3000 if args.quick else 20000
    results: dict = {"host": {"cpus": os.cpu_count(), "python": platform.python_version(),
                              "machine": platform.machine()}, "quick": args.quick}
    docs = load_docs(n_docs)
    print(f"[bench] {len(docs)} real documents loaded", flush=True)

    results["minhash"] = mh = bench_minhash(docs)
    print(f"[bench] MinHash docs/s: ours {mh['ours_docs_per_s']:,.0f} | datasketch {mh['datasketch_docs_per_s']:,.0f} "
          f"(x{mh['speedup_vs_datasketch']:.1f}) | rensa {mh['rensa_docs_per_s']:,.0f} (x{mh['speedup_vs_rensa']:.2f}) "
          f"| rensa bulk {mh['rensa_bulk_docs_per_s']:,.0f} (x{mh['speedup_vs_rensa_bulk']:.2f})", flush=True)
    print(f"[bench] estimate MAE: ours {mh['ours_error_mae']:.4f} | datasketch {mh['datasketch_error_mae']:.4f} "
          f"| rensa {mh['rensa_error_mae']:.4f}", flush=True)

    results["near_dup_quality"] = q = bench_quality(docs)
    for k in ("ours", "datasketch_lsh"):
        print(f"[bench] planted near-dups ({k}): precision {q[k]['precision']:.4f} recall {q[k]['recall']:.4f} "
              f"(outside ±0.05 of t: P {q[k]['precision_outside_pm0.05']:.4f} R {q[k]['recall_outside_pm0.05']:.4f})",
              flush=True)

    results["stage_bundle"] = b = run_stage(None, "bundle")
    print(f"[bench] bundle: {b['records_in']:,} records, {b['throughput']['records_per_s']:,.0f} rec/s, "
          f"peak RSS {b['memory']['peak_rss_total_mb']} MB, index {b['memory']['dedup_index_bytes_per_kept_doc']} B/doc",
          flush=True)

    n = 100_000 if args.quick else args.records
    synth = WORK / f"synthetic_{n}.jsonl"
    if not synth.exists():
        t = time.perf_counter()
        make_synthetic(n, synth)
        print(f"[bench] wrote {n:,} synthetic records in {time.perf_counter() - t:.0f} s", flush=True)
    results["stage_synthetic"] = s = run_stage([str(synth)], "synthetic")
    s["file_mb"] = round(synth.stat().st_size / 1e6, 1)
    print(f"[bench] {n:,} records: {s['throughput']['records_per_s']:,.0f} rec/s in {s['throughput']['seconds']} s, "
          f"peak RSS {s['memory']['peak_rss_total_mb']} MB (main {s['memory']['peak_rss_main_mb']}), "
          f"index {s['memory']['dedup_index_bytes'] / 1e6:.0f} MB = {s['memory']['dedup_index_bytes_per_kept_doc']} B/kept doc",
          flush=True)
    growth_rss = s["memory"]["peak_rss_main_mb"] - b["memory"]["peak_rss_main_mb"]
    growth_idx = (s["memory"]["dedup_index_bytes"] - b["memory"]["dedup_index_bytes"]) / 1e6
    results["memory_growth"] = {"main_rss_mb": round(growth_rss, 1), "dedup_index_mb": round(growth_idx, 1)}
    print(f"[bench] main RSS grew {growth_rss:.0f} MB from bundle to {n:,} records; dedup index grew {growth_idx:.0f} MB",
          flush=True)
    name = "corpus_quick.json" if args.quick else "corpus.json"
    write_json(REPO / "benchmarks" / "results" / name, results)
    print(f"[bench] -> benchmarks/results/{name}")


if __name__ == "__main__":
    main()
