"""Derived tasks (People's Daily 1998 tags): gold answers, the paragraph hold-out, metrics, baselines."""

import json

import pytest

from microlm import stages
from microlm.data import tasks
from microlm.data.sources import embedded_sources, iter_lines, parse_line
from microlm.errors import MicroLMError
from microlm.stages import load_config


def test_entities_from_tags_merge_person_parts_and_keep_order():
    words = tasks._parse("１２月/t  ３１日/t  ，/w  中共中央/nt  总书记/n  江/nr  泽民/nr  在/p  北京/ns  、/w  "
                         "上海/ns  和/c  北京/ns  会见/v  兰/nr  红光/nr  。/w")
    assert tasks._entities(words, "nr") == ("江泽民", "兰红光")
    assert tasks._entities(words, "ns") == ("北京", "上海")  # distinct, first appearance first
    assert tasks._entities(words, "nt") == ("中共中央",)
    assert tasks._entities(words, "nz") == ()


def test_examples_are_exact_and_heldout_paragraphs_never_train():
    train = tasks.task_examples("places", "train", 400, seed=1)
    held = tasks.task_examples("places", "heldout", 100, seed=1)
    assert len(train) == 400 and len(held) == 100
    assert {r["text"] for r in train}.isdisjoint(r["text"] for r in held)
    held_set = {s.text for s in tasks.tagged_sentences() if s.heldout}
    assert not any(r["text"] in held_set for r in train)
    for r in train + held:
        assert all(e in r["text"] for e in r["gold"])  # every gold entity is in its sentence
        assert r["conversations"][1]["content"] == ("、".join(r["gold"]) or "无")
        assert r["text"] in r["conversations"][0]["content"] and "地名" in r["conversations"][0]["content"]
    assert sum(not r["gold"] for r in held) == 20  # 20 % answer 无
    assert tasks.task_examples("places", "heldout", 100, seed=1) == held  # deterministic
    with pytest.raises(MicroLMError, match="unknown task"):
        tasks.task_examples("dates", "train", 5, seed=1)


def test_corpus_stage_leaves_the_heldout_paragraphs_out(tmp_path, monkeypatch):
    monkeypatch.delenv("MICROLM_DATA", raising=False)
    keys = tasks.heldout_paragraph_keys()
    assert 500 < len(keys) < 2000  # one paragraph in 20 of 19,484
    pku = next(s for s in embedded_sources() if s.format == "pku")
    lines = [parse_line("pku", raw) for _, raw in iter_lines(pku, 1 << 20)]
    lines = [x for x in lines if x][:3000]
    held = [x for x in lines if x in keys]
    assert held, "the first 3,000 paragraphs hold some held-out ones"
    cfg = load_config("smoke", {"run_dir": str(tmp_path), "corpus.workers": 0})
    out = stages.build("corpus", cfg, progress=False)
    rep = json.loads((out / "report.json").read_text(encoding="utf-8"))
    assert rep["drops"]["heldout_task"] == len(held)
    kept = [json.loads(x)["text"] for split in ("train", "val")
            for x in (out / f"{split}.jsonl").read_text(encoding="utf-8").splitlines()]
    assert not any(k.removesuffix(cfg.corpus.eos) in keys for k in kept)


def test_parse_entities_and_scores():
    assert tasks.parse_entities("北京、上海，北京") == ["北京", "上海"]
    assert tasks.parse_entities("无") == [] and tasks.parse_entities("  ") == []
    assert tasks.parse_entities("“新华社”。") == ["新华社"]
    s = tasks.entity_scores([["北京", "上海"], [], ["广州"]], [["北京"], [], ["深圳"]])
    assert s["exact_match"] == pytest.approx(1 / 3)
    assert s["precision"] == pytest.approx(1 / 3) and s["recall"] == pytest.approx(1 / 2)
    assert s["f1"] == pytest.approx(2 * (1 / 3) * (1 / 2) / (1 / 3 + 1 / 2))
    assert tasks.entity_scores([[]], [[]])["f1"] == 0.0 and tasks.entity_scores([[]], [[]])["exact_match"] == 1.0


def test_baselines_empty_and_lookup():
    train = [{"text": "北京和上海", "gold": ["北京", "上海"]}, {"text": "北京市政府", "gold": ["北京市"]}]
    held = [{"text": "他从北京市来到上海。", "gold": ["北京市", "上海"]}, {"text": "广州很热", "gold": ["广州"]}]
    b = tasks.baseline_answers(train, held)
    assert b["empty"] == [[], []]
    assert b["lookup"] == [["北京市", "上海"], []]  # longest match first, no overlapping 北京
