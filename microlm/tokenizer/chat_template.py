"""The ChatML template, as text (``render_chat``) and as Jinja for transformers (``CHAT_TEMPLATE``).

Its own module so that both the tokenizer and its Hugging Face export (``hf.py``) can use it
without importing each other.
"""

from __future__ import annotations

from microlm.errors import MicroLMError

__all__ = ["CHAT_TEMPLATE", "render_chat"]

# ChatML, as a Jinja template for transformers' ``apply_chat_template`` (same text as render_chat)
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def render_chat(messages: list[dict], *, add_generation_prompt: bool = False) -> str:
    """ChatML text: ``<|im_start|>role\\ncontent<|im_end|>\\n`` per message."""
    out = []
    for m in messages:
        if not isinstance(m, dict) or "role" not in m or "content" not in m:
            raise MicroLMError(f"chat message must be {{'role', 'content'}}, got {m!r}")
        out.append(f"<|im_start|>{m['role']}\n{m['content']}<|im_end|>\n")
    if add_generation_prompt:
        out.append("<|im_start|>assistant\n")
    return "".join(out)
