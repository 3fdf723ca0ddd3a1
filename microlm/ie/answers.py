"""The answer backends: one model entry's greedy answers to IE prompts, whatever serves it.

``microlm`` (a MicroLM Hugging Face export through ``microlm.infer``, batched with the KV cache, an
optional from-scratch adapter merged in), ``transformers`` (batched left-padded greedy ``generate``, an
optional PEFT adapter merged in, optional JSON-schema-constrained decoding through xgrammar) and
``openai`` (any OpenAI-compatible ``/v1/chat/completions``: bounded concurrency, retries with backoff,
then the answer is recorded as an ``endpoint_error``).  Every backend has the signature
``(entry, resolve, prompts, dec, emit=None) -> answers``; ``resolve`` turns a model/adapter reference
into a folder or hub id, ``emit`` receives answers as they come (for the cache); the local backends
compute in ``dec["dtype"]`` (float32 when not given).  A model or adapter that cannot be loaded is a
one-line ``MicroLMError`` naming the file, never a traceback.
"""

from __future__ import annotations

import concurrent.futures as cf
import json
import os
import random
import time
import urllib.error
import urllib.request
from pathlib import Path

from microlm.errors import MicroLMError
from microlm.ie.metrics import json_schema_for
from microlm.io import load_json_file
from microlm.tokenizer.tokenizer import stop_ids_of

__all__ = ["BACKENDS", "answer_microlm", "answer_transformers", "answer_openai", "grammar_compiler"]


def _batches(prompts: list[tuple[int, list[int]]], max_new: int, ctx: int, batch_size: int):
    """Batches of ``(index, ids)`` with one ``max_new_tokens`` each: prompts that leave room for
    ``max_new`` go together (sorted by length); a longer one alone with what room is left."""
    fit = sorted((p for p in prompts if len(p[1]) + max_new <= ctx), key=lambda p: len(p[1]))
    for i in range(0, len(fit), batch_size):
        yield fit[i:i + batch_size], max_new
    for p in prompts:
        if len(p[1]) + max_new > ctx:
            yield [p], ctx - len(p[1])


def _too_long(batch: list[tuple[int, list[int]]], out: list, emit) -> None:
    """A batch of one prompt with no room left for an answer: recorded (and emitted) as ``prompt_too_long``."""
    for i, p in batch:
        out[i] = {"text": None, "error": "prompt_too_long", "prompt_tokens": len(p), "new_tokens": 0,
                  "seconds": 0.0, "finish_reason": "error"}
    if emit:
        emit([(i, out[i]) for i, _ in batch])


def _dtype(dec: dict):
    """The torch dtype a local backend computes in (``dec["dtype"]``, float32 when not given)."""
    import torch

    name = dec.get("dtype") or "float32"
    if name not in ("float32", "bfloat16", "float16"):
        raise MicroLMError(f"ie_eval: dtype must be float32, bfloat16 or float16, got {name!r}")
    return getattr(torch, name)


def answer_microlm(entry: dict, resolve, prompts: list[dict], dec: dict, emit=None) -> list[dict]:
    """Greedy answers from ``microlm.infer`` (a MicroLM HF export, + a from-scratch adapter)."""
    import torch

    from microlm.infer.generate import generate_ids
    from microlm.model.hf_export import import_hf
    from microlm.model.lora import load_adapter, merge_lora

    model, tok = import_hf(resolve(entry["model"]))
    if entry.get("adapter"):
        load_adapter(model, resolve(entry["adapter"]))
        merge_lora(model)  # folded in: the same answers, a plain forward per token
    model = model.to(_dtype(dec))
    ctx, stops = model.cfg.max_seq_len, stop_ids_of(tok)
    ids = [(i, tok.encode_chat(p["messages"], add_generation_prompt=True)) for i, p in enumerate(prompts)]
    out: list[dict | None] = [None] * len(prompts)
    with torch.inference_mode():
        for batch, max_new in _batches(ids, dec["max_new_tokens"], ctx, dec["batch_size"]):
            if max_new < 1:
                _too_long(batch, out, emit)
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


def _local(ref: str) -> bool:
    """A reference that can only mean a folder on this machine (a hub id is never absolute or ``./``)."""
    return Path(ref).is_absolute() or ref.startswith(("./", "../", "~")) or Path(ref).exists()


def _check_adapter(adapter: str) -> None:
    """A PEFT adapter folder readable before PEFT sees it: a missing folder or file, a config that is not
    a JSON object or a cut safetensors file is one line naming the file (PEFT would try the hub, or
    raise a traceback)."""
    from safetensors import SafetensorError, safe_open

    folder = Path(adapter)
    if not folder.is_dir():
        if _local(adapter):
            raise MicroLMError(f"adapter folder {adapter} does not exist")
        return  # a hub id: PEFT's business
    conf, weights = folder / "adapter_config.json", folder / "adapter_model.safetensors"
    if not conf.is_file():
        raise MicroLMError(f"adapter file missing: {conf}")
    load_json_file(conf, "adapter config")  # not JSON, or a list: one line naming the file
    if weights.is_file():
        try:  # the header, checked against the file's length: a truncated or garbage file fails here
            with safe_open(str(weights), framework="pt"):
                pass
        except (SafetensorError, OSError, ValueError) as e:
            raise MicroLMError(f"corrupt safetensors file {weights}: {str(e).splitlines()[0]}") from None
    elif not (folder / "adapter_model.bin").is_file():
        raise MicroLMError(f"adapter file missing: {weights}")


def _hf_load(entry: dict, resolve, dec: dict | None = None):
    from safetensors import SafetensorError
    from transformers import AutoModelForCausalLM

    from microlm.ie.train_lora import load_tokenizer

    model_ref, adapter = resolve(entry["model"]), resolve(entry.get("adapter"))
    if _local(model_ref) and not Path(model_ref).is_dir():
        raise MicroLMError(f"model folder {model_ref} does not exist")
    if adapter:
        _check_adapter(adapter)
    try:
        model = AutoModelForCausalLM.from_pretrained(model_ref, dtype=_dtype(dec or {})).eval()
    except (OSError, ValueError, RuntimeError, SafetensorError) as e:
        raise MicroLMError(f"cannot load {model_ref}: {str(e).splitlines()[0]}") from None
    tok_src = adapter if adapter and (Path(adapter) / "tokenizer_config.json").is_file() else model_ref
    tok = load_tokenizer(tok_src, weights=False)
    if adapter:
        from peft import PeftModel

        try:
            model = PeftModel.from_pretrained(model, adapter).merge_and_unload().eval()
        except (OSError, ValueError, RuntimeError, KeyError, TypeError, AttributeError, SafetensorError) as e:
            raise MicroLMError(f"adapter {adapter} does not fit {model_ref}: {str(e).splitlines()[0]}") from None
    tok.padding_side = "left"
    return model, tok


def answer_transformers(entry: dict, resolve, prompts: list[dict], dec: dict, emit=None) -> list[dict]:
    """Greedy answers from ``transformers`` ``generate`` (left-padded batches; a PEFT adapter merged
    in; ``constrained``: one prompt at a time through xgrammar's JSON-schema logits processor)."""
    import torch

    from microlm.infer.greedy import eos_ids

    model, tok = _hf_load(entry, resolve, dec)
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
                _too_long(batch, out, emit)
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


def answer_openai(entry: dict, resolve, prompts: list[dict], dec: dict, emit=None) -> list[dict]:
    """Answers from an OpenAI-compatible ``/v1/chat/completions`` (concurrency ``dec["concurrency"]``;
    timeouts, refused connections, 5xx and malformed JSON retried ``dec["retries"]`` times with
    exponential backoff, then recorded as ``endpoint_error``; 4xx is not retried)."""
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

