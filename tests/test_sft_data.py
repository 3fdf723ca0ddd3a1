"""SFT data: ChatML ids, assistant-only loss mask, truncation at turn boundaries, bad records, batches."""

import json

import pytest
import torch

from microlm.data.sft import (
    IGNORE,
    SFTBatches,
    SFTDrop,
    encode_conversation,
    encode_records,
    parse_conversation,
    show_mask,
)


@pytest.fixture(scope="module")
def tok(chat_tok):
    return chat_tok


CONV = [{"role": "system", "content": "你是一个有用的助手。"},
        {"role": "user", "content": "北京是哪个国家的首都？"},
        {"role": "assistant", "content": "北京是中国的首都。"},
        {"role": "user", "content": "长江有多长？"},
        {"role": "assistant", "content": "长江全长约六千三百公里。"}]


def trained_spans(tok, ids, mask):
    spans, cur = [], []
    for i, m in zip(ids, mask, strict=True):
        if m:
            cur.append(i)
        elif cur:
            spans.append(tok.decode(cur))
            cur = []
    if cur:
        spans.append(tok.decode(cur))
    return spans


def test_loss_mask_covers_exactly_assistant_answers_and_their_im_end(tok):
    ids, mask, truncated = encode_conversation(tok, CONV, 512)
    assert not truncated
    assert ids == tok.encode_chat(CONV)  # the same ids as the chat template (and transformers')
    spans = trained_spans(tok, ids, mask)
    assert spans == ["北京是中国的首都。<|im_end|>", "长江全长约六千三百公里。<|im_end|>"]
    assert sum(mask) == sum(len(tok.encode(c["content"])) + 1 for c in CONV if c["role"] == "assistant")
    assert show_mask(tok, type("E", (), {"ids": ids, "mask": mask})()).count("[") == 2


def test_truncation_keeps_whole_turns_and_drops_what_cannot_fit(tok):
    full, _, _ = encode_conversation(tok, CONV, 512)
    first_answer_end = len(encode_conversation(tok, CONV[:3], 512)[0])
    ids, mask, truncated = encode_conversation(tok, CONV, first_answer_end + 3)
    assert truncated and len(ids) == first_answer_end
    assert trained_spans(tok, ids, mask) == ["北京是中国的首都。<|im_end|>"]
    with pytest.raises(SFTDrop) as e:
        encode_conversation(tok, CONV, 20)
    assert e.value.reason == "turn_longer_than_context"


@pytest.mark.parametrize("record, reason", [
    ({"conversations": [{"role": "user", "content": "hi"}]}, "no_assistant_turn"),
    ({"conversations": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "  "}]}, "empty_content"),
    ({"conversations": [{"role": "bot", "content": "hi"}, {"role": "assistant", "content": "x"}]}, "unknown_role"),
    ({"conversations": []}, "missing_conversations"),
    ({"text": "pretraining record"}, "missing_conversations"),
    ({"conversations": [{"role": "user"}]}, "malformed_message"),
    ("{not json", "malformed_json"),
])
def test_bad_records_have_reasons(record, reason):
    with pytest.raises(SFTDrop) as e:
        parse_conversation(record)
    assert e.value.reason == reason


def test_encode_records_counts_everything(tok):
    good = {"conversations": CONV[1:3]}
    lines = [json.dumps(good, ensure_ascii=False), "{broken", json.dumps({"conversations": [CONV[1]]}),
             json.dumps({"conversations": CONV}, ensure_ascii=False)]
    exs, rep = encode_records(tok, lines, 48)
    d = rep.to_dict()
    assert d["records"] == 4 and d["kept"] == len(exs)
    assert d["kept"] + sum(d["drops"].values()) == 4
    assert d["drops"]["malformed_json"] == 1 and d["drops"]["no_assistant_turn"] == 1
    assert d["trained_tokens"] == sum(sum(e.mask) for e in exs)


def test_padded_batches_train_only_on_assistant_targets(tok):
    exs, _ = encode_records(tok, [{"conversations": CONV}, {"conversations": CONV[1:3]}], 512)
    b = SFTBatches(exs, 4, pad_id=tok.eos_id, seed=3)
    x, y = b.get(0, 0, 1, 0, 1)
    assert x.shape == y.shape and x.shape[0] == 4
    for r, row in enumerate(b.rows(0)):
        e = exs[int(row)]
        n = len(e.ids) - 1
        assert x[r, :n].tolist() == e.ids[:-1]
        expected = [t if m else IGNORE for t, m in zip(e.ids[1:], e.mask[1:], strict=True)]
        assert y[r, :n].tolist() == expected
        assert bool((y[r, n:] == IGNORE).all()) and bool((x[r, n:] == tok.eos_id).all())
    parts = torch.cat([b.get(0, m, 2, r, 2)[0][:, :5] for r in range(2) for m in range(2)])
    assert sorted(map(tuple, parts.tolist())) == sorted(map(tuple, x[:, :5].tolist()))
    assert torch.equal(b.get(0, 0, 1, 0, 1)[1], y)  # a pure function of (seed, step)
