"""Runs vLLM's OpenAI-compatible server with message content kept plain text, as ``microlm chat``
keeps it: ``<serve env>/bin/python microlm/serve/vllm_launch.py <vLLM's arguments>``.

vLLM renders a chat with its template and tokenizes the whole text, so special-token text typed in
a message (``<|im_end|><|im_start|>system``) becomes real control tokens inside that turn; vLLM 0.32
has no switch against it.  Before the server starts, this launcher wraps the function that renders
and tokenizes chats (``vllm.renderers.hf.safe_apply_chat_template``: the chat completions,
``/tokenize`` and the other chat endpoints go through it): when a message's content holds the text
of an added token (special or not), the prompt is rendered once more with a placeholder for each
content, which shows where the template's own text ends; the template's special tokens stay control
tokens, and the text between two of them — template text and message content together, as
``Tokenizer.encode_chat`` encodes ``role\\ncontent`` — is tokenized as ordinary text, no added token
recognized in it.  A chat without such text in its contents goes through vLLM unchanged.  A template
that changes the content it prints (trims it, say) cannot be split this way: such a request is
refused (HTTP 400) instead of being served with the injected control tokens.

Run by path with the serving environment's python (which need not have ``microlm``): only the
standard library, vLLM and ``tokenizers`` are imported, the latter two inside functions.
"""

from __future__ import annotations

import json
import re
import runpy
import secrets
from collections.abc import Callable

CONTENT_KEYS = ("content", "reasoning_content", "reasoning")  # what a message's author wrote


class ContentNotPlain(ValueError):
    """The template does not print the message content verbatim: it cannot be kept plain."""


def _placeholders(conversation: list[dict], nonce: str) -> tuple[list[dict], list[str]]:
    """A copy of ``conversation`` with each content text replaced by a placeholder; the texts."""
    texts: list[str] = []

    def mark(text: str) -> str:
        texts.append(text)
        return f"\ue000{nonce}:{len(texts) - 1}\ue001"

    out = []
    for m in conversation:
        m = dict(m)
        for key in CONTENT_KEYS:
            c = m.get(key)
            if isinstance(c, str):
                m[key] = mark(c)
            elif isinstance(c, list):  # content parts ("openai" content format)
                m[key] = [{**p, "text": mark(p["text"])} if isinstance(p, dict) and isinstance(p.get("text"), str)
                          else p for p in c]
        out.append(m)
    return out, texts


def ordinary_encoder(tokenizer) -> Callable[[str], list[int]]:
    """Text → ids with no added token recognized, special or not (``Tokenizer.encode_ordinary``): a
    copy of the fast tokenizer without its added tokens (built once per tokenizer); else the slow
    tokenizer with its special tokens split."""
    enc = getattr(tokenizer, "_microlm_ordinary", None)
    if enc is not None:
        return enc
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        def enc(text: str) -> list[int]:
            return tokenizer.encode(text, add_special_tokens=False, split_special_tokens=True)
    else:
        from tokenizers import Tokenizer

        spec = json.loads(backend.to_str())
        spec["added_tokens"] = []
        bare = Tokenizer.from_str(json.dumps(spec))

        def enc(text: str) -> list[int]:
            return bare.encode(text, add_special_tokens=False).ids
    try:
        tokenizer._microlm_ordinary = enc
    except AttributeError:
        pass
    return enc


def plain_content_ids(conversation: list[dict], render: Callable[[list[dict]], str], tokenizer) -> list[int] | None:
    """The prompt ids of ``conversation`` with special-token text in message contents kept plain;
    ``None`` when no content holds any (the caller's own tokenization is then the same).

    ``render``: the chat template (messages → text); ``tokenizer``: a Hugging Face tokenizer.
    Raises ``ContentNotPlain`` when the template does not print the contents verbatim."""
    added: dict[str, int] = tokenizer.get_added_vocab()  # the special (and other added) tokens: text → id
    nonce = secrets.token_hex(6)
    marked, texts = _placeholders(conversation, nonce)
    if not added or not any(tok in text for text in texts for tok in added):
        return None
    parts = re.split(f"\ue000{nonce}:(\\d+)\ue001", render(marked))  # template text, content index, ...
    if "".join(texts[int(p)] if i % 2 else p for i, p in enumerate(parts)) != render(conversation):
        raise ContentNotPlain("a message content holds special-token text, and this model's chat template does "
                              "not print contents verbatim, so it cannot be kept plain text: remove that text")
    special = re.compile("|".join(re.escape(t) for t in sorted(added, key=len, reverse=True)))
    encode = ordinary_encoder(tokenizer)
    ids: list[int] = []
    plain: list[str] = []  # text since the template's last special token: template text and contents

    def flush() -> None:
        if text := "".join(plain):
            ids.extend(encode(text))
        plain.clear()

    for i, part in enumerate(parts):
        if i % 2:
            plain.append(texts[int(part)])
            continue
        pos = 0
        for m in special.finditer(part):
            plain.append(part[pos:m.start()])
            flush()
            ids.append(added[m.group()])
            pos = m.end()
        plain.append(part[pos:])
    flush()
    return ids


def install() -> None:
    """Wrap vLLM's chat rendering (before its server builds the renderer, which binds it)."""
    import vllm.renderers.hf as hf
    from vllm.exceptions import VLLMValidationError

    original = hf.safe_apply_chat_template
    if getattr(original, "microlm_plain_content", False):
        return

    def safe_apply_chat_template(model_config, tokenizer, conversation, *, tools=None, chat_template=None,
                                 tokenize=True, **kwargs):
        def render(conv: list[dict]) -> str:
            return original(model_config, tokenizer, conv, tools=tools, chat_template=chat_template, tokenize=False,
                            **kwargs)

        try:
            ids = plain_content_ids(conversation, render, tokenizer)
        except ContentNotPlain as e:
            raise VLLMValidationError(str(e)) from None
        if ids is None:
            return original(model_config, tokenizer, conversation, tools=tools, chat_template=chat_template,
                            tokenize=tokenize, **kwargs)
        return ids  # token ids even where text was asked for: re-tokenizing the text would undo the work

    safe_apply_chat_template.microlm_plain_content = True
    hf.safe_apply_chat_template = safe_apply_chat_template


if __name__ == "__main__":
    install()
    runpy.run_module("vllm.entrypoints.openai.api_server", run_name="__main__", alter_sys=True)
