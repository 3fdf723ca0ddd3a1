"""Stage B4: the three backends on tiny models and a loopback endpoint, the answer cache, constrained
decoding, and bad inputs counted as error classes (never a crash)."""

import json
import socket
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import torch

from microlm.errors import MicroLMError
from microlm.ie.evaluate import evaluate, load_prompts
from microlm.ie.render import render_example
from microlm.model import TransformerLM
from microlm.model.config import ModelConfig
from microlm.model.hf_export import export_hf
from microlm.stages import resolve_ref

from .test_ie_lora import ie_lines

DEC = {"max_new_tokens": 12, "stop": ["<|im_end|>"], "batch_size": 1, "concurrency": 3, "timeout_s": 20.0,
       "retries": 2, "backoff_s": 0.01}


def _data(tmp_path: Path, n: int = 5, extra_lines: tuple[str, ...] = ()) -> Path:
    d = tmp_path / "ie_data"
    d.mkdir(exist_ok=True)
    train = ie_lines(12)
    (d / "06_train.jsonl").write_text("".join(json.dumps(x, ensure_ascii=False) + "\n" for x in train), encoding="utf-8")
    prompts = []
    for x in train[:n]:
        ex = {"id": x["id"], "record_id": x["record_id"], "cate": x["cate"], "source": "test",
              "instruction": x["messages"][1]["content"], "output": x["messages"][2]["content"]}
        prompts.append(json.dumps(render_example(ex, prompt_only=True), ensure_ascii=False))
    (d / "06_eval_prompts.jsonl").write_text("\n".join(prompts + list(extra_lines)) + "\n", encoding="utf-8")
    return d


@pytest.fixture
def tiny_export(tmp_path, chat_tok):
    def make(seed: int, name: str = "base") -> Path:
        torch.manual_seed(seed)
        cfg = ModelConfig(vocab_size=chat_tok.vocab_size, dim=32, n_layers=2, n_heads=4, n_kv_heads=2, hidden_dim=48,
                          max_seq_len=1024)
        return export_hf(TransformerLM(cfg), chat_tok, tmp_path / name)
    return make


def _run(models, tmp_path, dec=DEC, **kw):
    prompts, bad = load_prompts(_data(tmp_path, **kw))
    out = tmp_path / "ie_eval"
    out.mkdir(exist_ok=True)
    rep = evaluate(models, prompts, lambda ref: ref, out, dec, train_answers=[], floors=True, progress=False, seed=0,
                   bootstrap_samples=200)
    rows = [json.loads(x) for x in (out / "results.jsonl").read_text(encoding="utf-8").splitlines()]
    return rep, rows, bad


def test_two_backends_agree_on_one_model_and_the_cache_recomputes_only_a_changed_model(tiny_export, tmp_path):
    folder = tiny_export(0)
    models = [{"name": "ours", "backend": "microlm", "model": str(folder)},
              {"name": "hf", "backend": "transformers", "model": str(folder)}]
    rep, rows, _ = _run(models, tmp_path)
    assert rep["timing"]["ours"]["computed"] == rep["timing"]["hf"]["computed"] == 5
    ours = [r["answer"] for r in rows if r["model"] == "ours"]
    theirs = [r["answer"] for r in rows if r["model"] == "hf"]
    assert ours == theirs and all(r["new_tokens"] >= 1 for r in rows if r["model"] == "ours")
    assert {r["model"] for r in rows} == {"ours", "hf", "floor-empty", "floor-rule"}
    assert rep["models"]["floor-empty"]["parse_rate"] == 1.0 and rep["models"]["floor-empty"]["f1"] == 0.0

    again, rows2, _ = _run(models, tmp_path)  # nothing changed: every answer from the cache
    assert again["timing"]["ours"]["computed"] == 0 and again["timing"]["ours"]["cached"] == 5
    assert [r["answer"] for r in rows2] == [r["answer"] for r in rows]

    tiny_export(1)  # "retrained": new weights in the same folder = a new fingerprint
    third, _, _ = _run(models, tmp_path)
    assert third["timing"]["ours"]["computed"] == 5 and third["timing"]["hf"]["computed"] == 5


@pytest.mark.parametrize("batch", [1, 3])
def test_constrained_decoding_gives_only_schema_json(tiny_export, tmp_path, batch):
    """One grammar per row: batched constrained decoding gives each prompt its own schema."""
    folder = tiny_export(0)
    dec = dict(DEC, max_new_tokens=160, batch_size=batch)
    models = [{"name": "free", "backend": "transformers", "model": str(folder)},
              {"name": "json", "backend": "transformers", "model": str(folder), "constrained": True}]
    rep, rows, _ = _run(models, tmp_path, dec=dec, n=3)
    free = [r["error"] for r in rows if r["model"] == "free"]
    forced = [r for r in rows if r["model"] == "json"]
    assert all(e in ("not_json", "empty", "prose") for e in free)  # a random model does not write JSON by itself
    for r in forced:  # with the grammar: a schema-compliant object, or one cut by max_new_tokens
        assert r["error"] == "ok" or (r["error"] == "truncated" and r["finish_reason"] == "length"), r
        assert r["answer"].lstrip().startswith("{")
        if r["error"] == "ok":
            assert set(json.loads(r["answer"])) == set(r["asked"])


def test_the_grammar_never_lets_a_special_token_into_an_answer(tiny_export):
    """xgrammar's ``from_huggingface`` reads ``<|endoftext|>`` as its literal text, so it fit inside a JSON
    string; ``generate`` then ended (and padded) that row at its EOS id while its matcher went on, and a
    batched constrained run crashed. Our compiler: no special token anywhere, every EOS id ends the answer."""
    import xgrammar as xgr
    from transformers import AutoTokenizer

    from microlm.ie.answers import grammar_compiler
    from microlm.ie.metrics import json_schema_for

    tok = AutoTokenizer.from_pretrained(tiny_export(0))
    eos = [tok.convert_tokens_to_ids("<|im_end|>"), tok.convert_tokens_to_ids("<|endoftext|>")]
    special = set(tok.all_special_ids)
    assert special >= set(eos) and tok.pad_token_id in special
    g = grammar_compiler(tok, len(tok), eos).compile_json_schema(
        json.dumps(json_schema_for(["作者"]), ensure_ascii=False), any_whitespace=False, strict_mode=True)

    def allowed(m) -> set[int]:
        bm = xgr.allocate_token_bitmask(1, len(tok))
        m.fill_next_token_bitmask(bm)
        logits = torch.zeros(1, len(tok))
        xgr.apply_token_bitmask_inplace(logits, bm)
        return set(torch.isfinite(logits[0]).nonzero().flatten().tolist())

    answer = '{"作者": [{"subject": "三体", "object": "刘慈欣"}]}'
    ids = tok.encode(answer, add_special_tokens=False)
    for k in range(len(ids) + 1):  # after every prefix: inside strings, between items, at the end
        m = xgr.GrammarMatcher(g)
        assert all(m.accept_token(t) for t in ids[:k])
        ok = allowed(m)
        assert ok and not (ok & special - set(eos)), (k, sorted(ok & special))
        assert (ok & set(eos)) == (set(eos) if k == len(ids) else set()), k  # EOS only once the object is closed
    for e in eos:
        m = xgr.GrammarMatcher(g)
        assert all(m.accept_token(t) for t in ids) and m.accept_token(e) and m.is_terminated()


class _Stub(BaseHTTPRequestHandler):
    """A loopback OpenAI-compatible endpoint whose behaviour depends on the record in the prompt."""

    seen: dict = {}
    release = threading.Event()

    def log_message(self, *a):
        pass

    def do_POST(self):
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        user = json.loads(body["messages"][1]["content"])
        heads = {"李白": "r0", "杜甫": "r1", "苏轼": "r2", "王维": "r3", "白居易": "r4", "韩愈": "r5"}
        rid = next(r for h, r in heads.items() if user["input"].startswith(h))
        n = _Stub.seen[rid] = _Stub.seen.get(rid, 0) + 1
        gold = {r: [] for r in user["schema"]}
        answer = json.dumps(gold, ensure_ascii=False)
        if rid == "r0" and n == 1:
            return self._send(500, b'{"error": "overloaded"}')
        if rid == "r1":
            return self._send(200, b"{not json")
        if rid == "r2":
            return self._send(400, b'{"error": "bad request"}')
        if rid == "r3":
            answer = "```json\n" + answer + "\n```"
        if rid == "r5":
            _Stub.release.wait(60)  # hangs until the test ends: the client must time out
        self._send(200, json.dumps({"choices": [{"message": {"content": answer}, "finish_reason": "stop"}],
                                    "usage": {"prompt_tokens": 10, "completion_tokens": 5}}).encode())

    def _send(self, code, data):
        self.send_response(code)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)


@pytest.fixture
def stub():
    _Stub.seen, _Stub.release = {}, threading.Event()
    srv = ThreadingHTTPServer(("127.0.0.1", 0), _Stub)
    srv.daemon_threads = True
    t = threading.Thread(target=srv.serve_forever, daemon=True)
    t.start()
    yield f"http://127.0.0.1:{srv.server_address[1]}/v1"
    _Stub.release.set()
    srv.shutdown()
    srv.server_close()


def test_the_openai_backend_retries_counts_errors_and_never_crashes(stub, tmp_path):
    dec = dict(DEC, timeout_s=3.0)
    rep, rows, _ = _run([{"name": "served", "backend": "openai", "model": "m", "base_url": stub}], tmp_path, dec=dec,
                        n=6)
    by = {r["record_id"]: r for r in rows if r["model"] == "served"}
    assert by["r0"]["error"] == "ok" and _Stub.seen["r0"] == 2  # a 500 is retried
    assert by["r1"]["error"] == "endpoint_error" and by["r1"]["detail"] == "malformed response"
    assert _Stub.seen["r1"] == 3  # retried `retries` times
    assert by["r2"]["error"] == "endpoint_error" and _Stub.seen["r2"] == 1  # a 4xx is not retried
    assert by["r3"]["error"] == "fenced" and by["r4"]["error"] == "ok"
    assert by["r5"]["error"] == "endpoint_error" and by["r5"]["detail"] in ("timeout", "TimeoutError")
    m = rep["models"]["served"]
    assert m["errors"]["endpoint_error"] == 3 and m["answers"] == 6 and m["parse_rate"] == pytest.approx(2 / 6)  # r0, r4 (a fence is not JSON)


def test_a_refused_endpoint_and_a_model_that_does_not_load_are_counted(tmp_path, tiny_export):
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "config.json").write_text("{}")
    models = [{"name": "refused", "backend": "openai", "model": "m", "base_url": f"http://127.0.0.1:{port}/v1"},
              {"name": "missing", "backend": "transformers", "model": str(tmp_path / "nowhere")},
              {"name": "broken", "backend": "microlm", "model": str(broken)}]
    rep, rows, bad = _run(models, tmp_path, n=3, extra_lines=(
        "{not a json line", json.dumps({"id": "nogold", "record_id": "nogold", "cate": "人物",
                                        "messages": [{"role": "user", "content": "{}"}]})))
    assert bad == {"unreadable line": 1}
    errs = {n: rep["models"][n]["errors"] for n in ("refused", "missing", "broken")}
    assert errs["refused"] == {"endpoint_error": 3, "no_gold": 1}
    assert errs["missing"] == {"load_error": 3, "no_gold": 1} and errs["broken"] == {"load_error": 3, "no_gold": 1}
    assert rep["models"]["refused"]["records"] == 3 and rep["models"]["refused"]["n_gold"] == 3  # gold still counts
    # a model that did not load is not cached: fixed, it is computed
    folder = tiny_export(0, "nowhere")
    assert folder == tmp_path / "nowhere"
    again, _, _ = _run(models[1:2], tmp_path, n=3)
    assert again["timing"]["missing"]["computed"] == 3 and "load_error" not in again["models"]["missing"]["errors"]


def test_stage_references_resolve(tmp_path):
    up = {"hf": tmp_path / "hf", "ie_lora": tmp_path / "ie_lora", "ie_merged": tmp_path / "ie_merged"}
    assert resolve_ref("hf", up) == str(tmp_path / "hf")
    assert resolve_ref("ie_lora:a", up) == str(tmp_path / "ie_lora" / "a" / "adapter")
    assert resolve_ref("ie_merged:a", up) == str(tmp_path / "ie_merged" / "a")
    assert resolve_ref("Qwen/Qwen2.5-1.5B-Instruct", up) == "Qwen/Qwen2.5-1.5B-Instruct"


def test_answers_are_cached_as_they_come_and_an_interrupted_run_keeps_them(tiny_export, tmp_path, monkeypatch):
    import microlm.infer.generate as gen

    folder = tiny_export(0)
    models = [{"name": "ours", "backend": "microlm", "model": str(folder)}]
    real, calls = gen.generate_ids, []

    def dies_on_the_third_batch(*a, **kw):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return real(*a, **kw)

    monkeypatch.setattr(gen, "generate_ids", dies_on_the_third_batch)
    with pytest.raises(KeyboardInterrupt):
        _run(models, tmp_path)  # batch_size 1: two answers computed before the interrupt
    cached = list((tmp_path / "ie_eval" / ".cache").glob("ours-*.jsonl"))
    assert len(cached) == 1 and len(cached[0].read_text().splitlines()) == 2
    monkeypatch.setattr(gen, "generate_ids", real)
    rep, _, _ = _run(models, tmp_path)
    assert rep["timing"]["ours"]["cached"] == 2 and rep["timing"]["ours"]["computed"] == 3


def test_the_answer_cap_holds_the_longest_gold_answer():
    from microlm.ie.evaluate import answer_cap

    prompts = [{"gold": "x" * 40}, {"gold": "y" * 100}, {"gold": None}]
    count = len  # one token per character
    assert answer_cap(count, prompts, 24) == 126  # 100 × 5/4 + the end token: a 24-token cap would cut every gold
    assert answer_cap(count, prompts, 500) == 500  # a larger configured cap stays
    assert answer_cap(None, prompts, 24) == 24  # an outside endpoint: the configured cap


def test_iepile_prompts_ask_every_chunk_of_the_evaluation_records(tmp_path):
    d = _data(tmp_path, n=3)
    rows = []
    for x in ie_lines(12):
        user = json.loads(x["messages"][1]["content"])
        for c, rels in enumerate([r] for r in user["schema"]):
            rows.append({"id": f"{x['record_id']}-iepile-{c}", "record_id": x["record_id"], "cate": x["cate"],
                         "messages": x["messages"][:1] + [{"role": "user", "content": json.dumps(
                             {**user, "schema": rels}, ensure_ascii=False)}],
                         "gold": json.dumps({r: [] for r in rels}), "record_gold": [["a", rels[0], "b"]]})
    (d / "06_test_iepile.jsonl").write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
    ours, _ = load_prompts(d)
    theirs, _ = load_prompts(d, protocol="iepile")
    assert {p["record_id"] for p in theirs} == {p["record_id"] for p in ours}  # the same 3 records ...
    assert len(theirs) == sum(1 + i % 4 for i in range(3))  # ... every chunk of each
    assert all(p["record_gold"] for p in theirs)
    everything, _ = load_prompts(d, protocol="iepile", all_test=True)
    assert len(everything) == len(rows)
    with pytest.raises(MicroLMError, match="unknown evaluation protocol"):
        load_prompts(d, protocol="nope")


def test_the_zero_shot_prompt_describes_the_answer_format_and_is_its_own_cache_key(tiny_export, tmp_path):
    from microlm.ie.render import ANSWER_FORMAT, prompt_messages

    msgs = [{"role": "system", "content": "你是助手。"}, {"role": "user", "content": "{}"}]
    zs = prompt_messages(msgs, "zero_shot")
    assert zs[0]["content"].endswith(ANSWER_FORMAT["zh"]) and zs[1] == msgs[1] and msgs[0]["content"] == "你是助手。"
    assert prompt_messages(msgs, "ie") is msgs
    folder = tiny_export(0)
    models = [{"name": "a", "backend": "transformers", "model": str(folder)},
              {"name": "b", "backend": "transformers", "model": str(folder), "prompt": "zero_shot"}]
    rep, rows, _ = _run(models, tmp_path, n=2)
    assert rep["timing"]["b"]["computed"] == 2  # not the same prompts as a's: no shared answers


def test_default_comparisons_put_the_fine_tune_first_and_the_floors_second():
    """A is read strictly and B fence-tolerantly, so the direction is the claim: LoRA − zero-shot,
    LoRA − no LoRA, a model − a floor; every pair once."""
    from microlm.ie.evaluate import default_pairs

    names = ["qwen", "qwen-json", "qwen-ie", "qwen-ie-json", "floor-empty", "floor-rule"]
    pairs = default_pairs(names)
    assert len(pairs) == len(set(pairs)) == 15 and len({frozenset(p) for p in pairs}) == 15
    assert {("qwen-ie", "qwen"), ("qwen-ie-json", "qwen-json"), ("qwen-ie", "floor-rule"),
            ("floor-rule", "floor-empty")} <= set(pairs)
    assert not [p for p in pairs if p[0].startswith("floor-") and not p[1].startswith("floor-")]
