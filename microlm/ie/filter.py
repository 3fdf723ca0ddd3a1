"""Stage B1, step 02 (filter): drop what cannot be trained on, and say why.

Per triple: empty or overlong head/tail, head or tail not found in the text, relation not in the
topic's schema (test + train relation lists of ``instructie_schema_zh/en.json``), the same triple
twice.  Per record: topic not in the schema (the extra topic for unmapped relations passes),
text too short or too long, no triple left, the same text already taken
from another source (exact), or a near-duplicate of a kept text (MinHash over character 5-grams, keep-first, the
corpus stage's deduplicator).  Every drop is counted by reason with samples.
"""

from __future__ import annotations

import functools
from collections import deque
from collections.abc import Iterable, Iterator
from pathlib import Path

import numpy as np

from microlm.data.dedup import Deduplicator, MinHasher
from microlm.errors import MicroLMError
from microlm.ie.standardize import IERecord, Issues
from microlm.io import batched, load_json_file, ordered_map

__all__ = ["load_schema", "filter_records"]


def load_schema(paths: Iterable[str | Path]) -> dict[str, list[str]]:
    """``{topic: [relation, ...]}`` from InstructIE schema files: ``relations`` then the train-only
    ``relations_train``, in file order, each once."""
    out: dict[str, list[str]] = {}
    for p in paths:
        p = Path(p)
        if not p.is_file():
            raise MicroLMError(f"IE schema file not found: {p}")
        raw = load_json_file(p, "IE schema file")
        for topic, spec in raw.items():
            if topic.startswith("_") or not isinstance(spec, dict):
                continue
            rels = [r.get("relation") for key in ("relations", "relations_train") for r in spec.get(key, [])
                    if isinstance(r, dict)]
            known = out.setdefault(topic, [])
            known.extend(r for r in dict.fromkeys(rels) if isinstance(r, str) and r and r not in known)
    if not out:
        raise MicroLMError("the IE schema files define no topics")
    return out


def _clean_triples(rec: IERecord, allowed: set[str] | None, max_entity: int, issues: Issues,
                   where: str) -> list[dict]:
    kept, seen = [], set()
    for t in rec.relation:
        head, tail = (t.get("head") or "").strip(), (t.get("tail") or "").strip()
        reason = None
        if not head or not tail:
            reason = "empty_entity"
        elif len(head) > max_entity or len(tail) > max_entity:
            reason = "entity_too_long"
        elif head not in rec.text:
            reason = "head_not_in_text"
        elif tail not in rec.text:
            reason = "tail_not_in_text"
        elif allowed is not None and t["relation"] not in allowed:
            reason = "relation_not_in_schema"
        elif (head, t["relation"], tail) in seen:
            reason = "duplicate_triple"
        if reason:
            issues.add(reason, where, t)
            continue
        seen.add((head, t["relation"], tail))
        kept.append({**t, "head": head, "tail": tail})
    return kept


@functools.lru_cache(maxsize=4)
def _hasher(seed: int):
    return MinHasher(128, 5, seed=seed)


def _signatures(job: tuple[int, list[str]]) -> np.ndarray | None:
    seed, texts = job
    return _hasher(seed).signatures(texts) if texts else None


def filter_records(records: Iterable[IERecord], schema: dict[str, list[str]], *, extra_topic: str | None,
                   min_chars: int, max_chars: int, max_entity_chars: int, near_threshold: float | None,
                   issues: Issues, seed: int = 0, batch: int = 2048, workers: int = 1) -> Iterator[IERecord]:
    """Keep-first filtering of records in order (see the module docstring), streamed in batches
    (memory: the text ids seen and the near-duplicate index, not the records); a text already
    taken from another source is an exact duplicate, the same text under several topics of one
    source is not.  ``workers`` > 1 computes the MinHash signatures of the next batches in that
    many processes while this one filters and queries the index — the decisions are the same."""
    allowed_of = {t: set(rels) for t, rels in schema.items()}
    owner: dict[str, str] = {}  # text id → the source that supplied it first

    def rule_passed() -> Iterator[IERecord]:
        for rec in records:
            where = f"{rec.source}:{rec.id}"
            if rec.cate not in schema and rec.cate != extra_topic:
                issues.add("topic_not_in_schema", where, rec.cate)
                continue
            n = len(rec.text)
            if n < min_chars or n > max_chars:
                issues.add("text_too_short" if n < min_chars else "text_too_long", where, rec.text)
                continue
            first = owner.get(rec.id)
            if first is not None and first != rec.source:
                issues.add("duplicate_text", where, rec.text)
                continue
            allowed = None if rec.cate == extra_topic else allowed_of[rec.cate]
            triples = _clean_triples(rec, allowed, max_entity_chars, issues, where)
            if not triples:
                issues.add("no_triple_left", where, rec.text)
                continue
            owner.setdefault(rec.id, rec.source)
            yield IERecord(rec.id, rec.cate, rec.text, triples, rec.source)

    submitted: set[str] = set()
    pending: deque = deque()  # (records, their new text ids), in the order of the signature jobs

    def jobs():
        for buf in batched(rule_passed(), batch):
            new = [] if near_threshold is None else list(dict.fromkeys(r.id for r in buf if r.id not in submitted))
            submitted.update(new)
            text_of = {r.id: r.text for r in buf}
            pending.append((buf, new))
            yield seed, [text_of[i] for i in new]

    near_keep: dict[str, bool] = {}  # text id → passed the near-duplicate check
    dedup = Deduplicator(exact=False, near=True, threshold=near_threshold or 1.0, num_perm=128, seed=seed)
    for sigs in ordered_map(_signatures, jobs(), workers if near_threshold is not None else 1):
        buf, new = pending.popleft()
        if new:
            dec = dedup.process(np.zeros(len(new), dtype=np.uint64), sigs)
            near_keep.update(zip(new, map(bool, dec.keep), strict=True))
        for r in buf:
            if near_threshold is None or near_keep[r.id]:
                yield r
            else:
                issues.add("near_duplicate_text", f"{r.source}:{r.id}", r.text)
