"""LoRA from scratch: pinned parameter count, zero-init identity, merge == unmerged, slices, freezing."""

import pytest
import torch
import torch.nn.functional as F

from microlm.errors import MicroLMError
from microlm.model import MODEL_PRESETS, ModelConfig, TransformerLM
from microlm.model.lora import LoRAConfig, LoRALinear, apply_lora, lora_modules, merge_lora, unmerge_lora

TINY = ModelConfig(vocab_size=61, dim=32, n_layers=2, n_heads=4, n_kv_heads=2, hidden_dim=48, max_seq_len=32)


def tiny():
    torch.manual_seed(0)
    return TransformerLM(TINY).eval()


def randomize_b(model):
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for m in lora_modules(model).values():
            for b in m.lora_B:
                b.copy_(torch.randn(b.shape, generator=g) * 0.05)


def test_reference_setting_trains_262_144_parameters_0_83_percent():
    m = TransformerLM(MODEL_PRESETS["microlm-31.7m"])
    rep = apply_lora(m, LoRAConfig(r=8, targets=["q", "k", "v", "o"]))
    assert rep["adapter_params"] == rep["trainable_params"] == 262_144  # 8 layers × 4 × (8·512 + 512·8)
    assert rep["base_params"] == 31_724_032
    assert f"{rep['percent_of_base']:.2f}" == "0.83"


def test_zero_initialised_b_leaves_the_model_unchanged():
    m = tiny()
    x = torch.randint(0, 61, (2, 9))
    before, _ = m(x)
    apply_lora(m, LoRAConfig(r=4, targets=["q", "v", "o", "gate", "down"]))
    after, _ = m(x)
    assert torch.equal(before, after)


def test_merge_equals_unmerged_and_unmerge_restores_the_base():
    m = tiny()
    base_w = {n: p.detach().clone() for n, p in m.named_parameters()}
    x = torch.randint(0, 61, (2, 11))
    base_out, _ = m(x)
    apply_lora(m, LoRAConfig(r=4, alpha=8, targets=["q", "k", "v", "o", "gate", "up", "down"]))
    randomize_b(m)
    unmerged, _ = m(x)
    merge_lora(m)
    merged, _ = m(x)
    assert (merged - unmerged).abs().max().item() < 1e-5
    assert (merged - base_out).abs().max().item() > 1e-3  # the adapters really change the output
    unmerge_lora(m)
    for n, p in m.named_parameters():
        key = n.replace(".base.", ".")
        if key in base_w:
            assert torch.allclose(p, base_w[key], atol=1e-6), n


def test_a_fused_slice_gets_exactly_the_update_of_a_separate_projection():
    m = tiny()
    apply_lora(m, LoRAConfig(r=2, alpha=6, targets=["layers.0.attn.k"]))
    randomize_b(m)
    layer = m.layers[0].attn.qkv_proj
    assert isinstance(layer, LoRALinear) and layer.index == [-1, 0, -1]
    x = torch.randn(3, 32)
    y = layer(x)
    w = layer.base.weight
    q, kv = 32, 16
    a, b = layer.lora_A[0], layer.lora_B[0]
    assert torch.allclose(y[:, :q], F.linear(x, w[:q]), atol=1e-6)  # q untouched
    assert torch.allclose(y[:, q:q + kv], F.linear(x, w[q:q + kv]) + 3.0 * (x @ a.T @ b.T), atol=1e-6)
    assert torch.allclose(y[:, q + kv:], F.linear(x, w[q + kv:]), atol=1e-6)  # v untouched
    assert len(lora_modules(m)) == 1


def test_only_adapters_train():
    m = tiny()
    apply_lora(m, LoRAConfig(r=4, targets=["q", "o"]))
    frozen = {n: p.detach().clone() for n, p in m.named_parameters() if not p.requires_grad}
    assert all("lora_" not in n for n in frozen) and frozen
    opt = torch.optim.AdamW([p for p in m.parameters() if p.requires_grad], lr=1e-2)
    m.train()
    x = torch.randint(0, 61, (4, 12))
    for _ in range(3):
        _, loss = m(x, x)
        loss.backward()
        opt.step()
        opt.zero_grad()
    for n, p in m.named_parameters():
        if n in frozen:
            assert torch.equal(p, frozen[n]), f"{n} changed"
    assert any(float(b.detach().abs().sum()) > 0 for mod in lora_modules(m).values() for b in mod.lora_B)


def test_patterns_select_modules_and_bad_targets_are_errors():
    m = tiny()
    rep = apply_lora(m, LoRAConfig(r=2, targets=["*.mlp.*"]))
    assert rep["modules"] == 2 * 2  # gate_up and down in each of 2 layers
    with pytest.raises(MicroLMError, match="matches no projection"):
        apply_lora(tiny(), LoRAConfig(targets=["q_proj"]))
    with pytest.raises(MicroLMError, match="already has LoRA"):
        apply_lora(m, LoRAConfig(r=2, targets=["down"]))
    with pytest.raises(MicroLMError, match="rank must be >= 1"):
        apply_lora(tiny(), LoRAConfig(r=0))
