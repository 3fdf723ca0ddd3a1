# ---
# jupyter:
#   kernelspec:
#     display_name: Python 3 (ipykernel)
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
# On the `gpu` profile the base is `Qwen/Qwen2.5-1.5B-Instruct`. The `laptop` profile trains a real
# **Qwen2.5-0.5B-Instruct** on two CPU cores (about 25 minutes for 960 conversations; the Qwen is named
# once, `qwen:` in the profile, and `MICROLM_QWEN=/path` points it at a local folder) beside the MicroLM
# runs. The `cpu` profile downloads nothing, so it trains the same recipe on **MicroLM's own SFT
# model** through its Hugging Face export (stage A8) — twice: once with PEFT and once with pipeline A's
# from-scratch LoRA (`ie_lora.engine: peft | microlm`), the point where the two pipelines meet.
#
# | stage | module | CLI | artifacts |
# |---|---|---|---|
# | B3 `ie_lora` | `microlm/stages/ie_lora.py`, `microlm/ie/train_lora.py`, `microlm/ie/lora_data.py` | `microlm ie-lora` | `runs/<profile>/ie_lora/<run>/`: `adapter/` (PEFT format + tokenizer), `metrics.jsonl`, `curves.png`, `report.json` |
# | B5 `ie_merged` | `microlm/stages/ie_merged.py`, `microlm/ie/merge.py` | `microlm ie-merged` | `runs/<profile>/ie_merged/<run>/`: safetensors, tokenizer, chat template, `generation_config.json`, model card, `report.json` |
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
from microlm.ie.lora_data import ChatEncoder, encode_chats, show_labels
from microlm.ie.merge import greedy_answers
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
from microlm.paths import display_path
from microlm.stages import load_config
from microlm.train.curves import read_metrics

cfg = load_config(profile)
lora_dir = stages.require("ie_lora", cfg)
merged_dir = stages.require("ie_merged", cfg)
lc = cfg.ie_lora
names = [r["name"] for r in lc.runs]


def of_run(pattern: Path, run: str) -> Path:
    """A file of one run: the registry's pattern (`stages.output(cfg, "ie_lora", "run_report")` is
    `runs/<profile>/ie_lora/{run}/report.json`) with the run's name in place of `{run}`."""
    return Path(str(pattern).format(run=run))


reports = {n: json.loads(of_run(stages.output(cfg, "ie_lora", "run_report"), n).read_text(encoding="utf-8"))
           for n in names}
for n, r in reports.items():
    print(f"{n:18s} engine {r['engine']:8s} base {display_path(r['base'])}\n{'':18s} {r['params']['trainable']:,} trainable "
          f"({r['params']['percent']} %), {r['train_data']['kept']:,} train examples "
          f"({r['train_data']['dropped_over_cutoff']} over the {r['cutoff']}-token cutoff), {r['steps']} steps, "
          f"{r['precision']} (base weights {r['base_dtype']}), {r['seconds_this_run']} s, peak memory "
          f"{r['peak_rss_mb'] / 1024:.1f} GB")

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
tok = load_tokenizer(str(of_run(stages.output(cfg, "ie_lora", "run"), first)), weights=False)  # the adapter
enc = ChatEncoder(tok)
line = read_lines(stages.output(cfg, "ie_data", "train"), 1)[0]
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
# the two engines meet on a Llama-architecture base: MicroLM's export (the from-scratch engine's runs)
hf_base = next((r["base"] for r in reports.values() if r["engine"] == "microlm" and Path(r["base"]).is_dir()), None)
if hf_base is not None:
    scratch, _, _ = attach_microlm(hf_base, lc.r, lc.alpha, 0.0, lc.targets)
    peft_model = attach_peft(load_base(hf_base), lc.r, lc.alpha, 0.0, lc.targets)
    copied = copy_microlm_init_to_peft(scratch, peft_model)
    htok = load_tokenizer(hf_base)
    examples, _ = encode_chats(ChatEncoder(htok), read_lines(stages.output(cfg, "ie_data", "train"), 200),
                               reports[first]["cutoff"])
    with tempfile.TemporaryDirectory() as tmp:
        steps = 20
        a = lockstep_losses(scratch, examples, htok.pad_token_id, steps, Path(tmp) / "a", lr=lc.train.lr * 5)
        b = lockstep_losses(peft_model, examples, htok.pad_token_id, steps, Path(tmp) / "b", lr=lc.train.lr * 5)
    diffs = [abs(x - y) for x, y in zip(a, b, strict=True)]
    gap = max(diffs)
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(9, 3))
    ax1.plot(range(1, steps + 1), a, "o-", label="from-scratch LoRA (TransformerLM)")
    ax1.plot(range(1, steps + 1), b, "x--", label="PEFT (transformers Llama)")
    ax1.set_xlabel("step")
    ax1.set_ylabel("answer-token loss")
    ax1.legend()
    ax2.plot(range(1, steps + 1), diffs, "o-")
    if gap > 0:  # all zero (bit-identical losses) cannot be drawn on a log axis
        ax2.set_yscale("log")
    ax2.set_xlabel("step")
    ax2.set_ylabel("|difference|" if gap > 0 else "|difference| (all exactly 0)")
    plt.tight_layout()
    plt.show()
    print(f"{copied} A/B matrices copied; {steps} steps; largest loss difference {gap:.2e}; "
          f"loss {a[0]:.3f} -> {a[-1]:.3f}")
    assert gap < 1e-3, gap
    assert a[-1] < a[0], "it learns"

# %% [markdown]
# ## 4 · What the adapter learns from: the training mix
#
# `06_train.jsonl` is far more than two CPU cores can read, and its natural mix teaches the wrong
# thing: with the data bundle two thirds of it is the catch-all topic 其他 and about half of it
# answers every asked relation with `[]`, while chapter 11 asks twelve topics for triples. So the
# stage draws its sample (`microlm/ie/mix.py`): **no text that is, or nearly is, a test text**
# (MinHash over character 5-grams, the corpus stage's deduplicator, Jaccard ≥ 0.8), **every topic the
# same share** (a small topic gives all it has, the rest is shared out), and a chosen share of
# **all-empty answers** (`ie_lora.empty_share`, near the 71 % of all-empty chunks IEPile's own test
# protocol asks on the bundle). The report says what the sample holds — including, for every relation
# the evaluation asks about, how many training answers show a pair of it:

# %%
mix = reports[first]["mix"]
fig, (a1, a2) = plt.subplots(1, 2, figsize=(11, 3.2))
topics = list(mix["by_topic"])
a1.bar(topics, [mix["by_topic"][t] - mix["empty_by_topic"][t] for t in topics], label="with triples")
a1.bar(topics, [mix["empty_by_topic"][t] for t in topics], bottom=[mix["by_topic"][t] - mix["empty_by_topic"][t]
                                                                    for t in topics], label="all []")
a1.set_title(f"{first}: {mix['drawn']:,} training conversations by topic")
a1.tick_params(axis="x", rotation=60, labelsize=7)
a1.legend(fontsize=8)
pos = mix["positives_per_evaluated_relation"]
a2.hist(list(pos.values()), bins=20, color="C2")
a2.set_xlabel("training answers holding a pair of the relation")
a2.set_ylabel("relations the evaluation asks")
plt.tight_layout()
plt.show()
print(f"drawn {mix['drawn']:,} of {mix['available']:,} ({mix['excluded']:,} left out as (near) copies of the "
      f"{mix['eval_texts']:,} test texts); all-empty share {mix['empty_share']:.1%} (target "
      f"{mix['empty_share_target']:.0%}); {mix['evaluated_triples_without_positive']} of the "
      f"{mix['evaluated_triples']} evaluated gold triples have a relation the sample never shows")
assert mix["drawn"] == reports[first]["train_data"]["in"] and sum(mix["by_topic"].values()) == mix["drawn"]
if mix["drawn"] < mix["usable"]:  # a sample, not everything: balanced, with the empty share held
    sizes = sorted(mix["by_topic"].values())
    assert sizes[-1] - sizes[0] <= 1 or sizes[0] == min(sizes), sizes
    drawn_empty = sum(mix["empty_by_topic"].values())  # off the target only where one kind ran out
    assert (abs(mix["empty_share"] - mix["empty_share_target"]) < 0.1 or drawn_empty == mix["usable_empty"]
            or mix["drawn"] - drawn_empty == mix["usable"] - mix["usable_empty"]), mix

# %% [markdown]
# ## 5 · Training curves
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
# ## 6 · Before and after, on the evaluation prompts
#
# The fixed evaluation prompts of chapter 09 (from the test split), answered greedily by the base
# model and by each merged model, side by side — the merged folder's answers are the ones the merge
# stage checked (the first `ie_merged.greedy_prompts` prompts). An answer **parses** when it is a JSON
# object with exactly the asked relations, each a list of `{"subject", "object"}` pairs; it is
# **exact** when it equals the gold answer. (Chapter 11 scores them properly — triple
# precision/recall/F1 with intervals, and the zero-shot model given a description of the format.)

# %%
merged_reports = {n: json.loads(of_run(stages.output(cfg, "ie_merged", "run_report"), n)
                                 .read_text(encoding="utf-8")) for n in names}
k_prompts = min(len(r["answers"]) for r in merged_reports.values())
prompts_lines = read_lines(stages.output(cfg, "ie_data", "eval_prompts"))[:k_prompts]
schemas = [json.loads(p["messages"][1]["content"])["schema"] for p in prompts_lines]
golds = [parse_answer(p["gold"], s) for p, s in zip(prompts_lines, schemas, strict=True)]
assert all(g is not None for g in golds), "every gold answer parses"
answers: dict[str, list[str]] = {}
for n in names:
    base = reports[n]["base"]
    base_row = f"base: {display_path(base)}"  # the folder relative to the project, not this machine's path
    if base_row not in answers:
        btok = load_tokenizer(base)
        benc = ChatEncoder(btok)
        model = load_base(base, torch.bfloat16 if reports[n]["base_dtype"] == "bfloat16" else torch.float32)
        answers[base_row] = greedy_answers(model, btok, [benc.prompt_ids(p["messages"]) for p in prompts_lines],
                                           cfg.ie_merged.max_new_tokens)
        del model
    answers[n] = merged_reports[n]["answers"][:k_prompts]


def score(texts):
    parsed = [parse_answer(t, s) for t, s in zip(texts, schemas, strict=True)]
    return (sum(p is not None for p in parsed), sum(p == g for p, g in zip(parsed, golds, strict=True)))


print(f"{'model':40s} parses  exact  (of {len(golds)})")
rates = {}
for who, texts in answers.items():
    rates[who] = score(texts)
    print(f"{who[-40:]:40s} {rates[who][0]:6d} {rates[who][1]:6d}")
for k in range(min(3, len(golds))):
    print(f"\n— prompt {k} ({prompts_lines[k]['cate']}), schema {schemas[k]}\n  gold:   {prompts_lines[k]['gold'][:150]}")
    for who, texts in answers.items():
        print(f"  {who[-24:]:24s} {texts[k][:150]!r}")
assert all(len(t) == len(golds) for t in answers.values())
for n in names:  # the adapter taught the answer format: the merged model parses at least as often as its base
    assert rates[n][0] >= rates[f"base: {display_path(reports[n]['base'])}"][0] or reports[n]["steps"] < 50, n

# %% [markdown]
# ## 7 · The merged folder, verified
#
# `merge_and_unload` folds `(α/r)·B A` into each `W`; the folder then holds an ordinary model.
# The stage loads the base un-quantized in fp32, merges, and checks in batches (with a progress
# bar, minutes even for the 0.5B Qwen): logits equal to base + adapter (≤ `logits_atol`) on every
# evaluation prompt, the same greedy answers on the first `greedy_prompts` (a divergence must be a
# near-tie: top-2 logit gap < 1e-3). Then it saves the folder **in the base's own dtype** (the Qwen is
# published in bf16: 1 GB, not 2 GB), reloads it from disk and *reports* what that cast moved — max
# |Δlogit| and greedy agreement, not gated: the price of bf16, not a broken merge — and checks every
# file, the chat template the adapter was trained with, `<|im_end|>` among the EOS ids of
# `generation_config.json`, and tied embeddings still tied. A failed check, Ctrl-C or `kill` leaves no
# folder behind.

# %%
for n in names:
    rep = json.loads(of_run(stages.output(cfg, "ie_merged", "run_report"), n).read_text(encoding="utf-8"))
    sizes = {p.name: p.stat().st_size for p in (merged_dir / n).iterdir()}
    print(f"{n}: fp32 merge: max |Δlogit| {rep['logits_max_abs_diff']:.1e} (≤ {rep['logits_atol']:g}) on "
          f"{rep['logits_prompts']} prompts, greedy answers identical {rep['greedy_identical']}/{rep['greedy_prompts']}; "
          f"saved as {rep['dtype']}: max |Δlogit| {rep['cast_logits_max_abs_diff']:.1e}, greedy identical "
          f"{rep['cast_greedy_identical']}/{rep['greedy_prompts']}; tied {rep['tied_embeddings']}, {rep['seconds']} s, "
          f"peak memory {rep['peak_rss_mb'] / 1024:.1f} GB")
    print("   " + ", ".join(f"{k} ({v / 1e6:.1f} MB)" if v > 1e6 else k for k, v in sorted(sizes.items())))
    assert rep["logits_max_abs_diff"] <= rep["logits_atol"]
    assert all(d["near_tie"] for d in rep["greedy_divergences"]), rep["greedy_divergences"]
    assert not rep["missing_files"] and rep["chat_template_equal"] and rep["eos_includes_im_end"]
    gen_path = of_run(stages.output(cfg, "ie_merged", "run_generation_config"), n)
    gen = json.loads(gen_path.read_text(encoding="utf-8"))
    assert im_end in ([gen["eos_token_id"]] if isinstance(gen["eos_token_id"], int) else gen["eos_token_id"])
card_path = of_run(stages.output(cfg, "ie_merged", "run_readme"), names[0])  # the model card
print("\n" + card_path.read_text(encoding="utf-8")[:600])

# %% [markdown]
# The merged folders are what the evaluation (B4) and serving (B6) stages read. A last check by
# hand: the folder is a plain model — no `adapter_config.json`, no LoRA weights — so nothing needs
# PEFT to load it:

# %%
from peft.utils import CONFIG_NAME as ADAPTER_CONFIG  # noqa: E402
from transformers import AutoModelForCausalLM  # noqa: E402

m = AutoModelForCausalLM.from_pretrained(merged_dir / names[0], dtype=torch.float32)
assert not (merged_dir / names[0] / ADAPTER_CONFIG).exists()  # PEFT's adapter_config.json
assert not any("lora_" in k for k in m.state_dict())
print(type(m).__name__, f"{sum(p.numel() for p in m.parameters()):,} parameters, no LoRA modules")

# %% [markdown]
# ## Exercises
#
# Each solution is hidden behind the toggle below its exercise; try first, then open it (it runs and
# checks itself whenever the notebook runs).

# %% [markdown]
# ### Exercise 1 · Where the loss mask starts and ends
#
# For the training example of section 1 (`line`, encoded as `ex`), predict the position of the first
# trained token and the number of trained tokens **without** looking at the labels: render the
# conversation without the answer (`apply_chat_template(..., add_generation_prompt=True)`) and
# tokenize the answer alone. Then compare with the labels, and compute this example's answer-token
# share next to the training set's (`trained_token_share` of the report).

# %% tags=["hide-cell"]
prompt_only = list(tok.apply_chat_template(line["messages"][:-1], add_generation_prompt=True, tokenize=True,
                                           return_dict=False))
answer_only = tok(line["messages"][-1]["content"], add_special_tokens=False)["input_ids"]
print(f"prompt {len(prompt_only)} tokens, answer {len(answer_only)} + <|im_end|>, then 1 newline: "
      f"{len(prompt_only) + len(answer_only) + 2} = {len(ex.ids)} tokens")
print(f"this example trains {len(trained) / len(ex.ids):.1%} of its tokens; the training set {share:.1%}")
assert ex.ids[:len(prompt_only)] == prompt_only and trained[0] == len(prompt_only)
assert len(trained) == len(answer_only) + 1 and len(ex.ids) == len(prompt_only) + len(answer_only) + 2

# %% [markdown]
# ### Exercise 2 · Qwen2.5-1.5B by hand
#
# A LoRA pair on a `nn.Linear(in, out)` adds `r · (in + out)` parameters. From the numbers in
# `QWEN25_15B` alone (hidden size, intermediate size, layers, heads, kv heads; head dim = hidden ÷
# heads), compute what r = 8 on the seven projections trains, and the base model's size — Qwen2
# has biases on q, k and v, two RMSNorms per layer plus a final one, and a tied embedding. Check both
# against `lora_share`, and the share PEFT prints (trainable ÷ (base + trainable)) against 0.59 %.
# Then do the trainable count for this profile's base (`base_cfg`).

# %% tags=["hide-cell"]
def lora_trainable(h, inter, layers, heads, kv_heads, head_dim, r, targets):
    q, kv = heads * head_dim, kv_heads * head_dim
    shape = {"q_proj": (h, q), "k_proj": (h, kv), "v_proj": (h, kv), "o_proj": (q, h),
             "gate_proj": (h, inter), "up_proj": (h, inter), "down_proj": (inter, h)}
    return layers * sum(r * sum(shape[t]) for t in targets)


Q = QWEN25_15B
qh, qi, qkv_dim = Q["hidden_size"], Q["intermediate_size"], Q["num_key_value_heads"] * Q["hidden_size"] // Q["num_attention_heads"]
qwen_trainable = lora_trainable(qh, qi, Q["num_hidden_layers"], Q["num_attention_heads"], Q["num_key_value_heads"],
                                qh // Q["num_attention_heads"], lc.r, lc.targets)
per_layer = (qh * qh + qh) + 2 * (qh * qkv_dim + qkv_dim) + qh * qh + 3 * qh * qi + 2 * qh  # attn (+bias), mlp, norms
qwen_base = Q["vocab_size"] * qh + Q["num_hidden_layers"] * per_layer + qh  # tied embedding counted once
print(f"Qwen2.5-1.5B: {qwen_trainable:,} trainable of {qwen_base:,} → {100 * qwen_trainable / (qwen_base + qwen_trainable):.3f} %")
assert qwen_trainable == qwen["trainable"] and qwen_base == qwen["base"]
assert round(100 * qwen_trainable / (qwen_base + qwen_trainable), 2) == 0.59
hd = getattr(base_cfg, "head_dim", None) or base_cfg.hidden_size // base_cfg.num_attention_heads
ours_trainable = lora_trainable(base_cfg.hidden_size, base_cfg.intermediate_size, base_cfg.num_hidden_layers,
                                base_cfg.num_attention_heads, base_cfg.num_key_value_heads, hd, lc.r, lc.targets)
print(f"this profile's base: {ours_trainable:,} trainable (lora_share: {ours['trainable']:,})")
assert ours_trainable == ours["trainable"]

# %% [markdown]
# ### Exercise 3 · The merged weight is `W + (α/r)·B A`
#
# Read one weight matrix three times, straight from the safetensors files: layer 0's `q_proj` of
# the base, its `lora_A` and `lora_B` from the first run's adapter, and the same matrix of the merged
# folder. Predict how large `max |W_merged − (W + α/r · B A)|` is in the merged dtype, and how large
# the update `α/r · B A` is next to `W` after this short training.

# %% tags=["hide-cell"]
from safetensors import safe_open  # noqa: E402


def tensor(folder: Path, key: str) -> torch.Tensor:
    for f in sorted(Path(folder).glob("*.safetensors")):
        with safe_open(str(f), framework="pt") as st:
            if key in st.keys():
                return st.get_tensor(key).float()
    raise KeyError(f"{key} in {folder.name}")


base_folder = Path(reports[first]["base"])
if base_folder.is_dir():  # a local base (MicroLM's export on smoke/cpu; a hub id is read from the cache instead)
    key = "model.layers.0.self_attn.q_proj.weight"
    adapter = of_run(stages.output(cfg, "ie_lora", "run"), first)
    acfg = json.loads((adapter / ADAPTER_CONFIG).read_text(encoding="utf-8"))  # PEFT's adapter_config.json
    lora_scale = acfg["lora_alpha"] / acfg["r"]
    w0 = tensor(base_folder, key)
    lora_a = tensor(adapter, f"base_model.model.{key[:-len('.weight')]}.lora_A.weight")
    lora_b = tensor(adapter, f"base_model.model.{key[:-len('.weight')]}.lora_B.weight")
    w_merged = tensor(merged_dir / first, key)
    update = lora_scale * lora_b @ lora_a
    err = (w_merged - (w0 + update)).abs().max().item()
    print(f"{key}: max |W_merged − (W + α/r·BA)| = {err:.1e}; max |α/r·BA| = {update.abs().max().item():.1e} "
          f"next to max |W| = {w0.abs().max().item():.2f}")
    merged_report = of_run(stages.output(cfg, "ie_merged", "run_report"), first)
    dtype = json.loads(merged_report.read_text(encoding="utf-8"))["dtype"]
    assert err <= (1e-5 if dtype in ("float32", "fp32") else 1e-2 * w0.abs().max().item()), (err, dtype)
    assert update.abs().max().item() > 0, "the adapter learned something"
