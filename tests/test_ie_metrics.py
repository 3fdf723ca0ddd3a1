"""B4 metrics on hand-made gold/prediction pairs: every malformed shape, IEPile's chunk merge, intervals."""

import json

import pytest

from microlm.ie.metrics import (
    RuleFloor,
    aggregate,
    bootstrap,
    empty_answer,
    failure_kind,
    merge_records,
    normalize_entity,
    paired_bootstrap,
    read_answer,
    score_answer,
    triples_of,
)

ASK = ["作者", "出版社"]
GOLD = json.dumps({"作者": [{"subject": "三体", "object": "刘慈欣"}], "出版社": []}, ensure_ascii=False)


@pytest.mark.parametrize("text, cls", [
    ("", "empty"), ("   \n", "empty"), (None, "empty"),
    ('{"作者": [{"subject": "三体", "object": "刘慈', "truncated"),
    ('{"作者": [{"subject": "三体", "object": "刘慈欣"}], "出版社": [', "truncated"),
    ('```json\n{"作者": [], "出版社": []}\n```', "fenced"),
    ('答案如下：{"作者": [], "出版社": []}', "prose"),
    ("没有找到关系。", "not_json"),
    ('[{"subject": "三体", "object": "刘慈欣"}]', "not_object"),
    ("null", "not_object"), ("42", "not_object"),
    ('{"作者": [], "出版社": [], "国籍": []}', "wrong_keys"),
    ('{"作者": []}', "wrong_keys"),
    ('{"作者": [{"subject": null, "object": "刘慈欣"}], "出版社": []}', "bad_values"),
    ('{"作者": [{"subject": 3, "object": "刘慈欣"}], "出版社": []}', "bad_values"),
    ('{"作者": "刘慈欣", "出版社": []}', "bad_values"),
    ('{"作者": [], "出版社": []}', "ok"),
    ("{" + " " * 30000 + "}", "too_long"),
])
def test_error_classes(text, cls):
    assert read_answer(text, ASK)[1] == cls


def test_length_cut_is_truncated_even_when_balanced_guess_fails():
    assert read_answer('{"作者": [{"subject": "三体" "object"', ASK, finish_reason="length")[1] == "truncated"


def test_iepile_extraction_keeps_good_items_of_a_bad_answer():
    obj = json.loads('{"作者": [{"subject": "三体", "object": "刘慈欣"}, {"subject": null, "object": "x"}, "junk"],'
                     ' "未知": [{"subject": "a", "object": "b"}], "出版社": "x"}')
    assert triples_of(obj) == {("三体", "作者", "刘慈欣"), ("a", "未知", "b")}
    assert triples_of([1, 2]) == set() and triples_of(None) == set()


def test_unparseable_answer_keeps_its_gold():
    s = score_answer("not json", ASK, GOLD)
    assert s["parsed"] is False and s["pred"] == [] and s["gold"] == [("三体", "作者", "刘慈欣")]
    recs = merge_records([{"record_id": "r", "cate": "作品", **s}])
    m = aggregate(recs)
    assert (m["tp"], m["n_pred"], m["n_gold"], m["recall"], m["f1"], m["parse_rate"]) == (0, 0, 1, 0.0, 0.0, 0.0)


def test_duplicated_triples_count_once():
    ans = json.dumps({"作者": [{"subject": "三体", "object": "刘慈欣"}] * 3, "出版社": []}, ensure_ascii=False)
    m = aggregate(merge_records([{"record_id": "r", "cate": "作品", **score_answer(ans, ASK, GOLD)}]))
    assert (m["tp"], m["n_pred"], m["precision"], m["f1"]) == (1, 1, 1.0, 1.0)


def test_chunks_of_a_record_are_merged_and_micro_f1_is_hand_computed():
    # record A: relations cut into two chunks; record B: one chunk; record C: missing gold (counted, not scored)
    a1 = score_answer('{"作者": [{"subject": "三体", "object": "刘慈欣"}], "出版社": [{"subject": "三体", '
                      '"object": "重庆出版社"}]}', ASK, GOLD)  # 1 tp, 1 fp (gold 出版社 is empty)
    a2 = score_answer('{"国籍": [{"subject": "刘慈欣", "object": "中国"}], "出生地": []}', ["国籍", "出生地"],
                      '{"国籍": [{"subject": "刘慈欣", "object": "中国"}], "出生地": [{"subject": "刘慈欣", '
                      '"object": "山西"}]}')  # 1 tp, 1 fn
    b1 = score_answer('{"作者": [{"subject": "红楼梦", "object": "曹 雪芹"}], "出版社": []}', ASK,
                      '{"作者": [{"subject": "红楼梦", "object": "曹雪芹"}], "出版社": []}')  # strict: fp + fn
    c = score_answer('{"作者": [], "出版社": []}', ASK, None)
    rows = [{"record_id": "A", "cate": "人物", **a1}, {"record_id": "A", "cate": "人物", **a2},
            {"record_id": "B", "cate": "作品", **b1}, {"record_id": "C", "cate": "作品", **c}]
    recs = merge_records(rows)
    assert set(recs) == {"A", "B"} and recs["A"]["answers"] == 2
    m = aggregate(recs)
    # tp = 2 (A: 作者, 国籍); pred = 4 (A: 3, B: 1); gold = 4 (A: 3, B: 1)
    assert (m["tp"], m["n_pred"], m["n_gold"]) == (2, 4, 4)
    assert m["precision"] == pytest.approx(0.5) and m["recall"] == pytest.approx(0.5) and m["f1"] == pytest.approx(0.5)
    # relaxed forgives the space in 曹 雪芹: tp 3 of 4 / 4
    assert m["relaxed_f1"] == pytest.approx(0.75)
    assert m["parse_rate"] == 1.0 and m["schema_rate"] == 1.0


def test_normalize_entity():
    assert normalize_entity("ＡＢＣ　１２３") == normalize_entity("abc 123") == "abc123"
    assert normalize_entity("《三体》") == normalize_entity("三体")
    assert normalize_entity("刘慈欣") != normalize_entity("刘慈")


def _recs(hits: list[int]) -> dict:
    rows = []
    for i, h in enumerate(hits):
        gold = json.dumps({"作者": [{"subject": f"书{i}", "object": f"人{i}"}]}, ensure_ascii=False)
        ans = gold if h else json.dumps({"作者": []})
        rows.append({"record_id": str(i), "cate": "作品", **score_answer(ans, ["作者"], gold)})
    return merge_records(rows)


def test_bootstrap_interval_contains_the_point_and_is_seeded():
    recs = _recs([1, 0] * 20)
    b1, b2 = bootstrap(recs, seed=3), bootstrap(recs, seed=3)
    assert b1 == b2
    f1 = aggregate(recs)["f1"]
    assert b1["f1"][0] < f1 < b1["f1"][1]
    assert 0.0 < b1["f1"][0] and b1["f1"][1] < 1.0
    assert b1["parse_rate"] == [1.0, 1.0]


def test_paired_bootstrap_decides_only_a_clear_difference():
    good, bad = _recs([1] * 36 + [0] * 4), _recs([0] * 36 + [1] * 4)
    d = paired_bootstrap(good, bad, seed=0)
    assert d["decided"] and d["interval"][0] > 0 and d["f1_diff"] > 0.5
    close = _recs([1, 0] * 20)
    flipped = _recs([0, 1] + [1, 0] * 19)  # differs on 2 of 40 records, same F1
    assert not paired_bootstrap(close, flipped, seed=0)["decided"]


def test_floors():
    assert json.loads(empty_answer(ASK)) == {"作者": [], "出版社": []}
    assert score_answer(empty_answer(ASK), ASK, GOLD)["compliant"]
    floor = RuleFloor([GOLD, '{"作者": [{"subject": "红楼梦", "object": "曹雪芹"}]}', "broken"])
    ans = json.loads(floor.answer("《三体》是刘慈欣写的，《红楼梦》是曹雪芹写的。", ASK))
    assert set(ans) == set(ASK) and ans["出版社"] == []
    assert {"subject": "三体", "object": "刘慈欣"} in ans["作者"]
    assert all(p["subject"] != p["object"] for p in ans["作者"]) and len(ans["作者"]) <= 2


def test_failure_kinds():
    text = "《三体》是刘慈欣写的。"
    row = lambda ans: {**score_answer(ans, ASK, GOLD)}  # noqa: E731
    assert failure_kind(row(GOLD), text) is None
    assert failure_kind(row("oops"), text) == "not JSON"
    assert failure_kind(row('{"作者": [{"subject": "三体", "object": "刘'), text) == "truncated"
    assert failure_kind(row('{"作者": []}'), text) == "wrong keys"
    assert failure_kind(row('{"作者": [{"subject": "三体", "object": "大刘"}], "出版社": []}'), text) == "hallucinated entity"
    assert failure_kind(row('{"作者": [], "出版社": [{"subject": "三体", "object": "刘慈欣"}]}'), text) == \
        "right pair, wrong relation"
    assert failure_kind(row('{"作者": [], "出版社": []}'), text) == "missed triples"


def test_iepile_counting_on_hand_made_answers_in_both_modes():
    """IEPile's eval_func counts a record's concatenated chunk predictions against its whole relation
    list: normal mode — a triple predicted twice is one hit and one false positive, each gold triple
    matches once; set mode — both de-duplicated."""
    from microlm.ie.metrics import iepile_aggregate, iepile_count, iepile_records

    g = [("三体", "作者", "刘慈欣"), ("三体", "出版社", "重庆出版社")]
    pred = [("三体", "作者", "刘慈欣"), ("三体", "作者", "刘慈欣"), ("三体", "作者", "刘")]
    assert iepile_count(pred, g, "normal") == (1, 3, 2)
    assert iepile_count(pred, g, "set") == (1, 2, 2)
    assert iepile_count([], g) == (0, 0, 2) and iepile_count(pred, []) == (0, 3, 0)
    with pytest.raises(ValueError):
        iepile_count(pred, g, "multimatch")
    # two chunks of record A (one repeats a triple of the other), one of B; B's answer is not JSON
    a1 = score_answer('{"作者": [{"subject": "三体", "object": "刘慈欣"}], "出版社": []}', ASK, GOLD)
    a2 = score_answer('{"国籍": [{"subject": "三体", "object": "刘慈欣"}], "作者": [{"subject": "三体", '
                      '"object": "刘慈欣"}]}', ["国籍", "作者"], GOLD)
    b1 = score_answer("```json\n{}\n```", ASK, GOLD)
    rows = [{"record_id": "A", "cate": "作品", "record_gold": g, **a1}, {"record_id": "A", "cate": "作品", "record_gold": g, **a2},
            {"record_id": "B", "cate": "作品", "record_gold": [g[0]], **b1}]
    recs = iepile_records(rows)
    assert recs["A"]["pred"] == [g[0], ("三体", "国籍", "刘慈欣"), g[0]]  # in order, repeats kept
    m = iepile_aggregate(recs)
    # normal: tp 1 (the repeat is a false positive), pred 3, gold 2 + 1 → P 1/3, R 1/3
    assert (m["tp"], m["n_pred"], m["n_gold"]) == (1, 3, 3) and m["f1"] == pytest.approx(1 / 3)
    # set: A's predictions {作者, 国籍}: tp 1, pred 2; B: gold 1 → P 1/2, R 1/3, F1 0.4
    assert m["f1_set"] == pytest.approx(0.4)
    assert m["parse_rate"] == pytest.approx(2 / 3) and m["answers"] == 3


def test_a_fenced_answer_is_read_fence_tolerantly_beside_the_strict_reading():
    ans = '```json\n{"作者": [{"subject": "三体", "object": "刘慈欣"}], "出版社": []}\n```'
    s = score_answer(ans, ASK, GOLD)
    assert s["error"] == "fenced" and not s["parsed"] and s["pred"] == []
    assert s["parsed_fenced"] and s["pred_fenced"] == [("三体", "作者", "刘慈欣")]
    m = aggregate(merge_records([{"record_id": "r", "cate": "作品", **s}]))
    assert m["f1"] == 0.0 and m["f1_fenced"] == 1.0 and m["parse_rate_fenced"] == 1.0
    plain = score_answer('{"作者": [], "出版社": []}', ASK, GOLD)
    assert plain["pred_fenced"] == plain["pred"] and plain["parsed_fenced"]


def test_a_comparison_can_set_strict_against_fence_tolerant():
    from microlm.ie.metrics import paired_bootstrap

    gold = lambda i: json.dumps({"作者": [{"subject": f"书{i}", "object": f"人{i}"}]}, ensure_ascii=False)  # noqa: E731
    a = merge_records([{"record_id": str(i), "cate": "作品", **score_answer(gold(i), ["作者"], gold(i))}
                       for i in range(30)])
    b = merge_records([{"record_id": str(i), "cate": "作品",
                        **score_answer("```json\n" + gold(i) + "\n```", ["作者"], gold(i))} for i in range(30)])
    assert paired_bootstrap(a, b)["decided"]  # strict against strict: B parses nothing
    c = paired_bootstrap(a, b, metric_b="f1_fenced")
    assert c["f1_diff"] == 0.0 and not c["decided"]  # B's fences forgiven: the same extraction
