"""Raw records → a clean, deduplicated, split pretraining corpus (what the ``corpus`` stage, A1–A2, runs).

Streaming and bounded in memory: lines are read in batches, cleaned and signed by worker processes
(order preserved), and the main process keeps only the dedup index — fixed-size numbers per kept
document — while writing ``corpus/{train,val}.jsonl`` (MiniMind ``{"text"}``, each document ending
in the EOS marker) and ``report.json`` (counts in and out, drops by reason, duplicate clusters,
length histograms, throughput, memory).
"""

from __future__ import annotations

import collections
import json
import multiprocessing as mp
import os
import resource
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import xxhash
from tqdm.auto import tqdm  # widgets in a Jupyter kernel, text in a terminal

from microlm.data import clean
from microlm.data.dedup import Deduplicator, MinHasher
from microlm.data.sources import Drop, Source, iter_lines, parse_line
from microlm.data.tasks import heldout_paragraph_keys
from microlm.errors import MicroLMError
from microlm.io import staged_dir, write_json

STAGE = "corpus"
# character-length histogram edges (the last bin is open-ended)
LENGTH_EDGES = [0, 10, 20, 50, 100, 200, 500, 1000, 2000, 5000, 10000, 20000, 50000, 100000]
EXAMPLES_PER_REASON = 5
SNIPPET = 240
SPLIT_BUCKETS = 1_000_000


def split_of(key_hash: int, val_fraction: float) -> str:
    """Deterministic split from a document hash: re-runs and added data never move a document."""
    return "val" if (key_hash % SPLIT_BUCKETS) < round(val_fraction * SPLIT_BUCKETS) else "train"


def exact_hash(text: str) -> tuple[int, int]:
    """``(dedup hash, split hash)`` of the normalized dedup key (two independent 64-bit hashes)."""
    key = clean.dedup_key(text).encode("utf-8")
    return xxhash.xxh3_64_intdigest(key), xxhash.xxh3_64_intdigest(key, seed=0x5EED)


# ---------------------------------------------------------------------------------------------
# worker side: parse → normalize → quality rules → hashes → MinHash signatures
# ---------------------------------------------------------------------------------------------
@dataclass
class BatchResult:
    n_records: int = 0
    drops: list[tuple[str, int, int, str]] = field(default_factory=list)  # reason, source, line, snippet
    raw_lengths: list[int] = field(default_factory=list)
    texts: list[str] = field(default_factory=list)
    where: list[tuple[int, int]] = field(default_factory=list)  # (source index, line number)
    changed: int = 0  # survivors whose text the normalizer rewrote
    exact: np.ndarray | None = None
    split: np.ndarray | None = None
    sigs: np.ndarray | None = None


_W: dict = {}


def _init_worker(c, seed: int) -> None:
    d = c.dedup
    _W["cfg"] = c
    _W["rules"] = clean.QualityRules(c.min_chars, c.max_chars, c.min_cjk_ratio, c.max_dup_line_ratio,
                                     c.max_dup_ngram_ratio, d.shingle_size)
    _W["near"] = d.near
    _W["hasher"] = MinHasher(d.num_perm, d.shingle_size, seed=seed)
    _W["heldout"] = heldout_paragraph_keys() if c.exclude_heldout_tasks else frozenset()


def process_batch(batch: tuple[str, int, list[tuple[int, bytes | None]]]) -> BatchResult:
    fmt, src_idx, lines = batch
    cfg = _W["cfg"]  # the corpus section
    rules = _W["rules"]
    res = BatchResult()
    for line_no, raw in lines:
        if raw is None:
            res.n_records += 1
            res.drops.append(("line_too_long", src_idx, line_no, ""))
            continue
        try:
            text = parse_line(fmt, raw)
        except Drop as d:
            res.n_records += 1
            res.drops.append((d.reason, src_idx, line_no, raw[:SNIPPET].decode("utf-8", "replace")))
            continue
        if text is None:  # blank line: not a record
            continue
        res.n_records += 1
        res.raw_lengths.append(len(text))
        if text in _W["heldout"]:  # its sentences evaluate the SFT/LoRA tasks (microlm/data/tasks.py)
            res.drops.append(("heldout_task", src_idx, line_no, text[:SNIPPET]))
            continue
        if len(text) > 4 * cfg.max_chars:  # cannot shrink below max_chars by cleaning: skip the work
            res.drops.append(("too_long", src_idx, line_no, text[:SNIPPET]))
            continue
        norm = clean.normalize(text, markup=cfg.strip_markup)
        reason = clean.quality_reason(norm, rules)
        if reason is not None:
            res.drops.append((reason, src_idx, line_no, (norm or text)[:SNIPPET]))
            continue
        res.changed += norm != text
        res.texts.append(norm)
        res.where.append((src_idx, line_no))
    hashes = [exact_hash(t) for t in res.texts]
    res.exact = np.array([h[0] for h in hashes], dtype=np.uint64)
    res.split = np.array([h[1] for h in hashes], dtype=np.uint64)
    if _W["near"] and res.texts:
        res.sigs = _W["hasher"].signatures(res.texts)
    return res


# ---------------------------------------------------------------------------------------------
# main side: read → (pool) → dedup → split → write
# ---------------------------------------------------------------------------------------------
def _batches(sources: list[Source], c, limit: int | None) -> Iterator[tuple[str, int, list]]:
    """Raw-line batches of the corpus section ``c``'s size; stops after ``limit`` non-blank lines."""
    size = c.batch_size
    seen = 0
    for si, src in enumerate(sources):
        buf: list[tuple[int, bytes | None]] = []
        for line_no, raw in iter_lines(src, c.max_line_bytes):
            if raw is not None and not raw.strip():
                continue
            buf.append((line_no, raw))
            seen += 1
            if len(buf) >= size:
                yield src.format, si, buf
                buf = []
            if limit is not None and seen >= limit:
                break
        if buf:
            yield src.format, si, buf
        if limit is not None and seen >= limit:
            return


def _hist(lengths: np.ndarray) -> list[int]:
    edges = np.array(LENGTH_EDGES[1:])
    idx = np.searchsorted(edges, lengths, side="right")
    return np.bincount(idx, minlength=len(LENGTH_EDGES)).tolist()


def _rss_mb(who=resource.RUSAGE_SELF) -> float:
    return resource.getrusage(who).ru_maxrss / 1024.0


def prepare_pretrain(c, out_dir: str | os.PathLike, sources: list[Source], *, seed: int,
                     max_records: int | None = None, profile: str | None = None, progress: bool = True) -> dict:
    """Clean, dedup and split ``sources`` with the corpus settings ``c`` (the ``corpus`` section) into
    ``out_dir`` (replaced atomically at the end); return the report."""
    with staged_dir(Path(out_dir)) as tmp_dir:  # a failure or kill leaves no half-written folder behind
        return _write_corpus(c, sources, tmp_dir, progress, seed=seed, max_records=max_records, profile=profile)


def _write_corpus(c, sources: list[Source], tmp_dir: Path, progress: bool, *, seed: int, max_records: int | None,
                  profile: str | None) -> dict:

    dd = c.dedup
    dedup = Deduplicator(exact=dd.exact, near=dd.near, threshold=dd.threshold, num_perm=dd.num_perm,
                         bands=dd.bands, verify=dd.verify, seed=seed)
    init_args = (c, seed)
    t0 = time.perf_counter()
    counts: collections.Counter[str] = collections.Counter()
    per_source = [collections.Counter() for _ in sources]
    examples: dict[str, list[dict]] = collections.defaultdict(list)
    near_pairs: list[dict] = []
    cluster_size: collections.Counter[int] = collections.Counter()  # kept id -> duplicates dropped
    raw_hist = np.zeros(len(LENGTH_EDGES), dtype=np.int64)
    kept_hist = np.zeros(len(LENGTH_EDGES), dtype=np.int64)
    kept_chars = {"train": 0, "val": 0}
    kept_pos: list[tuple[str, int]] = []  # kept id -> (split, line in split), for example read-back
    n_in = changed = 0
    bytes_in = 0
    eos = c.eos

    pool = None
    if c.workers > 0:
        ctx = mp.get_context("fork" if hasattr(os, "fork") else "spawn")
        pool = ctx.Pool(c.workers, initializer=_init_worker, initargs=init_args)
        results = pool.imap(process_batch, _batches(sources, c, max_records), chunksize=1)
    else:
        _init_worker(*init_args)
        results = map(process_batch, _batches(sources, c, max_records))

    bar = tqdm(desc="corpus", unit="rec", disable=not progress, mininterval=1.0, smoothing=0.1)
    try:
        with open(tmp_dir / "train.jsonl", "w", encoding="utf-8") as f_train, \
             open(tmp_dir / "val.jsonl", "w", encoding="utf-8") as f_val:
            files = {"train": f_train, "val": f_val}
            lines_out = {"train": 0, "val": 0}
            for res in results:
                n_in += res.n_records
                bar.update(res.n_records)
                raw_hist += _hist(np.asarray(res.raw_lengths, dtype=np.int64))
                bytes_in += sum(res.raw_lengths)
                changed += res.changed
                for reason, si, line_no, snippet in res.drops:
                    counts[reason] += 1
                    per_source[si][reason] += 1
                    if len(examples[reason]) < EXAMPLES_PER_REASON:
                        examples[reason].append({"source": sources[si].name, "line": line_no, "text": snippet})
                if not res.texts:
                    continue
                dec = dedup.process(res.exact, res.sigs)
                kept_lengths = []
                for i, text in enumerate(res.texts):
                    si, line_no = res.where[i]
                    if not dec.keep[i]:
                        reason = dec.reason[i]
                        counts[reason] += 1
                        per_source[si][reason] += 1
                        m = int(dec.match[i])
                        cluster_size[m] += 1
                        if len(examples[reason]) < EXAMPLES_PER_REASON:
                            examples[reason].append({"source": sources[si].name, "line": line_no,
                                                     "text": text[:SNIPPET]})
                        if reason == "near_duplicate" and len(near_pairs) < 50:
                            near_pairs.append({"kept_id": m, "similarity": round(float(dec.similarity[i]), 4),
                                               "source": sources[si].name, "line": line_no, "dropped": text[:SNIPPET]})
                        continue
                    split = split_of(int(res.split[i]), c.val_fraction)
                    files[split].write(json.dumps({"text": text + eos}, ensure_ascii=False) + "\n")
                    kept_pos.append((split, lines_out[split]))
                    lines_out[split] += 1
                    kept_chars[split] += len(text)
                    kept_lengths.append(len(text))
                    per_source[si]["kept"] += 1
                kept_hist += _hist(np.asarray(kept_lengths, dtype=np.int64))
    finally:
        bar.close()
        if pool is not None:
            pool.terminate()
            pool.join()
    elapsed = time.perf_counter() - t0

    if n_in == 0:
        raise MicroLMError(f"no records in the inputs ({', '.join(s.path for s in sources)})")
    n_out = lines_out["train"] + lines_out["val"]
    if n_out == 0:
        top = ", ".join(f"{k}={v}" for k, v in counts.most_common(3))
        raise MicroLMError(f"no document survived cleaning and dedup ({n_in} records in; drops: {top})")

    # read back the kept side of a few near-duplicate pairs for the report (and the notebook)
    wanted = {p["kept_id"]: kept_pos[p["kept_id"]] for p in near_pairs[:20]}
    kept_text = _read_lines(tmp_dir, wanted)
    for p in near_pairs:
        p["kept"] = kept_text.get(p["kept_id"], "")[:SNIPPET]

    sizes = collections.Counter(cluster_size.values())
    report = {
        "stage": STAGE,
        "profile": profile,
        "inputs": [{"name": s.name, "path": s.path, "format": s.format, "records": sum(pc.values()),
                    "kept": pc.get("kept", 0), "drops": {k: v for k, v in pc.items() if k != "kept"}}
                   for s, pc in zip(sources, per_source, strict=True)],
        "records_in": n_in,
        "records_out": n_out,
        "train_docs": lines_out["train"],
        "val_docs": lines_out["val"],
        "train_chars": kept_chars["train"],
        "val_chars": kept_chars["val"],
        "rewritten_by_normalizer": changed,
        "drops": dict(counts.most_common()),
        "drops_total": sum(counts.values()),
        "duplicates": {
            "exact": counts.get("exact_duplicate", 0),
            "near": counts.get("near_duplicate", 0),
            "clusters": len(cluster_size),
            "largest_cluster": (max(cluster_size.values()) + 1) if cluster_size else 0,
            "cluster_size_histogram": {str(k + 1): v for k, v in sorted(sizes.items())},
            "bands": dedup.bands,
            "rows": dedup.rows,
            "threshold": dd.threshold,
        },
        "length_histogram": {"edges": LENGTH_EDGES, "before": raw_hist.tolist(), "after": kept_hist.tolist()},
        "examples": dict(examples),
        "near_duplicate_pairs": near_pairs[:20],
        "throughput": {
            "seconds": round(elapsed, 3),
            "records_per_s": round(n_in / elapsed, 1) if elapsed > 0 else None,
            "chars_per_s": round(bytes_in / elapsed, 1) if elapsed > 0 else None,
            "workers": c.workers,
        },
        "memory": {
            "peak_rss_main_mb": round(_rss_mb(), 1),
            "peak_rss_worker_mb": round(_rss_mb(resource.RUSAGE_CHILDREN), 1),
            "dedup_index_bytes": dedup.index_nbytes,
            "dedup_index_bytes_per_kept_doc": round(dedup.index_nbytes / max(n_out, 1), 1),
        },
        "eos": eos,
    }
    assert n_in == n_out + report["drops_total"], "every record is kept or counted as a drop"
    write_json(tmp_dir / "report.json", report)
    return report


def _read_lines(folder: Path, wanted: dict[int, tuple[str, int]]) -> dict[int, str]:
    out: dict[int, str] = {}
    for split in ("train", "val"):
        lines = {pos: k for k, (s, pos) in wanted.items() if s == split}
        if not lines:
            continue
        with open(folder / f"{split}.jsonl", encoding="utf-8") as f:
            for i, line in enumerate(f):
                if i in lines:
                    out[lines[i]] = json.loads(line)["text"]
                if i > max(lines):
                    break
    return out


def iter_corpus(path: str | os.PathLike, strip_eos: str | None = None) -> Iterator[str]:
    """Documents of a corpus split file (``{"text"}`` per line)."""
    with open(path, encoding="utf-8") as f:
        for line in f:
            t = json.loads(line)["text"]
            yield t.removesuffix(strip_eos) if strip_eos else t


__all__ = ["prepare_pretrain", "iter_corpus", "split_of", "exact_hash", "process_batch"]
