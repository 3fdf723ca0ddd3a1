"""LoRA written from scratch (stage A7): ``W x + (alpha / r) · B A x`` with ``A`` random and ``B`` zero.

Targets are *logical* projections named like the Hugging Face Llama layout, ``layers.{i}.attn.{q,k,v,o}``
and ``layers.{i}.mlp.{gate,up,down}``, chosen by ``fnmatch`` patterns (``"q"`` is short for ``"*.q"``).
Our model stores q/k/v (and gate/up) fused in one matrix, so a ``LoRALinear`` keeps one ``(A, B)``
pair per targeted *slice* of the fused output — exactly the adapters PEFT would put on separate
``q_proj``/``k_proj``/``v_proj`` layers, which is what lets adapters be saved in PEFT's format.

``merge()`` folds ``scale · B A`` into the base weight (exact to fp32 rounding), ``unmerge()`` takes it
out again; ``apply_lora`` freezes everything that is not an adapter and reports what trains.
"""

from __future__ import annotations

import fnmatch
import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from microlm.errors import MicroLMError

__all__ = ["LoRAConfig", "LoRALinear", "apply_lora", "lora_modules", "merge_lora", "unmerge_lora",
           "lora_report", "logical_projections"]

# logical name → (module attribute path inside a layer, slice index within a fused output)
_ATTN = {"q": ("attn.qkv_proj", 0), "k": ("attn.qkv_proj", 1), "v": ("attn.qkv_proj", 2), "o": ("attn.o_proj", 0)}
_MLP = {"gate": ("mlp.gate_up_proj", 0), "up": ("mlp.gate_up_proj", 1), "down": ("mlp.down_proj", 0)}


@dataclass
class LoRAConfig:
    r: int = 8
    alpha: float = 16.0
    dropout: float = 0.0
    targets: list[str] = field(default_factory=lambda: ["q", "k", "v", "o"])

    @property
    def scale(self) -> float:
        return self.alpha / self.r


def logical_projections(model) -> dict[str, tuple[str, int, int, int]]:
    """``{"layers.0.attn.q": (module path, slice index, out start, out size), ...}`` for a TransformerLM."""
    cfg = model.cfg
    q, kv = cfg.n_heads * cfg.head_dim, cfg.kv_heads * cfg.head_dim
    fused = {"attn.qkv_proj": [(0, q), (q, kv), (q + kv, kv)], "attn.o_proj": [(0, cfg.dim)],
             "mlp.gate_up_proj": [(0, cfg.hidden_dim), (cfg.hidden_dim, cfg.hidden_dim)],
             "mlp.down_proj": [(0, cfg.dim)]}
    out = {}
    for i in range(cfg.n_layers):
        for group, table in (("attn", _ATTN), ("mlp", _MLP)):
            for name, (path, k) in table.items():
                start, size = fused[path][k]
                out[f"layers.{i}.{group}.{name}"] = (f"layers.{i}.{path}", k, start, size)
    return out


class LoRALinear(nn.Module):
    """A frozen ``nn.Linear`` plus low-rank updates on some slices of its output rows."""

    def __init__(self, base: nn.Linear, slices: list[tuple[int, int]], adapted: list[bool], r: int,
                 alpha: float, dropout: float = 0.0):
        super().__init__()
        if r < 1:
            raise MicroLMError(f"LoRA rank must be >= 1, got {r}")
        self.base = base
        self.r, self.alpha, self.scale = r, alpha, alpha / r
        self.slices = slices  # (start, size) of each fused part of the output, in order
        self.lora_A = nn.ParameterList()
        self.lora_B = nn.ParameterList()
        self.index: list[int] = []  # position in lora_A/B of each slice, -1 when not adapted
        for sl, on in zip(slices, adapted, strict=True):
            if not on:
                self.index.append(-1)
                continue
            a = nn.Parameter(torch.empty(r, base.in_features, dtype=base.weight.dtype, device=base.weight.device))
            nn.init.kaiming_uniform_(a, a=math.sqrt(5))  # PEFT's default for A
            b = nn.Parameter(torch.zeros(sl[1], r, dtype=base.weight.dtype, device=base.weight.device))
            self.index.append(len(self.lora_A))
            self.lora_A.append(a)
            self.lora_B.append(b)
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.merged = False

    def delta_weight(self, k: int) -> torch.Tensor:
        """``scale · B A`` of the ``k``-th adapted slice."""
        return (self.lora_B[k] @ self.lora_A[k]) * self.scale

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base(x)
        if self.merged or not len(self.lora_A):
            return y
        xd = self.dropout(x)
        parts = []
        for sl, k in zip(self.slices, self.index, strict=True):
            if k < 0:
                parts.append(y.new_zeros(*y.shape[:-1], sl[1]))
            else:
                parts.append(F.linear(F.linear(xd, self.lora_A[k]), self.lora_B[k]) * self.scale)
        return y + (parts[0] if len(parts) == 1 else torch.cat(parts, dim=-1))

    @torch.no_grad()
    def merge(self) -> None:
        if self.merged:
            return
        for sl, k in zip(self.slices, self.index, strict=True):
            if k >= 0:
                self.base.weight[sl[0]:sl[0] + sl[1]] += self.delta_weight(k)
        self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        if not self.merged:
            return
        for sl, k in zip(self.slices, self.index, strict=True):
            if k >= 0:
                self.base.weight[sl[0]:sl[0] + sl[1]] -= self.delta_weight(k)
        self.merged = False


def _expand(pattern: str) -> str:
    return pattern if "." in pattern or "*" in pattern else f"*.{pattern}"


def apply_lora(model: nn.Module, cfg: LoRAConfig) -> dict:
    """Wrap the projections matched by ``cfg.targets`` in ``LoRALinear``; freeze everything else.

    Returns the parameter report.  Patterns that match nothing are an error, not a silent no-op.
    """
    projections = logical_projections(model)
    chosen: dict[str, list[tuple[int, int, int]]] = {}
    for pat in cfg.targets:
        hits = [name for name in projections if fnmatch.fnmatchcase(name, _expand(pat))]
        if not hits:
            raise MicroLMError(f"LoRA target {pat!r} matches no projection (names look like "
                               f"'layers.0.attn.q', 'layers.3.mlp.down'; short forms: q k v o gate up down)")
        for name in hits:
            path, k, start, size = projections[name]
            chosen.setdefault(path, [])
            if (k, start, size) not in chosen[path]:
                chosen[path].append((k, start, size))
    for p in model.parameters():
        p.requires_grad_(False)
    for path, picked in chosen.items():
        parent = model.get_submodule(path.rsplit(".", 1)[0])
        attr = path.rsplit(".", 1)[1]
        base = getattr(parent, attr)
        if isinstance(base, LoRALinear):
            raise MicroLMError(f"{path} already has LoRA adapters")
        all_slices = _slice_table(model, attr)
        adapted = [any(p[0] == k for p in picked) for k in range(len(all_slices))]
        setattr(parent, attr, LoRALinear(base, all_slices, adapted, cfg.r, cfg.alpha, cfg.dropout))
    return lora_report(model)


def _slice_table(model, attr: str) -> list[tuple[int, int]]:
    c = model.cfg
    q, kv = c.n_heads * c.head_dim, c.kv_heads * c.head_dim
    return {"qkv_proj": [(0, q), (q, kv), (q + kv, kv)], "o_proj": [(0, c.dim)],
            "gate_up_proj": [(0, c.hidden_dim), (c.hidden_dim, c.hidden_dim)], "down_proj": [(0, c.dim)]}[attr]


def lora_modules(model: nn.Module) -> dict[str, LoRALinear]:
    return {n: m for n, m in model.named_modules() if isinstance(m, LoRALinear)}


def merge_lora(model: nn.Module) -> None:
    for m in lora_modules(model).values():
        m.merge()


def unmerge_lora(model: nn.Module) -> None:
    for m in lora_modules(model).values():
        m.unmerge()


def lora_report(model: nn.Module) -> dict:
    """Trainable adapter parameters against the base model (PEFT prints trainable / (base + adapters))."""
    adapters = sum(p.numel() for m in lora_modules(model).values() for p in [*m.lora_A, *m.lora_B])
    total = sum(p.numel() for p in model.parameters())
    base = total - adapters
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return {"adapter_params": adapters, "trainable_params": trainable, "base_params": base,
            "percent_of_base": round(100 * adapters / base, 4),
            "percent_of_all": round(100 * adapters / total, 4), "modules": len(lora_modules(model))}
