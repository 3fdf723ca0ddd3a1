"""The tokenizer (A3–A4): byte-level BPE written from scratch, encode/decode and the chat template,
the Hugging Face export, training and encoding the corpus, and token memmaps."""

from microlm.tokenizer.bpe import GPT2_PATTERN, PATTERNS, QWEN2_PATTERN, train_bpe
from microlm.tokenizer.tokenizer import (
                                         CHAT_TEMPLATE,
                                         DEFAULT_SPECIAL_TOKENS,
                                         StreamDecoder,
                                         Tokenizer,
                                         render_chat,
                                         stop_ids_of,
)

__all__ = ["train_bpe", "Tokenizer", "StreamDecoder", "render_chat", "CHAT_TEMPLATE", "GPT2_PATTERN",
           "QWEN2_PATTERN", "PATTERNS", "DEFAULT_SPECIAL_TOKENS", "stop_ids_of"]
