"""The one model loader: ``load_model`` opens whatever the course writes or imports — a stage folder
(``runs/<p>/sft``, with ``ckpt/``), a checkpoint folder (``state.json``) or a Hugging Face Llama folder
(``config.json``: our ``hf`` export or an outside model) — with an optional LoRA adapter."""

from __future__ import annotations

from pathlib import Path

import torch

from microlm.errors import MicroLMError
from microlm.hw import resolve_dtype, torch_dtype
from microlm.model.checkpoint import load_checkpoint, read_state
from microlm.model.config import ModelConfig
from microlm.model.hf_export import import_hf
from microlm.model.lora import load_adapter
from microlm.model.transformer import TransformerLM
from microlm.tokenizer import Tokenizer

__all__ = ["load_model"]


def load_model(path: str | Path, *, tokenizer: str | Path | None = None, adapter: str | Path | None = None,
               device: str = "cpu", dtype: str = "fp32"):
    """``(model, tokenizer)`` from a Hugging Face folder (``config.json``), a stage folder with
    ``ckpt/`` or a checkpoint folder (``state.json``; the tokenizer from ``tokenizer`` or the
    ``tokenizer/`` folder beside the stage).  ``adapter``: a LoRA folder saved by ``microlm lora``.
    ``dtype``: the weights for inference — ``fp32``, ``bf16`` or ``auto`` (bf16 where the hardware
    has it natively: ``microlm.hw``)."""
    try:
        weights = torch_dtype(resolve_dtype(dtype, device))
    except ValueError as e:
        raise MicroLMError(str(e)) from None
    path = Path(path)
    if not path.exists():
        raise MicroLMError(f"model path not found: {path}")
    if adapter is not None and not Path(adapter).is_dir():
        raise MicroLMError(f"adapter folder not found: {adapter}")
    if (path / "config.json").is_file():
        model, tok = import_hf(path, device=device)
    else:
        ckpt = path / "ckpt" if (path / "ckpt" / "state.json").is_file() else path
        if not (ckpt / "state.json").is_file():
            raise MicroLMError(f"not a model folder (no config.json, ckpt/state.json or state.json): {path}")
        state = read_state(ckpt)
        model = TransformerLM(ModelConfig(**state["model"]))
        load_checkpoint(ckpt, model, restore_rng=False)
        if tokenizer is None:  # beside the checkpoint (an import), else the run's tokenizer stage
            near = [ckpt.parent / "tokenizer", ckpt.parent.parent / "tokenizer"]
            tokenizer = next((t for t in near if (t / "microlm_tokenizer.json").is_file()), near[-1])
        tok = Tokenizer.load(tokenizer)
        model = model.to(device).eval()
    if tok.vocab_size > model.cfg.vocab_size:
        raise MicroLMError(f"tokenizer has {tok.vocab_size} ids but the model only {model.cfg.vocab_size}")
    if adapter is not None:
        load_adapter(model, adapter)
        model.eval()
    if weights != torch.float32:
        model.cast(weights)
    return model, tok
