"""Stage B3's training mix: decontaminated, balanced by topic, a chosen share of all-empty answers."""

import json
from collections import Counter

import pytest

from microlm.ie.mix import (
    balanced_sample,
    contaminated,
    describe_mix,
    is_empty_answer,
    line_input,
    normalize_text,
)


def _line(cate: str, text: str, pairs: int) -> dict:
    inst = json.dumps({"instruction": "抽取", "schema": ["作者", "出版社"], "input": text}, ensure_ascii=False)
    ans = {"作者": [{"subject": f"书{i}", "object": f"人{i}"} for i in range(pairs)], "出版社": []}
    return {"cate": cate, "messages": [{"role": "system", "content": "s"}, {"role": "user", "content": inst},
                                       {"role": "assistant", "content": json.dumps(ans, ensure_ascii=False)}]}


def _lines() -> list[dict]:
    out = []
    for cate, n in (("其他", 400), ("作品", 60), ("人物", 9)):
        out += [_line(cate, f"{cate}的第{i}句话，内容各不相同：{i * 7919 % 1000}号。", 1 if i % 3 == 0 else 0)
                for i in range(n)]
    return out


def _draw(lines, n, **kw):
    picked, rep = balanced_sample([x["cate"] for x in lines], [is_empty_answer(x) for x in lines], n, **kw)
    return [lines[i] for i in picked], rep


def test_topics_are_balanced_by_water_filling_and_the_empty_share_is_held():
    lines = _lines()
    sample, rep = _draw(lines, 90, empty_share=0.5, seed=1)
    by = Counter(x["cate"] for x in sample)
    assert len(sample) == 90 and by["人物"] == 9  # the small topic gives all it has ...
    assert sorted([by["作品"], by["其他"]]) == [40, 41]  # ... the other 81 are shared equally
    for cate in ("作品", "其他"):
        mine = [x for x in sample if x["cate"] == cate]
        assert abs(sum(map(is_empty_answer, mine)) - len(mine) / 2) <= 1
    assert _draw(lines, 90, empty_share=0.5, seed=1)[0] == sample  # seeded
    assert _draw(lines, 90, empty_share=0.5, seed=2)[0] != sample
    none = _draw(lines, 60, empty_share=0.0, seed=1)[0]
    assert len(none) == 60 and not any(is_empty_answer(x) for x in none if x["cate"] == "其他")
    # a topic with too few positives fills its share with empties rather than give up examples
    assert Counter(x["cate"] for x in none)["人物"] == 9
    assert rep["drawn"] == 90 and rep["usable"] == len(lines)
    assert rep["usable_empty"] == sum(map(is_empty_answer, lines))
    everything, rep = _draw(lines, 0, empty_share=0.7, seed=1)
    assert len(everything) == len(lines) == rep["drawn"]  # 0 = all usable lines


def test_a_near_duplicate_of_an_evaluation_text_is_never_drawn():
    lines = _lines()
    ev = [line_input(lines[5]), "与训练无关的另一句话，完全不一样的内容，足够长以便比较。"]
    near = dict(lines[10])
    near["messages"] = [dict(m) for m in near["messages"]]
    text = line_input(lines[5]) + "啊"  # one character more: Jaccard of 5-grams ≈ 0.94
    near["messages"][1]["content"] = json.dumps({"instruction": "抽取", "schema": ["作者"], "input": text},
                                                ensure_ascii=False)
    spaced = dict(lines[20])
    spaced["messages"] = [dict(m) for m in spaced["messages"]]
    spaced["messages"][1]["content"] = json.dumps({"instruction": "抽取", "schema": ["作者"], "input": " ".join(ev[1])},
                                                  ensure_ascii=False)  # the same text, spaced out: normalised away
    pool = lines + [near, spaced]
    bad = contaminated([line_input(x) for x in pool], ev, threshold=0.8)
    assert bad[5] and bad[-2] and bad[-1] and sum(bad) == 3
    sample, rep = _draw(pool, 0, empty_share=0.7, seed=0, excluded=bad)
    assert rep["excluded"] == 3 and all(line_input(x) not in ev for x in sample)
    assert normalize_text("Ａ b\u3000C") == "abc"


def test_the_mix_report_counts_topics_empties_and_positives_per_evaluated_relation():
    sample = [_line("作品", "a", 1), _line("作品", "b", 0), _line("人物", "c", 2)]
    golds = [(json.dumps({"作者": [{"subject": "x", "object": "y"}], "出版社": [{"subject": "x", "object": "z"}]},
                         ensure_ascii=False), "作品")]
    d = describe_mix(sample, golds)
    assert d["by_topic"] == {"作品": 2, "人物": 1} and d["empty_by_topic"] == {"作品": 1, "人物": 0}
    assert d["empty_share"] == pytest.approx(1 / 3, abs=1e-4)
    assert d["positives_per_evaluated_relation"] == {"作品:作者": 1, "作品:出版社": 0}
    assert d["evaluated_triples"] == 2 and d["evaluated_triples_without_positive"] == 1
