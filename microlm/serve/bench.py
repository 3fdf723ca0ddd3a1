"""Stage B6b ``serve_bench``: the served model under load, against the server a user would otherwise run.

The same client (``microlm.serve.client``: streamed chat completions, ``concurrency`` requests in
flight) sends the same prompts to vLLM and to ``transformers serve`` (transformers' own
OpenAI-compatible server) for the same folder, one after the other on the same machine, and reports
what ``vllm bench serve`` reports: request throughput, output tokens/s, TTFT, TPOT, ITL and
end-to-end latency (mean, p50, p99).  Two prompt sets: the IE evaluation prompts (the real task),
and random prompts of ``random_input_tokens`` tokens with ``max_tokens = random_output_tokens``
(without vLLM's ``ignore_eos``, which ``transformers serve`` rejects: both get the same request).
"""

from __future__ import annotations

import json
import random
import time
from pathlib import Path

from microlm.errors import MicroLMError

__all__ = ["random_prompts", "build"]



def random_prompts(tokenizer_dir: str, n: int, tokens: int, seed: int) -> list[list[dict]]:
    """``n`` user messages of about ``tokens`` random non-special tokens each (seeded)."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    special = set(tok.all_special_ids)
    ids = [i for i in range(len(tok)) if i not in special]
    rng = random.Random(seed)
    return [[{"role": "user", "content": tok.decode(rng.choices(ids, k=tokens))}] for _ in range(n)]


def _loads(srv, model_name: str, sets: dict, levels: list[int], bc, progress) -> dict:
    from microlm.serve.client import records_json, run_load, summarize

    out = {}
    for name, (prompts, max_tokens, ignore_eos) in sets.items():
        out[name] = {}
        for c in levels:
            n = max(bc.requests_min, bc.requests_per_concurrency * c)
            batch = [prompts[i % len(prompts)] for i in range(n)]
            recs, wall = run_load(srv.base_url, model_name, batch, concurrency=c, max_tokens=max_tokens,
                                  timeout=bc.timeout_s, ignore_eos=ignore_eos)
            s = summarize(recs, wall)
            s["records"] = records_json(recs)
            out[name][str(c)] = s
            if progress:
                print(f"serve_bench {srv.kind:12s} {name:6s} concurrency {c:3d}: {s['output_tokens_per_s']} tok/s, "
                      f"TTFT p50 {s['ttft_ms']['p50']} ms, failed {s['failed']}", flush=True)
    return out


def _plots(report: dict, out: Path) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    from microlm.plotting import use_cjk_font

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
            xs = np.sort([r[key] * 1000 for r in recs if r[key] is not None])
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


def build(run) -> dict:
    import dataclasses

    from microlm.ie.evaluate import load_prompts
    from microlm.io import write_json
    from microlm.serve.env import ensure_env
    from microlm.serve.server import ManagedServer, free_port, server_spec

    cfg, bc = run.cfg, run.cfg.serve_bench
    py = ensure_env(quiet=not run.progress)
    spec = server_spec(cfg, run.up)
    ie, _ = load_prompts(run.up["ie_data"])
    sets = {}
    if "ie" in bc.datasets:
        sets["ie"] = ([p["messages"] for p in ie], bc.ie_max_tokens, False)
    if "random" in bc.datasets:
        # no ignore_eos: it is a vLLM extension `transformers serve` rejects (422); the same request for both
        sets["random"] = (random_prompts(spec.model, 64, bc.random_input_tokens, cfg.seed), bc.random_output_tokens,
                          False)
    if not sets:
        raise MicroLMError("serve_bench.datasets names neither ie nor random")
    servers = {}
    startup = {}
    for kind, label in (("vllm", "vllm"), ("transformers", "transformers serve")):
        if kind == "transformers" and not bc.baseline:
            continue
        s = dataclasses.replace(spec, port=free_port(spec.host))
        srv = ManagedServer(s, run.out, python=py, kind=kind, name=kind)
        t0 = time.time()
        srv.start(cfg.serve.startup_timeout_s)
        startup[label] = round(time.time() - t0, 1)
        with srv:
            name = s.served_name if kind == "vllm" else s.model
            from microlm.serve.client import stream_chat

            for p in list(sets.values())[0][0][:2]:  # warm-up (first-request compilation, caches)
                stream_chat(srv.base_url, name, p, max_tokens=8, timeout=bc.timeout_s)
            servers[label] = _loads(srv, name, sets, list(bc.concurrency), bc, run.progress)
            servers[label]["rss_mb"] = round(srv.rss_mb(), 1)
    rss = {k: v.pop("rss_mb") for k, v in servers.items()}
    at = str(bc.compare_at)
    ratios = {}
    if "transformers serve" in servers:
        for ds in sets:
            ours, theirs = servers["vllm"][ds].get(at), servers["transformers serve"][ds].get(at)
            if ours and theirs and theirs["output_tokens_per_s"]:
                ratios[ds] = round(ours["output_tokens_per_s"] / theirs["output_tokens_per_s"], 2)
    report = {"model": spec.model, "dtype": spec.dtype, "compare_at": bc.compare_at, "concurrency": list(bc.concurrency),
              "startup_s": startup, "server_rss_mb": rss, "servers": servers, "output_tps_ratio_at_compare": ratios}
    report["plots"] = _plots(report, run.out)
    write_json(run.out / "report.json", report)
    brief = {srv: {ds: {c: {k: v[k] for k in ("output_tokens_per_s", "request_throughput", "failed")} | {
        "ttft_p50_ms": v["ttft_ms"]["p50"], "tpot_p50_ms": v["tpot_ms"]["p50"]} for c, v in by.items()}
        for ds, by in d.items()} for srv, d in servers.items()}
    write_json(run.out / "summary.json", brief)
    return {"ratio_at": bc.compare_at, "ratios": ratios, "startup_s": startup,
            "vllm_tps": {ds: servers["vllm"][ds][at]["output_tokens_per_s"] for ds in sets if at in servers["vllm"][ds]}}


def load_report(folder: Path) -> dict:
    return json.loads((Path(folder) / "report.json").read_text(encoding="utf-8"))
