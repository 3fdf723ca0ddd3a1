"""Stage B1 step 04: schema-conditioned instructions (IEPile style)."""

import json

import pytest

from microlm.ie.derive import INSTRUCTIONS, derive_examples, derive_iepile, iepile_chunks

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


def test_empty_chunks_beyond_the_cap_are_marked_deterministically_and_counted():
    pool = POOL + ["死亡日期", "墓地", "籍贯", "职务", "别名", "作品"]  # 12 relations → 3 chunks of 4
    skipped = [0]
    exs = list(derive_examples([REC], lambda r: pool, split_num=4, shuffle_variants=0, seed=0, max_empty_chunks=1,
                               skipped=skipped))
    full = list(derive_examples([REC], lambda r: pool, split_num=4, shuffle_variants=0, seed=0))
    assert len(full) == 3 and sum(e["positives"] == 0 for e in full) == 1  # 出生地点 in chunk 0, 配偶 in chunk 1
    assert exs == full and skipped == [0] and not any(e["capped"] for e in exs)  # one empty chunk: nothing to cap
    many = [f"r{i}" for i in range(20)]
    skipped = [0]
    exs = list(derive_examples([REC], lambda r: POOL + many, split_num=4, shuffle_variants=1, seed=0,
                               max_empty_chunks=1, skipped=skipped))
    uncapped = list(derive_examples([REC], lambda r: POOL + many, split_num=4, shuffle_variants=1, seed=0))
    assert len(exs) == len(uncapped)  # every chunk is still derived (the test split keeps them all) ...
    for v in (0, 1):
        mine = [e for e in exs if e["variant"] == v and not e["capped"]]
        assert sum(e["positives"] == 0 for e in mine) == 1  # ... one empty chunk per variant left uncapped
        assert sum(e["positives"] for e in mine) == 2  # every chunk with a gold pair uncapped
    assert all(e["positives"] == 0 for e in exs if e["capped"])
    assert skipped[0] == sum(e["capped"] for e in exs) == sum(e["positives"] == 0 for e in uncapped) - 2
    again = list(derive_examples([REC], lambda r: POOL + many, split_num=4, shuffle_variants=1, seed=0,
                                 max_empty_chunks=1))
    assert [e["capped"] for e in again] == [e["capped"] for e in exs]  # seeded: the same chunks every time


@pytest.mark.parametrize("n, size, want", [
    (8, 4, [4, 4]),  # exact
    (9, 4, [4, 5]),  # a remainder of 1 < 4 // 2 joins the last chunk
    (10, 4, [4, 4, 2]),  # a remainder of 2 = 4 // 2 is its own chunk
    (3, 4, [3]), (4, 4, [4]), (1, 4, [1]), (0, 4, []),
    (7, 3, [3, 3, 1]),  # max(1, 3 // 2) = 1: a remainder of 1 is its own chunk
    (11, 6, [6, 5]),  # a remainder of 5 >= 6 // 2 is its own chunk
    (7, -1, [7]),
])
def test_iepile_test_chunking_sorts_the_schema_and_folds_a_short_remainder(n, size, want):
    items = [f"关系{i:02d}" for i in range(n)][::-1]  # given unsorted
    chunks = iepile_chunks(items, size)
    assert [len(c) for c in chunks] == want
    assert [x for c in chunks for x in c] == sorted(items)


def test_iepile_examples_carry_the_whole_relation_list():
    exs = list(derive_iepile([REC], lambda r: POOL + ["r1"], split_num=4))
    assert [json.loads(e["instruction"])["schema"] for e in exs] == iepile_chunks(POOL + ["r1"], 4)
    assert all(sorted(map(tuple, e["record_gold"])) == [("李白", "出生地点", "碎叶城"), ("李白", "配偶", "许氏")]
               for e in exs)  # the duplicated triple once
    assert sum(e["positives"] for e in exs) == 2 and len({e["id"] for e in exs}) == len(exs)


def test_instruction_and_output_strings_are_exactly_json_dumps():
    from microlm.ie.derive import _instruction_json, _output_json

    odd = ['配"偶', "tab\there", "换行\n", "emoji 😀", "back\\slash", "\u2028sep", "控制\x01"]
    for text in odd + ["普通文本。"]:
        rels = [text, "配偶", "父母"]
        assert _instruction_json(INSTRUCTIONS["zh"], rels, text) == json.dumps(
            {"instruction": INSTRUCTIONS["zh"], "schema": rels, "input": text}, ensure_ascii=False)
        gold = {"配偶": [{"subject": text, "object": "许氏"}, {"subject": "a", "object": text}], text: []}
        assert _output_json(rels, gold) == json.dumps({r: gold.get(r, []) for r in rels}, ensure_ascii=False)
    assert _output_json([], {}) == "{}" and _instruction_json("i", [], "t") == json.dumps(
        {"instruction": "i", "schema": [], "input": "t"}, ensure_ascii=False)
