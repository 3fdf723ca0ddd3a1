"""Stage B6b ``serve_bench``: benchmark the served model like ``vllm bench serve`` — vLLM against
``transformers serve`` (and, ``continuous_batching``, ``transformers serve --continuous-batching``),
same load, concurrency 1–64 (``microlm.serve.bench``)."""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass, field

from microlm.errors import ConfigError, MicroLMError
from microlm.stages.registry import Stage, StageRun
from microlm.stages.server import serve_key, server_spec


@dataclass
class ServeBenchConfig:
    """Stage B6b: the same load (the IE prompts and random prompts, each at every ``concurrency``)
    against vLLM and the ``transformers serve`` baseline (``baseline``), and its continuous-batching
    mode (``continuous_batching``); ``compare_at`` = the concurrency of the ratios."""

    datasets: list[str] = field(default_factory=lambda: ["ie", "random"])
    concurrency: list[int] = field(default_factory=lambda: [1, 4, 16, 64])
    requests_min: int = 8
    requests_per_concurrency: int = 2  # requests per level = max(requests_min, this × concurrency)
    ie_max_tokens: int = 128
    random_input_tokens: int = 128
    random_output_tokens: int = 64
    compare_at: int = 16
    baseline: bool = True
    continuous_batching: bool = False  # also run `transformers serve --continuous-batching` as a second baseline
    timeout_s: float = 600.0


def check(cfg) -> None:
    c = cfg.serve_bench
    if not c.datasets or set(c.datasets) - {"ie", "random"}:
        raise ConfigError(f"serve_bench.datasets: a non-empty subset of [ie, random], got {c.datasets}")
    if not c.concurrency or min(c.concurrency) < 1 or c.compare_at not in c.concurrency:
        raise ConfigError("serve_bench: concurrency levels >= 1, and compare_at must be one of them")
    if min(c.requests_min, c.requests_per_concurrency, c.ie_max_tokens, c.random_input_tokens,
           c.random_output_tokens) < 1 or c.timeout_s <= 0:
        raise ConfigError("serve_bench: requests_*, *_tokens >= 1 and timeout_s > 0")


PLAIN, CB = "transformers serve", "transformers serve --continuous-batching"  # the baselines' labels


def tps_ratios(servers: dict, label: str, at: str) -> dict:
    """vLLM ÷ the baseline ``label``, output tokens/s at concurrency ``at``, per dataset (none where it
    did not run or produced nothing)."""
    out = {}
    for ds, by_c in servers.get(label, {}).items():
        ours, theirs = servers["vllm"][ds].get(at), by_c.get(at)
        if ours and theirs and theirs["output_tokens_per_s"]:
            out[ds] = round(ours["output_tokens_per_s"] / theirs["output_tokens_per_s"], 2)
    return out


def _summary(m: dict) -> str:
    def ratios(r: dict) -> str:
        return ", ".join(f"{k} ×{v}" for k, v in r.items()) or "—"

    at = f"output tokens/s at concurrency {m['ratio_at']}"
    cb = f"; vLLM ÷ transformers serve --continuous-batching: {ratios(m['ratios_cb'])}" if "ratios_cb" in m else ""
    return f"vLLM ÷ transformers serve, {at}: {ratios(m['ratios'])}{cb}; vLLM {m['vllm_tps']} tok/s"


def build(run: StageRun) -> dict:
    """vLLM, (``baseline``) ``transformers serve`` and (``continuous_batching``) ``transformers serve
    --continuous-batching`` under the same load, one after the other; report, summary and plots.  A
    baseline's failed requests show in its rows' ``failed``, answers without text in ``empty``; one
    that produced no tokens has no ratio."""
    from microlm.ie.evaluate import load_prompts
    from microlm.io import write_json
    from microlm.serve.bench import plot_bench, random_prompts, run_levels
    from microlm.serve.client import stream_chat
    from microlm.serve.env import ensure_env
    from microlm.serve.server import ManagedServer, free_port

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
    runs = [("vllm", "vllm"), *([("transformers", PLAIN)] if bc.baseline else []),
            *([("transformers-cb", CB)] if bc.continuous_batching else [])]
    failures = {}
    for kind, label in runs:
        s = dataclasses.replace(spec, port=free_port(spec.host))
        srv = ManagedServer(s, run.out, python=py, kind=kind, name=kind)
        t0 = time.time()
        try:
            srv.start(cfg.serve.startup_timeout_s)
        except MicroLMError as e:
            if kind == "vllm":
                raise
            failures[label] = str(e).splitlines()[0]  # a baseline that does not start: said, vLLM's rows kept
            print(f"serve_bench: {label} did not start: {failures[label]}", flush=True)
            continue
        startup[label] = round(time.time() - t0, 1)
        with srv:
            name = srv.model_name
            for p in list(sets.values())[0][0][:2]:  # warm-up (first-request compilation, caches)
                stream_chat(srv.base_url, name, p, max_tokens=8, timeout=bc.timeout_s)
            servers[label] = run_levels(srv, name, sets, list(bc.concurrency), bc, run.progress)
            servers[label]["rss_mb"] = round(srv.rss_mb(), 1)
    rss = {k: v.pop("rss_mb") for k, v in servers.items()}
    at = str(bc.compare_at)
    ratios, ratios_cb = tps_ratios(servers, PLAIN, at), tps_ratios(servers, CB, at)
    report = {"model": spec.model, "dtype": spec.dtype, "compare_at": bc.compare_at, "concurrency": list(bc.concurrency),
              "startup_s": startup, "server_rss_mb": rss, "servers": servers, "output_tps_ratio_at_compare": ratios}
    if CB in servers:
        report["output_tps_ratio_at_compare_cb"] = ratios_cb
    if failures:
        report["baselines_not_started"] = failures
    report["plots"] = plot_bench(report, run.out)
    write_json(run.out / "report.json", report)
    brief = {srv: {ds: {c: {k: v.get(k) for k in ("output_tokens_per_s", "request_throughput", "failed", "empty")} | {
        "ttft_p50_ms": v["ttft_ms"]["p50"], "tpot_p50_ms": v["tpot_ms"]["p50"]} for c, v in by.items()}
        for ds, by in d.items()} for srv, d in servers.items()}
    write_json(run.out / "summary.json", brief)
    return {"ratio_at": bc.compare_at, "ratios": ratios, **({"ratios_cb": ratios_cb} if CB in servers else {}),
            "startup_s": startup,
            "vllm_tps": {ds: servers["vllm"][ds][at]["output_tokens_per_s"] for ds in sets if at in servers["vllm"][ds]}}


STAGE = Stage(
    "serve_bench", "B6b", "benchmark the served model like `vllm bench serve`: vLLM vs `transformers serve`, same "
    "load, concurrency 1–64",
    build=build, section=ServeBenchConfig, check=check, upstream=("ie_data", "ie_merged"),
    sections=("serve_bench", "serve"), key=lambda cfg, o: serve_key(cfg, "serve_bench") | {"seed": cfg.seed},
    outputs=("report.json", "summary.json", "throughput.png", "latency_cdf.png"), notebook="12_vllm", version=3,
    summary=_summary)
