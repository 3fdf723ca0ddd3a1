"""A small OpenAI-compatible client (stdlib HTTP): one chat request, a streamed one with its timings,
and a bounded-concurrency load run summarised the way ``vllm bench serve`` reports it."""

from __future__ import annotations

import concurrent.futures as cf
import json
import time
import urllib.error
import urllib.request
from dataclasses import asdict, dataclass, field

import numpy as np

__all__ = ["HTTPStatusError", "request_json", "chat", "stream_chat", "RequestRecord", "run_load", "summarize"]


class HTTPStatusError(Exception):
    def __init__(self, status: int, body: str):
        super().__init__(f"HTTP {status}: {body[:200]}")
        self.status, self.body = status, body


def _headers(api_key: str | None) -> dict:
    return {"Content-Type": "application/json", **({"Authorization": f"Bearer {api_key}"} if api_key else {})}


def request_json(url: str, body: dict | bytes | None = None, *, api_key: str | None = None, timeout: float = 60.0,
                 method: str | None = None) -> dict:
    """GET (``body=None``) or POST a JSON body (or raw bytes); the decoded JSON answer.  Raises
    ``HTTPStatusError`` on a 4xx/5xx and ``OSError``/``TimeoutError`` on connection problems."""
    data = body if isinstance(body, bytes) or body is None else json.dumps(body, ensure_ascii=False).encode()
    req = urllib.request.Request(url, data=data, method=method or ("GET" if data is None else "POST"),
                                 headers=_headers(api_key))
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:  # noqa: S310 (loopback / configured endpoint)
            return json.loads(r.read().decode("utf-8"))
    except urllib.error.HTTPError as e:
        raise HTTPStatusError(e.code, e.read().decode("utf-8", errors="replace")) from None


def chat(base_url: str, model: str, messages: list[dict], *, max_tokens: int = 128, api_key: str | None = None,
         timeout: float = 120.0, **extra) -> dict:
    body = {"model": model, "messages": messages, "max_tokens": max_tokens, "temperature": 0, **extra}
    return request_json(base_url.rstrip("/") + "/chat/completions", body, api_key=api_key, timeout=timeout)


@dataclass
class RequestRecord:
    """One request of a load run: start offset, outcome and timings (seconds)."""

    start: float
    ok: bool = False
    status: int | None = None
    error: str | None = None
    ttft: float | None = None
    e2e: float | None = None
    itl: list[float] = field(default_factory=list)
    prompt_tokens: int | None = None
    output_tokens: int = 0
    text: str = ""

    @property
    def tpot(self) -> float | None:
        if self.e2e is None or self.ttft is None or self.output_tokens < 2:
            return None
        return (self.e2e - self.ttft) / (self.output_tokens - 1)


def stream_chat(base_url: str, model: str, messages: list[dict], *, max_tokens: int, api_key: str | None = None,
                timeout: float = 300.0, t_origin: float = 0.0, ignore_eos: bool = False) -> RequestRecord:
    """A streamed chat completion: time to the first content chunk, the gaps between chunks, total
    time; output tokens from the final usage chunk (else one per content chunk)."""
    body = {"model": model, "messages": messages, "max_tokens": max_tokens, "temperature": 0, "stream": True,
            "stream_options": {"include_usage": True}, **({"ignore_eos": True} if ignore_eos else {})}
    rec = RequestRecord(start=time.perf_counter() - t_origin)
    req = urllib.request.Request(base_url.rstrip("/") + "/chat/completions", data=json.dumps(body).encode(),
                                 method="POST", headers=_headers(api_key))
    t0 = time.perf_counter()
    last = None
    chunks = 0
    parts = []
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:  # noqa: S310
            rec.status = r.status
            for raw in r:
                line = raw.decode("utf-8", errors="replace").strip()
                if not line.startswith("data:"):
                    continue
                data = line[5:].strip()
                if data == "[DONE]":
                    break
                msg = json.loads(data)
                if msg.get("usage"):
                    rec.output_tokens = msg["usage"].get("completion_tokens") or 0
                    rec.prompt_tokens = msg["usage"].get("prompt_tokens")
                for ch in msg.get("choices") or []:
                    piece = (ch.get("delta") or {}).get("content")
                    if piece:
                        now = time.perf_counter()
                        if last is None:
                            rec.ttft = now - t0
                        else:
                            rec.itl.append(now - last)
                        last = now
                        chunks += 1
                        parts.append(piece)
        rec.e2e = time.perf_counter() - t0
        rec.text = "".join(parts)
        rec.output_tokens = rec.output_tokens or chunks
        rec.ok = True  # an answer that is only the end token has no content chunk, and is still an answer
    except urllib.error.HTTPError as e:
        rec.status, rec.error = e.code, f"HTTP {e.code}"
    except (urllib.error.URLError, OSError, TimeoutError) as e:
        rec.error = type(getattr(e, "reason", e)).__name__
    except (json.JSONDecodeError, KeyError, TypeError):
        rec.error = "malformed stream"
    return rec


def run_load(base_url: str, model: str, prompts: list[list[dict]], *, concurrency: int, max_tokens: int,
             api_key: str | None = None, timeout: float = 300.0, ignore_eos: bool = False) -> tuple[list[RequestRecord], float]:
    """Every prompt once, ``concurrency`` in flight (a new one starts as one ends); records + wall time."""
    t_origin = time.perf_counter()
    with cf.ThreadPoolExecutor(max_workers=concurrency) as pool:
        futs = [pool.submit(stream_chat, base_url, model, p, max_tokens=max_tokens, api_key=api_key, timeout=timeout,
                            t_origin=t_origin, ignore_eos=ignore_eos) for p in prompts]
        recs = [f.result() for f in futs]
    return recs, time.perf_counter() - t_origin


def _stats(xs: list[float]) -> dict:
    if not xs:
        return {"mean": None, "p50": None, "p99": None}
    a = np.asarray(xs, dtype=np.float64) * 1000.0  # ms
    return {"mean": round(float(a.mean()), 2), "p50": round(float(np.percentile(a, 50)), 2),
            "p99": round(float(np.percentile(a, 99)), 2)}


def summarize(recs: list[RequestRecord], wall: float) -> dict:
    """``vllm bench serve``'s numbers: request throughput, output tokens/s, TTFT, TPOT, ITL and
    end-to-end latency (mean, p50, p99 in ms), failures."""
    ok = [r for r in recs if r.ok]
    out_tokens = sum(r.output_tokens for r in ok)
    return {"requests": len(recs), "completed": len(ok), "failed": len(recs) - len(ok), "wall_s": round(wall, 3),
            "request_throughput": round(len(ok) / wall, 3) if wall > 0 else None,
            "output_tokens": out_tokens, "output_tokens_per_s": round(out_tokens / wall, 2) if wall > 0 else None,
            "ttft_ms": _stats([r.ttft for r in ok if r.ttft is not None]),
            "tpot_ms": _stats([r.tpot for r in ok if r.tpot is not None]),
            "itl_ms": _stats([x for r in ok for x in r.itl]),
            "e2e_ms": _stats([r.e2e for r in ok if r.e2e is not None]),
            "errors": sorted({r.error for r in recs if r.error})}


def records_json(recs: list[RequestRecord]) -> list[dict]:
    return [{**asdict(r), "tpot": r.tpot, "itl": [round(x, 5) for x in r.itl], "text": r.text[:200]} for r in recs]
