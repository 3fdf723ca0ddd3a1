"""Training the tokenizer on a corpus folder (the ``tokenizer`` stage, A3: its compression beside the
baselines) and encoding the corpus into token files (the ``tokens`` stage, A4), with their reports."""

from __future__ import annotations

import gzip
import json
import resource
import time
from collections.abc import Callable, Iterable
from pathlib import Path

import regex
from tokenizers import Tokenizer as HFTokenizer

from microlm.errors import MicroLMError
from microlm.io import staged_dir, write_json
from microlm.tokenizer.bpe import resolve_pattern, train_bpe
from microlm.tokenizer.memmap import DTYPE, check_vocab_fits, write_token_file
from microlm.tokenizer.tokenizer import Tokenizer, token_text

__all__ = ["train_tokenizer", "tokenize_corpus", "compression", "read_texts", "qwen_tokenizer_path",
           "hf_bpe_baseline"]

_HAN = regex.compile(r"\p{Han}")


def read_texts(jsonl: str | Path, limit: int | None = None) -> list[str]:
    """The ``text`` of each record of a corpus split."""
    out = []
    with open(jsonl, encoding="utf-8") as f:
        for line in f:
            if line.strip():
                out.append(json.loads(line)["text"])
                if limit is not None and len(out) >= limit:
                    break
    return out


def compression(encode_batch: Callable[[list[str]], list[list[int]]], docs: list[str]) -> dict:
    """Bytes, characters and Chinese characters per token of ``docs`` under a tokenizer."""
    t0 = time.perf_counter()
    n_tok = sum(len(ids) for ids in encode_batch(docs))
    dt = time.perf_counter() - t0
    n_bytes = sum(len(d.encode("utf-8")) for d in docs)
    n_chars = sum(len(d) for d in docs)
    n_han = sum(len(_HAN.findall(d)) for d in docs)
    return {"tokens": n_tok, "bytes_per_token": round(n_bytes / max(n_tok, 1), 4),
            "chars_per_token": round(n_chars / max(n_tok, 1), 4),
            "han_per_token": round(n_han / max(n_tok, 1), 4), "encode_s": round(dt, 3)}


def qwen_tokenizer_path(root: Path | None) -> Path | None:
    """``<data root>/tokenizers/qwen2.5/tokenizer.json(.gz)`` when real data is there (``root``: the data
    bundle's folder, ``None`` without one)."""
    if root is None:
        return None
    for name in ("tokenizer.json", "tokenizer.json.gz"):
        p = root / "tokenizers" / "qwen2.5" / name
        if p.is_file():
            return p
    return None


def load_hf_tokenizer(path: Path):
    if path.suffix == ".gz":
        return HFTokenizer.from_str(gzip.open(path, "rt", encoding="utf-8").read())
    return HFTokenizer.from_file(str(path))


def hf_bpe_baseline(files: Iterable[str | Path], vocab_size: int, special_tokens: list[str],
                    pattern: str | None = None):
    """MiniMind's recipe: HF ``tokenizers`` BPE with a ByteLevel pre-tokenizer (GPT-2 regex), or our
    ``pattern`` via ``Split`` + ``ByteLevel(use_regex=False)`` to compare like with like."""
    from tokenizers import Regex, Tokenizer, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    if pattern is None:
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    else:
        tok.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(pattern), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=list(special_tokens), show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train([str(f) for f in files], trainer)
    return tok


def _jsonl_to_text(jsonl: Path, out_txt: Path) -> None:
    with open(jsonl, encoding="utf-8") as f, open(out_txt, "w", encoding="utf-8") as o:
        for line in f:
            if line.strip():
                o.write(json.loads(line)["text"])
                o.write("\n")


def train_tokenizer(tc, corpus_dir: Path, out_dir: Path, *, qwen_tokenizer: Path | None = None,
                    progress: bool = True) -> dict:
    """Train the MicroLM tokenizer (settings ``tc``: the ``tokenizer`` section) on ``corpus/train.jsonl``;
    write it (ours + HF files) and ``report.json`` with compression on ``corpus/val.jsonl`` beside the
    baselines (and Qwen2.5's tokenizer, given its ``tokenizer.json``)."""
    train_path, val_path = corpus_dir / "train.jsonl", corpus_dir / "val.jsonl"
    for p in (train_path, val_path):
        if not p.is_file():
            raise MicroLMError(f"corpus split missing: {p} (run `microlm corpus`)")
    with staged_dir(out_dir) as tmp:
        t0 = time.time()
        vocab, merges = train_bpe(train_path, tc.vocab_size, tc.special_tokens, pattern=tc.pattern,
                                  workers=tc.workers, progress=progress)
        train_s = time.time() - t0
        tok = Tokenizer(vocab, merges, tc.special_tokens, pattern=tc.pattern)
        tok.save(tmp)
        if [tok.special_ids[s] for s in tc.special_tokens] != list(range(len(tc.special_tokens))):
            raise MicroLMError("special tokens did not get ids 0..n-1")
        val_docs = read_texts(val_path)
        table = {"microlm": compression(lambda ds: [tok.encode(d) for d in ds], val_docs)}
        table["microlm"]["train_s"] = round(train_s, 2)
        exported = load_hf_tokenizer(tmp / "tokenizer.json")
        sample = val_docs[:2000]
        hf_ids_equal = all(e.ids == tok.encode(d)
                           for e, d in zip(exported.encode_batch(sample, add_special_tokens=False), sample,
                                           strict=True))
        if not hf_ids_equal:
            raise MicroLMError("exported tokenizer.json does not reproduce our ids (bug)")
        if tc.compare_hf:
            txt = tmp / ".train.txt"
            _jsonl_to_text(train_path, txt)
            t0 = time.time()
            base = hf_bpe_baseline([txt], tc.vocab_size, tc.special_tokens)
            base_s = time.time() - t0
            txt.unlink()
            table["hf_bpe_gpt2_6400"] = compression(lambda ds: [e.ids for e in base.encode_batch(ds)], val_docs)
            table["hf_bpe_gpt2_6400"]["train_s"] = round(base_s, 2)
        if qwen_tokenizer is not None:
            q = load_hf_tokenizer(qwen_tokenizer)
            table["qwen2.5"] = compression(lambda ds: [e.ids for e in q.encode_batch(ds)], val_docs)
            table["qwen2.5"]["vocab_size"] = q.get_vocab_size()
        longest = sorted((b for i, b in vocab.items() if i >= len(tc.special_tokens) + 256), key=len, reverse=True)
        report = {
            "vocab_size": tok.vocab_size,
            "merges": len(merges),
            "pattern": resolve_pattern(tc.pattern),
            "special_ids": tok.special_ids,
            "train_bytes": train_path.stat().st_size,
            "train_s": round(train_s, 2),
            "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
            "val_docs": len(val_docs),
            "compression": table,
            "hf_ids_equal_on_val_sample": hf_ids_equal,
            "first_merges": [[token_text(a), token_text(b), token_text(a + b)] for a, b in merges[:20]],
            "longest_tokens": [token_text(b) for b in longest[:20]],
        }
        write_json(tmp / "report.json", report)
    return report


def tokenize_corpus(corpus_dir: Path, tok_dir: Path, out_dir: Path, *, workers: int = 1, batch_docs: int = 256,
                    progress: bool = True) -> dict:
    """Encode both corpus splits into ``{train,val}.bin`` + ``.idx``; write ``meta.json``."""
    tok = Tokenizer.load(tok_dir)
    check_vocab_fits(tok.vocab_size)
    if tok.eos_id is None:
        raise MicroLMError(f"tokenizer in {tok_dir} has no <|endoftext|> token")
    with staged_dir(out_dir) as tmp:
        t0 = time.time()
        splits = {}
        for split in ("train", "val"):
            splits[split] = write_token_file(corpus_dir / f"{split}.jsonl", tok_dir, tmp / f"{split}.bin",
                                             workers=workers, batch_docs=batch_docs,
                                             progress=progress)
        dt = time.time() - t0
        total = sum(s["tokens"] for s in splits.values())
        meta = {
            "dtype": str(DTYPE.__name__),
            "vocab_size": tok.vocab_size,
            "eos_id": tok.eos_id,
            "splits": splits,
            "tokens_total": total,
            "seconds": round(dt, 2),
            "tokens_per_s": round(total / max(dt, 1e-9)),
            "workers": workers,
        }
        write_json(tmp / "meta.json", meta)
    return meta


