"""Token files (A4): layout, determinism across workers, malformed records, the window sampler, stages."""

import json
import subprocess
import sys

import numpy as np
import pytest

from microlm import stages
from microlm.errors import MicroLMError
from microlm.stages import read_manifest
from microlm.tokenizer import Tokenizer, train_bpe
from microlm.tokenizer.memmap import TokenWindows, open_tokens, read_index, write_token_file

from .conftest import REPO, ZH, write_jsonl

SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("tok")
    train = d / "train.txt"
    train.write_text("<|endoftext|>".join(ZH * 20), encoding="utf-8")
    vocab, merges = train_bpe(train, 400, SPECIALS, workers=1)
    Tokenizer(vocab, merges, SPECIALS).save(d)
    return d


def docs(n=500):
    return [f"{ZH[i % len(ZH)]} 第{i}篇。" + ("<|endoftext|>" if i % 2 else "") for i in range(n)]


def test_token_file_layout_and_one_eos_per_document(tmp_path, tok_dir):
    tok = Tokenizer.load(tok_dir)
    texts = docs(50) + ["含有<|im_start|>的文本"]
    src = write_jsonl(tmp_path / "c.jsonl", texts)
    stats = write_token_file(src, tok_dir, tmp_path / "train.bin", workers=1, batch_docs=7)
    data = np.fromfile(tmp_path / "train.bin", dtype=np.uint16)
    idx = read_index(tmp_path / "train.bin")
    assert stats == {"docs": 51, "tokens": len(data), "malformed": 0}
    assert idx[0] == 0 and idx[-1] == len(data) and len(idx) == 52
    for k, t in enumerate(texts):
        body = t.removesuffix("<|endoftext|>")
        doc = data[idx[k]:idx[k + 1]].tolist()
        assert doc == tok.encode_ordinary(body) + [tok.eos_id]
        assert doc.count(tok.eos_id) == 1
    last = data[idx[-2]:idx[-1]].tolist()
    assert tok.special_ids["<|im_start|>"] not in last  # special text inside a document stays text


def test_parallel_output_is_byte_identical(tmp_path, tok_dir):
    src = write_jsonl(tmp_path / "c.jsonl", docs(700))
    write_token_file(src, tok_dir, tmp_path / "a.bin", workers=1, batch_docs=64)
    write_token_file(src, tok_dir, tmp_path / "b.bin", workers=2, batch_docs=13)
    assert (tmp_path / "a.bin").read_bytes() == (tmp_path / "b.bin").read_bytes()
    assert (tmp_path / "a.idx").read_bytes() == (tmp_path / "b.idx").read_bytes()


def test_malformed_records_are_counted(tmp_path, tok_dir):
    src = tmp_path / "c.jsonl"
    src.write_text('{"text": "好的"}\nnot json\n{"title": "x"}\n{"text": 5}\n\n{"text": "再见"}\n', encoding="utf-8")
    stats = write_token_file(src, tok_dir, tmp_path / "t.bin", workers=1)
    assert stats["docs"] == 2 and stats["malformed"] == 3


def test_missing_input_is_a_clear_error(tmp_path, tok_dir):
    with pytest.raises(MicroLMError, match="not found"):
        write_token_file(tmp_path / "nope.jsonl", tok_dir, tmp_path / "t.bin")
    with pytest.raises(MicroLMError, match="token file not found"):
        open_tokens(tmp_path / "nope.bin")


def test_windows_are_shifted_by_one_and_deterministic(tmp_path):
    arr = np.arange(1000, dtype=np.uint16)
    arr.tofile(tmp_path / "t.bin")
    w = TokenWindows(tmp_path / "t.bin", block_size=16, seed=3)
    x, y = w.batch(32)
    assert x.shape == y.shape == (32, 16) and x.dtype == np.int64
    assert np.array_equal(x[:, 1:], y[:, :-1])
    assert np.array_equal(y, x + 1)  # consecutive ids: y is the next token of x
    assert x.min() >= 0 and y.max() <= 999
    x2, _ = TokenWindows(tmp_path / "t.bin", block_size=16, seed=3).batch(32)
    assert np.array_equal(x, x2)
    xt, yt = w.torch_batch(4)
    assert tuple(xt.shape) == (4, 16) and bool((yt - xt == 1).all())
    with pytest.raises(MicroLMError, match="fewer than block_size"):
        TokenWindows(tmp_path / "t.bin", block_size=1000)


def test_windows_cover_the_whole_file(tmp_path):
    arr = np.arange(200, dtype=np.uint16)
    arr.tofile(tmp_path / "t.bin")
    w = TokenWindows(tmp_path / "t.bin", block_size=8, seed=0)
    seen = set()
    for _ in range(50):
        x, y = w.batch(16)
        seen.update(x[:, 0].tolist())
    assert min(seen) == 0 and max(seen) == 200 - 8 - 1  # first and last possible start


def test_tokens_stage_builds_skips_and_refuses_wide_vocab(tmp_path, tmp_cfg):
    src = write_jsonl(tmp_path / "in.jsonl", [f"{ZH[i % len(ZH)]}这是第{i}个不同的句子，编号{i * 7}。" for i in range(400)])
    cfg = tmp_cfg(**{"tokenizer.vocab_size": 500, "tokenizer.compare_hf": False, "tokenizer.workers": 1,
                     "tokens.workers": 2})
    stages.build("corpus", cfg, input=[str(src)], progress=False)
    out = stages.build("tokens", cfg, progress=False)
    meta = json.loads((out / "meta.json").read_text())
    m = read_manifest(out)
    assert m["stage"] == "tokens" and meta["vocab_size"] == 500 and meta["dtype"] == "uint16"
    n_train = sum(1 for _ in open(cfg.run_path / "corpus" / "train.jsonl"))
    assert meta["splits"]["train"]["docs"] == n_train
    assert len(open_tokens(out / "train.bin")) == meta["splits"]["train"]["tokens"]
    rep = json.loads((cfg.run_path / "tokenizer" / "report.json").read_text())
    assert rep["hf_ids_equal_on_val_sample"] is True and rep["special_ids"]["<|im_end|>"] == 2
    # unchanged → skipped (the folder is not rewritten)
    mtime = (out / "train.bin").stat().st_mtime_ns
    stages.build("tokens", cfg, progress=False)
    assert (out / "train.bin").stat().st_mtime_ns == mtime
    # a tokenizer whose ids do not fit uint16 is refused
    big = tmp_path / "big"
    tok = Tokenizer.load(cfg.run_path / "tokenizer")
    vocab = dict(tok.vocab)
    vocab[70000] = b"\xe5\xa4\xa7\xe8\xaf\x8d"
    Tokenizer(vocab, tok.merges, SPECIALS, pattern=tok.pattern).save(big)
    from microlm.tokenizer.training import tokenize_corpus

    with pytest.raises(MicroLMError, match="does not fit uint16"):
        tokenize_corpus(cfg.run_path / "corpus", big, tmp_path / "tokens2", workers=cfg.tokens.workers,
                        batch_docs=cfg.tokens.batch_docs, progress=False)


def test_cli_train_tokenizer_and_tokenize(tmp_path):
    src = write_jsonl(tmp_path / "in.jsonl", [f"{ZH[i % len(ZH)]}句子{i}。" for i in range(200)])
    common = ["-p", "smoke", "-q", "--set", f"run_dir={tmp_path / 'runs'}", "--set", "corpus.workers=0",
              "--set", "tokenizer.vocab_size=450", "--set", "tokenizer.compare_hf=false"]
    r = subprocess.run([sys.executable, "-m", "microlm.cli", "prepare-pretrain", *common, "--input", str(src)],
                       capture_output=True, text=True, cwd=REPO)
    assert r.returncode == 0, r.stderr
    r = subprocess.run([sys.executable, "-m", "microlm.cli", "train-tokenizer", *common],
                       capture_output=True, text=True, cwd=REPO)
    assert r.returncode == 0, r.stderr
    assert "vocab 450" in r.stdout and "microlm" in r.stdout
    r = subprocess.run([sys.executable, "-m", "microlm.cli", "tokenize", *common], capture_output=True, text=True,
                       cwd=REPO)
    assert r.returncode == 0, r.stderr
    assert "tokens/s" in r.stdout and (tmp_path / "runs" / "tokens" / "train.bin").is_file()
    r = subprocess.run([sys.executable, "-m", "microlm.cli", "train-tokenizer", *common[:-4],
                        "--set", "tokenizer.vocab_size=100000"], capture_output=True, text=True, cwd=REPO)
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and "65536" in r.stderr
