"""Decoding settings (no torch import, so the YAML config loads fast)."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

from microlm.errors import MicroLMError

__all__ = ["GenerationConfig", "CONTEXT_MODES"]

CONTEXT_MODES = ("error", "truncate")


@dataclass
class GenerationConfig:
    """Decoding settings.  ``temperature == 0`` is greedy; ``top_k = 0`` and ``top_p = 1`` switch
    those filters off; ``repetition_penalty = 1`` is no penalty.  ``context``: what to do when
    prompt + ``max_new_tokens`` exceed the model's window — ``"error"``, or ``"truncate"`` (keep
    the prompt's last tokens: a sliding window over the left side)."""

    max_new_tokens: int = 128
    temperature: float = 0.7
    top_k: int = 50
    top_p: float = 0.9
    repetition_penalty: float = 1.1
    seed: int | None = None
    stop: list[str] = field(default_factory=list)  # extra stop strings (not part of the output)
    ignore_eos: bool = False  # keep going past <|im_end|>/<|endoftext|> (benchmarks)
    use_cache: bool = True
    context: str = "truncate"

    def validate(self) -> GenerationConfig:
        checks = [
            (isinstance(self.max_new_tokens, int) and self.max_new_tokens >= 1, "max_new_tokens must be >= 1"),
            (self.temperature >= 0, f"temperature must be >= 0 (0 = greedy), got {self.temperature}"),
            (isinstance(self.top_k, int) and self.top_k >= 0, f"top_k must be an integer >= 0, got {self.top_k}"),
            (0 < self.top_p <= 1, f"top_p must be in (0, 1], got {self.top_p}"),
            (self.repetition_penalty > 0, f"repetition_penalty must be > 0, got {self.repetition_penalty}"),
            (self.context in CONTEXT_MODES, f"context must be one of {CONTEXT_MODES}, got {self.context!r}"),
            (all(isinstance(s, str) and s for s in self.stop), "stop strings must be non-empty strings"),
        ]
        for ok, msg in checks:
            if not ok:
                raise MicroLMError(msg)
        return self

    def to_dict(self) -> dict:
        return asdict(self)
