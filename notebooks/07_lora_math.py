# ---
# jupyter:
#   kernelspec:
#     display_name: Python 3 (ipykernel)
#     language: python
#     name: python3
# ---

# %% [markdown]
# # 07 · LoRA, written from scratch (stage A7)
#
# Fine-tuning changes a weight matrix `W` by some `ΔW`. LoRA bets that `ΔW` has low rank and trains it
# as a product: `W x + (α/r) · B A x`, with `A` (`r × in`) random, `B` (`out × r`) zero — so training
# starts exactly at the base model — and everything else frozen. `microlm/model/lora.py` implements it
# (our q/k/v live in one fused matrix, so each adapted slice gets its own `A, B`), checked against
# PEFT number for number in the tests, and saves adapters in PEFT's format.
#
# CLI: `microlm lora --profile cpu` · artifact: `runs/<profile>/lora/` (`adapter/` loads with
# `peft.PeftModel.from_pretrained` on the Llama-layout export).

# %% tags=["parameters"]
import os

profile = os.environ.get("MICROLM_PROFILE", "cpu")

# %%
import json

import matplotlib.pyplot as plt
import numpy as np
import torch

from microlm import stages
from microlm.model import MODEL_PRESETS, TransformerLM, load_model
from microlm.model.lora import LoRAConfig, apply_lora, lora_modules, merge_lora, unmerge_lora
from microlm.stages import load_config
from microlm.train.curves import read_metrics

cfg = load_config(profile)
lora_dir = stages.require("lora", cfg)
report = json.loads(stages.output(cfg, "lora", "report").read_text(encoding="utf-8"))
print(json.dumps({k: report[k] for k in ("params", "task", "steps", "heldout")}, ensure_ascii=False, indent=1))

# %% [markdown]
# ## 1 · How many parameters train?
#
# For the 31.7M reference: the adapter size for each rank and set of target projections. The course's
# reference setting, r = 8 on q, k, v, o, trains 262,144 parameters — 0.83 % of the model.

# %%
ref = MODEL_PRESETS["microlm-31.7m"]
sets = {"q, v": ["q", "v"], "q, k, v, o": ["q", "k", "v", "o"], "all 7": ["q", "k", "v", "o", "gate", "up", "down"]}
ranks = [1, 2, 4, 8, 16, 32, 64]
plt.figure(figsize=(6, 3.6))
for label, targets in sets.items():
    pct = []
    for r in ranks:
        m = TransformerLM(ref)
        pct.append(apply_lora(m, LoRAConfig(r=r, targets=targets))["percent_of_base"])
    plt.plot(ranks, pct, "o-", label=label)
plt.xscale("log", base=2)
plt.yscale("log")
plt.xlabel("rank r")
plt.ylabel("% of the 31.7M base that trains")
plt.legend(title="targets")
plt.grid(alpha=0.3)
plt.show()

# %% [markdown]
# The reference setting itself (its output is stored in `tests/golden/`: a change to what LoRA trains
# fails the tests):

# %% tags=["golden"]
from microlm.model import MODEL_PRESETS, TransformerLM
from microlm.model.lora import LoRAConfig, apply_lora

rep8 = apply_lora(TransformerLM(MODEL_PRESETS["microlm-31.7m"]), LoRAConfig(r=8, targets=["q", "k", "v", "o"]))
print(rep8)
assert rep8["adapter_params"] == 262_144 and f"{rep8['percent_of_base']:.2f}" == "0.83"

# %% [markdown]
# ## 2 · Is a fine-tuning update really low-rank?
#
# The singular values of two updates to the same matrix (layer 0, query slice): what **full SFT**
# changed (SFT weights − pretrained weights, full rank available) and what **LoRA** learned (rank ≤ 8
# by construction). Most of the full update's energy sits in a few directions — the bet LoRA makes.

# %%
tok_dir = stages.stage_dir(cfg, "tokenizer")
pre, _ = load_model(stages.stage_dir(cfg, "pretrain"), tokenizer=tok_dir)
sft, _ = load_model(stages.stage_dir(cfg, "sft"), tokenizer=tok_dir)
q = cfg.model.dim
full_delta = (sft.layers[0].attn.qkv_proj.weight - pre.layers[0].attn.qkv_proj.weight)[:q].detach()
lora_model, _ = load_model(stages.stage_dir(cfg, "sft"), tokenizer=tok_dir,
                           adapter=stages.output(cfg, "lora", "adapter"))
layer = lora_model.layers[0].attn.qkv_proj
lora_delta = layer.delta_weight(layer.index[0]).detach()
s_full = torch.linalg.svdvals(full_delta).numpy()
s_lora = torch.linalg.svdvals(lora_delta).numpy()
plt.figure(figsize=(6, 3.5))
plt.semilogy(s_full / s_full[0], label="full SFT ΔW")
plt.semilogy(np.maximum(s_lora / s_lora[0], 1e-8), label=f"LoRA ΔW (r={cfg.lora.r})")
plt.xlabel("singular value index")
plt.ylabel("relative size")
plt.legend()
plt.show()
energy = np.cumsum(s_full**2) / np.sum(s_full**2)
print(f"full SFT update: top {cfg.lora.r} directions hold {energy[cfg.lora.r - 1]:.1%} of its energy")
assert np.linalg.matrix_rank(lora_delta.numpy(), tol=1e-6 * s_lora[0]) <= cfg.lora.r

# %% [markdown]
# ## 3 · Merging is exact
#
# For serving, `B A` can be folded into `W` (no extra latency); `unmerge` takes it out again.

# %%
x = torch.randint(0, cfg.model.vocab_size, (2, 32))
lora_model.eval()
with torch.no_grad():
    y_adapted = lora_model(x)[0]
    merge_lora(lora_model)
    y_merged = lora_model(x)[0]
    unmerge_lora(lora_model)
    y_again = lora_model(x)[0]
diff = (y_adapted - y_merged).abs().max().item()
print(f"max |merged − unmerged| = {diff:.2e}")
assert diff < 1e-4 and torch.allclose(y_again, y_adapted, atol=1e-5)
assert len(lora_modules(lora_model)) > 0

# %% [markdown]
# ## 4 · What the adapter learned
#
# The task is one SFT never saw, on either data source: **list the organisation names** (`nt` tags) in
# a held-out People's Daily sentence — the same format as SFT's place and person tasks, a new type.
# Below: exact match and entity F1 of the SFT model before and after the adapter, beside the empty
# answer (`无`) and a lookup of the organisation names seen in the adapter's training split; then the
# training curves of LoRA (this task) beside full SFT — different tasks, shown for the shape of the
# curves and the steps they took.

# %%
from microlm.claims import failed, lora_claims

b, a = report["before"], report["after"]
for name, sc in [("SFT model", b), ("SFT + LoRA", a), ("empty answer", report["baselines"]["empty"]),
                 ("lookup of seen names", report["baselines"]["lookup"])]:
    print(f"{name:22s} exact match {sc['exact_match']:.3f}  F1 {sc['f1']:.3f}  (n={sc['n']})")
for ex in a["examples"][:4]:
    print(f"{ex['text'][:50]}\n   gold: {ex['gold']}   LoRA: {ex['answer']!r}")
lt, le = read_metrics(lora_dir)
st, se = read_metrics(stages.stage_dir(cfg, "sft"))
fig, ax = plt.subplots(1, 2, figsize=(11, 3.4))
ax[0].plot([r["step"] for r in lt], [r["loss"] for r in lt], label="train")
ax[0].plot([r["step"] for r in le], [r["val_loss"] for r in le], "o-", label="held-out")
ax[0].set_title(f"LoRA on {report['task']} ({report['params']['adapter_params']:,} trainable)")
ax[1].plot([r["step"] for r in st], [r["loss"] for r in st], label="train")
ax[1].plot([r["step"] for r in se], [r["val_loss"] for r in se], "o-", label="held-out")
ax[1].set_title(f"full SFT ({sum(p.numel() for p in sft.parameters()):,} trainable)")
for axis in ax:
    axis.set_xlabel("step")
    axis.legend()
plt.tight_layout()
plt.show()
claims = lora_claims(report, full=profile != "smoke")
print("\n".join(map(str, claims)))
assert not failed(claims), failed(claims)

# %% [markdown]
# ## Exercises
#
# Each solution is hidden behind the toggle below its exercise; try first, then open it (it runs and
# checks itself whenever the notebook runs).

# %% [markdown]
# ### Exercise 1 · The trainable share in closed form
#
# A LoRA pair on a projection with `in` inputs and `out` outputs adds `r · (in + out)` parameters
# (`A` is `r × in`, `B` is `out × r`). Write the adapter size for **r = 16 on all seven projections**
# (q, k, v, o, gate, up, down) of the 31.7M reference as a formula of `ModelConfig`'s fields
# (`dim`, `n_layers`, `n_heads`, `kv_heads`, `head_dim`, `hidden_dim`), predict its share of the base
# — above or below 4 %? — and check the formula against the parameters `apply_lora` actually adds,
# on the reference and on this profile's model.

# %% tags=["hide-cell"]
from microlm.model import count_parameters  # noqa: E402


def lora_size(mc, r: int) -> int:
    q, kv = mc.n_heads * mc.head_dim, mc.kv_heads * mc.head_dim
    shapes = [(mc.dim, q), (mc.dim, kv), (mc.dim, kv), (q, mc.dim),  # q, k, v, o: (in, out)
              (mc.dim, mc.hidden_dim), (mc.dim, mc.hidden_dim), (mc.hidden_dim, mc.dim)]  # gate, up, down
    return mc.n_layers * sum(r * (i + o) for i, o in shapes)


all7 = ["q", "k", "v", "o", "gate", "up", "down"]
for label, mc in (("31.7M reference", ref), (f"{profile} model", cfg.model)):
    m = TransformerLM(mc)
    base_n = count_parameters(m)
    rep16 = apply_lora(m, LoRAConfig(r=16, targets=all7))
    formula = lora_size(mc, 16)
    print(f"{label:16s}: formula {formula:,} = counted {rep16['adapter_params']:,} adapter parameters, "
          f"{100 * formula / base_n:.2f} % of {base_n:,}")
    assert formula == rep16["adapter_params"] == rep16["trainable_params"]
    assert rep16["base_params"] == base_n
print(f"r=16 on all 7 vs r=8 on q, k, v, o: x{lora_size(ref, 16) / rep8['adapter_params']:.2f} the parameters")

# %% [markdown]
# ### Exercise 2 · Merge one layer by hand
#
# Take layer 0's fused `qkv_proj` of the trained adapter (`lora_model`, unmerged again after
# section 3). Build the merged weight yourself — the base weight plus `(alpha / r) · B A` in each
# adapted slice's rows, using `lora_A`, `lora_B`, `alpha`, `r` and `slices`, not `delta_weight` or
# `merge` — and check that a plain `x @ W_mergedᵀ` gives what the LoRA layer computes. How large
# do you expect the difference to be?

# %% tags=["hide-cell"]
import torch.nn.functional as F  # noqa: E402

qkv = lora_model.layers[0].attn.qkv_proj
assert not qkv.merged
w = qkv.base.weight.detach().clone()
for (start, size), k in zip(qkv.slices, qkv.index, strict=True):
    if k >= 0:
        w[start:start + size] += (qkv.alpha / qkv.r) * (qkv.lora_B[k] @ qkv.lora_A[k]).detach()
h = torch.randn(3, 7, qkv.base.in_features)
with torch.no_grad():
    by_hand, by_layer = F.linear(h, w), qkv(h)
gap = (by_hand - by_layer).abs().max().item()
changed = (w != qkv.base.weight).any(dim=1)
print(f"max |hand-merged − LoRA layer| = {gap:.1e}; rows the merge changed: {int(changed.sum())} of {len(w)}")
assert gap < 1e-4
for (start, size), k in zip(qkv.slices, qkv.index, strict=True):  # only adapted slices' rows may change
    assert k >= 0 or not changed[start:start + size].any()

# %% [markdown]
# ### Exercise 3 · Training starts at the base model
#
# `B` starts at zero, so a freshly wrapped model must compute **exactly** what the base computes —
# not approximately. Wrap a fresh `TransformerLM` of this profile's shape with `apply_lora` (r = 8,
# q, k, v, o), compare the logits before and after on random ids, and list which parameters still
# have `requires_grad`. Predict both before running.

# %% tags=["hide-cell"]
torch.manual_seed(0)
fresh = TransformerLM(cfg.model).eval()
ids_ = torch.randint(0, cfg.model.vocab_size, (2, 16))
with torch.no_grad():
    before = fresh(ids_)[0]
    rep_fresh = apply_lora(fresh, LoRAConfig(r=8, targets=["q", "k", "v", "o"]))
    after = fresh(ids_)[0]
trainable = {n.split(".")[-2] for n, p in fresh.named_parameters() if p.requires_grad}
print(f"logits identical after wrapping: {torch.equal(before, after)}; trainable parameter groups: {sorted(trainable)}")
assert torch.equal(before, after)
assert trainable == {"lora_A", "lora_B"}
assert sum(p.numel() for p in fresh.parameters() if p.requires_grad) == rep_fresh["adapter_params"]
