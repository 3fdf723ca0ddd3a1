"""The model: the TransformerLM, LoRA, checkpoint I/O, the Hugging Face conversion and the one loader.

Names are imported lazily, so ``from microlm.model.config import ModelConfig`` needs no torch.
"""

from __future__ import annotations

from importlib import import_module

_WHERE = {"ModelConfig": "config", "MODEL_PRESETS": "config", "load_model": "load", "KVCache": "transformer",
          "TransformerLM": "transformer", "count_parameters": "transformer"}

__all__ = list(_WHERE)


def __getattr__(name: str):
    if name in _WHERE:
        return getattr(import_module(f"microlm.model.{_WHERE[name]}"), name)
    raise AttributeError(f"module 'microlm.model' has no attribute {name!r}")
