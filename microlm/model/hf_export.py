"""The Hugging Face view of a TransformerLM, both ways (the ``hf`` stage exports with it,
``microlm import-hf`` imports).

``export_hf`` writes a folder that ``transformers.AutoModelForCausalLM`` / ``AutoTokenizer`` (and
vLLM) load without custom code: Llama ``config.json``, ``model.safetensors``, ``tokenizer.json``,
``tokenizer_config.json`` (ChatML chat template), ``generation_config.json`` (both stop ids, our
sampling defaults).  ``import_hf`` reads such a folder — or any Llama-layout checkpoint with a
byte-level BPE ``tokenizer.json`` — back into a TransformerLM and our Tokenizer, so it can be
trained further with our trainer.

Our RoPE uses the same rotate-half layout as Hugging Face's Llama, so weights map one to one; the
fused ``qkv_proj`` / ``gate_up_proj`` matrices are split into ``q_proj, k_proj, v_proj`` and
``gate_proj, up_proj`` (and fused again on import).
"""

from __future__ import annotations

import copy
from pathlib import Path

import torch
from safetensors.torch import save_file

from microlm.errors import MicroLMError
from microlm.io import load_json_file, reported_write, staged_dir, write_json
from microlm.model.checkpoint import load_tensors, save_checkpoint
from microlm.model.config import ModelConfig
from microlm.model.lora import LLAMA_PROJ, LoRALinear, lora_modules, merge_lora
from microlm.model.transformer import TransformerLM
from microlm.tokenizer import Tokenizer, stop_ids_of
from microlm.tokenizer.bytes_unicode import text_to_bytes
from microlm.tokenizer.hf import write_hf_tokenizer

__all__ = ["llama_config", "to_llama_state_dict", "export_llama", "export_hf", "import_hf", "model_config_from_llama",
           "from_llama_state_dict", "tokenizer_from_hf", "generation_config", "import_checkpoint",
           "LLAMA_PROJ"]

def llama_config(cfg: ModelConfig, eos_id: int = 2, pad_id: int = 0) -> dict:
    return {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.dim, "intermediate_size": cfg.hidden_dim, "num_hidden_layers": cfg.n_layers,
        "num_attention_heads": cfg.n_heads, "num_key_value_heads": cfg.kv_heads, "head_dim": cfg.head_dim,
        "max_position_embeddings": cfg.max_seq_len, "rms_norm_eps": cfg.norm_eps, "rope_theta": cfg.rope_theta,
        "hidden_act": "silu", "tie_word_embeddings": cfg.tie_embeddings, "attention_bias": False,
        "mlp_bias": False, "torch_dtype": "float32", "bos_token_id": None, "eos_token_id": eos_id, "pad_token_id": pad_id,
        "rope_scaling": None, "attention_dropout": 0.0, "initializer_range": 0.02, "use_cache": True,
    }


def to_llama_state_dict(model) -> dict[str, torch.Tensor]:
    """Our weights under Llama's names (fused matrices split; LoRA layers must be merged or absent)."""
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
        # nn.Linear weights are (out, in): split along the rows, q (H·D, C), k and v (Hkv·D, C) each
        qkv = weight(layer.attn.qkv_proj)  # ((H + 2·Hkv)·D, C)
        gu = weight(layer.mlp.gate_up_proj)  # (2·hidden, C): gate rows, then up rows
        out.update({
            p + "input_layernorm.weight": layer.input_norm.weight,
            p + "post_attention_layernorm.weight": layer.post_attn_norm.weight,
            p + "self_attn.q_proj.weight": qkv[:q], p + "self_attn.k_proj.weight": qkv[q:q + kv],
            p + "self_attn.v_proj.weight": qkv[q + kv:], p + "self_attn.o_proj.weight": weight(layer.attn.o_proj),
            p + "mlp.gate_proj.weight": gu[:c.hidden_dim], p + "mlp.up_proj.weight": gu[c.hidden_dim:],
            p + "mlp.down_proj.weight": weight(layer.mlp.down_proj),
        })
    return {k: v.detach().contiguous().clone() for k, v in out.items()}


def export_llama(model, out_dir: str | Path, eos_id: int = 2, pad_id: int = 0) -> Path:
    """Weights + ``config.json`` only (``LlamaForCausalLM.from_pretrained`` loads it; no tokenizer)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    with reported_write(out / "model.safetensors", "writing the exported weights"):
        save_file(to_llama_state_dict(model), str(out / "model.safetensors"), metadata={"format": "pt"})
    write_json(out / "config.json", llama_config(model.cfg, eos_id, pad_id))
    return out


def generation_config(tok, gen=None) -> dict:
    """``generation_config.json``: stop at ``<|im_end|>`` or ``<|endoftext|>``; the sampling defaults of
    ``gen`` (a ``GenerationConfig``; ``None``: greedy, transformers' other defaults)."""
    out = {"bos_token_id": None, "eos_token_id": stop_ids_of(tok), "pad_token_id": tok.eos_id}
    if gen is None:
        return {**out, "do_sample": False}
    out.update(max_new_tokens=gen.max_new_tokens, repetition_penalty=gen.repetition_penalty)
    if gen.temperature > 0:
        out.update(do_sample=True, temperature=gen.temperature, top_k=gen.top_k, top_p=gen.top_p)
    else:
        out["do_sample"] = False
    return out


def export_hf(model, tok, out_dir: str | Path, gen=None, *, source: dict | None = None) -> Path:
    """The full transformers-loadable folder (see the module docstring); LoRA layers are merged
    into a copy of the weights first.  Replaced atomically."""
    if tok.vocab_size > model.cfg.vocab_size:
        raise MicroLMError(f"tokenizer has {tok.vocab_size} ids but the model only {model.cfg.vocab_size}")
    if lora_modules(model):
        model = copy.deepcopy(model)
        merge_lora(model)
    eos = tok.special_ids.get("<|im_end|>", tok.eos_id)
    with staged_dir(Path(out_dir)) as tmp:
        export_llama(model, tmp, eos_id=eos, pad_id=tok.eos_id)
        write_hf_tokenizer(tok, tmp)
        write_json(tmp / "generation_config.json", generation_config(tok, gen))
        write_json(tmp / "microlm_export.json", {"model": model.cfg.to_dict(), "source": source or {},
                                                 "tokenizer": {"pattern": tok.pattern,
                                                               "special_tokens": tok.special_tokens}})
    return Path(out_dir)


def model_config_from_llama(conf: dict, where: str | Path = "config.json") -> ModelConfig:
    """Our ModelConfig for a Llama ``config.json``; what we cannot represent is a one-line error."""
    try:
        return _model_config_from_llama(conf)
    except KeyError as e:
        raise MicroLMError(f"{where}: the key {e} is missing") from None
    except MicroLMError as e:
        raise MicroLMError(f"{where}: {e}") from None
    except (TypeError, ValueError, ZeroDivisionError) as e:
        raise MicroLMError(f"{where}: a value does not make sense ({type(e).__name__}: {e})") from None


def _model_config_from_llama(conf: dict) -> ModelConfig:
    arch = conf.get("model_type")
    if arch != "llama":
        raise MicroLMError(f"only Llama-layout checkpoints can be imported, this one is model_type={arch!r}")
    unsupported = [k for k in ("attention_bias", "mlp_bias") if conf.get(k)]
    if conf.get("rope_scaling"):
        unsupported.append("rope_scaling")
    if conf.get("hidden_act", "silu") != "silu":
        unsupported.append(f"hidden_act={conf['hidden_act']}")
    heads = conf["num_attention_heads"]
    if not isinstance(heads, int) or heads < 1:
        raise MicroLMError(f"num_attention_heads must be a positive integer, got {heads!r}")
    if conf.get("head_dim") not in (None, conf["hidden_size"] // heads):
        unsupported.append(f"head_dim={conf['head_dim']} != hidden_size / heads")
    if unsupported:
        raise MicroLMError(f"Llama features MicroLM does not implement: {', '.join(unsupported)}")
    return ModelConfig(vocab_size=conf["vocab_size"], dim=conf["hidden_size"], n_layers=conf["num_hidden_layers"],
                       n_heads=heads, n_kv_heads=conf.get("num_key_value_heads") or heads,
                       hidden_dim=conf["intermediate_size"], max_seq_len=conf.get("max_position_embeddings", 2048),
                       rope_theta=float(conf.get("rope_theta", 10000.0)), norm_eps=float(conf.get("rms_norm_eps", 1e-6)),
                       tie_embeddings=bool(conf.get("tie_word_embeddings", False))).validate()


def from_llama_state_dict(sd: dict[str, torch.Tensor], cfg: ModelConfig) -> dict[str, torch.Tensor]:
    """Llama names → our names (q/k/v and gate/up fused again); missing tensors are an error."""
    def take(name):
        if name not in sd:
            raise MicroLMError(f"checkpoint lacks tensor {name}")
        return sd[name]

    out = {"embed.weight": take("model.embed_tokens.weight"), "norm.weight": take("model.norm.weight")}
    out["lm_head.weight"] = out["embed.weight"] if cfg.tie_embeddings else take("lm_head.weight")
    for i in range(cfg.n_layers):
        p, q = f"model.layers.{i}.", f"layers.{i}."
        out.update({
            q + "input_norm.weight": take(p + "input_layernorm.weight"),
            q + "post_attn_norm.weight": take(p + "post_attention_layernorm.weight"),
            # stacked along the rows (dim 0), q then k then v, as Attention splits its output
            q + "attn.qkv_proj.weight": torch.cat([take(p + f"self_attn.{n}_proj.weight") for n in "qkv"]),
            q + "attn.o_proj.weight": take(p + "self_attn.o_proj.weight"),
            q + "mlp.gate_up_proj.weight": torch.cat([take(p + "mlp.gate_proj.weight"), take(p + "mlp.up_proj.weight")]),
            q + "mlp.down_proj.weight": take(p + "mlp.down_proj.weight"),
        })
    return out


def tokenizer_from_hf(folder: str | Path):
    """Our Tokenizer from a byte-level BPE ``tokenizer.json`` (ours, or e.g. Qwen2's): vocab, merges,
    the ``Split`` regex and the special (added) tokens."""
    path = Path(folder) / "tokenizer.json"
    if not path.is_file():
        raise MicroLMError(f"no tokenizer.json in {folder}")
    tj = load_json_file(path, "tokenizer file")
    model = tj.get("model") or {}
    if model.get("type") != "BPE":
        raise MicroLMError(f"{path}: only byte-level BPE tokenizers can be imported (model type {model.get('type')!r})")
    pre = tj.get("pre_tokenizer") or {}
    splits = [p for p in pre.get("pretokenizers", [pre]) if p.get("type") == "Split"]
    if not splits:
        raise MicroLMError(f"{path}: no Split pre-tokenizer regex to reproduce")
    try:
        specials = [t["content"] for t in sorted(tj.get("added_tokens", []), key=lambda t: t["id"]) if t.get("special")]
        spec_ids = {t["content"]: t["id"] for t in tj.get("added_tokens", [])}
        vocab = {int(i): (t.encode("utf-8") if t in spec_ids else text_to_bytes(t)) for t, i in model["vocab"].items()}
        vocab.update({i: s.encode("utf-8") for s, i in spec_ids.items()})
        merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in model["merges"]]
        pattern = splits[0]["pattern"]["Regex"]
    except (KeyError, TypeError, ValueError, AttributeError) as e:
        raise MicroLMError(f"{path}: not a byte-level BPE tokenizer.json we can read ({type(e).__name__}: {e})") from None
    return Tokenizer(vocab, [(text_to_bytes(a), text_to_bytes(b)) for a, b in merges], specials, pattern=pattern)


def import_hf(folder: str | Path, *, device: str = "cpu"):
    """``(TransformerLM, Tokenizer)`` from a transformers Llama folder (fp32 weights)."""
    folder = Path(folder)
    cfg_path = folder / "config.json"
    if not cfg_path.is_file():
        raise MicroLMError(f"not a Hugging Face model folder (no config.json): {folder}")
    cfg = model_config_from_llama(load_json_file(cfg_path, "model config"), cfg_path)
    files = sorted(folder.glob("model*.safetensors"))
    if not files:
        raise MicroLMError(f"no model*.safetensors in {folder}")
    sd: dict[str, torch.Tensor] = {}
    for f in files:
        sd.update(load_tensors(f))
    model = TransformerLM(cfg)
    ours = from_llama_state_dict(sd, cfg)
    try:
        missing, unexpected = model.load_state_dict({k: v.float() for k, v in ours.items()}, strict=False)
    except RuntimeError as e:  # shapes that contradict config.json
        detail = next((ln.strip() for ln in str(e).splitlines() if "size mismatch" in ln), str(e).splitlines()[0])
        raise MicroLMError(f"the weights in {folder} do not fit its config.json: {detail}") from None
    if missing or unexpected:
        raise MicroLMError(f"weights do not fit: missing {missing[:3]}, unexpected {unexpected[:3]}")
    return model.to(device).eval(), tokenizer_from_hf(folder)


def import_checkpoint(folder: str | Path, out_dir: str | Path) -> Path:
    """``import_hf`` written as our checkpoint (``<out>/ckpt``, step 0) + ``<out>/tokenizer``, so the
    trainer (``Trainer``, ``load_checkpoint``) and ``microlm chat --model <out>`` can use it."""
    model, tok = import_hf(folder)
    out = Path(out_dir)
    save_checkpoint(out / "ckpt", model, None, {"step": 0, "model": model.cfg.to_dict(), "stage": "import-hf",
                                                "source": str(Path(folder).resolve())})
    tok.save(out / "tokenizer")
    return out
