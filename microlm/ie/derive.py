"""Stage B1, step 04 (derive): IEPile-style schema-conditioned instructions.

For each record, its topic's relation list is cut into chunks of at most ``split_num`` relations;
each chunk becomes one example whose instruction is a JSON string ``{"instruction", "schema",
"input"}`` and whose expected output is a JSON string ``{"<relation>": [{"subject", "object"}],
...}`` over exactly the chunk's relations — relations absent from the text get ``[]``, so the
model learns to say "nothing" as well as to extract (IEPile, Gui et al. 2024).  ``shuffle_variants``
adds copies with the relations in another order.  ``max_empty_chunks`` caps the all-empty chunks
per record and variant (IEPile samples its negatives too; ``None`` keeps them all) — the kept ones are
drawn by a seeded hash, so the cap is deterministic.  The relation pool of a schema topic is its
schema; the pool of the extra topic (unmapped relations) is what that source uses under it.
"""

from __future__ import annotations

import json
import random
from collections.abc import Callable, Iterable, Iterator

import xxhash

__all__ = ["INSTRUCTIONS", "derive_examples", "chunk"]

INSTRUCTIONS = {
    "zh": ("你是专门进行关系抽取的专家。请从input中抽取出符合schema定义的关系三元组，schema中的关系在input中不存在时"
           "返回空列表。请以JSON字符串的形式回答。"),
    "en": ("You are an expert in relation extraction. Extract the relation triples defined by the schema from the "
           "input; give an empty list for a schema relation the input does not contain. Answer with a JSON string."),
}


def chunk(items: list[str], size: int) -> list[list[str]]:
    return [items[i:i + size] for i in range(0, len(items), size)]


def _lang(topic: str) -> str:
    return "en" if topic.isascii() else "zh"


def derive_examples(records: Iterable[dict], pool_of: Callable[[dict], list[str]], *, split_num: int,
                    shuffle_variants: int, seed: int, max_empty_chunks: int | None = None,
                    skipped: list[int] | None = None) -> Iterator[dict]:
    """One example per (record, chunk, variant); ``records`` are stratified record dicts and
    ``pool_of(record)`` is the ordered relation list its instructions draw from; the number of empty
    chunks left out by ``max_empty_chunks`` is added to ``skipped[0]`` when a list is given."""
    for r in records:
        pool = pool_of(r)
        gold: dict[str, list[dict]] = {}
        for t in r["relation"]:
            pair = {"subject": t["head"], "object": t["tail"]}
            if pair not in gold.setdefault(t["relation"], []):
                gold[t["relation"]].append(pair)
        rng = random.Random(xxhash.xxh64_intdigest(f"{seed}:{r['id']}:{r['cate']}".encode()))
        orders = [list(pool)]
        for _ in range(shuffle_variants):
            order = list(pool)
            rng.shuffle(order)
            orders.append(order)
        for v, order in enumerate(orders):
            chunks = chunk(order, split_num)
            empty = [c for c, rels in enumerate(chunks) if not any(rel in gold for rel in rels)]
            if max_empty_chunks is not None and len(empty) > max_empty_chunks:
                drop = set(empty) - set(rng.sample(empty, max_empty_chunks))
                if skipped is not None:
                    skipped[0] += len(drop)
            else:
                drop = set()
            for c, rels in enumerate(chunks):
                if c in drop:
                    continue
                instruction = {"instruction": INSTRUCTIONS[_lang(r["cate"])], "schema": rels, "input": r["text"]}
                output = {rel: gold.get(rel, []) for rel in rels}
                yield {"id": f"{r['id']}-{r['cate']}-{v}-{c}", "record_id": r["id"], "cate": r["cate"],
                       "stratum": r.get("stratum"), "source": r["source"], "variant": v, "chunk": c,
                       "instruction": json.dumps(instruction, ensure_ascii=False),
                       "output": json.dumps(output, ensure_ascii=False),
                       "positives": sum(len(x) for x in output.values())}
