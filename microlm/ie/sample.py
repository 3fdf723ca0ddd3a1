"""Stage B1, step 05 (sample): stratified train/val/test and the fixed evaluation prompts.

Splits are made over *texts* (record ids), never over examples, so no text is in two splits.
Within each topic the texts are ordered by stratum and then by a seeded hash, and cut by systematic
sampling: every ``1/fraction``-th text goes to test, then likewise to val over the rest.  A topic
gets ``round(n × fraction)`` texts in each split (a 21-text topic still reaches test), and the
strata inside it are represented in proportion (topics of fewer than 3 texts stay in train).  The
test split of a topic holds at least ``ceil(eval_prompts / topics)`` texts (at most a quarter of
it), so the project's small embedded source still gives 40 evaluation prompts over 12 topics.
The evaluation prompts are drawn
from the test split, round-robin over topics (schema topics first, then the extra topic), each
with at least one gold pair, and saved with their gold answers.
"""

from __future__ import annotations

import math
from collections import defaultdict

import xxhash

__all__ = ["assign_splits", "pick_eval_prompts"]


def _key(seed: int, text_id: str) -> int:
    return xxhash.xxh64_intdigest(f"{seed}:{text_id}".encode())


def _systematic(ids: list[str], fraction: float) -> set[str]:
    """Every ``1/fraction``-th id of an ordered list (``round(len × fraction)`` of them)."""
    return {t for i, t in enumerate(ids) if math.floor((i + 1) * fraction + 0.5) > math.floor(i * fraction + 0.5)}


def assign_splits(strata: dict[str, str], val_fraction: float, test_fraction: float, seed: int,
                  min_test: int = 0) -> dict[str, str]:
    """``{text id: "train" | "val" | "test"}`` from ``{text id: stratum}`` (``"<topic>:<relation>"``).

    ``min_test``: a topic's test split holds at least this many texts (at most a quarter of the
    topic) — so a small source still yields the evaluation prompts (40 over 12 topics needs 4 each)."""
    by_topic: dict[str, list[str]] = defaultdict(list)
    for tid, s in strata.items():
        by_topic[s.split(":")[0]].append(tid)
    out = {}
    for _, ids in sorted(by_topic.items()):
        ids.sort(key=lambda t: (strata[t], _key(seed, t)))
        n = len(ids)
        k = max(math.floor(n * test_fraction + 0.5), min(min_test, n // 4))
        test = _systematic(ids, k / n) if n >= 3 else set()
        rest = [t for t in ids if t not in test]
        val = _systematic(rest, val_fraction * n / len(rest)) if n >= 3 and rest else set()
        for tid in ids:
            out[tid] = "test" if tid in test else "val" if tid in val else "train"
    return out


def pick_eval_prompts(examples: list[dict], n: int, extra_topic: str | None, seed: int) -> list[dict]:
    """``n`` test examples with at least one gold pair, one text at most once, round-robin over topics."""
    by_topic: dict[str, list[dict]] = defaultdict(list)
    for e in examples:
        if e["positives"] > 0:
            by_topic[e["cate"]].append(e)
    topics = sorted(t for t in by_topic if t != extra_topic) + ([extra_topic] if extra_topic in by_topic else [])
    for t in topics:
        by_topic[t].sort(key=lambda e: _key(seed, e["id"]))
    picked, used, pos = [], set(), dict.fromkeys(topics, 0)
    while len(picked) < n and any(pos[t] < len(by_topic[t]) for t in topics):
        for t in topics:
            while pos[t] < len(by_topic[t]) and by_topic[t][pos[t]]["record_id"] in used:
                pos[t] += 1
            if pos[t] < len(by_topic[t]) and len(picked) < n:
                e = by_topic[t][pos[t]]
                picked.append(e)
                used.add(e["record_id"])
                pos[t] += 1
    return picked
