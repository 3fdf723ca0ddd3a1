"""What the course claims about its own runs, as checkable functions.

Notebooks 05–07 assert these on the stage reports; ``tests/test_claims.py`` runs the same functions
on reduced-scale runs with **both** data sources (the embedded corpus of a fresh machine and the
data bundle), so a claim that only holds for one source fails in the tests, not in a user's
``make course``.  ``full=False`` (the ``smoke`` profile) keeps only the claims that hold for a model
trained for seconds.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from microlm.train.reference import LANDING_GAP

__all__ = ["Claim", "pretrain_claims", "sft_claims", "lora_claims", "failed", "TASK_GAIN", "LORA_GAIN"]

TASK_GAIN = 0.05  # mean entity F1 that SFT must add over the derived tasks (none may fall)
LORA_GAIN = 0.05  # entity F1 that the adapter must add on its task over the SFT model


@dataclass(frozen=True)
class Claim:
    text: str
    ok: bool
    detail: str = ""

    def __str__(self) -> str:
        return f"[{'ok' if self.ok else 'FAILED'}] {self.text}" + (f" ({self.detail})" if self.detail else "")


def failed(claims: list[Claim]) -> list[Claim]:
    return [c for c in claims if not c.ok]


def pretrain_claims(report: dict, first_train_loss: float, vocab_size: int, *, full: bool,
                    reference: dict | None = None) -> list[Claim]:
    """``report``: ``pretrain/report.json``; ``reference``: the matching recorded curve, if any."""
    last, h1, lnv = report["final_val_loss"], report["unigram_entropy"], math.log(vocab_size)
    out = [Claim("the initial loss is ≈ ln(vocab): the init is sane", abs(first_train_loss - lnv) < 0.5,
                 f"{first_train_loss:.3f} vs {lnv:.3f}"),
           Claim("the final val loss is below the first train loss", last < first_train_loss,
                 f"{last:.3f} < {first_train_loss:.3f}")]
    if full:
        out.append(Claim("the model uses context: val loss ≥ 0.5 nats below the unigram entropy", last < h1 - 0.5,
                         f"{last:.3f} vs {h1:.3f}"))
    if reference is not None:
        gap = abs(reference["val_loss"][-1] - last)
        out.append(Claim("same config, seed, precision and data: the curve lands on the reference",
                         gap < LANDING_GAP, f"{gap:.3f} nats apart, allowed {LANDING_GAP}"))
    return out


def _f1(scores: dict) -> float:
    return scores["f1"]


def sft_claims(report: dict, *, full: bool) -> list[Claim]:
    """``report``: ``sft/report.json``."""
    d = report["train_data"]
    out = [Claim("every training record is kept or counted by reason",
                 d["records"] == d["kept"] + sum(d["drops"].values()), str(d["drops"]))]
    if report["base_val_loss"] is not None:
        out.append(Claim("SFT lowers the held-out answer loss below the pretrained model's",
                         report["final_val_loss"] < report["base_val_loss"],
                         f"{report['base_val_loss']:.3f} → {report['final_val_loss']:.3f}"))
    if full:
        gains = {task: _f1(t["after"]) - _f1(t["before"]) for task, t in report["tasks"].items()}
        mean = sum(gains.values()) / max(len(gains), 1)
        out.append(Claim(f"SFT teaches the derived tasks: held-out entity F1 rises by ≥ {TASK_GAIN} on average",
                         mean >= TASK_GAIN, ", ".join(f"{k} {v:+.3f}" for k, v in gains.items())))
        for task, t in report["tasks"].items():
            b, a = _f1(t["before"]), _f1(t["after"])
            out.append(Claim(f"SFT leaves no task worse: {task} F1 at least the pretrained model's", a >= b,
                             f"{b:.3f} → {a:.3f}"))
    return out


def lora_claims(report: dict, *, full: bool) -> list[Claim]:
    """``report``: ``lora/report.json``."""
    out = []
    if report["base_val_loss"] is not None:
        out.append(Claim("the adapter lowers the held-out loss of its task",
                         report["final_val_loss"] < report["base_val_loss"],
                         f"{report['base_val_loss']:.3f} → {report['final_val_loss']:.3f}"))
    if full:
        b, a = report["before"], report["after"]
        out.append(Claim(f"the adapter teaches {report['task']}, which SFT did not: F1 rises by ≥ {LORA_GAIN}",
                         _f1(a) >= _f1(b) + LORA_GAIN, f"{_f1(b):.3f} → {_f1(a):.3f}"))
        out.append(Claim("the adapted model beats the empty answer on F1",
                         _f1(a) > _f1(report["baselines"]["empty"]), f"{_f1(a):.3f}"))
    return out
