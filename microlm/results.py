"""``make results PROFILE=laptop``: keep a run's numbers in the repository, without its data.

A `laptop` run (a real Qwen2.5-0.5B) cannot run in CI and the `cpu` course cannot download one, so
the runs the README reports are kept as **results cards** under ``data/results/``, which chapter 11
and 12 show beside their own run: ``<profile>_<data>.json`` is the ``ie_eval`` stage's
``results_card.json`` (tables, comparisons, per prompt only ids and scores — never a sentence of the
data bundle), ``<profile>_<data>_serve.json`` the serving numbers (parity, throughput, stability)
from the ``serve_*`` reports, their texts left out.  ``<data>`` is ``bundle`` or ``embedded``.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from microlm.data.sources import data_root
from microlm.errors import MicroLMError
from microlm.io import read_json, write_json
from microlm.paths import REPO_ROOT
from microlm.stages import load_config

__all__ = ["serve_card", "save_cards", "main"]


def serve_card(run_path: Path) -> dict | None:
    """The serving numbers of a run folder (``serve_smoke``, ``serve_bench``, ``serve_soak``), no text."""
    card: dict = {}
    smoke = run_path / "serve_smoke" / "report.json"
    if smoke.is_file():
        s = read_json(smoke)
        par = s["parity"]
        card["serve_smoke"] = {"dtype": s["dtype"], "startup_s": s["startup_s"], "server_rss_mb": s["server_rss_mb"],
                               "ie_answer": s["ie_answer"]["error_class"], "structured": s["structured"]["error_class"],
                               "parity": {"prompts": par["prompts"], "identical": par["identical"],
                                          "near_ties": par.get("near_ties"), "max_tokens": par["max_tokens"],
                                          "divergences": [{k: d.get(k) for k in ("id", "first_divergence", "margin",
                                                                                 "top2_gap", "near_tie")}
                                                          for d in par["divergences"]]}}
    bench = run_path / "serve_bench" / "report.json"
    if bench.is_file():
        b = read_json(bench)
        card["serve_bench"] = {"dtype": b["dtype"], "compare_at": b["compare_at"], "concurrency": b["concurrency"],
                               "startup_s": b["startup_s"], "server_rss_mb": b["server_rss_mb"],
                               "ratios": b["output_tps_ratio_at_compare"],
                               **({"ratios_cb": b["output_tps_ratio_at_compare_cb"]}
                                  if "output_tps_ratio_at_compare_cb" in b else {}),
                               "summary": read_json(run_path / "serve_bench" / "summary.json")}
    soak = run_path / "serve_soak" / "report.json"
    if soak.is_file():
        k = read_json(soak)
        card["serve_soak"] = {key: k.get(key) for key in ("requests", "duration_s", "concurrency",
                                                           "steady_state_error_rate", "timeouts", "json_valid_rate",
                                                           "restart", "rss_mb")}
        if isinstance(card["serve_soak"].get("rss_mb"), dict):
            card["serve_soak"]["rss_mb"] = {a: b for a, b in card["serve_soak"]["rss_mb"].items() if a != "samples"}
    return card or None


def save_cards(profile: str, dest: Path | None = None) -> list[Path]:
    """Copy the run's results card and write its serving card into ``dest`` (``data/results/``)."""
    cfg = load_config(profile)
    dest = dest or REPO_ROOT / "data" / "results"
    data = "bundle" if data_root(cfg.data.root) else "embedded"
    card = cfg.run_path / "ie_eval" / "results_card.json"
    if not card.is_file():
        raise MicroLMError(f"no {card}: run the ie_eval stage at profile {profile} first")
    out = [dest / f"{profile}_{data}.json"]
    ie = read_json(card)
    write_json(out[0], ie)
    serving = serve_card(cfg.run_path)
    if serving is not None:
        out.append(dest / f"{profile}_{data}_serve.json")
        write_json(out[1], {"card": "microlm serving results", **{k: ie[k] for k in ("date", "profile", "machine",
                                                                                      "data", "weights") if k in ie},
                            **serving})
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m microlm.results", description=__doc__.splitlines()[0])
    ap.add_argument("--profile", default="laptop")
    args = ap.parse_args(argv)
    try:
        for p in save_cards(args.profile):
            print(f"results: {p} ({json.dumps(read_json(p)).__len__() // 1024} KB)")
    except MicroLMError as e:
        print(f"results: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
