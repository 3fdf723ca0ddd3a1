"""The IE evaluation: model entries answer the IE evaluation prompts, scored, cached, summarised and
plotted (what the ``ie_eval`` stage, B4, runs for ``ie_eval.models``).

Where the two pipelines meet: a MicroLM model, a Hugging Face folder or hub id and a served
OpenAI-compatible endpoint (the backends of ``microlm.ie.answers``) all answer the same prompts,
greedily, and are scored by ``microlm.ie.metrics``; two floors computed without a model (all
relations ``[]``, and a rule pairing known entity strings found in the text) show what learning added.

Every answer is cached on disk (``.cache/<model>-<fingerprint>.jsonl``) as it comes, keyed by the
model's fingerprint (the content of its files — not where they lie — or its endpoint and model name),
the prompt and everything else that decides an answer (``max_new_tokens``, stop strings, dtype, batch
size, the versions of torch / transformers / peft), so an interrupted run keeps what it computed and
a re-run only computes what changed.  Each cached line carries the digest of its own content: a
damaged or hand-edited line is dropped and counted, never scored; ``force`` starts the cache over.
A prompt without gold, a prompt too long or one refused request is a counted error class; but a model
or adapter that cannot be loaded, or a row whose every answer failed at its endpoint, stops the run
with one line naming the row and the file — unless the row is ``optional``: then it is reported
*not run* (never a row of zeros) and left out of the comparisons.

Two **protocols** (``ie_eval.protocols``): ``ours`` asks the fixed evaluation prompts (one chunk of a
record each); ``iepile`` asks every chunk of the same records under IEPile's test chunking and scores
a record's merged answers against its whole relation list (``microlm.ie.metrics``).  A model entry's
``prompt: zero_shot`` describes the answer format in the system message (a model never trained on it
needs that), and every row is also scored fence-tolerantly, so a zero-shot row measures extraction,
not formatting.  The answer cap always holds the longest gold answer of the prompts asked (under the
model's own tokenizer), whatever ``max_new_tokens`` says.
"""

from __future__ import annotations

import contextlib
import csv
import hashlib
import json
import logging
import shutil
import time
import warnings
from collections import Counter, defaultdict
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

from microlm.errors import MicroLMError
from microlm.ie.answers import BACKENDS
from microlm.ie.metrics import (
    RuleFloor,
    aggregate,
    asked_relations,
    bootstrap,
    empty_answer,
    failure_kind,
    iepile_aggregate,
    iepile_bootstrap,
    iepile_paired_bootstrap,
    iepile_records,
    merge_records,
    paired_bootstrap,
    score_answer,
)
from microlm.ie.render import prompt_messages
from microlm.io import atomic_open, fingerprint, folder_files
from microlm.plotting import use_cjk_font

__all__ = ["load_prompts", "ref_stages", "model_fingerprint", "answer_settings", "AnswerCache", "RowFailed", "evaluate",
           "answer_cap", "FLOORS"]

log = logging.getLogger("microlm")

FLOORS = ("floor-empty", "floor-rule")

PROTOCOLS = ("ours", "iepile")


def default_pairs(names: list[str]) -> list[tuple[str, str]]:
    """Every pair once, as ``(A, B)`` = A − B: a model against each row listed before it (the config
    lists a base before its fine-tunes: LoRA − zero-shot, LoRA − no LoRA) and every model against each
    floor (the floors come last). A is read strictly, B fence-tolerantly, so the direction matters."""
    models = [n for n in names if n not in FLOORS]
    floors = [n for n in names if n in FLOORS]
    return ([(b, a) for i, a in enumerate(models) for b in models[i + 1:]] + [(m, f) for m in models for f in floors]
            + [(floors[j], floors[i]) for i in range(len(floors)) for j in range(i + 1, len(floors))])


# --------------------------------------------------------------------------------------------- prompts
def load_prompts(data_dir: Path, *, all_test: bool = False, limit: int = 0,
                 protocol: str = "ours") -> tuple[list[dict], Counter]:
    """The prompts of a protocol, each ``{id, record_id, cate, messages, asked, gold, input}``
    (IEPile's also ``record_gold``).  ``ours``: the evaluation prompts (``06_eval_prompts.jsonl``) or,
    ``all_test``, every first-variant chunk of the test split (``06_test.jsonl``); ``iepile``: every
    chunk, under IEPile's test chunking, of the evaluation prompts' records (``all_test``: of every
    test record; ``06_test_iepile.jsonl``).  ``limit``: the first N prompts (IEPile: of the first N
    records).  A line without gold keeps ``gold=None`` (scored as ``no_gold``); an unreadable line is
    counted."""
    if protocol not in PROTOCOLS:
        raise MicroLMError(f"unknown evaluation protocol {protocol!r} (known: {', '.join(PROTOCOLS)})")
    name = "06_test_iepile.jsonl" if protocol == "iepile" else "06_test.jsonl" if all_test else "06_eval_prompts.jsonl"
    path = data_dir / name
    if not path.is_file():
        raise MicroLMError(f"missing {path}: run the ie_data stage first (`microlm ie-data`)")
    records = None
    if protocol == "iepile" and not all_test:
        ours, _ = load_prompts(data_dir, limit=limit)
        records = {p["record_id"] for p in ours}
    out, bad = [], Counter()
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
                msgs = row["messages"]
            except (json.JSONDecodeError, KeyError, TypeError):
                bad["unreadable line"] += 1
                continue
            if records is not None and row.get("record_id") not in records:
                continue
            if all_test and protocol == "ours":
                if row.get("id", "").rsplit("-", 2)[-2:-1] not in (["0"], []):
                    continue  # shuffled copies of a chunk are training augmentation, not test items
                gold = msgs[-1]["content"] if msgs and msgs[-1]["role"] == "assistant" else None
                msgs = [m for m in msgs if m["role"] != "assistant"]
            else:
                gold = row.get("gold")
            user = next((m["content"] for m in msgs if m["role"] == "user"), "")
            try:
                text_in = json.loads(user).get("input", "")
            except (json.JSONDecodeError, AttributeError):
                text_in = ""
            p = {"id": row.get("id", f"line{n}"), "record_id": row.get("record_id", row.get("id", f"line{n}")),
                 "cate": row.get("cate", "?"), "messages": msgs, "asked": asked_relations(user), "gold": gold,
                 "input": text_in}
            if protocol == "iepile":
                p["record_gold"] = row.get("record_gold") or []
            out.append(p)
            if limit and protocol == "ours" and len(out) >= limit:
                break
    if limit and protocol == "iepile" and all_test:
        keep = list(dict.fromkeys(p["record_id"] for p in out))[:limit]
        out = [p for p in out if p["record_id"] in set(keep)]
    return out, bad


# ---------------------------------------------------------------------------------------------- models
def ref_stages(entry: dict, known) -> set[str]:
    """The course stages among ``known`` that a model entry reads (``hf``, ``ie_lora:<run>``,
    ``ie_merged:<run>``)."""
    out = set()
    for key in ("model", "adapter"):
        v = entry.get(key)
        if isinstance(v, str) and v.split(":")[0] in known:
            out.add(v.split(":")[0])
    return out


def _folder_digest(path: str) -> str:
    p = Path(path)
    if p.is_dir():
        return fingerprint(folder_files(p))
    return fingerprint({"id": path})  # a hub id (its cache is transformers' business) or an endpoint


def model_fingerprint(entry: dict, resolve) -> str:
    """What an answer depends on besides the prompt: the backend, the files of model and adapter (a
    model retrained = a new fingerprint), constrained decoding, the endpoint."""
    parts = {k: entry.get(k) for k in ("backend", "constrained", "base_url", "model_name")}
    if entry.get("_started"):  # the course's own server: its port changes every start, the answers do not
        parts["base_url"] = "serve"
    for key in ("model", "adapter"):
        ref = resolve(entry.get(key))
        if ref is not None:
            parts[key] = _folder_digest(ref) if entry.get("backend") != "openai" else ref
    if entry.get("_serve") is not None or entry.get("_serve_spec") is not None:  # the served folder, how served
        spec = entry.get("_serve_spec") or entry["_serve"][0]
        parts["served"] = [_folder_digest(spec.model), spec.dtype, spec.max_model_len]
    return fingerprint(parts)


def _version(package: str) -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(package)
    except PackageNotFoundError:
        return "none"


def answer_settings(entry: dict, dec: dict, cap: int) -> dict:
    """Everything besides the model (its fingerprint) and the prompt that decides an answer, keyed in the
    cache: the answer cap and stop strings; for a local backend also the dtype, the batch size (padding
    changes the arithmetic) and the versions of the libraries that compute it (an endpoint's model and
    address are in its fingerprint; how it computes is the server's business)."""
    s = {"max_new_tokens": cap, "stop": list(dec["stop"])}
    if entry.get("backend") in ("microlm", "transformers"):
        libs = ["torch"] + (["transformers", "peft"] if entry["backend"] == "transformers" else [])
        libs += ["xgrammar"] if entry.get("constrained") else []
        s.update(dtype=dec.get("dtype") or "float32", batch_size=dec["batch_size"],
                 libraries={n: _version(n) for n in libs})
    return s


def _line_digest(row: dict) -> str:
    """sha256 of a cache line's canonical JSON without its own ``digest`` field."""
    blob = json.dumps({k: v for k, v in row.items() if k != "digest"}, ensure_ascii=False, sort_keys=True,
                      separators=(",", ":"))
    return hashlib.sha256(blob.encode("utf-8")).hexdigest()


def _cached_row(raw: bytes) -> dict | None:
    """A cache line as written by ``AnswerCache.add`` (an answer, its key, its digest), else ``None``."""
    try:
        row = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError):
        return None
    if not isinstance(row, dict) or not isinstance(row.get("key"), str) or row.get("digest") != _line_digest(row) \
            or "text" not in row or "finish_reason" not in row:
        return None
    return row


class AnswerCache:
    """Answers of one model on disk, one JSON line each, keyed by prompt + answer settings; lines are
    appended as they come (an interrupted run keeps what it computed).  Each line carries the sha256 of
    its canonical JSON: a line that does not match it — cut by a kill, hand-edited, not JSON, not
    UTF-8 — is dropped (``dropped`` counts them), never scored, and the file is rewritten without it."""

    def __init__(self, folder: Path, name: str, model_fp: str):
        folder.mkdir(parents=True, exist_ok=True)
        self.path = folder / f"{name}-{model_fp[:16]}.jsonl"
        self.model_fp = model_fp
        self.rows: dict[str, dict] = {}
        self.dropped = 0
        if self.path.is_file():
            for raw in self.path.read_bytes().split(b"\n"):
                if not raw.strip():
                    continue
                row = _cached_row(raw)
                if row is None:
                    self.dropped += 1
                else:
                    self.rows[row["key"]] = row
            if self.dropped:
                log.warning("ie_eval: %d damaged or edited line(s) of the answer cache %s dropped (recomputed)",
                            self.dropped, self.path)
                with atomic_open(self.path) as f:
                    f.writelines(json.dumps(r, ensure_ascii=False) + "\n" for r in self.rows.values())

    def key(self, prompt: dict, settings: dict) -> str:
        blob = json.dumps([self.model_fp, prompt["messages"], settings], ensure_ascii=False, sort_keys=True)
        return hashlib.sha256(blob.encode()).hexdigest()[:32]

    def add(self, rows: list[dict]) -> None:
        with open(self.path, "a", encoding="utf-8") as f:
            for r in rows:
                r = {k: v for k, v in r.items() if k != "digest"}
                r["digest"] = _line_digest(r)
                self.rows[r["key"]] = r
                f.write(json.dumps(r, ensure_ascii=False) + "\n")
            f.flush()


class RowFailed(MicroLMError):
    """A model row that could not be evaluated: its model or adapter did not load, or every answer failed
    at its endpoint (one line naming the row and the file or address)."""


# ------------------------------------------------------------------------------------------ evaluation
def _floor_answers(name: str, prompts: list[dict], train_answers: list[str]) -> list[dict]:
    rule = RuleFloor(train_answers) if name == "floor-rule" else None
    return [{"text": empty_answer(p["asked"]) if rule is None else rule.answer(p["input"], p["asked"]),
             "prompt_tokens": 0, "new_tokens": 0, "seconds": 0.0, "finish_reason": "stop"} for p in prompts]


def _tokenizer_for(entry: dict, resolve):
    """A token counter of the model an entry asks (``None`` when it cannot be known: an outside endpoint)."""
    if entry.get("_serve") is not None or entry.get("_serve_spec") is not None:
        ref = (entry.get("_serve_spec") or entry["_serve"][0]).model
    elif entry["backend"] == "openai":
        return None
    else:
        ref = resolve(entry.get("adapter")) or resolve(entry["model"])
    try:
        from transformers import AutoTokenizer

        tok = AutoTokenizer.from_pretrained(ref)
    except (OSError, ValueError, TypeError):
        return None
    return lambda text: len(tok(text, add_special_tokens=False)["input_ids"])


def answer_cap(count, prompts: list[dict], configured: int) -> int:
    """``max_new_tokens`` for a model: at least what the longest gold answer of ``prompts`` needs under
    its tokenizer (``count``: text → tokens) with a quarter more room and its end token — a cap below a
    gold answer would score a right answer as truncated."""
    golds = [p["gold"] for p in prompts if p.get("gold")]
    if count is None or not golds:
        return configured
    longest = max(count(g) for g in golds)
    return max(configured, -(-longest * 5 // 4) + 1)


ENV_ERRORS = ("load_error", "endpoint_error")  # what the model's surroundings failed, not an answer: never cached


def _refs(entry: dict, resolve) -> str:
    """What a row asks for, for an error line: its model and adapter (reference → path) or its endpoint."""
    if entry.get("backend") == "openai":
        return f"endpoint {entry.get('base_url')} (model {entry.get('model_name') or entry.get('model')})"
    out = []
    for key in ("model", "adapter"):
        ref = entry.get(key)
        if ref:
            path = resolve(ref)
            out.append(f"{key} {ref}" + (f" = {path}" if path != ref else ""))
    return ", ".join(out)


def _one_line(e) -> str:
    return "; ".join(x.strip() for x in str(e).splitlines() if x.strip())


def _answer_model(entry: dict, prompts: list[dict], resolve, out: Path, dec: dict, progress: bool,
                  timing: dict) -> list[dict]:
    """Every answer of one model (cache first; the others computed and cached as they come).  A model
    that does not load, or whose every answer failed at its endpoint, raises ``RowFailed``."""
    name = entry["name"]
    t0 = time.perf_counter()
    cap = answer_cap(_tokenizer_for(entry, resolve), prompts, dec["max_new_tokens"])
    mdec = dict(dec, max_new_tokens=cap)
    settings = answer_settings(entry, dec, cap)
    cache = AnswerCache(out / ".cache", name, model_fingerprint(entry, resolve))
    keys = [cache.key(p, settings) for p in prompts]
    todo, seen = [], set()  # one computation per distinct prompt not in the cache
    for i, k in enumerate(keys):
        if k not in cache.rows and k not in seen:
            seen.add(k)
            todo.append(i)
    fresh: dict[str, dict] = {}
    if todo:
        bar = tqdm(total=len(todo), desc=f"ie_eval {name}", disable=not progress, leave=False)

        def emit(done: list[tuple[int, dict]]) -> None:
            got = [dict(a, key=keys[todo[j]]) for j, a in done]
            fresh.update((a["key"], a) for a in got)
            cache.add([a for a in got if a.get("error") not in ENV_ERRORS])  # a refused request: asked again next run
            bar.update(len(done))

        try:
            answers = BACKENDS[entry["backend"]](entry, resolve, [prompts[i] for i in todo], mdec, emit=emit)
            missing = [(j, a) for j, a in enumerate(answers) if keys[todo[j]] not in fresh]
            if missing:
                emit(missing)
        except RowFailed:
            raise
        except MicroLMError as e:  # a model or adapter that does not load: the row cannot be evaluated
            raise RowFailed(f"ie_eval: model {name!r} ({_refs(entry, resolve)}) cannot be loaded: {_one_line(e)}") from None
        finally:
            bar.close()
    seconds = time.perf_counter() - t0
    answers = [fresh.get(k) or cache.rows[k] for k in keys]
    failed = [a for a in answers if a.get("error") in ENV_ERRORS]
    if answers and len(failed) == len(answers):
        raise RowFailed(f"ie_eval: model {name!r}: every answer failed ({len(failed)}) at {_refs(entry, resolve)}: "
                        f"{failed[0].get('error')} {failed[0].get('detail') or ''}".rstrip())
    timing[name] = {"backend": entry["backend"], "computed": len(todo), "cached": len(prompts) - len(todo),
                    "dropped": cache.dropped, "max_new_tokens": cap, "wall_s": round(seconds, 2),
                    "answers_per_s": round(len(todo) / seconds, 3) if todo and seconds > 0 else None,
                    "generation_s": round(sum(a.get("seconds") or 0.0 for a in answers), 2)}
    return answers


def _scored_rows(name: str, protocol: str, prompts: list[dict], answers: list[dict]) -> list[dict]:
    rows = []
    for p, a in zip(prompts, answers, strict=True):
        s = score_answer(a.get("text"), p["asked"], p["gold"], finish_reason=a.get("finish_reason"), error=a.get("error"))
        row = {"model": name, "protocol": protocol, "id": p["id"], "record_id": p["record_id"], "cate": p["cate"],
               "asked": p["asked"], "answer": a.get("text"), "detail": a.get("detail"),
               "finish_reason": a.get("finish_reason"), "prompt_tokens": a.get("prompt_tokens"),
               "new_tokens": a.get("new_tokens"), "seconds": a.get("seconds"), **s}
        if protocol == "iepile":
            row["record_gold"] = p["record_gold"]
        rows.append(row)
    return rows


def _styled(entry: dict, prompts: list[dict]) -> list[dict]:
    style = entry.get("prompt", "ie")
    return prompts if style == "ie" else [dict(p, messages=prompt_messages(p["messages"], style)) for p in prompts]


@contextlib.contextmanager
def _unserved(entry: dict):
    yield entry


def evaluate(models: list[dict], prompts: list[dict], resolve, out: Path, dec: dict, *,
             train_answers: list[str], floors: bool = True, progress: bool = True, seed: int = 0,
             bootstrap_samples: int = 1000, iepile_prompts: list[dict] | None = None,
             compare: list[list[str]] | None = None, serve=None, force: bool = False) -> dict:
    """Answer (cache first), score and summarise ``prompts`` (our protocol) and, given, ``iepile_prompts``
    (IEPile's); writes ``results.jsonl``; returns the report (``models``/``comparisons``: ours;
    ``iepile``: IEPile's; ``order``: the rows scored; ``not_run``: the optional rows that could not be
    evaluated, with why; ``listed``: every row in order; ``cache``: hits, misses, dropped lines).
    ``compare``: the ``[A, B]`` pairs to test (default: every pair).  ``resolve``: a model/adapter
    reference → a folder or hub id; ``serve(entry)``: a context manager giving the entry its server
    started (an entry with ``base_url: serve``), default none; ``force``: the answer cache emptied
    first (every answer computed again).

    A row that cannot be evaluated (``RowFailed``: its model or adapter does not load, every answer
    failed at its endpoint; or its server does not start) stops the run with one line — unless the
    entry says ``optional: true``: then it is *not run*, and skipped in the comparisons."""
    if force:
        shutil.rmtree(out / ".cache", ignore_errors=True)
    protocols = {"ours": prompts, **({"iepile": iepile_prompts} if iepile_prompts is not None else {})}
    rows: dict[str, dict[str, list[dict]]] = {proto: {} for proto in protocols}
    timing: dict[str, dict] = {}
    not_run: dict[str, dict] = {}
    listed = [m["name"] for m in models] + (list(FLOORS) if floors else [])
    for name in listed:
        entry = next((m for m in models if m["name"] == name), {"name": name, "backend": "floor"})
        got: dict[str, list[dict]] = {}
        try:
            with (serve or _unserved)(entry) as served:  # a server for this row is started once, for both protocols
                for proto, ps in protocols.items():
                    asked = _styled(served, ps)
                    t = {}
                    if served["backend"] == "floor":
                        answers = _floor_answers(name, asked, train_answers)
                        t[name] = {"backend": "floor", "computed": 0, "cached": 0, "dropped": 0,  # no model answered
                                   "wall_s": 0.0, "answers_per_s": None, "generation_s": 0.0}
                    else:
                        answers = _answer_model(served, asked, resolve, out, dec, progress, t)
                    if proto == "ours":
                        timing[name] = t[name]
                    else:
                        timing[name][proto] = t[name]
                    got[proto] = _scored_rows(name, proto, ps, answers)
        except MicroLMError as e:
            timing.pop(name, None)
            why = str(e) if isinstance(e, RowFailed) else f"ie_eval: model {name!r}: {_one_line(e)}"
            if not entry.get("optional"):
                raise RowFailed(why) from None
            not_run[name] = {"backend": entry["backend"], "reason": why}
            log.warning("%s — optional: the row is not run", why)
            continue
        for proto, r in got.items():
            rows[proto][name] = r
    names = [n for n in listed if n not in not_run]
    if not names:
        raise MicroLMError("ie_eval: no row was evaluated (every model is optional and not run, and floors are off)")
    with atomic_open(out / "results.jsonl") as f:
        for proto in protocols:
            for name in names:
                for r in rows[proto][name]:
                    f.write(json.dumps(r, ensure_ascii=False) + "\n")

    pairs = [tuple(c) for c in compare] if compare else default_pairs(names)
    skipped = [[a, b] for a, b in pairs if a in not_run or b in not_run]  # a row not run is compared with nothing
    pairs = [(a, b) for a, b in pairs if a in names and b in names]
    recs = {n: merge_records(rows["ours"][n]) for n in names}
    summary = {}
    for n in names:
        m = aggregate(recs[n])
        m["interval"] = bootstrap(recs[n], samples=bootstrap_samples, seed=seed)
        by_topic = defaultdict(dict)
        for rid, r in recs[n].items():
            by_topic[r["cate"]][rid] = r
        m["by_topic"] = {t: aggregate(v) for t, v in sorted(by_topic.items())}
        m["errors"] = dict(Counter(r["error"] for r in rows["ours"][n]).most_common())
        summary[n] = m
    comparisons = []
    for a, b in pairs:  # decided on A's strict F1 against B's fence-tolerant one: B's code fences forgiven
        c = paired_bootstrap(recs[a], recs[b], samples=bootstrap_samples, seed=seed, metric_b="f1_fenced")
        strict = paired_bootstrap(recs[a], recs[b], samples=bootstrap_samples, seed=seed)
        comparisons.append({"a": a, "b": b, **c, "strict": {k: strict[k] for k in ("f1_diff", "interval", "decided")}})
    report = {"models": summary, "comparisons": comparisons, "timing": timing, "prompts": len(prompts),
              "records": len({p["record_id"] for p in prompts if p["gold"] is not None}),
              "topics": len({p["cate"] for p in prompts}), "decoding": {"max_new_tokens": dec["max_new_tokens"],
                                                                         "stop": dec["stop"]},
              "bootstrap_samples": bootstrap_samples, "seed": seed, "order": names, "listed": listed,
              "not_run": not_run, "skipped_comparisons": skipped,
              "cache": {k: sum(t.get(f, 0) + t.get("iepile", {}).get(f, 0) for t in timing.values())
                        for k, f in (("hits", "cached"), ("misses", "computed"), ("dropped", "dropped"))}}
    if "iepile" in protocols:
        irecs = {n: iepile_records(rows["iepile"][n]) for n in names}
        models_i = {}
        for n in names:
            m = iepile_aggregate(irecs[n])
            m["interval"] = iepile_bootstrap(irecs[n], samples=bootstrap_samples, seed=seed)
            m["errors"] = dict(Counter(r["error"] for r in rows["iepile"][n]).most_common())
            models_i[n] = m
        report["iepile"] = {"models": models_i, "prompts": len(iepile_prompts or []),
                            "records": len({p["record_id"] for p in iepile_prompts or []}),
                            "comparisons": [{"a": a, "b": b, **iepile_paired_bootstrap(
                                irecs[a], irecs[b], samples=bootstrap_samples, seed=seed)} for a, b in pairs]}
    return report


# --------------------------------------------------------------------------------------------- outputs
def results_card(report: dict, rows: list[dict], meta: dict) -> dict:
    """What a run's evaluation can be shown by elsewhere without its data: the tables (both protocols),
    the comparisons, when, on what machine, with which weights and data — and per prompt only ids and
    scores (no text: the data bundle's sentences never leave it)."""
    keep = ("model", "protocol", "id", "record_id", "cate", "error", "parsed", "compliant", "finish_reason",
            "new_tokens")
    per = []
    for r in rows:
        gold = {tuple(t) for t in r["gold"]}
        pred = {tuple(t) for t in r["pred"]}
        per.append({**{k: r.get(k) for k in keep}, "tp": len(pred & gold), "n_pred": len(pred), "n_gold": len(gold),
                    "tp_fenced": len({tuple(t) for t in r.get("pred_fenced", [])} & gold)})
    tables = {n: {k: m[k] for k in ("parse_rate", "schema_rate", "precision", "recall", "f1", "relaxed_f1",
                                    "parse_rate_fenced", "f1_fenced", "records", "answers")} | {"f1_interval": m["interval"]["f1"]}
              for n, m in report["models"].items()}
    card = {"card": "microlm ie_eval results", **meta, "prompts": report["prompts"], "records": report["records"],
            "order": report["order"], "models": tables, "comparisons": report["comparisons"],
            "timing": report["timing"], "per_prompt": per,
            "not_run": {n: v["reason"] for n, v in report.get("not_run", {}).items()}}
    if "iepile" in report:
        card["iepile"] = {k: report["iepile"][k] for k in ("models", "prompts", "records", "comparisons")}
    return card


def _fmt_iv(v: float, iv: list[float]) -> str:
    return f"{v:.3f} [{iv[0]:.3f}, {iv[1]:.3f}]"


def write_summary(report: dict, out: Path) -> None:
    """``summary.csv`` + ``summary.md`` (the model × metric table with intervals — our protocol and,
    when asked, IEPile's — the paired comparisons, errors per class, time)."""
    cols = ["model", "backend", "parse_rate", "parse_lo", "parse_hi", "schema_rate", "precision", "recall", "f1",
            "f1_lo", "f1_hi", "relaxed_f1", "parse_rate_fenced", "f1_fenced", "answers", "records",
            "iepile_f1", "iepile_f1_lo", "iepile_f1_hi", "iepile_f1_set", "status"]
    ie = report.get("iepile", {}).get("models", {})
    not_run = report.get("not_run", {})
    listed = report.get("listed", report["order"])
    with atomic_open(out / "summary.csv") as f:
        w = csv.writer(f)
        w.writerow(cols)
        for n in listed:
            if n in not_run:  # no number at all: a row that did not run scored nothing, not 0
                w.writerow([n, not_run[n]["backend"]] + [""] * (len(cols) - 3) + ["not run"])
                continue
            m = report["models"][n]
            i = ie.get(n)
            w.writerow([n, report["timing"][n]["backend"], f"{m['parse_rate']:.4f}", f"{m['interval']['parse_rate'][0]:.4f}",
                        f"{m['interval']['parse_rate'][1]:.4f}", f"{m['schema_rate']:.4f}", f"{m['precision']:.4f}",
                        f"{m['recall']:.4f}", f"{m['f1']:.4f}", f"{m['interval']['f1'][0]:.4f}",
                        f"{m['interval']['f1'][1]:.4f}", f"{m['relaxed_f1']:.4f}", f"{m['parse_rate_fenced']:.4f}",
                        f"{m['f1_fenced']:.4f}", m["answers"], m["records"],
                        *([f"{i['f1']:.4f}", f"{i['interval'][0]:.4f}", f"{i['interval'][1]:.4f}", f"{i['f1_set']:.4f}"]
                          if i else ["", "", "", ""]), "ok"])
    lines = [f"# IE evaluation: {report['prompts']} prompts, {report['records']} records, {report['topics']} topics",
             "", "Our protocol (one chunk per prompt, scored against its chunk). Strict F1 and parse rate with a "
             f"bootstrap 95 % interval (records resampled, {report['bootstrap_samples']} samples, seed "
             f"{report['seed']}); *fenced*: the same answers read fence-tolerantly (the JSON inside a code fence).", "",
             "| model | backend | parse rate | schema | precision | recall | strict F1 | relaxed F1 | parse (fenced) "
             "| F1 (fenced) |", "|---|---|---|---|---|---|---|---|---|---|"]
    nr = "| not run " * 8 + "|"
    for n in listed:
        if n in not_run:
            lines.append(f"| {n} | {not_run[n]['backend']} {nr}")
            continue
        m = report["models"][n]
        lines.append(f"| {n} | {report['timing'][n]['backend']} | {_fmt_iv(m['parse_rate'], m['interval']['parse_rate'])}"
                     f" | {m['schema_rate']:.3f} | {m['precision']:.3f} | {m['recall']:.3f} | "
                     f"{_fmt_iv(m['f1'], m['interval']['f1'])} | {m['relaxed_f1']:.3f} | {m['parse_rate_fenced']:.3f} | "
                     f"{_fmt_iv(m['f1_fenced'], m['interval']['f1_fenced'])} |")
    if ie:
        rep = report["iepile"]
        lines += ["", f"## IEPile's protocol: every chunk of {rep['records']} records ({rep['prompts']} prompts)", "",
                  "A record's answers merged and scored against its whole relation list, counted as IEPile's "
                  "`eval_func.py` does (normal mode: a triple predicted twice is one hit and one false positive; "
                  "set mode: de-duplicated). Strict parsing.", "",
                  "| model | parse rate | precision | recall | F1 (normal) | F1 (set) |", "|---|---|---|---|---|---|"]
        for n in listed:
            if n in not_run:
                lines.append(f"| {n} " + "| not run " * 5 + "|")
                continue
            i = ie[n]
            lines.append(f"| {n} | {i['parse_rate']:.3f} | {i['precision']:.3f} | {i['recall']:.3f} | "
                         f"{_fmt_iv(i['f1'], i['interval'])} | {i['f1_set']:.3f} |")
    lines += ["", "## Paired comparisons (A − B, records resampled together)", "",
              "Decided on A's strict F1 against B's fence-tolerant F1 (B's code fences forgiven); the strict − strict "
              "difference beside it" + ("; IEPile's protocol in the last columns." if ie else "."), "",
              "| A | B | F1 A − fenced F1 B | 95 % interval | decided | strict − strict | parse rate A − B [95 %] |"
              + (" IEPile F1 A − B | 95 % interval | decided |" if ie else ""),
              "|---|---|---|---|---|---|---|" + ("---|---|---|" if ie else "")]
    iec = {(c["a"], c["b"]): c for c in report.get("iepile", {}).get("comparisons", [])}
    for c in report["comparisons"]:
        row = (f"| {c['a']} | {c['b']} | {c['f1_diff']:+.3f} | [{c['interval'][0]:+.3f}, {c['interval'][1]:+.3f}] | "
               f"{'yes' if c['decided'] else 'no'} | {c['strict']['f1_diff']:+.3f} | {c['parse_diff']:+.3f} "
               f"[{c['parse_interval'][0]:+.3f}, {c['parse_interval'][1]:+.3f}] |")
        if ie:
            d = iec[(c["a"], c["b"])]
            row += (f" {d['f1_diff']:+.3f} | [{d['interval'][0]:+.3f}, {d['interval'][1]:+.3f}] | "
                    f"{'yes' if d['decided'] else 'no'} |")
        lines.append(row)
    for a, b in report.get("skipped_comparisons", []):
        lines.append(f"| {a} | {b} | not run ({a if a in not_run else b}) |  |  |  |  |" + ("  |  |  |" if ie else ""))
    lines += ["", "## Answers by error class", "", "| model | classes |", "|---|---|"]
    for n in listed:
        if n in not_run:
            lines.append(f"| {n} | not run: {not_run[n]['reason'].replace('|', '/')} |")
            continue
        lines.append(f"| {n} | " + ", ".join(f"{k} {v}" for k, v in report["models"][n]["errors"].items()) + " |")
    c = report.get("cache")
    lines += ["", "## Time", "", "Our protocol's prompts" + (", then IEPile's (computed / wall s)." if ie else ".")
              + (f" Answer cache: {c['hits']} hits, {c['misses']} computed, {c['dropped']} damaged or edited lines "
                 "dropped." if c else ""),
              "", "| model | computed | cached | answer cap (tokens) | wall s | answers/s |"
              + (" IEPile: computed | IEPile: wall s |" if ie else ""), "|---|---|---|---|---|---|" + ("---|---|" if ie else "")]
    for n in listed:
        if n in not_run:
            lines.append(f"| {n} " + "| not run " * 5 + "|" + (" not run | not run |" if ie else ""))
            continue
        t = report["timing"][n]
        row = (f"| {n} | {t['computed']} | {t['cached']} | {t.get('max_new_tokens', '—')} | {t['wall_s']} | "
               f"{t['answers_per_s'] or '—'} |")
        if ie:
            row += f" {t.get('iepile', {}).get('computed', '—')} | {t.get('iepile', {}).get('wall_s', '—')} |"
        lines.append(row)
    with atomic_open(out / "summary.md") as f:
        f.write("\n".join(lines) + "\n")


def write_failures(rows: list[dict], prompts: list[dict], out: Path, per_kind: int = 2) -> dict:
    """``failures.md``: up to ``per_kind`` failed answers of each model per class (not JSON,
    truncated, wrong keys, hallucinated entity, right pair wrong relation, missed/wrong triples)."""
    text_of = {p["id"]: p["input"] for p in prompts}
    rows = [r for r in rows if r.get("protocol", "ours") == "ours"]
    counts: dict[str, Counter] = defaultdict(Counter)
    shown: dict[tuple[str, str], int] = Counter()
    lines = ["# Failures by class", ""]
    for r in rows:
        kind = failure_kind(r, text_of.get(r["id"], ""))
        if kind is None:
            continue
        counts[r["model"]][kind] += 1
        if shown[(r["model"], kind)] < per_kind:
            shown[(r["model"], kind)] += 1
            ans = (r["answer"] or "")[:300]
            lines += [f"### {r['model']} · {kind} · {r['id']} ({r['cate']})", "",
                      f"- input: {text_of.get(r['id'], '')[:200]}", f"- asked: {', '.join(r['asked'])}",
                      f"- gold: {json.dumps(r['gold'], ensure_ascii=False)}", "", "```text", ans, "```", ""]
    with atomic_open(out / "failures.md") as f:
        f.write("\n".join(lines) + "\n")
    return {m: dict(c.most_common()) for m, c in counts.items()}


def write_plots(report: dict, rows: list[dict], out: Path) -> list[str]:
    """``metrics.png`` (metric × model bars, F1 and parse rate with intervals), ``topic_f1.png``
    (topic × model heatmap), ``answers.png`` (answer length and latency distributions)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if use_cjk_font():  # Noto Sans SC from the course extra: the Chinese topic names draw as characters
        return _plots(report, rows, out, plt, np)
    with warnings.catch_warnings():  # without it they draw as boxes, not warnings
        warnings.filterwarnings("ignore", message="Glyph .* missing from font")
        return _plots(report, rows, out, plt, np)


def _plots(report: dict, rows: list[dict], out: Path, plt, np) -> list[str]:
    not_run = report.get("not_run", {})
    names = report.get("listed", report["order"])  # a row not run keeps its place, labelled, without a bar
    labels = [f"{n}\n(not run)" if n in not_run else n for n in names]
    fig, ax = plt.subplots(figsize=(10, 4))
    keys = [("parse_rate", "parse rate"), ("schema_rate", "schema"), ("f1", "strict F1"), ("relaxed_f1", "relaxed F1")]
    w = 0.8 / len(keys)
    x = np.arange(len(names))
    for j, (k, label) in enumerate(keys):
        vals = [np.nan if n in not_run else report["models"][n][k] for n in names]
        err = None
        if k in ("f1", "parse_rate"):
            iv = [(0.0, 0.0) if n in not_run else report["models"][n]["interval"][k] for n in names]
            err = [[0.0 if n in not_run else max(0, v - lo) for n, v, (lo, _) in zip(names, vals, iv, strict=True)],
                   [0.0 if n in not_run else max(0, hi - v) for n, v, (_, hi) in zip(names, vals, iv, strict=True)]]
        ax.bar(x + j * w - 0.4 + w / 2, vals, w, yerr=err, capsize=3, label=label)
    for i, n in enumerate(names):
        if n in not_run:
            ax.text(i, 0.5, "not run", ha="center", va="center", rotation=90, color="0.4")
    ax.set_xticks(x, labels, rotation=15)
    ax.set_ylim(0, 1.05)
    ax.set_ylabel("score")
    ax.set_title(f"IE evaluation ({report['prompts']} prompts; bars: 95 % bootstrap intervals)")
    ax.legend(ncol=4, fontsize=8)
    fig.tight_layout()
    fig.savefig(out / "metrics.png", dpi=110)
    plt.close(fig)

    topics = sorted({t for n in names if n not in not_run for t in report["models"][n]["by_topic"]})
    grid = np.array([[np.nan if n in not_run else report["models"][n]["by_topic"].get(t, {}).get("f1", np.nan)
                      for n in names] for t in topics])
    fig, ax = plt.subplots(figsize=(1.2 * len(names) + 3, 0.4 * len(topics) + 1.5))
    im = ax.imshow(grid, vmin=0, vmax=1, cmap="viridis", aspect="auto")
    ax.set_xticks(range(len(names)), labels, rotation=20)
    ax.set_yticks(range(len(topics)), topics)
    for i in range(len(topics)):
        for j in range(len(names)):
            if not np.isnan(grid[i, j]):
                ax.text(j, i, f"{grid[i, j]:.2f}", ha="center", va="center", color="w" if grid[i, j] < 0.6 else "k",
                        fontsize=8)
    fig.colorbar(im, ax=ax, label="strict F1")
    ax.set_title("strict F1 by topic")
    fig.tight_layout()
    fig.savefig(out / "topic_f1.png", dpi=110)
    plt.close(fig)

    models = [n for n in names if not n.startswith("floor-") and n not in not_run]
    rows = [r for r in rows if r.get("protocol", "ours") == "ours"]
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(11, 3.5))
    for n in models:
        lens = [r["new_tokens"] or 0 for r in rows if r["model"] == n]
        lat = [r["seconds"] or 0.0 for r in rows if r["model"] == n]
        a1.hist(lens, bins=20, alpha=0.5, label=n)
        a2.hist(lat, bins=20, alpha=0.5, label=n)
    a1.set_xlabel("answer length (new tokens)")
    a2.set_xlabel("seconds per answer (a batch's time ÷ its size)")
    for a in (a1, a2):
        a.set_ylabel("answers")
        a.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out / "answers.png", dpi=110)
    plt.close(fig)
    return ["metrics.png", "topic_f1.png", "answers.png"]


