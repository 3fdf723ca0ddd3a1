"""Merging an IE LoRA adapter into its base → a verified Hugging Face folder (what the ``ie_merged``
stage, B5, runs for each adapter).

The base is loaded un-quantized in fp32, the adapter applied and folded in (``merge_and_unload``),
and the folder written atomically **in the base's own dtype** (a bf16 base stays bf16: 1 GB, not
2 GB, for Qwen2.5-0.5B): safetensors (sharded above ``max_shard_size``), tokenizer files with the chat
template the adapter was trained with, a ``generation_config.json`` whose EOS includes ``<|im_end|>``
(else generation runs on past the answer), tied embeddings kept tied (one tensor on disk,
``tie_word_embeddings`` unchanged) and a model card.  Before the folder replaces the old one it is
**verified** in batches, with progress: in fp32, the merged logits equal base + adapter logits
(≤ ``logits_atol``) on every evaluation prompt and the greedy answers on the first
``greedy_prompts`` are the same (a divergence must be a near-tie: top-2 logit gap < 1e-3); the
saved folder, reloaded, reports what the cast to its dtype moved (max |Δlogit|, greedy agreement —
reported, not gated); the file list is complete and the chat template is the training one;
otherwise the merge fails and nothing is written.
"""

from __future__ import annotations

import copy
import json
import re
import time
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from tqdm.auto import tqdm

from microlm.errors import MicroLMError
from microlm.hw import peak_rss_mb, reset_peak_rss
from microlm.ie.train_lora import load_base, load_tokenizer, resolve_base
from microlm.infer.greedy import NEAR_TIE, eos_ids, first_divergence, greedy_ids, max_logit_diff, top2_gap
from microlm.io import staged_dir, staged_writes, write_json
from microlm.model.checkpoint import config_diff
from microlm.paths import display_path

__all__ = ["adapter_dtype", "check_adapter_base", "merge_adapter", "verify_merged", "model_card",
           "greedy_answers", "saved_dtype", "REQUIRED_FILES"]

REQUIRED_FILES = ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json", "README.md")


def adapter_dtype(adapter_dir: Path) -> torch.dtype:
    """The dtype the adapter's tensors were saved in (the merge loads the base in it)."""
    path = Path(adapter_dir) / "adapter_model.safetensors"
    if not path.is_file():
        raise MicroLMError(f"adapter file missing: {path}")
    try:
        with safe_open(str(path), "pt") as f:
            keys = list(f.keys())
            tensors = [f.get_tensor(k) for k in keys]  # every one: a cut file fails here, not in the merge
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        raise MicroLMError(f"corrupt safetensors file {path}: {str(e).splitlines()[0][:200]} — the adapter is "
                           f"damaged; train it again (`microlm ie-lora --force`)") from None
    if not keys:
        raise MicroLMError(f"{path} holds no tensors")
    return tensors[0].dtype


def check_adapter_base(adapter_dir: Path, base_config: dict) -> None:
    """An adapter trained on another base is refused with the differing config fields listed
    (``base_config.json`` is saved beside the adapter by ``ie_lora``)."""
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


def greedy_answers(model, tok, prompts: list[list[int]], max_new_tokens: int, *, batch_size: int = 8) -> list[str]:
    """Greedy answers (decoded, special tokens dropped), stopping at ``<|im_end|>`` or EOS."""
    with torch.no_grad():
        ids = greedy_ids(model.eval(), tok, prompts, max_new_tokens, batch_size=batch_size)
    return [tok.decode(a, skip_special_tokens=True) for a in ids]


def _agreement(a: list[list[int]], b: list[list[int]], prompts: list[list[int]], judge) -> dict:
    """How two models' greedy answers agree; each divergence with ``judge``'s top-2 logit gap there."""
    rows = []
    for i, (x, y) in enumerate(zip(a, b, strict=True)):
        at = first_divergence(x, y)
        if at is not None:
            gap = top2_gap(judge, list(prompts[i]) + list(x[:at])) if at < len(x) else None
            rows.append({"prompt": i, "at": at, "top2_gap": gap, "near_tie": gap is not None and gap < NEAR_TIE})
    return {"prompts": len(a), "identical": len(a) - len(rows), "divergences": rows}


def _bar(total: int, desc: str, progress: bool):
    return tqdm(total=total, desc=desc, disable=not progress, leave=False, unit="prompt")


@torch.no_grad()
def check_merge(reference, merged, tok, prompts: list[list[int]], *, max_new_tokens: int,
                greedy_prompts: int | None = None, batch_size: int = 4, progress: bool = False) -> dict:
    """The merge in fp32: ``merged``'s logits against ``reference``'s (base + adapter, unmerged) on
    every prompt, and both models' greedy answers on the first ``greedy_prompts`` (the reference's are
    kept for the folder's check)."""
    pad = tok.pad_token_id if tok.pad_token_id is not None else 0
    bar = _bar(len(prompts), "ie_merged logits (fp32)", progress)
    (diff,) = max_logit_diff(reference, [merged], prompts, pad_id=pad, batch_size=batch_size, progress=bar.update)
    bar.close()
    g = prompts[:greedy_prompts] if greedy_prompts else prompts
    bar = _bar(2 * len(g), "ie_merged greedy (fp32)", progress)
    ours = greedy_ids(merged, tok, g, max_new_tokens, batch_size=2 * batch_size, progress=bar.update)
    theirs = greedy_ids(reference, tok, g, max_new_tokens, batch_size=2 * batch_size, progress=bar.update)
    bar.close()
    agree = _agreement(ours, theirs, g, reference)
    return {"logits_max_abs_diff": diff, "logits_prompts": len(prompts), "greedy_prompts": len(g),
            "greedy_identical": agree["identical"], "greedy_divergences": agree["divergences"],
            "first_divergence": agree["divergences"][0]["prompt"] if agree["divergences"] else None,
            "_reference_greedy": theirs}


@torch.no_grad()
def verify_merged(folder: Path, reference, tok, prompts: list[list[int]], merge: dict, *, logits_atol: float,
                  max_new_tokens: int, train_template: str, batch_size: int = 4, progress: bool = False) -> dict:
    """Gate the merge and report the saved folder.

    ``merge`` (``check_merge``): fp32 logits within ``logits_atol``, greedy answers identical except
    near-ties — these gate.  ``folder`` (reloaded from disk in the dtype it was saved in): its max
    |Δlogit| and greedy agreement against base + adapter in fp32 are *reported* (a bf16 cast moves
    logits by ~0.1 and may flip a close greedy choice: the dtype's price, not a broken merge); files,
    chat template and EOS ids gate."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    saved = AutoModelForCausalLM.from_pretrained(folder, dtype="auto").eval()
    pad = tok.pad_token_id if tok.pad_token_id is not None else 0
    bar = _bar(len(prompts), f"ie_merged logits ({str(saved.dtype).replace('torch.', '')} folder)", progress)
    (cast_diff,) = max_logit_diff(reference, [saved], prompts, pad_id=pad, batch_size=batch_size, progress=bar.update)
    bar.close()
    theirs = merge.pop("_reference_greedy")
    g = prompts[:len(theirs)]
    bar = _bar(len(g), "ie_merged greedy (folder)", progress)
    cast = greedy_ids(saved, tok, g, max_new_tokens, batch_size=2 * batch_size, progress=bar.update)
    bar.close()
    cast_agree = _agreement(cast, theirs, g, reference)
    del saved
    files = sorted(p.name for p in folder.iterdir())
    missing = [f for f in REQUIRED_FILES if f not in files]
    if not any(f.endswith(".safetensors") for f in files):
        missing.append("*.safetensors")
    template = AutoTokenizer.from_pretrained(folder).chat_template
    gen = json.loads((folder / "generation_config.json").read_text(encoding="utf-8"))
    eos = gen.get("eos_token_id")
    eos = [eos] if isinstance(eos, int) else list(eos or [])
    conf = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    checks = {**merge, "logits_atol": logits_atol, "saved_dtype": conf.get("dtype") or conf.get("torch_dtype"),
              "cast_logits_max_abs_diff": cast_diff, "cast_greedy_identical": cast_agree["identical"],
              "cast_greedy_divergences": cast_agree["divergences"],
              "files": files, "missing_files": missing, "chat_template_equal": template == train_template,
              "eos_includes_im_end": tok.convert_tokens_to_ids("<|im_end|>") in eos,
              "tie_word_embeddings": conf.get("tie_word_embeddings"),
              "answers": [tok.decode(a, skip_special_tokens=True) for a in cast]}  # the saved folder's, greedy
    problems = []
    if merge["logits_max_abs_diff"] > logits_atol:
        problems.append(f"merged logits differ from base + adapter by {merge['logits_max_abs_diff']:.2e} > {logits_atol:g}")
    real = [d for d in merge["greedy_divergences"] if not d["near_tie"]]
    if real:
        problems.append(f"greedy answers differ on {len(real)} of {merge['greedy_prompts']} prompts beyond a near-tie "
                        f"(first: #{real[0]['prompt']}, top-2 gap {real[0]['top2_gap']})")
    if missing:
        problems.append(f"files missing: {', '.join(missing)}")
    if not checks["chat_template_equal"]:
        problems.append("the saved chat template is not the one the adapter was trained with")
    if not checks["eos_includes_im_end"]:
        problems.append("generation_config.json's eos_token_id does not include <|im_end|>")
    if problems:
        raise MicroLMError("merge verification failed: " + "; ".join(problems))
    return checks


def saved_dtype(base_config) -> torch.dtype:
    """The dtype the base's weights are published in (its config's ``dtype``/``torch_dtype``; fp32 if
    unstated): the merged folder keeps it, so a bf16 base does not come back twice its size."""
    name = getattr(base_config, "dtype", None) or getattr(base_config, "torch_dtype", None)
    if isinstance(name, str):
        name = getattr(torch, name, None)
    return name if isinstance(name, torch.dtype) and name.is_floating_point else torch.float32


def merge_adapter(base: str, adapter_dir: Path, out_dir: Path, *, prompts: list[list[int]], logits_atol: float = 1e-4,
                  max_new_tokens: int = 64, max_shard_size: str = "2GB", card: dict | None = None,
                  greedy_prompts: int | None = None, batch_size: int = 4, progress: bool = False,
                  extra: dict | None = None) -> dict:
    """Merge ``adapter_dir`` (PEFT format) into ``base`` in fp32, save it in the base's own dtype and
    write ``out_dir`` atomically, verified (``verify_merged``); the report (also ``out_dir/report.json``,
    with ``extra`` added).  Interrupted (Ctrl-C, SIGTERM), the staging folder is removed at once; after
    a SIGKILL the next run removes it."""
    from peft import PeftModel

    t0 = time.time()
    reset_peak_rss()
    if not prompts:  # a merge checked on nothing would pass unverified
        raise MicroLMError("no evaluation prompt to verify the merge on: ie_data's 06_eval_prompts.jsonl is empty — "
                           "rebuild ie_data with test examples (ie_data.test_fraction, eval_prompts)")
    adapter_dir = Path(adapter_dir)
    adapter_dtype(adapter_dir)  # the adapter file is there and holds tensors
    from transformers import AutoConfig

    model = load_base(base, torch.float32)  # refuses a quantized base; fp32: the merge and its check are exact
    keep_dtype = saved_dtype(AutoConfig.from_pretrained(resolve_base(base)))  # as published, not as loaded
    check_adapter_base(adapter_dir, model.config.to_dict())
    tok = (load_tokenizer(str(adapter_dir), weights=False) if (adapter_dir / "tokenizer_config.json").is_file()
           else load_tokenizer(base))  # the tokenizer (and chat template) the adapter was trained with
    try:
        peft_model = PeftModel.from_pretrained(model, adapter_dir)
    except (RuntimeError, ValueError, KeyError, OSError) as e:
        raise MicroLMError(f"adapter {adapter_dir} does not fit base {base}: {str(e).splitlines()[0]}") from None
    reference = copy.deepcopy(peft_model).eval()  # base + adapter, unmerged, for the checks
    tied = bool(getattr(model.config, "tie_word_embeddings", False))
    merged = peft_model.merge_and_unload().eval()
    if tied:
        merged.tie_weights()
    train_template = tok.chat_template
    merge = check_merge(reference, merged, tok, prompts, max_new_tokens=max_new_tokens, greedy_prompts=greedy_prompts,
                        batch_size=batch_size, progress=progress)
    with staged_dir(out_dir) as tmp:  # a failure anywhere below (a full disk, the checks) leaves no folder
        merged.to(keep_dtype)  # in place: the fp32 copy is not needed any more
        merged.config.dtype = keep_dtype
        with staged_writes(tmp, out_dir, "writing the merged model"):  # the failed file named, as in out_dir
            merged.save_pretrained(tmp, max_shard_size=max_shard_size, safe_serialization=True)
            tok.save_pretrained(tmp)
            gen = json.loads((tmp / "generation_config.json").read_text(encoding="utf-8")) if (
                tmp / "generation_config.json").is_file() else {}
            gen["eos_token_id"] = eos_ids(tok, merged)  # before ``merged`` is released below
            gen.setdefault("pad_token_id", tok.pad_token_id)
            (tmp / "generation_config.json").write_text(json.dumps(gen, indent=2), encoding="utf-8")
            info = card or {}
            (tmp / "README.md").write_text(model_card(base=base, adapter=adapter_dir, lora=info.get("lora", {}),
                                                      data=info.get("data", {}), evals=info.get("evals"),
                                                      license_=info.get("license")), encoding="utf-8")
        del merged, peft_model, model
        checks = verify_merged(tmp, reference, tok, prompts, merge, logits_atol=logits_atol,
                               max_new_tokens=max_new_tokens, train_template=train_template, batch_size=batch_size,
                               progress=progress)
        report = {"base": base, "adapter": str(adapter_dir), "dtype": checks["saved_dtype"], "tied_embeddings": tied,
                  **checks, "seconds": round(time.time() - t0, 1), "peak_rss_mb": peak_rss_mb(), **(extra or {})}
        with staged_writes(tmp, out_dir, "writing the merge report"):
            write_json(tmp / "report.json", report)
    return report


def base_license(base: str) -> str | None:
    """The ``license:`` of a local base folder's model card front matter (None when not stated)."""
    card = Path(base) / "README.md"
    if not card.is_file():
        return None
    m = re.search(r"^---\s*$(.*?)^---\s*$", card.read_text(encoding="utf-8", errors="replace"), re.M | re.S)
    lic = re.search(r"^license:\s*(\S+)", m.group(1), re.M) if m else None
    return lic.group(1) if lic else None


