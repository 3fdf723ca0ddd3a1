"""The model: the TransformerLM, LoRA, checkpoint I/O, the Hugging Face conversion and the one loader."""

from microlm.model.config import MODEL_PRESETS, ModelConfig
from microlm.model.load import load_model
from microlm.model.transformer import KVCache, TransformerLM, count_parameters

__all__ = ["ModelConfig", "MODEL_PRESETS", "TransformerLM", "KVCache", "count_parameters", "load_model"]
