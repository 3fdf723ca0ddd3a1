"""Benchmark of stages A3–A4 (tokenizer, token files): ours vs Hugging Face ``tokenizers``, same run.

1. **Training** a 6,400-token byte-level BPE on ~10 MB (every 8th document of the corpus train split)
   and on the whole train split: wall time and peak RSS of ours vs ``tokenizers``' ``BpeTrainer``
   (Rust, multi-threaded) with the same pre-tokenisation — GPT-2's regex (``ByteLevel``, MiniMind's
   recipe) and Qwen2's (``Split`` + ``ByteLevel(use_regex=False)``).  Each run is a fresh process, so
   peak RSS (VmHWM) is its own; ours adds the largest pre-tokenisation worker (an upper bound: pages
   shared after fork count twice).
2. **Compression** on the val split of the tokenizers trained in (1) with each regex, and Qwen2.5's.
3. **Encoding throughput** (MB/s) on the val split: ours (pure Python, cold cache) vs ``tokenizers``
   single-threaded (``encode`` per document) and batched (``encode_batch``, all threads).
4. **Streaming memory**: ``encode_iterable`` over a 100 MB file, peak RSS vs the tokenizer's own RSS.
5. **Token files** (``microlm tokens``): tokens/s over the whole corpus with 1 and 2 processes.

Writes ``benchmarks/results/tokenizer.json``.  Usage: ``python benchmarks/bench_tokenizer.py [--quick]``.
Needs ``MICROLM_DATA`` (the corpus stage at the cpu profile is built first if missing).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from microlm.io import write_json  # noqa: E402

WORK = REPO / "benchmarks" / "work" / "tokenizer"
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
VOCAB = 6400


def _hwm_mb() -> float:
    """This process's peak RSS (VmHWM).  Not ``ru_maxrss``: after exec Linux carries over the
    forking parent's peak, which would charge the benchmark driver's memory to the child."""
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _rss_mb() -> dict:
    me = _hwm_mb()
    kids = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
    return {"peak_rss_main_mb": round(me, 1), "peak_rss_worker_mb": round(kids, 1),
            "peak_rss_total_mb": round(me + kids, 1)}


# ---------------------------------------------------------------- child modes (one measurement each)
def child_train(impl: str, pattern: str, path: str, save: str | None) -> None:
    t0 = time.perf_counter()
    if impl == "ours":
        from microlm.tokenizer import Tokenizer, train_bpe

        vocab, merges = train_bpe(path, VOCAB, SPECIALS, pattern=pattern, workers=2)
        dt = time.perf_counter() - t0
        if save:
            Tokenizer(vocab, merges, SPECIALS, pattern=pattern).save(save)
    else:
        from microlm.tokenizer.bpe import PATTERNS
        from microlm.tokenizer.training import hf_bpe_baseline

        hf_bpe_baseline([path], VOCAB, SPECIALS, None if pattern == "gpt2" else PATTERNS[pattern])
        dt = time.perf_counter() - t0
    print(json.dumps({"seconds": round(dt, 2), **_rss_mb()}))


def child_stream(tok_dir: str, path: str) -> None:
    import psutil

    from microlm.tokenizer import Tokenizer

    tok = Tokenizer.load(tok_dir)
    base = psutil.Process().memory_info().rss / 2**20
    t0 = time.perf_counter()
    n = 0
    peak = base
    with open(path, encoding="utf-8") as f:
        for k, _ in enumerate(tok.encode_iterable(f)):
            n += 1
            if k % 1_000_000 == 0:
                peak = max(peak, psutil.Process().memory_info().rss / 2**20)
    dt = time.perf_counter() - t0
    print(json.dumps({"tokens": n, "seconds": round(dt, 1), "rss_after_load_mb": round(base, 1),
                      "rss_sampled_peak_mb": round(peak, 1), **_rss_mb()}))


def run_child(*args: str) -> dict:
    env = dict(os.environ)
    r = subprocess.run([sys.executable, __file__, *args], capture_output=True, text=True, env=env)
    if r.returncode != 0:
        raise SystemExit(f"child {args} failed:\n{r.stderr[-3000:]}")
    return json.loads(r.stdout.strip().splitlines()[-1])


# ---------------------------------------------------------------- inputs
def corpus_dir() -> Path:
    from microlm import stages
    from microlm.stages import load_config

    return stages.corpus(load_config("cpu"), progress=False)


def write_text(docs, path: Path) -> int:
    with open(path, "w", encoding="utf-8") as f:
        for d in docs:
            f.write(d)
            f.write("\n")
    return path.stat().st_size


def iter_docs(jsonl: Path, every: int = 1):
    with open(jsonl, encoding="utf-8") as f:
        for k, line in enumerate(f):
            if k % every == 0:
                yield json.loads(line)["text"]


# ---------------------------------------------------------------- benchmarks
def bench_training(inputs: dict[str, Path], patterns: dict[str, list[str]]) -> dict:
    out = {}
    for name, path in inputs.items():
        size = path.stat().st_size
        res = {"input_mb": round(size / 1e6, 1)}
        for pattern in patterns[name]:
            save = str(WORK / f"tok_{name}_{pattern}")
            ours = run_child("--child-train", "ours", pattern, str(path), save)
            hf = run_child("--child-train", "hf", pattern, str(path), "")
            res[pattern] = {"ours": ours, "hf_tokenizers": hf,
                            "time_ratio_ours_over_hf": round(ours["seconds"] / hf["seconds"], 2)}
            print(f"[bench] train {name} ({res['input_mb']} MB, {pattern}): ours {ours['seconds']} s "
                  f"{ours['peak_rss_total_mb']} MB | HF {hf['seconds']} s {hf['peak_rss_total_mb']} MB "
                  f"| ratio x{res[pattern]['time_ratio_ours_over_hf']}", flush=True)
        out[name] = res
    return out


def bench_encode(tok_dir: Path, val: Path) -> dict:
    from tokenizers import Tokenizer as HFTokenizer

    from microlm.tokenizer import Tokenizer

    docs = list(iter_docs(val))
    mb = sum(len(d.encode()) for d in docs) / 1e6
    tok = Tokenizer.load(tok_dir)
    t0 = time.perf_counter()
    ours = [tok.encode(d) for d in docs]
    t_ours = time.perf_counter() - t0
    hf = HFTokenizer.from_file(str(tok_dir / "tokenizer.json"))
    t0 = time.perf_counter()
    single = [hf.encode(d).ids for d in docs]
    t_single = time.perf_counter() - t0
    t0 = time.perf_counter()
    batch = [e.ids for e in hf.encode_batch(docs)]
    t_batch = time.perf_counter() - t0
    assert ours == single == batch, "ids differ from HF"
    res = {"docs": len(docs), "mb": round(mb, 2), "ours_mb_per_s": round(mb / t_ours, 3),
           "hf_single_thread_mb_per_s": round(mb / t_single, 3), "hf_batch_mb_per_s": round(mb / t_batch, 3),
           "ratio_hf_single_over_ours": round(t_ours / t_single, 1), "ids_identical": True}
    print(f"[bench] encode {mb:.1f} MB: ours {res['ours_mb_per_s']} MB/s | HF 1 thread "
          f"{res['hf_single_thread_mb_per_s']} MB/s (x{res['ratio_hf_single_over_ours']} faster) | HF batch "
          f"{res['hf_batch_mb_per_s']} MB/s; ids identical", flush=True)
    return res


def bench_compression(corpus: Path, full: bool) -> dict:
    """Val-split compression of the tokenizers the training section saved (our trainer, each regex)
    and of Qwen2.5's — the numbers behind the choice of pattern."""
    from microlm.stages import load_config
    from microlm.stages.tokenizer import qwen_tokenizer
    from microlm.tokenizer import Tokenizer
    from microlm.tokenizer.training import compression, load_hf_tokenizer, read_texts

    docs = read_texts(corpus / "val.jsonl")
    out = {}
    for pattern in ("gpt2", "qwen2"):
        tok = Tokenizer.load(WORK / f"tok_{'full' if full else '10mb'}_{pattern}")
        out[f"ours_{pattern}"] = compression(lambda ds, t=tok: [t.encode(d) for d in ds], docs)
    q = qwen_tokenizer(load_config("cpu"))
    if q is not None:
        hf = load_hf_tokenizer(q)
        out["qwen2.5"] = compression(lambda ds: [e.ids for e in hf.encode_batch(ds)], docs)
    out["qwen2_fewer_tokens_than_gpt2"] = round(1 - out["ours_qwen2"]["tokens"] / out["ours_gpt2"]["tokens"], 4)
    print("[bench] val compression (chars/token): " + ", ".join(
        f"{k} {v['chars_per_token']}" for k, v in out.items() if isinstance(v, dict)), flush=True)
    return out


def bench_stream(tok_dir: Path, train: Path, mb: int) -> dict:
    path = WORK / f"stream_{mb}mb.txt"
    if not path.exists() or path.stat().st_size < mb * 10**6:
        with open(path, "w", encoding="utf-8") as f:
            written = 0
            while written < mb * 10**6:
                for d in iter_docs(train):
                    f.write(d + "\n\n\n")
                    written += len(d.encode()) + 3
                    if written >= mb * 10**6:
                        break
    res = run_child("--child-stream", str(tok_dir), str(path))
    res["input_mb"] = round(path.stat().st_size / 1e6, 1)
    print(f"[bench] encode_iterable over {res['input_mb']} MB: {res['tokens']:,} tokens in {res['seconds']} s, "
          f"RSS {res['rss_after_load_mb']} MB after load → peak {res['peak_rss_main_mb']} MB", flush=True)
    return res


def bench_memmap(tok_dir: Path, corpus: Path) -> dict:
    from microlm.tokenizer.memmap import write_token_file

    out = {}
    for workers in (1, 2):
        t0 = time.perf_counter()
        stats = write_token_file(corpus / "train.jsonl", tok_dir, WORK / f"train_w{workers}.bin",
                                 workers=workers, batch_docs=256)
        dt = time.perf_counter() - t0
        out[f"workers_{workers}"] = {"tokens": stats["tokens"], "docs": stats["docs"], "seconds": round(dt, 1),
                                     "tokens_per_s": round(stats["tokens"] / dt)}
        print(f"[bench] tokenize train split, {workers} process(es): {stats['tokens']:,} tokens in {dt:.1f} s "
              f"= {stats['tokens'] / dt:,.0f} tokens/s", flush=True)
    same = (WORK / "train_w1.bin").read_bytes() == (WORK / "train_w2.bin").read_bytes()
    out["identical_across_workers"] = same
    out["speedup_2_over_1"] = round(out["workers_1"]["seconds"] / out["workers_2"]["seconds"], 2)
    out["train_mb"] = round((corpus / "train.jsonl").stat().st_size / 1e6, 1)
    return out


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--child-train":
        child_train(*sys.argv[2:6])
        return
    if len(sys.argv) > 1 and sys.argv[1] == "--child-stream":
        child_stream(*sys.argv[2:4])
        return
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true", help="10 MB only, 20 MB stream; not for the README")
    ap.add_argument("--only", nargs="*", choices=["training", "compression", "encode", "stream", "memmap"],
                    help="run these sections and merge them into the existing results file")
    args = ap.parse_args()
    if not os.environ.get("MICROLM_DATA"):
        raise SystemExit("set MICROLM_DATA to the real data bundle (e.g. ../shared/datasets)")
    WORK.mkdir(parents=True, exist_ok=True)
    corpus = corpus_dir()
    ten = WORK / "train_every8th.txt"
    write_text(iter_docs(corpus / "train.jsonl", every=8), ten)
    full = WORK / "train_full.txt"
    write_text(iter_docs(corpus / "train.jsonl"), full)
    name = "tokenizer_quick.json" if args.quick else "tokenizer.json"
    out_path = REPO / "benchmarks" / "results" / name
    results: dict = json.loads(out_path.read_text()) if args.only and out_path.exists() else {}
    results.update({"host": {"cpus": os.cpu_count(), "python": platform.python_version(),
                             "machine": platform.machine()}, "quick": args.quick, "vocab_size": VOCAB})
    sections = args.only or ["training", "compression", "encode", "stream", "memmap"]
    inputs = {"10mb": ten} if args.quick else {"10mb": ten, "full": full}
    patterns = {"10mb": ["gpt2", "qwen2"], "full": ["qwen2", "gpt2"]}
    tok_dir = WORK / ("tok_10mb_qwen2" if args.quick else "tok_full_qwen2")
    runs = {"training": lambda: bench_training(inputs, patterns),
            "compression": lambda: bench_compression(corpus, not args.quick),
            "encode": lambda: bench_encode(tok_dir, corpus / "val.jsonl"),
            "stream": lambda: bench_stream(tok_dir, corpus / "train.jsonl", 20 if args.quick else 100),
            "memmap": lambda: bench_memmap(tok_dir, corpus)}
    for sec in sections:  # each section compares ours and its baseline within itself; saved as it ends
        results[sec] = runs[sec]()
        results.setdefault("measured", {})[sec] = time.strftime("%Y-%m-%d %H:%M")
        write_json(out_path, results)
    print(f"[bench] wrote benchmarks/results/{name}")


if __name__ == "__main__":
    main()
