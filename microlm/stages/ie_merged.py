"""Stage B5 ``ie_merged``: each IE adapter merged into its base — a verified Hugging Face folder per
run (``microlm.ie.merge``)."""

from __future__ import annotations

from dataclasses import dataclass

from microlm.config import resolve_model_name, stage_config
from microlm.errors import ConfigError, MicroLMError
from microlm.stages.ie_lora import base_key, base_of, ie_bases, runs_summary
from microlm.stages.registry import Stage, StageRun, get_stage, read_manifest


@dataclass
class IEMergedConfig:
    """Stage B5: merge each ``ie_lora`` run's adapter into its base (``runs``: which; null = all), save it
    in the base's dtype and verify it (fp32 logits within ``logits_atol`` of base + adapter on every
    evaluation prompt, greedy answers of up to ``max_new_tokens`` equal on ``greedy_prompts`` of them)."""

    runs: list[str] | None = None
    logits_atol: float = 1e-4
    max_new_tokens: int = 128
    greedy_prompts: int = 0  # greedy answers compared on the first N evaluation prompts (0 = all); logits: all
    batch_size: int = 4  # prompts per forward in the checks (logits: one batch's tokens × vocabulary in fp32)
    max_shard_size: str = "2GB"


def check(cfg) -> None:
    c, lora = cfg.ie_merged, cfg.ie_lora
    names = {r["name"] for r in lora.runs}
    unknown = sorted(set(c.runs or []) - names)
    if unknown:
        raise ConfigError(f"ie_merged.runs: {', '.join(unknown)} is not an ie_lora run ({', '.join(sorted(names))})")
    if c.logits_atol <= 0 or c.max_new_tokens < 1 or c.greedy_prompts < 0 or c.batch_size < 1:
        raise ConfigError("ie_merged: logits_atol > 0, max_new_tokens >= 1, greedy_prompts >= 0, batch_size >= 1")


def build(run: StageRun) -> dict | None:
    """The ``ie_merged`` stage: each ``ie_lora`` run's adapter merged into its base →
    ``<stage>/<name>/`` (verified; see ``merge_adapter``); manifest metrics per run.  A run's folder
    whose report carries the same adapter, base and settings is kept (``--force``: merged again)."""
    from microlm.ie.lora_data import ChatEncoder
    from microlm.ie.merge import base_license, merge_adapter
    from microlm.ie.train_lora import load_tokenizer, read_lines
    from microlm.io import fingerprint, folder_files, read_json, write_json

    cfg, mc = run.cfg, run.cfg.ie_merged
    lines = read_lines(run.up["ie_data"] / get_stage("ie_data").file("eval_prompts"))
    out = {}
    for entry in cfg.ie_lora.runs:
        if mc.runs is not None and entry["name"] not in mc.runs:
            continue
        base = base_of({**entry, "base": resolve_model_name(cfg, entry["base"])}, run.up.get("hf"))
        lora_dir = run.up["ie_lora"] / entry["name"]
        if not (lora_dir / "report.json").is_file():
            raise MicroLMError(f"ie_lora run {entry['name']!r} has no finished adapter in {lora_dir}: build ie_lora")
        rep = read_json(lora_dir / "report.json")
        fp = fingerprint({"adapter": fingerprint(folder_files(lora_dir / "adapter")), "base": base_key(entry, base),
                          "upstream": {u: (read_manifest(p) or {}).get("fingerprint") for u, p in sorted(run.up.items())
                                       if u == "hf"},
                          "ie_merged": {k: v for k, v in stage_config(cfg, "ie_merged").items() if k != "runs"},
                          "prompts": fingerprint(lines)})
        done = run.out / entry["name"] / "report.json"
        if not run.force and done.is_file() and read_json(done).get("fingerprint") == fp:
            r = read_json(done)
        else:
            enc = ChatEncoder(load_tokenizer(str(lora_dir / "adapter"), weights=False))
            prompts = [enc.prompt_ids(line["messages"]) for line in lines]
            card = {"lora": {k: getattr(cfg.ie_lora, k) for k in ("r", "alpha", "dropout", "targets")},
                    "data": rep.get("train_data", {}), "license": base_license(base), "evals": None}
            r = merge_adapter(base, lora_dir / "adapter", run.out / entry["name"], prompts=prompts,
                              logits_atol=mc.logits_atol, max_new_tokens=mc.max_new_tokens,
                              max_shard_size=mc.max_shard_size, card=card, greedy_prompts=mc.greedy_prompts or None,
                              batch_size=mc.batch_size, progress=run.progress, extra={"fingerprint": fp})
        out[entry["name"]] = {k: r.get(k) for k in (
            "logits_max_abs_diff", "greedy_identical", "greedy_prompts", "logits_prompts", "dtype",
            "cast_logits_max_abs_diff", "cast_greedy_identical", "seconds", "peak_rss_mb")}
    if not out:
        raise MicroLMError("ie_merged.runs names none of the ie_lora runs")
    write_json(run.out / "report.json", {"runs": out})
    return {"runs": out}


STAGE = Stage(
    "ie_merged", "B5", "merge each IE adapter into its base: a verified Hugging Face folder per run",
    build=build, section=IEMergedConfig, check=check, upstream=("ie_data", "hf", "ie_lora"),
    needs=lambda cfg, o: ie_bases(cfg, o) + ("ie_lora",), sections=("ie_merged",),
    outputs=("report.json",), files={"run": "{run}", "run_report": "{run}/report.json", "run_readme": "{run}/README.md",
                                     "run_generation_config": "{run}/generation_config.json"},
    notebook="10_qwen_lora",
    summary=lambda m: runs_summary(m, lambda r: (f"max |Δlogit| {r['logits_max_abs_diff']:.1e}, greedy identical "
                                                 f"{r['greedy_identical']}/{r['greedy_prompts']}")))
