# ---
# jupyter:
#   kernelspec:
#     display_name: Python 3 (ipykernel)
#     language: python
#     name: python3
# ---

# %% [markdown]
# # 03 · From text to token files (stage A4)
#
# Pretraining reads tokens, not text, billions of times over. So the corpus is encoded **once** into
# flat binary files of `uint16` ids (6,400 < 65,536, two bytes per token) that the trainer maps into
# memory and samples from without loading them:
#
# ```
# tokens/train.bin   ids of every train document back to back, each ending with <|endoftext|>
# tokens/train.idx   int64 offsets: document k = bin[idx[k]:idx[k+1]]
# tokens/val.bin, val.idx, meta.json
# ```
#
# Encoding runs in 2+ processes, batches in file order, so the bytes are the same whatever the
# process count (tested). A vocabulary that does not fit `uint16` is refused.
#
# CLI: `microlm tokens --profile cpu` · artifact: `runs/<profile>/tokens/`.

# %% tags=["parameters"]
import os

profile = os.environ.get("MICROLM_PROFILE", "cpu")

# %%
import json

import matplotlib.pyplot as plt
import numpy as np

from microlm import stages
from microlm.stages import load_config
from microlm.tokenizer import Tokenizer
from microlm.tokenizer.memmap import TokenWindows, open_tokens, read_index
from microlm.tokenizer.training import read_texts

cfg = load_config(profile)
stages.require("tokens", cfg)  # encodes the corpus if missing or stale, else skips
tok = Tokenizer.load(stages.stage_dir(cfg, "tokenizer"))
meta = json.loads(stages.output(cfg, "tokens", "meta").read_text(encoding="utf-8"))
print(json.dumps(meta, indent=1))
train = open_tokens(stages.output(cfg, "tokens", "train"))
idx = read_index(stages.output(cfg, "tokens", "train"))
assert train.dtype == np.uint16 and len(train) == meta["splits"]["train"]["tokens"]
assert (stages.output(cfg, "tokens", "train")).stat().st_size == 2 * len(train), "two bytes per token"
assert idx[0] == 0 and idx[-1] == len(train) and np.all(np.diff(idx) > 0)

# %% [markdown]
# ## 1 · The layout
#
# The first document as stored: its ids, their tokens, and the EOS id (0) that closes it. Every
# document ends with exactly one EOS, so the model learns where texts stop.

# %%
first = train[idx[0]:idx[1]]
print(first[:40].tolist())
print([tok.id_to_token(int(i)) for i in first[:20]])
print(repr(tok.decode(first.tolist())[:120]))
docs_train = read_texts(stages.output(cfg, "corpus", "train"), limit=50)
for k in range(min(50, len(idx) - 1)):
    doc = train[idx[k]:idx[k + 1]].tolist()
    assert doc[-1] == tok.eos_id and doc.count(tok.eos_id) == 1
    assert tok.decode(doc[:-1]) == docs_train[k].removesuffix("<|endoftext|>")
eos_positions = np.flatnonzero(train == tok.eos_id)
assert np.array_equal(eos_positions + 1, idx[1:]), "EOS exactly at every document end"

# %% [markdown]
# ## 2 · How long are documents in tokens?
#
# The context window of the model (512 tokens for the reference model) is a sampling window, not a
# document boundary: long documents are seen in pieces, short ones share a window with the next
# document after an EOS.

# %%
doc_tokens = np.diff(idx)
print(f"{len(doc_tokens):,} train docs: median {np.median(doc_tokens):.0f} tokens, "
      f"90th pct {np.percentile(doc_tokens, 90):.0f}, max {doc_tokens.max():,}")
fig, ax = plt.subplots(1, 2, figsize=(11, 3.5))
ax[0].hist(np.log10(doc_tokens), bins=50)
ax[0].set_xlabel("log10(tokens per document)")
ax[0].set_ylabel("documents")
ax[0].set_title("Tokens per document")
share = np.cumsum(np.sort(doc_tokens)[::-1]) / doc_tokens.sum()
ax[1].plot(np.arange(1, len(share) + 1) / len(share), share)
ax[1].set_xlabel("share of documents (longest first)")
ax[1].set_ylabel("share of tokens")
ax[1].set_title("Where the tokens are")
plt.tight_layout()
plt.show()
assert doc_tokens.sum() == len(train)

# %% [markdown]
# ## 3 · Token lengths and frequencies
#
# Left: how many bytes a token spells, over the vocabulary and weighted by use — most tokens in
# running text are whole Chinese characters (3 bytes). Right: token frequency by rank, the Zipf
# curve every language shows.

# %%
sample = np.asarray(train[: min(len(train), 5_000_000)])
counts = np.bincount(sample, minlength=tok.vocab_size)
tok_len = np.array([len(tok.vocab[i]) if i >= len(tok.special_tokens) else 0 for i in range(tok.vocab_size)])
fig, ax = plt.subplots(1, 2, figsize=(11, 3.5))
bins = np.arange(0, tok_len.max() + 2) - 0.5
ax[0].hist(tok_len, bins=bins, alpha=0.6, density=True, label="vocabulary")
ax[0].hist(tok_len, bins=bins, weights=counts, alpha=0.6, density=True, label="running text")
ax[0].set_xlabel("bytes per token")
ax[0].legend()
ax[0].set_title("Token lengths")
ranked = np.sort(counts[counts > 0])[::-1]
ax[1].loglog(np.arange(1, len(ranked) + 1), ranked)
ax[1].set_xlabel("rank")
ax[1].set_ylabel("count")
ax[1].set_title("Token frequency (Zipf)")
plt.tight_layout()
plt.show()
used = (counts > 0).sum()
print(f"{used:,} of {tok.vocab_size:,} ids occur in the first {len(sample):,} tokens; "
      f"mean bytes/token in text {np.average(tok_len, weights=counts):.2f}")
assert counts.sum() == len(sample) and used > 0.5 * tok.vocab_size

# %% [markdown]
# ## 4 · Sampling training windows
#
# `TokenWindows` draws random start positions and returns `x = ids[s : s+T]`, `y = ids[s+1 : s+T+1]`:
# the target at each position is the next token. It re-opens the memmap for every batch (as
# nanoGPT does), so memory stays flat however long training runs, and reads only the sampled
# windows, never the whole file.

# %%
block = 64 if profile == "smoke" else 256
windows = TokenWindows(stages.output(cfg, "tokens", "train"), block_size=block, seed=cfg.seed)
x, y = windows.batch(4)
print(x.shape, y.shape)
print("x:", repr(tok.decode(x[0, :24].tolist())))
print("y:", repr(tok.decode(y[0, :24].tolist())))
assert np.array_equal(x[:, 1:], y[:, :-1]), "y is x shifted by one"
xt, yt = windows.torch_batch(8)
assert xt.shape == (8, block) and str(xt.dtype) == "torch.int64"

# %% [markdown]
# ## Exercises
#
# Three questions answered from the token files alone. Try each before opening the solution; the
# solutions run — and assert — whenever the notebook runs.
#
# ### Exercise 1 · Bytes per token on the val split
#
# Compute the compression of the val split from `val.bin`, `val.idx` and the corpus text: UTF-8 bytes
# of the documents (without the EOS marker) per token (without the EOS ids). The tokenizer's report
# (chapter 02) gives `bytes_per_token` on the same documents, but it encoded each one **with** its
# `<|endoftext|>` text. Predict: is its number higher or lower than yours, and can you reproduce it
# exactly from the token files?

# %% tags=["hide-cell"]
EOS = "<|endoftext|>"
val = open_tokens(stages.output(cfg, "tokens", "val"))
vidx = read_index(stages.output(cfg, "tokens", "val"))
val_texts = read_texts(stages.output(cfg, "corpus", "val"))
n_docs = len(vidx) - 1
body_bytes = sum(len(t.removesuffix(EOS).encode("utf-8")) for t in val_texts)
bpt = body_bytes / (len(val) - n_docs)
tok_report = json.loads(stages.output(cfg, "tokenizer", "report").read_text(encoding="utf-8"))
ours = tok_report["compression"]["microlm"]
with_eos = (body_bytes + n_docs * len(EOS.encode())) / len(val)  # each EOS: 13 bytes of text, one token
print(f"val: {n_docs:,} documents, {len(val):,} tokens, {body_bytes:,} bytes -> {bpt:.4f} bytes/token "
      f"(text only); counting '{EOS}' as 13 bytes in one token: {with_eos:.4f}; tokenizer report: "
      f"{ours['bytes_per_token']}")
assert n_docs == len(val_texts) == meta["splits"]["val"]["docs"] and len(val) == meta["splits"]["val"]["tokens"]
assert ours["tokens"] == len(val), "the same ids: one EOS id per document either way"
assert round(with_eos, 4) == ours["bytes_per_token"] and with_eos > bpt

# %% [markdown]
# ### Exercise 2 · How often does a training window cross a document boundary?
#
# `TokenWindows` draws a start `s` uniformly from `[0, n - T)`. A window `x = ids[s : s+T]` holds no
# EOS only if it lies inside one document before its EOS: a document of `L` tokens (EOS included)
# offers `max(0, L - T)` such starts. Predict the share of windows with **no** document boundary from
# the document lengths `doc_tokens`, at this chapter's `block`, then sample 4,000 windows and compare.

# %% tags=["hide-cell"]
import math

p_inside = np.maximum(doc_tokens - block, 0).sum() / (len(train) - block)
sampler = TokenWindows(stages.output(cfg, "tokens", "train"), block_size=block, seed=cfg.seed + 1)
xs, _ = sampler.batch(4000)
seen = float((xs != tok.eos_id).all(axis=1).mean())
sigma = math.sqrt(p_inside * (1 - p_inside) / len(xs))
print(f"T={block}: predicted {p_inside:.3%} of windows inside one document, sampled {seen:.3%} "
      f"(± {sigma:.3%}); so {1 - p_inside:.1%} of windows see an EOS and the start of another document")
assert abs(seen - p_inside) < 5 * sigma + 1e-3

# %% [markdown]
# ### Exercise 3 · Which document is this token from?
#
# The `.idx` file answers "where does document *k* start", and with a binary search also the reverse:
# which document holds token position *p*. For 20 random positions of `val.bin`, find the document
# with `np.searchsorted`, decode it from the token file and check it is the *k*-th document of
# `corpus/val.jsonl`.

# %% tags=["hide-cell"]
rng = np.random.default_rng(cfg.seed)
for p in rng.integers(0, len(val), 20):
    k = int(np.searchsorted(vidx, p, side="right")) - 1
    assert vidx[k] <= p < vidx[k + 1]
    doc = val[vidx[k]:vidx[k + 1]].tolist()
    assert doc[-1] == tok.eos_id and tok.decode(doc[:-1]) == val_texts[k].removesuffix(EOS)
print(f"position {p:,} is token {p - vidx[k]} of val document {k} ({vidx[k + 1] - vidx[k]} tokens): "
      f"{val_texts[k][:60]!r}")
