"""The parity side of the ``serve_smoke`` stage (B6a): ``transformers``' greedy tokens of the served
folder, the token ids of a served answer, and the logit margin where the two first differ.

What the stage checks, recorded in ``report.json``: ``/health``; ``/v1/models`` lists the served
name; a chat completion on an IE prompt (whether it parses as JSON is recorded — a small model may
not write JSON); a **structured-output** request (``response_format: json_schema`` built from the asked
relations) whose answer must parse and comply; and **parity**: the served model's greedy tokens
equal ``transformers``' greedy tokens of the same folder on the evaluation prompts — token-exact, or
the first divergence is reported with both texts and the logit margin (``transformers``' logit of its
own token minus that of the served token) at that step.  The stage fails on the hard checks
(health, models, structured output); parity differences are reported, not hidden.
"""

from __future__ import annotations

import torch

from microlm.infer.greedy import chat_prompt_ids, first_divergence, greedy_ids

__all__ = ["hf_greedy", "served_ids", "compare_ids", "margin"]


@torch.no_grad()
def hf_greedy(folder: str, prompts: list[list[dict]], max_tokens: int, *, batch_size: int = 8):
    """``transformers`` greedy new ids (stop token excluded) and the prompt ids of ``folder`` in fp32
    (the served model is upcast to fp32 too: parity compares the same weights, not two dtypes), batched;
    ``(outputs, prompt ids, model)``."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(folder)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    ins = [chat_prompt_ids(tok, msgs) for msgs in prompts]
    return greedy_ids(model, tok, ins, max_tokens, batch_size=batch_size), ins, model


def served_ids(resp: dict) -> list[int]:
    """Token ids of a chat completion asked with ``logprobs`` + ``return_tokens_as_token_ids``."""
    content = ((resp["choices"][0].get("logprobs") or {}).get("content")) or []
    return [int(c["token"].split(":", 1)[1]) for c in content if c["token"].startswith("token_id:")]


compare_ids = first_divergence  # the index of the first differing token (None when equal)


@torch.no_grad()
def margin(model, prompt_ids: list[int], prefix: list[int], hf_tok: int | None, served_tok: int | None) -> float | None:
    """transformers' logit of its own token minus that of the served token, at the divergence."""
    if hf_tok is None or served_tok is None:
        return None
    logits = model(torch.tensor([prompt_ids + prefix])).logits[0, -1]
    return float(logits[hf_tok] - logits[served_tok])


