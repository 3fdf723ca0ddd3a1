# ---
# jupyter:
#   jupytext:
#     text_representation:
#       extension: .py
#       format_name: percent
#   kernelspec:
#     display_name: Python 3
#     language: python
#     name: python3
# ---

# %% [markdown]
# # 05 · Pretraining (stage A5)
#
# The model reads random 256-token windows of the token files and learns to predict each next token.
# The loop (`microlm/train/trainer.py`, shared later by SFT and LoRA) is the standard recipe:
# AdamW with decoupled weight decay (none on norms and embeddings), linear warmup then cosine decay,
# gradient clipping, gradient accumulation, evaluation on fixed val windows (loss, perplexity and
# **bits per byte**, which compares models with different tokenizers), checkpoints that resume
# bit-identically, and `torchrun` for more processes.
#
# CLI: `microlm pretrain --profile cpu` (add `--resume` after an interruption;
# `torchrun --standalone --nproc_per_node 2 -m microlm.cli pretrain ...` for DDP) ·
# artifact: `runs/<profile>/pretrain/` (`ckpt/`, `metrics.jsonl`, `report.json`, `curves.png`).

# %% tags=["parameters"]
import os

profile = os.environ.get("MICROLM_PROFILE", "cpu")

# %%
import json
import math

import matplotlib.pyplot as plt
import numpy as np

from microlm import stages
from microlm.config import REPO_ROOT, load_config
from microlm.model import TransformerLM
from microlm.train.pretrain import read_metrics
from microlm.train.trainer import lr_at

cfg = load_config(profile)
pre_dir = stages.require("pretrain", cfg)
report = json.loads((pre_dir / "report.json").read_text(encoding="utf-8"))
train, evals = read_metrics(pre_dir)
print(json.dumps({k: v for k, v in report.items() if k not in ("samples", "model")}, indent=1))
assert report["steps"] == cfg.pretrain.max_steps and len(evals) >= 1

# %% [markdown]
# ## 1 · The model, layer by layer
#
# Where the parameters are. At this scale the two 6,400-row matrices (embedding and LM head) are a
# large share; in the 31.7M reference they are 21 %.

# %%
model = TransformerLM(cfg.model)
rows = {}
for name, p in model.named_parameters():
    key = name.split(".")[0] if not name.startswith("layers.") else "layers.*." + ".".join(name.split(".")[2:-1])
    rows[key] = rows.get(key, 0) + p.numel()
total = model.num_parameters()
for k, n in rows.items():
    print(f"{k:32s} {n:>12,}  {n / total:6.1%}")
print(f"{'total':32s} {total:>12,}")
assert sum(rows.values()) == total == report["params"]

# %% [markdown]
# ## 2 · The curves: is my loss normal?
#
# Three reference lines make a loss curve readable:
# - **ln(6400) = 8.76** — a model that knows nothing (uniform over the vocabulary); training starts
#   there;
# - the **unigram entropy** of the training tokens — a model that knows token frequencies but no
#   context. Going below it means the model uses context;
# - the **reference run** (the `cpu` profile, seed 1234, recorded in `data/reference_curves/`) —
#   the same config on the same data should land on it.

# %%
ref_path = REPO_ROOT / "data" / "reference_curves" / f"pretrain_{profile}.json"
ref = json.loads(ref_path.read_text(encoding="utf-8")) if ref_path.exists() else None
fig, ax = plt.subplots(1, 2, figsize=(12, 3.8))
steps = [r["step"] for r in train]
ax[0].plot(steps, [r["loss"] for r in train], alpha=0.6, label="train")
ax[0].plot([r["step"] for r in evals], [r["val_loss"] for r in evals], "o-", label="val")
ax[0].axhline(math.log(cfg.model.vocab_size), color="k", ls=":", label="ln(vocab): knows nothing")
ax[0].axhline(report["unigram_entropy"], color="gray", ls="--", label="unigram entropy: no context")
if ref:
    ax[0].plot(ref["eval_steps"], ref["val_loss"], "x--", color="C3", label=f"reference ({ref['profile']})")
ax[0].set_xlabel("step")
ax[0].set_ylabel("nats / token")
ax[0].legend(fontsize=8)
ax[0].set_title("loss")
ax[1].plot(range(cfg.pretrain.max_steps), [lr_at(s, cfg.pretrain) for s in range(cfg.pretrain.max_steps)])
ax[1].set_xlabel("step")
ax[1].set_title("learning rate: warmup + cosine")
plt.tight_layout()
plt.show()
first, last = train[0]["loss"], report["final_val_loss"]
print(f"train loss {first:.2f} → val loss {last:.3f} (bpb {report['final_val_bpb']:.3f}); "
      f"unigram entropy {report['unigram_entropy']:.3f}")
assert abs(first - math.log(cfg.model.vocab_size)) < 0.5, "initial loss ≈ ln(vocab): the init is sane"
assert last < first
if profile != "smoke":
    assert last < report["unigram_entropy"] - 0.5, "the model uses context, far below the unigram baseline"
if ref and ref.get("seed") == cfg.seed and ref["config"] == {"model": cfg.model.to_dict(), "steps": cfg.pretrain.max_steps}:
    gap = abs(ref["val_loss"][-1] - last)
    print(f"final val loss vs reference: {gap:.3f} nats apart")
    assert gap < 0.15, "same config, same seed: the curve should land on the reference"

# %% [markdown]
# ## 3 · Throughput
#
# Tokens per second over the run (forward + backward + AdamW), and model FLOP/s
# (6·N + attention per token). `benchmarks/bench_model.py` compares this against Hugging Face's
# Llama with identical dimensions on the same machine.

# %%
tps = np.array([r["tokens_per_s"] for r in train[1:]])
print(f"median {np.median(tps):,.0f} tokens/s, {np.median([r['flops_per_s'] for r in train[1:]]) / 1e9:.1f} "
      f"GFLOP/s (model FLOPs), {report['seconds_this_run']:.0f} s for {report['tokens_seen']:,} tokens")
fpt = model.flops_per_token(cfg.pretrain.seq_len)
assert all(math.isclose(r["flops_per_s"], r["tokens_per_s"] * fpt, rel_tol=1e-9) for r in train)

# %% [markdown]
# ## 4 · What it writes, step by step
#
# Samples from the same prompts at each evaluation (temperature 0.8, top-k 20, fixed seed). Early on
# the model emits frequent characters; later, words and phrases. A 6M-parameter model trained for
# minutes will not be *right* — it produces recognisable Chinese.

# %%
for r in evals:
    for s in r.get("samples", []):
        print(f"step {r['step']:5d}: {s!r}")
final = evals[-1].get("samples", [])
if final:
    han = sum("\u4e00" <= ch <= "\u9fff" for s in final for ch in s)
    assert han >= 5, "samples are Chinese text"
