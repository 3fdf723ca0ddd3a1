"""The InstructIE data pipeline, steps 01–06: what the ``ie_data`` stage (B1–B2) runs, or one step
of it with ``microlm ie-data --step N``.

Each step is a function of the pipeline's settings (``IEPipeline``) and the stage's folder that writes
``0N_*.jsonl`` and a stats file there; a step whose input is missing runs the step before it.  The
steps: 01 standardize (``microlm/ie/standardize.py``), 02 filter (``microlm/ie/filter.py``), 03
stratify, 04 derive (``microlm/ie/derive.py``), 05 sample (``microlm/ie/sample.py``), 06 render
(``microlm/ie/render.py``).

Nothing empty passes silently: an IE source that cannot hold a record (empty, one JSON array instead of
JSON lines, a cut .gz), sources that give no usable record, a step that would keep nothing and an empty
input of a step are one-line errors naming the file and what to do (the empty file is never put in
place); an empty validation, test or prompt split is logged as a warning.
"""

from __future__ import annotations

import glob
import gzip
import logging
import time
import zlib
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import xxhash

from microlm.errors import MicroLMError
from microlm.ie.derive import derive_examples, derive_iepile
from microlm.ie.filter import filter_records, load_schema
from microlm.ie.render import TokenCounter, length_summary, render_example
from microlm.ie.sample import assign_splits, pick_eval_prompts
from microlm.ie.standardize import (
    ADAPTERS,
    EMBEDDED_RECORDS,
    EMBEDDED_SCHEMA,
    IERecord,
    Issues,
    RelationMap,
    standardize_file,
)
from microlm.io import atomic_open, batched, iter_json_lines, json_line, ordered_map, read_jsonl, write_json
from microlm.tokenizer import Tokenizer
from microlm.tokenizer.training import load_hf_tokenizer, qwen_tokenizer_path

log = logging.getLogger("microlm")

__all__ = ["STEPS", "IEPipeline", "ie_sources", "step_standardize", "step_filter", "step_stratify", "step_derive", "step_sample", "step_render",
           "render_counters", "schema_paths", "read_records", "run_step"]

STEPS = {1: "standardize", 2: "filter", 3: "stratify", 4: "derive", 5: "sample", 6: "render"}
STEP_INPUTS = {2: "01_standardized.jsonl", 3: "02_filtered.jsonl", 4: "03_stratified.jsonl", 5: "04_derived.jsonl",
               6: "05_*.jsonl"}
PROMPT_SPLITS = ("eval_prompts", "test_iepile")  # rendered without the answer (gold kept beside the messages)


EMBEDDED = "microlm_embedded"  # source name of the project-written records


@dataclass(frozen=True)
class IEPipeline:
    """What the six steps read: ``d``, the ``ie_data`` settings; ``root``, the data bundle's folder
    (``None``: the project-written records only); the seed; MicroLM's context (step 06 counts the
    examples that would not fit it)."""

    d: Any
    root: Path | None
    seed: int
    microlm_context: int


def ie_sources(ps: IEPipeline) -> list[tuple[Path, str, str]]:
    """``(file, format, source name)`` for every file matched by ``ie_data.sources`` under the data
    root (the source name is the file's folder, or its stem for files directly under ``ie/``), then
    the project-written InstructIE records when ``ie_data.embedded`` (the only source without a data
    root)."""
    root = ps.root
    out = []
    for pattern, fmt in (ps.d.sources.items() if root is not None else ()):
        if fmt not in ADAPTERS:
            raise MicroLMError(f"ie_data.sources: unknown format {fmt!r} for {pattern!r} (known: {', '.join(ADAPTERS)})")
        files = sorted(glob.glob(str(root / pattern)))
        if not files:
            raise MicroLMError(f"ie_data.sources: {pattern!r} matches no file under {root}")
        for f in files:
            p = Path(f)
            name = p.parent.name if p.parent.name not in ("ie", "re_raw", "iepile_raw") else p.name.split(".")[0]
            out.append((p, fmt, name))
    if ps.d.embedded:
        out.append((EMBEDDED_RECORDS, "instructie", EMBEDDED))
    if not out:
        raise MicroLMError("no IE data: set MICROLM_DATA to the dataset bundle or keep ie_data.embedded: true")
    return out


def step_standardize(ps: IEPipeline, out_dir: Path, sources: list[tuple[Path, str, str]] | None = None) -> dict:
    """01: every source file → ``01_standardized.jsonl`` (``IERecord`` per line) and
    ``01_standardize_stats.json`` (records and triples per source and topic, issues by reason with
    samples, per file)."""
    t0 = time.time()
    sources = sources if sources is not None else ie_sources(ps)
    rmap = RelationMap(unmapped_topic=ps.d.unmapped_topic)
    out_dir.mkdir(parents=True, exist_ok=True)
    per_file, by_topic, by_source = [], Counter(), Counter()
    all_issues = Issues(keep=ps.d.keep_samples)
    n = 0
    with atomic_open(out_dir / "01_standardized.jsonl") as f:
        for path, fmt, name in sources:
            issues = Issues(keep=ps.d.keep_samples)
            n_file = n_triples = 0
            try:
                for r in standardize_file(path, fmt, name, rmap, issues):
                    f.write(json_line(r.to_dict()))
                    by_topic[r.cate] += 1
                    n_file += 1
                    n_triples += len(r.relation)
            except (EOFError, gzip.BadGzipFile, zlib.error) as e:  # a cut or damaged .gz (not a failed write)
                raise MicroLMError(f"IE source {path} cannot be read ({e}): the file is cut or damaged — "
                                   f"download it again, or drop it from ie_data.sources") from None
            by_source[name] += n_file
            n += n_file
            for reason, c in issues.counts.items():
                all_issues.counts[reason] += c
                for s in issues.samples.get(reason, []):
                    all_issues.add_sample(reason, s)
            per_file.append({"file": path.name, "source": name, "format": fmt, "records": n_file,
                             "triples": n_triples, "issues": issues.to_dict()})
            if n_file == 0:
                log.warning("ie_data: IE source %s gave no record (%s); see 01_standardize_stats.json", path,
                            _reasons(issues) or "no issue counted")
        if n == 0:  # raised inside the block: no empty 01_standardized.jsonl is left for step 02 to read
            raise MicroLMError(f"the IE sources give no usable record ({_reasons(all_issues) or 'no issue counted'}) "
                               f"in {', '.join(str(p) for p, _, _ in sources)}: check the files' format against "
                               f"ie_data.sources")
    stats = {"step": "01_standardize", "records": n, "by_topic": dict(by_topic.most_common()),
             "by_source": dict(by_source.most_common()), "issues": all_issues.to_dict(), "files": per_file,
             "unmapped_topic": ps.d.unmapped_topic, "seconds": round(time.time() - t0, 2)}
    write_json(out_dir / "01_standardize_stats.json", stats)
    return stats


def _lines_and_rows(path: Path):
    for _, line, row in iter_json_lines(path):
        yield line, row


def read_records(path: Path):
    """The rows of a step's JSONL output as ``IERecord`` (extra keys such as ``stratum`` are ignored)."""
    for n, d in enumerate(read_jsonl(path), 1):
        try:
            yield IERecord(d["id"], d["cate"], d["text"], d["relation"], d["source"])
        except KeyError as e:
            raise MicroLMError(f"{path}:{n}: a record without the key {e}; the file is damaged — run the step "
                               f"that writes it again") from None


def _reasons(issues: Issues, n: int = 3) -> str:
    """The most frequent issue reasons, ``"malformed_json × 12, ..."``."""
    return ", ".join(f"{r} × {c:,}" for r, c in issues.counts.most_common(n))


def _require(out_dir: Path, name: str, step: int, ps, *, empty_ok: bool = False) -> Path:
    """An earlier step's output, produced first when it is missing.  An empty one means that step
    produced nothing: a one-line error (``empty_ok``: allowed — a validation or test split may be
    empty; the step reading it warns about its own empty output)."""
    path = out_dir / name
    if not path.is_file():
        run_step(ps, step, out_dir)
    if not empty_ok and path.stat().st_size == 0:
        raise MicroLMError(f"{path} holds no records: step {step} ({STEPS[step]}) produced nothing — see "
                           f"0{step}_{STEPS[step]}_stats.json and run `microlm ie-data --step {step}` again "
                           f"(or the stage with --force)")
    return path


def _none_written(step: int, path: Path, why: str) -> MicroLMError:
    """The error of a step that would write an empty ``path`` (raised inside its ``atomic_open``, so
    the empty file is never put in place for the next step to read)."""
    return MicroLMError(f"step 0{step} ({STEPS[step]}) would write an empty {path.name}: {why}")


def _warn_empty(path: Path, why: str) -> None:
    log.warning("ie_data: %s holds no example: %s", path, why)


def step_filter(ps: IEPipeline, out_dir: Path) -> dict:
    """02: ``01_standardized.jsonl`` → ``02_filtered.jsonl`` + ``02_filter_stats.json`` (records in and
    out by source and topic, drops by reason with samples)."""
    t0 = time.time()
    src = _require(out_dir, "01_standardized.jsonl", 1, ps)
    d = ps.d
    schema = _schema(ps)
    issues = Issues(keep=d.keep_samples)
    before_topic, before_source = Counter(), Counter()

    def counted():
        for r in read_records(src):
            before_topic[r.cate] += 1
            before_source[r.source] += 1
            yield r

    kept = filter_records(counted(), schema, extra_topic=d.unmapped_topic, min_chars=d.min_text_chars,
                          max_chars=d.max_text_chars, max_entity_chars=d.max_entity_chars,
                          near_threshold=d.near_dup_threshold, issues=issues, seed=ps.seed,
                          workers=d.workers)
    after_topic, after_source, n_kept, n_triples = Counter(), Counter(), 0, 0
    with atomic_open(out_dir / "02_filtered.jsonl") as f:
        for r in kept:
            f.write(json_line(r.to_dict()))
            after_topic[r.cate] += 1
            after_source[r.source] += 1
            n_kept += 1
            n_triples += len(r.relation)
        if n_kept == 0:
            raise MicroLMError(f"step 02 (filter) kept no record of {sum(before_topic.values()):,} "
                               f"({_reasons(issues) or 'no drop counted'}): loosen ie_data.min_text_chars, "
                               f"max_text_chars, max_entity_chars or near_dup_threshold, or check the schema "
                               f"(ie_data.schema) against the sources' topics and relations")
    stats = {"step": "02_filter", "records_in": sum(before_topic.values()), "records": n_kept,
             "triples": n_triples,
             "by_topic": {k: {"in": v, "out": after_topic.get(k, 0)} for k, v in before_topic.most_common()},
             "by_source": {k: {"in": v, "out": after_source.get(k, 0)} for k, v in before_source.most_common()},
             "issues": issues.to_dict(), "config": {k: getattr(d, k) for k in (
                 "min_text_chars", "max_text_chars", "max_entity_chars", "near_dup_threshold", "unmapped_topic")},
             "seconds": round(time.time() - t0, 2)}
    write_json(out_dir / "02_filter_stats.json", stats)
    return stats


def step_stratify(ps: IEPipeline, out_dir: Path) -> dict:
    """03: statistics by topic × relation × source, and a stratum per record — its topic and its
    rarest relation (by triples of that topic), so sampling can reach the long tail.  A record that a
    source gives more than once (the same id and topic: e.g. one TSV line per fact of a sentence, the
    lines apart) becomes one record with the union of its triples, at its first position.
    ``02_filtered.jsonl`` → ``03_stratified.jsonl`` (+ ``stratum``) and ``03_stratify_stats.json``."""
    t0 = time.time()
    src = _require(out_dir, "02_filtered.jsonl", 2, ps)
    triples: dict[tuple[str, str], dict] = {}  # (id, topic) → its triples, each once, in order
    copies: Counter = Counter()
    for r in read_jsonl(src):
        key = (r["id"], r["cate"])
        copies[key] += 1
        seen = triples.setdefault(key, {})
        for t in r["relation"]:
            seen.setdefault((t["head"], t["relation"], t["tail"]), t)
    rel_count: Counter = Counter()
    topic_records, source_topic = Counter(), Counter()
    merged = sum(c - 1 for c in copies.values())
    kept: dict[tuple[str, str], dict] = {}  # (id, topic) → the record (its first copy, all triples), in order
    for line, r in _lines_and_rows(src):
        key = (r["id"], r["cate"])
        if key in kept:
            continue  # a later copy: merged into the first
        if copies[key] > 1:
            r = {**r, "relation": list(triples[key].values())}
        topic_records[r["cate"]] += 1
        source_topic[(r["source"], r["cate"])] += 1
        for t in r["relation"]:
            rel_count[(r["cate"], t["relation"])] += 1
        r["_line"] = line if copies[key] == 1 else None
        kept[key] = r
    del triples
    # a stratum needs every record's counts first
    with atomic_open(out_dir / "03_stratified.jsonl") as f:
        by_stratum: Counter = Counter()
        for r in kept.values():
            cate = r["cate"]
            rarest = min((t["relation"] for t in r["relation"]), key=lambda x: (rel_count[(cate, x)], x))
            stratum = f"{cate}:{rarest}"
            by_stratum[stratum] += 1
            line = r.pop("_line")
            if line is not None:
                f.write(line.rstrip()[:-1] + ',"stratum":' + json_line(stratum)[:-1] + "}\n")  # the row + its stratum
            else:
                f.write(json_line({**r, "stratum": stratum}))
    schema = _schema(ps)
    relations: dict[str, dict[str, int]] = {}
    for (topic, rel), c in rel_count.most_common():
        relations.setdefault(topic, {})[rel] = c
    present = [c for t, c in topic_records.items() if c and t != ps.d.unmapped_topic]  # schema topics
    rare = ps.d.rare_relation_triples
    stats = {"step": "03_stratify", "records": sum(topic_records.values()), "duplicate_records_merged": merged,
             "by_topic": dict(topic_records.most_common()), "relations": relations,
             "by_source_topic": {f"{s}|{t}": c for (s, t), c in source_topic.most_common()},
             "strata": len(by_stratum), "largest_strata": dict(by_stratum.most_common(10)),
             "imbalance_max_over_min_topic": round(max(present) / min(present), 1) if present else None,
             "schema_topics_without_records": sorted(t for t in schema if t not in topic_records),
             "rare_relations": {f"{t}:{r}": c for (t, r), c in rel_count.items() if c < rare},
             "seconds": round(time.time() - t0, 2)}
    write_json(out_dir / "03_stratify_stats.json", stats)
    return stats


def schema_paths(ps: IEPipeline) -> list[Path]:
    """``ie_data.schema`` under the data root; without one, ``data/ie/embedded_schema_zh.json``
    (the project's own schema: the relations its records use)."""
    root = ps.root
    return [EMBEDDED_SCHEMA] if root is None else [root / p for p in ps.d.schema]


def _schema(ps: IEPipeline) -> dict[str, list[str]]:
    return load_schema(schema_paths(ps))


_WORK: dict = {}  # what the forked workers of ``ordered_map`` need (set before the pool starts)


def _derive_chunk(rows: list[dict]) -> tuple[str, dict]:
    skipped, lines = [0], []
    st = {"n": 0, "empty": 0, "positives": 0, "by_topic": Counter()}
    for ex in derive_examples(rows, _WORK["pool_of"], skipped=skipped, **_WORK["kw"]):
        lines.append(json_line(ex))
        st["empty"] += ex["positives"] == 0
        st["positives"] += ex["positives"]
        st["by_topic"][ex["cate"]] += 1
    st["n"], st["skipped"] = len(lines), skipped[0]
    return "".join(lines), st


def _pools(ps: IEPipeline, src: Path):
    """``pool_of(record)``: the ordered relation list a record's instructions draw from — its topic's
    schema, or for the extra topic the relations its source uses under it (read from ``src``)."""
    schema = _schema(ps)
    extra_pools: dict[str, dict[str, None]] = {}  # source → relations it uses under the extra topic
    for r in read_jsonl(src):
        if r["cate"] not in schema:
            pool = extra_pools.setdefault(r["source"], {})
            pool.update(dict.fromkeys(sorted(t["relation"] for t in r["relation"])))

    def pool_of(r: dict) -> list[str]:
        return schema[r["cate"]] if r["cate"] in schema else sorted(extra_pools[r["source"]])

    return pool_of, {k: len(v) for k, v in extra_pools.items()}


def step_derive(ps: IEPipeline, out_dir: Path) -> dict:
    """04: ``03_stratified.jsonl`` → ``04_derived.jsonl``: schema-conditioned instruction/output pairs
    (``microlm/ie/derive.py``) + ``04_derive_stats.json``."""
    t0 = time.time()
    src = _require(out_dir, "03_stratified.jsonl", 3, ps)
    pool_of, extra_pools = _pools(ps, src)
    d = ps.d
    _WORK.clear()
    _WORK.update(pool_of=pool_of, kw={"split_num": d.split_num, "shuffle_variants": d.shuffle_variants,
                                      "seed": ps.seed, "max_empty_chunks": d.max_empty_chunks})
    n, empty, by_topic, positives, skipped = 0, 0, Counter(), 0, 0
    with atomic_open(out_dir / "04_derived.jsonl") as f:
        for text, st in ordered_map(_derive_chunk, batched(read_jsonl(src), 1000), d.workers):
            f.write(text)
            n += st["n"]
            empty += st["empty"]
            positives += st["positives"]
            skipped += st["skipped"]
            by_topic.update(st["by_topic"])
        if n == 0:
            raise _none_written(4, out_dir / "04_derived.jsonl", f"no record of {src} gave an example")
    stats = {"step": "04_derive", "records": n, "examples": n, "by_topic": dict(by_topic.most_common()),
             "empty_output_share": round(empty / max(n, 1), 4), "positive_pairs": positives,
             "split_num": d.split_num, "shuffle_variants": d.shuffle_variants,
             "max_empty_chunks": d.max_empty_chunks, "empty_chunks_capped": skipped,
             "extra_topic_pools": extra_pools, "seconds": round(time.time() - t0, 2)}
    write_json(out_dir / "04_derive_stats.json", stats)
    return stats


def step_sample(ps: IEPipeline, out_dir: Path) -> dict:
    """05: ``04_derived.jsonl`` → ``05_{train,val,test}.jsonl`` (split by text, stratified; chunks capped
    by ``max_empty_chunks`` are left out of train and val only), ``05_test_iepile.jsonl`` (every test
    record under IEPile's own test chunking, with its whole relation list) and ``05_eval_prompts.jsonl``
    (the fixed evaluation prompts with gold answers) + ``05_sample_stats.json``."""
    t0 = time.time()
    src = _require(out_dir, "04_derived.jsonl", 4, ps)
    d = ps.d
    strata: dict[str, str] = {}
    for e in read_jsonl(src):
        strata.setdefault(e["record_id"], e["stratum"] or e["cate"])
    topics = {s.split(":")[0] for s in strata.values()}
    split_of = assign_splits(strata, d.val_fraction, d.test_fraction, ps.seed,
                             min_test=-(-d.eval_prompts // max(1, len(topics))))
    counts: dict[str, Counter] = {k: Counter() for k in ("train", "val", "test")}
    texts: dict[str, set] = {k: set() for k in counts}
    capped = Counter()
    test_examples = []
    with atomic_open(out_dir / "05_train.jsonl") as ftr, atomic_open(out_dir / "05_val.jsonl") as fva, \
            atomic_open(out_dir / "05_test.jsonl") as fte:
        files = {"train": ftr, "val": fva, "test": fte}
        for line, e in _lines_and_rows(src):
            split = split_of[e["record_id"]]
            texts[split].add(e["record_id"])
            if e.get("capped") and split != "test":  # negatives are sampled for training, never for testing
                capped[split] += 1
                continue
            files[split].write(line)  # the row as derived, not re-encoded
            counts[split][e["cate"]] += 1
            if split == "test":
                test_examples.append(e)
        if not counts["train"]:
            raise _none_written(5, out_dir / "05_train.jsonl", f"none of the {len(split_of):,} texts went to train "
                                f"(ie_data.val_fraction {d.val_fraction}, test_fraction {d.test_fraction})")
    for split in ("val", "test"):
        if not counts[split]:
            _warn_empty(out_dir / f"05_{split}.jsonl", f"no text went to {split} (ie_data.{split}_fraction "
                        f"{getattr(d, f'{split}_fraction')}; strata with < 3 texts go to train)")
    shared = (texts["train"] & texts["val"]) | (texts["train"] & texts["test"]) | (texts["val"] & texts["test"])
    if shared:  # by construction impossible; a broken invariant must not pass silently
        raise MicroLMError(f"{len(shared)} texts are in more than one split")
    prompts = pick_eval_prompts(test_examples, d.eval_prompts, d.unmapped_topic, ps.seed)
    with atomic_open(out_dir / "05_eval_prompts.jsonl") as f:
        for e in prompts:
            f.write(json_line(e))
    if not prompts:
        _warn_empty(out_dir / "05_eval_prompts.jsonl", "no test example has a gold pair (ie_eval needs them)")
    stratified = out_dir / "03_stratified.jsonl"
    pool_of, _ = _pools(ps, stratified)
    test_records = (r for r in read_jsonl(stratified) if split_of.get(r["id"]) == "test")
    iepile = Counter()
    with atomic_open(out_dir / "05_test_iepile.jsonl") as f:
        for e in derive_iepile(test_records, pool_of, split_num=d.split_num):
            f.write(json_line(e))
            iepile["examples"] += 1
            iepile["empty"] += e["positives"] == 0
    if not iepile["examples"]:
        _warn_empty(out_dir / "05_test_iepile.jsonl", "the test split holds no record")
    stats = {"step": "05_sample", "records": sum(sum(c.values()) for c in counts.values()),
             "by_topic": dict(sum(counts.values(), Counter()).most_common()),
             "splits": {k: {"examples": sum(c.values()), "texts": len(texts[k]), "by_topic": dict(c.most_common()),
                            "capped_empty_chunks_left_out": capped.get(k, 0)}
                        for k, c in counts.items()},
             "texts_shared_between_splits": 0,
             "test_empty_share": round(sum(1 for e in test_examples if e["positives"] == 0)
                                       / max(1, len(test_examples)), 4),
             "test_iepile": {"examples": iepile["examples"], "records": len(texts["test"]),
                             "empty_share": round(iepile["empty"] / max(1, iepile["examples"]), 4)},
             "eval_prompts": {"n": len(prompts), "by_topic": dict(Counter(e["cate"] for e in prompts).most_common())},
             "seed": ps.seed, "seconds": round(time.time() - t0, 2)}
    if len(prompts) < d.eval_prompts:
        stats["eval_prompts"]["short_by"] = d.eval_prompts - len(prompts)
    write_json(out_dir / "05_sample_stats.json", stats)
    return stats


def render_counters(ps: IEPipeline, tokenizer_dir: Path) -> list:
    """Step 06's tokenizers: Qwen2.5 (``$MICROLM_DATA/tokenizers/qwen2.5``, when there) and the
    MicroLM tokenizer in ``tokenizer_dir`` (the ``tokenizer`` stage's folder)."""
    out = []
    qwen = qwen_tokenizer_path(ps.root)
    if qwen is not None:
        out.append(TokenCounter.hf("qwen2.5", load_hf_tokenizer(qwen)))
    out.append(TokenCounter.microlm(Tokenizer.load(tokenizer_dir)))
    return out


def _render_chunk(rows: list[dict]) -> tuple[str, dict, dict, Counter]:
    """Render, measure (all, or the lines a seeded hash samples), drop over the cutoff under
    Qwen2.5 (evaluation prompts never); the kept lines as text + counts."""
    w = _WORK
    seed, n_in, k = w["sample"]
    buf = [render_example(e, prompt_only=w["prompt_only"]) for e in rows]
    todo = [ln for ln in buf if not k or xxhash.xxh64_intdigest(f"{seed}:{ln['id']}".encode()) % n_in < k]
    lengths: dict[str, list[int]] = {}
    for c in w["counters"]:
        lengths[c.name] = c.count(todo)
        for ln, n in zip(todo, lengths[c.name], strict=True):
            ln.setdefault("tokens", {})[c.name] = n
    counts = {"out": 0, "dropped_over_cutoff": 0, "measured": len(todo)}
    by_topic: Counter = Counter()
    lines = []
    for ln in buf:
        if not w["prompt_only"] and ln.get("tokens", {}).get("qwen2.5", 0) > w["cutoff"]:
            counts["dropped_over_cutoff"] += 1
            continue
        counts["out"] += 1
        by_topic[ln["cate"]] += not w["prompt_only"]
        lines.append(json_line(ln))
    return "".join(lines), counts, lengths, by_topic


def step_render(ps: IEPipeline, out_dir: Path, counters: list | None = None, batch: int = 1000, *,
                tokenizer_dir: Path | None = None) -> dict:
    """06: ``05_{train,val,test,eval_prompts}.jsonl`` → ``06_*.jsonl`` chat lines (``messages``, and
    ``tokens`` per tokenizer where measured) + ``06_render_stats.json``.  Examples over
    ``cutoff_tokens`` under Qwen2.5 are dropped and counted; evaluation prompts are always measured
    and never dropped (the set stays fixed) — their over-cutoff count is reported.  With
    ``token_sample`` > 0, about that many examples per split are measured (a seeded hash picks
    them) and only those can be dropped: the statistics are then estimates, as the file says."""
    t0 = time.time()
    d = ps.d
    inputs = {s: _require(out_dir, f"05_{s}.jsonl", 5, ps, empty_ok=s != "train")
              for s in ("train", "val", "test", *PROMPT_SPLITS)}
    if counters is None:
        if tokenizer_dir is None:
            raise MicroLMError("step 06 counts tokens with the MicroLM tokenizer: give its folder "
                               "(`microlm ie-data --step 6` builds the tokenizer stage first)")
        counters = render_counters(ps, tokenizer_dir)
    limits = {"qwen2.5": {"cutoff": d.cutoff_tokens}, "microlm": {"context": ps.microlm_context}}
    splits, tokens, by_topic = {}, {}, Counter()
    for split, src in inputs.items():
        with open(src, encoding="utf-8") as f:
            n_in = sum(1 for _ in f)
        sample = d.token_sample if split not in PROMPT_SPLITS and 0 < d.token_sample < n_in else 0
        lengths: dict[str, list[int]] = {c.name: [] for c in counters}
        splits[split] = {"in": n_in, "out": 0, "dropped_over_cutoff": 0, "measured": 0}
        _WORK.clear()
        _WORK.update(counters=counters, sample=(ps.seed, n_in, sample), prompt_only=split in PROMPT_SPLITS,
                     cutoff=d.cutoff_tokens)
        with atomic_open(out_dir / f"06_{split}.jsonl") as f:
            for text, counts, lens, topics in ordered_map(_render_chunk, batched(read_jsonl(src), batch), d.workers):
                f.write(text)
                for k, v in counts.items():
                    splits[split][k] += v
                for name, v in lens.items():
                    lengths[name].extend(v)
                by_topic.update(topics)
            if split == "train" and not splits[split]["out"]:
                raise _none_written(6, out_dir / "06_train.jsonl", f"all {n_in:,} examples are over "
                                    f"ie_data.cutoff_tokens ({d.cutoff_tokens}) under Qwen2.5")
        if not splits[split]["out"]:
            _warn_empty(out_dir / f"06_{split}.jsonl", f"its input {src.name} holds {n_in:,} examples"
                        + (f", {splits[split]['dropped_over_cutoff']:,} over ie_data.cutoff_tokens"
                           if splits[split]["dropped_over_cutoff"] else ""))
        tokens[split] = {c.name: length_summary(lengths[c.name], limits.get(c.name, {})) for c in counters}
    stats = {"step": "06_render", "records": sum(splits[k]["out"] for k in ("train", "val", "test")),
             "by_topic": dict(by_topic.most_common()), "splits": splits, "tokens": tokens,
             "tokenizers": [c.name for c in counters], "cutoff_tokens": d.cutoff_tokens,
             "cutoff_applied": any(c.name == "qwen2.5" for c in counters),
             "microlm_context": ps.microlm_context, "token_sample": d.token_sample,
             "seconds": round(time.time() - t0, 2)}
    write_json(out_dir / "06_render_stats.json", stats)
    return stats


def run_step(ps: IEPipeline, step: int, out_dir: Path, *, tokenizer_dir: Path | None = None) -> dict:
    """Step ``step`` (1–6) into ``out_dir`` (the ie_data stage's folder); its stats.  Step 6 needs
    ``tokenizer_dir``, the MicroLM tokenizer it measures lengths with."""
    fns = {1: step_standardize, 2: step_filter, 3: step_stratify, 4: step_derive, 5: step_sample}
    if step not in (*fns, 6):
        raise MicroLMError(f"ie-data steps are 1–6, got {step}")
    try:
        if step == 6:
            return step_render(ps, out_dir, tokenizer_dir=tokenizer_dir)
        return fns[step](ps, out_dir)
    except (KeyError, TypeError, ValueError) as e:
        if step == 1 or isinstance(e, MicroLMError):
            raise
        src = STEP_INPUTS[step]  # what the code expects of a row is what step N-1 wrote: the file is damaged
        raise MicroLMError(f"{out_dir / src}: a record of the wrong shape ({type(e).__name__}: {e}); the file is "
                           f"damaged — run `microlm ie-data --step {step - 1}` (or the stage with --force)") from None


