"""Recorded reference curves: "is my loss normal?" answered for the data you actually trained on.

A reference is a finished pretraining run written to ``data/reference_curves/`` by
``benchmarks/record_reference.py``.  It is keyed by what decides the curve:

* the profile's model config and step count (same config → same curve),
* the **data fingerprint** — the corpus stage's fingerprint (source file contents, cleaning config,
  code version), so a fresh machine's embedded corpus and the data bundle each have their own,
* the training precision this machine runs (``pretrain.precision`` with ``auto`` resolved by
  ``microlm.hw``), since bf16 and fp32 runs drift apart.

``find_reference`` returns the matching record or ``None``; with data of your own there is none, and
the notebook shows the recorded curves for comparison without asserting that yours lands on them.
"""

from __future__ import annotations

import json
from pathlib import Path

from microlm.paths import REPO_ROOT
from microlm.train.settings import trajectory_config

__all__ = ["REFERENCE_DIR", "reference_key", "reference_path", "references", "find_reference", "LANDING_GAP"]

REFERENCE_DIR = REPO_ROOT / "data" / "reference_curves"
LANDING_GAP = 0.15  # nats: a same-key run's final val loss lands this close to the recorded one


def reference_key(cfg, data_fingerprint: str) -> dict:
    return {"profile": cfg.profile, "seed": cfg.seed, "data_fingerprint": data_fingerprint,
            "precision": trajectory_config(cfg.pretrain)["precision"],
            "config": {"model": cfg.model.to_dict(), "steps": cfg.pretrain.max_steps}}


def reference_path(profile: str, source: str, precision: str) -> Path:
    """``pretrain_<profile>_<source>_<precision>.json``; ``source`` names the data (embedded, bundle)."""
    return REFERENCE_DIR / f"pretrain_{profile}_{source}_{precision}.json"


def references(profile: str | None = None) -> list[dict]:
    """Every recorded reference (of one profile), each with its ``path``."""
    out = []
    for p in sorted(REFERENCE_DIR.glob("pretrain_*.json")):
        ref = json.loads(p.read_text(encoding="utf-8"))
        if profile is None or ref.get("profile") == profile:
            out.append({**ref, "path": str(p)})
    return out


def find_reference(cfg, data_fingerprint: str) -> dict | None:
    """The reference recorded with this profile's config, seed, precision and data, or ``None``."""
    want = reference_key(cfg, data_fingerprint)
    for ref in references(cfg.profile):
        if all(ref.get(k) == v for k, v in want.items()):
            return ref
    return None
