"""Stage B6c ``serve_soak``: a bounded stability run — errors, latency drift, memory, malformed
requests, a restart under load (``microlm.serve.soak``)."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from microlm.errors import ConfigError
from microlm.stages.registry import Stage, StageRun
from microlm.stages.server import serve_key, server_spec


@dataclass
class ServeSoakConfig:
    """Stage B6c: ``concurrency`` clients for ``duration_s`` seconds, every ``malformed_every``-th
    request malformed, a server restart at ``restart_at_s`` (0 = none), windows of ``window_s``."""

    duration_s: float = 60.0
    concurrency: int = 4
    window_s: float = 10.0
    max_tokens: int = 64
    malformed_every: int = 10
    restart_at_s: float = 30.0
    request_timeout_s: float = 120.0


def check_soak(cfg) -> None:
    so = cfg.serve_soak
    if so.duration_s <= 0 or so.concurrency < 1 or so.window_s <= 0 or so.max_tokens < 1 or so.malformed_every < 0 \
            or not 0 <= so.restart_at_s < so.duration_s or so.request_timeout_s <= 0:
        raise ConfigError("serve_soak: duration_s, window_s, request_timeout_s > 0; concurrency, max_tokens >= 1; "
                          "malformed_every >= 0 (0 = none); 0 <= restart_at_s < duration_s")


def build(run: StageRun) -> dict:
    """The soak (see ``microlm.serve.soak``): report, plot; fails on what ``check`` finds."""
    from microlm.ie.evaluate import load_prompts
    from microlm.ie.metrics import read_answer
    from microlm.io import write_json
    from microlm.serve.env import ensure_env
    from microlm.serve.server import ManagedServer
    from microlm.serve.soak import check, plot_soak, soak

    cfg, sc = run.cfg, run.cfg.serve_soak
    py = ensure_env(quiet=not run.progress)
    spec = server_spec(cfg, run.up)
    prompts, _ = load_prompts(run.up["ie_data"])
    context = json.loads((Path(spec.model) / "config.json").read_text(encoding="utf-8")).get("max_position_embeddings", 512)
    srv = ManagedServer(spec, run.out, python=py, name="vllm")
    report = soak(srv, prompts, sc, context=context, startup_timeout_s=cfg.serve.startup_timeout_s,
                  is_json=lambda text, p: read_answer(text, p["asked"])[1] in ("ok", "wrong_keys", "bad_values", "not_object"))
    plot_soak(report, run.out)
    write_json(run.out / "report.json", report)
    check(report, run.out / "vllm.log")
    return {"requests": report["requests"], "steady_state_error_rate": report["steady_state_error_rate"],
            "restart_failed": (report["restart"] or {}).get("failed_during"),
            "restart_down_s": (report["restart"] or {}).get("down_s"),
            "malformed_4xx": sum(v["got_4xx"] for v in report["malformed"].values()),
            "rss_slope_mb_per_min": report["rss_mb"]["slope_mb_per_min_after_restart"]}


STAGE = Stage(
    "serve_soak", "B6c", "a bounded stability run: errors, latency drift, memory, malformed requests, a restart "
    "under load",
    build=build, section=ServeSoakConfig, check=check_soak, upstream=("ie_data", "ie_merged"),
    sections=("serve_soak", "serve"), key=lambda cfg, o: serve_key(cfg, "serve_soak"),
    outputs=("report.json", "soak.png"), files={"log": "vllm.log"}, notebook="12_vllm",
    version=2,  # 2: the run outlasts a restart
    summary=lambda m: (f"{m['requests']} requests, steady-state error rate {m['steady_state_error_rate']}, "
                       f"malformed → 4xx {m['malformed_4xx']}, restart: {m['restart_failed']} failed in "
                       f"{m['restart_down_s']} s, RSS slope {m['rss_slope_mb_per_min']} MB/min"))
