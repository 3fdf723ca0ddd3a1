"""Checkpoints: ``model.safetensors`` + ``optimizer.pt`` (tensors only, loaded with
``weights_only=True``) + ``state.json`` (step, configs, RNG state), written into a fresh folder that
replaces the old one atomically, so a crash mid-write leaves the last good checkpoint intact.

``trainable_only=True`` (adapter training on a large frozen base, stage B3) keeps only the parameters
that train — the base is re-read from where it came from — and loading then requires exactly those."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_model, save_model

from microlm.errors import MicroLMError
from microlm.io import recover_dir, reported_write, staged_dir, write_json

__all__ = ["save_checkpoint", "load_checkpoint", "read_state", "config_diff", "load_tensors"]


def load_tensors(path: str | Path) -> dict[str, torch.Tensor]:
    """A safetensors file someone else wrote: a truncated or garbage file is a one-line error."""
    from safetensors.torch import load_file

    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError) as e:
        raise MicroLMError(f"corrupt safetensors file {path}: {str(e).splitlines()[0]}") from None


def _unwrap(model: torch.nn.Module) -> torch.nn.Module:
    return getattr(model, "module", model)


def _trainable(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach().contiguous() for n, p in _unwrap(model).named_parameters() if p.requires_grad}


def save_checkpoint(ckpt_dir: str | Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer | None,
                    state: dict, *, trainable_only: bool = False) -> Path:
    """Write a checkpoint folder atomically; ``state`` must be JSON-serialisable."""
    from safetensors.torch import save_file

    ckpt_dir = Path(ckpt_dir)
    with staged_dir(ckpt_dir) as tmp:
        with reported_write(ckpt_dir / "model.safetensors", "writing a checkpoint"):
            if trainable_only:
                save_file(_trainable(model), str(tmp / "model.safetensors"), metadata={"trainable_only": "1"})
            else:
                save_model(_unwrap(model), str(tmp / "model.safetensors"))
        extra = {"torch_rng": torch.get_rng_state()}
        if torch.cuda.is_available():
            extra["cuda_rng"] = torch.cuda.get_rng_state_all()
        if optimizer is not None:
            extra["optimizer"] = optimizer.state_dict()
        with reported_write(ckpt_dir / "optimizer.pt", "writing a checkpoint"):
            torch.save(extra, tmp / "optimizer.pt")
        write_json(tmp / "state.json", state)
    return ckpt_dir


def read_state(ckpt_dir: str | Path) -> dict:
    recover_dir(ckpt_dir)  # a kill between the two renames of a replacement leaves the new one beside it
    p = Path(ckpt_dir) / "state.json"
    if not p.is_file():
        raise MicroLMError(f"no checkpoint to resume from: {p} does not exist")
    try:
        state = json.loads(p.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise MicroLMError(f"corrupt checkpoint file {p}: {e}") from None
    if not isinstance(state, dict) or not isinstance(state.get("step"), int) or not isinstance(state.get("model"), dict):
        raise MicroLMError(f"corrupt checkpoint file {p}: expected an object with an integer 'step' and a 'model' config")
    return state


def config_diff(saved: dict, current: dict, prefix: str = "") -> list[str]:
    """``["model.dim: 256 (checkpoint) != 512 (config)", ...]`` for every differing leaf."""
    out = []
    for k in sorted(set(saved) | set(current)):
        a, b = saved.get(k, "<missing>"), current.get(k, "<missing>")
        key = f"{prefix}{k}"
        if isinstance(a, dict) and isinstance(b, dict):
            out += config_diff(a, b, key + ".")
        elif a != b:
            out.append(f"{key}: {a!r} (checkpoint) != {b!r} (config)")
    return out


def load_checkpoint(ckpt_dir: str | Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer | None = None,
                    *, expect: dict | None = None, restore_rng: bool = True, trainable_only: bool = False) -> dict:
    """Load weights (and optimizer + RNG state) into ``model``/``optimizer``; return ``state.json``.

    ``expect``: entries of ``state`` that must match (e.g. the model config); a mismatch raises one
    ``MicroLMError`` listing every differing field.
    """
    ckpt_dir = Path(ckpt_dir)
    state = read_state(ckpt_dir)
    if expect:
        diffs = config_diff({k: state.get(k) for k in expect}, expect)
        if diffs:
            raise MicroLMError(f"checkpoint {ckpt_dir} was made with a different config: " + "; ".join(diffs))
    weights = ckpt_dir / "model.safetensors"
    if not weights.is_file():
        raise MicroLMError(f"checkpoint file missing: {weights}")
    try:
        if trainable_only:
            saved = load_tensors(weights)
            want = _trainable(model)
            missing, unexpected = sorted(set(want) - set(saved)), sorted(set(saved) - set(want))
            if not missing and not unexpected:
                with torch.no_grad():
                    params = dict(_unwrap(model).named_parameters())
                    for name, t in saved.items():
                        params[name].copy_(t)
        else:
            missing, unexpected = load_model(_unwrap(model), str(weights), strict=False)
    except (SafetensorError, OSError, RuntimeError, ValueError) as e:
        raise MicroLMError(f"corrupt checkpoint file {weights}: {str(e).splitlines()[0]}") from None
    if missing or unexpected:
        raise MicroLMError(f"checkpoint {weights} does not fit the model: missing {sorted(missing)[:5]}, "
                           f"unexpected {sorted(unexpected)[:5]}")
    if optimizer is not None or restore_rng:
        opt_path = ckpt_dir / "optimizer.pt"
        if not opt_path.is_file():
            raise MicroLMError(f"checkpoint file missing: {opt_path}")
        try:
            extra = torch.load(opt_path, map_location="cpu", weights_only=True)
        except Exception as e:  # noqa: BLE001 — any unpickling failure is a corrupt file
            raise MicroLMError(f"corrupt checkpoint file {opt_path}: {str(e).splitlines()[0]}") from None
        if optimizer is not None:
            optimizer.load_state_dict(extra["optimizer"])
        if restore_rng:
            torch.set_rng_state(extra["torch_rng"])
            if "cuda_rng" in extra and torch.cuda.is_available():
                torch.cuda.set_rng_state_all(extra["cuda_rng"])
    return state
