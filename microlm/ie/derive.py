"""Stage B1, step 04 (derive): IEPile-style schema-conditioned instructions.

For each record, its topic's relation list is cut into chunks of at most ``split_num`` relations;
each chunk becomes one example whose instruction is a JSON string ``{"instruction", "schema",
"input"}`` and whose expected output is a JSON string ``{"<relation>": [{"subject", "object"}],
...}`` over exactly the chunk's relations — relations absent from the text get ``[]``, so the
model learns to say "nothing" as well as to extract (IEPile, Gui et al. 2024).  ``shuffle_variants``
adds copies with the relations in another order.  ``max_empty_chunks`` marks the all-empty chunks
beyond that many per record and variant as ``capped`` (IEPile samples its training negatives too;
``None`` marks none) — drawn by a seeded hash, so the cap is deterministic.  Step 05 leaves capped
chunks out of train and val only: the test split keeps every chunk, so a model that hallucinates on
an empty chunk is penalised.  The relation pool of a schema topic is its schema; the pool of the
extra topic (unmapped relations) is what that source uses under it.

**IEPile's test protocol** (``iepile_chunks``, ``derive_iepile``): IEPile's own test conversion asks
every chunk of a record with the schema in a fixed (sorted) order and a short remainder folded into
the last chunk (fewer than ``split_num // 2`` relations left over join the chunk before), and scores
the merged answers against the record's whole relation list.
"""

from __future__ import annotations

import json
import random
from collections.abc import Callable, Iterable, Iterator

import xxhash

__all__ = ["INSTRUCTIONS", "derive_examples", "chunk", "iepile_chunks", "derive_iepile", "record_gold"]

INSTRUCTIONS = {
    "zh": ("你是专门进行关系抽取的专家。请从input中抽取出符合schema定义的关系三元组，schema中的关系在input中不存在时"
           "返回空列表。请以JSON字符串的形式回答。"),
    "en": ("You are an expert in relation extraction. Extract the relation triples defined by the schema from the "
           "input; give an empty list for a schema relation the input does not contain. Answer with a JSON string."),
}


_str = json.encoder.encode_basestring  # the stdlib's own string encoder (ensure_ascii=False)


_memo: dict = {}  # JSON fragments of instructions and relation lists (a few hundred distinct ones)


def _instruction_json(instruction: str, rels: list[str], text: str) -> str:
    """``json.dumps({"instruction", "schema", "input"}, ensure_ascii=False)``, built from parts (the
    pipeline writes one per example; a test pins the equality)."""
    key = (instruction, *rels)
    head = _memo.get(key)
    if head is None:
        head = _memo[key] = f'{{"instruction": {_str(instruction)}, "schema": [{", ".join(map(_str, rels))}], "input": '
    return head + _str(text) + "}"


def _output_json(rels: list[str], gold: dict[str, list[dict]]) -> str:
    """``json.dumps({rel: [{"subject", "object"}, ...]}, ensure_ascii=False)`` over ``rels``."""
    parts = []
    for rel in rels:
        pairs = gold.get(rel)
        if not pairs:
            part = _memo.get(rel)
            if part is None:
                part = _memo[rel] = f"{_str(rel)}: []"
            parts.append(part)
            continue
        inner = ", ".join(f'{{"subject": {_str(p["subject"])}, "object": {_str(p["object"])}}}' for p in pairs)
        parts.append(f"{_str(rel)}: [{inner}]")
    return "{" + ", ".join(parts) + "}"


def chunk(items: list[str], size: int) -> list[list[str]]:
    return [items[i:i + size] for i in range(0, len(items), size)]


def iepile_chunks(items: list[str], size: int) -> list[list[str]]:
    """IEPile's test-time split of a schema: sorted, cut into chunks of ``size``; a remainder shorter
    than ``max(1, size // 2)`` is folded into the last chunk (``size`` -1: one chunk)."""
    items = sorted(items)
    if size == -1 or len(items) <= size:
        return [items] if items else []
    full = len(items) // size * size
    out = [items[i:i + size] for i in range(0, full, size)]
    rest = items[full:]
    if len(rest) >= max(1, size // 2):
        out.append(rest)
    else:
        out[-1].extend(rest)
    return out


def record_gold(r: dict) -> dict[str, list[dict]]:
    """A record's gold pairs by relation, each (subject, object) pair once (IEPile de-duplicates too)."""
    gold: dict[str, list[dict]] = {}
    for t in r["relation"]:
        pair = {"subject": t["head"], "object": t["tail"]}
        if pair not in gold.setdefault(t["relation"], []):
            gold[t["relation"]].append(pair)
    return gold


def derive_iepile(records: Iterable[dict], pool_of: Callable[[dict], list[str]], *, split_num: int) -> Iterator[dict]:
    """Every chunk of every record under IEPile's test chunking (``iepile_chunks``); each example also
    carries ``record_gold``, the record's whole relation list as ``[subject, relation, object]``."""
    for r in records:
        gold = record_gold(r)
        triples = [[p["subject"], rel, p["object"]] for rel, pairs in gold.items() for p in pairs]
        for c, rels in enumerate(iepile_chunks(pool_of(r), split_num)):
            yield {"id": f"{r['id']}-{r['cate']}-iepile-{c}", "record_id": r["id"], "cate": r["cate"],
                   "stratum": r.get("stratum"), "source": r["source"], "variant": 0, "chunk": c,
                   "instruction": _instruction_json(INSTRUCTIONS[_lang(r["cate"])], rels, r["text"]),
                   "output": _output_json(rels, gold),
                   "positives": sum(len(gold.get(rel, ())) for rel in rels), "record_gold": triples}


def _lang(topic: str) -> str:
    return "en" if topic.isascii() else "zh"


def derive_examples(records: Iterable[dict], pool_of: Callable[[dict], list[str]], *, split_num: int,
                    shuffle_variants: int, seed: int, max_empty_chunks: int | None = None,
                    skipped: list[int] | None = None) -> Iterator[dict]:
    """One example per (record, chunk, variant); ``records`` are stratified record dicts and
    ``pool_of(record)`` is the ordered relation list its instructions draw from.  All-empty chunks
    beyond ``max_empty_chunks`` per record and variant carry ``"capped": true`` (their number is added
    to ``skipped[0]`` when a list is given); step 05 leaves them out of train and val."""
    for r in records:
        pool = pool_of(r)
        gold = record_gold(r)
        rng = random.Random(xxhash.xxh64_intdigest(f"{seed}:{r['id']}:{r['cate']}".encode()))
        orders = [list(pool)]
        for _ in range(shuffle_variants):
            order = list(pool)
            rng.shuffle(order)
            orders.append(order)
        for v, order in enumerate(orders):
            chunks = chunk(order, split_num)
            empty = [c for c, rels in enumerate(chunks) if gold.keys().isdisjoint(rels)]
            if max_empty_chunks is not None and len(empty) > max_empty_chunks:
                capped = set(empty) - set(rng.sample(empty, max_empty_chunks))
                if skipped is not None:
                    skipped[0] += len(capped)
            else:
                capped = set()
            for c, rels in enumerate(chunks):
                yield {"id": f"{r['id']}-{r['cate']}-{v}-{c}", "record_id": r["id"], "cate": r["cate"],
                       "stratum": r.get("stratum"), "source": r["source"], "variant": v, "chunk": c,
                       "instruction": _instruction_json(INSTRUCTIONS[_lang(r["cate"])], rels, r["text"]),
                       "output": _output_json(rels, gold),
                       "positives": 0 if c in empty else sum(len(gold.get(rel, ())) for rel in rels),
                       "capped": c in capped}
