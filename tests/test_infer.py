"""Stage A8: the decode loop, generate_text/stream_text, the chat session and loop."""

import io

import pytest
import torch
from torch import nn

from microlm.errors import MicroLMError
from microlm.infer.chat import ChatSession, run_chat
from microlm.infer.config import GenerationConfig
from microlm.infer.generate import fit_prompt, generate_ids, generate_text, process_logits, stream_text
from microlm.model import ModelConfig, TransformerLM, load_model


@pytest.fixture(scope="module")
def tok(chat_tok):
    return chat_tok


def tiny(tok, max_seq_len=160, seed=0):
    torch.manual_seed(seed)
    cfg = ModelConfig(vocab_size=tok.vocab_size, dim=32, n_layers=2, n_heads=4, n_kv_heads=2, hidden_dim=64,
                      max_seq_len=max_seq_len)
    return TransformerLM(cfg).eval()


class ScriptedLM(nn.Module):
    """Emits a fixed id sequence (one-hot logits), to test stopping and streaming exactly."""

    def __init__(self, script, vocab, max_seq_len=256, interrupt_at=None):
        super().__init__()
        self.w = nn.Parameter(torch.zeros(1))
        self.script, self.interrupt_at, self.calls, self.prev, self.start = script, interrupt_at, 0, None, 0
        self.cfg = ModelConfig(vocab_size=vocab, dim=8, n_layers=1, n_heads=2, hidden_dim=8, max_seq_len=max_seq_len)

    def new_cache(self, b, n):
        return None

    def num_parameters(self):
        return 1

    def forward(self, idx, cache=None, pad_mask=None):  # no cache: idx grows by one per step
        self.calls += 1
        if self.calls - 1 == self.interrupt_at:
            raise KeyboardInterrupt
        n = idx.shape[1]
        if self.prev is None or n != self.prev + 1:  # a new generation starts the script again
            self.start = n
        self.prev = n
        step = n - self.start
        logits = torch.full((idx.shape[0], idx.shape[1], self.cfg.vocab_size), -10.0)
        logits[:, -1, self.script[min(step, len(self.script) - 1)]] = 10.0
        return logits, None


def byte_ids(tok, text):
    return [tok._byte_ids[b] for b in text.encode("utf-8")]


# ---------------------------------------------------------------- logits processing


def test_top_k_top_p_and_repetition_penalty_follow_their_definitions():
    probs = torch.tensor([[0.5, 0.3, 0.15, 0.05]])
    logits = probs.log()
    kept = lambda out: (out > float("-inf")).nonzero()[:, 1].tolist()
    g = GenerationConfig(temperature=1.0, top_k=0, top_p=0.8, repetition_penalty=1.0)
    assert kept(process_logits(logits, g)) == [0, 1]  # 0.5 + 0.3 reaches 0.8
    assert kept(process_logits(logits, GenerationConfig(temperature=1.0, top_k=0, top_p=0.81))) == [0, 1, 2]
    assert kept(process_logits(logits, GenerationConfig(temperature=1.0, top_k=3, top_p=1.0))) == [0, 1, 2]
    assert kept(process_logits(logits, GenerationConfig(temperature=1.0, top_k=0, top_p=0.01))) == [0]
    # shuffled vocab order: the filter follows probabilities, not positions
    perm = torch.tensor([2, 0, 3, 1])
    assert sorted(kept(process_logits(logits[:, perm], g))) == sorted(perm.argsort()[:2].tolist())
    # repetition penalty: positive logits divided, negative multiplied, only for seen ids
    raw = torch.tensor([[2.0, -2.0, 2.0, -2.0]])
    seen = torch.tensor([[True, True, False, False]])
    out = process_logits(raw, GenerationConfig(temperature=0, repetition_penalty=2.0), seen)
    assert out.tolist() == [[1.0, -4.0, 2.0, -2.0]]
    # temperature scales before sampling
    assert torch.allclose(process_logits(raw, GenerationConfig(temperature=0.5, top_k=0, top_p=1.0,
                                                               repetition_penalty=1.0)), raw * 2)


@pytest.mark.parametrize("field,value,msg", [
    ("top_p", 0.0, "top_p must be in"), ("top_p", 1.5, "top_p must be in"), ("temperature", -0.1, "temperature"),
    ("max_new_tokens", 0, "max_new_tokens"), ("repetition_penalty", 0.0, "repetition_penalty"),
    ("context", "wrap", "context must be"), ("top_k", -1, "top_k")])
def test_bad_settings_are_one_line_errors(tok, field, value, msg):
    with pytest.raises(MicroLMError, match=msg):
        generate_text(tiny(tok), tok, "你好", **{field: value})


def test_unknown_setting_is_an_error(tok):
    with pytest.raises(MicroLMError, match="unknown generation setting"):
        generate_text(tiny(tok), tok, "你好", temprature=0.5)


# ---------------------------------------------------------------- the decode loop


def test_left_padded_batch_equals_each_prompt_alone_with_and_without_cache(tok):
    m = tiny(tok)
    prompts = [tok.encode(t) for t in ("北京是中华人民共和国的首都", "长江", "今天天气很好，我们")]
    assert len({len(p) for p in prompts}) == 3
    for use_cache in (True, False):
        batched = generate_ids(m, prompts, max_new_tokens=24, temperature=0, repetition_penalty=1.3,
                               use_cache=use_cache)
        alone = [generate_ids(m, [p], max_new_tokens=24, temperature=0, repetition_penalty=1.3,
                              use_cache=use_cache)[0] for p in prompts]
        assert batched == alone
    # a short prompt that holds the pad id itself (EOS): its repetition penalty still covers that id
    with_pad = [prompts[0], [tok.eos_id, *prompts[1]]]
    batched = generate_ids(m, with_pad, max_new_tokens=12, temperature=0, repetition_penalty=50.0, pad_id=tok.eos_id)
    alone = [generate_ids(m, [q], max_new_tokens=12, temperature=0, repetition_penalty=50.0)[0] for q in with_pad]
    assert batched == alone
    # the padded row's logits match the row alone
    x = torch.full((1, len(prompts[0])), tok.eos_id)
    x[0, -len(prompts[1]):] = torch.tensor(prompts[1])
    mask = torch.zeros_like(x, dtype=torch.bool)
    mask[0, -len(prompts[1]):] = True
    with torch.no_grad():
        padded = m(x, pad_mask=mask)[0][0, -1]
        alone = m(torch.tensor([prompts[1]]))[0][0, -1]
    assert (padded - alone).abs().max().item() < 1e-5


def test_seeded_sampling_is_reproducible_and_leaves_the_global_rng_alone(tok):
    m = tiny(tok)
    p = [tok.encode("今天天气很好")]
    torch.manual_seed(5)
    before = torch.rand(1)
    torch.manual_seed(5)
    a = generate_ids(m, p, max_new_tokens=30, temperature=1.0, seed=11)
    assert torch.rand(1).item() == before.item()  # generation did not draw from the global RNG
    assert a == generate_ids(m, p, max_new_tokens=30, temperature=1.0, seed=11)
    assert a != generate_ids(m, p, max_new_tokens=30, temperature=1.0, seed=12)
    # top_k = 1 sampling is greedy
    assert generate_ids(m, p, max_new_tokens=30, temperature=1.0, top_k=1, seed=3) == \
        generate_ids(m, p, max_new_tokens=30, temperature=0)


def test_stop_ids_end_a_row_and_are_not_returned(tok):
    end = tok.special_ids["<|im_end|>"]
    script = byte_ids(tok, "好的") + [end] + byte_ids(tok, "多余")
    g = generate_text(ScriptedLM(script, tok.vocab_size), tok, "你好", max_new_tokens=20)
    assert (g.text, g.finish_reason) == ("好的", "stop") and end not in g.ids
    g = generate_text(ScriptedLM(script, tok.vocab_size), tok, "你好", max_new_tokens=20, ignore_eos=True)
    assert g.finish_reason == "length" and len(g.ids) == 20
    g = generate_text(ScriptedLM(script, tok.vocab_size), tok, "你好", max_new_tokens=4)
    assert g.finish_reason == "length" and g.text == "好\ufffd"  # cut inside a character: shown as U+FFFD


def test_stream_never_splits_a_character_nor_shows_a_stop_string(tok):
    script = byte_ids(tok, "答案是42。END后面还有") + [tok.special_ids["<|im_end|>"]]
    deltas = list(stream_text(ScriptedLM(script, tok.vocab_size), tok, "问题", stop=["END"], max_new_tokens=60))
    assert "".join(deltas) == "答案是42。"
    assert all(d and "\ufffd" not in d and "E" not in d for d in deltas)
    assert len(deltas) == 6  # one delta per character, although each came in 3 byte tokens
    box = {}
    deltas = list(stream_text(ScriptedLM(script, tok.vocab_size), tok, "问题", stop=["ENDING"], result=box))
    assert "".join(deltas) == "答案是42。END后面还有" and box["generation"].finish_reason == "stop"
    # batched generate_text applies stop strings too
    g = generate_text(ScriptedLM(script, tok.vocab_size), tok, ["问题"], stop=["42"])
    assert g[0].text == "答案是" and g[0].finish_reason == "stop"


def test_stream_equals_generate_text(tok):
    m = tiny(tok)
    for prompt in ("北京是", [{"role": "user", "content": "你好"}]):
        s = "".join(stream_text(m, tok, prompt, max_new_tokens=40, temperature=0.8, seed=2))
        assert s == generate_text(m, tok, prompt, max_new_tokens=40, temperature=0.8, seed=2).text


def test_context_window_handling(tok):
    m = tiny(tok, max_seq_len=64)
    long = "北京是中华人民共和国的首都" * 20
    with pytest.raises(MicroLMError, match="exceeds the model's context of 64"):
        generate_text(m, tok, long, max_new_tokens=16, context="error")
    g = generate_text(m, tok, long, max_new_tokens=16, context="truncate", temperature=0)
    ids = tok.encode(long)
    assert g.prompt_tokens == 48 and g.prompt_truncated == len(ids) - 48
    kept = fit_prompt(ids, 16, 64, "truncate")[0]
    assert kept == ids[-48:] and g.ids == generate_ids(m, [kept], max_new_tokens=16, temperature=0)[0]
    with pytest.raises(MicroLMError, match="empty prompt"):
        generate_text(m, tok, "")
    with pytest.raises(MicroLMError, match="leaves no room"):
        generate_text(m, tok, "你好", max_new_tokens=64)
    with pytest.raises(MicroLMError, match="no prompts"):
        generate_text(m, tok, [])
    with pytest.raises(MicroLMError, match="empty prompt"):
        generate_ids(m, [[5, 6], []], max_new_tokens=4)


def test_special_token_text_in_a_prompt_stays_text(tok):
    m = tiny(tok)
    g = generate_text(m, tok, "你好<|im_end|>", max_new_tokens=4, temperature=0)
    assert g.prompt_tokens == len(tok.encode_ordinary("你好<|im_end|>")) and tok.special_ids["<|im_end|>"] not in \
        tok.encode_ordinary("你好<|im_end|>")
    assert len(tok.encode("你好<|im_end|>")) < g.prompt_tokens  # trusted encode would have made it the control id


# ---------------------------------------------------------------- chat


def test_chat_session_keeps_history_and_trims_the_oldest_turns(tok):
    m = tiny(tok, max_seq_len=96)
    s = ChatSession(m, tok, GenerationConfig(max_new_tokens=12, temperature=0), system="你是助手")
    for q in ("北京是哪个国家的首都？", "长江有多长？", "唐诗有哪些著名诗人？", "今天天气怎么样？"):
        answer = "".join(s.reply(q))
        assert s.history[-1] == {"role": "assistant", "content": answer}
    assert len(s.history) == 8 and s.trimmed >= 1  # older turns no longer fit in 96 - 12 tokens
    msgs = s.messages("再说一遍")
    assert msgs[0]["role"] == "system" and len(tok.encode_chat(msgs, add_generation_prompt=True)) <= 84
    with pytest.raises(MicroLMError, match="message too long"):
        s.messages("北京" * 200)
    with pytest.raises(MicroLMError, match="empty message"):
        list(s.reply("  "))


def test_chat_loop_commands_interrupt_and_errors(tok):
    end = tok.special_ids["<|im_end|>"]
    m = ScriptedLM(byte_ids(tok, "好的") + [end], tok.vocab_size)
    s = ChatSession(m, tok, GenerationConfig(max_new_tokens=10))
    script = "你好\n/system 你是助手\n/bogus\n" + "北京" * 200 + "\n再见\n/reset\n/exit\n不会读到\n"
    out, err = io.StringIO(), io.StringIO()
    assert run_chat(s, io.StringIO(script), out, err, interactive=False) == 1  # a turn failed: a script can tell
    assert out.getvalue() == "好的\n好的\n"
    assert "unknown command /bogus" in err.getvalue() and "message too long" in err.getvalue()
    assert s.history == [] and s.system == "你是助手"  # /reset after the last answer
    # Ctrl-C while streaming: back to the prompt, the interrupted question is not in the history
    m = ScriptedLM(byte_ids(tok, "好的") + [end], tok.vocab_size, interrupt_at=3)
    s = ChatSession(m, tok, GenerationConfig(max_new_tokens=10))
    s.history = [{"role": "user", "content": "早"}, {"role": "assistant", "content": "早上好"}]
    out = io.StringIO()
    run_chat(s, io.StringIO("你好\n再问一次\n"), out, io.StringIO(), interactive=False)
    assert "[interrupted" in out.getvalue()
    assert [h["content"] for h in s.history] == ["早", "早上好", "再问一次", "好的"]


def test_load_model_errors(tok, tmp_path):
    with pytest.raises(MicroLMError, match="model path not found"):
        load_model(tmp_path / "nope")
    with pytest.raises(MicroLMError, match="not a model folder"):
        load_model(tmp_path)
    with pytest.raises(MicroLMError, match="adapter folder not found"):
        load_model(tmp_path, adapter=tmp_path / "no-adapter")


def test_ids_beyond_the_tokenizer_are_never_generated(tok):
    m = ScriptedLM([tok.vocab_size + 5], tok.vocab_size + 28)  # the model "prefers" an id with no token
    g = generate_text(m, tok, "你好", max_new_tokens=10, temperature=0, ignore_eos=True)
    assert len(g.ids) == 10 and max(g.ids) < tok.vocab_size


def test_repetition_metrics():
    from microlm.infer.metrics import distinct_n, repeated_ngram_rate, repetition_report

    assert repeated_ngram_rate("的国家的国家的国家", 3) == pytest.approx(4 / 7)  # 7 trigrams, 3 distinct
    assert repeated_ngram_rate("北京是中国的首都", 4) == 0.0 and repeated_ngram_rate("短", 4) == 0.0
    assert distinct_n(["ab ab", "abc"], 2) == pytest.approx(3 / 5)  # ab ba ab | ab bc
    rep = repetition_report(["你好你好你好你好", "今天天气很好"])
    assert rep["answers"] == 2 and rep["repeated_4gram_rate"] == pytest.approx((3 / 5 + 0) / 2)
