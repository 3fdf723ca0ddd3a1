"""Greedy decoding and logit checks of ``transformers`` causal LMs, batched — one helper for the stages
that compare two models token by token (``ie_merged``: merged vs base + adapter, and the dtype the
folder is saved in; ``serve_smoke``: vLLM vs ``transformers``).

Batches are padded the way each check needs: **right** padding for logits (causal attention never
lets a real token see the pads after it, so a real position's logits are those of the prompt alone)
and **left** padding with an attention mask for generation (``generate`` derives the positions from
the mask), both tested equal to one prompt at a time.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

__all__ = ["NEAR_TIE", "eos_ids", "chat_prompt_ids", "greedy_ids", "max_logit_diff", "top2_gap", "first_divergence"]


NEAR_TIE = 1e-3  # a greedy divergence whose top-2 logit gap is below this is a tie that rounding decided


def eos_ids(tok, model=None) -> list[int]:
    """The ids generation stops at: ``<|im_end|>``, the tokenizer's EOS and the model's generation EOS."""
    ids = {tok.convert_tokens_to_ids("<|im_end|>")}
    if tok.eos_token_id is not None:
        ids.add(tok.eos_token_id)
    gen_eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    ids.update([gen_eos] if isinstance(gen_eos, int) else (gen_eos or []))
    return sorted(i for i in ids if i is not None and i != getattr(tok, "unk_token_id", None))


def chat_prompt_ids(tok, messages: list[dict]) -> list[int]:
    """The generation prompt of a conversation under the tokenizer's chat template."""
    out = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=False)
    return list(out["input_ids"]) if isinstance(out, dict) else list(out)


def _batches(n: int, size: int) -> list[range]:
    return [range(i, min(n, i + size)) for i in range(0, n, size)]


@torch.no_grad()
def greedy_ids(model, tok, prompts: Sequence[Sequence[int]], max_new_tokens: int, *, batch_size: int = 8,
               progress: Callable[[int], None] | None = None) -> list[list[int]]:
    """Greedy new token ids for each prompt (the stop token excluded), ``batch_size`` prompts per
    ``generate`` call, left-padded, longest prompts together."""
    eos = eos_ids(tok, model)
    pad = tok.pad_token_id if tok.pad_token_id is not None else eos[0]
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    out: list[list[int]] = [[] for _ in prompts]
    for part in _batches(len(order), batch_size):
        rows = [order[k] for k in part]
        width = max(len(prompts[i]) for i in rows)
        x = torch.full((len(rows), width), pad, dtype=torch.long)
        mask = torch.zeros_like(x)
        for r, i in enumerate(rows):
            x[r, width - len(prompts[i]):] = torch.tensor(list(prompts[i]))
            mask[r, width - len(prompts[i]):] = 1
        gen = model.generate(x.to(model.device), attention_mask=mask.to(model.device), max_new_tokens=max_new_tokens,
                             do_sample=False, eos_token_id=eos, pad_token_id=pad)[:, width:].tolist()
        for r, i in enumerate(rows):
            cut = next((k for k, t in enumerate(gen[r]) if t in eos), None)
            out[i] = gen[r][:cut] if cut is not None else gen[r]
        if progress:
            progress(len(rows))
    return out


@torch.no_grad()
def max_logit_diff(reference, others: Sequence, prompts: Sequence[Sequence[int]], *, pad_id: int,
                   batch_size: int = 4, progress: Callable[[int], None] | None = None) -> list[float]:
    """``max |logits(other) − logits(reference)|`` over every real position of every prompt (fp32
    comparison), for each model of ``others``; right-padded batches, one model's logits at a time
    beside the reference's."""
    out = [0.0] * len(others)
    for part in _batches(len(prompts), batch_size):
        width = max(len(prompts[i]) for i in part)
        x = torch.full((len(part), width), pad_id, dtype=torch.long)
        real = torch.zeros((len(part), width), dtype=torch.bool)
        for r, i in enumerate(part):
            x[r, :len(prompts[i])] = torch.tensor(list(prompts[i]))
            real[r, :len(prompts[i])] = True
        ref = reference(x.to(reference.device)).logits[real].float()
        for k, m in enumerate(others):
            got = m(x.to(m.device)).logits[real].float()
            out[k] = max(out[k], float(got.sub_(ref).abs_().max()))  # in place: one vocabulary-wide tensor less
            del got
        del ref
        if progress:
            progress(len(part))
    return out


@torch.no_grad()
def top2_gap(model, ids: Sequence[int]) -> float:
    """The margin of ``model``'s greedy choice after ``ids``: top-1 logit minus top-2 logit (fp32).
    Two decoders that agree on the weights can differ at a step only where this is tiny (a near-tie
    that rounding decides); a large gap at a divergence means they do not compute the same model."""
    logits = model(torch.tensor([list(ids)], device=model.device)).logits[0, -1].float()
    top = torch.topk(logits, 2).values
    return float(top[0] - top[1])


def first_divergence(a: Sequence[int], b: Sequence[int]) -> int | None:
    """Index of the first differing token (None when equal)."""
    for i, (x, y) in enumerate(zip(a, b, strict=False)):
        if x != y:
            return i
    return None if len(a) == len(b) else min(len(a), len(b))
