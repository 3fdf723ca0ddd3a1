"""Stage A8, the ``hf`` stage: a model of the course as a transformers/vLLM-loadable Llama folder, and
the check that transformers computes what we compute (``verify_export``)."""

from __future__ import annotations

from pathlib import Path

import torch

from microlm.errors import MicroLMError
from microlm.infer.generate import generate_ids
from microlm.io import write_json
from microlm.model.hf_export import export_hf
from microlm.model.load import load_model
from microlm.runs import StageRun
from microlm.tokenizer import render_chat

__all__ = ["verify_export", "build", "VERIFY_PROMPTS"]

VERIFY_PROMPTS = ["中国的首都是哪里？", "请写一首关于春天的短诗。", "Hello, how are you? 你好！"]


def verify_export(folder: str | Path, model, tok, prompts: list[str] = VERIFY_PROMPTS, new_tokens: int = 32) -> dict:
    """Load ``folder`` with transformers and compare it with ``model``/``tok``: chat-template text and
    ids, fp32 logits on each prompt, greedy tokens.  ``{"checked": False}`` without transformers."""
    try:
        import transformers
    except ImportError:
        return {"checked": False, "why": "transformers is not installed"}

    transformers.utils.logging.disable_progress_bar()  # the stage has its own -q; no loading bars from here
    hf_model = transformers.AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32).eval()
    hf_tok = transformers.AutoTokenizer.from_pretrained(str(folder))
    worst, same_template, same_ids, same_greedy = 0.0, True, True, True
    for p in prompts:
        msgs = [{"role": "user", "content": p}]
        text = hf_tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
        same_template &= text == render_chat(msgs, add_generation_prompt=True)
        ids = tok.encode_chat(msgs, add_generation_prompt=True)
        same_ids &= hf_tok(text, add_special_tokens=False)["input_ids"] == ids
        x = torch.tensor([ids])
        n = min(new_tokens, model.cfg.max_seq_len - len(ids))
        with torch.no_grad():
            ours = model(x.to(next(model.parameters()).device))[0].float().cpu()
            theirs = hf_model(x).logits.float()
            g_hf = hf_model.generate(x, max_new_tokens=n, min_new_tokens=n, do_sample=False, eos_token_id=None,
                                     pad_token_id=tok.eos_id, repetition_penalty=1.0)[0, len(ids):].tolist()
        worst = max(worst, (ours - theirs).abs().max().item())
        g_ours = generate_ids(model, [ids], max_new_tokens=n, temperature=0, repetition_penalty=1.0,
                              ignore_eos=True)[0]
        same_greedy &= g_ours == g_hf
    return {"checked": True, "transformers": transformers.__version__, "prompts": len(prompts),
            "logits_max_abs_diff": worst, "greedy_tokens_equal": same_greedy, "greedy_tokens": new_tokens,
            "chat_template_equal": same_template, "tokenizer_ids_equal": same_ids}


def build(run: StageRun) -> dict:
    """The ``hf`` stage (registry entry in ``microlm.stages``): export the ``source`` model (option, else
    ``hf.source``; ``lora``: the SFT model with the adapter merged), check it, its manifest metrics."""
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
