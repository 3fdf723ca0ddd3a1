# ---
# jupyter:
#   kernelspec:
#     display_name: Python 3 (ipykernel)
#     language: python
#     name: python3
# ---

# %% [markdown]
# # 04 · Attention, RoPE and the KV cache (stage A5, the model)
#
# MicroLM's model (`microlm/model/transformer.py`) is a small Llama-style decoder:
#
# ```
# ids → embedding → N × [ RMSNorm → causal self-attention (RoPE, GQA) → + ,
#                         RMSNorm → SwiGLU MLP → + ] → RMSNorm → LM head → logits
# ```
#
# This chapter opens up the attention block: the causal mask, rotary position embeddings, what
# grouped-query attention saves, and the KV cache that makes generation fast. The heatmaps use the
# model pretrained at this profile (stage A5, trained here if it is not there yet; chapter 05 shows
# the run).

# %% tags=["parameters"]
import os

profile = os.environ.get("MICROLM_PROFILE", "cpu")

# %%
import time

import matplotlib.pyplot as plt
import numpy as np
import torch

from microlm import stages
from microlm.infer import generate_ids
from microlm.model import MODEL_PRESETS, ModelConfig, TransformerLM, load_model
from microlm.model.transformer import apply_rope, rope_tables
from microlm.stages import load_config

cfg = load_config(profile)
pre_dir = stages.require("pretrain", cfg)
model, tok = load_model(pre_dir, tokenizer=stages.stage_dir(cfg, "tokenizer"))  # the one loader, eval mode
assert model.cfg == cfg.model
print(f"{cfg.model}\n{model.num_parameters():,} parameters")

# %% [markdown]
# ## 1 · The causal mask
#
# Position *t* may look at positions ≤ *t* only — the model is trained to predict token *t+1* from
# what came before, so it must never see it. In the attention matrix that is a lower triangle:
# scores above the diagonal are set to −∞ before the softmax, so their weights are exactly 0.

# %%
T = 10
mask = torch.ones(T, T, dtype=torch.bool).tril()
plt.figure(figsize=(3.2, 3.2))
plt.imshow(mask, cmap="Greens")
plt.xlabel("key position (attended to)")
plt.ylabel("query position")
plt.title("causal mask")
plt.show()
assert mask.sum() == T * (T + 1) // 2

# %% [markdown]
# ## 2 · Rotary position embeddings (RoPE)
#
# Attention itself is blind to order. RoPE rotates each pair of query/key dimensions by an angle
# proportional to the position, with a different speed per pair (fast for the first pairs, very slow
# for the last). A dot product of a rotated query and key then depends only on their **distance**,
# which is exactly what a language model needs.

# %%
hd = cfg.model.head_dim
cos, sin = rope_tables(hd, 64, cfg.model.rope_theta)
fig, ax = plt.subplots(1, 2, figsize=(11, 3.4))
ax[0].imshow(cos.T, aspect="auto", cmap="RdBu")
ax[0].set_xlabel("position")
ax[0].set_ylabel("dimension pair")
ax[0].set_title("cos(position × frequency)")
q, k = torch.randn(hd), torch.randn(hd)
qs = apply_rope(q.expand(1, 1, 64, hd).clone(), cos, sin)[0, 0]
ks = apply_rope(k.expand(1, 1, 64, hd).clone(), cos, sin)[0, 0]
scores = (qs @ ks.T).numpy()
ax[1].plot([scores[40, 40 - d] for d in range(40)], label="query at 40")
ax[1].plot([scores[60, 60 - d] for d in range(40)], "--", label="query at 60")
ax[1].set_xlabel("distance to the key")
ax[1].set_ylabel("q·k score")
ax[1].set_title("same vectors, scores depend on distance only")
ax[1].legend()
plt.tight_layout()
plt.show()
assert np.allclose(scores[40, 40 - np.arange(20)], scores[60, 60 - np.arange(20)], atol=1e-4)

# %% [markdown]
# ## 3 · What the trained model attends to
#
# Attention weights of every head in the first and last layer on a real sentence (computed with an
# explicit softmax — the training path uses PyTorch's fused `scaled_dot_product_attention`, and the
# two agree, as asserted). Axes show the tokens when a Chinese font is installed, else their positions
# (the list printed below maps positions to tokens).

# %%
from microlm.plotting import cjk_font

sentence = "中国的首都是北京，北京是一座历史悠久的城市。"
ids = torch.tensor([tok.encode(sentence)])
tokens = [tok.id_to_token(i) for i in ids[0].tolist()]
print(" ".join(f"{k}:{t}" for k, t in enumerate(tokens)))
labels = tokens if cjk_font() else [str(k) for k in range(len(tokens))]
with torch.no_grad():
    logits_sdpa, _ = model(ids)
    logits_explicit, _, weights = model(ids, need_weights=True)
assert torch.allclose(logits_sdpa, logits_explicit, atol=1e-4)
n_heads = cfg.model.n_heads
fig, axes = plt.subplots(2, n_heads, figsize=(2.6 * n_heads, 5.6))
for row, layer in enumerate([0, cfg.model.n_layers - 1]):
    for h in range(n_heads):
        a = axes[row, h]
        a.imshow(weights[layer][0, h].numpy(), cmap="viridis", vmin=0, vmax=1)
        a.set_title(f"layer {layer} head {h}", fontsize=8)
        a.set_xticks(range(len(labels)))
        a.set_yticks(range(len(labels)))
        a.set_xticklabels(labels if row == 1 else [], rotation=90, fontsize=6)
        a.set_yticklabels(labels if h == 0 else [], fontsize=6)
plt.tight_layout()
plt.show()
w = weights[0][0]
assert torch.allclose(w.sum(-1), torch.ones_like(w.sum(-1)), atol=1e-5)
assert float(w.triu(diagonal=1).max()) == 0.0, "no weight on the future"

# %% [markdown]
# ## 4 · Grouped-query attention: the memory arithmetic
#
# Generating token by token, the model keeps every past key and value: per layer
# `2 × kv_heads × head_dim × positions × bytes`. GQA lets several query heads share one key/value
# head, shrinking that cache (and the memory traffic of each decode step) by `n_heads / kv_heads`.
# For the 31.7M reference at its full 512-token context, batch 64, bf16:

# %%
ref = MODEL_PRESETS["microlm-31.7m"]
rows = []
for kv in (8, 4, 2, 1):
    c = ModelConfig(**{**ref.to_dict(), "n_kv_heads": kv})
    per_token = 2 * c.n_layers * kv * c.head_dim * 2  # K and V, all layers, bf16
    n_attn = c.n_layers * (2 * c.dim * c.dim + 2 * c.dim * kv * c.head_dim)
    rows.append((kv, per_token, per_token * 512 * 64 / 2**20, n_attn))
print(f"{'kv heads':>8} {'KV bytes/token':>15} {'cache MiB (64×512)':>19} {'attention params':>17}")
for kv, pt, mib, na in rows:
    print(f"{kv:>8} {pt:>15,} {mib:>19.1f} {na:>17,}")
assert rows[0][1] == 8 * rows[-1][1]
m_full, m_gqa = TransformerLM(ref), TransformerLM(ModelConfig(**{**ref.to_dict(), "n_kv_heads": 2}))
assert m_full.new_cache(1).nbytes == 4 * m_gqa.new_cache(1).nbytes

# %% [markdown]
# ## 5 · The KV cache gives the same answer
#
# With a cache, the prompt is run once (prefill) and then each step feeds only the newest token,
# reading earlier keys and values from the preallocated cache. The result must match running the
# whole sequence every time.

# %%
x = torch.tensor([tok.encode("今天天气很好，我们一起去公园散步，看到很多人在放风筝。")])
with torch.no_grad():
    full, _ = model(x)
    cache = model.new_cache(1)
    parts = [model(x[:, :8], cache=cache)[0]] + [model(x[:, t:t + 1], cache=cache)[0] for t in range(8, x.shape[1])]
cached = torch.cat(parts, dim=1)
err = (cached - full).abs().max().item()
print(f"max |cached − uncached| logit difference: {err:.2e}")
assert err < 1e-4
prompt = tok.encode("中国的首都是")
g1 = generate_ids(model, [prompt], max_new_tokens=24, temperature=0, use_cache=True)[0]
g2 = generate_ids(model, [prompt], max_new_tokens=24, temperature=0, use_cache=False)[0]
print(tok.decode(prompt + g1))
assert g1 == g2, "greedy tokens identical with and without the cache"

# %% [markdown]
# ## 6 · Why the cache matters: time per generated token
#
# Without a cache, step *t* recomputes attention and MLPs for all *t* tokens, so each step gets
# slower; with it, each step processes one token.

# %%
n_new = 48 if profile == "smoke" else 192
n_new = min(n_new, cfg.model.max_seq_len - 8)
start = torch.tensor([tok.encode("中国")[:1] * 4])


def step_times(use_cache: bool) -> tuple[list[float], torch.Tensor]:
    times = []
    with torch.no_grad():
        cache = model.new_cache(1, start.shape[1] + n_new) if use_cache else None
        seq = start
        nxt = start
        for _ in range(n_new):
            t0 = time.perf_counter()
            logits, _ = model(nxt, cache=cache) if use_cache else model(seq)
            nxt = logits[:, -1:].argmax(-1)
            seq = torch.cat([seq, nxt], 1)
            times.append(time.perf_counter() - t0)
    return times, seq


(with_cache, seq_cached), (without, seq_plain) = step_times(True), step_times(False)
plt.figure(figsize=(6, 3.4))
plt.plot(np.array(without) * 1e3, label="no cache")
plt.plot(np.array(with_cache) * 1e3, label="KV cache")
plt.xlabel("generated token")
plt.ylabel("ms per token")
plt.legend()
plt.title("decode time per token")
plt.show()
speedup = sum(without) / sum(with_cache)
print(f"{n_new} tokens: {sum(without):.2f} s without cache, {sum(with_cache):.2f} s with: ×{speedup:.1f}")
# timings vary by machine (a toy model at the smoke profile is too small to gain); the tokens may not
assert torch.equal(seq_cached, seq_plain), "the cache changes the speed, never the output"

# %% [markdown]
# ## Exercises
#
# Three checks on the trained model of this profile. Try each before opening the solution; the
# solutions run — and assert — whenever the notebook runs.
#
# ### Exercise 1 · The KV cache's size, by formula
#
# Predict in bytes the cache `model.new_cache(batch_size=3, max_len=100)` allocates for this
# profile's model (fp32), from `n_layers`, `kv_heads`, `head_dim` alone; check it against the tensors
# the cache really holds. Then prefill an 11-token prompt: which cache slots hold data now?

# %% tags=["hide-cell"]
c = cfg.model
width = next(model.parameters()).element_size()  # 4: the model is loaded in fp32
predicted = 2 * c.n_layers * 3 * c.kv_heads * 100 * c.head_dim * width  # K and V, layers, batch, heads, slots
cache = model.new_cache(3, 100)
allocated = sum(t.untyped_storage().nbytes() for t in cache.k + cache.v)
print(f"predicted {predicted:,} bytes = {predicted / 2**20:.2f} MiB; allocated {allocated:,}; "
      f"KVCache.nbytes {cache.nbytes:,}")
assert predicted == allocated == cache.nbytes
prompt11 = torch.tensor([tok.encode("北京是中国的首都，也是一座历史悠久的城市。今天天气很好，我们一起去公园散步。")[:11]] * 3)
with torch.no_grad():
    model(prompt11, cache=cache)
filled = [int((k.abs().sum(dim=(0, 1, 3)) > 0).sum()) for k in cache.k]
print(f"after an {prompt11.shape[1]}-token prefill: cache.pos = {cache.pos}, filled slots per layer {filled}")
assert cache.pos == prompt11.shape[1] and filled == [prompt11.shape[1]] * c.n_layers
assert all(float(k[:, :, cache.pos:].abs().max()) == 0.0 for k in cache.k + cache.v), "the rest is preallocated"

# %% [markdown]
# ### Exercise 2 · Prove the mask by perturbing the future
#
# If attention is causal, the logits at positions before *j* cannot depend on the token at *j*.
# Take the sentence of section 3 (`ids`), replace its middle token (position `j`) by another id and
# compare the logits of the two runs position by position. Predict which positions change.

# %% tags=["hide-cell"]
j = ids.shape[1] // 2
changed_ids = ids.clone()
changed_ids[0, j] = (int(ids[0, j]) + 1000) % cfg.model.vocab_size
with torch.no_grad():
    a, _ = model(ids)
    b, _ = model(changed_ids)
diff = (a - b).abs().amax(dim=-1)[0]
print(" ".join(f"{t}:{d:.1e}" for t, d in enumerate(diff.tolist())))
assert float(diff[:j].max()) < 1e-5, "the past does not see the future"
assert float(diff[j]) > 1e-3 and float(diff[j:].min()) > 1e-6, "position j and every later one do"

# %% [markdown]
# ### Exercise 3 · Prefill in chunks
#
# Section 5 fed the prompt's first 8 tokens at once and then one token per step. A server often
# prefills a long prompt in **chunks**: a chunk after cached tokens must see all of them and be causal
# inside itself. Feed the sentence of section 5 (`x`) through the cache in chunks of 5 tokens and check
# the logits against one uncached forward pass.

# %% tags=["hide-cell"]
with torch.no_grad():
    cache = model.new_cache(1)
    chunked = torch.cat([model(x[:, s:s + 5], cache=cache)[0] for s in range(0, x.shape[1], 5)], dim=1)
    whole, _ = model(x)
err5 = (chunked - whole).abs().max().item()
print(f"{x.shape[1]} tokens in chunks of 5: max |chunked − whole| = {err5:.2e}")
assert chunked.shape == whole.shape and err5 < 1e-4
