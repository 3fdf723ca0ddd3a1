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
# # 10 · IE LoRA with transformers + PEFT, and the merged model (stages B3 + B5)
#
# Chapter 07 wrote LoRA from scratch. Here the same idea runs through the tools practitioners use on
# open models: `transformers` loads a causal LM from a folder (or the hub), `peft` wraps every linear
# projection of its blocks with `W x + (α/r)·B A x` (Qwen2.5's recipe: r = 8, α = 16, dropout 0.05 on
# q, k, v, o, gate, up, down — never `lm_head` or the embeddings), and the model learns to answer
# chapter 09's extraction requests with JSON. Then the adapter is **merged** into the base and
# saved as an ordinary Hugging Face folder that `transformers` and vLLM load without PEFT.
#
# On the `gpu` profile the base is `Qwen/Qwen2.5-1.5B-Instruct`. A 1.5B model cannot be trained on a
# laptop CPU, so the `cpu` profile trains the same recipe on **MicroLM's own SFT model** through
# its Hugging Face export (stage A8) — twice: once with PEFT and once with pipeline A's from-scratch
# LoRA (`ie_lora.engine: peft | microlm`), the point where the two pipelines meet.
#
# | stage | module | CLI | artifacts |
# |---|---|---|---|
# | B3 `ie_lora` | `microlm/ie/train_lora.py`, `microlm/ie/lora_data.py` | `microlm ie-lora` | `runs/<profile>/ie_lora/<run>/`: `adapter/` (PEFT format + tokenizer), `metrics.jsonl`, `curves.png`, `report.json` |
# | B5 `ie_merged` | `microlm/ie/export.py` | `microlm ie-merged` | `runs/<profile>/ie_merged/<run>/`: safetensors, tokenizer, chat template, `generation_config.json`, model card, `report.json` |
#
# Another local model folder with a chat template works too, e.g.
# `microlm ie-lora --set 'ie_lora.runs=[{name: qwen0.5b, base: /models/Qwen2.5-0.5B-Instruct, engine: peft}]'`.

# %% tags=["parameters"]
import os

profile = os.environ.get("MICROLM_PROFILE", "cpu")

# %%
import json
import tempfile
from pathlib import Path

import matplotlib.pyplot as plt
import torch

from microlm import stages
from microlm.config import load_config
from microlm.ie.export import greedy_answers
from microlm.ie.lora_data import ChatEncoder, encode_chats, show_labels
from microlm.ie.render import parse_answer
from microlm.ie.train_lora import (
    QWEN25_15B,
    attach_microlm,
    attach_peft,
    copy_microlm_init_to_peft,
    load_base,
    load_tokenizer,
    lockstep_losses,
    lora_share,
    read_lines,
)
from microlm.train.pretrain import read_metrics

cfg = load_config(profile)
lora_dir = stages.require("ie_lora", cfg)
merged_dir = stages.require("ie_merged", cfg)
data_dir = stages.stage_dir(cfg, "ie_data")
lc = cfg.ie_lora
names = [r["name"] for r in lc.runs]
reports = {n: json.loads((lora_dir / n / "report.json").read_text(encoding="utf-8")) for n in names}
for n, r in reports.items():
    print(f"{n:18s} engine {r['engine']:8s} base {r['base']}\n{'':18s} {r['params']['trainable']:,} trainable "
          f"({r['params']['percent']} %), {r['train_data']['kept']:,} train examples "
          f"({r['train_data']['dropped_over_cutoff']} over the {r['cutoff']}-token cutoff), {r['steps']} steps, "
          f"{r['precision']}, {r['seconds_this_run']} s")

# %% [markdown]
# ## 1 · Which tokens train?
#
# A training example is the whole conversation rendered by the **tokenizer's own chat template**
# (`apply_chat_template`), so the model trains on exactly the text it will be prompted with. Only
# the answer is learned: the system prompt, the user's request and the `<|im_start|>assistant\n`
# header get label -100; the answer **and its `<|im_end|>`** are trained (a model that never learns
# to emit the end token runs on until `max_new_tokens`); the newline the template puts after
# `<|im_end|>` is not. Trained tokens are in 【brackets】:

# %%
first = names[0]
tok = load_tokenizer(str(lora_dir / first / "adapter"), weights=False)
enc = ChatEncoder(tok)
line = read_lines(data_dir / "06_train.jsonl", 1)[0]
ex = enc.encode(line["messages"])
print(show_labels(tok, ex, "【{}】"))
trained = [i for i, lab in enumerate(ex.labels) if lab != -100]
im_end = tok.convert_tokens_to_ids("<|im_end|>")
print("\nthe answer's last tokens:")
for i in range(trained[-1] - 3, len(ex.ids)):
    print(f"  {i:4d} {tok.convert_ids_to_tokens(ex.ids[i])!r:>14} label {ex.labels[i]}")
assert ex.ids == list(tok.apply_chat_template(line["messages"], tokenize=True, return_dict=False))
assert trained == list(range(trained[0], trained[-1] + 1)), "one contiguous answer span"
assert ex.ids[trained[-1]] == im_end and ex.labels[-1] == -100, "<|im_end|> trains, the newline after it does not"
assert tok.decode(ex.ids[trained[0]:trained[-1]]) == line["messages"][-1]["content"]
share = reports[first]["trained_token_share"]
print(f"\n{share:.1%} of the training tokens are answer tokens (the rest is prompt)")
assert 0 < share < 1

# %% [markdown]
# ## 2 · How many parameters train?
#
# `lora_share` builds the architecture from its config on PyTorch's `meta` device — no weights are
# read or allocated — and counts what PEFT would train. The same recipe on this profile's base and
# on Qwen2.5-1.5B-Instruct (its published config, `QWEN25_15B`, written out because nothing is downloaded):

# %%
from transformers import AutoConfig  # noqa: E402

base_cfg = AutoConfig.from_pretrained(reports[first]["base"])
ours = lora_share(base_cfg, lc.r, lc.targets)
qwen = lora_share(QWEN25_15B, lc.r, lc.targets)
print(f"{'module':10s} {'this base':>12s} {'Qwen2.5-1.5B':>14s}")
for m in lc.targets:
    print(f"{m:10s} {ours['per_module'].get(m, 0):12,d} {qwen['per_module'].get(m, 0):14,d}")
print(f"{'trainable':10s} {ours['trainable']:12,d} {qwen['trainable']:14,d}")
print(f"{'base':10s} {ours['base']:12,d} {qwen['base']:14,d}")
print(f"{'share':10s} {ours['percent']:11.3f}% {qwen['percent']:13.3f}%")
plt.figure(figsize=(6, 2.8))
plt.barh(list(qwen["per_module"]), [v / 1e6 for v in qwen["per_module"].values()])
plt.xlabel("trainable parameters (M), Qwen2.5-1.5B, r = 8")
plt.tight_layout()
plt.show()
assert round(qwen["percent"], 2) == 0.59 and qwen["base"] == 1_543_714_304
assert ours["trainable"] == reports[first]["params"]["trainable"]

# %% [markdown]
# ## 3 · Two engines, one task
#
# The `cpu` profile trains the same adapter twice: with PEFT on `transformers`' Llama, and with
# chapter 07's from-scratch LoRA on our `TransformerLM` (same base weights, read back from the HF
# folder). If both implement the same mathematics, then from the **same initial A and B** on the
# **same batches** (dropout off, fp32) they must produce the same losses step after step:

# %%
hf_base = next((reports[n]["base"] for n in names if Path(reports[n]["base"]).is_dir()), None)
if hf_base is not None:
    scratch, _, _ = attach_microlm(hf_base, lc.r, lc.alpha, 0.0, lc.targets)
    peft_model = attach_peft(load_base(hf_base), lc.r, lc.alpha, 0.0, lc.targets)
    copied = copy_microlm_init_to_peft(scratch, peft_model)
    htok = load_tokenizer(hf_base)
    examples, _ = encode_chats(ChatEncoder(htok), read_lines(data_dir / "06_train.jsonl", 200), reports[first]["cutoff"])
    with tempfile.TemporaryDirectory() as tmp:
        steps = 20
        a = lockstep_losses(scratch, examples, htok.pad_token_id, steps, Path(tmp) / "a", lr=lc.train.lr * 5)
        b = lockstep_losses(peft_model, examples, htok.pad_token_id, steps, Path(tmp) / "b", lr=lc.train.lr * 5)
    gap = max(abs(x - y) for x, y in zip(a, b, strict=True))
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(9, 3))
    ax1.plot(range(1, steps + 1), a, "o-", label="from-scratch LoRA (TransformerLM)")
    ax1.plot(range(1, steps + 1), b, "x--", label="PEFT (transformers Llama)")
    ax1.set_xlabel("step")
    ax1.set_ylabel("answer-token loss")
    ax1.legend()
    ax2.plot(range(1, steps + 1), [abs(x - y) for x, y in zip(a, b, strict=True)], "o-")
    ax2.set_yscale("log")
    ax2.set_xlabel("step")
    ax2.set_ylabel("|difference|")
    plt.tight_layout()
    plt.show()
    print(f"{copied} A/B matrices copied; {steps} steps; largest loss difference {gap:.2e}; "
          f"loss {a[0]:.3f} -> {a[-1]:.3f}")
    assert gap < 1e-3, gap
    assert a[-1] < a[0], "it learns"

# %% [markdown]
# ## 4 · Training curves
#
# Each run's loss on the answer tokens: per step on its training batches, and on held-out
# validation examples (summed token loss ÷ answer tokens, so long and short answers count by their
# tokens). Step 0 is the base model before training.

# %%
fig, ax = plt.subplots(figsize=(7, 3.4))
for i, n in enumerate(names):
    train, evals = read_metrics(lora_dir / n)
    color = f"C{i}"
    ax.plot([t["step"] for t in train], [t["loss"] for t in train], color=color, alpha=0.5, label=f"{n} train")
    ax.plot([0] + [e["step"] for e in evals], [reports[n]["base_val_loss"]] + [e["val_loss"] for e in evals],
            "o-", color=color, label=f"{n} val")
ax.set_xlabel("step")
ax.set_ylabel("answer-token loss")
ax.legend(fontsize=8)
plt.tight_layout()
plt.show()
for n, r in reports.items():
    print(f"{n:18s} held-out answer loss {r['base_val_loss']:.3f} -> {r['final_val_loss']:.3f}")
    assert r["final_val_loss"] < r["base_val_loss"], n

# %% [markdown]
# ## 5 · Before and after, on the evaluation prompts
#
# The fixed evaluation prompts of chapter 09 (from the test split), answered greedily by the base
# model and by each merged model. An answer **parses** when it is a JSON object with exactly the
# asked relations, each a list of `{"subject", "object"}` pairs; it is **exact** when it equals
# the gold answer. (Chapter 11 scores them properly: triple precision/recall/F1 per topic.)

# %%
prompts_lines = read_lines(data_dir / "06_eval_prompts.jsonl")
schemas = [json.loads(p["messages"][1]["content"])["schema"] for p in prompts_lines]
golds = [parse_answer(p["gold"], s) for p, s in zip(prompts_lines, schemas, strict=True)]
assert all(g is not None for g in golds), "every gold answer parses"
answers: dict[str, list[str]] = {}
for n in names:
    base = reports[n]["base"]
    if f"base: {base}" not in answers:
        btok = load_tokenizer(base)
        benc = ChatEncoder(btok)
        model = load_base(base)
        answers[f"base: {base}"] = greedy_answers(model, btok, [benc.prompt_ids(p["messages"]) for p in prompts_lines],
                                                  cfg.ie_merged.max_new_tokens)
        del model
    rep = json.loads((merged_dir / n / "report.json").read_text(encoding="utf-8"))
    answers[n] = rep["answers"]


def score(texts):
    parsed = [parse_answer(t, s) for t, s in zip(texts, schemas, strict=True)]
    return (sum(p is not None for p in parsed), sum(p == g for p, g in zip(parsed, golds, strict=True)))


print(f"{'model':40s} parses  exact  (of {len(golds)})")
rates = {}
for who, texts in answers.items():
    rates[who] = score(texts)
    print(f"{who[-40:]:40s} {rates[who][0]:6d} {rates[who][1]:6d}")
for k in range(min(2, len(golds))):
    print(f"\n— prompt {k} ({prompts_lines[k]['cate']}), schema {schemas[k]}\n  gold:   {prompts_lines[k]['gold'][:150]}")
    for who, texts in answers.items():
        print(f"  {who[-24:]:24s} {texts[k][:150]!r}")
assert all(len(t) == len(golds) for t in answers.values())

# %% [markdown]
# ## 6 · The merged folder, verified
#
# `merge_and_unload` folds `(α/r)·B A` into each `W`; the folder then holds an ordinary model.
# The stage loaded the base un-quantized in the adapter's dtype, and before it moved the folder
# into place it reloaded it from disk and checked: logits equal to base + adapter (≤ 1e-4 in fp32)
# on the evaluation prompts, the same greedy answers, every file present, the chat template the
# adapter was trained with, `<|im_end|>` among the EOS ids of `generation_config.json`, and tied
# embeddings still tied. A failed check leaves no folder behind.

# %%
for n in names:
    rep = json.loads((merged_dir / n / "report.json").read_text(encoding="utf-8"))
    sizes = {p.name: p.stat().st_size for p in (merged_dir / n).iterdir()}
    print(f"{n}: max |Δlogit| {rep['logits_max_abs_diff']:.1e} (≤ {rep['logits_atol']:g}), greedy answers "
          f"identical {rep['greedy_identical']}/{rep['greedy_prompts']}, dtype {rep['dtype']}, tied "
          f"{rep['tied_embeddings']}, {rep['seconds']} s")
    print("   " + ", ".join(f"{k} ({v / 1e6:.1f} MB)" if v > 1e6 else k for k, v in sorted(sizes.items())))
    assert rep["logits_max_abs_diff"] <= rep["logits_atol"] and rep["greedy_identical"] == rep["greedy_prompts"]
    assert not rep["missing_files"] and rep["chat_template_equal"] and rep["eos_includes_im_end"]
    gen = json.loads((merged_dir / n / "generation_config.json").read_text(encoding="utf-8"))
    assert im_end in ([gen["eos_token_id"]] if isinstance(gen["eos_token_id"], int) else gen["eos_token_id"])
print("\n" + (merged_dir / names[0] / "README.md").read_text(encoding="utf-8")[:600])

# %% [markdown]
# The merged folders are what the evaluation (B4) and serving (B6) stages read. A last check by
# hand: the folder is a plain model — no `adapter_config.json`, no LoRA weights — so nothing needs
# PEFT to load it:

# %%
from transformers import AutoModelForCausalLM  # noqa: E402

m = AutoModelForCausalLM.from_pretrained(merged_dir / names[0], dtype=torch.float32)
assert not (merged_dir / names[0] / "adapter_config.json").exists()
assert not any("lora_" in k for k in m.state_dict())
print(type(m).__name__, f"{sum(p.numel() for p in m.parameters()):,} parameters, no LoRA modules")
