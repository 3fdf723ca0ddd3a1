"""Stage B1 step 02: every filter rule, keep-first duplicates, and the step's files."""

import json

import pytest

from microlm.errors import MicroLMError
from microlm.ie.filter import filter_records, load_schema
from microlm.ie.standardize import IERecord, Issues, record_id
from microlm.stages.ie_data import pipeline

SCHEMA = {"人物": ["出生地点", "配偶"], "作品": ["作者"]}


def rec(text, triples, cate="人物", source="a"):
    return IERecord(record_id(text), cate, text, [{"head": h, "head_type": "", "relation": r, "tail": t,
                                                   "tail_type": ""} for h, r, t in triples], source)


def run(records, near=None, **kw):
    issues = Issues()
    out = list(filter_records(records, SCHEMA, extra_topic="其他", min_chars=kw.get("min_chars", 5),
                         max_chars=kw.get("max_chars", 200), max_entity_chars=kw.get("max_entity", 10),
                         near_threshold=near, issues=issues))
    return out, issues


def test_each_triple_rule_and_each_record_rule_is_counted():
    records = [
        rec("李白出生于碎叶城，妻子是许氏。", [("李白", "出生地点", "碎叶城"), ("李白", "出生地点", "碎叶城"),
                                   ("李白", "配偶", "杜甫"), ("许氏", "国籍", "李白"), (" 李白 ", "配偶", "许氏"),
                                   ("", "配偶", "许氏"), ("李白" * 6, "配偶", "许氏"), ("王维", "配偶", "许氏")]),
        rec("太短了", [("太短", "配偶", "了")]),
        rec("这一句话中没有任何实体出现。", [("张三", "配偶", "李四")]),
        rec("《静夜思》的作者是李白。", [("静夜思", "作者", "李白")], cate="诗歌"),
        rec("母亲在山谷里种兰花。", [("兰花", "Located", "山谷")], cate="其他"),
    ]
    out, iss = run(records)
    assert [r.text for r in out] == ["李白出生于碎叶城，妻子是许氏。", "母亲在山谷里种兰花。"]
    assert out[0].relation == [
        {"head": "李白", "head_type": "", "relation": "出生地点", "tail": "碎叶城", "tail_type": ""},
        {"head": "李白", "head_type": "", "relation": "配偶", "tail": "许氏", "tail_type": ""}]  # stripped
    assert iss.counts == {"duplicate_triple": 1, "tail_not_in_text": 1, "relation_not_in_schema": 1,
                          "empty_entity": 1, "entity_too_long": 1, "head_not_in_text": 2, "text_too_short": 1,
                          "no_triple_left": 1, "topic_not_in_schema": 1}


def test_duplicates_across_sources_exact_and_near_keep_the_first():
    base = "北京是中华人民共和国的首都，也是全国的政治中心和文化中心，拥有三千多年的建城史。"
    near = base.replace("三千多年", "三千余年")
    other = "长江是中国第一大河，全长约六千三百公里，流经十一个省级行政区。"
    records = [rec(base, [("北京", "配偶", "首都")], source="a"),
               rec(base, [("北京", "作者", "首都")], cate="作品", source="a"),  # same text, same source: kept
               rec(base, [("北京", "配偶", "首都")], source="b"),  # same text from another source
               rec(near, [("北京", "配偶", "首都")], source="b"),
               rec(other, [("长江", "配偶", "中国")], source="b")]
    out, iss = run(records, near=0.7)
    assert [(r.source, r.cate) for r in out] == [("a", "人物"), ("a", "作品"), ("b", "人物")]
    assert out[-1].text == other
    assert iss.counts == {"duplicate_text": 1, "near_duplicate_text": 1}
    out, iss = run(records, near=None)
    assert len(out) == 4 and iss.counts == {"duplicate_text": 1}


def test_schema_loader(tmp_path):
    p = tmp_path / "s.json"
    p.write_text(json.dumps({"_doc": "x", "人物": {"relations": [{"relation": "配偶"}],
                                                 "relations_train": [{"relation": "死亡地点"}, "bad"]}},
                            ensure_ascii=False), encoding="utf-8")
    assert load_schema([p]) == {"人物": ["配偶", "死亡地点"]}
    with pytest.raises(MicroLMError, match="not found"):
        load_schema([tmp_path / "missing.json"])
    (tmp_path / "bad.json").write_text("{", encoding="utf-8")
    with pytest.raises(MicroLMError, match="is not valid JSON"):
        load_schema([tmp_path / "bad.json"])


def test_step_02_runs_step_01_when_needed_and_writes_stats(tmp_cfg, tmp_path):
    from microlm.ie.pipeline import run_step

    ie = tmp_path / "data" / "ie"
    (ie / "re_raw" / "src").mkdir(parents=True)
    (ie / "schema.json").write_text(json.dumps({"作品": {"relations": [{"relation": "作者"}]}}, ensure_ascii=False),
                                    encoding="utf-8")
    lines = [{"text": "《静夜思》是李白写的诗。", "spo_list": [{"predicate": "作者", "subject": "静夜思", "object": "李白"}]},
             {"text": "《春晓》是孟浩然写的诗。", "spo_list": [{"predicate": "作者", "subject": "春晓", "object": "杜甫"}]}]
    (ie / "re_raw" / "src" / "d.json").write_text("\n".join(json.dumps(x, ensure_ascii=False) for x in lines),
                                                 encoding="utf-8")
    cfg = tmp_cfg(**{"data.root": str(tmp_path / "data"), "ie_data.sources": {"ie/re_raw/src/*.json": "duie_spo"},
                     "ie_data.schema": ["ie/schema.json"], "ie_data.embedded": False})
    stats = run_step(pipeline(cfg), 2, cfg.run_path / "ie_data")
    folder = cfg.run_path / "ie_data"
    assert (folder / "01_standardized.jsonl").is_file()
    kept = [json.loads(x) for x in (folder / "02_filtered.jsonl").read_text(encoding="utf-8").splitlines()]
    assert [k["text"] for k in kept] == ["《静夜思》是李白写的诗。"]
    assert stats["by_topic"] == {"作品": {"in": 2, "out": 1}} and stats["by_source"] == {"src": {"in": 2, "out": 1}}
    assert stats["issues"]["counts"] == {"tail_not_in_text": 1, "no_triple_left": 1}


def test_step_03_strata_follow_the_rarest_relation(tmp_cfg, tmp_path):
    from microlm.ie.pipeline import run_step

    ie = tmp_path / "data" / "ie"
    (ie / "re_raw" / "src").mkdir(parents=True)
    (ie / "schema.json").write_text(json.dumps({"作品": {"relations": [{"relation": "作者"}, {"relation": "导演"}]},
                                                "人物": {"relations": [{"relation": "配偶"}]}}, ensure_ascii=False),
                                    encoding="utf-8")
    spo = lambda s, p, o: {"predicate": p, "subject": s, "object": o}
    lines = [{"text": f"《书{i}》是作家{i}写的书。", "spo_list": [spo(f"书{i}", "作者", f"作家{i}")]} for i in range(3)]
    lines.append({"text": "《电影甲》由导演乙执导，原著作者丙。", "spo_list": [spo("电影甲", "作者", "丙"), spo("电影甲", "导演", "导演乙")]})
    (ie / "re_raw" / "src" / "d.json").write_text("\n".join(json.dumps(x, ensure_ascii=False) for x in lines),
                                                 encoding="utf-8")
    cfg = tmp_cfg(**{"data.root": str(tmp_path / "data"), "ie_data.sources": {"ie/re_raw/src/*.json": "duie_spo"},
                     "ie_data.schema": ["ie/schema.json"], "ie_data.rare_relation_triples": 2,
                     "ie_data.embedded": False})
    stats = run_step(pipeline(cfg), 3, cfg.run_path / "ie_data")
    rows = [json.loads(x) for x in (cfg.run_path / "ie_data" / "03_stratified.jsonl").read_text(encoding="utf-8").splitlines()]
    assert [r["stratum"] for r in rows] == ["作品:作者"] * 3 + ["作品:导演"]  # 导演 (1 triple) is rarer than 作者 (4)
    assert stats["relations"] == {"作品": {"作者": 4, "导演": 1}}
    assert stats["rare_relations"] == {"作品:导演": 1} and stats["schema_topics_without_records"] == ["人物"]
    assert stats["by_source_topic"] == {"src|作品": 4} and stats["imbalance_max_over_min_topic"] == 1.0
    stats = run_step(pipeline(cfg), 4, cfg.run_path / "ie_data")  # derive: 作品's pool is its schema (作者, 导演) → one chunk per record
    exs = [json.loads(x) for x in (cfg.run_path / "ie_data" / "04_derived.jsonl").read_text(encoding="utf-8").splitlines()]
    assert stats["examples"] == 4 and [json.loads(e["instruction"])["schema"] for e in exs] == [["作者", "导演"]] * 4
    assert json.loads(exs[0]["output"]) == {"作者": [{"subject": "书0", "object": "作家0"}], "导演": []}
    assert stats["empty_output_share"] == 0.0
    stats = run_step(pipeline(cfg), 5, cfg.run_path / "ie_data")  # sample: 4 texts in 2 strata (< 3 texts in 导演's) → all train; no eval prompt
    # 4 texts: 5 % is none, but the test split keeps a quarter of a topic for the evaluation prompts
    assert stats["splits"]["train"]["texts"] == 3 and stats["splits"]["test"]["texts"] == 1
    assert stats["texts_shared_between_splits"] == 0
    assert stats["eval_prompts"] == {"n": 1, "by_topic": {"作品": 1}, "short_by": cfg.ie_data.eval_prompts - 1}


def test_signatures_in_worker_processes_give_the_same_decisions_across_batches():
    from .conftest import ZH

    records = []
    for i, t in enumerate(ZH * 3):  # each text three times: exact repeats (same source) and edited copies
        text = t if i < len(ZH) else t[:-3] + "，是吧。" if i < 2 * len(ZH) else t
        records.append(rec(text, [(t[:2], "配偶", t[2:4])], source=f"s{i % 2}"))
    out = {}
    for workers in (1, 2):
        issues = Issues()
        out[workers] = list(filter_records(records, SCHEMA, extra_topic="其他", min_chars=5, max_chars=400,
                                           max_entity_chars=10, near_threshold=0.7, issues=issues, batch=4,
                                           workers=workers)), issues.counts
    assert [r.id for r in out[1][0]] == [r.id for r in out[2][0]] and out[1][1] == out[2][1]
    assert out[1][1]["near_duplicate_text"] > 0 and len(out[1][0]) < len(records)
