"""Stage B6a ``serve_smoke``: serve the merged IE model with vLLM — health, models, an IE answer,
structured output, greedy parity with ``transformers`` (``microlm.serve.smoke``).

Brings the ``serve`` section (``microlm.stages.server``) that every serving stage and ``microlm serve`` read.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path

from microlm.errors import ConfigError, MicroLMError
from microlm.stages.registry import Stage, StageRun
from microlm.stages.server import ServeConfig, check_serve, serve_key, server_spec


@dataclass
class ServeSmokeConfig:
    """Stage B6a: checks of the served model, and greedy parity with ``transformers`` on the first
    ``parity_prompts`` evaluation prompts (0 = all)."""

    parity_prompts: int = 0
    max_tokens: int = 128
    structured_max_tokens: int = 512
    structured_max_items: int = 4  # the structured-output check's schema: pairs per relation …
    structured_max_chars: int = 64  # … and characters per entity (its longest legal answer must fit)


def check(cfg) -> None:
    check_serve(cfg.serve)
    sm = cfg.serve_smoke
    if sm.parity_prompts < 0 or sm.max_tokens < 1 or sm.structured_max_tokens < 1 or sm.structured_max_items < 1 \
            or sm.structured_max_chars < 1:
        raise ConfigError("serve_smoke: parity_prompts >= 0; max_tokens, structured_max_* >= 1")


def build(run: StageRun) -> dict:
    """Start vLLM on the merged folder and check it (see ``microlm.serve.smoke``); the hard checks fail
    the stage."""
    from transformers import AutoTokenizer

    from microlm.ie.evaluate import answer_cap, load_prompts
    from microlm.ie.metrics import json_schema_for, read_answer
    from microlm.infer.greedy import NEAR_TIE, top2_gap
    from microlm.io import write_json
    from microlm.serve.client import chat, request_json
    from microlm.serve.env import ensure_env
    from microlm.serve.server import ManagedServer
    from microlm.serve.smoke import compare_ids, hf_greedy, margin, served_ids

    cfg, sc = run.cfg, run.cfg.serve_smoke
    prompts, _ = load_prompts(run.up["ie_data"])
    prompts = prompts[:sc.parity_prompts] if sc.parity_prompts else prompts
    py = ensure_env(quiet=not run.progress)
    spec = server_spec(cfg, run.up)
    t0 = time.time()
    tok = AutoTokenizer.from_pretrained(spec.model)
    # the cap holds the longest gold answer (else an IE answer is cut by construction)
    max_tokens = answer_cap(lambda t: len(tok(t, add_special_tokens=False)["input_ids"]), prompts, sc.max_tokens)
    hf_out, hf_in, hf_model = hf_greedy(spec.model, [p["messages"] for p in prompts], max_tokens)
    hf_s = time.time() - t0
    gen = json.loads((Path(spec.model) / "generation_config.json").read_text(encoding="utf-8"))
    eos = gen.get("eos_token_id")
    stop_ids = {tok.convert_tokens_to_ids("<|im_end|>"), *([eos] if isinstance(eos, int) else (eos or []))}
    ctx = json.loads((Path(spec.model) / "config.json").read_text(encoding="utf-8")).get("max_position_embeddings", 4096)
    checks: dict = {}
    srv = ManagedServer(spec, run.out, python=py, name="vllm")
    t1 = time.time()
    srv.start(cfg.serve.startup_timeout_s)
    checks["startup_s"] = round(time.time() - t1, 1)
    with srv:
        base, key = srv.base_url, spec.api_key
        checks["health"] = srv.healthy()
        models = request_json(base + "/models", api_key=key)
        checks["models"] = [m["id"] for m in models.get("data", [])]
        first = prompts[0]
        r = chat(base, spec.served_name, first["messages"], max_tokens=max_tokens, api_key=key)
        text = r["choices"][0]["message"]["content"] or ""
        checks["ie_answer"] = {"text": text[:500], "error_class": read_answer(text, first["asked"])[1],
                               "finish_reason": r["choices"][0].get("finish_reason")}
        # the prompt asking the fewest relations; the schema's bounds keep the longest legal answer short
        easy = min(prompts, key=lambda p: (len(p["asked"]), len(p["input"])))
        schema = json_schema_for(easy["asked"], max_chars=sc.structured_max_chars, max_items=sc.structured_max_items)
        room = (spec.max_model_len or ctx) - len(tok.apply_chat_template(easy["messages"], add_generation_prompt=True,
                                                                          tokenize=True, return_dict=False))
        r = chat(base, spec.served_name, easy["messages"], max_tokens=max(1, min(sc.structured_max_tokens, room)),
                 api_key=key,
                 response_format={"type": "json_schema", "json_schema": {"name": "ie_answer", "schema": schema}})
        stext = r["choices"][0]["message"]["content"] or ""
        checks["structured"] = {"id": easy["id"], "schema_bounds": [sc.structured_max_items, sc.structured_max_chars],
                                "text": stext[:500], "error_class": read_answer(stext, easy["asked"])[1],
                                "finish_reason": r["choices"][0].get("finish_reason")}
        parity = []
        t2 = time.time()
        for p, ours, ins in zip(prompts, hf_out, hf_in, strict=True):
            resp = chat(base, spec.served_name, p["messages"], max_tokens=max_tokens, api_key=key, logprobs=True,
                        top_logprobs=1, return_tokens_as_token_ids=True, skip_special_tokens=True)
            theirs = served_ids(resp)
            while theirs and theirs[-1] in stop_ids:  # vLLM lists the stop token it ended on; transformers not
                theirs.pop()
            at = compare_ids(ours, theirs)
            row = {"id": p["id"], "identical": at is None, "hf_tokens": len(ours), "served_tokens": len(theirs)}
            if at is not None:  # a near-tie that rounding decided (top-2 gap < 1e-3), or a real difference
                gap = top2_gap(hf_model, ins + ours[:at])
                row.update(first_divergence=at, hf_text=tok.decode(ours), served_text=tok.decode(theirs),
                           margin=margin(hf_model, ins, ours[:at], ours[at] if at < len(ours) else None,
                                          theirs[at] if at < len(theirs) else None),
                           top2_gap=gap, near_tie=gap < NEAR_TIE)
            parity.append(row)
        served_s = time.time() - t2
        checks["server_rss_mb"] = round(srv.rss_mb(), 1)
    same = sum(r["identical"] for r in parity)
    report = {"model": spec.model, "served_name": spec.served_name, "dtype": spec.dtype, **checks,
              "parity": {"prompts": len(parity), "identical": same, "max_tokens": max_tokens,
                         "near_ties": sum(bool(r.get("near_tie")) for r in parity),
                         "hf_seconds": round(hf_s, 1), "served_seconds": round(served_s, 1),
                         "divergences": [r for r in parity if not r["identical"]]},
              "log": str(srv.log_path.relative_to(run.out))}
    write_json(run.out / "report.json", report)
    problems = []
    if not checks["health"]:
        problems.append("/health did not answer 200")
    if spec.served_name not in checks["models"]:
        problems.append(f"/v1/models lists {checks['models']}, not {spec.served_name}")
    if checks["structured"]["error_class"] != "ok":
        problems.append(f"the structured-output answer is {checks['structured']['error_class']}")
    if problems:
        raise MicroLMError("serve_smoke failed: " + "; ".join(problems) + f" (see {run.out / 'report.json'})")
    return {"identical": same, "prompts": len(parity), "near_ties": report["parity"]["near_ties"],
            "structured": checks["structured"]["error_class"],
            "ie_answer": checks["ie_answer"]["error_class"], "server_rss_mb": checks["server_rss_mb"]}


STAGE = Stage(
    "serve_smoke", "B6a", "serve the merged IE model with vLLM: health, models, an IE answer, structured output, "
    "greedy parity with transformers",
    build=build, section=ServeSmokeConfig, more_sections={"serve": ServeConfig}, check=check,
    upstream=("ie_data", "ie_merged"), sections=("serve_smoke", "serve"),
    key=lambda cfg, o: serve_key(cfg, "serve_smoke"),
    outputs=("report.json",), files={"log": "vllm.log"}, notebook="12_vllm",
    summary=lambda m: (f"structured output {m['structured']}, IE answer {m['ie_answer']}, greedy parity "
                       f"{m['identical']}/{m['prompts']}, server RSS {m['server_rss_mb']} MB"))
