"""Stage B1 step 04: schema-conditioned instructions (IEPile style)."""

import json

from microlm.ie.derive import INSTRUCTIONS, derive_examples

REC = {"id": "r1", "cate": "人物", "source": "s", "stratum": "人物:配偶", "text": "李白的妻子是许氏，生于碎叶城。",
       "relation": [{"head": "李白", "relation": "配偶", "tail": "许氏"}, {"head": "李白", "relation": "配偶", "tail": "许氏"},
                    {"head": "李白", "relation": "出生地点", "tail": "碎叶城"}]}
POOL = ["出生地点", "出生日期", "国籍", "职业", "配偶", "父母"]


def test_chunks_cover_the_pool_and_absent_relations_are_empty_lists():
    exs = list(derive_examples([REC], lambda r: POOL, split_num=4, shuffle_variants=0, seed=0))
    assert [json.loads(e["instruction"])["schema"] for e in exs] == [POOL[:4], POOL[4:]]
    outs = [json.loads(e["output"]) for e in exs]
    assert outs[0] == {"出生地点": [{"subject": "李白", "object": "碎叶城"}], "出生日期": [], "国籍": [], "职业": []}
    assert outs[1] == {"配偶": [{"subject": "李白", "object": "许氏"}], "父母": []}  # duplicate pair once
    ins = json.loads(exs[0]["instruction"])
    assert ins["input"] == REC["text"] and ins["instruction"] == INSTRUCTIONS["zh"]
    assert [e["positives"] for e in exs] == [1, 1] and len({e["id"] for e in exs}) == 2


def test_shuffled_variants_are_reproducible_permutations_and_english_topics_get_english():
    a = list(derive_examples([REC], lambda r: POOL, split_num=3, shuffle_variants=2, seed=7))
    b = list(derive_examples([REC], lambda r: POOL, split_num=3, shuffle_variants=2, seed=7))
    assert a == b and len(a) == 6
    for v in range(3):
        schema = [s for e in a if e["variant"] == v for s in json.loads(e["instruction"])["schema"]]
        assert sorted(schema) == sorted(POOL)
    assert any(json.loads(e["instruction"])["schema"] != POOL[:3] for e in a if e["variant"] > 0 and e["chunk"] == 0)
    en = {**REC, "cate": "Person", "relation": [{"head": "Li Bai", "relation": "spouse", "tail": "Xu"}]}
    e = next(derive_examples([en], lambda r: ["spouse"], split_num=4, shuffle_variants=0, seed=0))
    assert json.loads(e["instruction"])["instruction"] == INSTRUCTIONS["en"]
    assert json.loads(e["output"]) == {"spouse": [{"subject": "Li Bai", "object": "Xu"}]}
