"""Stage B4 (``microlm ie-eval``): every model of ``ie_eval.models`` answers the IE evaluation prompts.

Where the two pipelines meet: a MicroLM model (``microlm`` backend: ``microlm.infer``, batched with
the KV cache, optionally with a from-scratch LoRA adapter), a Hugging Face folder or hub id
(``transformers`` backend: batched left-padded greedy ``generate``, optionally a PEFT adapter and
JSON-schema-constrained decoding) and a served OpenAI-compatible endpoint (``openai`` backend:
bounded concurrency, retries with backoff, then the answer is recorded as an error) all answer the
same prompts, greedily, and are scored by ``microlm.ie.metrics``; two floors computed without a
model (all relations ``[]``, and a rule pairing known entity strings found in the text) show what
learning added.

Every answer is cached on disk (``.cache/<model>-<fingerprint>.jsonl``) as it comes, keyed by the
model's fingerprint (its files, or its stage's manifest), the prompt and the decoding settings, so an
interrupted run keeps what it computed and a re-run only computes what changed; a model that fails
to load, an endpoint that refuses or a prompt without gold is a counted error class, never a crash of
the run.

Two **protocols** (``ie_eval.protocols``): ``ours`` asks the fixed evaluation prompts (one chunk of a
record each); ``iepile`` asks every chunk of the same records under IEPile's test chunking and scores
a record's merged answers against its whole relation list (``microlm.ie.metrics``).  A model entry's
``prompt: zero_shot`` describes the answer format in the system message (a model never trained on it
needs that), and every row is also scored fence-tolerantly, so a zero-shot row measures extraction,
not formatting.  The answer cap always holds the longest gold answer of the prompts asked (under the
model's own tokenizer), whatever ``max_new_tokens`` says.
"""

from __future__ import annotations

import concurrent.futures as cf
import contextlib
import hashlib
import json
import random
import time
import urllib.error
import urllib.request
from collections import Counter, defaultdict
from pathlib import Path

from microlm.errors import MicroLMError
from microlm.ie.metrics import json_schema_for
from microlm.runs import resolve_ref

__all__ = ["load_prompts", "resolve_ref", "ref_stages", "model_fingerprint", "AnswerCache", "answer_microlm",
           "answer_transformers", "answer_openai", "json_schema_for", "evaluate", "build", "FLOORS"]

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
    from microlm.ie.metrics import asked_relations

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
    from microlm.runs import fingerprint, folder_files

    p = Path(path)
    if p.is_dir():
        return fingerprint(folder_files(p))
    return fingerprint({"id": path})  # a hub id (its cache is transformers' business) or an endpoint


def model_fingerprint(entry: dict, up: dict[str, Path]) -> str:
    """What an answer depends on besides the prompt: the backend, the files of model and adapter (a
    model retrained = a new fingerprint), constrained decoding, the endpoint."""
    from microlm.runs import fingerprint

    parts = {k: entry.get(k) for k in ("backend", "constrained", "base_url", "model_name")}
    if entry.get("_started"):  # the course's own server: its port changes every start, the answers do not
        parts["base_url"] = "serve"
    for key in ("model", "adapter"):
        ref = resolve_ref(entry.get(key), up)
        if ref is not None:
            parts[key] = _folder_digest(ref) if entry.get("backend") != "openai" else ref
    if entry.get("_serve") is not None or entry.get("_serve_spec") is not None:  # the served folder, how served
        spec = entry.get("_serve_spec") or entry["_serve"][0]
        parts["served"] = [_folder_digest(spec.model), spec.dtype, spec.max_model_len]
    return fingerprint(parts)


class AnswerCache:
    """Answers of one model on disk, one JSON line each, keyed by prompt + decoding settings; lines
    are appended as they come (an interrupted run keeps what it computed)."""

    def __init__(self, folder: Path, name: str, model_fp: str):
        folder.mkdir(parents=True, exist_ok=True)
        self.path = folder / f"{name}-{model_fp[:16]}.jsonl"
        self.model_fp = model_fp
        self.rows: dict[str, dict] = {}
        if self.path.is_file():
            for line in self.path.read_text(encoding="utf-8").splitlines():
                try:
                    row = json.loads(line)
                    self.rows[row["key"]] = row
                except (json.JSONDecodeError, KeyError, TypeError, IndexError):
                    continue  # a line cut by a kill

    def key(self, prompt: dict, decoding: dict) -> str:
        blob = json.dumps([self.model_fp, prompt["messages"], decoding], ensure_ascii=False, sort_keys=True)
        return hashlib.sha256(blob.encode()).hexdigest()[:32]

    def add(self, rows: list[dict]) -> None:
        with open(self.path, "a", encoding="utf-8") as f:
            for r in rows:
                self.rows[r["key"]] = r
                f.write(json.dumps(r, ensure_ascii=False) + "\n")
            f.flush()


def _batches(prompts: list[tuple[int, list[int]]], max_new: int, ctx: int, batch_size: int):
    """Batches of ``(index, ids)`` with one ``max_new_tokens`` each: prompts that leave room for
    ``max_new`` go together (sorted by length); a longer one alone with what room is left."""
    fit = sorted((p for p in prompts if len(p[1]) + max_new <= ctx), key=lambda p: len(p[1]))
    for i in range(0, len(fit), batch_size):
        yield fit[i:i + batch_size], max_new
    for p in prompts:
        if len(p[1]) + max_new > ctx:
            yield [p], ctx - len(p[1])


def answer_microlm(entry: dict, up: dict[str, Path], prompts: list[dict], dec: dict, emit=None) -> list[dict]:
    """Greedy answers from ``microlm.infer`` (a MicroLM HF export, + a from-scratch adapter)."""
    import torch

    from microlm.infer.generate import generate_ids
    from microlm.model.hf_export import import_hf
    from microlm.model.lora import load_adapter, merge_lora
    from microlm.tokenizer.tokenizer import stop_ids_of

    model, tok = import_hf(resolve_ref(entry["model"], up))
    if entry.get("adapter"):
        load_adapter(model, resolve_ref(entry["adapter"], up))
        merge_lora(model)  # folded in: the same answers, a plain forward per token
    ctx, stops = model.cfg.max_seq_len, stop_ids_of(tok)
    ids = [(i, tok.encode_chat(p["messages"], add_generation_prompt=True)) for i, p in enumerate(prompts)]
    out: list[dict | None] = [None] * len(prompts)
    with torch.inference_mode():
        for batch, max_new in _batches(ids, dec["max_new_tokens"], ctx, dec["batch_size"]):
            if max_new < 1:
                for i, p in batch:
                    out[i] = {"text": None, "error": "prompt_too_long", "prompt_tokens": len(p), "new_tokens": 0,
                              "seconds": 0.0, "finish_reason": "error"}
                if emit:
                    emit([(i, out[i]) for i, _ in batch])
                continue
            t0 = time.perf_counter()
            new = generate_ids(model, [p for _, p in batch], stop_ids=stops, pad_id=tok.eos_id or 0,
                               max_new_tokens=max_new, temperature=0.0, repetition_penalty=1.0, top_k=0, top_p=1.0)
            dt = time.perf_counter() - t0
            for (i, p), n in zip(batch, new, strict=True):
                text = tok.decode(n)
                for s in dec["stop"]:
                    text = text.split(s)[0]
                out[i] = {"text": text, "prompt_tokens": len(p), "new_tokens": len(n), "seconds": dt / len(batch),
                          "finish_reason": "length" if len(n) >= max_new else "stop"}
            if emit:
                emit([(i, out[i]) for i, _ in batch])
    return out  # type: ignore[return-value]


def _hf_load(entry: dict, up: dict[str, Path]):
    import torch
    from transformers import AutoModelForCausalLM

    from microlm.ie.train_lora import load_tokenizer

    model_ref, adapter = resolve_ref(entry["model"], up), resolve_ref(entry.get("adapter"), up)
    try:
        model = AutoModelForCausalLM.from_pretrained(model_ref, dtype=torch.float32).eval()
    except (OSError, ValueError, RuntimeError) as e:
        raise MicroLMError(f"cannot load {model_ref}: {str(e).splitlines()[0]}") from None
    tok_src = adapter if adapter and (Path(adapter) / "tokenizer_config.json").is_file() else model_ref
    tok = load_tokenizer(tok_src, weights=False)
    if adapter:
        from peft import PeftModel

        try:
            model = PeftModel.from_pretrained(model, adapter).merge_and_unload().eval()
        except (OSError, ValueError, RuntimeError, KeyError) as e:
            raise MicroLMError(f"adapter {adapter} does not fit {model_ref}: {str(e).splitlines()[0]}") from None
    tok.padding_side = "left"
    return model, tok


def answer_transformers(entry: dict, up: dict[str, Path], prompts: list[dict], dec: dict, emit=None) -> list[dict]:
    """Greedy answers from ``transformers`` ``generate`` (left-padded batches; a PEFT adapter merged
    in; ``constrained``: one prompt at a time through xgrammar's JSON-schema logits processor)."""
    import torch

    from microlm.ie.greedy import eos_ids

    model, tok = _hf_load(entry, up)
    eos = eos_ids(tok, model)
    ctx = getattr(model.config, "max_position_embeddings", 4096)
    ids = [(i, tok.apply_chat_template(p["messages"], add_generation_prompt=True, tokenize=True,
                                       return_dict=False)) for i, p in enumerate(prompts)]
    ids = [(i, list(x["input_ids"]) if isinstance(x, dict) else list(x)) for i, x in ids]
    constrained = bool(entry.get("constrained"))
    bs = dec["batch_size"]  # constrained too: one grammar matcher per row of the batch
    compiler = grammar_compiler(tok, model.config.vocab_size, sorted(eos)) if constrained else None
    grammars: dict[tuple, object] = {}  # compiled once per asked relation list
    out: list[dict | None] = [None] * len(prompts)
    with torch.inference_mode():
        for batch, max_new in _batches(ids, dec["max_new_tokens"], ctx, bs):
            if max_new < 1:
                for i, p in batch:
                    out[i] = {"text": None, "error": "prompt_too_long", "prompt_tokens": len(p), "new_tokens": 0,
                              "seconds": 0.0, "finish_reason": "error"}
                if emit:
                    emit([(i, out[i]) for i, _ in batch])
                continue
            longest = max(len(p) for _, p in batch)
            x = torch.full((len(batch), longest), tok.pad_token_id, dtype=torch.long)
            mask = torch.zeros_like(x)
            for r, (_, p) in enumerate(batch):
                x[r, longest - len(p):] = torch.tensor(p)
                mask[r, longest - len(p):] = 1
            kw = {}
            if constrained:
                kw["logits_processor"] = [_schema_processor(compiler, [prompts[i]["asked"] for i, _ in batch], grammars)]
            t0 = time.perf_counter()
            gen = model.generate(x, attention_mask=mask, max_new_tokens=max_new, do_sample=False, eos_token_id=eos,
                                 pad_token_id=tok.pad_token_id, **kw)
            dt = time.perf_counter() - t0
            for r, (i, p) in enumerate(batch):
                new = gen[r, longest:].tolist()
                n = next((k for k, t in enumerate(new) if t in eos), None)
                ended = n is not None
                new = new[:n] if ended else new
                text = tok.decode(new, skip_special_tokens=True)
                for s in dec["stop"]:
                    text = text.split(s)[0]
                out[i] = {"text": text, "prompt_tokens": len(p), "new_tokens": len(new), "seconds": dt / len(batch),
                          "finish_reason": "stop" if ended else "length"}
            if emit:
                emit([(i, out[i]) for i, _ in batch])
    return out  # type: ignore[return-value]


def grammar_compiler(tok, vocab_size: int, stop_ids: list[int] | None = None):
    """xgrammar's compiler for ``tok`` (the grammar engine vLLM's structured outputs use; it works on
    token bytes, so byte-level BPE pieces of a Chinese character are handled).

    ``TokenizerInfo.from_huggingface`` reads a special token such as ``<|endoftext|>`` as its literal
    text, so the grammar would let it into a JSON string — and ``generate`` ends (and pads) a row at
    any EOS id, leaving its matcher behind. Here every special token is never allowed and the stop
    tokens are ``stop_ids`` (the EOS ids ``generate`` stops at): a row ends exactly when its grammar does."""
    import xgrammar as xgr

    info = xgr.TokenizerInfo.from_huggingface(tok, vocab_size=vocab_size)
    special = set(tok.all_special_ids) | {i for i, t in tok.added_tokens_decoder.items() if t.special}
    encoded = [""] * vocab_size  # an empty token = never allowed by a grammar
    for piece, i in tok.get_vocab().items():
        if i < vocab_size and i not in special:
            encoded[i] = piece
    stops = sorted(set(stop_ids or []) | set(info.stop_token_ids))
    return xgr.GrammarCompiler(xgr.TokenizerInfo(encoded, info.vocab_type, vocab_size=vocab_size, stop_token_ids=stops,
                                                 add_prefix_space=info.add_prefix_space))


def _schema_processor(compiler, asked: list[list[str]], cache: dict | None = None):
    """A ``transformers`` logits processor that lets only answers of the JSON schema of each row's
    asked relations through (no free whitespace): one grammar matcher per row of a ``generate`` call
    (a new processor per call); compiled grammars are kept in ``cache``."""
    from xgrammar.contrib.hf import LogitsProcessor

    cache = {} if cache is None else cache
    grammars = []
    for rels in asked:
        key = tuple(rels)
        if key not in cache:
            schema = json.dumps(json_schema_for(rels), ensure_ascii=False)
            cache[key] = compiler.compile_json_schema(schema, any_whitespace=False, strict_mode=True)
        grammars.append(cache[key])
    return LogitsProcessor(grammars)


def _post(url: str, body: dict, key: str | None, timeout: float) -> dict:
    req = urllib.request.Request(url, data=json.dumps(body).encode(), method="POST",
                                 headers={"Content-Type": "application/json",
                                          **({"Authorization": f"Bearer {key}"} if key else {})})
    with urllib.request.urlopen(req, timeout=timeout) as r:  # noqa: S310 (the configured endpoint)
        return json.loads(r.read().decode("utf-8"))


def answer_openai(entry: dict, up: dict[str, Path], prompts: list[dict], dec: dict, emit=None) -> list[dict]:
    """Answers from an OpenAI-compatible ``/v1/chat/completions`` (concurrency ``dec["concurrency"]``;
    timeouts, refused connections, 5xx and malformed JSON retried ``dec["retries"]`` times with
    exponential backoff, then recorded as ``endpoint_error``; 4xx is not retried)."""
    import os

    if entry.get("_serve") is not None:  # base_url: serve — the course's own vLLM server, for this model's answers
        with served(entry) as inner:
            return answer_openai(inner, up, prompts, dec, emit)
    url = entry["base_url"].rstrip("/") + "/chat/completions"
    key = os.environ.get(entry["api_key_env"]) if entry.get("api_key_env") else None
    name = entry.get("model_name") or entry["model"]

    def one(p: dict) -> dict:
        body = {"model": name, "messages": p["messages"], "max_tokens": dec["max_new_tokens"], "temperature": 0,
                **({"stop": dec["stop"]} if dec["stop"] else {})}
        err = "?"
        for attempt in range(dec["retries"] + 1):
            t0 = time.perf_counter()
            try:
                r = _post(url, body, key, dec["timeout_s"])
                ch = r["choices"][0]
                usage = r.get("usage") or {}
                return {"text": ch["message"]["content"] or "", "prompt_tokens": usage.get("prompt_tokens"),
                        "new_tokens": usage.get("completion_tokens"), "seconds": time.perf_counter() - t0,
                        "finish_reason": ch.get("finish_reason"), "attempts": attempt + 1}
            except urllib.error.HTTPError as e:
                err = f"HTTP {e.code}"
                if e.code < 500 and e.code != 429:
                    break
            except (urllib.error.URLError, TimeoutError, ConnectionError, OSError) as e:
                err = type(getattr(e, "reason", e)).__name__
            except (json.JSONDecodeError, KeyError, IndexError, TypeError):
                err = "malformed response"
            if attempt < dec["retries"]:
                time.sleep(dec["backoff_s"] * 2 ** attempt * (1 + random.random() / 2))
        return {"text": None, "error": "endpoint_error", "detail": err, "prompt_tokens": None, "new_tokens": 0,
                "seconds": 0.0, "finish_reason": "error", "attempts": dec["retries"] + 1}

    out: list[dict | None] = [None] * len(prompts)
    with cf.ThreadPoolExecutor(max_workers=max(1, dec["concurrency"])) as pool:
        futs = {pool.submit(one, p): i for i, p in enumerate(prompts)}
        for fut in cf.as_completed(futs):
            out[futs[fut]] = fut.result()
            if emit:
                emit([(futs[fut], out[futs[fut]])])
    return out  # type: ignore[return-value]


BACKENDS = {"microlm": answer_microlm, "transformers": answer_transformers, "openai": answer_openai}


@contextlib.contextmanager
def served(entry: dict):
    """For an entry with ``base_url: serve``: the course's vLLM server of ``serve.model`` started (once,
    for all of the entry's answers) and the entry pointing at it; any other entry as it is."""
    if entry.get("_serve") is None or entry.get("_started"):
        yield entry
        return
    from microlm.serve.env import ensure_env
    from microlm.serve.server import ManagedServer

    spec, run_dir, timeout = entry["_serve"]
    with ManagedServer(spec, run_dir, python=ensure_env(quiet=True), name=f"vllm-{entry['name']}").start(timeout) as srv:
        inner = {k: v for k, v in entry.items() if k != "_serve"}
        inner.update(base_url=srv.base_url, model_name=spec.served_name, _started=True, _serve_spec=spec)
        yield inner


# ------------------------------------------------------------------------------------------ evaluation
def _floor_answers(name: str, prompts: list[dict], train_answers: list[str]) -> list[dict]:
    from microlm.ie.metrics import RuleFloor, empty_answer

    rule = RuleFloor(train_answers) if name == "floor-rule" else None
    return [{"text": empty_answer(p["asked"]) if rule is None else rule.answer(p["input"], p["asked"]),
             "prompt_tokens": 0, "new_tokens": 0, "seconds": 0.0, "finish_reason": "stop"} for p in prompts]


def _tokenizer_for(entry: dict, up: dict[str, Path]):
    """A token counter of the model an entry asks (``None`` when it cannot be known: an outside endpoint)."""
    if entry.get("_serve") is not None or entry.get("_serve_spec") is not None:
        ref = (entry.get("_serve_spec") or entry["_serve"][0]).model
    elif entry["backend"] == "openai":
        return None
    else:
        ref = resolve_ref(entry.get("adapter"), up) or resolve_ref(entry["model"], up)
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


def _answer_model(entry: dict, prompts: list[dict], up: dict[str, Path], out: Path, dec: dict, progress: bool,
                  timing: dict) -> list[dict]:
    """Every answer of one model (cache first; the others computed and cached as they come)."""
    from tqdm.auto import tqdm

    name = entry["name"]
    t0 = time.perf_counter()
    cap = answer_cap(_tokenizer_for(entry, up), prompts, dec["max_new_tokens"])
    mdec = dict(dec, max_new_tokens=cap)
    decoding = {"max_new_tokens": cap, "stop": dec["stop"]}
    cache = AnswerCache(out / ".cache", name, model_fingerprint(entry, up))
    keys = [cache.key(p, decoding) for p in prompts]
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
            cache.add([a for a in got if a.get("error") != "load_error"])  # a model that did not load: not cached
            bar.update(len(done))

        try:
            answers = BACKENDS[entry["backend"]](entry, up, [prompts[i] for i in todo], mdec, emit=emit)
            missing = [(j, a) for j, a in enumerate(answers) if keys[todo[j]] not in fresh]
            if missing:
                emit(missing)
        except MicroLMError as e:  # a model that does not load: every answer is a counted error
            err = {"text": None, "error": "load_error", "detail": str(e), "prompt_tokens": None, "new_tokens": 0,
                   "seconds": 0.0, "finish_reason": "error"}
            emit([(j, dict(err)) for j in range(len(todo)) if keys[todo[j]] not in fresh])
        finally:
            bar.close()
    seconds = time.perf_counter() - t0
    answers = [fresh.get(k) or cache.rows[k] for k in keys]
    timing[name] = {"backend": entry["backend"], "computed": len(todo), "cached": len(prompts) - len(todo),
                    "max_new_tokens": cap, "wall_s": round(seconds, 2),
                    "answers_per_s": round(len(todo) / seconds, 3) if todo and seconds > 0 else None,
                    "generation_s": round(sum(a.get("seconds") or 0.0 for a in answers), 2)}
    return answers


def _scored_rows(name: str, protocol: str, prompts: list[dict], answers: list[dict]) -> list[dict]:
    from microlm.ie.metrics import score_answer

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
    from microlm.ie.render import prompt_messages

    style = entry.get("prompt", "ie")
    return prompts if style == "ie" else [dict(p, messages=prompt_messages(p["messages"], style)) for p in prompts]


def evaluate(models: list[dict], prompts: list[dict], up: dict[str, Path], out: Path, dec: dict, *,
             train_answers: list[str], floors: bool = True, progress: bool = True, seed: int = 0,
             bootstrap_samples: int = 1000, iepile_prompts: list[dict] | None = None,
             compare: list[list[str]] | None = None) -> dict:
    """Answer (cache first), score and summarise ``prompts`` (our protocol) and, given, ``iepile_prompts``
    (IEPile's); writes ``results.jsonl``; returns the report (``models``/``comparisons``: ours;
    ``iepile``: IEPile's).  ``compare``: the ``[A, B]`` pairs to test (default: every pair)."""
    from microlm.ie.metrics import (
        aggregate,
        bootstrap,
        iepile_aggregate,
        iepile_bootstrap,
        iepile_paired_bootstrap,
        iepile_records,
        merge_records,
        paired_bootstrap,
    )
    from microlm.io import atomic_open

    protocols = {"ours": prompts, **({"iepile": iepile_prompts} if iepile_prompts is not None else {})}
    rows: dict[str, dict[str, list[dict]]] = {proto: {} for proto in protocols}
    timing: dict[str, dict] = {}
    names = [m["name"] for m in models] + (list(FLOORS) if floors else [])
    for name in names:
        entry = next((m for m in models if m["name"] == name), {"name": name, "backend": "floor"})
        with served(entry) as entry:  # a server for this row is started once, for both protocols
            for proto, ps in protocols.items():
                asked = _styled(entry, ps)
                t = {}
                if entry["backend"] == "floor":
                    answers = _floor_answers(name, asked, train_answers)
                    t[name] = {"backend": "floor", "computed": 0, "cached": 0, "wall_s": 0.0,  # no model answered
                               "answers_per_s": None, "generation_s": 0.0}
                else:
                    answers = _answer_model(entry, asked, up, out, dec, progress, t)
                if proto == "ours":
                    timing[name] = t[name]
                else:
                    timing[name][proto] = t[name]
                rows[proto][name] = _scored_rows(name, proto, ps, answers)
    with atomic_open(out / "results.jsonl") as f:
        for proto in protocols:
            for name in names:
                for r in rows[proto][name]:
                    f.write(json.dumps(r, ensure_ascii=False) + "\n")

    pairs = [tuple(c) for c in compare] if compare else default_pairs(names)
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
              "bootstrap_samples": bootstrap_samples, "seed": seed, "order": names}
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
            "timing": report["timing"], "per_prompt": per}
    if "iepile" in report:
        card["iepile"] = {k: report["iepile"][k] for k in ("models", "prompts", "records", "comparisons")}
    return card


def _run_meta(cfg, models: list[dict]) -> dict:
    """Date, machine, data and weights of an evaluation run (for its results card)."""
    import datetime as dt
    import os

    from microlm.config import qwen_model
    from microlm.data.sources import data_root
    from microlm.hw import cpu_name
    from microlm.runs import file_digest

    meta = {"date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"), "profile": cfg.profile,
            "machine": {"cpu": cpu_name(), "cores": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity")
                        else os.cpu_count()},
            "data": "the data bundle (MICROLM_DATA)" if data_root(cfg.data.root) else "embedded (no MICROLM_DATA)"}
    if any(m.get("model") == "qwen" for m in cfg.ie_eval.models) or any(r["base"] == "qwen" for r in cfg.ie_lora.runs):
        q = qwen_model(cfg)
        w = {"qwen": q if not Path(q).is_dir() else f"local folder ({Path(q).name})"}
        if Path(q).is_dir():
            conf = Path(q) / "config.json"
            w["weights_digest"] = {p.name: file_digest(p) for p in sorted(Path(q).glob("*.safetensors"))}
            if conf.is_file():
                c = json.loads(conf.read_text(encoding="utf-8"))
                w["architecture"] = {k: c.get(k) for k in ("model_type", "hidden_size", "num_hidden_layers",
                                                           "vocab_size", "tie_word_embeddings", "dtype")}
        meta["weights"] = w
    return meta



def _fmt_iv(v: float, iv: list[float]) -> str:
    return f"{v:.3f} [{iv[0]:.3f}, {iv[1]:.3f}]"


def write_summary(report: dict, out: Path) -> None:
    """``summary.csv`` + ``summary.md`` (the model × metric table with intervals — our protocol and,
    when asked, IEPile's — the paired comparisons, errors per class, time)."""
    import csv

    from microlm.io import atomic_open

    cols = ["model", "backend", "parse_rate", "parse_lo", "parse_hi", "schema_rate", "precision", "recall", "f1",
            "f1_lo", "f1_hi", "relaxed_f1", "parse_rate_fenced", "f1_fenced", "answers", "records",
            "iepile_f1", "iepile_f1_lo", "iepile_f1_hi", "iepile_f1_set"]
    ie = report.get("iepile", {}).get("models", {})
    with atomic_open(out / "summary.csv") as f:
        w = csv.writer(f)
        w.writerow(cols)
        for n in report["order"]:
            m = report["models"][n]
            i = ie.get(n)
            w.writerow([n, report["timing"][n]["backend"], f"{m['parse_rate']:.4f}", f"{m['interval']['parse_rate'][0]:.4f}",
                        f"{m['interval']['parse_rate'][1]:.4f}", f"{m['schema_rate']:.4f}", f"{m['precision']:.4f}",
                        f"{m['recall']:.4f}", f"{m['f1']:.4f}", f"{m['interval']['f1'][0]:.4f}",
                        f"{m['interval']['f1'][1]:.4f}", f"{m['relaxed_f1']:.4f}", f"{m['parse_rate_fenced']:.4f}",
                        f"{m['f1_fenced']:.4f}", m["answers"], m["records"],
                        *([f"{i['f1']:.4f}", f"{i['interval'][0]:.4f}", f"{i['interval'][1]:.4f}", f"{i['f1_set']:.4f}"]
                          if i else ["", "", "", ""])])
    lines = [f"# IE evaluation: {report['prompts']} prompts, {report['records']} records, {report['topics']} topics",
             "", "Our protocol (one chunk per prompt, scored against its chunk). Strict F1 and parse rate with a "
             f"bootstrap 95 % interval (records resampled, {report['bootstrap_samples']} samples, seed "
             f"{report['seed']}); *fenced*: the same answers read fence-tolerantly (the JSON inside a code fence).", "",
             "| model | backend | parse rate | schema | precision | recall | strict F1 | relaxed F1 | parse (fenced) "
             "| F1 (fenced) |", "|---|---|---|---|---|---|---|---|---|---|"]
    for n in report["order"]:
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
        for n in report["order"]:
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
    lines += ["", "## Answers by error class", "", "| model | classes |", "|---|---|"]
    for n in report["order"]:
        lines.append(f"| {n} | " + ", ".join(f"{k} {v}" for k, v in report["models"][n]["errors"].items()) + " |")
    lines += ["", "## Time", "", "Our protocol's prompts" + (", then IEPile's (computed / wall s)." if ie else "."),
              "", "| model | computed | cached | answer cap (tokens) | wall s | answers/s |"
              + (" IEPile: computed | IEPile: wall s |" if ie else ""), "|---|---|---|---|---|---|" + ("---|---|" if ie else "")]
    for n in report["order"]:
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
    from microlm.ie.metrics import failure_kind
    from microlm.io import atomic_open

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
    import warnings

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    from microlm.plotting import use_cjk_font

    if use_cjk_font():  # Noto Sans SC from the course extra: the Chinese topic names draw as characters
        return _plots(report, rows, out, plt, np)
    with warnings.catch_warnings():  # without it they draw as boxes, not warnings
        warnings.filterwarnings("ignore", message="Glyph .* missing from font")
        return _plots(report, rows, out, plt, np)


def _plots(report: dict, rows: list[dict], out: Path, plt, np) -> list[str]:
    names = report["order"]
    fig, ax = plt.subplots(figsize=(10, 4))
    keys = [("parse_rate", "parse rate"), ("schema_rate", "schema"), ("f1", "strict F1"), ("relaxed_f1", "relaxed F1")]
    w = 0.8 / len(keys)
    x = np.arange(len(names))
    for j, (k, label) in enumerate(keys):
        vals = [report["models"][n][k] for n in names]
        err = None
        if k in ("f1", "parse_rate"):
            iv = [report["models"][n]["interval"][k] for n in names]
            err = [[max(0, v - lo) for v, (lo, _) in zip(vals, iv, strict=True)],
                   [max(0, hi - v) for v, (_, hi) in zip(vals, iv, strict=True)]]
        ax.bar(x + j * w - 0.4 + w / 2, vals, w, yerr=err, capsize=3, label=label)
    ax.set_xticks(x, names, rotation=15)
    ax.set_ylim(0, 1.05)
    ax.set_ylabel("score")
    ax.set_title(f"IE evaluation ({report['prompts']} prompts; bars: 95 % bootstrap intervals)")
    ax.legend(ncol=4, fontsize=8)
    fig.tight_layout()
    fig.savefig(out / "metrics.png", dpi=110)
    plt.close(fig)

    topics = sorted({t for n in names for t in report["models"][n]["by_topic"]})
    grid = np.array([[report["models"][n]["by_topic"].get(t, {}).get("f1", np.nan) for n in names] for t in topics])
    fig, ax = plt.subplots(figsize=(1.2 * len(names) + 3, 0.4 * len(topics) + 1.5))
    im = ax.imshow(grid, vmin=0, vmax=1, cmap="viridis", aspect="auto")
    ax.set_xticks(range(len(names)), names, rotation=20)
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

    models = [n for n in names if not n.startswith("floor-")]
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


def build(run) -> dict:
    """The ``ie_eval`` stage (see the module doc)."""
    from microlm.config import resolve_model_name
    from microlm.hw import peak_rss_mb
    from microlm.ie.train_lora import read_lines
    from microlm.io import write_json

    cfg, ec = run.cfg, run.cfg.ie_eval
    all_test = bool(run.options.get("all")) or ec.all
    prompts, bad = load_prompts(run.up["ie_data"], all_test=all_test, limit=ec.limit)
    if not prompts:
        raise MicroLMError(f"no evaluation prompts in {run.up['ie_data']}")
    iepile = None
    if "iepile" in ec.protocols:
        iepile, bad_i = load_prompts(run.up["ie_data"], all_test=all_test, limit=ec.limit, protocol="iepile")
        bad.update(bad_i)
    train_answers = [ln["messages"][-1]["content"] for ln in read_lines(run.up["ie_data"] / "06_train.jsonl")
                     if ln.get("messages") and ln["messages"][-1]["role"] == "assistant"]
    dec = {"max_new_tokens": ec.max_new_tokens, "stop": list(ec.stop), "batch_size": ec.batch_size,
           "concurrency": ec.concurrency, "timeout_s": ec.timeout_s, "retries": ec.retries, "backoff_s": ec.backoff_s}
    models = []
    for m in ec.models:
        m = dict(m, model=resolve_model_name(cfg, m["model"]))
        if m["backend"] == "openai" and m.get("base_url") == "serve":
            from microlm.serve.server import server_spec

            m = dict(m, _serve=(server_spec(cfg, run.up, port=0), run.out, cfg.serve.startup_timeout_s))
        models.append(m)
    t0 = time.time()
    report = evaluate(models, prompts, run.up, run.out, dec, train_answers=train_answers, floors=ec.floors,
                      progress=run.progress, seed=cfg.seed, bootstrap_samples=ec.bootstrap_samples,
                      iepile_prompts=iepile, compare=ec.compare)
    report["unreadable_prompt_lines"] = dict(bad)
    report["all_test"] = all_test
    rows = [json.loads(x) for x in (run.out / "results.jsonl").read_text(encoding="utf-8").splitlines()]
    report["failures"] = write_failures(rows, prompts, run.out)
    write_summary(report, run.out)
    report["plots"] = write_plots(report, rows, run.out)
    report["seconds"] = round(time.time() - t0, 1)
    write_json(run.out / "results_card.json", results_card(report, rows, _run_meta(cfg, ec.models)))
    report["peak_rss_mb"] = peak_rss_mb()
    write_json(run.out / "report.json", report)
    metrics = {"models": {n: {"f1": round(m["f1"], 4), "f1_interval": [round(v, 4) for v in m["interval"]["f1"]],
                              "parse_rate": round(m["parse_rate"], 4), "schema_rate": round(m["schema_rate"], 4),
                              "relaxed_f1": round(m["relaxed_f1"], 4), "f1_fenced": round(m["f1_fenced"], 4),
                              "parse_rate_fenced": round(m["parse_rate_fenced"], 4)}
                          for n, m in report["models"].items()},
               "prompts": report["prompts"], "seconds": report["seconds"], "peak_rss_mb": report["peak_rss_mb"],
               "answers_per_s": {n: t["answers_per_s"] for n, t in report["timing"].items() if t["answers_per_s"]},
               "decided": [[c["a"], c["b"], round(c["f1_diff"], 4)] for c in report["comparisons"] if c["decided"]]}
    if "iepile" in report:
        metrics["iepile"] = {"prompts": report["iepile"]["prompts"], "records": report["iepile"]["records"],
                             "models": {n: {"f1": round(m["f1"], 4), "f1_interval": [round(v, 4) for v in m["interval"]],
                                            "f1_set": round(m["f1_set"], 4), "parse_rate": round(m["parse_rate"], 4)}
                                        for n, m in report["iepile"]["models"].items()}}
    return metrics
