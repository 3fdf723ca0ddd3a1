"""Our model and LoRA against transformers' Llama and PEFT: same logits, adapters PEFT can load."""

import json

import pytest
import torch

from microlm.errors import MicroLMError
from microlm.model import ModelConfig, TransformerLM
from microlm.model.hf_export import export_llama
from microlm.model.lora import LoRAConfig, apply_lora, load_adapter, lora_modules, save_adapter

CFG = ModelConfig(vocab_size=67, dim=32, n_layers=2, n_heads=4, n_kv_heads=2, hidden_dim=40, max_seq_len=32)


def base():
    torch.manual_seed(0)
    return TransformerLM(CFG).eval()


def with_adapters(targets, r=4, alpha=8.0):
    m = base()
    lcfg = LoRAConfig(r=r, alpha=alpha, targets=targets)
    apply_lora(m, lcfg)
    g = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for mod in lora_modules(m).values():
            for b in mod.lora_B:
                b.copy_(torch.randn(b.shape, generator=g) * 0.1)
    return m, lcfg


def hf_model(folder):
    from transformers import LlamaForCausalLM

    return LlamaForCausalLM.from_pretrained(str(folder), attn_implementation="eager").eval()


def test_llama_export_gives_the_same_logits(tmp_path):
    m = base()
    export_llama(m, tmp_path / "hf")
    x = torch.randint(0, 67, (2, 12))
    ours, _ = m(x)
    theirs = hf_model(tmp_path / "hf")(input_ids=x).logits
    assert (ours - theirs).abs().max().item() < 1e-5


@pytest.mark.parametrize("targets", [["q", "k", "v", "o"], ["layers.1.attn.k", "gate", "down"]])
def test_our_lora_equals_peft_lora_and_our_adapter_loads_in_peft(tmp_path, targets):
    from peft import PeftModel

    m, lcfg = with_adapters(targets)
    export_llama(base(), tmp_path / "hf")
    save_adapter(m, lcfg, tmp_path / "adapter", base_model_name=str(tmp_path / "hf"))
    x = torch.randint(0, 67, (2, 12))
    ours, _ = m(x)
    peft_model = PeftModel.from_pretrained(hf_model(tmp_path / "hf"), str(tmp_path / "adapter")).eval()
    theirs = peft_model(input_ids=x).logits
    assert (ours - theirs).abs().max().item() < 1e-5
    no_lora = hf_model(tmp_path / "hf")(input_ids=x).logits
    assert (theirs - no_lora).abs().max().item() > 1e-3  # the adapters were really applied
    n_peft = sum(p.numel() for n, p in peft_model.named_parameters() if "lora_" in n)
    assert n_peft == sum(p.numel() for n, p in m.named_parameters() if "lora_" in n)


def test_adapter_round_trip_and_mismatch_errors(tmp_path):
    m, lcfg = with_adapters(["q", "v"])
    save_adapter(m, lcfg, tmp_path / "a")
    x = torch.randint(0, 67, (1, 10))
    fresh = base()
    got = load_adapter(fresh, tmp_path / "a")
    assert got.r == 4 and got.targets == ["q", "v"]
    assert torch.allclose(fresh(x)[0], m(x)[0], atol=1e-6)
    other = TransformerLM(ModelConfig(**{**CFG.to_dict(), "dim": 48, "hidden_dim": 56}))
    with pytest.raises(MicroLMError, match=r"another base model: model\.dim: 32"):
        load_adapter(other, tmp_path / "a")
    meta = json.loads((tmp_path / "a" / "adapter_config.json").read_text())
    meta["r"] = 8
    (tmp_path / "a" / "adapter_config.json").write_text(json.dumps(meta))
    with pytest.raises(MicroLMError, match="has shape"):
        load_adapter(base(), tmp_path / "a")
    with pytest.raises(MicroLMError, match="adapter file missing"):
        load_adapter(base(), tmp_path / "nope")
