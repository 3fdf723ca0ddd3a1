"""Fault injection for pipeline B's IE part (issue 27): empty or mis-shaped IE sources, empty intermediate
files, bases whose tokenizer does not fit, damaged adapters, a full disk or a file-size limit while
``ie_lora``/``ie_merged`` write — each is one line naming the file and what to do, leaves nothing
half-written, and everything written is readable by others."""

import errno
import json
import logging
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from microlm.cli import one_line
from microlm.errors import MicroLMError
from microlm.ie.pipeline import run_step, step_render
from microlm.ie.render import TokenCounter
from microlm.io import DIR_MODE, FILE_MODE
from microlm.stages import StageRun, load_config
from microlm.stages.ie_data import pipeline

from .conftest import REPO
from .test_ie_lora import _cfg, _data, _train_run

EMBEDDED = REPO / "data" / "ie" / "embedded_zh.jsonl"


# --------------------------------------------------------------------------- ie_data: sources and steps


def _source_cfg(tmp_path, text: str | bytes, name: str = "src.jsonl", fmt: str = "instructie"):
    """A profile whose only IE source is ``ie/<name>`` under a data root in ``tmp_path``, holding ``text``."""
    root = tmp_path / "data"
    (root / "ie").mkdir(parents=True, exist_ok=True)
    shutil.copy(REPO / "data" / "ie" / "embedded_schema_zh.json", root / "ie" / "schema.json")
    src = root / "ie" / name
    src.write_bytes(text if isinstance(text, bytes) else text.encode("utf-8"))
    cfg = load_config("smoke", {"run_dir": str(tmp_path / "runs"), "data.root": str(root),
                                "ie_data.sources": {f"ie/{name}": fmt}, "ie_data.embedded": False,
                                "ie_data.schema": ["ie/schema.json"]})
    return cfg, src


def _records() -> list[str]:
    return [x.strip() for x in EMBEDDED.read_text(encoding="utf-8").splitlines() if x.strip()]


SOURCES = {
    "empty": ("", "holds no records"),
    "blank lines": ("\n\n  \n", "holds no records"),
    "one JSON array": ("[" + ",".join(_records()[:30]) + "]\n", "is one JSON array"),
    "a JSON array over many lines": ("[\n" + ",\n".join(_records()[:30]) + "\n]\n", "is one JSON array"),
}


@pytest.mark.parametrize("case", list(SOURCES))
def test_an_empty_or_json_array_ie_source_is_one_line_and_no_fresh_stage(case, tmp_path):
    from microlm.stages import ie_data

    text, needle = SOURCES[case]
    cfg, src = _source_cfg(tmp_path, text)
    out = tmp_path / "ie"
    with pytest.raises(MicroLMError, match=needle) as e:
        run_step(pipeline(cfg), 1, out)
    msg = str(e.value)
    assert str(src) in msg and "\n" not in msg and ("one JSON object per line" in msg or "ie_data.sources" in msg)
    assert not (out / "01_standardized.jsonl").exists()
    # the whole stage stops there too: no metrics, so the registry writes no manifest (never a fresh stage)
    with pytest.raises(MicroLMError, match=needle):
        ie_data.build(StageRun("ie_data", cfg, tmp_path / "stage", {"tokenizer": tmp_path / "no_tokenizer"},
                               progress=False, options={"step": None}))
    assert not list((tmp_path / "stage").glob("0*.jsonl"))


def test_a_source_of_which_no_record_is_usable_is_one_line(tmp_path):
    lines = "".join(json.dumps({"cate": "人物", "text": "李白生于碎叶城。", "relation": "not a list"}) + "\n"
                    for _ in range(5))
    cfg, src = _source_cfg(tmp_path, "{nope\n" + lines)
    with pytest.raises(MicroLMError, match="no usable record") as e:
        run_step(pipeline(cfg), 1, tmp_path / "ie")
    assert "relation_not_a_list" in str(e.value) and "malformed_json" in str(e.value)
    assert not (tmp_path / "ie" / "01_standardized.jsonl").exists()


def test_a_source_file_without_records_beside_others_is_a_warning(tmp_path, caplog):
    cfg, src = _source_cfg(tmp_path, "\n".join(_records()[:60]) + "\n")
    bad = src.with_name("bad.jsonl")
    bad.write_text('{"no": "record"}\n', encoding="utf-8")
    cfg = load_config("smoke", {"run_dir": str(tmp_path / "runs"), "data.root": str(tmp_path / "data"),
                                "ie_data.embedded": False,
                                "ie_data.schema": ["ie/schema.json"],
                                "ie_data.sources": {"ie/src.jsonl": "instructie", "ie/bad.jsonl": "instructie"}})
    with caplog.at_level(logging.WARNING, logger="microlm"):
        st = run_step(pipeline(cfg), 1, tmp_path / "ie")
    assert st["records"] == 60
    assert any(str(bad) in r.getMessage() and "no record" in r.getMessage() for r in caplog.records), caplog.text


def test_a_cut_gzip_ie_source_is_one_line(tmp_path):
    import gzip

    whole = gzip.compress(("\n".join(_records() * 20) + "\n").encode("utf-8"))  # ~2 MB unpacked
    cfg, src = _source_cfg(tmp_path, whole[: len(whole) * 9 // 10], name="src.jsonl.gz")  # cut near the end
    with pytest.raises(MicroLMError, match="cannot be read") as e:
        run_step(pipeline(cfg), 1, tmp_path / "ie")
    assert str(src) in str(e.value)
    assert not (tmp_path / "ie" / "01_standardized.jsonl").exists()


def _steps(tmp_path, upto: int, **extra):
    cfg = load_config("smoke", {"run_dir": str(tmp_path / "runs"), "data.root": None, **extra})
    out = tmp_path / "ie"
    for s in range(1, upto + 1):
        run_step(pipeline(cfg), s, out)
    return cfg, out


@pytest.mark.parametrize("step,src", [(2, "01_standardized.jsonl"), (3, "02_filtered.jsonl"),
                                      (4, "03_stratified.jsonl"), (5, "04_derived.jsonl")])
def test_an_empty_intermediate_file_is_one_line(step, src, tmp_path, monkeypatch):
    monkeypatch.delenv("MICROLM_DATA", raising=False)
    cfg, out = _steps(tmp_path, step - 1)
    (out / src).write_bytes(b"")
    with pytest.raises(MicroLMError, match="holds no records") as e:
        run_step(pipeline(cfg), step, out)
    assert str(out / src) in str(e.value) and f"--step {step - 1}" in str(e.value)


def test_a_filter_that_keeps_nothing_is_one_line_and_writes_nothing(tmp_path, monkeypatch):
    monkeypatch.delenv("MICROLM_DATA", raising=False)
    cfg, out = _steps(tmp_path, 1, **{"ie_data.min_text_chars": 500, "ie_data.max_text_chars": 512})
    with pytest.raises(MicroLMError, match="kept no record") as e:
        run_step(pipeline(cfg), 2, out)
    assert "text_too_short" in str(e.value) and "ie_data.min_text_chars" in str(e.value)
    assert not (out / "02_filtered.jsonl").exists()


def test_an_empty_split_is_a_warning_and_an_empty_train_split_an_error(tmp_path, monkeypatch, caplog, chat_tok):
    monkeypatch.delenv("MICROLM_DATA", raising=False)
    with caplog.at_level(logging.WARNING, logger="microlm"):
        cfg, out = _steps(tmp_path, 5, **{"ie_data.val_fraction": 0.0})
    assert any("05_val.jsonl" in r.getMessage() and "no example" in r.getMessage() for r in caplog.records), caplog.text
    caplog.clear()
    counters = [TokenCounter.microlm(chat_tok)]
    with caplog.at_level(logging.WARNING, logger="microlm"):
        step_render(pipeline(cfg), out, counters)
    assert any("06_val.jsonl" in r.getMessage() and "no example" in r.getMessage() for r in caplog.records), caplog.text
    (out / "05_train.jsonl").write_bytes(b"")
    (out / "06_train.jsonl").unlink()
    with pytest.raises(MicroLMError, match="holds no records") as e:
        step_render(pipeline(cfg), out, counters)
    assert str(out / "05_train.jsonl") in str(e.value)
    assert not (out / "06_train.jsonl").exists()


# --------------------------------------------------------------------------- a base and an adapter, made once


@pytest.fixture(scope="module")
def trained(tmp_path_factory, chat_tok):
    """A tiny Llama base, the IE data and one PEFT run of ie_lora on it (its folder)."""
    from microlm.model import ModelConfig, TransformerLM
    from microlm.model.hf_export import export_hf

    root = tmp_path_factory.mktemp("ie_rel")
    torch.manual_seed(0)
    model = TransformerLM(ModelConfig(vocab_size=chat_tok.vocab_size, dim=32, n_layers=2, n_heads=4, n_kv_heads=2,
                                      hidden_dim=48, max_seq_len=1024))
    base = export_hf(model, chat_tok, root / "base")
    data = _data(root)
    cfg = _cfg(root)
    _train_run(cfg, {"name": "t", "base": "x", "engine": "peft"}, str(base), data, root / "run", progress=False)
    return root, base, data, root / "run"


# --------------------------------------------------------------------------- ie_lora: bad training data


def test_ie_lora_on_an_empty_training_file_is_one_line(trained, tmp_path):
    base = trained[1]
    cfg = _cfg(tmp_path)
    data = _data(tmp_path)
    (data / "06_train.jsonl").write_bytes(b"")
    with pytest.raises(MicroLMError, match="holds no training conversation") as e:
        _train_run(cfg, {"name": "t", "base": "x", "engine": "peft"}, str(base), data, tmp_path / "o",
                   progress=False)
    assert str(data / "06_train.jsonl") in str(e.value)
    assert not (tmp_path / "o").exists()


def test_ie_lora_when_every_training_text_is_a_test_text_is_one_line(trained, tmp_path):
    base = trained[1]
    cfg = _cfg(tmp_path)
    data = _data(tmp_path)
    shutil.copy(data / "06_train.jsonl", data / "06_test.jsonl")  # decontamination drops every one
    with pytest.raises(MicroLMError, match="none is left") as e:
        _train_run(cfg, {"name": "t", "base": "x", "engine": "peft"}, str(base), data, tmp_path / "o",
                   progress=False)
    assert "ie_lora.decontaminate" in str(e.value)
    assert not (tmp_path / "o").exists()


# --------------------------------------------------------------------------- ie_lora: bases that do not fit


def _small_vocab_base(folder: Path, chat_tok, vocab: int) -> Path:
    """A Llama folder whose embeddings have ``vocab`` rows under the 420-id tokenizer."""
    from microlm.model import ModelConfig, TransformerLM
    from microlm.model.hf_export import export_llama
    from microlm.tokenizer.hf import write_hf_tokenizer

    torch.manual_seed(0)
    model = TransformerLM(ModelConfig(vocab_size=vocab, dim=32, n_layers=1, n_heads=4, n_kv_heads=2, hidden_dim=48,
                                      max_seq_len=1024))
    export_llama(model, folder, eos_id=chat_tok.special_ids["<|im_end|>"], pad_id=chat_tok.eos_id)
    write_hf_tokenizer(chat_tok, folder)
    return folder


@pytest.mark.parametrize("engine", ["peft", "microlm"])
def test_a_base_whose_tokenizer_outgrows_its_embeddings_is_one_line(engine, tmp_path, chat_tok):
    base = _small_vocab_base(tmp_path / "base", chat_tok, 300)
    cfg = _cfg(tmp_path)
    with pytest.raises(MicroLMError, match="tokenizer and weights do not belong together") as e:
        _train_run(cfg, {"name": "t", "base": "x", "engine": engine}, str(base), _data(tmp_path), tmp_path / "o",
                   progress=False)
    assert str(base) in str(e.value) and "300" in str(e.value)
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("garbage", [b"{bad", b"[1, 2]", bytes(range(256)), b'{"version": "1.0", "model": 3}'],
                         ids=["not JSON", "a list", "binary", "not a tokenizer"])
def test_a_base_with_a_garbage_tokenizer_json_is_one_line(garbage, trained, tmp_path):
    base = trained[1]
    bad = tmp_path / "bad"
    shutil.copytree(base, bad)
    (bad / "tokenizer.json").write_bytes(garbage)
    cfg = _cfg(tmp_path)
    with pytest.raises(MicroLMError) as e:
        _train_run(cfg, {"name": "t", "base": "x", "engine": "peft"}, str(bad), _data(tmp_path), tmp_path / "o",
                   progress=False)
    assert str(bad / "tokenizer.json") in str(e.value) and "\n" not in str(e.value)
    assert "hub" not in str(e.value)  # a local folder's broken file, not a download problem
    assert not (tmp_path / "o").exists()


# --------------------------------------------------------------------------- ie_merged and what both write


def test_every_file_ie_lora_and_ie_merged_write_is_readable_by_others(trained, tmp_path):
    from microlm.ie.merge import merge_adapter

    root, base, _, run = trained
    merge_adapter(str(base), run / "adapter", tmp_path / "merged", prompts=[[5, 6, 7]], max_new_tokens=4)
    for folder in (run, tmp_path / "merged"):
        paths = list(folder.rglob("*"))
        assert any(p.name == "adapter_model.safetensors" or p.name == "model.safetensors" for p in paths)
        for p in paths:
            want = DIR_MODE if p.is_dir() else FILE_MODE
            assert p.stat().st_mode & 0o777 == want, p


@pytest.mark.parametrize("cut", [lambda b: b[: len(b) // 2], lambda b: b[:5], lambda b: b""],
                         ids=["half", "5 bytes", "empty"])
def test_a_truncated_adapter_given_to_the_merge_is_one_line(cut, trained, tmp_path):
    from microlm.ie.merge import merge_adapter

    _, base, _, run = trained
    adapter = tmp_path / "adapter"
    shutil.copytree(run / "adapter", adapter)
    f = adapter / "adapter_model.safetensors"
    f.write_bytes(cut(f.read_bytes()))
    with pytest.raises(MicroLMError, match="corrupt safetensors file") as e:
        merge_adapter(str(base), adapter, tmp_path / "merged", prompts=[[5, 6, 7]], max_new_tokens=4)
    assert str(f) in str(e.value) and "ie-lora" in str(e.value)
    assert not (tmp_path / "merged").exists() and not list(tmp_path.glob(".merged.*"))


def test_a_merge_without_prompts_to_verify_on_is_one_line(trained, tmp_path):
    from microlm.ie.merge import merge_adapter

    _, base, _, run = trained
    with pytest.raises(MicroLMError, match="no evaluation prompt"):
        merge_adapter(str(base), run / "adapter", tmp_path / "merged", prompts=[], max_new_tokens=4)
    assert not (tmp_path / "merged").exists() and not list(tmp_path.glob(".merged.*"))


def _no_space(*args, **kwargs):
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))  # as a failed write() reports it: no file name


def test_a_full_disk_while_merging_names_the_file_and_leaves_no_folder(trained, tmp_path, monkeypatch):
    import transformers.modeling_utils

    from microlm.ie.merge import merge_adapter

    _, base, _, run = trained
    (tmp_path / "merged").mkdir()
    (tmp_path / "merged" / "old.txt").write_text("the previous merge")

    def half_then_full(tensors, filename, metadata=None):
        Path(filename).write_bytes(b"\0" * 100)  # a part of the file made it to the disk
        _no_space()

    monkeypatch.setattr(transformers.modeling_utils, "safe_save_file", half_then_full)
    with pytest.raises(OSError) as e:
        merge_adapter(str(base), run / "adapter", tmp_path / "merged", prompts=[[5, 6, 7]], max_new_tokens=4)
    line = one_line(e.value)
    assert str(tmp_path / "merged" / "model.safetensors") in line and "disk is full" in line and "?" not in line
    assert [p.name for p in (tmp_path / "merged").iterdir()] == ["old.txt"]
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".merged.")]


@pytest.mark.parametrize("engine", ["peft", "microlm"])
def test_a_full_disk_while_saving_the_adapter_names_the_file_and_leaves_no_adapter(engine, trained, tmp_path,
                                                                                    monkeypatch):
    import peft.peft_model
    import safetensors.torch

    _, base, data, _ = trained

    def half_then_full(tensors, filename, metadata=None):
        Path(filename).write_bytes(b"\0" * 10)
        _no_space()

    if engine == "peft":
        monkeypatch.setattr(peft.peft_model, "safe_save_file", half_then_full)
    else:  # the from-scratch engine's save_adapter; its checkpoints (trainable only) keep the real writer
        real = safetensors.torch.save_file
        monkeypatch.setattr(safetensors.torch, "save_file", lambda t, filename, metadata=None: (
            half_then_full(t, filename) if filename.endswith("adapter_model.safetensors")
            else real(t, filename, metadata=metadata)))
    out = tmp_path / "o"
    with pytest.raises(OSError) as e:
        _train_run(_cfg(tmp_path), {"name": "t", "base": "x", "engine": engine}, str(base), data, out,
                   progress=False)
    line = one_line(e.value)
    assert str(out / "adapter" / "adapter_model.safetensors") in line and "disk is full" in line
    assert not (out / "adapter").exists() and not list(out.glob(".adapter.*")) and not (out / "report.json").exists()


# --------------------------------------------------------------------------- a file-size limit, in a process


SIZE_LIMITED = """
import json, resource, signal, sys
from pathlib import Path
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
from microlm.cli import one_line
from microlm.errors import MicroLMError
what, base, src, out, limit = sys.argv[1:6]
resource.setrlimit(resource.RLIMIT_FSIZE, (int(limit), int(limit)))
try:
    if what == "merge":
        from microlm.ie.merge import merge_adapter
        merge_adapter(base, Path(src), Path(out), prompts=[[5, 6, 7]], max_new_tokens=4)
    else:
        from microlm.ie.train_lora import train_ie_lora
        from microlm.stages import load_config
        cfg = load_config("smoke", json.loads(sys.argv[6]))
        train_ie_lora(cfg.ie_lora, {"name": "t", "base": "x", "engine": what}, base, Path(src), Path(out),
                      seed=cfg.seed, progress=False)
except (MicroLMError, OSError) as e:
    print("error: " + one_line(e), file=sys.stderr)
    sys.exit(2)
"""


def _size_limited(*args) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", SIZE_LIMITED, *map(str, args)], capture_output=True, text=True,
                          cwd=REPO, env={**os.environ, "OMP_NUM_THREADS": "1"}, timeout=600)


def _one_line(r: subprocess.CompletedProcess, *needles: str) -> str:
    assert r.returncode == 2 and "Traceback" not in r.stderr, (r.returncode, r.stderr[-3000:])
    err = [ln for ln in r.stderr.splitlines() if ln.startswith("error: ")]
    assert len(err) == 1, r.stderr[-3000:]
    for n in needles:
        assert n in err[0], err[0]
    assert ": ? " not in err[0] and not err[0].endswith("?"), err[0]
    return err[0]


def test_a_merge_under_a_file_size_limit_is_one_line_and_leaves_no_folder(trained, tmp_path):
    _, base, _, run = trained
    # the merged weights (~150 KiB) outgrow 64 KiB
    line = _one_line(_size_limited("merge", base, run / "adapter", tmp_path / "merged", 64 << 10), "size limit")
    assert str(tmp_path / "merged" / "model.safetensors") in line  # where it would be, not the staging folder's
    assert not (tmp_path / "merged").exists() and not list(tmp_path.glob(".merged.*"))


@pytest.mark.parametrize("engine", ["peft", "microlm"])
def test_ie_lora_under_a_file_size_limit_is_one_line_and_leaves_no_adapter(engine, trained, tmp_path):
    root, base, data, _ = trained
    sets = {"run_dir": str(tmp_path / "runs"), "ie_lora.r": 4, "ie_lora.alpha": 8.0, "ie_lora.train.batch_size": 4,
            "ie_lora.train.max_steps": 2, "ie_lora.train.ckpt_interval": 100, "ie_lora.train.eval_interval": 100,
            "ie_lora.val_examples": 4}
    out = tmp_path / "o"
    # the checkpoint (its optimizer state ~60 KiB) is the largest file a tiny run writes
    line = _one_line(_size_limited(engine, base, data, out, 16 << 10, json.dumps(sets)), "size limit")
    assert str(out / "ckpt") in line, line
    assert not list(out.rglob(".*.tmp-*")) and not (out / "report.json").exists()
    assert not (out / "adapter").exists() and not list(out.glob(".adapter.*"))
