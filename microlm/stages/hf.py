"""Stage A8 ``hf``: a MicroLM model as a transformers/vLLM-loadable Llama folder, checked against ours.

Brings the ``generate`` section too (decoding defaults for ``generation_config.json`` and ``microlm chat``).
"""

from __future__ import annotations

from dataclasses import dataclass

from microlm.config import stage_config
from microlm.errors import ConfigError, MicroLMError
from microlm.infer.config import GenerationConfig
from microlm.stages.registry import Option, Stage, StageRun

EXPORT_SOURCES = ("sft", "pretrain", "lora")


@dataclass
class HFConfig:
    """Stage A8 export: which stage's model becomes the Hugging Face folder (``lora``: the SFT model
    with the adapter merged).  Sampling defaults for ``generation_config.json`` come from ``generate``."""

    source: str = "sft"


def check(cfg) -> None:
    try:
        cfg.generate.validate()
    except MicroLMError as e:
        raise ConfigError(f"generate: {e}") from None
    if cfg.hf.source not in EXPORT_SOURCES:
        raise ConfigError(f"hf.source must be one of {', '.join(EXPORT_SOURCES)}, got {cfg.hf.source!r}")


def build(run: StageRun) -> dict:
    """Export the ``source`` model (option, else ``hf.source``; ``lora``: the SFT model with the adapter
    merged) and check it; its manifest metrics."""
    from microlm.infer.verify import verify_export
    from microlm.io import write_json
    from microlm.model.hf_export import export_hf
    from microlm.model.load import load_model

    source = run.options.get("source") or run.cfg.hf.source
    model_dir = run.up["sft" if source == "lora" else source]
    adapter = run.up["lora"] / "adapter" if source == "lora" else None
    model, tok = load_model(model_dir, tokenizer=run.up["tokenizer"], adapter=adapter)
    export_hf(model, tok, run.out, run.cfg.generate, source={"stage": source, "folder": str(model_dir),
                                                             "adapter": str(adapter) if adapter else None})
    check = verify_export(run.out, model, tok)
    write_json(run.out / "report.json", {"source": source, "params": model.num_parameters(), "check": check})
    if check["checked"] and not (check["logits_max_abs_diff"] <= 1e-4 and check["greedy_tokens_equal"]
                                 and check["chat_template_equal"] and check["tokenizer_ids_equal"]):
        raise MicroLMError(f"the exported model does not match ours: {check}")
    return {"source": source, **{k: check.get(k) for k in ("checked", "logits_max_abs_diff", "greedy_tokens_equal")}}


STAGE = Stage(
    "hf", "A8", "export a model as a transformers/vLLM-loadable Llama folder",
    build=build, section=HFConfig, more_sections={"generate": GenerationConfig}, check=check,
    upstream=("tokenizer", "pretrain", "sft", "lora"),
    needs=lambda cfg, o: ("tokenizer",) + {"pretrain": ("pretrain",), "sft": ("sft",),
                                           "lora": ("sft", "lora")}[o.get("source") or cfg.hf.source],
    sections=("hf", "generate"),
    key=lambda cfg, o: {"source": o.get("source") or cfg.hf.source, "generate": stage_config(cfg, "generate")},
    outputs=("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json", "generation_config.json",
             "report.json"),
    notebook="08_inference_chat", aliases=("export-hf",),
    options=(Option("source", "which stage's model (default hf.source; lora: the SFT model with the adapter "
                    "merged)", choices=("sft", "pretrain", "lora")),),
    summary=lambda m: (f"({m['source']}) " + (f"transformers: max |Δlogit| {m['logits_max_abs_diff']:.1e}, greedy "
                                              f"tokens equal {m['greedy_tokens_equal']}" if m["checked"]
                                              else "not checked (no transformers)")))
