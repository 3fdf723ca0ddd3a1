"""The check that transformers computes what we compute on an exported folder (``verify_export``; the
``hf`` stage exports with ``microlm.model.hf_export`` and checks with this)."""

from __future__ import annotations

from pathlib import Path

import torch

from microlm.infer.generate import generate_ids
from microlm.tokenizer import render_chat

__all__ = ["verify_export", "VERIFY_PROMPTS"]

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


