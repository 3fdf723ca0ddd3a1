"""Stage B2, step 06 (render): derived examples → chat-format JSONL for Qwen2.5 and MicroLM.

Both models use ChatML (``<|im_start|>role\\ncontent<|im_end|>\\n``), so one file serves both: each
line holds ``messages`` (system, user = the instruction JSON string, assistant = the expected output
JSON string) that ``Tokenizer.encode_chat`` and Qwen2.5's ``apply_chat_template`` turn into the same
text.  A system message is always given, because Qwen2.5's template otherwise inserts its own
("You are Qwen, created by Alibaba Cloud…") and the two models would see different prompts.

Token lengths are measured per example under every tokenizer given (``TokenCounter``); an example
longer than the cutoff under the *target* tokenizer is dropped and counted — a cut-off answer would
teach the model to stop in the middle of a JSON string.  Lengths under the other tokenizers are
reported (e.g. how many examples exceed MicroLM's context), not acted on.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable

import numpy as np

from microlm.tokenizer.tokenizer import render_chat

__all__ = ["SYSTEM_PROMPTS", "ANSWER_FORMAT", "PROMPT_STYLES", "prompt_messages", "to_messages", "render_example",
           "parse_answer", "TokenCounter", "length_summary"]

SYSTEM_PROMPTS = {
    "zh": "你是一个信息抽取助手。请按照用户给出的schema从input中抽取关系三元组，只输出JSON字符串。",
    "en": "You are an information extraction assistant. Extract the relation triples of the given schema from "
          "the input and answer with a JSON string only.",
}


# what a model never trained on the answer format is told (the ``zero_shot`` prompt of ie_eval): the format
# itself, with a made-up example — the IE instruction alone names no keys
ANSWER_FORMAT = {
    "zh": ("回答格式：只输出一个JSON对象，不要代码块，不要解释。键是schema中的每一个关系，值是列表，列表中的每一项是"
           '{"subject": "头实体", "object": "尾实体"}，实体照抄input中的原文；input中没有的关系，值为[]。'
           '例如schema为["作者", "出版社"]、input为"《三体》是刘慈欣的小说。"时，回答'
           '{"作者": [{"subject": "三体", "object": "刘慈欣"}], "出版社": []}'),
    "en": ("Answer format: output one JSON object only, no code block, no explanation. Its keys are every relation "
           'of the schema; each value is a list of {"subject": "head entity", "object": "tail entity"} items, the '
           "entities copied from the input; a relation the input does not hold gets []. For example, for the schema "
           '["author", "publisher"] and the input "Dune is a novel by Frank Herbert." answer '
           '{"author": [{"subject": "Dune", "object": "Frank Herbert"}], "publisher": []}'),
}
PROMPT_STYLES = ("ie", "zero_shot")


def prompt_messages(messages: list[dict], style: str = "ie") -> list[dict]:
    """The prompt a model is asked with: ``ie`` = as rendered (what the LoRA trained on); ``zero_shot`` =
    the same with the answer format described in the system message (fair to a model never trained on
    it)."""
    if style == "ie":
        return messages
    if style != "zero_shot":
        raise ValueError(f"prompt style must be one of {', '.join(PROMPT_STYLES)}, got {style!r}")
    out = [dict(m) for m in messages]
    lang = "en" if out and out[0]["role"] == "system" and out[0]["content"].isascii() else "zh"
    if out and out[0]["role"] == "system":
        out[0]["content"] = out[0]["content"] + "\n" + ANSWER_FORMAT[lang]
    else:
        out.insert(0, {"role": "system", "content": ANSWER_FORMAT[lang]})
    return out


def to_messages(example: dict, *, with_answer: bool = True) -> list[dict]:
    """``[system, user, (assistant)]`` of a derived example (``instruction``/``output`` JSON strings)."""
    lang = "en" if example["cate"].isascii() else "zh"
    msgs = [{"role": "system", "content": SYSTEM_PROMPTS[lang]}, {"role": "user", "content": example["instruction"]}]
    if with_answer:
        msgs.append({"role": "assistant", "content": example["output"]})
    return msgs


def render_example(example: dict, *, prompt_only: bool = False) -> dict:
    """One chat line: ids and topic kept for tracing; an evaluation prompt carries its gold answer
    instead of the assistant turn (and, under IEPile's test chunking, its record's whole relation list)."""
    out = {k: example[k] for k in ("id", "record_id", "cate", "source")}
    out["messages"] = to_messages(example, with_answer=not prompt_only)
    if prompt_only:
        out["gold"] = example["output"]
        if "record_gold" in example:
            out["record_gold"] = example["record_gold"]
    return out


def parse_answer(text: str, schema: Iterable[str] | None = None) -> dict[str, list[dict]] | None:
    """The answer format read back: a JSON object mapping each relation to a list of
    ``{"subject", "object"}`` string pairs (``None`` when ``text`` is not that).  With ``schema``, the
    keys must be exactly the asked relations (a model that drops or invents one did not answer)."""
    try:
        obj = json.loads(text.strip())
    except (json.JSONDecodeError, ValueError):
        return None
    if not isinstance(obj, dict):
        return None
    for pairs in obj.values():
        if not isinstance(pairs, list) or not all(
                isinstance(p, dict) and set(p) == {"subject", "object"}
                and all(isinstance(v, str) for v in p.values()) for p in pairs):
            return None
    if schema is not None and set(obj) != set(schema):
        return None
    return obj


class TokenCounter:
    """Token lengths of chat lines under one tokenizer: ``count(lines) → [n, ...]`` where ``n`` is
    the length of the whole rendered conversation (prompts: with the generation prompt)."""

    def __init__(self, name: str, count_batch: Callable[[list[list[dict]], bool], list[int]]):
        self.name, self._count = name, count_batch

    def count(self, lines: list[dict]) -> list[int]:
        if not lines:
            return []
        prompt = "gold" in lines[0]
        return self._count([ln["messages"] for ln in lines], prompt)

    @classmethod
    def microlm(cls, tokenizer) -> TokenCounter:
        """Our tokenizer (``microlm.tokenizer.Tokenizer``): ``encode_chat`` per conversation."""
        return cls("microlm", lambda convs, prompt: [
            len(tokenizer.encode_chat(m, add_generation_prompt=prompt)) for m in convs])

    @classmethod
    def hf(cls, name: str, tokenizer) -> TokenCounter:
        """A Hugging Face ``tokenizers.Tokenizer`` whose added tokens include the ChatML markers:
        the rendered ChatML text is encoded in one batch (the markers match as special tokens)."""
        def count(convs: list[list[dict]], prompt: bool) -> list[int]:
            texts = [render_chat(m, add_generation_prompt=prompt) for m in convs]
            return [len(e.ids) for e in tokenizer.encode_batch(texts, add_special_tokens=False)]
        return cls(name, count)


def length_summary(lengths: Iterable[int], limits: dict[str, int]) -> dict:
    """Count, mean, percentiles, max and the number over each named limit."""
    a = np.fromiter(lengths, dtype=np.int64)
    if a.size == 0:
        return {"n": 0}
    out = {"n": int(a.size), "mean": round(float(a.mean()), 1),
           **{f"p{q}": int(np.percentile(a, q)) for q in (50, 90, 99)}, "max": int(a.max())}
    for name, lim in limits.items():
        out[f"over_{name}"] = int((a > lim).sum())
    out["histogram"] = {"edges": [int(x) for x in np.histogram_bin_edges(a, bins=20)],
                        "counts": [int(x) for x in np.histogram(a, bins=20)[0]]}
    return out


