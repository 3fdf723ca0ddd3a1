"""The Llama-layout view of a TransformerLM: state-dict names, ``LlamaConfig`` and a minimal
transformers-loadable folder (``config.json`` + ``model.safetensors``).

Our RoPE uses the same rotate-half layout as Hugging Face's Llama, so weights map one to one; the
fused ``qkv_proj`` / ``gate_up_proj`` matrices are split into ``q_proj, k_proj, v_proj`` and
``gate_proj, up_proj``.  (Stage A8 builds the full export — tokenizer, generation config, checks.)
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from microlm.model.config import ModelConfig

__all__ = ["llama_config", "to_llama_state_dict", "export_llama", "LLAMA_PROJ"]

# our logical projection name → the Llama module that holds it
LLAMA_PROJ = {"q": "self_attn.q_proj", "k": "self_attn.k_proj", "v": "self_attn.v_proj", "o": "self_attn.o_proj",
              "gate": "mlp.gate_proj", "up": "mlp.up_proj", "down": "mlp.down_proj"}


def llama_config(cfg: ModelConfig) -> dict:
    return {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.dim, "intermediate_size": cfg.hidden_dim, "num_hidden_layers": cfg.n_layers,
        "num_attention_heads": cfg.n_heads, "num_key_value_heads": cfg.kv_heads, "head_dim": cfg.head_dim,
        "max_position_embeddings": cfg.max_seq_len, "rms_norm_eps": cfg.norm_eps, "rope_theta": cfg.rope_theta,
        "hidden_act": "silu", "tie_word_embeddings": cfg.tie_embeddings, "attention_bias": False,
        "mlp_bias": False, "torch_dtype": "float32", "bos_token_id": None, "eos_token_id": 2, "pad_token_id": 0,
    }


def to_llama_state_dict(model) -> dict[str, torch.Tensor]:
    """Our weights under Llama's names (fused matrices split; LoRA layers must be merged or absent)."""
    from microlm.model.lora import LoRALinear

    c = model.cfg
    q, kv = c.n_heads * c.head_dim, c.kv_heads * c.head_dim
    out = {"model.embed_tokens.weight": model.embed.weight, "model.norm.weight": model.norm.weight}
    if not c.tie_embeddings:
        out["lm_head.weight"] = model.lm_head.weight

    def weight(mod):
        if isinstance(mod, LoRALinear):
            if not mod.merged:
                raise ValueError("merge LoRA adapters before exporting the base weights")
            mod = mod.base
        return mod.weight

    for i, layer in enumerate(model.layers):
        p = f"model.layers.{i}."
        qkv = weight(layer.attn.qkv_proj)
        gu = weight(layer.mlp.gate_up_proj)
        out.update({
            p + "input_layernorm.weight": layer.input_norm.weight,
            p + "post_attention_layernorm.weight": layer.post_attn_norm.weight,
            p + "self_attn.q_proj.weight": qkv[:q], p + "self_attn.k_proj.weight": qkv[q:q + kv],
            p + "self_attn.v_proj.weight": qkv[q + kv:], p + "self_attn.o_proj.weight": weight(layer.attn.o_proj),
            p + "mlp.gate_proj.weight": gu[:c.hidden_dim], p + "mlp.up_proj.weight": gu[c.hidden_dim:],
            p + "mlp.down_proj.weight": weight(layer.mlp.down_proj),
        })
    return {k: v.detach().contiguous().clone() for k, v in out.items()}


def export_llama(model, out_dir: str | Path) -> Path:
    """A minimal folder ``LlamaForCausalLM.from_pretrained`` loads (weights + config only)."""
    from safetensors.torch import save_file

    from microlm.io import write_json

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    save_file(to_llama_state_dict(model), str(out / "model.safetensors"), metadata={"format": "pt"})
    write_json(out / "config.json", llama_config(model.cfg))
    return out


def read_llama_config(folder: str | Path) -> dict:
    return json.loads((Path(folder) / "config.json").read_text(encoding="utf-8"))
