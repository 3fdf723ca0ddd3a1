"""Benchmarking a served model under load against the server a user would otherwise run: prompt sets,
concurrency levels, plots (what the ``serve_bench`` stage, B6b, runs).

The same client (``microlm.serve.client``: streamed chat completions, ``concurrency`` requests in
flight) sends the same prompts to vLLM and to ``transformers serve`` (transformers' own
OpenAI-compatible server; optionally also its ``--continuous-batching`` mode) for the same folder,
one after the other on the same machine, and reports
what ``vllm bench serve`` reports: request throughput, output tokens/s, TTFT, TPOT, ITL and
end-to-end latency (mean, p50, p99).  Two prompt sets: the IE evaluation prompts (the real task),
and random prompts of ``random_input_tokens`` tokens with ``max_tokens = random_output_tokens``
(without vLLM's ``ignore_eos``, which ``transformers serve`` rejects: both get the same request).
Streamed answers without any text are counted (``empty``) per level, whichever server gave them.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

import numpy as np

from microlm.plotting import use_cjk_font
from microlm.serve.client import records_json, run_load, summarize

__all__ = ["random_prompts", "run_levels", "plot_bench"]


def random_prompts(tokenizer_dir: str, n: int, tokens: int, seed: int) -> list[list[dict]]:
    """``n`` user messages of about ``tokens`` random non-special tokens each (seeded)."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    special = set(tok.all_special_ids)
    ids = [i for i in range(len(tok)) if i not in special]
    rng = random.Random(seed)
    return [[{"role": "user", "content": tok.decode(rng.choices(ids, k=tokens))}] for _ in range(n)]


def run_levels(srv, model_name: str, sets: dict, levels: list[int], bc, progress) -> dict:
    """Each prompt set at each concurrency level: ``summarize``'s numbers, the count of answers with
    no text (``empty``) and the records."""
    out = {}
    for name, (prompts, max_tokens, ignore_eos) in sets.items():
        out[name] = {}
        for c in levels:
            n = max(bc.requests_min, bc.requests_per_concurrency * c)
            batch = [prompts[i % len(prompts)] for i in range(n)]
            recs, wall = run_load(srv.base_url, model_name, batch, concurrency=c, max_tokens=max_tokens,
                                  timeout=bc.timeout_s, ignore_eos=ignore_eos)
            s = summarize(recs, wall)
            # an answer with no text (a stop token first) is an answer, but one that cost nothing to
            # make: counted, so a server that answers nothing cannot pass for a fast one
            s["empty"] = sum(1 for r in recs if r.ok and not r.text)
            s["records"] = records_json(recs)
            out[name][str(c)] = s
            if progress:
                print(f"serve_bench {srv.kind:15s} {name:6s} concurrency {c:3d}: {s['output_tokens_per_s']} tok/s, "
                      f"TTFT p50 {s['ttft_ms']['p50']} ms, failed {s['failed']}", flush=True)
    return out


def plot_bench(report: dict, out: Path) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    use_cjk_font()
    servers = list(report["servers"])
    sets = list(report["servers"][servers[0]])
    fig, axes = plt.subplots(1, len(sets), figsize=(5.5 * len(sets), 3.8), squeeze=False)
    for ax, ds in zip(axes[0], sets, strict=True):
        for srv in servers:
            levels = sorted(int(c) for c in report["servers"][srv][ds])
            ax.plot(levels, [report["servers"][srv][ds][str(c)]["output_tokens_per_s"] or 0 for c in levels], "o-",
                    label=srv)
        ax.set_xscale("log", base=2)
        ax.set_xlabel("concurrency")
        ax.set_ylabel("output tokens/s")
        ax.set_title(f"throughput, {ds} prompts")
        ax.legend()
    fig.tight_layout()
    fig.savefig(out / "throughput.png", dpi=110)
    plt.close(fig)

    c = str(report["compare_at"])
    fig, axes = plt.subplots(1, 2, figsize=(11, 3.8))
    for srv in servers:
        for ax, key in zip(axes, ("ttft", "e2e"), strict=True):
            recs = report["servers"][srv][sets[0]].get(c, {}).get("records", [])
            xs = np.sort([r[key] * 1000 for r in recs if r["ok"] and r[key] is not None])
            if len(xs):
                ax.plot(xs, np.arange(1, len(xs) + 1) / len(xs), label=srv)
    for ax, key in zip(axes, ("time to first token (ms)", "end-to-end latency (ms)"), strict=True):
        ax.set_xlabel(key)
        ax.set_ylabel("share of requests")
        ax.set_title(f"{sets[0]} prompts, concurrency {c}")
        ax.legend()
    fig.tight_layout()
    fig.savefig(out / "latency_cdf.png", dpi=110)
    plt.close(fig)
    return ["throughput.png", "latency_cdf.png"]


def load_report(folder: Path) -> dict:
    return json.loads((Path(folder) / "report.json").read_text(encoding="utf-8"))
