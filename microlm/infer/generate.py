"""Text generation with our TransformerLM — ``generate_text`` and the decode loop under it (chat,
training samples, the IE answers of a MicroLM model).

One loop serves everything: batched prompts (left-padded), greedy or sampled (temperature, top-k,
top-p, repetition penalty, seed), stop ids and stop strings, KV cache on by default (one prefill of
the prompts, then one-token decode steps) or off (the whole sequence again each step, for
comparison), and a streaming iterator whose text deltas never split a UTF-8 character.

The logits pipeline follows transformers' order (repetition penalty → temperature → top-k →
top-p), so the same settings mean the same thing in ``microlm chat`` and in ``model.generate``.
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterator
from dataclasses import dataclass, replace

import torch

from microlm.errors import MicroLMError
from microlm.infer.config import GenerationConfig
from microlm.tokenizer import stop_ids_of

__all__ = ["GenerationConfig", "Generation", "generate_ids", "generate_text", "stream_text", "process_logits",
           "fit_prompt", "stop_ids_of", "decode_steps"]

@dataclass
class Generation:
    """One finished generation: the new text and ids (stop id excluded; a stop string is cut from
    the text only), why it ended
    (``"stop"`` or ``"length"``), prompt size and how many prompt tokens were cut to fit."""

    text: str
    ids: list[int]
    finish_reason: str
    prompt_tokens: int
    prompt_truncated: int = 0
    seconds: float = 0.0

    @property
    def tokens_per_s(self) -> float:
        return len(self.ids) / self.seconds if self.seconds > 0 else 0.0


def fit_prompt(ids: list[int], max_new_tokens: int, context_len: int, mode: str) -> tuple[list[int], int]:
    """``(ids that fit, number cut from the left)``; one-line errors for what cannot work."""
    if not ids:
        raise MicroLMError("empty prompt: give at least one token of text")
    if max_new_tokens >= context_len:
        raise MicroLMError(f"max_new_tokens={max_new_tokens} leaves no room for a prompt in the model's "
                           f"context of {context_len} tokens")
    room = context_len - max_new_tokens
    if len(ids) <= room:
        return ids, 0
    if mode == "error":
        raise MicroLMError(f"prompt of {len(ids)} tokens + max_new_tokens={max_new_tokens} exceeds the model's "
                           f"context of {context_len} tokens (shorten it, or use context='truncate')")
    return ids[-room:], len(ids) - room


def process_logits(logits: torch.Tensor, gen: GenerationConfig, seen: torch.Tensor | None = None) -> torch.Tensor:
    """Repetition penalty (on ids in ``seen``, a ``(B, V)`` bool mask), temperature, top-k, top-p.
    Returns float32 logits with filtered entries at ``-inf`` (greedy: only the penalty is applied)."""
    logits = logits.float()
    if seen is not None and gen.repetition_penalty != 1.0:
        p = gen.repetition_penalty
        logits = torch.where(seen, torch.where(logits > 0, logits / p, logits * p), logits)
    if gen.temperature == 0:
        return logits
    logits = logits / gen.temperature
    if gen.top_k and gen.top_k < logits.shape[-1]:
        kth = torch.topk(logits, gen.top_k, dim=-1).values[..., -1:]  # (B, 1): each row's k-th largest
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if gen.top_p < 1.0:
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)  # (B, V) each; order: rank → id
        probs = sorted_logits.softmax(-1)
        # drop a token when the tokens ranked above it already hold top_p of the mass (the best stays)
        drop = (probs.cumsum(-1) - probs) >= gen.top_p
        drop[..., 0] = False
        # scatter maps drop from rank order back to id order
        logits = logits.masked_fill(torch.zeros_like(drop).scatter(-1, order, drop), float("-inf"))
    return logits


def _choose(logits: torch.Tensor, gen: GenerationConfig, generator: torch.Generator | None) -> torch.Tensor:
    if gen.temperature == 0:
        return logits.argmax(-1)
    return torch.multinomial(logits.softmax(-1), 1, generator=generator).squeeze(-1)


@torch.inference_mode()
def decode_steps(model, prompts: list[list[int]], gen: GenerationConfig, *, stop_ids: list[int] = (),
                 pad_id: int = 0, n_ids: int | None = None) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Yield ``(next ids (B,), finished (B,))`` once per new token.

    Prompts of different lengths are left-padded with ``pad_id``; a finished row keeps receiving
    ``pad_id`` (ignore it).  ``n_ids``: the tokenizer's size when the model's vocab is larger
    (padded embeddings): ids from ``n_ids`` on are never chosen.  The caller may stop iterating at
    any time (stop strings, Ctrl-C).
    """
    gen.validate()
    model.eval()
    dev = next(model.parameters()).device
    b = len(prompts)
    if not b or not all(prompts):
        raise MicroLMError("empty prompt: every prompt needs at least one token")
    longest = max(len(p) for p in prompts)
    if longest + gen.max_new_tokens > model.cfg.max_seq_len:
        raise MicroLMError(f"prompt of {longest} tokens + max_new_tokens={gen.max_new_tokens} exceeds the model's "
                           f"context of {model.cfg.max_seq_len} tokens")
    # left padding puts every prompt's last token in the last column, where each step reads the logits
    seq = torch.full((b, longest), pad_id, dtype=torch.long, device=dev)  # (B, longest) ids
    real = torch.zeros((b, longest), dtype=torch.bool, device=dev)  # (B, longest): True = not a pad
    for i, p in enumerate(prompts):
        seq[i, longest - len(p):] = torch.tensor(p, dtype=torch.long)
        real[i, longest - len(p):] = True
    padded = not bool(real.all())
    vocab = model.cfg.vocab_size
    seen = None
    if gen.repetition_penalty != 1.0:
        seen = torch.zeros((b, vocab), dtype=torch.bool, device=dev)  # (B, V): ids already in the row
        # a pad id may also be a real token of a padded row: count, so a pad's False never overwrites it
        seen |= torch.zeros((b, vocab), dtype=torch.int32, device=dev).scatter_add_(1, seq, real.to(torch.int32)) > 0
    generator = None
    if gen.temperature > 0:
        generator = torch.Generator(device=dev)
        generator.manual_seed(gen.seed if gen.seed is not None else int.from_bytes(os.urandom(7), "little"))
    stops = torch.tensor(list(stop_ids) if not gen.ignore_eos else [], dtype=torch.long, device=dev)
    done = torch.zeros(b, dtype=torch.bool, device=dev)  # (B,)
    # per layer (B, Hkv, longest + max_new_tokens, D): room for the prompts and every new token
    cache = model.new_cache(b, longest + gen.max_new_tokens) if gen.use_cache else None
    step_in = seq  # the first step is the prefill: (B, longest); then (B, 1)
    for _ in range(gen.max_new_tokens):
        mask = real if padded else None  # (B, S), S = tokens so far: the cached ones and step_in
        if cache is not None:
            logits, _ = model(step_in, cache=cache, pad_mask=mask)  # (B, longest, V), then (B, 1, V)
        else:
            logits, _ = model(seq, pad_mask=mask)  # (B, S, V): the whole sequence again
        last = logits[:, -1, :]  # (B, V): the next-token logits
        if n_ids is not None and n_ids < last.shape[-1]:
            last = last.clone()
            last[:, n_ids:] = float("-inf")
        nxt = _choose(process_logits(last, gen, seen), gen, generator)  # (B,)
        nxt = torch.where(done, torch.full_like(nxt, pad_id), nxt)
        if stops.numel():
            done = done | torch.isin(nxt, stops)
        yield nxt, done
        if bool(done.all()):
            return
        if seen is not None:
            seen[torch.arange(b, device=dev), nxt] = True
        step_in = nxt[:, None]  # (B, 1)
        seq = torch.cat([seq, step_in], dim=1)  # (B, S + 1)
        real = torch.cat([real, torch.ones((b, 1), dtype=torch.bool, device=dev)], dim=1)  # (B, S + 1)


def _stop_cut(text: str, stops: list[str]) -> int | None:
    hits = [text.find(s) for s in stops]
    hits = [h for h in hits if h >= 0]
    return min(hits) if hits else None


def _held_back(text: str, stops: list[str]) -> int:
    """Length of the longest tail of ``text`` that could still grow into a stop string."""
    best = 0
    for s in stops:
        for n in range(min(len(s) - 1, len(text)), best, -1):
            if s.startswith(text[-n:]):
                best = n
                break
    return best


def _prepare(model, tok, prompt, gen: GenerationConfig, chat: bool) -> tuple[list[int], int]:
    if isinstance(prompt, list):  # chat messages
        ids = tok.encode_chat(prompt, add_generation_prompt=True)
    elif not isinstance(prompt, str):
        raise MicroLMError(f"a prompt is text or a list of chat messages, got {type(prompt).__name__}")
    elif not prompt:
        raise MicroLMError("empty prompt: give at least one character of text")
    elif chat:
        ids = tok.encode_chat([{"role": "user", "content": prompt}], add_generation_prompt=True)
    else:  # raw text is untrusted: "<|im_end|>" in it stays characters (encode_ordinary)
        ids = tok.encode_ordinary(prompt)
    return fit_prompt(ids, gen.max_new_tokens, model.cfg.max_seq_len, gen.context)


def _gen_config(gen: GenerationConfig | None, overrides: dict) -> GenerationConfig:
    gen = gen or GenerationConfig()
    unknown = set(overrides) - set(GenerationConfig.__dataclass_fields__)
    if unknown:
        raise MicroLMError(f"unknown generation setting(s): {', '.join(sorted(unknown))}")
    return replace(gen, **overrides).validate()


def stream_text(model, tok, prompt, gen: GenerationConfig | None = None, *, chat: bool = False,
                result: dict | None = None, **overrides) -> Iterator[str]:
    """Yield the new text of one prompt piece by piece as it is generated.

    ``prompt``: text, or a list of chat messages (rendered with the ChatML template); ``chat=True``
    wraps a text prompt as one user message.  Deltas never split a UTF-8 character and never show
    a stop string (text that might be the start of one is held back until it is not).  If
    ``result`` is a dict it receives the finished ``Generation`` under ``"generation"``.
    """
    gen = _gen_config(gen, overrides)
    ids, cut = _prepare(model, tok, prompt, gen, chat)
    stops = stop_ids_of(tok)
    dec = tok.stream_decoder()
    text, shown, new = "", 0, []
    reason, at = "length", None
    t0 = time.perf_counter()
    for nxt, done in decode_steps(model, [ids], gen, stop_ids=stops, pad_id=tok.eos_id or 0,
                                    n_ids=tok.vocab_size):
        if bool(done[0]):
            reason = "stop"
            break
        t = int(nxt[0])
        new.append(t)
        text += dec.feed(t)
        at = _stop_cut(text, gen.stop) if gen.stop else None
        if at is not None:  # the stop string and anything after it are dropped
            text, reason = text[:at], "stop"
            break
        safe = len(text) - (_held_back(text, gen.stop) if gen.stop else 0)
        if safe > shown:
            yield text[shown:safe]
            shown = safe
    if reason == "length" or at is None:
        text += dec.flush()  # an unfinished character at the end becomes U+FFFD
    if len(text) > shown:
        yield text[shown:]
    if result is not None:
        result["generation"] = Generation(text, new, reason, len(ids), cut, time.perf_counter() - t0)


def generate_ids(model, prompts: list[list[int]], gen: GenerationConfig | None = None, *, stop_ids: list[int] = (),
                 pad_id: int = 0, **overrides) -> list[list[int]]:
    """New ids for each prompt (ids lists; batched, left-padded), stop id excluded."""
    gen = _gen_config(gen, overrides)
    outs: list[list] = [[] for _ in prompts]
    for nxt, done in decode_steps(model, prompts, gen, stop_ids=stop_ids, pad_id=pad_id):
        _collect(outs, nxt, done)
    return [[t for t in o if t is not None] for o in outs]


def _collect(outs: list[list], nxt: torch.Tensor, done: torch.Tensor) -> None:
    """Append this step's id to each unfinished row; a row's stop id is recorded as ``None`` once."""
    for i, (t, d) in enumerate(zip(nxt.tolist(), done.tolist(), strict=True)):
        if outs[i] and outs[i][-1] is None:
            continue
        outs[i].append(None if d else t)


def generate_text(model, tok, prompts, gen: GenerationConfig | None = None, *, chat: bool = False,
                  **overrides) -> Generation | list[Generation]:
    """Generate for one prompt (→ ``Generation``) or a list of prompts (→ list, one batch).

    Each prompt is text (``chat=True``: wrapped as a user message) or a list of chat messages.
    Text is encoded as plain characters (``encode_ordinary``): special-token strings a user types
    stay text; control tokens come only from the chat template.
    ``overrides`` are ``GenerationConfig`` fields, e.g. ``temperature=0, max_new_tokens=64``.
    """
    gen = _gen_config(gen, overrides)
    single = isinstance(prompts, str) or (isinstance(prompts, list) and prompts and isinstance(prompts[0], dict))
    batch = [prompts] if single else list(prompts)
    if not batch:
        raise MicroLMError("no prompts given")
    prepared = [_prepare(model, tok, p, gen, chat) for p in batch]
    stops = stop_ids_of(tok)
    outs: list[list] = [[] for _ in batch]
    texts = ["" for _ in batch]
    decs = [tok.stream_decoder() for _ in batch]
    cut_at: list[bool] = [False] * len(batch)
    t0 = time.perf_counter()
    for nxt, done in decode_steps(model, [p[0] for p in prepared], gen, stop_ids=stops, pad_id=tok.eos_id or 0,
                                    n_ids=tok.vocab_size):
        _collect(outs, nxt, done)
        if gen.stop:
            for i, o in enumerate(outs):
                if cut_at[i] or o[-1] is None:
                    continue
                texts[i] += decs[i].feed(o[-1])
                if _stop_cut(texts[i], gen.stop) is not None:
                    cut_at[i] = True
            if all(cut_at[i] or outs[i][-1] is None for i in range(len(batch))):
                break
    seconds = time.perf_counter() - t0
    results = []
    for i, o in enumerate(outs):
        ids = [t for t in o if t is not None]
        text = tok.decode(ids)
        reason = "stop" if (o and o[-1] is None) else "length"
        at = _stop_cut(text, gen.stop) if gen.stop else None
        if at is not None:
            text, reason = text[:at], "stop"
        results.append(Generation(text, ids, reason, len(prepared[i][0]), prepared[i][1], seconds))
    return results[0] if single else results
