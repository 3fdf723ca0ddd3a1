"""Stage B2 step 06 (render): chat lines both ChatML templates read the same, token lengths, cutoff;
the project-written records that let every topic run without the bundle."""

import json
import os
from collections import Counter
from pathlib import Path

import jinja2

from microlm.ie.render import SYSTEM_PROMPTS, TokenCounter, length_summary, render_example, to_messages
from microlm.stages.ie_data import pipeline
from microlm.tokenizer.hf import hf_tokenizer_config, hf_tokenizer_json
from microlm.tokenizer.tokenizer import render_chat

from .conftest import REPO

EX = {"id": "a-人物-0-0", "record_id": "a", "cate": "人物", "source": "s",
      "instruction": json.dumps({"instruction": "抽取", "schema": ["配偶"], "input": "李白的妻子是许氏。"}, ensure_ascii=False),
      "output": json.dumps({"配偶": [{"subject": "李白", "object": "许氏"}]}, ensure_ascii=False)}


def _templates(chat_tok) -> dict[str, str]:
    """Qwen2.5's chat template (from the bundle, when there) and the one our tokenizer export writes."""
    out = {"microlm": hf_tokenizer_config(chat_tok)["chat_template"]}
    qwen = Path(os.environ.get("MICROLM_DATA", "/nonexistent")) / "tokenizers" / "qwen2.5" / "tokenizer_config.json"
    if qwen.is_file():
        out["qwen2.5"] = json.loads(qwen.read_text(encoding="utf-8"))["chat_template"]
    return out


def test_chat_lines_render_identically_under_both_chatml_templates(chat_tok):
    line = render_example(EX)
    assert [m["role"] for m in line["messages"]] == ["system", "user", "assistant"]
    assert line["messages"][0]["content"] == SYSTEM_PROMPTS["zh"] and line["messages"][2]["content"] == EX["output"]
    prompt = render_example(EX, prompt_only=True)
    assert [m["role"] for m in prompt["messages"]] == ["system", "user"] and prompt["gold"] == EX["output"]
    assert to_messages({**EX, "cate": "Person"})[0]["content"] == SYSTEM_PROMPTS["en"]
    env = jinja2.Environment(trim_blocks=True, lstrip_blocks=True)
    for name, template in _templates(chat_tok).items():
        t = env.from_string(template)
        assert t.render(messages=line["messages"], add_generation_prompt=False) == render_chat(line["messages"]), name
        assert t.render(messages=prompt["messages"], add_generation_prompt=True) == \
            render_chat(prompt["messages"], add_generation_prompt=True), name
    # without a system message Qwen2.5 inserts its own: that is why every line carries one
    if "qwen2.5" in _templates(chat_tok):
        bare = env.from_string(_templates(chat_tok)["qwen2.5"]).render(messages=line["messages"][1:])
        assert "Qwen" in bare and "Qwen" not in render_chat(line["messages"])


def test_token_counters_agree_with_the_tokenizers(chat_tok):
    from tokenizers import Tokenizer as HFTokenizer

    hf = HFTokenizer.from_str(json.dumps(hf_tokenizer_json(chat_tok)))
    lines = [render_example(EX), render_example({**EX, "output": "{}"})]
    ours = TokenCounter.microlm(chat_tok).count(lines)
    theirs = TokenCounter.hf("hf", hf).count(lines)
    assert ours == [len(chat_tok.encode_chat(ln["messages"])) for ln in lines] == theirs  # same BPE, same ids
    assert ours[0] > ours[1]
    p = [render_example(EX, prompt_only=True)]
    assert TokenCounter.microlm(chat_tok).count(p) == [len(chat_tok.encode_chat(p[0]["messages"], add_generation_prompt=True))]
    s = length_summary([10, 20, 30, 40], {"cutoff": 25})
    assert s["n"] == 4 and s["max"] == 40 and s["over_cutoff"] == 2 and sum(s["histogram"]["counts"]) == 4
    assert length_summary([], {}) == {"n": 0}


def test_step_06_on_the_embedded_records_drops_over_cutoff_and_keeps_prompts(tmp_cfg, monkeypatch, chat_tok):
    from tokenizers import Tokenizer as HFTokenizer

    from microlm.ie.pipeline import run_step, step_render

    monkeypatch.delenv("MICROLM_DATA", raising=False)  # the project-written records and schema alone
    cfg = tmp_cfg(**{"ie_data.cutoff_tokens": 400, "ie_data.token_sample": 0})
    out = cfg.run_path / "ie_data"
    s5 = run_step(pipeline(cfg), 5, cfg.run_path / "ie_data")  # runs 01–04 first
    assert s5["eval_prompts"]["n"] == 40 and len(s5["eval_prompts"]["by_topic"]) == 12  # every topic, 3–4 each
    assert min(s5["eval_prompts"]["by_topic"].values()) == 3
    qwen_like = TokenCounter.hf("qwen2.5", HFTokenizer.from_str(json.dumps(hf_tokenizer_json(chat_tok))))
    stats = step_render(pipeline(cfg), out, counters=[qwen_like, TokenCounter.microlm(chat_tok)])
    for split in ("train", "val", "test"):
        rows = [json.loads(x) for x in (out / f"06_{split}.jsonl").read_text(encoding="utf-8").splitlines()]
        sp = stats["splits"][split]
        assert sp["in"] == s5["splits"][split]["examples"] == sp["out"] + sp["dropped_over_cutoff"] == len(rows) + sp["dropped_over_cutoff"]
        assert all(r["tokens"]["qwen2.5"] <= 400 for r in rows)
        assert all(r["tokens"]["microlm"] == len(chat_tok.encode_chat(r["messages"])) for r in rows[:20])
        assert stats["tokens"][split]["qwen2.5"]["over_cutoff"] == sp["dropped_over_cutoff"]
    assert sum(stats["splits"][k]["dropped_over_cutoff"] for k in ("train", "val", "test")) > 0  # the tiny BPE is long-winded
    prompts = [json.loads(x) for x in (out / "06_eval_prompts.jsonl").read_text(encoding="utf-8").splitlines()]
    assert len(prompts) == 40 and all("gold" in p and p["messages"][-1]["role"] == "user" for p in prompts)
    assert stats["splits"]["eval_prompts"]["dropped_over_cutoff"] == 0  # the fixed set is never cut
    cfg2 = tmp_cfg(**{"ie_data.token_sample": 50})
    stats2 = step_render(pipeline(cfg2), out, counters=[TokenCounter.microlm(chat_tok)])
    assert 20 <= stats2["splits"]["train"]["measured"] <= 90 < stats2["splits"]["train"]["in"]
    assert stats2["splits"]["eval_prompts"]["measured"] == stats2["splits"]["eval_prompts"]["in"]  # never sampled
    assert not stats2["cutoff_applied"] and stats2["splits"]["train"]["out"] == stats2["splits"]["train"]["in"]


def test_embedded_records_cover_all_12_topics_and_pass_every_filter(tmp_cfg, monkeypatch):
    from microlm.ie.filter import load_schema
    from microlm.ie.pipeline import run_step
    from microlm.ie.standardize import EMBEDDED_RECORDS, EMBEDDED_SCHEMA

    rows = [json.loads(x) for x in EMBEDDED_RECORDS.read_text(encoding="utf-8").splitlines()]
    by_topic = Counter(r["cate"] for r in rows)
    schema = load_schema([EMBEDDED_SCHEMA])
    assert len(by_topic) == 12 and min(by_topic.values()) >= 20 and set(by_topic) == set(schema)
    real = Path(os.environ.get("MICROLM_DATA", "/nonexistent")) / "ie" / "instructie_schema_zh.json"
    monkeypatch.delenv("MICROLM_DATA", raising=False)
    stats = run_step(pipeline(c := tmp_cfg()), 2, c.run_path / "ie_data")
    assert stats["records_in"] == stats["records"] == len(rows) and stats["issues"]["counts"] == {}
    for p in (real, REPO / ".." / "shared" / "datasets" / "ie" / "instructie_schema_zh.json"):
        if p.is_file():  # the relation names are InstructIE's: the records also pass the full schema
            full = load_schema([p])
            assert all(t["relation"] in full[r["cate"]] for r in rows for t in r["relation"])
            break


def test_worker_processes_write_byte_identical_files(tmp_cfg, tmp_path, monkeypatch, chat_tok):
    from microlm.ie.pipeline import run_step, step_render

    monkeypatch.delenv("MICROLM_DATA", raising=False)
    files = {}
    for workers in (1, 2):
        cfg = tmp_cfg(**{"ie_data.workers": workers, "ie_data.token_sample": 40, "ie_data.cutoff_tokens": 350})
        out = tmp_path / f"w{workers}"
        run_step(pipeline(cfg), 5, out)
        stats = step_render(pipeline(cfg), out, counters=[TokenCounter.microlm(chat_tok)], batch=16)  # many chunks
        stats.pop("seconds")
        files[workers] = {p.name: p.read_bytes() for p in sorted(out.glob("0[46]_*.jsonl"))}, stats
    assert files[1][0] == files[2][0]
    assert sorted(files[1][0]) == ["04_derived.jsonl", "06_eval_prompts.jsonl", "06_test.jsonl", "06_test_iepile.jsonl",
                                   "06_train.jsonl", "06_val.jsonl"]
    assert files[1][1] == files[2][1]


def test_ie_data_stage_runs_all_steps_once_and_reruns_on_a_change(tmp_cfg, monkeypatch, caplog):
    import logging

    from microlm import stages
    from microlm.stages import read_manifest

    monkeypatch.delenv("MICROLM_DATA", raising=False)
    cfg = tmp_cfg()
    folder = stages.build("ie_data", cfg, progress=False)
    m = read_manifest(folder)
    assert m["stage"] == "ie_data" and m["metrics"]["records_in"] == 255 and m["metrics"]["eval_prompts"] == 40
    assert all((folder / o).is_file() for o in m["outputs"]) and "06_render_stats.json" in m["outputs"]
    assert any(i["path"].endswith("embedded_zh.jsonl") for i in m["inputs"])
    with caplog.at_level(logging.INFO, logger="microlm"):
        stages.build("ie_data", cfg, progress=False)
    assert "up to date" in caplog.text
    changed = tmp_cfg(**{"ie_data.split_num": 3})
    stages.build("ie_data", changed, progress=False)
    assert read_manifest(folder)["fingerprint"] != m["fingerprint"]
    assert read_manifest(folder)["metrics"]["examples"] != m["metrics"]["examples"]


def test_the_test_split_keeps_every_chunk_and_iepile_chunks_cover_each_test_record(tmp_cfg, tmp_path, monkeypatch):
    """max_empty_chunks samples negatives for training only: train and val hold no capped chunk, the
    test split holds every chunk of its records; 05_test_iepile.jsonl asks every test record under
    IEPile's test chunking, each chunk with the record's whole relation list."""
    import json
    from collections import Counter

    from microlm.ie.derive import iepile_chunks
    from microlm.ie.pipeline import run_step

    monkeypatch.delenv("MICROLM_DATA", raising=False)
    cfg = tmp_cfg(**{"ie_data.max_empty_chunks": 0, "ie_data.split_num": 2})
    out = tmp_path / "ie"
    stats = run_step(pipeline(cfg), 5, out)
    rows = {s: [json.loads(x) for x in (out / f"05_{s}.jsonl").read_text(encoding="utf-8").splitlines()]
            for s in ("train", "val", "test", "test_iepile")}
    assert not any(r["capped"] for s in ("train", "val") for r in rows[s])
    assert any(r["capped"] for r in rows["test"]) and any(r["positives"] == 0 for r in rows["test"])
    assert stats["splits"]["train"]["capped_empty_chunks_left_out"] > 0
    assert stats["splits"]["test"]["capped_empty_chunks_left_out"] == 0
    derived = Counter(json.loads(x)["record_id"] for x in (out / "04_derived.jsonl").read_text().splitlines())
    test_ids = {r["record_id"] for r in rows["test"]}
    assert Counter(r["record_id"] for r in rows["test"]) == {k: derived[k] for k in test_ids}  # every chunk
    by_rec = {}
    for r in rows["test_iepile"]:
        by_rec.setdefault(r["record_id"], []).append(json.loads(r["instruction"])["schema"])
    assert set(by_rec) == test_ids and stats["test_iepile"]["examples"] == len(rows["test_iepile"])
    for rid, schemas in by_rec.items():
        assert schemas == iepile_chunks([x for s in schemas for x in s], 2)  # sorted, short remainder folded
        gold = next(r["record_gold"] for r in rows["test_iepile"] if r["record_id"] == rid)
        asked = {x for s in schemas for x in s}
        assert gold and all(rel in asked for _, rel, _ in gold)


def test_a_record_a_source_gives_twice_becomes_one_record(tmp_cfg, tmp_path):
    import json

    from microlm.ie.pipeline import step_stratify

    out = tmp_path / "ie"
    out.mkdir()
    rec = {"id": "x1", "cate": "其他", "text": "甲公司持有乙公司的股份。", "source": "finre"}
    rows = [dict(rec, relation=[{"head": "甲公司", "relation": "持股", "tail": "乙公司"}]),
            dict(rec, id="x2", relation=[{"head": "丙", "relation": "持股", "tail": "丁"}]),
            dict(rec, relation=[{"head": "乙公司", "relation": "被持股", "tail": "甲公司"},
                                {"head": "甲公司", "relation": "持股", "tail": "乙公司"}])]
    (out / "02_filtered.jsonl").write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
    stats = step_stratify(pipeline(tmp_cfg()), out)
    got = [json.loads(x) for x in (out / "03_stratified.jsonl").read_text(encoding="utf-8").splitlines()]
    assert [r["id"] for r in got] == ["x1", "x2"] and stats["duplicate_records_merged"] == 1
    assert [(t["head"], t["relation"]) for t in got[0]["relation"]] == [("甲公司", "持股"), ("乙公司", "被持股")]
    assert stats["relations"]["其他"] == {"持股": 2, "被持股": 1} and all("stratum" in r for r in got)
