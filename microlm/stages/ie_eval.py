"""Stage B4 ``ie_eval``: every model of ``ie_eval.models`` answers the IE evaluation prompts; parse
rate, schema, strict and relaxed F1 with intervals (``microlm.ie.evaluate``; the backends in
``microlm.ie.answers``).

A row with ``base_url: serve`` is answered by the course's own vLLM server of ``serve.model``, started
here for that row.  A row whose model or adapter cannot be loaded (or whose every answer failed at its
endpoint) fails the stage with one line naming the row and the file — no manifest is written — unless
it says ``optional: true``: then it is reported *not run*.  ``--force`` starts the answer cache over."""

from __future__ import annotations

import contextlib
import datetime as dt
import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

import regex

from microlm.config import resolve_model_name, stage_config
from microlm.errors import ConfigError, MicroLMError
from microlm.stages.ie_lora import ie_bases, qwen_key
from microlm.stages.registry import REGISTRY, Option, Stage, StageRun, get_stage, resolve_ref
from microlm.stages.server import server_spec


def _ie_eval_models() -> list[dict]:
    return [{"name": "qwen2.5-1.5b", "backend": "transformers", "model": "Qwen/Qwen2.5-1.5B-Instruct"},
            {"name": "qwen2.5-1.5b-ie", "backend": "transformers", "model": "Qwen/Qwen2.5-1.5B-Instruct",
             "adapter": "ie_lora:qwen2.5-1.5b"},
            {"name": "microlm-31.7m", "backend": "microlm", "model": "hf"},
            {"name": "microlm-31.7m-ie", "backend": "transformers", "model": "hf", "adapter": "ie_lora:microlm-31.7m"}]


IE_EVAL_BACKENDS = ("microlm", "transformers", "openai")
IE_EVAL_MODEL_KEYS = ("name", "backend", "model", "adapter", "constrained", "base_url", "model_name", "api_key_env",
                      "prompt", "optional")
IE_EVAL_DTYPES = ("float32", "bfloat16", "float16")
IE_EVAL_PROTOCOLS = ("ours", "iepile")


@dataclass
class IEEvalConfig:
    """Stage B4: every entry of ``models`` answers the evaluation prompts greedily.  An entry is
    ``{name, backend: microlm | transformers | openai, model, adapter?, constrained?, base_url?,
    model_name?, api_key_env?, prompt?, optional?}``; ``model``/``adapter`` name a course stage (``hf``,
    ``ie_lora:<run>``, ``ie_merged:<run>``), a local folder or a hub id.  A model or adapter that cannot
    be loaded, or an endpoint that fails every answer, fails the stage — unless the entry says
    ``optional: true``: then its row is reported *not run* (no numbers) and left out of the comparisons.
    ``floors`` adds the two rows computed without a model; ``all`` evaluates the whole test split
    instead of the 40 prompts; ``dtype``: what the local backends (microlm, transformers) compute in."""

    models: list[dict] = field(default_factory=_ie_eval_models)
    floors: bool = True
    all: bool = False
    limit: int = 0  # the first N prompts only (0 = all)
    # ours: the fixed prompts, one chunk each; iepile: every chunk of their records under IEPile's test chunking,
    # a record's answers merged and scored against its whole relation list (IEPile's eval_func counting)
    protocols: list[str] = field(default_factory=lambda: ["ours"])
    compare: list[list[str]] | None = None  # [A, B] pairs for the paired bootstrap (null = every pair)
    max_new_tokens: int = 256  # at least: each model's cap also holds the longest gold answer it is asked for
    stop: list[str] = field(default_factory=lambda: ["<|im_end|>"])
    batch_size: int = 8
    dtype: str = "float32"  # float32 | bfloat16 | float16 (a cache key, as the batch size is)
    bootstrap_samples: int = 1000
    concurrency: int = 4  # openai backend: requests in flight
    timeout_s: float = 120.0
    retries: int = 3
    backoff_s: float = 0.5


def check(cfg) -> None:
    c = cfg.ie_eval
    names = [m.get("name", "") for m in c.models]
    for m in c.models:
        extra = sorted(set(m) - set(IE_EVAL_MODEL_KEYS))
        if extra or not m.get("name") or not m.get("model") or m.get("backend") not in IE_EVAL_BACKENDS:
            raise ConfigError(f"ie_eval.models: each model is {{name, backend ({' | '.join(IE_EVAL_BACKENDS)}), model, "
                              f"adapter?, constrained?, base_url?, model_name?, api_key_env?, prompt?, optional?}}; "
                              f"got {m}")
        if not isinstance(m.get("optional", False), bool):
            raise ConfigError(f"ie_eval.models: {m['name']!r}: optional is true or false, got {m['optional']!r}")
        if m["backend"] == "openai" and not m.get("base_url"):
            raise ConfigError(f"ie_eval.models: {m['name']!r} (openai) needs base_url")
        if m.get("constrained") and m["backend"] != "transformers":
            raise ConfigError(f"ie_eval.models: {m['name']!r}: constrained decoding is a transformers-backend option")
        if m.get("prompt", "ie") not in ("ie", "zero_shot"):
            raise ConfigError(f"ie_eval.models: {m['name']!r}: prompt must be ie or zero_shot, got {m.get('prompt')!r}")
        # a model naming an ie_lora run that is not configured fails when the stage runs (one line; or
        # "not run" when optional), not a config error (a user may change ie_lora.runs without touching ie_eval)
        if not regex.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]*", m["name"]) or m["name"].startswith("floor-"):
            raise ConfigError(f"ie_eval.models: name {m['name']!r} must be a folder name, not floor-*")
    if len(set(names)) != len(names):
        raise ConfigError("ie_eval.models: names must be distinct")
    if not c.protocols or set(c.protocols) - set(IE_EVAL_PROTOCOLS) or "ours" not in c.protocols:
        raise ConfigError(f"ie_eval.protocols: ours, and optionally iepile; got {c.protocols}")
    known = set(names) | ({"floor-empty", "floor-rule"} if c.floors else set())
    for pair in c.compare or []:
        if len(pair) != 2 or pair[0] == pair[1] or set(pair) - known:
            raise ConfigError(f"ie_eval.compare: each entry is [A, B], two different models or floors of "
                              f"ie_eval.models; got {pair}")
    if c.dtype not in IE_EVAL_DTYPES:
        raise ConfigError(f"ie_eval.dtype: one of {', '.join(IE_EVAL_DTYPES)}; got {c.dtype!r}")
    if c.max_new_tokens < 1 or c.batch_size < 1 or c.bootstrap_samples < 100 or c.concurrency < 1 \
            or c.timeout_s <= 0 or c.retries < 0 or c.backoff_s < 0 or c.limit < 0:
        raise ConfigError("ie_eval: max_new_tokens, batch_size, concurrency >= 1; bootstrap_samples >= 100; "
                          "timeout_s > 0; retries, backoff_s, limit >= 0")


@contextlib.contextmanager
def served(entry: dict):
    """For an entry with ``base_url: serve``: the course's vLLM server of ``serve.model`` started (once,
    for all of the entry's answers) and the entry pointing at it; any other entry as it is."""
    if entry.get("_serve") is None or entry.get("_started"):
        yield entry
        return
    from microlm.serve.env import ensure_env
    from microlm.serve.server import ManagedServer

    spec, run_dir, timeout = entry["_serve"]
    with ManagedServer(spec, run_dir, python=ensure_env(quiet=True), name=f"vllm-{entry['name']}").start(timeout) as srv:
        inner = {k: v for k, v in entry.items() if k != "_serve"}
        inner.update(base_url=srv.base_url, model_name=spec.served_name, _started=True, _serve_spec=spec)
        yield inner


def run_meta(cfg, models: list[dict]) -> dict:
    """Date, machine, data and weights of an evaluation run (for its results card)."""
    from microlm.config import qwen_model
    from microlm.data.sources import data_root
    from microlm.hw import cpu_name
    from microlm.io import file_digest

    meta = {"date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"), "profile": cfg.profile,
            "machine": {"cpu": cpu_name(), "cores": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity")
                        else os.cpu_count()},
            "data": "the data bundle (MICROLM_DATA)" if data_root(cfg.data.root) else "embedded (no MICROLM_DATA)"}
    if any(m.get("model") == "qwen" for m in cfg.ie_eval.models) or any(r["base"] == "qwen" for r in cfg.ie_lora.runs):
        q = qwen_model(cfg)
        w = {"qwen": q if not Path(q).is_dir() else f"local folder ({Path(q).name})"}
        if Path(q).is_dir():
            conf = Path(q) / "config.json"
            w["weights_digest"] = {p.name: file_digest(p) for p in sorted(Path(q).glob("*.safetensors"))}
            if conf.is_file():
                c = json.loads(conf.read_text(encoding="utf-8"))
                w["architecture"] = {k: c.get(k) for k in ("model_type", "hidden_size", "num_hidden_layers",
                                                           "vocab_size", "tie_word_embeddings", "dtype")}
        meta["weights"] = w
    return meta

def build(run: StageRun) -> dict:
    """The ``ie_eval`` stage (see the module doc)."""
    from microlm.hw import peak_rss_mb
    from microlm.ie.evaluate import (
        evaluate,
        load_prompts,
        results_card,
        write_failures,
        write_plots,
        write_summary,
    )
    from microlm.ie.train_lora import read_lines
    from microlm.io import write_json

    cfg, ec = run.cfg, run.cfg.ie_eval
    all_test = bool(run.options.get("all")) or ec.all
    prompts, bad = load_prompts(run.up["ie_data"], all_test=all_test, limit=ec.limit)
    if not prompts:
        raise MicroLMError(f"no evaluation prompts in {run.up['ie_data']}")
    iepile = None
    if "iepile" in ec.protocols:
        iepile, bad_i = load_prompts(run.up["ie_data"], all_test=all_test, limit=ec.limit, protocol="iepile")
        bad.update(bad_i)
    train_answers = [ln["messages"][-1]["content"] for ln in read_lines(run.up["ie_data"] / get_stage("ie_data").file("train"))
                     if ln.get("messages") and ln["messages"][-1]["role"] == "assistant"]
    dec = {"max_new_tokens": ec.max_new_tokens, "stop": list(ec.stop), "batch_size": ec.batch_size,
           "dtype": ec.dtype, "concurrency": ec.concurrency, "timeout_s": ec.timeout_s, "retries": ec.retries, "backoff_s": ec.backoff_s}
    models = []
    for m in ec.models:
        m = dict(m, model=resolve_model_name(cfg, m["model"]))
        if m["backend"] == "openai" and m.get("base_url") == "serve":
            m = dict(m, _serve=(server_spec(cfg, run.up, port=0), run.out, cfg.serve.startup_timeout_s))
        models.append(m)
    t0 = time.time()
    report = evaluate(models, prompts, lambda ref: resolve_ref(ref, run.up), run.out, dec, serve=served, train_answers=train_answers, floors=ec.floors,
                      progress=run.progress, seed=cfg.seed, bootstrap_samples=ec.bootstrap_samples,
                      iepile_prompts=iepile, compare=ec.compare, force=run.force)
    report["unreadable_prompt_lines"] = dict(bad)
    report["all_test"] = all_test
    rows = [json.loads(x) for x in (run.out / "results.jsonl").read_text(encoding="utf-8").splitlines()]
    report["failures"] = write_failures(rows, prompts, run.out)
    write_summary(report, run.out)
    report["plots"] = write_plots(report, rows, run.out)
    report["seconds"] = round(time.time() - t0, 1)
    write_json(run.out / "results_card.json", results_card(report, rows, run_meta(cfg, ec.models)))
    report["peak_rss_mb"] = peak_rss_mb()
    write_json(run.out / "report.json", report)
    not_run = {n: {"status": "not run", "reason": v["reason"]} for n, v in report["not_run"].items()}
    scored = {n: {"f1": round(m["f1"], 4), "f1_interval": [round(v, 4) for v in m["interval"]["f1"]],
                  "parse_rate": round(m["parse_rate"], 4), "schema_rate": round(m["schema_rate"], 4),
                  "relaxed_f1": round(m["relaxed_f1"], 4), "f1_fenced": round(m["f1_fenced"], 4),
                  "parse_rate_fenced": round(m["parse_rate_fenced"], 4)} for n, m in report["models"].items()}
    cache_rows = {n: {k: t.get(f, 0) + t.get("iepile", {}).get(f, 0)
                      for k, f in (("hits", "cached"), ("misses", "computed"), ("dropped", "dropped"))}
                  for n, t in report["timing"].items() if t["backend"] != "floor"}
    metrics = {"models": {n: scored.get(n) or not_run[n] for n in report["listed"]}, "not_run": sorted(not_run),
               "cache": {**report["cache"], "rows": cache_rows},
               "prompts": report["prompts"], "seconds": report["seconds"], "peak_rss_mb": report["peak_rss_mb"],
               "answers_per_s": {n: t["answers_per_s"] for n, t in report["timing"].items() if t["answers_per_s"]},
               "decided": [[c["a"], c["b"], round(c["f1_diff"], 4)] for c in report["comparisons"] if c["decided"]]}
    if "iepile" in report:
        iep = {n: {"f1": round(m["f1"], 4), "f1_interval": [round(v, 4) for v in m["interval"]],
                   "f1_set": round(m["f1_set"], 4), "parse_rate": round(m["parse_rate"], 4)}
               for n, m in report["iepile"]["models"].items()}
        metrics["iepile"] = {"prompts": report["iepile"]["prompts"], "records": report["iepile"]["records"],
                             "models": {n: iep.get(n) or not_run[n] for n in report["listed"]}}
    return metrics


def _needs(cfg, options: dict) -> tuple[str, ...]:
    """ie_data, plus every stage a model entry names (``hf``, ``ie_lora:<run>``, ...) and what those
    stages need themselves (ie_lora's base)."""
    from microlm.ie.evaluate import ref_stages

    known = REGISTRY["ie_eval"].upstream
    named = set().union(*(ref_stages(m, known) for m in cfg.ie_eval.models)) if cfg.ie_eval.models else set()
    if any(m.get("base_url") == "serve" for m in cfg.ie_eval.models):  # the course's vLLM server of serve.model
        named.update(ref_stages({"model": cfg.serve.model}, known))
    if "ie_lora" in named or "ie_merged" in named:
        named.update(ie_bases(cfg, options))
    return tuple(s for s in REGISTRY["ie_eval"].upstream if s in named | {"ie_data"})


STAGE = Stage(
    "ie_eval", "B4", "evaluate models on the IE prompts: parse rate, schema, strict and relaxed F1 with intervals",
    build=build, section=IEEvalConfig, check=check, upstream=("ie_data", "hf", "ie_lora", "ie_merged"), needs=_needs,
    sections=("ie_eval",),
    key=lambda cfg, o: {"ie_eval": stage_config(cfg, "ie_eval"), "all": bool(o.get("all")), "seed": cfg.seed,
                        "qwen": qwen_key(cfg, [m.get("model") for m in cfg.ie_eval.models])},
    outputs=("results.jsonl", "summary.md", "summary.csv", "failures.md", "metrics.png", "topic_f1.png",
             "answers.png", "results_card.json", "report.json"),
    files={"summary": "summary.md", "summary_csv": "summary.csv"},
    notebook="11_ie_eval",
    options=(Option("all", "the whole test split (first variant of each chunk) instead of the evaluation prompts",
                    flag=True),),
    summary=lambda m: f"{m['prompts']} prompts; " + "; ".join(
        f"{n}: not run" if "f1" not in r else
        f"{n}: F1 {r['f1']:.3f} [{r['f1_interval'][0]:.3f}, {r['f1_interval'][1]:.3f}], parse {r['parse_rate']:.2f}"
        for n, r in m["models"].items()))
