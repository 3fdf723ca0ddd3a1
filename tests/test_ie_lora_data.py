"""Stage B3's data: which tokens train (against the tokenizer's own chat template), length-grouped
batches that are a pure function of the step, and the global token-sum loss split over micro-batches."""

import gzip
import shutil

import pytest
import torch

from microlm.errors import MicroLMError
from microlm.ie.lora_data import (
    IGNORE,
    ChatEncoder,
    EncodedChat,
    LengthGroupedBatches,
    SummedTokenLoss,
    encode_chats,
    show_labels,
)
from microlm.ie.render import to_messages

from .conftest import real_data_available

EXAMPLE = {"cate": "人物", "instruction": '{"instruction": "抽取", "schema": ["出生地点"], "input": "李白生于碎叶城。"}',
           "output": '{"出生地点": [{"subject": "李白", "object": "碎叶城"}]}'}


def _tokenizers(tmp_path, chat_tok):
    """The real Qwen2.5 tokenizer (with the data bundle) and the MicroLM export's — both code paths."""
    from transformers import AutoTokenizer

    from microlm.tokenizer.hf import write_hf_tokenizer

    out = {}
    write_hf_tokenizer(chat_tok, tmp_path / "microlm")
    out["microlm"] = AutoTokenizer.from_pretrained(tmp_path / "microlm")
    if real_data_available():
        from microlm.stages import load_config
        from microlm.stages.tokenizer import qwen_tokenizer

        src = qwen_tokenizer(load_config("smoke"))
        (tmp_path / "qwen").mkdir()
        with gzip.open(src, "rb") as f, open(tmp_path / "qwen" / "tokenizer.json", "wb") as g:
            shutil.copyfileobj(f, g)
        shutil.copy(src.parent / "tokenizer_config.json", tmp_path / "qwen")
        out["qwen2.5"] = AutoTokenizer.from_pretrained(tmp_path / "qwen")
    return out


def test_the_answer_and_its_end_token_train_and_nothing_else(tmp_path, chat_tok):
    toks = _tokenizers(tmp_path, chat_tok)
    assert ("qwen2.5" in toks) == real_data_available()
    msgs = to_messages(EXAMPLE)
    for name, tok in toks.items():
        enc = ChatEncoder(tok)
        ex = enc.encode(msgs)
        # the ids are the template's own rendering of the whole conversation
        full = tok.apply_chat_template(msgs, tokenize=False)
        assert tok.decode(ex.ids, skip_special_tokens=False) == full, name
        trained = [t for t, lab in zip(ex.ids, ex.labels, strict=True) if lab != IGNORE]
        assert [lab for lab in ex.labels if lab != IGNORE] == trained
        # exactly the answer + <|im_end|>: one contiguous run at the end of the assistant turn
        assert tok.decode(trained, skip_special_tokens=False) == EXAMPLE["output"] + "<|im_end|>", name
        idx = [i for i, lab in enumerate(ex.labels) if lab != IGNORE]
        assert idx == list(range(idx[0], idx[-1] + 1))
        prompt = tok.apply_chat_template(msgs[:2], add_generation_prompt=True, tokenize=False)
        assert tok.decode(ex.ids[:idx[0]], skip_special_tokens=False) == prompt  # system+user+header: -100
        assert tok.decode(ex.ids[idx[-1] + 1:], skip_special_tokens=False) == full[len(prompt) + len(
            EXAMPLE["output"]) + len("<|im_end|>"):]  # what follows <|im_end|> (the newline) is not trained
        if name == "qwen2.5":
            assert ex.ids[idx[-1] + 1:] == tok.encode("\n")
        assert enc.prompt_ids(msgs) == ex.ids[:idx[0]]
        assert show_labels(tok, ex).endswith("[" + EXAMPLE["output"] + "<|im_end|>]\n")


def test_templates_that_cannot_be_trained_are_refused(tmp_path, chat_tok):
    tok = _tokenizers(tmp_path, chat_tok)["microlm"]
    enc = ChatEncoder(tok)
    with pytest.raises(MicroLMError, match="must end with the assistant"):
        enc.encode(to_messages(EXAMPLE, with_answer=False))
    tok.chat_template = "{% for m in messages %}{{ m['content'] }}{% endfor %}"  # no end token, no header
    with pytest.raises(MicroLMError, match="does not close the answer"):
        ChatEncoder(tok).encode(to_messages(EXAMPLE))
    tok.chat_template = None
    with pytest.raises(MicroLMError, match="no chat template"):
        ChatEncoder(tok)


def test_over_cutoff_examples_are_dropped_and_counted(tmp_path, chat_tok):
    tok = _tokenizers(tmp_path, chat_tok)["microlm"]
    enc = ChatEncoder(tok)
    short = {"messages": to_messages(EXAMPLE)}
    long = {"messages": to_messages({**EXAMPLE, "instruction": EXAMPLE["instruction"] * 20})}
    n = len(enc.encode(short["messages"]).ids)
    exs, counts = encode_chats(enc, [short, long, short], cutoff=n)
    assert len(exs) == 2 and counts["dropped_over_cutoff"] == 1 and counts["in"] == 3
    assert counts["trained_tokens"] == 2 * exs[0].trained and counts["tokens"] == 2 * n


def _synthetic(n=97, seed=0):
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        length = int(torch.randint(5, 60, (1,), generator=g))
        ids = torch.randint(3, 50, (length,), generator=g).tolist()
        cut = int(torch.randint(1, length - 1, (1,), generator=g))
        out.append(EncodedChat(ids, [IGNORE] * cut + ids[cut:]))
    return out


def test_length_grouped_batches_are_a_pure_function_of_the_step_and_pad_less():
    exs = _synthetic()
    a, b = LengthGroupedBatches(exs, 8, 0, seed=3, group=4), LengthGroupedBatches(exs, 8, 0, seed=3, group=4)
    steps = range(a.steps_per_epoch * 2 + 3)
    assert all((a.rows(s) == b.rows(s)).all() for s in reversed(steps))  # any order, any instance
    epoch0 = sorted(int(r) for s in range(a.steps_per_epoch) for r in a.rows(s))
    assert len(epoch0) == len(set(epoch0)) == a.steps_per_epoch * 8  # an epoch: each example at most once
    spe = a.steps_per_epoch  # the next epoch is another shuffle
    assert [a.rows(s).tolist() for s in range(spe)] != [a.rows(s).tolist() for s in range(spe, 2 * spe)]

    def padding(src):
        pad = 0
        for s in range(src.steps_per_epoch):
            x, y, _ = src.get(s, 0, 1, 0, 1)
            pad += x.numel() - sum(len(exs[int(r)].ids) for r in src.rows(s))
        return pad

    random_order = LengthGroupedBatches(exs, 8, 0, seed=3, grouped=False)
    assert padding(a) < 0.5 * padding(random_order)
    x, y, scale = a.get(0, 0, 1, 0, 1)
    for i, r in enumerate(a.rows(0)):  # right padding: the row, then pads that never train
        e = exs[int(r)]
        assert x[i, :len(e.ids)].tolist() == e.ids and (x[i, len(e.ids):] == 0).all()
        assert y[i, :len(e.ids)].tolist() == e.labels and (y[i, len(e.ids):] == IGNORE).all()
    assert float(scale) == pytest.approx(1 / a.trained_tokens(a.rows(0)))


def test_micro_batches_and_ranks_partition_the_global_batch():
    exs = _synthetic()
    src = LengthGroupedBatches(exs, 8, 0, seed=1, group=4)
    for world, n_micro in ((1, 1), (2, 1), (1, 4), (2, 2)):
        seen = []
        for rank in range(world):
            for m in range(n_micro):
                x, y, scale = src.get(5, m, n_micro, rank, world)
                seen += [tuple(row[row != IGNORE].tolist()) for row in y]
                assert float(scale) == pytest.approx(world * n_micro / src.trained_tokens(src.rows(5)))
        want = [tuple(lab for lab in exs[int(r)].labels if lab != IGNORE) for r in src.rows(5)]
        assert sorted(seen) == sorted(want), (world, n_micro)
    with pytest.raises(MicroLMError, match="not a multiple"):
        src.get(0, 0, 3, 0, 1)


class _Tiny(torch.nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.emb = torch.nn.Embedding(50, 16)
        self.out = torch.nn.Linear(16, 50)

    def forward(self, ids):
        return self.out(torch.cumsum(self.emb(ids), 1)), None  # causal: position t sees ids[:t+1]


def test_split_losses_add_up_to_the_global_token_mean():
    """Σ over micro-batches of the scaled loss ÷ n_micro (what the Trainer accumulates) equals the
    global batch's summed token loss ÷ its trained tokens, whatever the split."""
    exs = _synthetic()
    src = LengthGroupedBatches(exs, 8, 0, seed=2, group=4)
    loss_fn = SummedTokenLoss(_Tiny()).requires_grad_(False)
    x, y, _ = src.collate(src.rows(0), 1.0)
    want = loss_fn.summed(x, y) / src.trained_tokens(src.rows(0))
    ref = torch.nn.functional.cross_entropy(loss_fn.logits(x)[:, :-1].reshape(-1, 50), y[:, 1:].reshape(-1),
                                            ignore_index=IGNORE)  # the usual mean over trained tokens
    assert float(want) == pytest.approx(float(ref), rel=1e-6)
    for world, n_micro in ((1, 4), (2, 2), (4, 1)):
        total = sum(float(loss_fn(*src.get(0, m, n_micro, r, world))[1]) / n_micro
                    for r in range(world) for m in range(n_micro)) / world  # DDP averages over ranks
        assert total == pytest.approx(float(want), rel=1e-5), (world, n_micro)
