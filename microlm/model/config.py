"""The model's shape as a dataclass (no torch import, so configs load fast)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

from microlm.errors import MicroLMError

__all__ = ["ModelConfig", "MODEL_PRESETS", "LoRAConfig"]


@dataclass
class ModelConfig:
    vocab_size: int = 6400
    dim: int = 512
    n_layers: int = 8
    n_heads: int = 8
    n_kv_heads: int | None = None  # None = n_heads (multi-head); fewer = grouped-query attention
    hidden_dim: int = 1365  # SwiGLU intermediate size
    max_seq_len: int = 512  # longest sequence (RoPE table and default KV-cache length)
    rope_theta: float = 10000.0
    norm_eps: float = 1e-5
    tie_embeddings: bool = False
    dropout: float = 0.0

    @property
    def head_dim(self) -> int:
        return self.dim // self.n_heads

    @property
    def kv_heads(self) -> int:
        return self.n_kv_heads or self.n_heads

    def validate(self) -> ModelConfig:
        if self.n_heads < 1 or (self.n_kv_heads is not None and self.n_kv_heads < 1):
            raise MicroLMError("model.n_heads and model.n_kv_heads must be >= 1")
        checks = [
            (self.dim % self.n_heads == 0, "model.dim must be divisible by model.n_heads"),
            (self.head_dim % 2 == 0, "head dim (dim / n_heads) must be even for rotary embeddings"),
            (self.n_heads % self.kv_heads == 0, "model.n_heads must be divisible by model.n_kv_heads"),
            (min(self.vocab_size, self.dim, self.n_layers, self.hidden_dim, self.max_seq_len) >= 1,
             "model sizes must be >= 1"),
            (0.0 <= self.dropout < 1.0, "model.dropout must be in [0, 1)"),
            (self.rope_theta > 0 and self.norm_eps > 0, "model.rope_theta and model.norm_eps must be > 0"),
        ]
        for ok, msg in checks:
            if not ok:
                raise MicroLMError(msg)
        return self

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


MODEL_PRESETS = {
    "microlm-31.7m": ModelConfig(),
    # the cpu profile's model: same shape family, small enough to train in minutes on 2 cores
    "microlm-cpu": ModelConfig(dim=256, n_layers=4, n_heads=4, hidden_dim=683, max_seq_len=512),
    "microlm-smoke": ModelConfig(dim=64, n_layers=2, n_heads=2, n_kv_heads=1, hidden_dim=172, max_seq_len=512),
}


@dataclass
class LoRAConfig:
    """LoRA adapters: rank, scale ``alpha / r``, dropout, target projection patterns."""

    r: int = 8
    alpha: float = 16.0
    dropout: float = 0.0
    targets: list[str] = field(default_factory=lambda: ["q", "k", "v", "o"])

    @property
    def scale(self) -> float:
        return self.alpha / self.r
