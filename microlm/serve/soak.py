"""A bounded stability run of a served model and the checks on its report (what the ``serve_soak``
stage, B6c, runs).

``concurrency`` clients send IE prompts for ``duration_s`` seconds; every ``malformed_every``-th
request is malformed on purpose (a broken JSON body, an unknown model, a prompt longer than the
context, a negative ``max_tokens``, a huge ``n``) and must get a 4xx while the server keeps serving.
At ``restart_at_s`` the server is restarted under load: the clients keep going, and what fails
between the stop and the next healthy ``/health`` is counted apart from steady-state errors.
Reported per ``window_s`` window: requests, errors, timeouts, p50/p95 latency (and its drift against
the first window), the share of answers that are JSON; the server's RSS over time (a leak shows as a
slope within one server lifetime).
"""

from __future__ import annotations

import threading
import time
from pathlib import Path

import numpy as np

from microlm.errors import MicroLMError
from microlm.plotting import use_cjk_font
from microlm.serve.client import HTTPStatusError, request_json

__all__ = ["MALFORMED", "malformed_request", "soak", "check", "plot_soak"]

MALFORMED = ("bad_json_body", "unknown_model", "prompt_too_long", "negative_max_tokens", "huge_n")


def malformed_request(kind: str, model: str, messages: list[dict], context: int) -> dict | bytes:
    if kind == "bad_json_body":
        return b'{"model": "' + model.encode() + b'", "messages": [{"role": "user", "content": '
    body = {"model": model, "messages": messages, "max_tokens": 16, "temperature": 0}
    if kind == "unknown_model":
        body["model"] = "no-such-model"
    elif kind == "prompt_too_long":
        body["messages"] = [{"role": "user", "content": "长" * (context * 3)}]
    elif kind == "negative_max_tokens":
        body["max_tokens"] = -5
    elif kind == "huge_n":
        body["n"] = 100000
    return body


def _overlaps(e: dict, window: tuple[float, float]) -> bool:
    """Was the request in flight at some moment of ``window`` (sent before it ended, answered or
    failed after it began)? A request cut by the restart is the restart's, however long it ran."""
    return e["t"] <= window[1] and e.get("t_end", e["t"]) >= window[0]


def _windows(events: list[dict], window_s: float, restart: tuple[float, float] | None) -> list[dict]:
    if not events:
        return []
    end = max(e["t"] for e in events)
    out = []
    for w in range(int(end // window_s) + 1):
        lo, hi = w * window_s, (w + 1) * window_s
        ev = [e for e in events if lo <= e["t"] < hi and e["kind"] == "normal"]
        in_restart = [e for e in ev if restart and _overlaps(e, restart)]
        steady = [e for e in ev if e not in in_restart]
        lat = [e["latency"] for e in steady if e["ok"]]
        out.append({"start_s": lo, "requests": len(ev), "errors": sum(not e["ok"] for e in steady),
                    "timeouts": sum(e.get("error") == "TimeoutError" for e in steady),
                    "restart_failures": sum(not e["ok"] for e in in_restart),
                    "p50_ms": round(float(np.percentile(lat, 50)) * 1000, 1) if lat else None,
                    "p95_ms": round(float(np.percentile(lat, 95)) * 1000, 1) if lat else None,
                    "json_valid": round(sum(e.get("json", False) for e in steady if e["ok"]) / len(lat), 3) if lat else None})
    first = next((w["p50_ms"] for w in out if w["p50_ms"]), None)
    for w in out:
        w["p50_drift"] = round(w["p50_ms"] / first, 3) if first and w["p50_ms"] else None
    return out


def _slope_mb_per_min(samples: list[tuple[float, float]]) -> float | None:
    if len(samples) < 5:
        return None
    t, m = np.array(samples).T
    return round(float(np.polyfit(t / 60.0, m, 1)[0]), 2)


WARMUP_S = 60.0  # each server life's first minute is warm-up (first requests of each shape, allocator pools)


def _stability(steady: list[dict], rss: list[tuple[float, float]], window: tuple[float, float] | None,
               end: float) -> dict:
    """What ``make soak`` asks: the p95 latency of the last minute against the minute after warm-up,
    both in the last server life (``p95_drift``; steady-state requests; ``None`` when the run is too
    short for two separate minutes), and per server life the RSS growth after its warm-up,
    split in halves — growth that slows (second half ≪ first) is warm-up, growth that keeps its pace
    is a leak."""
    def p95(lo: float, hi: float) -> float | None:
        lat = [e["latency"] for e in steady if e["ok"] and lo <= e["t"] < hi]
        return round(float(np.percentile(lat, 95)) * 1000, 1) if len(lat) >= 20 else None

    last = window[1] if window else 0.0  # both minutes in the last server life, after its warm-up
    early = p95(last + WARMUP_S, last + 2 * WARMUP_S) if last + 2 * WARMUP_S <= end - WARMUP_S else None
    late = p95(end - WARMUP_S, end) if early is not None else None
    lives = [(0.0, window[0] if window else end)] + ([(window[1], end)] if window else [])
    growth = []
    for lo, hi in lives:
        pts = [(t, m) for t, m in rss if lo + WARMUP_S <= t <= hi]
        if len(pts) < 4:
            continue
        mid = pts[len(pts) // 2][1]
        growth.append({"from_s": round(pts[0][0], 1), "to_s": round(pts[-1][0], 1),
                       "growth_mb": round(pts[-1][1] - pts[0][1], 1),
                       "first_half_mb": round(mid - pts[0][1], 1), "second_half_mb": round(pts[-1][1] - mid, 1)})
    return {"warmup_s": WARMUP_S, "p95_ms_after_warmup": early, "p95_ms_last_minute": late,
            "p95_drift": round(late / early, 3) if early and late else None, "rss_after_warmup": growth,
            "rss_growth_max_mb": max((g["growth_mb"] for g in growth), default=None)}


def check(report: dict, log: Path) -> None:
    """The soak's failures, as one-line errors: nothing served, or a malformed request not given a 4xx."""
    if not report["served_steady"]:
        raise MicroLMError(f"serve_soak: no request succeeded outside the restart (see {log})")
    if any(v["sent"] != v["got_4xx"] for v in report["malformed"].values()):
        wrong = {k: v["statuses"] for k, v in report["malformed"].items() if v["sent"] != v["got_4xx"]}
        raise MicroLMError(f"serve_soak: malformed requests not answered with 4xx: {wrong}")


def soak(srv, prompts: list[dict], sc, *, context: int, startup_timeout_s: float, is_json=None) -> dict:
    """Run the soak against ``srv`` (a :class:`ManagedServer`, started here and stopped at the end).

    The run lasts ``duration_s``; when the server is restarted it goes on until at least two windows
    (and 10 s) after the server is healthy again, so the state after the restart is always measured.
    ``is_json(text, prompt)``: whether an answer counts as JSON (the share is reported per window).
    """
    srv.start(startup_timeout_s)
    url = srv.base_url + "/chat/completions"
    served_name = srv.spec.served_name
    events: list[dict] = []
    rss: list[tuple[float, float]] = []
    lock = threading.Lock()
    counter = iter(range(10**9))
    restart: list[float] = []
    stop = threading.Event()
    end = [float(sc.duration_s)]  # moved later when a restart outlasts the planned run
    t0 = time.monotonic()

    def running() -> bool:
        return not stop.is_set() and time.monotonic() - t0 < end[0]

    def client() -> None:
        while running():
            with lock:
                i = next(counter)
            p = prompts[i % len(prompts)]
            if sc.malformed_every and i % sc.malformed_every == sc.malformed_every - 1:
                kind = MALFORMED[(i // sc.malformed_every) % len(MALFORMED)]
                t = time.monotonic()
                try:
                    request_json(url, malformed_request(kind, served_name, p["messages"], context),
                                 timeout=sc.request_timeout_s)
                    status = 200
                except HTTPStatusError as e:
                    status = e.status
                except (OSError, TimeoutError):
                    status = None
                    time.sleep(0.2)
                ev = {"t": t - t0, "kind": "malformed", "what": kind, "status": status,
                      "ok": status is not None and 400 <= status < 500}
            else:
                t = time.monotonic()
                body = {"model": served_name, "messages": p["messages"], "max_tokens": sc.max_tokens, "temperature": 0}
                try:
                    r = request_json(url, body, timeout=sc.request_timeout_s)
                    text = r["choices"][0]["message"]["content"] or ""
                    ev = {"t": t - t0, "kind": "normal", "ok": True, "latency": time.monotonic() - t,
                          "json": bool(is_json and is_json(text, p))}
                except HTTPStatusError as e:
                    ev = {"t": t - t0, "kind": "normal", "ok": False, "error": f"HTTP {e.status}"}
                except (OSError, TimeoutError) as e:
                    ev = {"t": t - t0, "kind": "normal", "ok": False, "error": type(getattr(e, "reason", e)).__name__}
                    time.sleep(0.2)  # the server is away (restart): do not spin
                except (KeyError, IndexError, TypeError, ValueError):
                    ev = {"t": t - t0, "kind": "normal", "ok": False, "error": "malformed response"}
            ev["t_end"] = time.monotonic() - t0
            with lock:
                events.append(ev)

    def sampler() -> None:
        while running():
            rss.append((time.monotonic() - t0, srv.rss_mb()))
            stop.wait(1.0)

    threads = [threading.Thread(target=client, daemon=True) for _ in range(sc.concurrency)]
    threads.append(threading.Thread(target=sampler, daemon=True))
    try:
        for th in threads:
            th.start()
        if sc.restart_at_s:
            while time.monotonic() - t0 < sc.restart_at_s:
                time.sleep(0.2)
            restart.append(time.monotonic() - t0)
            end[0] = float("inf")  # the clients keep going however long the server takes to come back
            srv.restart(startup_timeout_s)
            restart.append(time.monotonic() - t0)
            end[0] = max(float(sc.duration_s), restart[1] + max(2 * sc.window_s, 10.0))
        for th in threads:
            th.join(end[0] + sc.request_timeout_s + 60)
    finally:
        stop.set()
        srv.stop()
    # requests in flight when the server stopped belong to the restart too (their end is in it)
    window = (restart[0], restart[1] + 1.0) if len(restart) == 2 else None
    normal = [e for e in events if e["kind"] == "normal"]
    # malformed requests sent while the server was away (restart) got no answer at all: not counted
    # (in flight when the engine stopped they may even get a 500): the 4xx check is outside the restart
    bad = [e for e in events if e["kind"] == "malformed" and not (window and _overlaps(e, window))]
    steady = [e for e in normal if not (window and _overlaps(e, window))]
    before = [(t, m) for t, m in rss if not window or t < window[0]]
    after = [(t, m) for t, m in rss if window and t > window[1]]
    return {"duration_s": round(end[0], 1), "planned_duration_s": sc.duration_s, "concurrency": sc.concurrency,
            "window_s": sc.window_s, "requests": len(events),
            "normal": len(normal), "served_steady": sum(e["ok"] for e in steady),
            "steady_state_errors": sum(not e["ok"] for e in steady),
            "steady_state_error_rate": round(sum(not e["ok"] for e in steady) / max(1, len(steady)), 4),
            "timeouts": sum(e.get("error") == "TimeoutError" for e in normal),
            "json_valid_rate": round(sum(e.get("json", False) for e in normal if e["ok"]) / max(1, sum(e["ok"] for e in normal)), 3),
            "malformed": {k: {"sent": sum(e["what"] == k for e in bad),
                              "got_4xx": sum(e["what"] == k and e["ok"] for e in bad),
                              "statuses": sorted({str(e["status"]) for e in bad if e["what"] == k})} for k in MALFORMED},
            "restart": {"at_s": round(restart[0], 1), "healthy_again_s": round(restart[1], 1),
                        "down_s": round(restart[1] - restart[0], 1),
                        "failed_during": sum(not e["ok"] for e in normal if _overlaps(e, window)),
                        "served_after": sum(e["ok"] for e in normal if e["t"] > window[1])}
            if window else None,
            "served_after_malformed": sum(e["ok"] for e in normal if bad and e["t"] > bad[0]["t"]),
            "windows": _windows(events, sc.window_s, window),
            "stability": _stability(steady, rss, window, end[0]),
            "rss_mb": {"samples": [(round(t, 1), round(m, 1)) for t, m in rss],
                       "slope_mb_per_min_before_restart": _slope_mb_per_min(before),
                       "slope_mb_per_min_after_restart": _slope_mb_per_min(after)}}


def plot_soak(report: dict, out) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    use_cjk_font()
    w = report["windows"]
    fig, (a1, a2, a3) = plt.subplots(1, 3, figsize=(15, 3.6))
    xs = [x["start_s"] for x in w]
    a1.plot(xs, [x["p50_ms"] for x in w], "o-", label="p50")
    a1.plot(xs, [x["p95_ms"] for x in w], "s-", label="p95")
    a1.set_ylabel("latency (ms)")
    bw = 0.8 * report["window_s"]
    a2.bar(xs, [x["errors"] for x in w], width=bw, align="edge", label="steady-state errors")
    a2.bar(xs, [x["restart_failures"] for x in w], width=bw, align="edge", bottom=[x["errors"] for x in w],
           label="during restart")
    a2.set_ylabel("failed requests")
    t, m = zip(*report["rss_mb"]["samples"], strict=True) if report["rss_mb"]["samples"] else ((), ())
    a3.plot(t, m)
    a3.set_ylabel("server RSS (MB)")
    for ax in (a1, a2, a3):
        ax.set_xlabel("seconds")
        if report["restart"]:
            ax.axvspan(report["restart"]["at_s"], report["restart"]["healthy_again_s"], color="grey", alpha=0.2)
    a1.legend()
    a2.legend()
    a1.set_title("latency per window")
    a2.set_title("errors per window (grey: restart)")
    a3.set_title("memory")
    fig.tight_layout()
    fig.savefig(out / "soak.png", dpi=110)
    plt.close(fig)
