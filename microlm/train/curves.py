"""Training curves: the ``metrics.jsonl`` a training loop writes, read back, summarised and plotted."""

from __future__ import annotations

from pathlib import Path

from microlm.io import read_jsonl
from microlm.plotting import use_cjk_font


def read_metrics(out_dir: Path) -> tuple[list[dict], list[dict]]:
    """``(train rows, eval rows)`` of a training folder's ``metrics.jsonl`` (empty lists when there is none)."""
    train, evals = [], []
    path = Path(out_dir) / "metrics.jsonl"
    if path.exists():
        for rec in read_jsonl(path):
            (evals if rec.get("type") == "eval" else train).append(rec)
    return train, evals

def loss_fields(train: list[dict], evals: list[dict], base_eval: dict | None) -> dict:
    """Held-out loss before training, at the first and last eval, and the last train loss."""
    return {"base_val_loss": base_eval["val_loss"] if base_eval else None,
            "first_val_loss": evals[0]["val_loss"] if evals else None,
            "final_val_loss": evals[-1]["val_loss"] if evals else None,
            "final_train_loss": train[-1]["loss"] if train else None}


def plot_curves(out_dir: Path, train: list[dict], evals: list[dict], h1: float | None = None) -> Path | None:
    """``curves.png``: train and val loss against tokens seen (needs matplotlib)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None

    use_cjk_font()
    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.plot([r["step"] for r in train], [r["loss"] for r in train], label="train loss")
    if evals:
        ax.plot([r["step"] for r in evals], [r["val_loss"] for r in evals], "o-", label="val loss")
    if h1:
        ax.axhline(h1, color="gray", ls="--", label="unigram entropy")
    ax.set_xlabel("step")
    ax.set_ylabel("loss (nats/token)")
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    path = Path(out_dir) / "curves.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
