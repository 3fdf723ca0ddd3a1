"""Stage B1, step 05 (sample): stratified train/val/test and the fixed evaluation prompts.

Splits are made over *texts* (record ids), never over examples, so no text is in two splits;
within each stratum the texts are ordered by a seeded hash and cut by the configured fractions, so
every stratum with enough texts is represented in each split.  The evaluation prompts are drawn
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


def assign_splits(strata: dict[str, str], val_fraction: float, test_fraction: float, seed: int) -> dict[str, str]:
    """``{text id: "train" | "val" | "test"}`` from ``{text id: stratum}``."""
    by_stratum: dict[str, list[str]] = defaultdict(list)
    for tid, s in strata.items():
        by_stratum[s].append(tid)
    out = {}
    for _, ids in sorted(by_stratum.items()):
        ids.sort(key=lambda t: _key(seed, t))
        n = len(ids)
        n_test = math.floor(n * test_fraction + 0.5) if n >= 3 else 0
        n_val = math.floor(n * val_fraction + 0.5) if n >= 3 else 0
        for i, tid in enumerate(ids):
            out[tid] = "test" if i < n_test else "val" if i < n_test + n_val else "train"
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
