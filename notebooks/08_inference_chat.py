# ---
# jupyter:
#   kernelspec:
#     display_name: Python 3 (ipykernel)
#     language: python
#     name: python3
# ---

# %% [markdown]
# # 08 · Talking to the model: generation, chat, KV cache and the Hugging Face export (stage A8)
#
# The SFT model from chapter 06 is finally used the way people use language models: a prompt goes
# in, text streams out. This chapter opens the decode loop (`microlm/infer/generate.py`), shows what
# each sampling knob does on one prompt, measures repetition and how the penalty changes it, times
# the KV cache against recomputing everything, scripts a chat through the same loop as
# `microlm chat`, and exports the model to a folder `transformers` loads without custom code.
#
# CLI: `microlm chat --profile cpu` (add `--adapter runs/cpu/lora/adapter` for the LoRA adapter),
# `microlm hf --profile cpu` · artifact: `runs/<profile>/hf/`.

# %% tags=["parameters"]
import os

profile = os.environ.get("MICROLM_PROFILE", "cpu")

# %%
import copy
import dataclasses
import io
import json
import time

import matplotlib.pyplot as plt
import numpy as np
import torch

from microlm import stages
from microlm.infer.chat import ChatSession, run_chat
from microlm.infer.generate import generate_ids, generate_text, process_logits, stream_text
from microlm.infer.metrics import repetition_report
from microlm.model import load_model
from microlm.plotting import cjk_font
from microlm.stages import load_config

cfg = load_config(profile)
sft_dir = stages.require("sft", cfg)
model, tok = load_model(sft_dir, tokenizer=stages.stage_dir(cfg, "tokenizer"))
print(f"{model.num_parameters():,} parameters, context {model.cfg.max_seq_len} tokens")
gen = cfg.generate  # the profile's defaults (configs/<profile>.yaml, section generate); calls override fields
print(gen)
assert tok.vocab_size <= model.cfg.vocab_size

# %% [markdown]
# ## 1 · One loop for everything
#
# `generate_text` encodes the prompt (as a ChatML user turn with `chat=True`), runs **one prefill**
# of the whole prompt through the model — filling the KV cache — and then one-token decode steps.
# At each step the last position's logits go through the same pipeline as in `transformers`:
#
# 1. **repetition penalty** $p$: for every id already in the prompt or the answer, a positive logit
#    is divided by $p$, a negative one multiplied by $p$ (both make it less likely);
# 2. **temperature** $T$: logits ÷ $T$ (below 1 sharpens, above 1 flattens; $T=0$ means argmax);
# 3. **top-k**: keep the $k$ largest logits;
# 4. **top-p** (nucleus): keep the smallest set of most likely tokens whose probability reaches $p$.
#
# Generation stops at `<|im_end|>` (end of a turn), `<|endoftext|>`, a custom stop string or
# `max_new_tokens`. Several prompts run as one batch, left-padded: pads are masked out of attention
# and each row's positions count only its real tokens, so a padded row computes exactly what it
# would alone (a test checks this against `transformers`).

# %%
prompt = "请介绍一下北京。"
g = generate_text(model, tok, prompt, gen, chat=True, temperature=0, repetition_penalty=1.0)
print(f"{g.prompt_tokens} prompt tokens → {len(g.ids)} new ({g.finish_reason}), {g.tokens_per_s:.0f} tokens/s")
print(g.text)
assert g.finish_reason in ("stop", "length") and len(g.ids) <= gen.max_new_tokens
again = generate_text(model, tok, prompt, gen, chat=True, temperature=0, repetition_penalty=1.0)
assert again.ids == g.ids, "greedy decoding is deterministic"

# %% [markdown]
# ## 2 · The sampling knobs on one prompt
#
# Same prompt, same seed, a small grid. Greedy ($T=0$) ignores top-p; low temperature or a small
# top-p stay close to greedy; high temperature with a wide nucleus wanders off.

# %%
grid = [(0.0, 1.0), (0.7, 0.5), (0.7, 0.9), (1.2, 0.9), (1.2, 1.0)]
texts = {}
for temperature, top_p in grid:
    out = generate_text(model, tok, prompt, gen, chat=True, temperature=temperature, top_p=top_p, top_k=0,
                        repetition_penalty=1.0, seed=cfg.seed, max_new_tokens=min(48, gen.max_new_tokens))
    texts[(temperature, top_p)] = out.text
    print(f"T={temperature:<4} top_p={top_p:<4} │ {out.text[:70]!r}")
greedy_any_p = generate_text(model, tok, prompt, gen, chat=True, temperature=0, top_p=0.3, repetition_penalty=1.0,
                             max_new_tokens=min(48, gen.max_new_tokens)).text
assert greedy_any_p == texts[(0.0, 1.0)], "top-p does not change greedy decoding"

# %% [markdown]
# How many candidates does the nucleus keep? For the first answer token of our prompt, the number
# of tokens that survive top-p as $p$ grows (at $T=1$): a confident model keeps few even at
# $p=0.9$; an unsure one keeps hundreds.

# %%
ids = tok.encode_chat([{"role": "user", "content": prompt}], add_generation_prompt=True)
with torch.no_grad():
    logits = model(torch.tensor([ids]))[0][:, -1, :]
ps = [0.1, 0.3, 0.5, 0.7, 0.8, 0.9, 0.95, 0.99]
kept = [int((process_logits(logits, dataclasses.replace(gen, temperature=1.0, top_k=0, top_p=p,
                                                        repetition_penalty=1.0)) > float("-inf")).sum()) for p in ps]
plt.figure(figsize=(5.5, 3))
plt.plot(ps, kept, marker="o")
plt.yscale("log")
plt.xlabel("top_p")
plt.ylabel("tokens kept")
plt.title("nucleus size for the first answer token")
plt.show()
print(dict(zip(ps, kept, strict=True)))
assert kept == sorted(kept) and kept[0] >= 1, "a larger p never keeps fewer tokens"

# %% [markdown]
# ## 3 · Repetition, and what the penalty does
#
# Small models love loops ("的国家的国家的国家…"); it is MiniMind users' most common complaint.
# Two measures on characters: **distinct-n** (distinct n-grams ÷ all n-grams over all answers;
# higher is more varied) and the **repeated 4-gram rate** (share of an answer's 4-grams that
# already appeared earlier in the same answer; 0 = no self-repetition). Greedy decoding on a few
# questions, with the penalty off and on. (The README has the same measure on 50 held-out
# prompts with the default sampling settings, from `benchmarks/bench_generate.py`.)

# %%
questions = ["请介绍一下北京。", "写一首关于春天的诗。", "如何学习机器学习？", "中国有哪些著名的河流？",
             "给我讲一个故事。", "什么是人工智能？"]
penalties = [1.0, 1.1, 1.3, 1.6]
rows = {}
answers_by_p = {}
for p in penalties:
    outs = generate_text(model, tok, questions, gen, chat=True, temperature=0, repetition_penalty=p)
    answers_by_p[p] = [o.text for o in outs]
    rows[p] = repetition_report(answers_by_p[p])
for p, r in rows.items():
    print(f"penalty {p}: distinct-1 {r['distinct_1']:.3f}  distinct-2 {r['distinct_2']:.3f}  "
          f"repeated 4-grams {r['repeated_4gram_rate']:.3f}  mean length {r['mean_chars']}")
print("\nwithout penalty:", answers_by_p[1.0][0][:80])
print("penalty 1.3:    ", answers_by_p[1.3][0][:80])
fig, ax = plt.subplots(figsize=(6, 3))
x = np.arange(len(penalties))
ax.bar(x - 0.2, [rows[p]["repeated_4gram_rate"] for p in penalties], 0.4, label="repeated 4-gram rate")
ax.bar(x + 0.2, [rows[p]["distinct_2"] for p in penalties], 0.4, label="distinct-2")
ax.set_xticks(x, [str(p) for p in penalties])
ax.set_xlabel("repetition penalty (greedy)")
ax.legend()
plt.show()
assert all(0 <= r["repeated_4gram_rate"] <= 1 and 0 < r["distinct_1"] <= 1 for r in rows.values())
assert answers_by_p[1.0] != answers_by_p[1.6], "the penalty changes what is generated"

# %% [markdown]
# ## 4 · Streaming without broken characters
#
# A Chinese character is three UTF-8 bytes and a byte-level BPE token may hold only part of one.
# `stream_text` decodes incrementally and only yields complete characters (and holds back text that
# could be the start of a stop string), so a terminal never shows `�` in the middle of an answer.

# %%
deltas = list(stream_text(model, tok, prompt, gen, chat=True, temperature=0, repetition_penalty=1.0))
print(" | ".join(deltas[:20]))
assert "".join(deltas) == g.text, "the stream adds up to the same answer"
assert all(d for d in deltas)

# %% [markdown]
# ## 5 · What the KV cache buys
#
# Without a cache, every step runs the whole sequence through the model again (cost grows with the
# length); with it, one token per step. Time to generate $n$ tokens both ways (greedy, batch 1; the
# tokens are identical). The README's table has the 31.7M model at 128/256/512 tokens.

# %%
room = model.cfg.max_seq_len - 8
lengths = [n for n in (16, 32, 48, 96, 160, 240) if n <= room]
start = tok.encode("中国")[:4]
speed = {"cache": [], "no cache": []}
for n in lengths:
    outs = []
    for name, use_cache in (("cache", True), ("no cache", False)):
        t0 = time.perf_counter()
        outs.append(generate_ids(model, [start], max_new_tokens=n, temperature=0, repetition_penalty=1.0,
                                 ignore_eos=True, use_cache=use_cache)[0])
        speed[name].append(n / (time.perf_counter() - t0))
    assert outs[0] == outs[1], "the cache changes the speed, never the tokens"
plt.figure(figsize=(5.5, 3))
for name, v in speed.items():
    plt.plot(lengths, v, marker="o", label=name)
plt.xlabel("new tokens")
plt.ylabel("tokens / s")
plt.legend()
plt.title("decode speed with and without the KV cache")
plt.show()
print({n: f"x{c / u:.1f}" for n, c, u in zip(lengths, speed["cache"], speed["no cache"], strict=True)})

# %% [markdown]
# ### Same numbers, another layout
#
# With the cache, one decode step at batch 1 is a chain of matrix-vector products: every weight is
# read once per token, so the speed is set by how fast the products *stream* memory. PyTorch's
# `nn.Linear` keeps `W` as `(out, in)`, row-major; with `in` = the model width, that is short
# contiguous runs, and on the CPUs we measured MKL streams those slower than long ones.
# `model.decode_layout()` stores each matrix with its longer side contiguous (column-major when
# `out > in`: qkv, gate/up and the LM head) — same values, same shapes; state dicts and the export
# do not change. `microlm chat` does it on a CPU. At batch ≥ 8 and in training the usual layout is
# as fast or faster, which is why it is not the default.

# %%
fast = copy.deepcopy(model).decode_layout()
wide = [m for m in fast.modules() if isinstance(m, torch.nn.Linear) and m.out_features > m.in_features]
assert wide and all(m.weight.stride(0) == 1 for m in wide), "column-major: the out side is contiguous"
assert torch.equal(fast.lm_head.weight, model.lm_head.weight), "same values"
layout_speed = {"row-major (default)": [], "decode_layout()": []}
layout_ids = {}
n_new = min(128, room)
for _ in range(3):  # alternate, so the machine's drift hits both alike
    for name, m in zip(layout_speed, (model, fast), strict=True):
        t0 = time.perf_counter()
        layout_ids[name] = generate_ids(m, [start], max_new_tokens=n_new, temperature=0, repetition_penalty=1.0,
                                        ignore_eos=True)[0]
        layout_speed[name].append(n_new / (time.perf_counter() - t0))
for name, v in layout_speed.items():
    print(f"{name:30s} {max(v):6.0f} tokens/s (best of 3)")
assert len(set(map(tuple, layout_ids.values()))) == 1, "the layout changes the speed, never the tokens"
del fast

# %% [markdown]
# ## 6 · A scripted chat
#
# `microlm chat` is `run_chat` over a `ChatSession`: the session keeps the history, drops the oldest
# turns when prompt + answer would not fit the context, and adds a turn only once its answer is
# complete (Ctrl-C mid-answer leaves the history as it was). The same loop reads a pipe, so it can
# be scripted — here with `/system`, `/reset` and `/exit`:

# %%
answer_len = min(gen.max_new_tokens, max(8, (model.cfg.max_seq_len - 64) // 2))  # a small context still leaves 8
session = ChatSession(model, tok, dataclasses.replace(gen, seed=cfg.seed, max_new_tokens=answer_len))
script = "你好\n/system 你是助手。\n你是谁？\n北京在哪里？\n/exit\n"
out, err = io.StringIO(), io.StringIO()
run_chat(session, io.StringIO(script), out, err, interactive=False)
for q, a in zip([m for m in session.history if m["role"] == "user"],
                [m for m in session.history if m["role"] == "assistant"], strict=True):
    print(f"user> {q['content']}\nassistant> {a['content'][:100]}\n")
print(err.getvalue())
assert "error" not in err.getvalue(), err.getvalue()
assert session.system and len(session.history) == 4, "two turns after /system (which clears the history)"
assert err.getvalue().count("tokens/s") == 3

# %% [markdown]
# ## 7 · Joining the ecosystem: the Hugging Face export
#
# Our blocks are Llama's blocks (RMSNorm, RoPE in the rotate-half layout, SwiGLU, GQA), so the
# export only renames tensors and splits our fused `qkv_proj`/`gate_up_proj`. The folder has the
# Llama `config.json`, `model.safetensors`, our tokenizer as `tokenizer.json` with the ChatML
# template, and `generation_config.json` with both stop ids — what `transformers`, PEFT and vLLM
# (chapter D) need. The stage checks the export against our model; here we check it again by hand.

# %%
hf_dir = stages.require("hf", cfg)
print(sorted(p.name for p in hf_dir.iterdir()))
hf_report = json.loads(stages.output(cfg, "hf", "report").read_text(encoding="utf-8"))
print(json.dumps(hf_report["check"], indent=1))

import transformers  # noqa: E402

hf_model = transformers.AutoModelForCausalLM.from_pretrained(str(hf_dir), dtype=torch.float32).eval()
hf_tok = transformers.AutoTokenizer.from_pretrained(str(hf_dir))
messages = [{"role": "user", "content": prompt}]
text = hf_tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
hf_ids = hf_tok(text, add_special_tokens=False, return_tensors="pt")["input_ids"]
assert hf_ids[0].tolist() == ids, "same template, same ids"
with torch.no_grad():
    diff = (model(hf_ids)[0] - hf_model(hf_ids).logits).abs().max().item()
    n = min(64, model.cfg.max_seq_len - hf_ids.shape[1])
    theirs = hf_model.generate(hf_ids, max_new_tokens=n, min_new_tokens=n, do_sample=False, eos_token_id=None,
                               repetition_penalty=1.0, pad_token_id=tok.eos_id)[0, hf_ids.shape[1]:].tolist()
ours = generate_ids(model, [ids], max_new_tokens=n, temperature=0, repetition_penalty=1.0, ignore_eos=True)[0]
print(f"max |logit difference| {diff:.1e}; greedy {n} tokens identical: {ours == theirs}")
assert diff <= 1e-4 and ours == theirs

# %% [markdown]
# And back: `import_hf` reads a Llama-layout folder into our `TransformerLM` and `Tokenizer`
# (`microlm import-hf DIR --out FOLDER` writes it as our checkpoint, which our trainer continues).

# %%
from microlm.model.hf_export import import_hf  # noqa: E402

back, back_tok = import_hf(hf_dir)
same = all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), back.state_dict().values(), strict=True))
print("round trip exact:", same, "| tokenizer ids equal:", back_tok.encode(prompt) == tok.encode(prompt))
assert same and back_tok.encode(prompt) == tok.encode(prompt)
cjk_font()  # (a CJK font for plots when one is installed)

# %% [markdown]
# ## Exercises
#
# Each solution is hidden behind the toggle below its exercise; try first, then open it (it runs and
# checks itself whenever the notebook runs).

# %% [markdown]
# ### Exercise 1 · How big is the KV cache?
#
# The cache stores a key and a value vector per layer, per kv head, per position. Write its size in
# bytes (fp32) for a batch of 4 sequences of `max_seq_len` tokens as a formula of the model's config,
# check it against `KVCache(...).nbytes`, and predict how much larger it would be without grouped-query
# attention (`n_kv_heads = n_heads`). Then: after how many tokens (batch 1) does the cache of the
# 31.7M reference weigh as much as its fp32 weights?

# %% tags=["hide-cell"]
from microlm.model import MODEL_PRESETS, KVCache, TransformerLM, count_parameters  # noqa: E402


def cache_bytes(mc, batch: int, length: int, bytes_per: int = 4) -> int:
    return 2 * mc.n_layers * batch * mc.kv_heads * length * mc.head_dim * bytes_per  # 2: keys and values


mc = model.cfg
gqa = KVCache(mc, 4, mc.max_seq_len)
mha = KVCache(dataclasses.replace(mc, n_kv_heads=None), 4, mc.max_seq_len)
print(f"this model: {cache_bytes(mc, 4, mc.max_seq_len) / 2**20:.2f} MiB (formula) = {gqa.nbytes / 2**20:.2f} MiB "
      f"(allocated); without GQA {mha.nbytes / 2**20:.2f} MiB (x{mha.nbytes / gqa.nbytes:g})")
assert gqa.nbytes == cache_bytes(mc, 4, mc.max_seq_len)
assert mha.nbytes * mc.kv_heads == gqa.nbytes * mc.n_heads
ref = MODEL_PRESETS["microlm-31.7m"]
per_token = cache_bytes(ref, 1, 1)
with torch.device("meta"):  # shapes only: nothing is allocated
    n_ref = count_parameters(TransformerLM(ref))
print(f"31.7M reference: {per_token / 1024:.0f} KiB per token; the cache equals the {4 * n_ref / 2**20:.0f} MiB "
      f"of fp32 weights after {4 * n_ref / per_token:,.0f} tokens")
assert per_token == 2 * ref.n_layers * ref.dim * 4  # no GQA in the reference: kv_heads · head_dim = dim

# %% [markdown]
# ### Exercise 2 · The repetition penalty by hand
#
# Take the logits of the first answer token of section 2 (`logits`) and treat the prompt's ids as
# already seen. Apply a penalty of 1.3 yourself (divide a positive logit by 1.3, multiply a negative
# one) and check the result against `process_logits` with `temperature=0`. Predict: can a penalty ever
# *raise* a seen token's logit? Does the greedy choice change here?

# %% tags=["hide-cell"]
pen = 1.3
seen = torch.zeros_like(logits, dtype=torch.bool)
seen[0, ids] = True
lib = process_logits(logits, dataclasses.replace(gen, temperature=0, repetition_penalty=pen), seen)
manual = logits.clone().float()
for i in set(ids):
    v = manual[0, i].item()
    manual[0, i] = v / pen if v > 0 else v * pen
top_before, top_after = int(logits.argmax()), int(lib.argmax())
print(f"{len(set(ids))} seen ids; greedy token {tok.decode([top_before])!r} → {tok.decode([top_after])!r} "
      f"({'changed' if top_before != top_after else 'unchanged'})")
assert torch.allclose(lib, manual)
assert (lib[seen] <= logits[seen]).all() and torch.equal(lib[~seen], logits[~seen].float())
assert top_after == top_before or seen[0, top_before]  # only a penalized token can lose first place

# %% [markdown]
# ### Exercise 3 · Temperature and the top token
#
# For the same logits, compute the probability of the most likely token after dividing by
# T = 0.25, 0.5, 1, 2, 4 (top-k and top-p off) — by hand with a softmax, and through `process_logits`.
# Predict the shape of the curve before you look: what does it approach for small T, and for large T?

# %% tags=["hide-cell"]
temps = [0.25, 0.5, 1.0, 2.0, 4.0]
top_prob = []
for t in temps:
    lib_p = process_logits(logits, dataclasses.replace(gen, temperature=t, top_k=0, top_p=1.0,
                                                       repetition_penalty=1.0)).softmax(-1)
    hand_p = torch.softmax(logits.float() / t, dim=-1)
    assert torch.allclose(lib_p, hand_p, atol=1e-6)
    top_prob.append(hand_p.max().item())
print({t: round(p, 4) for t, p in zip(temps, top_prob, strict=True)}, f"(uniform would be {1 / logits.shape[-1]:.1e})")
assert all(a >= b - 1e-7 for a, b in zip(top_prob, top_prob[1:], strict=False)), "a higher temperature never sharpens"
assert top_prob[-1] > 1 / logits.shape[-1]
