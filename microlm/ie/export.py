"""Stage B5 (``microlm ie-merged``): merge an IE LoRA adapter into its base → a Hugging Face folder.

The base is loaded un-quantized in the adapter's dtype, the adapter applied and folded in
(``merge_and_unload``), and the folder written atomically: safetensors (sharded above
``max_shard_size``), tokenizer files with the chat template the adapter was trained with, a
``generation_config.json`` whose EOS includes ``<|im_end|>`` (else generation runs on past the
answer), tied embeddings kept tied (one tensor on disk, ``tie_word_embeddings`` unchanged) and a model
card.  Before the folder replaces the old one it is **verified**: reloaded from disk, its logits equal
base + adapter logits (≤ ``logits_atol`` in fp32) on real IE prompts, its greedy answers equal
theirs on the evaluation prompts, the file list is complete and the chat template is the training
one; otherwise the merge fails and nothing is written.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import torch

from microlm.errors import MicroLMError
from microlm.paths import display_path

__all__ = ["adapter_dtype", "check_adapter_base", "merge_adapter", "verify_merged", "model_card",
           "greedy_answers", "REQUIRED_FILES"]

REQUIRED_FILES = ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json", "README.md")


def adapter_dtype(adapter_dir: Path) -> torch.dtype:
    """The dtype the adapter's tensors were saved in (the merge loads the base in it)."""
    from safetensors import safe_open

    path = Path(adapter_dir) / "adapter_model.safetensors"
    if not path.is_file():
        raise MicroLMError(f"adapter file missing: {path}")
    with safe_open(str(path), "pt") as f:
        keys = list(f.keys())
        if not keys:
            raise MicroLMError(f"{path} holds no tensors")
        return f.get_tensor(keys[0]).dtype


def check_adapter_base(adapter_dir: Path, base_config: dict) -> None:
    """An adapter trained on another base is refused with the differing config fields listed
    (``base_config.json`` is saved beside the adapter by ``ie_lora``)."""
    from microlm.model.checkpoint import config_diff

    saved_path = Path(adapter_dir) / "base_config.json"
    if not saved_path.is_file():
        return
    saved = json.loads(saved_path.read_text(encoding="utf-8"))
    keys = ("model_type", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
            "num_key_value_heads", "vocab_size", "tie_word_embeddings", "rope_theta")
    diffs = config_diff({k: saved.get(k) for k in keys}, {k: base_config.get(k) for k in keys})
    if diffs:
        raise MicroLMError(f"adapter {adapter_dir} was trained on another base model: " + "; ".join(
            d.replace("(checkpoint)", "(adapter's base)").replace("(config)", "(this base)") for d in diffs))


def model_card(*, base: str, adapter: Path, lora: dict, data: dict, evals: dict | None, license_: str | None) -> str:
    base = display_path(base)  # a local base folder relative to the project, not this machine's absolute path
    lines = [f"# {adapter.parent.name} — IE LoRA merged into {base}", "",
             "Relation extraction (InstructIE-style JSON answers), made by the MicroLM course (stage B5).", "",
             f"- base model: `{base}`" + (f" (license: {license_})" if license_ else ""),
             f"- LoRA: r = {lora.get('r')}, alpha = {lora.get('alpha')}, dropout = {lora.get('dropout')}, "
             f"targets = {', '.join(lora.get('targets', []))}",
             f"- data: {data.get('kept', '?')} training conversations from the ie_data stage "
             f"({data.get('dropped_over_cutoff', 0)} over the cutoff dropped)", ""]
    if evals:
        lines += ["## Evaluation", "", "| metric | value |", "|---|---|"]
        lines += [f"| {k} | {v} |" for k, v in evals.items()]
    else:
        lines += ["No evaluation numbers yet (stage B4 adds them)."]
    lines += ["", "Prompt with the tokenizer's chat template (ChatML); generation stops at `<|im_end|>`."]
    return "\n".join(lines) + "\n"


@torch.no_grad()
def _greedy(model, tok, prompts: list[list[int]], max_new_tokens: int) -> list[list[int]]:
    eos = _eos_ids(tok, model)
    out = []
    for ids in prompts:
        x = torch.tensor([ids])
        gen = model.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=max_new_tokens, do_sample=False,
                             eos_token_id=eos, pad_token_id=tok.pad_token_id)
        out.append(gen[0, len(ids):].tolist())
    return out


def greedy_answers(model, tok, prompts: list[list[int]], max_new_tokens: int) -> list[str]:
    """Greedy answers (decoded, special tokens dropped), stopping at ``<|im_end|>`` or EOS."""
    with torch.no_grad():
        return [tok.decode(a, skip_special_tokens=True) for a in _greedy(model.eval(), tok, prompts, max_new_tokens)]


def _eos_ids(tok, model=None) -> list[int]:
    ids = {tok.convert_tokens_to_ids("<|im_end|>")}
    if tok.eos_token_id is not None:
        ids.add(tok.eos_token_id)
    gen_eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    ids.update([gen_eos] if isinstance(gen_eos, int) else (gen_eos or []))
    return sorted(i for i in ids if i is not None)


@torch.no_grad()
def verify_merged(folder: Path, reference, tok, prompts: list[list[int]], *, logits_atol: float,
                  max_new_tokens: int, train_template: str) -> dict:
    """Reload ``folder`` and compare with ``reference`` (base + adapter, unmerged): logits on
    ``prompts``, greedy answers, files, chat template.  The checks' numbers; raises when one fails."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    merged = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    reference = reference.float().eval()
    diff = 0.0
    for ids in prompts:
        x = torch.tensor([ids])
        diff = max(diff, float((merged(x).logits - reference(x).logits).abs().max()))
    ours, theirs = _greedy(merged, tok, prompts, max_new_tokens), _greedy(reference, tok, prompts, max_new_tokens)
    same = sum(a == b for a, b in zip(ours, theirs, strict=True))
    first = next((i for i, (a, b) in enumerate(zip(ours, theirs, strict=True)) if a != b), None)
    files = sorted(p.name for p in folder.iterdir())
    missing = [f for f in REQUIRED_FILES if f not in files]
    if not any(f.endswith(".safetensors") for f in files):
        missing.append("*.safetensors")
    template = AutoTokenizer.from_pretrained(folder).chat_template
    gen = json.loads((folder / "generation_config.json").read_text(encoding="utf-8"))
    eos = gen.get("eos_token_id")
    eos = [eos] if isinstance(eos, int) else list(eos or [])
    conf = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    checks = {"logits_max_abs_diff": diff, "logits_atol": logits_atol, "greedy_prompts": len(prompts),
              "greedy_identical": same, "first_divergence": first, "files": files, "missing_files": missing,
              "chat_template_equal": template == train_template,
              "eos_includes_im_end": tok.convert_tokens_to_ids("<|im_end|>") in eos,
              "tie_word_embeddings": conf.get("tie_word_embeddings"),
              "answers": [tok.decode(a, skip_special_tokens=True) for a in ours]}  # the merged model's, greedy
    problems = []
    if diff > logits_atol:
        problems.append(f"merged logits differ from base + adapter by {diff:.2e} > {logits_atol:g}")
    if same != len(prompts):
        problems.append(f"greedy answers differ on {len(prompts) - same} of {len(prompts)} prompts (first: #{first})")
    if missing:
        problems.append(f"files missing: {', '.join(missing)}")
    if not checks["chat_template_equal"]:
        problems.append("the saved chat template is not the one the adapter was trained with")
    if not checks["eos_includes_im_end"]:
        problems.append("generation_config.json's eos_token_id does not include <|im_end|>")
    if problems:
        raise MicroLMError("merge verification failed: " + "; ".join(problems))
    return checks


def merge_adapter(base: str, adapter_dir: Path, out_dir: Path, *, prompts: list[list[int]], logits_atol: float = 1e-4,
                  max_new_tokens: int = 64, max_shard_size: str = "2GB", card: dict | None = None) -> dict:
    """Merge ``adapter_dir`` (PEFT format) into ``base`` and write ``out_dir`` atomically, verified
    (see the module doc); the report (also ``out_dir/report.json``)."""
    import copy

    from peft import PeftModel

    from microlm.ie.train_lora import load_base, load_tokenizer
    from microlm.io import staged_dir, write_json

    t0 = time.time()
    adapter_dir = Path(adapter_dir)
    dtype = adapter_dtype(adapter_dir)
    model = load_base(base, dtype)  # refuses a quantized base
    check_adapter_base(adapter_dir, model.config.to_dict())
    tok = (load_tokenizer(str(adapter_dir), weights=False) if (adapter_dir / "tokenizer_config.json").is_file()
           else load_tokenizer(base))  # the tokenizer (and chat template) the adapter was trained with
    try:
        peft_model = PeftModel.from_pretrained(model, adapter_dir)
    except (RuntimeError, ValueError, KeyError) as e:
        raise MicroLMError(f"adapter {adapter_dir} does not fit base {base}: {str(e).splitlines()[0]}") from None
    reference = copy.deepcopy(peft_model)  # base + adapter, unmerged, for the checks
    tied = bool(getattr(model.config, "tie_word_embeddings", False))
    merged = peft_model.merge_and_unload()
    if tied:
        merged.tie_weights()
    train_template = tok.chat_template
    with staged_dir(out_dir) as tmp:
        merged.save_pretrained(tmp, max_shard_size=max_shard_size, safe_serialization=True)
        tok.save_pretrained(tmp)
        gen = json.loads((tmp / "generation_config.json").read_text(encoding="utf-8")) if (
            tmp / "generation_config.json").is_file() else {}
        gen["eos_token_id"] = _eos_ids(tok, merged)
        gen.setdefault("pad_token_id", tok.pad_token_id)
        (tmp / "generation_config.json").write_text(json.dumps(gen, indent=2), encoding="utf-8")
        info = card or {}
        (tmp / "README.md").write_text(model_card(base=base, adapter=adapter_dir, lora=info.get("lora", {}),
                                                  data=info.get("data", {}), evals=info.get("evals"),
                                                  license_=info.get("license")), encoding="utf-8")
        checks = verify_merged(tmp, reference, tok, prompts, logits_atol=logits_atol, max_new_tokens=max_new_tokens,
                               train_template=train_template)
        report = {"base": base, "adapter": str(adapter_dir), "dtype": str(dtype).replace("torch.", ""),
                  "tied_embeddings": tied, **checks, "seconds": round(time.time() - t0, 1)}
        write_json(tmp / "report.json", report)
    return report


def base_license(base: str) -> str | None:
    """The ``license:`` of a local base folder's model card front matter (None when not stated)."""
    import re

    card = Path(base) / "README.md"
    if not card.is_file():
        return None
    m = re.search(r"^---\s*$(.*?)^---\s*$", card.read_text(encoding="utf-8", errors="replace"), re.M | re.S)
    lic = re.search(r"^license:\s*(\S+)", m.group(1), re.M) if m else None
    return lic.group(1) if lic else None


def build(run) -> dict | None:
    """The ``ie_merged`` stage: each ``ie_lora`` run's adapter merged into its base →
    ``<stage>/<name>/`` (verified; see ``merge_adapter``); manifest metrics per run."""
    from microlm.ie.lora_data import ChatEncoder
    from microlm.ie.train_lora import base_of, load_tokenizer, read_lines
    from microlm.io import read_json, write_json

    cfg, mc = run.cfg, run.cfg.ie_merged
    lines = read_lines(run.up["ie_data"] / "06_eval_prompts.jsonl")
    out = {}
    for entry in cfg.ie_lora.runs:
        if mc.runs is not None and entry["name"] not in mc.runs:
            continue
        base = base_of(entry, run.up.get("hf"))
        lora_dir = run.up["ie_lora"] / entry["name"]
        rep = read_json(lora_dir / "report.json")
        enc = ChatEncoder(load_tokenizer(str(lora_dir / "adapter"), weights=False))
        prompts = [enc.prompt_ids(line["messages"]) for line in lines]
        card = {"lora": {k: getattr(cfg.ie_lora, k) for k in ("r", "alpha", "dropout", "targets")},
                "data": rep.get("train_data", {}), "license": base_license(base), "evals": None}
        r = merge_adapter(base, lora_dir / "adapter", run.out / entry["name"], prompts=prompts,
                          logits_atol=mc.logits_atol, max_new_tokens=mc.max_new_tokens,
                          max_shard_size=mc.max_shard_size, card=card)
        out[entry["name"]] = {"logits_max_abs_diff": r["logits_max_abs_diff"], "greedy_identical": r["greedy_identical"],
                              "greedy_prompts": r["greedy_prompts"], "seconds": r["seconds"]}
    if not out:
        raise MicroLMError("ie_merged.runs names none of the ie_lora runs")
    write_json(run.out / "report.json", {"runs": out})
    return {"runs": out}
