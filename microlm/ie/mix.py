"""Stage B3's training mix: which rendered IE conversations the LoRA learns from.

All of ``06_train.jsonl`` is far more than a CPU run can read, and its natural mix teaches the wrong
thing: with the data bundle two thirds of it is the catch-all topic ``其他`` and about half of it answers
every asked relation with ``[]``, while the evaluation asks twelve topics for triples.  The sample is
therefore drawn deliberately (seeded, so a run is reproducible):

* **decontaminated** — a training conversation whose input text equals an evaluation text or is a
  near-duplicate of one (MinHash over character 5-grams of the normalised text, the corpus stage's
  deduplicator, Jaccard ≥ ``threshold``) is never used; how many were left out is reported;
* **balanced by topic** — every topic gets the same share of the sample; a topic with fewer examples
  gives all it has and the rest is shared among the others (water-filling);
* **a chosen share of all-empty answers** (``empty_share``) — by default near the share of all-empty
  chunks in IEPile's own test protocol (about 0.7 on the bundle), so the model meets the "nothing
  here" answer as often as the test asks it, and learns triples from the rest.

``describe_mix`` reports what was drawn: examples per topic, the empty share, and for every relation
the evaluation asks about, how many training answers hold a pair of it.
"""

from __future__ import annotations

import json
import random
import unicodedata
from collections import Counter, defaultdict
from collections.abc import Iterable

import numpy as np
import xxhash

from microlm.data.dedup import Deduplicator, MinHasher

__all__ = ["normalize_text", "line_input", "answer_triples", "is_empty_answer", "contaminated", "balanced_sample",
           "describe_mix"]


def normalize_text(s: str) -> str:
    """NFKC, case-folded, whitespace removed: what "the same text" means for decontamination."""
    return "".join(unicodedata.normalize("NFKC", s).casefold().split())


def line_input(line: dict) -> str:
    """The input text of a rendered IE conversation (its user turn is the instruction JSON)."""
    user = next((m["content"] for m in line["messages"] if m["role"] == "user"), "")
    try:
        obj = json.loads(user)
    except json.JSONDecodeError:
        return user
    return obj.get("input", "") if isinstance(obj, dict) else user


def answer_triples(answer: str) -> list[tuple[str, str, str]]:
    """``(subject, relation, object)`` of an answer in the IE format (nothing when it is not one)."""
    try:
        obj = json.loads(answer)
    except json.JSONDecodeError:
        return []
    if not isinstance(obj, dict):
        return []
    return [(p.get("subject", ""), rel, p.get("object", "")) for rel, pairs in obj.items() if isinstance(pairs, list)
            for p in pairs if isinstance(p, dict)]


def is_empty_answer(line: dict) -> bool:
    """Every asked relation answered ``[]``."""
    return not answer_triples(line["messages"][-1]["content"])


def contaminated(train_texts: list[str], eval_texts: Iterable[str], *, threshold: float = 0.8,
                 shingle_size: int = 5, num_perm: int = 128, seed: int = 0, batch: int = 4096) -> list[bool]:
    """For each training text: is it (normalised) equal to, or a near-duplicate (estimated Jaccard of
    character ``shingle_size``-grams ≥ ``threshold``) of, one of ``eval_texts``?"""
    def keys(texts: list[str]) -> np.ndarray:
        return np.array([xxhash.xxh64_intdigest(t.encode()) for t in texts], dtype=np.uint64)

    hasher = MinHasher(num_perm=num_perm, shingle_size=shingle_size, seed=seed)
    dedup = Deduplicator(exact=True, near=True, threshold=threshold, num_perm=num_perm, seed=seed)
    ev = [normalize_text(t) for t in eval_texts]
    for i in range(0, len(ev), batch):
        part = ev[i:i + batch]
        dedup.process(keys(part), hasher.signatures(part))
    n_eval = dedup.n_kept  # ids below this are evaluation texts
    out: list[bool] = []
    for i in range(0, len(train_texts), batch):
        part = [normalize_text(t) for t in train_texts[i:i + batch]]
        dec = dedup.process(keys(part), hasher.signatures(part))
        out.extend(bool(not k and 0 <= m < n_eval) for k, m in zip(dec.keep, dec.match, strict=True))
    return out


def _water_fill(available: dict[str, int], n: int) -> dict[str, int]:
    """Equal shares of ``n`` over the keys, none above what it has; what a small key cannot take goes
    to the others."""
    take = dict.fromkeys(available, 0)
    left, open_ = n, [k for k in sorted(available) if available[k] > 0]
    while left > 0 and open_:
        share = max(1, left // len(open_))
        for k in list(open_):
            add = min(share, available[k] - take[k], left)
            take[k] += add
            left -= add
            if take[k] >= available[k]:
                open_.remove(k)
            if left == 0:
                break
    return take


def balanced_sample(topics: list[str], empty: list[bool], n: int, *, empty_share: float, seed: int,
                    excluded: list[bool] | None = None) -> tuple[list[int], dict]:
    """Which of the lines (given by their ``topics`` and whether each answer is all-empty) to train on:
    ``n`` of them (all usable ones when ``n`` is 0 or more than there are), balanced by topic with
    about ``empty_share`` all-empty answers; ``excluded[i]`` lines are never drawn.  ``(indices in a
    seeded random order, report)`` — indices, so a caller can stream a large file and keep only these."""
    rng = random.Random(seed)
    pools: dict[str, dict[bool, list[int]]] = defaultdict(lambda: {True: [], False: []})
    for i, (topic, is_empty) in enumerate(zip(topics, empty, strict=True)):
        if excluded is not None and excluded[i]:
            continue
        pools[topic][is_empty].append(i)
    usable = sum(len(p[True]) + len(p[False]) for p in pools.values())
    n = usable if n <= 0 or n >= usable else n
    per_topic = _water_fill({t: len(p[True]) + len(p[False]) for t, p in pools.items()}, n)
    picked: list[int] = []
    for t in sorted(pools):
        k = per_topic[t]
        empties, positives = pools[t][True], pools[t][False]
        want_empty = min(len(empties), round(k * empty_share))
        want_pos = min(len(positives), k - want_empty)
        want_empty = min(len(empties), k - want_pos)  # too few positives: fill with empties (and back)
        picked += rng.sample(positives, want_pos) + rng.sample(empties, want_empty)
    rng.shuffle(picked)
    report = {"available": len(topics), "excluded": int(sum(excluded)) if excluded is not None else 0,
              "usable": usable, "usable_empty": sum(len(p[True]) for p in pools.values()), "drawn": len(picked),
              "empty_share_target": empty_share}
    return picked, report


def describe_mix(sample: list[dict], eval_golds: Iterable[str] = ()) -> dict:
    """What a training sample teaches: examples and all-empty answers per topic, the empty share, and
    for each relation in the evaluation gold answers, the training answers holding a pair of it
    (``positives_per_evaluated_relation``; ``evaluated_relations_without_positive`` counts the gold
    triples whose relation the sample never shows)."""
    by_topic, empty_by_topic, pos_rel = Counter(), Counter(), Counter()
    for line in sample:
        by_topic[line["cate"]] += 1
        trip = answer_triples(line["messages"][-1]["content"])
        empty_by_topic[line["cate"]] += not trip
        for rel in {r for _, r, _ in trip}:
            pos_rel[(line["cate"], rel)] += 1
    eval_rel: Counter = Counter()
    for gold, cate in eval_golds:
        for _, rel, _ in answer_triples(gold):
            eval_rel[(cate, rel)] += 1
    n = max(1, len(sample))
    return {"examples": len(sample), "by_topic": dict(by_topic.most_common()),
            "empty_by_topic": {t: empty_by_topic[t] for t, _ in by_topic.most_common()},
            "empty_share": round(sum(empty_by_topic.values()) / n, 4),
            "positives_per_evaluated_relation": {f"{c}:{r}": pos_rel[(c, r)] for (c, r) in sorted(eval_rel)},
            "evaluated_triples": sum(eval_rel.values()),
            "evaluated_triples_without_positive": sum(v for k, v in eval_rel.items() if pos_rel[k] == 0)}
