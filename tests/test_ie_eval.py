"""Stage B4: the three backends on tiny models and a loopback endpoint, the answer cache (its keys, its
damaged lines, --force), constrained decoding, bad answers counted as error classes (never a crash),
and a model that cannot be loaded failing the run in one line (or "not run" when optional)."""

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


def _one_line(e: pytest.ExceptionInfo, *needles: str) -> str:
    msg = str(e.value)
    assert "\n" not in msg, msg
    for n in needles:
        assert n in msg, (n, msg)
    return msg


def test_a_refused_endpoint_or_a_model_that_does_not_load_fails_the_run_unless_optional(tmp_path, tiny_export):
    """Never a row of zeros: a row whose model does not load, or whose every answer failed at its
    endpoint, stops the run with one line naming it; ``optional: true`` makes it "not run" instead."""
    from microlm.ie.evaluate import write_summary

    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "config.json").write_text("{}")
    url = f"http://127.0.0.1:{port}/v1"
    models = [{"name": "refused", "backend": "openai", "model": "m", "base_url": url},
              {"name": "missing", "backend": "transformers", "model": str(tmp_path / "nowhere")},
              {"name": "broken", "backend": "microlm", "model": str(broken)}]
    extra = ("{not a json line", json.dumps({"id": "nogold", "record_id": "nogold", "cate": "人物",
                                             "messages": [{"role": "user", "content": "{}"}]}))
    for m, needle in zip(models, (url, str(tmp_path / "nowhere"), str(broken)), strict=True):
        with pytest.raises(MicroLMError) as e:
            _run([m], tmp_path, n=3, extra_lines=extra)
        _one_line(e, f"'{m['name']}'", needle)
        assert not (tmp_path / "ie_eval" / "results.jsonl").exists()
    rep, rows, bad = _run([dict(m, optional=True) for m in models], tmp_path, n=3, extra_lines=extra)
    assert bad == {"unreadable line": 1}
    assert rep["order"] == ["floor-empty", "floor-rule"] and set(rep["not_run"]) == {"refused", "missing", "broken"}
    assert rep["listed"] == ["refused", "missing", "broken", "floor-empty", "floor-rule"]
    assert "every answer failed" in rep["not_run"]["refused"]["reason"]
    assert {r["model"] for r in rows} == {"floor-empty", "floor-rule"} and set(rep["models"]) == set(rep["order"])
    assert [(c["a"], c["b"]) for c in rep["comparisons"]] == [("floor-rule", "floor-empty")]
    write_summary(rep, tmp_path / "ie_eval")
    md = (tmp_path / "ie_eval" / "summary.md").read_text(encoding="utf-8")
    assert "| refused | openai | not run | not run |" in md and "| broken | microlm | not run |" in md
    assert "| missing | transformers | 0.000" not in md
    # a model that did not load is not cached: fixed, it is computed
    folder = tiny_export(0, "nowhere")
    assert folder == tmp_path / "nowhere"
    again, _, _ = _run(models[1:2], tmp_path, n=3)
    assert again["timing"]["missing"]["computed"] == 3 and "load_error" not in again["models"]["missing"]["errors"]
    assert again["not_run"] == {}


def _adapter(model_folder: Path, dst: Path) -> Path:
    """A from-scratch LoRA adapter of ``model_folder`` (PEFT's file layout)."""
    from microlm.model.hf_export import import_hf
    from microlm.model.lora import LoRAConfig, apply_lora, save_adapter

    model, _ = import_hf(model_folder)
    lcfg = LoRAConfig(r=2, targets=["q", "v"])
    apply_lora(model, lcfg)
    save_adapter(model, lcfg, dst)
    return dst


def _damaged(tmp_path: Path, folder: Path, case: str) -> tuple[str | None, str]:
    """(adapter reference, the path an error must name) for one way a row cannot be loaded."""
    if case == "no such ie_lora run":
        return "ie_lora:nosuch", str(tmp_path / "ie_lora" / "nosuch" / "adapter")
    if case == "missing model folder":
        return None, str(tmp_path / "nowhere")
    ad = _adapter(folder, tmp_path / f"adapter-{case.replace(' ', '-')}")
    if case == "adapter_config.json [1]":
        (ad / "adapter_config.json").write_text("[1]", encoding="utf-8")
        return str(ad), str(ad / "adapter_config.json")
    w = ad / "adapter_model.safetensors"
    w.write_bytes(w.read_bytes()[: w.stat().st_size // 2])
    return str(ad), str(w)


LOAD_FAILURES = [("no such ie_lora run", "microlm"), ("no such ie_lora run", "transformers"),
                 ("missing model folder", "microlm"), ("missing model folder", "transformers"),
                 ("adapter_config.json [1]", "microlm"), ("adapter_config.json [1]", "transformers"),
                 ("truncated adapter", "microlm"), ("truncated adapter", "transformers")]


@pytest.mark.parametrize("case,backend", LOAD_FAILURES, ids=[f"{c}-{b}" for c, b in LOAD_FAILURES])
def test_a_row_that_cannot_be_loaded_is_one_line_naming_row_and_file_or_not_run_when_optional(
        case, backend, tiny_export, tmp_path):
    folder = tiny_export(0)
    adapter, path = _damaged(tmp_path, folder, case)
    row = {"name": "bad-row", "backend": backend, "model": path if case == "missing model folder" else str(folder),
           **({"adapter": adapter} if adapter else {})}
    up = {"ie_lora": tmp_path / "ie_lora"}
    prompts, _ = load_prompts(_data(tmp_path, n=2))
    out = tmp_path / "ie_eval"

    def run(models):
        return evaluate(models, prompts, lambda ref: resolve_ref(ref, up), out, DEC, train_answers=[], progress=False,
                        bootstrap_samples=100)

    with pytest.raises(MicroLMError) as e:
        run([row])
    _one_line(e, "'bad-row'", path)
    assert not (out / "results.jsonl").exists()
    rep = run([dict(row, optional=True)])
    assert list(rep["not_run"]) == ["bad-row"] and path in rep["not_run"]["bad-row"]["reason"]
    assert "bad-row" not in rep["models"] and "bad-row" not in rep["timing"]


def _cache_file(tmp_path: Path, name: str) -> Path:
    (f,) = (tmp_path / "ie_eval" / ".cache").glob(f"{name}-*.jsonl")
    return f


def test_a_damaged_or_edited_cache_line_is_dropped_counted_and_recomputed(tiny_export, tmp_path):
    folder = tiny_export(0)
    models = [{"name": "ours", "backend": "microlm", "model": str(folder)}]
    rep, rows, _ = _run(models, tmp_path, n=4)
    assert rep["timing"]["ours"]["computed"] == 4 and rep["cache"] == {"hits": 0, "misses": 4, "dropped": 0}
    path = _cache_file(tmp_path, "ours")
    lines = path.read_bytes().splitlines()
    assert len(lines) == 4 and all("digest" in json.loads(x) for x in lines)
    edited = json.loads(lines[0])
    edited["text"] = '{"作者": [{"subject": "a", "object": "b"}]}'  # a "better" answer typed in by hand
    lines[0] = json.dumps(edited, ensure_ascii=False).encode()
    lines[2] = b"[1, 2]"
    lines[3] = lines[3].replace(b'"text": "', b'"text": "\xff\xfe', 1)  # not UTF-8
    assert b"\xff" in lines[3]
    lines.append(json.dumps({"key": json.loads(lines[1])["key"], "foo": 1}).encode())  # would replace a real answer
    path.write_bytes(b"\n".join(lines) + b"\n")

    again, rows2, _ = _run(models, tmp_path, n=4)
    t = again["timing"]["ours"]
    assert (t["dropped"], t["computed"], t["cached"]) == (4, 3, 1)
    assert again["cache"] == {"hits": 1, "misses": 3, "dropped": 4}
    assert [r["answer"] for r in rows2] == [r["answer"] for r in rows]  # the edited answer was never scored
    assert len(path.read_bytes().splitlines()) == 4  # rewritten without the dropped lines
    third, _, _ = _run(models, tmp_path, n=4)
    assert third["cache"] == {"hits": 4, "misses": 0, "dropped": 0}


def test_force_dtype_and_batch_size_miss_the_cache_and_a_moved_model_does_not(tiny_export, tmp_path):
    import shutil

    folder = tiny_export(0)
    models = [{"name": "ours", "backend": "microlm", "model": str(folder)}]
    prompts, _ = load_prompts(_data(tmp_path, n=3))
    out = tmp_path / "ie_eval"
    out.mkdir()

    def run(dec=DEC, force=False, ms=models):
        rep = evaluate(ms, prompts, lambda ref: ref, out, dec, train_answers=[], progress=False,
                       bootstrap_samples=100, force=force)
        return rep["cache"]

    assert run() == {"hits": 0, "misses": 3, "dropped": 0}
    assert run() == {"hits": 3, "misses": 0, "dropped": 0}
    assert run(force=True) == {"hits": 0, "misses": 3, "dropped": 0}  # --force: every answer computed again
    assert run(dict(DEC, batch_size=2))["misses"] == 3
    assert run(dict(DEC, dtype="bfloat16"))["misses"] == 3
    assert run(dict(DEC, dtype="float32"))["misses"] == 0  # float32 is what no dtype meant
    moved = shutil.copytree(folder, tmp_path / "elsewhere" / "base")  # the same files at another path
    assert run(ms=[dict(models[0], model=str(moved))]) == {"hits": 3, "misses": 0, "dropped": 0}


@pytest.fixture(scope="module")
def ie_data_cfg(tmp_path_factory):
    """A smoke config whose ie_data stage is built (once for the module)."""
    from microlm import stages

    runs = tmp_path_factory.mktemp("ie_eval_stage") / "runs"

    def make(**overrides):
        return stages.load_config("smoke", {"run_dir": str(runs), "corpus.workers": 0, "ie_eval.limit": 2,
                                            "ie_eval.protocols": ["ours"], "ie_eval.bootstrap_samples": 100,
                                            "ie_eval.max_new_tokens": 4, **overrides})

    stages.build("ie_data", make(), progress=False)
    return make


def test_the_stage_fails_without_a_manifest_or_reports_an_optional_row_not_run(ie_data_cfg, tiny_export, tmp_path):
    from microlm import stages
    from microlm.stages import read_manifest

    folder = tiny_export(0)
    adapter = _adapter(folder, tmp_path / "adapter")
    (adapter / "adapter_config.json").write_text("[1]", encoding="utf-8")
    good = {"name": "tiny", "backend": "microlm", "model": str(folder)}
    bad = {"name": "tiny-ie", "backend": "microlm", "model": str(folder), "adapter": str(adapter)}
    out = tmp_path / "ie_eval"
    with pytest.raises(MicroLMError) as e:
        stages.build("ie_eval", ie_data_cfg(**{"ie_eval.models": [good, bad]}), progress=False, out_dir=out)
    _one_line(e, "'tiny-ie'", str(adapter / "adapter_config.json"))
    assert read_manifest(out) is None

    cfg = ie_data_cfg(**{"ie_eval.models": [good, dict(bad, optional=True)], "ie_eval.compare": [["tiny-ie", "tiny"]]})
    stages.build("ie_eval", cfg, progress=False, out_dir=out)
    m = read_manifest(out)["metrics"]
    assert m["models"]["tiny-ie"]["status"] == "not run" and "f1" not in m["models"]["tiny-ie"]
    assert list(m["models"]) == ["tiny", "tiny-ie", "floor-empty", "floor-rule"] and m["not_run"] == ["tiny-ie"]
    # the failed run had answered the good row before the bad one stopped it: those answers were kept
    assert m["cache"]["rows"]["tiny"] == {"hits": 2, "misses": 0, "dropped": 0} and m["cache"]["misses"] == 0
    assert "not run" in stages.get_stage("ie_eval").summary(m)
    md = (out / "summary.md").read_text(encoding="utf-8")
    assert "| tiny-ie | microlm | not run |" in md and "| tiny-ie | tiny | not run (tiny-ie) |" in md
    csv_rows = (out / "summary.csv").read_text(encoding="utf-8").splitlines()
    assert next(r for r in csv_rows if r.startswith("tiny-ie,")).endswith(",not run")
    report = json.loads((out / "report.json").read_text(encoding="utf-8"))
    assert report["comparisons"] == [] and report["skipped_comparisons"] == [["tiny-ie", "tiny"]]
    card = json.loads((out / "results_card.json").read_text(encoding="utf-8"))
    assert "tiny-ie" in card["not_run"] and "tiny-ie" not in card["models"]

    # a damaged cache line: dropped and counted in the manifest (a config change re-runs the stage)
    path = next((out / ".cache").glob("tiny-*.jsonl"))
    lines = path.read_text(encoding="utf-8").splitlines()
    path.write_text("\n".join([lines[0].replace('"finish_reason"', '"finish_reason_"'), lines[1]]) + "\n",
                    encoding="utf-8")
    cfg2 = ie_data_cfg(**{"ie_eval.models": [good, dict(bad, optional=True)], "ie_eval.bootstrap_samples": 101})
    stages.build("ie_eval", cfg2, progress=False, out_dir=out)
    assert read_manifest(out)["metrics"]["cache"] | {"rows": None} == {"hits": 1, "misses": 1, "dropped": 1,
                                                                       "rows": None}
    stages.build("ie_eval", cfg2, progress=False, out_dir=out, force=True)  # --force: every answer again
    assert read_manifest(out)["metrics"]["cache"]["rows"]["tiny"] == {"hits": 0, "misses": 2, "dropped": 0}


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
