"""Stages B1–B2: the InstructIE data pipeline, steps 01–06 (``microlm ie-data --step N``).

Each step is a function of the config and the run folder that writes ``runs/<p>/ie_data/0N_*.jsonl``
and a stats file beside it; a step whose input is missing runs the step before it.  Built so far:
01 standardize (``microlm/ie/standardize.py``), 02 filter (``microlm/ie/filter.py``), 03 stratify, 04 derive
(``microlm/ie/derive.py``), 05 sample (``microlm/ie/sample.py``), 06 render (``microlm/ie/render.py``).
"""

from __future__ import annotations

import glob
import json
import time
from collections import Counter
from pathlib import Path

from microlm.config import Config
from microlm.errors import MicroLMError
from microlm.io import atomic_open, write_json

__all__ = ["STEPS", "ie_sources", "step_standardize", "step_filter", "step_stratify", "step_derive", "step_sample", "step_render",
           "render_counters", "read_jsonl", "read_records", "run_step"]

STEPS = {1: "standardize", 2: "filter", 3: "stratify", 4: "derive", 5: "sample", 6: "render"}


EMBEDDED = "microlm_embedded"  # source name of the project-written records


def ie_sources(cfg: Config) -> list[tuple[Path, str, str]]:
    """``(file, format, source name)`` for every file matched by ``ie_data.sources`` under the data
    root (the source name is the file's folder, or its stem for files directly under ``ie/``), then
    the project-written InstructIE records when ``ie_data.embedded`` (the only source without a data
    root)."""
    from microlm.data.sources import data_root
    from microlm.ie.standardize import ADAPTERS, EMBEDDED_RECORDS

    root = data_root(cfg.data.root)
    out = []
    for pattern, fmt in (cfg.ie_data.sources.items() if root is not None else ()):
        if fmt not in ADAPTERS:
            raise MicroLMError(f"ie_data.sources: unknown format {fmt!r} for {pattern!r} (known: {', '.join(ADAPTERS)})")
        files = sorted(glob.glob(str(root / pattern)))
        if not files:
            raise MicroLMError(f"ie_data.sources: {pattern!r} matches no file under {root}")
        for f in files:
            p = Path(f)
            name = p.parent.name if p.parent.name not in ("ie", "re_raw", "iepile_raw") else p.name.split(".")[0]
            out.append((p, fmt, name))
    if cfg.ie_data.embedded:
        out.append((EMBEDDED_RECORDS, "instructie", EMBEDDED))
    if not out:
        raise MicroLMError("no IE data: set MICROLM_DATA to the dataset bundle or keep ie_data.embedded: true")
    return out


def step_standardize(cfg: Config, out_dir: Path, sources: list[tuple[Path, str, str]] | None = None) -> dict:
    """01: every source file → ``01_standardized.jsonl`` (``IERecord`` per line) and
    ``01_standardize_stats.json`` (records and triples per source and topic, issues by reason with
    samples, per file)."""
    from microlm.ie.standardize import Issues, RelationMap, standardize_file

    t0 = time.time()
    sources = sources if sources is not None else ie_sources(cfg)
    rmap = RelationMap(unmapped_topic=cfg.ie_data.unmapped_topic)
    out_dir.mkdir(parents=True, exist_ok=True)
    per_file, by_topic, by_source = [], Counter(), Counter()
    all_issues = Issues(keep=cfg.ie_data.keep_samples)
    n = 0
    with atomic_open(out_dir / "01_standardized.jsonl") as f:
        for path, fmt, name in sources:
            issues = Issues(keep=cfg.ie_data.keep_samples)
            recs = standardize_file(path, fmt, name, rmap, issues)
            for r in recs:
                f.write(json.dumps(r.to_dict(), ensure_ascii=False) + "\n")
                by_topic[r.cate] += 1
                by_source[name] += 1
            n += len(recs)
            for reason, c in issues.counts.items():
                all_issues.counts[reason] += c
                for s in issues.samples.get(reason, []):
                    all_issues.add_sample(reason, s)
            per_file.append({"file": path.name, "source": name, "format": fmt, "records": len(recs),
                             "triples": sum(len(r.relation) for r in recs), "issues": issues.to_dict()})
    stats = {"step": "01_standardize", "records": n, "by_topic": dict(by_topic.most_common()),
             "by_source": dict(by_source.most_common()), "issues": all_issues.to_dict(), "files": per_file,
             "unmapped_topic": cfg.ie_data.unmapped_topic, "seconds": round(time.time() - t0, 2)}
    write_json(out_dir / "01_standardize_stats.json", stats)
    return stats


def read_jsonl(path: Path):
    """The rows of a step's JSONL output, as dicts."""
    with open(path, encoding="utf-8") as f:
        for line in f:
            yield json.loads(line)


def read_records(path: Path):
    """The rows of a step's JSONL output as ``IERecord`` (extra keys such as ``stratum`` are ignored)."""
    from microlm.ie.standardize import IERecord

    for d in read_jsonl(path):
        yield IERecord(d["id"], d["cate"], d["text"], d["relation"], d["source"])


def _require(out_dir: Path, name: str, step: int, cfg: Config) -> Path:
    """An earlier step's output, produced first when it is missing."""
    path = out_dir / name
    if not path.is_file():
        run_step(cfg, step, out_dir)
    return path


def step_filter(cfg: Config, out_dir: Path) -> dict:
    """02: ``01_standardized.jsonl`` → ``02_filtered.jsonl`` + ``02_filter_stats.json`` (records in and
    out by source and topic, drops by reason with samples)."""
    from microlm.ie.filter import filter_records
    from microlm.ie.standardize import Issues

    t0 = time.time()
    src = _require(out_dir, "01_standardized.jsonl", 1, cfg)
    d = cfg.ie_data
    schema = _schema(cfg)
    issues = Issues(keep=d.keep_samples)
    before_topic, before_source = Counter(), Counter()

    def counted():
        for r in read_records(src):
            before_topic[r.cate] += 1
            before_source[r.source] += 1
            yield r

    kept = filter_records(counted(), schema, extra_topic=d.unmapped_topic, min_chars=d.min_text_chars,
                          max_chars=d.max_text_chars, max_entity_chars=d.max_entity_chars,
                          near_threshold=d.near_dup_threshold, issues=issues, seed=cfg.seed)
    with atomic_open(out_dir / "02_filtered.jsonl") as f:
        for r in kept:
            f.write(json.dumps(r.to_dict(), ensure_ascii=False) + "\n")
    after_topic, after_source = Counter(r.cate for r in kept), Counter(r.source for r in kept)
    stats = {"step": "02_filter", "records_in": sum(before_topic.values()), "records": len(kept),
             "triples": sum(len(r.relation) for r in kept),
             "by_topic": {k: {"in": v, "out": after_topic.get(k, 0)} for k, v in before_topic.most_common()},
             "by_source": {k: {"in": v, "out": after_source.get(k, 0)} for k, v in before_source.most_common()},
             "issues": issues.to_dict(), "config": {k: getattr(d, k) for k in (
                 "min_text_chars", "max_text_chars", "max_entity_chars", "near_dup_threshold", "unmapped_topic")},
             "seconds": round(time.time() - t0, 2)}
    write_json(out_dir / "02_filter_stats.json", stats)
    return stats


def step_stratify(cfg: Config, out_dir: Path) -> dict:
    """03: statistics by topic × relation × source, and a stratum per record — its topic and its
    rarest relation (by triples of that topic), so sampling can reach the long tail.
    ``02_filtered.jsonl`` → ``03_stratified.jsonl`` (+ ``stratum``) and ``03_stratify_stats.json``."""
    t0 = time.time()
    src = _require(out_dir, "02_filtered.jsonl", 2, cfg)
    rel_count: Counter = Counter()
    topic_records, source_topic = Counter(), Counter()
    for r in read_records(src):
        topic_records[r.cate] += 1
        source_topic[(r.source, r.cate)] += 1
        for t in r.relation:
            rel_count[(r.cate, t["relation"])] += 1
    strata: Counter = Counter()
    with atomic_open(out_dir / "03_stratified.jsonl") as f:
        for r in read_records(src):
            rarest = min((t["relation"] for t in r.relation), key=lambda x: (rel_count[(r.cate, x)], x))
            stratum = f"{r.cate}:{rarest}"
            strata[stratum] += 1
            f.write(json.dumps({**r.to_dict(), "stratum": stratum}, ensure_ascii=False) + "\n")
    schema = _schema(cfg)
    relations: dict[str, dict[str, int]] = {}
    for (topic, rel), c in rel_count.most_common():
        relations.setdefault(topic, {})[rel] = c
    present = [c for t, c in topic_records.items() if c and t != cfg.ie_data.unmapped_topic]  # schema topics
    rare = cfg.ie_data.rare_relation_triples
    stats = {"step": "03_stratify", "records": sum(topic_records.values()),
             "by_topic": dict(topic_records.most_common()), "relations": relations,
             "by_source_topic": {f"{s}|{t}": c for (s, t), c in source_topic.most_common()},
             "strata": len(strata), "largest_strata": dict(strata.most_common(10)),
             "imbalance_max_over_min_topic": round(max(present) / min(present), 1) if present else None,
             "schema_topics_without_records": sorted(t for t in schema if t not in topic_records),
             "rare_relations": {f"{t}:{r}": c for (t, r), c in rel_count.items() if c < rare},
             "seconds": round(time.time() - t0, 2)}
    write_json(out_dir / "03_stratify_stats.json", stats)
    return stats


def _schema(cfg: Config) -> dict[str, list[str]]:
    """``ie_data.schema`` under the data root; without one, ``data/ie/embedded_schema_zh.json``."""
    from microlm.data.sources import data_root
    from microlm.ie.filter import load_schema

    from microlm.ie.standardize import EMBEDDED_SCHEMA

    root = data_root(cfg.data.root)
    if root is None:  # no bundle: the project's own schema (the relations its records use)
        return load_schema([EMBEDDED_SCHEMA])
    return load_schema(root / p for p in cfg.ie_data.schema)


def step_derive(cfg: Config, out_dir: Path) -> dict:
    """04: ``03_stratified.jsonl`` → ``04_derived.jsonl``: schema-conditioned instruction/output pairs
    (``microlm/ie/derive.py``) + ``04_derive_stats.json``."""
    from microlm.ie.derive import derive_examples

    t0 = time.time()
    src = _require(out_dir, "03_stratified.jsonl", 3, cfg)
    schema = _schema(cfg)
    extra_pools: dict[str, dict[str, None]] = {}  # source → relations it uses under the extra topic
    for r in read_jsonl(src):
        if r["cate"] not in schema:
            pool = extra_pools.setdefault(r["source"], {})
            pool.update(dict.fromkeys(sorted(t["relation"] for t in r["relation"])))

    def pool_of(r: dict) -> list[str]:
        return schema[r["cate"]] if r["cate"] in schema else sorted(extra_pools[r["source"]])

    d = cfg.ie_data
    n, empty, by_topic, positives, skipped = 0, 0, Counter(), 0, [0]
    with atomic_open(out_dir / "04_derived.jsonl") as f:
        for ex in derive_examples(read_jsonl(src), pool_of, split_num=d.split_num,
                                  shuffle_variants=d.shuffle_variants, seed=cfg.seed,
                                  max_empty_chunks=d.max_empty_chunks, skipped=skipped):
            f.write(json.dumps(ex, ensure_ascii=False) + "\n")
            n += 1
            empty += ex["positives"] == 0
            positives += ex["positives"]
            by_topic[ex["cate"]] += 1
    stats = {"step": "04_derive", "records": n, "examples": n, "by_topic": dict(by_topic.most_common()),
             "empty_output_share": round(empty / max(n, 1), 4), "positive_pairs": positives,
             "split_num": d.split_num, "shuffle_variants": d.shuffle_variants,
             "max_empty_chunks": d.max_empty_chunks, "empty_chunks_left_out": skipped[0],
             "extra_topic_pools": {k: len(v) for k, v in extra_pools.items()}, "seconds": round(time.time() - t0, 2)}
    write_json(out_dir / "04_derive_stats.json", stats)
    return stats


def step_sample(cfg: Config, out_dir: Path) -> dict:
    """05: ``04_derived.jsonl`` → ``05_{train,val,test}.jsonl`` (split by text, stratified) and
    ``05_eval_prompts.jsonl`` (the fixed evaluation prompts with gold answers) + ``05_sample_stats.json``."""
    from microlm.ie.sample import assign_splits, pick_eval_prompts

    t0 = time.time()
    src = _require(out_dir, "04_derived.jsonl", 4, cfg)
    d = cfg.ie_data
    strata: dict[str, str] = {}
    for e in read_jsonl(src):
        strata.setdefault(e["record_id"], e["stratum"] or e["cate"])
    split_of = assign_splits(strata, d.val_fraction, d.test_fraction, cfg.seed)
    counts: dict[str, Counter] = {k: Counter() for k in ("train", "val", "test")}
    texts: dict[str, set] = {k: set() for k in counts}
    test_examples = []
    with atomic_open(out_dir / "05_train.jsonl") as ftr, atomic_open(out_dir / "05_val.jsonl") as fva, \
            atomic_open(out_dir / "05_test.jsonl") as fte:
        files = {"train": ftr, "val": fva, "test": fte}
        for e in read_jsonl(src):
            split = split_of[e["record_id"]]
            files[split].write(json.dumps(e, ensure_ascii=False) + "\n")
            counts[split][e["cate"]] += 1
            texts[split].add(e["record_id"])
            if split == "test":
                test_examples.append(e)
    shared = (texts["train"] & texts["val"]) | (texts["train"] & texts["test"]) | (texts["val"] & texts["test"])
    if shared:  # by construction impossible; a broken invariant must not pass silently
        raise MicroLMError(f"{len(shared)} texts are in more than one split")
    prompts = pick_eval_prompts(test_examples, d.eval_prompts, d.unmapped_topic, cfg.seed)
    with atomic_open(out_dir / "05_eval_prompts.jsonl") as f:
        for e in prompts:
            f.write(json.dumps(e, ensure_ascii=False) + "\n")
    stats = {"step": "05_sample", "records": sum(sum(c.values()) for c in counts.values()),
             "by_topic": dict(sum(counts.values(), Counter()).most_common()),
             "splits": {k: {"examples": sum(c.values()), "texts": len(texts[k]), "by_topic": dict(c.most_common())}
                        for k, c in counts.items()},
             "texts_shared_between_splits": 0,
             "eval_prompts": {"n": len(prompts), "by_topic": dict(Counter(e["cate"] for e in prompts).most_common())},
             "seed": cfg.seed, "seconds": round(time.time() - t0, 2)}
    if len(prompts) < d.eval_prompts:
        stats["eval_prompts"]["short_by"] = d.eval_prompts - len(prompts)
    write_json(out_dir / "05_sample_stats.json", stats)
    return stats


def render_counters(cfg: Config) -> list:
    """Step 06's tokenizers: Qwen2.5 (``$MICROLM_DATA/tokenizers/qwen2.5``, when there) and this
    profile's MicroLM tokenizer (``runs/<p>/tokenizer``, built when missing)."""
    from microlm.ie.render import TokenCounter
    from microlm.stages import upstream
    from microlm.tokenizer import Tokenizer
    from microlm.tokenizer.stage import load_hf_tokenizer, qwen_tokenizer_path

    out = []
    qwen = qwen_tokenizer_path(cfg)
    if qwen is not None:
        out.append(TokenCounter.hf("qwen2.5", load_hf_tokenizer(qwen)))
    out.append(TokenCounter.microlm(Tokenizer.load(upstream("tokenizer", cfg))))
    return out


def step_render(cfg: Config, out_dir: Path, counters: list | None = None, batch: int = 2048) -> dict:
    """06: ``05_{train,val,test,eval_prompts}.jsonl`` → ``06_*.jsonl`` chat lines (``messages``, and
    ``tokens`` per tokenizer where measured) + ``06_render_stats.json``.  Examples over
    ``cutoff_tokens`` under Qwen2.5 are dropped and counted; evaluation prompts are never dropped
    (the set stays fixed) — their over-cutoff count is reported."""
    import xxhash

    from microlm.ie.render import dumps, length_summary, render_example

    t0 = time.time()
    d = cfg.ie_data
    inputs = {s: _require(out_dir, f"05_{s}.jsonl", 5, cfg) for s in ("train", "val", "test", "eval_prompts")}
    counters = counters if counters is not None else render_counters(cfg)
    limits = {"qwen2.5": {"cutoff": d.cutoff_tokens}, "microlm": {"context": cfg.model.max_seq_len}}
    splits, tokens, by_topic = {}, {}, Counter()
    for split, src in inputs.items():
        n_in = sum(1 for _ in open(src, encoding="utf-8"))
        sample = d.token_sample if split == "train" and 0 < d.token_sample < n_in else 0
        lengths: dict[str, list[int]] = {c.name: [] for c in counters}
        kept = dropped = measured = 0
        prompt_only = split == "eval_prompts"

        def flush(buf: list[dict], f) -> None:
            nonlocal kept, dropped, measured
            todo = [ln for ln in buf if not sample or
                    xxhash.xxh64_intdigest(f"{cfg.seed}:{ln['id']}".encode()) % n_in < sample]
            for c in counters:
                for ln, n in zip(todo, c.count(todo), strict=True):
                    ln.setdefault("tokens", {})[c.name] = n
                    lengths[c.name].append(n)
            measured += len(todo)
            for ln in buf:
                if not prompt_only and ln.get("tokens", {}).get("qwen2.5", 0) > d.cutoff_tokens:
                    dropped += 1
                    continue
                kept += 1
                by_topic[ln["cate"]] += not prompt_only
                f.write(dumps(ln))

        with atomic_open(out_dir / f"06_{split}.jsonl") as f:
            buf: list[dict] = []
            for e in read_jsonl(src):
                buf.append(render_example(e, prompt_only=prompt_only))
                if len(buf) >= batch:
                    flush(buf, f)
                    buf = []
            flush(buf, f)
        splits[split] = {"in": n_in, "out": kept, "dropped_over_cutoff": dropped, "measured": measured}
        tokens[split] = {c.name: length_summary(lengths[c.name], limits.get(c.name, {})) for c in counters}
    stats = {"step": "06_render", "records": sum(splits[k]["out"] for k in ("train", "val", "test")),
             "by_topic": dict(by_topic.most_common()), "splits": splits, "tokens": tokens,
             "tokenizers": [c.name for c in counters], "cutoff_tokens": d.cutoff_tokens,
             "cutoff_applied": any(c.name == "qwen2.5" for c in counters),
             "microlm_context": cfg.model.max_seq_len, "token_sample": d.token_sample,
             "seconds": round(time.time() - t0, 2)}
    write_json(out_dir / "06_render_stats.json", stats)
    return stats


def run_step(cfg: Config, step: int, out_dir: Path | None = None) -> dict:
    out_dir = out_dir or cfg.run_path / "ie_data"
    if step == 1:
        return step_standardize(cfg, out_dir)
    if step == 2:
        return step_filter(cfg, out_dir)
    if step == 3:
        return step_stratify(cfg, out_dir)
    if step == 4:
        return step_derive(cfg, out_dir)
    if step == 5:
        return step_sample(cfg, out_dir)
    if step == 6:
        return step_render(cfg, out_dir)
    raise MicroLMError(f"ie-data steps are 1–6, got {step}")
