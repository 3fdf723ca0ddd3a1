"""Stage B1 step 05: splits by text, stratified, and the fixed evaluation prompts."""

from collections import Counter

from microlm.ie.sample import assign_splits, pick_eval_prompts


def test_splits_are_stratified_deterministic_and_small_strata_train_only():
    strata = {f"a{i}": "人物:配偶" for i in range(200)} | {f"b{i}": "作品:作者" for i in range(40)} | \
        {"c0": "生物:学名", "c1": "生物:学名"}
    s = assign_splits(strata, 0.1, 0.05, seed=3)
    assert s == assign_splits(strata, 0.1, 0.05, seed=3) and s != assign_splits(strata, 0.1, 0.05, seed=4)
    per = Counter((k[0], v) for k, v in s.items())
    assert per[("a", "test")] == 10 and per[("a", "val")] == 20 and per[("a", "train")] == 170
    assert per[("b", "test")] == 2 and per[("b", "val")] == 4
    assert s["c0"] == s["c1"] == "train"


def test_eval_prompts_round_robin_over_topics_one_per_text_and_never_empty():
    ex = []
    for t, n in (("人物", 30), ("作品", 3), ("其他", 10)):
        for i in range(n):
            ex.append({"id": f"{t}{i}-0", "record_id": f"{t}{i}", "cate": t, "positives": 1})
            ex.append({"id": f"{t}{i}-1", "record_id": f"{t}{i}", "cate": t, "positives": 0})
    picked = pick_eval_prompts(ex, 12, extra_topic="其他", seed=0)
    assert len(picked) == 12 and all(e["positives"] > 0 for e in picked)
    assert len({e["record_id"] for e in picked}) == 12
    assert [e["cate"] for e in picked[:3]] == ["人物", "作品", "其他"]  # schema topics first, extra topic last
    assert Counter(e["cate"] for e in picked) == {"人物": 5, "作品": 3, "其他": 4}
    assert pick_eval_prompts(ex, 12, extra_topic="其他", seed=0) == picked
    assert len(pick_eval_prompts(ex[:4], 40, extra_topic="其他", seed=0)) == 2  # fewer available: all of them


def test_small_topics_of_rare_relations_still_reach_test_and_strata_are_proportional():
    strata = {f"t{i}": f"天文对象:r{i}" for i in range(21)}  # 21 texts, every stratum of one text
    strata |= {f"x{i}": "人物:配偶" for i in range(100)} | {f"y{i}": "人物:父母" for i in range(100)}
    s = assign_splits(strata, 0.05, 0.05, seed=0)
    per = Counter((k[0], v) for k, v in s.items())
    assert per[("t", "test")] == 1 and per[("t", "val")] == 1 and per[("t", "train")] == 19
    assert per[("x", "test")] == per[("y", "test")] == 5  # 10 for the topic, split evenly over its strata
    assert per[("x", "val")] + per[("y", "val")] == 10 and abs(per[("x", "val")] - per[("y", "val")]) <= 1
    # a floor for the evaluation prompts: 4 test texts for the small topic, at most a quarter of it
    f = Counter((k[0], v) for k, v in assign_splits(strata, 0.05, 0.05, seed=0, min_test=4).items())
    assert f[("t", "test")] == 4 and f[("x", "test")] + f[("y", "test")] == 10
    assert Counter(k[0] for k, v in assign_splits(strata, 0.05, 0.05, seed=0, min_test=50).items()
                   if v == "test")["t"] == 21 // 4
