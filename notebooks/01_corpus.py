# ---
# jupyter:
#   kernelspec:
#     display_name: Python 3 (ipykernel)
#     language: python
#     name: python3
# ---

# %% [markdown]
# # 01 · The corpus: clean · dedup · split · EOS (stages A1–A2)
#
# A language model is what its data is. MiniMind never released the code that cleaned its
# pretraining corpus; here it is, run on real Chinese text, with a report of everything it
# dropped and why. The stage streams its input in batches, so the same code handles a laptop slice
# or 1.41M records in bounded memory:
#
# 1. **read** MiniMind `{"text"}` JSONL, plain text or gzip, line by line;
# 2. **normalize** each document (control characters, NFKC where it is safe for Chinese, markup
#    remnants, whitespace);
# 3. **filter** by length, share of Chinese characters and repetition;
# 4. **deduplicate**: exact (hash of the normalized text) and near (MinHash + LSH), keep the first;
# 5. **split** train/val by a hash of the document, and append the **EOS** marker.
#
# CLI: `microlm corpus --profile cpu` · artifact: `runs/<profile>/corpus/`.

# %% tags=["parameters"]
import os

profile = os.environ.get("MICROLM_PROFILE", "cpu")

# %%
import itertools
import json

import matplotlib.pyplot as plt
import numpy as np

from microlm import stages
from microlm.data import clean
from microlm.data.dedup import MinHasher, candidate_probability, estimate_jaccard, jaccard
from microlm.data.prepare_pretrain import exact_hash, iter_corpus, split_of
from microlm.data.sources import Drop, iter_lines, parse_line
from microlm.stages import load_config
from microlm.stages.corpus import corpus_sources

cfg = load_config(profile)
stages.require("corpus", cfg)  # builds the stage if missing or stale, else skips
report = json.loads(stages.output(cfg, "corpus", "report").read_text(encoding="utf-8"))
sources = corpus_sources(cfg)
print(f"{report['records_in']:,} records in -> {report['records_out']:,} out "
      f"({report['train_docs']:,} train / {report['val_docs']:,} val) in {report['throughput']['seconds']} s")
assert report["records_in"] == report["records_out"] + report["drops_total"], "nothing is lost silently"

# %% [markdown]
# ## 1 · Raw records
#
# A few lines exactly as they are on disk. Sources differ a lot: reviews are one short line,
# a law is a whole file with blank lines and zero-width spaces left in.

# %%
def raw_records(limit_per_source=2000):
    """(source name, text) for the first records of every source."""
    for src in sources:
        n = 0
        for _, raw in iter_lines(src, cfg.corpus.max_line_bytes):
            try:
                text = parse_line(src.format, raw) if raw is not None else None
            except Drop:
                continue
            if text:
                yield src.name, text
                n += 1
                if n >= limit_per_source:
                    break

samples = list(raw_records())
for name, text in itertools.islice(samples[::max(len(samples) // 4, 1)], 4):
    print(f"[{name}] {text[:120]!r}")

# %% [markdown]
# ## 2 · Normalization, one rule at a time
#
# Each rule is a small pure function in `microlm.data.clean`. For every rule we find real
# records it changes and show the first difference.
#
# * `remove_controls` — control and zero-width characters (U+200B, BOM, soft hyphen, bidi marks)
#   are invisible but become tokens; `\r\n` becomes `\n`.
# * `nfkc_safe` — NFKC folds fullwidth letters and digits (`ＡＢＣ１２３` → `ABC123`) and
#   compatibility forms, **but** NFKC would also turn Chinese punctuation `，：？（…` into ASCII
#   `,:?(...`. That is not safe for Chinese text, so fullwidth punctuation is protected.
# * `strip_markup` — HTML tags, entities, markdown links/images/headings/emphasis, bare URLs.
# * `normalize_whitespace` — whitespace runs collapse, spaces *between* Chinese characters (a PDF
#   or OCR artefact) go, at most one blank line between paragraphs.

# %%
def first_diff(a, b, width=30):
    i = next((k for k, (x, y) in enumerate(zip(a, b, strict=False)) if x != y), min(len(a), len(b)))
    lo = max(i - 10, 0)
    return a[lo : i + width], b[lo : i + width]

rules = [("remove_controls", clean.remove_controls), ("nfkc_safe", clean.nfkc_safe),
         ("strip_markup", clean.strip_markup), ("normalize_whitespace", clean.normalize_whitespace)]
changed_by = {}
for rule, fn in rules:
    hits = [(name, t) for name, t in samples if fn(t) != t]
    changed_by[rule] = len(hits)
    print(f"--- {rule}: changes {len(hits)} of {len(samples)} sampled records")
    for name, t in hits[:2]:
        before, after = first_diff(t, fn(t))
        print(f"  [{name}] {before!r}\n  {'':>{len(name) + 2}} -> {after!r}")

# the protected punctuation survives, the fullwidth letters do not
assert clean.nfkc_safe("ＡＢＣ１２３，你好！（测试）…") == "ABC123，你好！（测试）…"
assert clean.normalize("中 文\u200b<b>文本</b>") == "中文文本"
assert sum(changed_by.values()) > 0

# %% [markdown]
# ## 3 · Quality filters: what they remove
#
# After normalization a document is kept only if it passes, in order: length bounds
# (`min_chars`, `max_chars`), the share of Han characters among non-space characters
# (`min_cjk_ratio`: drops English pages, pinyin annotations, tables of numbers), and two
# repetition rules in the spirit of Gopher/RefinedWeb — the share of characters in lines that
# repeat an earlier line, and the share of character 5-grams that repeat an earlier 5-gram (spam
# like "宝贝很实惠，宝宝很喜欢" pasted ten times). Below: real documents each rule removed in this run,
# with the number the rule measured.
#
# One more reason is not about quality: `heldout_task`. Chapters 06 and 07 score the fine-tuned
# model on sentences from People's Daily 1998 paragraphs held out by hash (`microlm/data/tasks.py`);
# those paragraphs are left out of pretraining too, so the model is never scored on text it has read.

# %%
thresholds = {"low_cjk_ratio": ("cjk_ratio", clean.cjk_ratio),
              "repetitive_lines": ("dup_line_ratio", clean.dup_line_ratio),
              "repetitive_ngrams": ("dup_ngram_ratio", clean.dup_ngram_ratio)}
for reason, examples in report["examples"].items():
    print(f"--- {reason}: {report['drops'][reason]:,} dropped")
    for ex in examples[:2]:
        extra = ""
        if reason in thresholds:
            label, fn = thresholds[reason]
            extra = f"  ({label}={fn(ex['text']):.2f})"
        print(f"  [{ex['source']}:{ex['line']}] {ex['text'][:90]!r}{extra}")

# %% [markdown]
# Repetition rules have false positives too: a *Shijing* poem with a refrain repeats whole lines
# by design. The thresholds (`max_dup_line_ratio`, `max_dup_ngram_ratio`) are in the config;
# the report shows every rule's examples so you can judge the trade-off on your data.

# %%
fig, ax = plt.subplots(figsize=(8, 3.5))
drops = report["drops"]
ax.barh(list(drops)[::-1], list(drops.values())[::-1], color="tab:red")
ax.set_xlabel("documents dropped")
ax.set_title(f"Drops by reason ({report['drops_total']:,} of {report['records_in']:,} records)")
for i, v in enumerate(list(drops.values())[::-1]):
    ax.text(v, i, f" {v:,}", va="center", fontsize=8)
plt.tight_layout()
plt.show()

# %%
edges = report["length_histogram"]["edges"]
labels = [f"{a}-" if b is None else f"{a}-{b}" for a, b in zip(edges, edges[1:] + [None], strict=False)]
before = np.array(report["length_histogram"]["before"])
after = np.array(report["length_histogram"]["after"])
x = np.arange(len(labels))
fig, ax = plt.subplots(figsize=(9, 3.5))
ax.bar(x - 0.2, before, 0.4, label="before (all records)")
ax.bar(x + 0.2, after, 0.4, label="after (kept)")
ax.set_xticks(x, labels, rotation=45, ha="right")
ax.set_xlabel("document length (characters)")
ax.set_ylabel("documents")
ax.set_yscale("log")
ax.legend()
ax.set_title("Length distribution before and after cleaning + dedup")
plt.tight_layout()
plt.show()
assert before.sum() >= after.sum() == report["records_out"]
assert after[0] == 0 or cfg.corpus.min_chars <= edges[1], "kept documents respect min_chars"

# %% [markdown]
# ## 4 · Deduplication
#
# **Exact**: a 64-bit hash of the normalized text with all whitespace removed and case folded.
#
# **Near**: two documents are near duplicates when the Jaccard similarity of their sets of
# character 5-grams ("shingles") is at least the threshold. Comparing every pair is quadratic;
# MinHash compresses each document to `num_perm` numbers such that the chance two signatures agree
# at a position *equals* their Jaccard similarity. We use one-permutation hashing with optimal
# densification: one hash per shingle picks a bin and the bin keeps its minimum (cost `O(n + K)`
# instead of `O(n·K)`), empty bins borrow from a fixed probe sequence.
#
# Here is a pair the stage found in this run — the exact Jaccard next to the MinHash estimate:

# %%
mh = MinHasher(cfg.corpus.dedup.num_perm, cfg.corpus.dedup.shingle_size, seed=cfg.seed)
pairs = report["near_duplicate_pairs"]
print(f"exact duplicates: {report['duplicates']['exact']:,}   near duplicates: {report['duplicates']['near']:,}   "
      f"clusters: {report['duplicates']['clusters']:,} (largest {report['duplicates']['largest_cluster']})")
for p in pairs[:3]:
    kept = p["kept"].removesuffix(cfg.corpus.eos)
    dropped = p["dropped"]
    s_kept, s_drop = mh.signatures([kept, dropped])
    print(f"\nkept   : {kept[:100]!r}\ndropped: {dropped[:100]!r}")
    print(f"  exact Jaccard {jaccard(kept, dropped):.3f}   MinHash estimate {estimate_jaccard(s_kept, s_drop):.3f}")

# %% [markdown]
# **LSH** avoids comparing each new document with every kept one: the signature is cut into
# `b` bands of `r` values; documents sharing any band become candidates, and each candidate is
# verified against the stored signature. The chance of becoming a candidate is
# `1 - (1 - s^r)^b`, an S-curve around the threshold:

# %%
d = report["duplicates"]
s = np.linspace(0, 1, 201)
fig, ax = plt.subplots(figsize=(6, 3.5))
ax.plot(s, [candidate_probability(v, d["bands"], d["rows"]) for v in s], label=f"b={d['bands']}, r={d['rows']}")
ax.axvline(d["threshold"], color="gray", ls="--", label=f"threshold {d['threshold']}")
ax.set_xlabel("Jaccard similarity")
ax.set_ylabel("P(candidate)")
ax.legend()
ax.set_title("LSH S-curve")
plt.tight_layout()
plt.show()
assert candidate_probability(d["threshold"] + 0.05, d["bands"], d["rows"]) > 0.95

# %% [markdown]
# The MinHash estimate is unbiased: on edited copies of real documents, the mean error against the
# exact Jaccard is close to zero.

# %%
rng = np.random.default_rng(0)
texts = [t for _, t in samples if len(clean.normalize(t)) >= 60][:300]
true, est = [], []
for t in texts:
    t = clean.normalize(t)
    chars = list(t)
    for _ in range(rng.integers(1, max(len(chars) // 8, 2))):
        chars[rng.integers(len(chars))] = "某"
    edited = "".join(chars)
    a, b = mh.signatures([t, edited])
    true.append(jaccard(t, edited))
    est.append(estimate_jaccard(a, b))
true, est = np.array(true), np.array(est)
err = est - true
print(f"{len(true)} pairs: mean error {err.mean():+.4f}, std {err.std():.4f}")
fig, ax = plt.subplots(figsize=(4.5, 4))
ax.scatter(true, est, s=6, alpha=0.5)
ax.plot([0, 1], [0, 1], "k--", lw=1)
ax.set_xlabel("exact Jaccard")
ax.set_ylabel("MinHash estimate")
plt.tight_layout()
plt.show()
assert abs(err.mean()) < 0.02 and err.std() < 0.08

# %% [markdown]
# ## 5 · Split and EOS
#
# The split is decided by a hash of the document itself, not by its position: re-running, or
# adding new files, never moves a document between train and val. Each document ends with the
# end-of-text marker `<|endoftext|>`, which the tokenizer stage reserves as id 0; any such marker
# found *inside* raw text was removed by normalization, so the only one is the one we add.

# %%
eos = cfg.corpus.eos
n_checked = 0
seen = set()
for split in ("train", "val"):
    for doc in itertools.islice(iter_corpus(stages.output(cfg, "corpus", split)), 20000):
        assert doc.endswith(eos) and doc.count(eos) == 1, "exactly one EOS, at the end"
        body = doc.removesuffix(eos)
        dh, sh = exact_hash(body)
        assert split_of(sh, cfg.corpus.val_fraction) == split, "split is a function of the document"
        assert dh not in seen, "no exact duplicates in the output"
        seen.add(dh)
        n_checked += 1
print(f"checked {n_checked:,} documents: one EOS each, split by hash, no exact duplicates")
val_share = report["val_docs"] / report["records_out"]
print(f"val share {val_share:.3%} (configured {cfg.corpus.val_fraction:.1%})")
assert report["val_docs"] > 0 and abs(val_share - cfg.corpus.val_fraction) < 0.5 * cfg.corpus.val_fraction + 0.01

# %% [markdown]
# ## 6 · Throughput and memory
#
# The stage holds no documents: memory grows only with the dedup index (band keys, a 16-bit
# signature and an exact-hash key per kept document). `benchmarks/bench_corpus.py` measures it on
# the whole data bundle and on 1.41M records, against `datasketch` and `rensa`.

# %%
t, m = report["throughput"], report["memory"]
print(f"{t['records_per_s']:,.0f} records/s with {t['workers']} worker(s); peak RSS main {m['peak_rss_main_mb']} MB, "
      f"workers {m['peak_rss_worker_mb']} MB; dedup index {m['dedup_index_bytes'] / 1e6:.1f} MB "
      f"= {m['dedup_index_bytes_per_kept_doc']:.0f} bytes per kept document")
assert m["dedup_index_bytes_per_kept_doc"] < 1024

# %% [markdown]
# ## Exercises
#
# Three small experiments on the corpus this stage just wrote. Try each before opening the solution;
# the solutions run — and assert — whenever the notebook runs.
#
# ### Exercise 1 · A new rule: drop documents that are mostly digits
#
# Tables of numbers, stock quotes and timetables teach a language model little. Write
# `digit_ratio(text)` — the share of decimal digits (`\p{Nd}`) among the non-space characters — and
# count how many **kept** documents a rule "drop if `digit_ratio > t`" would remove, for
# t = 0.05, 0.1, 0.2, 0.3 and `1 - min_cjk_ratio`. Predict first: why can the last threshold remove
# nothing at all?

# %% tags=["hide-cell"]
import math

import regex

NON_SPACE, DIGIT = regex.compile(r"\S"), regex.compile(r"\p{Nd}")


def digit_ratio(text):
    n = len(NON_SPACE.findall(text))
    return len(DIGIT.findall(text)) / n if n else 0.0


kept = [d.removesuffix(eos)
        for d in itertools.islice(iter_corpus(stages.output(cfg, "corpus", "train")), 20000)]
ratios = np.array([digit_ratio(t) for t in kept])
bound = 1 - cfg.corpus.min_cjk_ratio
counts = {t: int((ratios > t).sum()) for t in (0.05, 0.1, 0.2, 0.3, bound)}
for t, n in counts.items():
    print(f"drop if digit_ratio > {t:.2f}: {n:5,} of {len(kept):,} kept documents ({n / len(kept):.2%})")
worst = kept[int(ratios.argmax())]
print(f"most digits ({ratios.max():.2f}): {worst[:80]!r}")
# Han characters and digits are disjoint, so digits <= non-space - Han, i.e. digit_ratio <= 1 - cjk_ratio;
# every kept document passed cjk_ratio >= min_cjk_ratio, so none can exceed 1 - min_cjk_ratio
assert all(clean.cjk_ratio(t) >= cfg.corpus.min_cjk_ratio for t in kept[:2000])
assert counts[bound] == 0 and ratios.max() <= bound
assert list(counts.values()) == sorted(counts.values(), reverse=True), "a stricter rule removes more"

# %% [markdown]
# ### Exercise 2 · Doubling the validation split
#
# The split is `hash(document) mod buckets < val_fraction × buckets`. Predict what happens to the
# documents of this corpus if `corpus.val_fraction` is doubled: which documents move, in which
# direction, and roughly what share ends up in val? Check with `split_of` on the documents of both
# splits.

# %% tags=["hide-cell"]
docs = [d.removesuffix(eos) for split in ("train", "val")
        for d in itertools.islice(iter_corpus(stages.output(cfg, "corpus", split)), 20000)]
split_hashes = [exact_hash(d)[1] for d in docs]
f = cfg.corpus.val_fraction
val_now = {k for k, h in enumerate(split_hashes) if split_of(h, f) == "val"}
val_doubled = {k for k, h in enumerate(split_hashes) if split_of(h, 2 * f) == "val"}
print(f"val_fraction {f}: {len(val_now):,} of {len(docs):,} in val; {2 * f}: {len(val_doubled):,} "
      f"({len(val_doubled) / len(docs):.2%}); moved train → val: {len(val_doubled - val_now):,}, "
      f"val → train: {len(val_now - val_doubled)}")
assert val_now <= val_doubled, "a larger val split only takes documents from train, never gives one back"
assert len(val_doubled) > len(val_now)
share = len(val_doubled) / len(docs)
assert abs(share - 2 * f) < 4 * math.sqrt(2 * f * (1 - 2 * f) / len(docs)) + 0.005, "hash buckets are uniform"

# %% [markdown]
# ### Exercise 3 · How many LSH bands for a 99 % catch rate?
#
# With `r` rows per band, a pair at Jaccard `s` becomes a candidate with probability
# `1 - (1 - s^r)^b`. Keep this run's `r` and compute the smallest number of bands `b` that catches a
# pair exactly at the threshold 99 % of the time. What would it cost in MinHash values per document,
# and how much more often would a pair at Jaccard 0.5 (not a duplicate) be compared?

# %% tags=["hide-cell"]
lsh = report["duplicates"]
b, r, t = lsh["bands"], lsh["rows"], lsh["threshold"]
b99 = math.ceil(math.log(1 - 0.99) / math.log(1 - t**r))  # solve 1 - (1 - t^r)^b >= 0.99 for b
print(f"now: b={b}, r={r} ({b * r} values/doc): P(candidate | s={t}) = {candidate_probability(t, b, r):.3f}, "
      f"P(candidate | s=0.5) = {candidate_probability(0.5, b, r):.4f}")
print(f"99 %: b={b99}, r={r} ({b99 * r} values/doc): P(candidate | s={t}) = {candidate_probability(t, b99, r):.3f}, "
      f"P(candidate | s=0.5) = {candidate_probability(0.5, b99, r):.4f}")
assert b * r == cfg.corpus.dedup.num_perm, "the signature is cut into b bands of r values"
assert candidate_probability(t, b99, r) >= 0.99 > candidate_probability(t, b99 - 1, r), "the smallest such b"
assert candidate_probability(0.5, b99, r) > candidate_probability(0.5, b, r), "more bands, more false candidates"
