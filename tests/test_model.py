"""TransformerLM: pinned parameter count, shapes, causality, RoPE, GQA, KV cache == no cache."""

import math

import pytest
import torch

from microlm.errors import MicroLMError
from microlm.infer import generate_ids
from microlm.model import MODEL_PRESETS, ModelConfig, TransformerLM
from microlm.model.transformer import apply_rope, rope_tables
from microlm.stages import load_config

TINY = ModelConfig(vocab_size=97, dim=32, n_layers=2, n_heads=4, n_kv_heads=2, hidden_dim=64, max_seq_len=48)


def tiny(**kw) -> TransformerLM:
    torch.manual_seed(0)
    return TransformerLM(ModelConfig(**{**TINY.to_dict(), **kw})).eval()


def test_reference_model_has_exactly_31_724_032_parameters():
    m = TransformerLM(MODEL_PRESETS["microlm-31.7m"])
    assert m.num_parameters() == 31_724_032
    # by hand: 2 untied 6400×512 matrices + 8 × (4·512² attention + 3·512·1365 SwiGLU + 2·512 norms) + 512
    assert 2 * 6400 * 512 + 8 * (4 * 512 * 512 + 3 * 512 * 1365 + 2 * 512) + 512 == 31_724_032


def test_profiles_use_the_named_presets():
    assert load_config("gpu").model == MODEL_PRESETS["microlm-31.7m"]
    assert load_config("cpu").model == MODEL_PRESETS["microlm-cpu"]
    assert load_config("smoke").model == MODEL_PRESETS["microlm-smoke"]


def test_tied_embeddings_share_one_matrix():
    m = tiny(tie_embeddings=True)
    assert m.lm_head.weight is m.embed.weight
    assert m.num_parameters() == tiny().num_parameters() - 97 * 32


def test_forward_shapes_and_loss_at_init_is_near_log_vocab():
    m = tiny()
    x = torch.randint(0, 97, (3, 20))
    logits, loss = m(x, x)
    assert logits.shape == (3, 20, 97)
    assert abs(loss.item() - math.log(97)) < 0.3  # small init: near-uniform predictions


def test_ignore_index_positions_do_not_count():
    m = tiny()
    x = torch.randint(0, 97, (2, 10))
    y = x.clone()
    y[:, :5] = -100
    _, loss = m(x, y)
    logits, _ = m(x)
    ref = torch.nn.functional.cross_entropy(logits[:, 5:].reshape(-1, 97), y[:, 5:].reshape(-1))
    assert torch.allclose(loss, ref, atol=1e-6)


def test_attention_is_causal():
    m = tiny()
    x = torch.randint(0, 97, (1, 16))
    x2 = x.clone()
    x2[0, 10:] = (x2[0, 10:] + 1) % 97  # change the future
    a, _ = m(x)
    b, _ = m(x2)
    assert torch.allclose(a[:, :10], b[:, :10], atol=1e-6)
    assert not torch.allclose(a[:, 10:], b[:, 10:], atol=1e-3)


def test_explicit_attention_weights_match_sdpa_and_are_lower_triangular():
    m = tiny()
    x = torch.randint(0, 97, (2, 12))
    a, _ = m(x)
    b, _, weights = m(x, need_weights=True)
    assert torch.allclose(a, b, atol=1e-5)
    w = weights[0]
    assert w.shape == (2, 4, 12, 12)
    assert torch.allclose(w.sum(-1), torch.ones(2, 4, 12), atol=1e-5)
    assert float(w.detach().triu(diagonal=1).abs().max()) == 0.0


def test_bf16_training_attention_on_cpu_matches_sdpa(monkeypatch):
    """Under bf16 autocast on a CPU, training attention takes the explicit softmax (faster there);
    its loss and gradients are SDPA's up to bf16 rounding, causality included."""
    import microlm.model.transformer as tr
    from microlm.model.transformer import Attention

    m = tiny().train()
    x = torch.randint(0, 97, (3, 40))
    out = {}
    sdpa_calls = []
    real_sdpa = tr.F.scaled_dot_product_attention
    monkeypatch.setattr(tr.F, "scaled_dot_product_attention", lambda *a, **k: sdpa_calls.append(1) or real_sdpa(*a, **k))
    for explicit in (True, False):
        monkeypatch.setattr(Attention, "explicit_cpu_bf16", explicit)
        m.zero_grad()
        sdpa_calls.clear()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            logits, loss = m(x, x)
        loss.backward()
        assert len(sdpa_calls) == (0 if explicit else 2)  # the explicit path really ran (2 layers)
        out[explicit] = (logits.float(), float(loss), [p.grad.clone() for p in m.parameters()])
        x2 = x.clone()
        x2[:, 30:] = (x2[:, 30:] + 1) % 97  # the future changes, the past's logits do not
        with torch.autocast("cpu", dtype=torch.bfloat16), torch.no_grad():
            assert torch.equal(m(x2)[0][:, :30], logits[:, :30].detach())
    assert abs(out[True][1] - out[False][1]) < 2e-3
    assert (out[True][0] - out[False][0]).abs().max() < 5e-2
    for g1, g2 in zip(out[True][2], out[False][2], strict=True):
        assert (g1 - g2).norm() <= 0.05 * g2.norm() + 1e-6


def test_rope_rotates_pairs_and_keeps_norms():
    cos, sin = rope_tables(8, 10)
    x = torch.randn(1, 1, 10, 8)
    y = apply_rope(x, cos, sin)
    assert torch.allclose(y.norm(dim=-1), x.norm(dim=-1), atol=1e-5)
    assert torch.allclose(y[..., 0, :], x[..., 0, :])  # position 0: no rotation
    # relative: <rope(q, m), rope(k, n)> depends only on m - n
    q, k = torch.randn(8), torch.randn(8)
    qs = apply_rope(q.expand(1, 1, 10, 8).clone(), cos, sin)[0, 0]
    ks = apply_rope(k.expand(1, 1, 10, 8).clone(), cos, sin)[0, 0]
    assert torch.allclose(qs[5] @ ks[3], qs[7] @ ks[5], atol=1e-5)


def test_gqa_shrinks_kv_projections_and_cache():
    full, gqa = tiny(n_kv_heads=None), tiny(n_kv_heads=2)
    assert gqa.layers[0].attn.qkv_proj.weight.shape == (32 + 2 * 16, 32)  # 4 q heads, 2 k + 2 v heads of 8
    assert full.layers[0].attn.qkv_proj.weight.shape == (3 * 32, 32)
    assert gqa.new_cache(1).nbytes * 2 == full.new_cache(1).nbytes


@pytest.mark.parametrize("n_kv", [None, 2, 1])
def test_kv_cache_matches_the_uncached_forward(n_kv):
    m = tiny(n_kv_heads=n_kv)
    x = torch.randint(0, 97, (2, 30))
    full, _ = m(x)
    cache = m.new_cache(2)
    prefill, _ = m(x[:, :17], cache=cache)  # prompt
    steps = [prefill]
    for t in range(17, 24):  # one token at a time
        out, _ = m(x[:, t:t + 1], cache=cache)
        steps.append(out)
    chunk, _ = m(x[:, 24:], cache=cache)  # and a multi-token chunk after a cached prefix
    steps.append(chunk)
    cached = torch.cat(steps, dim=1)
    assert cache.pos == 30
    assert (cached - full).abs().max().item() < 1e-5


def test_greedy_generation_is_identical_with_and_without_cache():
    m = tiny()
    prompt = torch.randint(0, 97, (2, 5)).tolist()
    a = generate_ids(m, prompt, max_new_tokens=30, temperature=0, use_cache=True)
    b = generate_ids(m, prompt, max_new_tokens=30, temperature=0, use_cache=False)
    assert a == b and [len(x) for x in a] == [30, 30]


def test_decode_layout_makes_the_longer_side_contiguous_and_changes_nothing_else(tmp_path):
    from safetensors.torch import load_file

    from microlm.model.hf_export import export_llama, to_llama_state_dict

    m = tiny()
    ref = {k: v.clone() for k, v in m.state_dict().items()}
    params = list(m.parameters())
    prompt = torch.randint(0, 97, (2, 5)).tolist()
    ids = generate_ids(m, prompt, max_new_tokens=20, temperature=0)
    x = torch.randint(0, 97, (2, 9))
    logits = m(x)[0]
    assert m.decode_layout() is m
    linears = [mod for mod in m.modules() if isinstance(mod, torch.nn.Linear)]
    wide = [mod for mod in linears if mod.out_features > mod.in_features]  # qkv, gate_up, lm_head
    assert len(linears) == 9 and len(wide) == 5 and all(mod.weight.stride(0) == 1 for mod in wide)
    assert all(mod.weight.is_contiguous() for mod in linears if mod not in wide), "the rest keep row-major"
    assert [id(p) for p in m.parameters()] == [id(p) for p in params], "same Parameter objects (optimizers keep them)"
    assert all(torch.equal(v, ref[k]) for k, v in m.state_dict().items())
    assert torch.allclose(m(x)[0], logits, atol=1e-5)
    assert generate_ids(m, prompt, max_new_tokens=20, temperature=0) == ids
    m.decode_layout()  # idempotent
    assert all(mod.weight.stride(0) == 1 for mod in wide)
    export_llama(m, tmp_path / "hf")  # safetensors wants contiguous tensors: the export copes
    saved, plain = load_file(tmp_path / "hf" / "model.safetensors"), to_llama_state_dict(tiny())
    assert saved.keys() == plain.keys() and all(torch.equal(saved[k], plain[k]) for k in plain)
    m.decode_layout(False)
    assert all(mod.weight.is_contiguous() for mod in linears)
    tied = tiny(tie_embeddings=True).decode_layout()
    assert tied.lm_head.weight is tied.embed.weight and tied.embed.weight.stride(0) == 1


def test_cache_overflow_and_too_long_inputs_are_clear_errors():
    m = tiny()
    cache = m.new_cache(1, max_len=8)
    m(torch.zeros(1, 8, dtype=torch.long), cache=cache)
    with pytest.raises(MicroLMError, match="KV cache full"):
        m(torch.zeros(1, 1, dtype=torch.long), cache=cache)
    with pytest.raises(MicroLMError, match="max_seq_len"):
        m(torch.zeros(1, 49, dtype=torch.long))


def test_bad_model_config_is_rejected():
    with pytest.raises(MicroLMError, match="divisible"):
        ModelConfig(dim=30, n_heads=4).validate()
    with pytest.raises(MicroLMError, match="n_kv_heads"):
        ModelConfig(n_heads=8, n_kv_heads=3).validate()


def test_residual_projections_get_scaled_init():
    m = TransformerLM(MODEL_PRESETS["microlm-cpu"])
    o = m.layers[0].attn.o_proj.weight.std().item()
    q = m.layers[0].attn.qkv_proj.weight.std().item()
    assert abs(q - 0.02) < 0.002
    assert abs(o - 0.02 / math.sqrt(2 * 4)) < 0.001
