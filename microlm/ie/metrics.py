"""Stage B4's metrics (pure): reading an answer, four metrics, bootstrap intervals, floors.

An answer is scored the way IEPile's evaluation (``ie2instruction/eval_func.py`` + its RE
extracter) does it, so numbers over the full InstructIE test set (``--all``) are comparable:

* the answer must be a JSON object (``json.loads`` of the stripped text — no repair); one that is
  not contributes **no** predictions, but its gold triples still count;
* from a JSON object every ``{"subject": str, "object": str}`` item under a list value gives a triple
  ``(subject, key, object)``; malformed items are skipped, the rest still count;
* the answers for the chunks of one record (its relation list is cut into chunks of ``split_num``)
  are merged, triples de-duplicated, and strict micro precision / recall / F1 count exact
  ``(head, relation, tail)`` matches over all records.

Beside IEPile's strict F1 we report the JSON **parse rate**, **schema compliance** (keys exactly the
asked relations, every value a list of subject/object string pairs) and a **relaxed F1** whose
entity strings are compared after NFKC (full/half width), case folding and removal of whitespace
and punctuation.  Every answer gets one **error class** (``ok`` or what went wrong first), so a
broken answer is counted, never a crash.  A **fence-tolerant** reading (``*_fenced`` metrics) also
takes the JSON inside a Markdown code fence (what a chat model not trained on the format writes),
so a zero-shot row measures extraction, not formatting; strict parsing stays IEPile's.

**Two protocols.** *Ours* asks the fixed evaluation prompts (one chunk of a record each) and scores
each against its chunk's gold.  *IEPile's* (``iepile_*``) asks every chunk of a record under IEPile's
test chunking, concatenates the triples of its answers and scores them against the record's whole
relation list, counting like its ``eval_func.py``: in its default ``normal`` mode a predicted triple
counts each time it is predicted (a triple given twice is one hit and one false positive; each gold
triple matches once), in ``set`` mode predictions and gold are sets.  IEPile prints P/R/F1 × 100;
we keep fractions (the same numbers, unrounded).

40 prompts are few: ``bootstrap`` resamples *records* (seeded) for a 95 % interval, and
``paired_bootstrap`` resamples the same records for two models — "A beats B" means the interval of
the difference excludes 0.
"""

from __future__ import annotations

import json
import re
import unicodedata
from collections import defaultdict
from collections.abc import Iterable, Sequence

import numpy as np

__all__ = ["ERROR_CLASSES", "read_answer", "triples_of", "triple_list", "gold_triples", "normalize_entity",
           "score_answer", "strip_fence", "merge_records", "prf", "aggregate", "bootstrap", "paired_bootstrap",
           "empty_answer", "RuleFloor", "failure_kind", "asked_relations", "json_schema_for", "iepile_count",
           "iepile_records", "iepile_aggregate", "iepile_bootstrap", "iepile_paired_bootstrap"]

# what went wrong first with an answer (``ok``: a compliant JSON object); the order is the check order
ERROR_CLASSES = ("ok", "empty", "too_long", "fenced", "prose", "truncated", "not_json", "not_object",
                 "bad_values", "wrong_keys", "endpoint_error", "load_error", "prompt_too_long", "no_gold")

_FENCE = re.compile(r"^```[a-zA-Z]*\s*\n?(.*?)\n?```\s*$", re.S)


def asked_relations(user_content: str) -> list[str]:
    """The relations an IE prompt asks for (its user message is the instruction JSON string)."""
    try:
        obj = json.loads(user_content)
    except (json.JSONDecodeError, TypeError):
        return []
    schema = obj.get("schema") if isinstance(obj, dict) else None
    return [s for s in schema if isinstance(s, str)] if isinstance(schema, list) else []


def _open_at_end(text: str) -> bool:
    """True when JSON-like ``text`` ends inside a string or with a bracket still open (it was cut)."""
    depth, in_str, esc = 0, False, False
    for ch in text:
        if in_str:
            if esc:
                esc = False
            elif ch == "\\":
                esc = True
            elif ch == '"':
                in_str = False
        elif ch == '"':
            in_str = True
        elif ch in "{[":
            depth += 1
        elif ch in "}]":
            depth -= 1
    return in_str or depth > 0


def _decode_error_class(text: str) -> str:
    """Why ``text`` (not valid JSON) failed: a Markdown fence, prose around an object, a cut-off
    object (it parses once closed), or just not JSON."""
    if _FENCE.match(text):
        return "fenced"
    start = text.find("{")
    if start > 0:
        try:
            json.JSONDecoder().raw_decode(text[start:])
            return "prose"
        except json.JSONDecodeError:
            pass
    if text.startswith(("{", "[")) and _open_at_end(text):
        return "truncated"
    return "not_json"


def read_answer(text: str | None, asked: Sequence[str] | None = None, *, max_chars: int = 20000,
                finish_reason: str | None = None) -> tuple[object | None, str]:
    """``(parsed JSON or None, error class)`` of a model's answer (see ``ERROR_CLASSES``).

    ``parsed`` is the decoded JSON value whenever the text is JSON (even a list), so triples can be
    taken from any object; the class says whether it was compliant.  ``finish_reason="length"``
    marks an answer the decoder cut off."""
    if text is None or not text.strip():
        return None, "empty"
    if len(text) > max_chars:
        return None, "too_long"
    s = text.strip()
    try:
        obj = json.loads(s)
    except (json.JSONDecodeError, ValueError, RecursionError):
        cls = _decode_error_class(s)
        if cls == "not_json" and finish_reason == "length" and s.startswith("{"):
            cls = "truncated"
        return None, cls
    if not isinstance(obj, dict):
        return obj, "not_object"
    for v in obj.values():
        if not isinstance(v, list) or not all(isinstance(p, dict) and set(p) == {"subject", "object"}
                                              and all(isinstance(x, str) for x in p.values()) for p in v):
            return obj, "bad_values"
    if asked is not None and set(obj) != set(asked):
        return obj, "wrong_keys"
    return obj, "ok"


def triple_list(obj: object) -> list[tuple[str, str, str]]:
    """IEPile's extraction, in order and with repeats: ``(subject, relation, object)`` from every
    well-formed item of a JSON object's list values; anything else contributes nothing."""
    out: list[tuple[str, str, str]] = []
    if not isinstance(obj, dict):
        return out
    for rel, items in obj.items():
        if not isinstance(rel, str) or not isinstance(items, list):
            continue
        for it in items:
            if isinstance(it, dict):
                h, t = it.get("subject", ""), it.get("object", "")
                if isinstance(h, str) and isinstance(t, str):
                    out.append((h, rel, t))
    return out


def triples_of(obj: object) -> set[tuple[str, str, str]]:
    """``triple_list`` as a set (our protocol scores sets)."""
    return set(triple_list(obj))


def strip_fence(text: str | None) -> str | None:
    """The inside of an answer that is one Markdown code fence (```json … ```), else ``None``."""
    if text is None:
        return None
    m = _FENCE.match(text.strip())
    return m.group(1) if m else None


def gold_triples(gold: str | dict) -> set[tuple[str, str, str]]:
    """The gold answer (a JSON string or object in the answer format) as triples."""
    return triples_of(json.loads(gold) if isinstance(gold, str) else gold)


def normalize_entity(s: str) -> str:
    """Relaxed form of an entity string: NFKC (full-width → half-width), case-folded, without
    whitespace, punctuation and symbols."""
    s = unicodedata.normalize("NFKC", s).casefold()
    return "".join(ch for ch in s if not ch.isspace() and unicodedata.category(ch)[0] not in "PS")


def _relaxed(triples: Iterable[tuple[str, str, str]]) -> set[tuple[str, str, str]]:
    return {(normalize_entity(h), r, normalize_entity(t)) for h, r, t in triples}


def score_answer(text: str | None, asked: Sequence[str], gold: str | dict | None, *,
                 finish_reason: str | None = None, error: str | None = None) -> dict:
    """One answer's parts of the metrics: error class, parsed, compliant, predicted triples (a set,
    and IEPile's list with repeats), gold triples — strict, and fence-tolerant (``*_fenced``: the
    inside of a code fence read as the answer).  ``error``: the backend gave no answer
    (``endpoint_error``, ``load_error``, ``prompt_too_long``); ``gold=None``: ``no_gold``."""
    if gold is None:
        return {"error": "no_gold", "parsed": False, "compliant": False, "pred": [], "gold": [], "pred_list": [],
                "parsed_fenced": False, "pred_fenced": []}
    g = gold_triples(gold)
    if error is not None:
        return {"error": error, "parsed": False, "compliant": False, "pred": [], "gold": sorted(g), "pred_list": [],
                "parsed_fenced": False, "pred_fenced": []}
    obj, cls = read_answer(text, asked, finish_reason=finish_reason)
    parsed = cls in ("ok", "wrong_keys", "bad_values", "not_object")  # it is JSON
    inner = strip_fence(text) if cls == "fenced" else None
    obj_f, cls_f = (obj, cls) if inner is None else read_answer(inner, asked, finish_reason=finish_reason)
    return {"error": cls, "parsed": parsed, "compliant": cls == "ok", "pred": sorted(triples_of(obj)),
            "pred_list": triple_list(obj), "gold": sorted(g),
            "parsed_fenced": cls_f in ("ok", "wrong_keys", "bad_values", "not_object"),
            "pred_fenced": sorted(triples_of(obj_f))}


def merge_records(rows: Iterable[dict]) -> dict[str, dict]:
    """Rows (``record_id``, ``cate``, ``pred``, ``gold``, ``parsed``, ``compliant``, ``error``) merged
    per record, IEPile-style: the union of its chunks' triples; counts strict, relaxed and fence-tolerant."""
    recs: dict[str, dict] = {}
    for r in rows:
        if r["error"] == "no_gold":
            continue
        m = recs.setdefault(r["record_id"], {"cate": r["cate"], "pred": set(), "gold": set(), "pred_f": set(),
                                             "answers": 0, "parsed": 0, "compliant": 0, "parsed_f": 0})
        m["pred"].update(map(tuple, r["pred"]))
        m["gold"].update(map(tuple, r["gold"]))
        m["pred_f"].update(map(tuple, r.get("pred_fenced", r["pred"])))
        m["answers"] += 1
        m["parsed"] += bool(r["parsed"])
        m["compliant"] += bool(r["compliant"])
        m["parsed_f"] += bool(r.get("parsed_fenced", r["parsed"]))
    for m in recs.values():
        m["tp"] = len(m["pred"] & m["gold"])
        rp, rg = _relaxed(m["pred"]), _relaxed(m["gold"])
        m["tp_relaxed"], m["n_pred_relaxed"], m["n_gold_relaxed"] = len(rp & rg), len(rp), len(rg)
        m["n_pred"], m["n_gold"] = len(m["pred"]), len(m["gold"])
        m["tp_f"], m["n_pred_f"] = len(m["pred_f"] & m["gold"]), len(m["pred_f"])
    return recs


def prf(tp: float, n_pred: float, n_gold: float) -> tuple[float, float, float]:
    """Micro precision, recall, F1 (0 where undefined)."""
    p = tp / n_pred if n_pred else 0.0
    r = tp / n_gold if n_gold else 0.0
    return p, r, (2 * p * r / (p + r) if p + r else 0.0)


_COUNTS = ("tp", "n_pred", "n_gold", "tp_relaxed", "n_pred_relaxed", "n_gold_relaxed", "answers", "parsed",
           "compliant", "tp_f", "n_pred_f", "parsed_f")
# the (tp, n_pred, n_gold) columns of each F1 a comparison can use; parse rate = parsed ÷ answers
_F1_COLS = {"f1": (0, 1, 2), "relaxed_f1": (3, 4, 5), "f1_fenced": (9, 10, 2)}


def _table(recs: dict[str, dict], counts: tuple[str, ...] = _COUNTS) -> np.ndarray:
    return np.array([[m[k] for k in counts] for m in recs.values()], dtype=np.float64).reshape(-1, len(counts))


def _metrics_of(sums: np.ndarray) -> dict:
    tp, npred, ngold, tpr, nprr, ngr, ans, parsed, comp, tpf, npf, parsedf = sums
    p, r, f = prf(tp, npred, ngold)
    _, _, fr = prf(tpr, nprr, ngr)
    _, _, ff = prf(tpf, npf, ngold)
    return {"parse_rate": parsed / ans if ans else 0.0, "schema_rate": comp / ans if ans else 0.0,
            "precision": p, "recall": r, "f1": f, "relaxed_f1": fr,
            "parse_rate_fenced": parsedf / ans if ans else 0.0, "f1_fenced": ff}


def aggregate(recs: dict[str, dict]) -> dict:
    """The four metrics (+ strict precision/recall, the fence-tolerant parse rate and F1, counts) over
    ``recs`` (``merge_records``)."""
    t = _table(recs)
    sums = t.sum(axis=0) if len(t) else np.zeros(len(_COUNTS))
    out = _metrics_of(sums)
    out.update(records=len(recs), answers=int(sums[6]), tp=int(sums[0]), n_pred=int(sums[1]), n_gold=int(sums[2]))
    return out


def _f1_rows(s: np.ndarray, cols: tuple[int, int, int]) -> np.ndarray:
    tp, npred, ngold = s[..., cols[0]], s[..., cols[1]], s[..., cols[2]]
    p = np.divide(tp, npred, out=np.zeros_like(tp), where=npred > 0)
    r = np.divide(tp, ngold, out=np.zeros_like(tp), where=ngold > 0)
    return np.divide(2 * p * r, p + r, out=np.zeros_like(tp), where=(p + r) > 0)


def _boot_f1_parse(t: np.ndarray, idx: np.ndarray, metric: str = "f1") -> tuple[np.ndarray, np.ndarray]:
    # (samples, records, counts) summed over the records: F1 of each resample from its summed counts
    # (micro-averaged, as the point estimate), not a mean of per-record F1s
    s = t[idx].sum(axis=1)  # (samples, counts)
    parse = np.divide(s[:, 7], s[:, 6], out=np.zeros_like(s[:, 6]), where=s[:, 6] > 0)
    return _f1_rows(s, _F1_COLS[metric]), parse


def bootstrap(recs: dict[str, dict], *, samples: int = 1000, seed: int = 0, level: float = 0.95) -> dict:
    """Percentile intervals of strict F1, fence-tolerant F1 and parse rate, resampling records with
    replacement."""
    t = _table(recs)
    if len(t) == 0:
        return {"f1": [0.0, 0.0], "parse_rate": [0.0, 0.0], "f1_fenced": [0.0, 0.0]}
    idx = np.random.default_rng(seed).integers(0, len(t), size=(samples, len(t)))  # one resample per row
    f, parse = _boot_f1_parse(t, idx)
    ff, _ = _boot_f1_parse(t, idx, "f1_fenced")
    q = [(1 - level) / 2 * 100, (1 + level) / 2 * 100]
    return {"f1": [float(x) for x in np.percentile(f, q)], "parse_rate": [float(x) for x in np.percentile(parse, q)],
            "f1_fenced": [float(x) for x in np.percentile(ff, q)]}


def paired_bootstrap(a: dict[str, dict], b: dict[str, dict], *, samples: int = 1000, seed: int = 0,
                     level: float = 0.95, metric_a: str = "f1", metric_b: str = "f1") -> dict:
    """F1(a) − F1(b) on the records both scored, with a paired percentile interval (the same
    resampled records for both); ``decided`` when the interval excludes 0.  ``metric_a``/``metric_b``:
    which F1 of each (``f1`` strict, ``f1_fenced``, ``relaxed_f1``) — e.g. a trained model's strict F1
    against a zero-shot model's fence-tolerant one.  The parse-rate difference (strict, both) and its
    paired interval come with it (``parse_diff``, ``parse_interval``)."""
    ids = sorted(set(a) & set(b))
    if not ids:
        return {"records": 0, "f1_diff": 0.0, "interval": [0.0, 0.0], "decided": False,
                "metrics": [metric_a, metric_b], "parse_diff": 0.0, "parse_interval": [0.0, 0.0]}
    ta, tb = _table({k: a[k] for k in ids}), _table({k: b[k] for k in ids})
    diff = float(_f1_rows(ta.sum(axis=0), _F1_COLS[metric_a]) - _f1_rows(tb.sum(axis=0), _F1_COLS[metric_b]))
    # the same resampled records for both: the difference's interval, not two overlapping ones
    idx = np.random.default_rng(seed).integers(0, len(ids), size=(samples, len(ids)))
    fa, pa = _boot_f1_parse(ta, idx, metric_a)
    fb, pb = _boot_f1_parse(tb, idx, metric_b)
    q = [(1 - level) / 2 * 100, (1 + level) / 2 * 100]
    lo, hi = (float(x) for x in np.percentile(fa - fb, q))
    sa, sb = ta.sum(axis=0), tb.sum(axis=0)
    parse = float(sa[7] / sa[6] - sb[7] / sb[6]) if sa[6] and sb[6] else 0.0
    return {"records": len(ids), "f1_diff": diff, "interval": [lo, hi], "decided": lo > 0 or hi < 0,
            "metrics": [metric_a, metric_b], "parse_diff": parse,
            "parse_interval": [float(x) for x in np.percentile(pa - pb, q)]}


# ------------------------------------------------------------------------------------ IEPile's protocol
def iepile_count(pred: Sequence[tuple], gold: Sequence[tuple], mode: str = "normal") -> tuple[int, int, int]:
    """``(tp, n_pred, n_gold)`` of one record as IEPile's metric counts them: ``normal`` — every
    predicted triple counts (repeats too), each gold triple can be matched once; ``set`` — both sides
    de-duplicated first."""
    if mode == "set":
        p, g = set(map(tuple, pred)), set(map(tuple, gold))
        return len(p & g), len(p), len(g)
    if mode != "normal":
        raise ValueError(f"mode must be normal or set, got {mode!r}")
    left: dict[tuple, int] = defaultdict(int)
    for t in gold:
        left[tuple(t)] += 1
    tp = 0
    for t in pred:
        if left.get(tuple(t), 0) > 0:
            tp += 1
            left[tuple(t)] -= 1
    return tp, len(pred), len(gold)


def iepile_records(rows: Iterable[dict]) -> dict[str, dict]:
    """Rows of IEPile-protocol answers (``record_id``, ``cate``, ``pred_list``, ``record_gold``,
    ``parsed``, ``compliant``, ``error``) → per record: the concatenated predictions of its chunks
    and its whole relation list, counted in both modes."""
    recs: dict[str, dict] = {}
    for r in rows:
        if r["error"] == "no_gold":
            continue
        m = recs.setdefault(r["record_id"], {"cate": r["cate"], "pred": [], "gold": [tuple(t) for t in r["record_gold"]],
                                             "answers": 0, "parsed": 0, "compliant": 0})
        m["pred"] += [tuple(t) for t in r["pred_list"]]
        m["answers"] += 1
        m["parsed"] += bool(r["parsed"])
        m["compliant"] += bool(r["compliant"])
    for m in recs.values():
        m["tp"], m["n_pred"], m["n_gold"] = iepile_count(m["pred"], m["gold"], "normal")
        m["tp_set"], m["n_pred_set"], m["n_gold_set"] = iepile_count(m["pred"], m["gold"], "set")
    return recs


_IEPILE = ("tp", "n_pred", "n_gold", "tp_set", "n_pred_set", "n_gold_set", "answers", "parsed", "compliant")


def iepile_aggregate(recs: dict[str, dict]) -> dict:
    """IEPile's P/R/F1 (normal mode), the set-mode F1, parse and schema rates over records."""
    t = _table(recs, _IEPILE)
    s = t.sum(axis=0) if len(t) else np.zeros(len(_IEPILE))
    p, r, f = prf(s[0], s[1], s[2])
    _, _, fs = prf(s[3], s[4], s[5])
    return {"precision": p, "recall": r, "f1": f, "f1_set": fs, "parse_rate": s[7] / s[6] if s[6] else 0.0,
            "schema_rate": s[8] / s[6] if s[6] else 0.0, "records": len(recs), "answers": int(s[6]),
            "tp": int(s[0]), "n_pred": int(s[1]), "n_gold": int(s[2])}


def iepile_bootstrap(recs: dict[str, dict], *, samples: int = 1000, seed: int = 0, level: float = 0.95) -> list[float]:
    """Percentile interval of IEPile's F1 (normal mode), resampling records."""
    t = _table(recs, _IEPILE)
    if len(t) == 0:
        return [0.0, 0.0]
    idx = np.random.default_rng(seed).integers(0, len(t), size=(samples, len(t)))
    f = _f1_rows(t[idx].sum(axis=1), (0, 1, 2))
    return [float(x) for x in np.percentile(f, [(1 - level) / 2 * 100, (1 + level) / 2 * 100])]


def iepile_paired_bootstrap(a: dict[str, dict], b: dict[str, dict], *, samples: int = 1000, seed: int = 0,
                            level: float = 0.95) -> dict:
    """IEPile F1(a) − F1(b) over the records both answered, paired by record."""
    ids = sorted(set(a) & set(b))
    if not ids:
        return {"records": 0, "f1_diff": 0.0, "interval": [0.0, 0.0], "decided": False}
    ta, tb = _table({k: a[k] for k in ids}, _IEPILE), _table({k: b[k] for k in ids}, _IEPILE)
    diff = float(_f1_rows(ta.sum(axis=0), (0, 1, 2)) - _f1_rows(tb.sum(axis=0), (0, 1, 2)))
    idx = np.random.default_rng(seed).integers(0, len(ids), size=(samples, len(ids)))
    d = _f1_rows(ta[idx].sum(axis=1), (0, 1, 2)) - _f1_rows(tb[idx].sum(axis=1), (0, 1, 2))
    lo, hi = (float(x) for x in np.percentile(d, [(1 - level) / 2 * 100, (1 + level) / 2 * 100]))
    return {"records": len(ids), "f1_diff": diff, "interval": [lo, hi], "decided": lo > 0 or hi < 0}


def json_schema_for(asked: list[str], max_chars: int = 64, max_items: int = 8) -> dict:
    """The JSON schema of an answer to ``asked``: exactly those keys, each a list of at most
    ``max_items`` ``{"subject": str, "object": str}`` pairs of 1–``max_chars`` characters (the data's
    entity limit)."""
    # no control characters (JSON forbids them raw, and a byte-level grammar would let them through)
    ent = {"type": "string", "pattern": f"^[^\\x00-\\x1f\"\\\\]{{1,{max_chars}}}$"}
    pair = {"type": "object", "properties": {"subject": ent, "object": ent},
            "required": ["subject", "object"], "additionalProperties": False}
    return {"type": "object", "properties": {r: {"type": "array", "items": pair, "maxItems": max_items} for r in asked},
            "required": list(asked), "additionalProperties": False}


def empty_answer(asked: Sequence[str]) -> str:
    """The first floor: every asked relation answered ``[]``."""
    return json.dumps({r: [] for r in asked}, ensure_ascii=False)


class RuleFloor:
    """The second floor, no model: for each asked relation, the subjects and objects seen with it in
    the training answers that occur in the text are paired, each subject with the nearest object
    (the closest ``max_pairs`` pairs per relation, never an entity with itself)."""

    def __init__(self, train_answers: Iterable[str], max_pairs: int = 2, min_chars: int = 2):
        self.subjects: dict[str, set[str]] = defaultdict(set)
        self.objects: dict[str, set[str]] = defaultdict(set)
        self.max_pairs, self.min_chars = max_pairs, min_chars
        for a in train_answers:
            try:
                trip = gold_triples(a)
            except (json.JSONDecodeError, TypeError):
                continue
            for h, r, t in trip:
                self.subjects[r].add(h)
                self.objects[r].add(t)

    def _found(self, pool: set[str], text: str) -> list[str]:
        return [e for e in pool if len(e) >= self.min_chars and e in text]

    def answer(self, text: str, asked: Sequence[str]) -> str:
        out = {}
        for rel in asked:
            subs, objs = self._found(self.subjects[rel], text), self._found(self.objects[rel], text)
            pairs = []
            for s in subs:  # each subject with the nearest object in the text
                cands = [(abs(text.find(o) - text.find(s)), o) for o in objs if s != o and s not in o and o not in s]
                if cands:
                    d, o = min(cands)
                    pairs.append((d, s, o))
            out[rel] = [{"subject": s, "object": o} for _, s, o in sorted(pairs)[:self.max_pairs]]
        return json.dumps(out, ensure_ascii=False)


def failure_kind(row: dict, text_input: str) -> str | None:
    """The gallery's class of a failed answer (None when it has no error): not JSON, truncated,
    wrong keys, a hallucinated entity (not in the input text), the right pair under the wrong
    relation, or missed/extra triples."""
    err = row["error"]
    if err in ("empty", "fenced", "prose", "not_json", "not_object", "too_long"):
        return "not JSON"
    if err == "truncated":
        return "truncated"
    if err in ("endpoint_error", "load_error", "prompt_too_long"):
        return "no answer"
    if err in ("wrong_keys", "bad_values"):
        return "wrong keys"
    pred, gold = {tuple(t) for t in row["pred"]}, {tuple(t) for t in row["gold"]}
    if pred == gold:
        return None
    if any(h not in text_input or t not in text_input for h, _, t in pred - gold):
        return "hallucinated entity"
    gold_pairs = {(h, t): r for h, r, t in gold}
    if any((h, t) in gold_pairs and gold_pairs[(h, t)] != r for h, r, t in pred - gold):
        return "right pair, wrong relation"
    return "missed triples" if pred < gold or not pred else "wrong triples"
