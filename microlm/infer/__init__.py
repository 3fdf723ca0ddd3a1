"""Inference: generation with the KV cache, chat, repetition metrics, the check of a Hugging Face
export (``verify``) and batched greedy checks of ``transformers`` models (``greedy``).

Names are imported lazily, so ``from microlm.infer.config import GenerationConfig`` needs no torch.
"""

from __future__ import annotations

from importlib import import_module

_WHERE = {"GenerationConfig": "config", "Generation": "generate", "generate_ids": "generate",
          "generate_text": "generate", "stream_text": "generate", "ChatSession": "chat"}

__all__ = list(_WHERE)


def __getattr__(name: str):
    if name in _WHERE:
        return getattr(import_module(f"microlm.infer.{_WHERE[name]}"), name)
    raise AttributeError(f"module 'microlm.infer' has no attribute {name!r}")
