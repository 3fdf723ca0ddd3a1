"""The course's two pipelines as one figure, drawn from the stage registry (the book's intro).

Boxes are the registered stages (pipeline A on top, pipeline B below), arrows the transitive
reduction of their ``upstream`` edges: an arrow u → v is drawn unless v already reaches u through
another of its inputs.  The arrows from pipeline A into pipeline B are where the two meet.
"""

from __future__ import annotations

from pathlib import Path

from microlm.plotting import use_cjk_font
from microlm.stages import REGISTRY

__all__ = ["layout", "edges", "draw"]


def layout() -> dict[str, tuple[float, float]]:
    """Stage → (x, y): pipeline A left to right on y = 1; pipeline B on y = 0, each B stage to the right
    of everything it reads (so the arrows from A come down), the serving stages stacked in one column."""
    pos: dict[str, tuple[float, float]] = {}
    a = [s for s in REGISTRY.values() if s.part.startswith("A")]
    for i, st in enumerate(a):
        pos[st.name] = (float(i), 1.0)
    b = [s for s in REGISTRY.values() if not s.part.startswith("A")]
    inputs: dict[str, set[str]] = {}
    for u, v in edges():
        inputs.setdefault(v, set()).add(u)
    columns: dict[frozenset, list[str]] = {}  # stages reading the same inputs share a column
    for st in b:
        columns.setdefault(frozenset(inputs.get(st.name, ())), []).append(st.name)
    x = 0.0
    for names in columns.values():
        ups = set().union(*(REGISTRY[n].upstream for n in names))
        x = max([x + 1.0] + [pos[u][0] for u in ups if u in pos and pos[u][1] == 1.0])
        for j, n in enumerate(names):
            pos[n] = (x, -0.3 * (j - (len(names) - 1) / 2))
    return pos


def edges() -> list[tuple[str, str]]:
    def reach(s: str) -> set[str]:
        out, todo = set(), list(REGISTRY[s].upstream)
        while todo:
            u = todo.pop()
            if u not in out:
                out.add(u)
                todo.extend(REGISTRY[u].upstream)
        return out

    keep = []
    for st in REGISTRY.values():
        for u in st.upstream:
            if not any(u in reach(w) for w in st.upstream if w != u):
                keep.append((u, st.name))
    return keep


def draw(path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import FancyBboxPatch

    use_cjk_font()
    pos = layout()
    xmax = max(x for x, _ in pos.values())
    fig, ax = plt.subplots(figsize=(1.35 * (xmax + 1.6), 4.2))
    w, h = 0.84, 0.26
    for name, (x, y) in pos.items():
        st = REGISTRY[name]
        color = "#dbe9f6" if st.part.startswith("A") else "#fde7cf"
        small = h * (0.8 if abs(y) > 1e-9 and y != 1.0 else 1.0)
        ax.add_patch(FancyBboxPatch((x - w / 2, y - small / 2), w, small, boxstyle="round,pad=0.02", fc=color, ec="#444"))
        ax.text(x, y + 0.03, name, ha="center", va="center", fontsize=8.5, weight="bold")
        ax.text(x, y - 0.075, st.part, ha="center", va="center", fontsize=7, color="#555")
    for u, v in edges():
        (x0, y0), (x1, y1) = pos[u], pos[v]
        cross = y0 != y1 and REGISTRY[u].part[0] != REGISTRY[v].part[0]
        if abs(y1 - y0) < 0.7:  # within a row (or into a column of it)
            start, end, rad = (x0 + w / 2, y0), (x1 - w / 2, y1), 0.0 if x1 - x0 <= 1 else -0.25
        else:
            start, end, rad = (x0, y0 - h / 2), (x1 - (w / 2 if x1 != x0 else 0), y1 + (h / 2 if x1 == x0 else 0)), 0.0
        ax.annotate("", xy=end, xytext=start, arrowprops=dict(arrowstyle="-|>", lw=1.6 if cross else 1.0,
                                                                 color="#c0392b" if cross else "#555",
                                                                 connectionstyle=f"arc3,rad={rad}"))
    ax.text(-0.5, 1.33, "Pipeline A — MicroLM from scratch", fontsize=10, weight="bold", color="#1f4e79")
    ax.text(-0.5, -0.68, "Pipeline B — information extraction: LoRA, evaluation, vLLM (red: where A meets B)",
            fontsize=10, weight="bold", color="#a04000")
    ax.set_xlim(-0.6, xmax + 0.6)
    ax.set_ylim(-0.8, 1.45)
    ax.axis("off")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
