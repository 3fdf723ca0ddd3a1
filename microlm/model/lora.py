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
import re
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from microlm.errors import MicroLMError
from microlm.io import load_json_file, reported_write, share, write_json
from microlm.model.checkpoint import config_diff, load_tensors
from microlm.model.config import LoRAConfig

# our logical projection name → the Llama module that holds it (PEFT's target names, the HF export)
LLAMA_PROJ = {"q": "self_attn.q_proj", "k": "self_attn.k_proj", "v": "self_attn.v_proj", "o": "self_attn.o_proj",
              "gate": "mlp.gate_proj", "up": "mlp.up_proj", "down": "mlp.down_proj"}

__all__ = ["LoRAConfig", "LoRALinear", "apply_lora", "lora_modules", "merge_lora", "unmerge_lora",
           "lora_report", "logical_projections", "adapter_state_dict", "save_adapter", "load_adapter"]

# logical name → (module attribute path inside a layer, slice index within a fused output)
_ATTN = {"q": ("attn.qkv_proj", 0), "k": ("attn.qkv_proj", 1), "v": ("attn.qkv_proj", 2), "o": ("attn.o_proj", 0)}
_MLP = {"gate": ("mlp.gate_up_proj", 0), "up": ("mlp.gate_up_proj", 1), "down": ("mlp.down_proj", 0)}


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
            # A: (r, in) random, B: (size, r) zero, so B A = 0 and training starts from the base model exactly
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
        return (self.lora_B[k] @ self.lora_A[k]) * self.scale  # (size, r) @ (r, in) -> (size, in)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base(x)  # (..., in) -> (..., out), e.g. (B, T, C) -> (B, T, (H + 2·Hkv)·D) for qkv_proj
        if self.merged or not len(self.lora_A):
            return y
        xd = self.dropout(x)
        parts = []  # one (..., size) update per slice, in output order
        for sl, k in zip(self.slices, self.index, strict=True):
            if k < 0:
                parts.append(y.new_zeros(*y.shape[:-1], sl[1]))
            else:  # (..., in) -> A -> (..., r) -> B -> (..., size): never the (size, in) product B A
                parts.append(F.linear(F.linear(xd, self.lora_A[k]), self.lora_B[k]) * self.scale)
        return y + (parts[0] if len(parts) == 1 else torch.cat(parts, dim=-1))  # sizes add up to out

    @torch.no_grad()
    def merge(self) -> None:
        if self.merged:
            return
        for sl, k in zip(self.slices, self.index, strict=True):
            if k >= 0:  # the slice's rows of the (out, in) weight: (size, in)
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


# ---------------------------------------------------------------------------- PEFT on-disk format
def _adapted(model) -> list[tuple[str, LoRALinear, int]]:
    """``(logical name, layer, adapter index)`` for every adapted slice, in a stable order."""
    out = []
    for name, (path, k, _, _) in logical_projections(model).items():
        layer = model.get_submodule(path)
        if isinstance(layer, LoRALinear) and layer.index[k] >= 0:
            out.append((name, layer, layer.index[k]))
    return out


def _peft_module(name: str) -> str:
    layer, _group, proj = name.split(".")[1:4]
    return f"model.layers.{layer}.{LLAMA_PROJ[proj]}"


def adapter_state_dict(model) -> dict[str, torch.Tensor]:
    """Adapter weights under PEFT's key names for the Llama-layout export."""
    out = {}
    for name, layer, k in _adapted(model):
        key = f"base_model.model.{_peft_module(name)}"
        out[f"{key}.lora_A.weight"] = layer.lora_A[k].detach().contiguous().clone()
        out[f"{key}.lora_B.weight"] = layer.lora_B[k].detach().contiguous().clone()
    return out


def save_adapter(model, cfg: LoRAConfig, out_dir, base_model_name: str = "microlm") -> Path:
    """``adapter_config.json`` + ``adapter_model.safetensors`` that ``peft.PeftModel.from_pretrained``
    loads onto the Llama-layout export of the same base model, plus ``microlm_adapter.json`` (our
    target patterns and the base model's config, checked by ``load_adapter``)."""
    from safetensors.torch import save_file

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    modules = sorted({_peft_module(n) for n, _, _ in _adapted(model)})
    if not modules:
        raise MicroLMError("the model has no LoRA adapters to save")
    write_json(out / "adapter_config.json", {
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "r": cfg.r, "lora_alpha": cfg.alpha,
        "lora_dropout": cfg.dropout, "bias": "none", "fan_in_fan_out": False, "inference_mode": True,
        "target_modules": "^(?:" + "|".join(re.escape(m) for m in modules) + ")$",
        "base_model_name_or_path": base_model_name, "modules_to_save": None, "init_lora_weights": True,
        "use_rslora": False, "use_dora": False, "layers_to_transform": None, "layers_pattern": None,
        "rank_pattern": {}, "alpha_pattern": {},
    })
    # our own metadata stays out of PEFT's file (PEFT warns about unknown keys)
    write_json(out / "microlm_adapter.json", {"targets": list(cfg.targets), "base_model": model.cfg.to_dict()})
    with reported_write(out / "adapter_model.safetensors", "writing the adapter"):
        save_file(adapter_state_dict(model), str(out / "adapter_model.safetensors"), metadata={"format": "pt"})
    share(out)
    return out


def _canonical(model_cfg: dict) -> dict:
    """A model config with ``n_kv_heads`` spelled out (``None`` means as many as ``n_heads``; a Hugging
    Face round trip writes the number)."""
    return {**model_cfg, "n_kv_heads": model_cfg.get("n_kv_heads") or model_cfg.get("n_heads")}


def load_adapter(model, folder) -> LoRAConfig:
    """Add the adapters saved in ``folder`` to ``model`` (which must be the same base model)."""
    folder = Path(folder)
    cfg_path, w_path = folder / "adapter_config.json", folder / "adapter_model.safetensors"
    for p in (cfg_path, w_path):
        if not p.is_file():
            raise MicroLMError(f"adapter file missing: {p}")
    meta = load_json_file(cfg_path, "adapter config")
    extra = folder / "microlm_adapter.json"
    info = load_json_file(extra, "adapter file") if extra.is_file() else {}
    if info.get("base_model"):
        diffs = config_diff({"model": _canonical(info["base_model"])}, {"model": _canonical(model.cfg.to_dict())})
        if diffs:
            raise MicroLMError(f"adapter {folder} was trained on another base model: " + "; ".join(diffs))
    try:
        cfg = LoRAConfig(r=int(meta["r"]), alpha=float(meta["lora_alpha"]),
                         dropout=float(meta.get("lora_dropout", 0.0)), targets=info.get("targets") or ["q", "k", "v", "o"])
    except (KeyError, TypeError, ValueError) as e:
        raise MicroLMError(f"adapter config {cfg_path}: need numeric r and lora_alpha ({type(e).__name__}: {e})") from None
    if cfg.r < 1:
        raise MicroLMError(f"adapter config {cfg_path}: r must be >= 1, got {cfg.r}")
    weights = load_tensors(w_path)
    apply_lora(model, cfg)
    expected = adapter_state_dict(model)
    missing = sorted(set(expected) - set(weights))
    if missing:
        raise MicroLMError(f"adapter {w_path} lacks {len(missing)} tensors, e.g. {missing[0]}")
    with torch.no_grad():
        for name, layer, k in _adapted(model):
            key = f"base_model.model.{_peft_module(name)}"
            for part, param in (("lora_A", layer.lora_A[k]), ("lora_B", layer.lora_B[k])):
                t = weights[f"{key}.{part}.weight"]
                if t.shape != param.shape:
                    raise MicroLMError(f"adapter tensor {key}.{part} has shape {tuple(t.shape)}, the model needs "
                                       f"{tuple(param.shape)} (another base model or rank?)")
                param.copy_(t)
    return cfg
