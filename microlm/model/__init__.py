"""Stage A5: the TransformerLM."""

from microlm.model.config import MODEL_PRESETS, ModelConfig
from microlm.model.transformer import KVCache, TransformerLM, count_parameters

__all__ = ["ModelConfig", "MODEL_PRESETS", "TransformerLM", "KVCache", "count_parameters"]
