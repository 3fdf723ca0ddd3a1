"""Progress bars in executed notebooks: one final line in the stored copy, nothing in the book.

The package's bars are ``tqdm.auto``'s: text in a terminal, an ``ipywidgets`` widget in a Jupyter
kernel.  Under papermill each widget bar lands in the executed notebook as a ``display_data`` output
(a widget view whose ``text/plain`` fallback is the bar as it was *displayed*, at 0 %) and its models'
final state in ``metadata.widgets``.  JupyterLab does not rebuild widgets from that saved state when it
opens the file: it shows the fallback text.  So

* :func:`finish_bars` (``microlm.course``, on every executed copy) rewrites each bar's fallback to the
  bar's final line, read from the saved state (``train: 100%|██████████| 200/200 [00:41<00:00, ...]``):
  JupyterLab shows that one line, a viewer that restores widget state shows the finished widget;
* :func:`strip_bars` (``microlm.book``, on the copies the book renders) removes the bars altogether:
  widget views, their saved state, text bars and tqdm's own warnings on stderr — every other output
  (prints, tables, plots) is kept as it is.
"""

from __future__ import annotations

import html
import re
from typing import Any

__all__ = ["WIDGET_VIEW", "WIDGET_STATE", "bar_line", "is_bar_line", "finish_bars", "strip_bars", "count_bars"]

WIDGET_VIEW = "application/vnd.jupyter.widget-view+json"
WIDGET_STATE = "application/vnd.jupyter.widget-state+json"

# tqdm's right-hand part: "[elapsed<remaining, rate]" or "[elapsed, rate]" (a rate may be "?it/s").
_BAR_TAIL = re.compile(r"\[(?:\d+:)?\d{1,2}:\d{2}(?:<(?:(?:\d+:)?\d{1,2}:\d{2}|\?))?, [^\]\n]*\]\s*$")
_TQDM_NOISE = re.compile(r"TqdmWarning|IProgress not found|^\s+from \.autonotebook import tqdm")


def is_bar_line(line: str) -> bool:
    """A text progress bar as tqdm writes it (``desc: 42%|████▏     | 42/100 [00:01<00:02, 30.1it/s]``)."""
    return bool(_BAR_TAIL.search(line.rstrip()))


def _models(nb: Any) -> dict[str, Any]:
    return ((nb.get("metadata") or {}).get("widgets") or {}).get(WIDGET_STATE, {}).get("state", {})


def _bar_parts(models: dict[str, Any], model_id: str) -> tuple[str, dict, str] | None:
    """(left text, progress model state, right text) of a tqdm bar's ``HBox``, else None."""
    box = models.get(model_id) or {}
    if box.get("model_name") != "HBoxModel":
        return None
    ids = [c.removeprefix("IPY_MODEL_") for c in (box.get("state") or {}).get("children", [])]
    kids = [models.get(i) or {} for i in ids]
    if len(kids) != 3 or [k.get("model_name") for k in (kids[0], kids[2])] != ["HTMLModel", "HTMLModel"] or \
            kids[1].get("model_name") not in ("FloatProgressModel", "IntProgressModel"):
        return None

    def text(k: dict) -> str:
        return html.unescape(str((k.get("state") or {}).get("value", ""))).replace("\u2007", " ")

    return text(kids[0]), kids[1].get("state") or {}, text(kids[2])


def bar_line(models: dict[str, Any], model_id: str, width: int = 10) -> str | None:
    """The final text line of the tqdm widget bar ``model_id`` from the saved widget state, else None."""
    parts = _bar_parts(models, model_id)
    if parts is None:
        return None
    left, bar, right = parts
    if not left:
        return right.strip()
    if re.match(r"\s*[\d.]+\s?[kMGTPEZY]?/\?", right):  # no total: a full "info" bar, no fraction to draw
        return f"{left.rstrip()} {right.strip()}"
    top = float(bar.get("max") or 0)
    frac = min(1.0, max(0.0, float(bar.get("value") or 0) / top)) if top > 0 else 0.0
    full = round(frac * width)
    return f"{left}|{'█' * full}{' ' * (width - full)}|{right}"


def _is_bar_output(out: Any, models: dict[str, Any]) -> bool:
    data = out.get("data") or {}
    view = data.get(WIDGET_VIEW)
    if view is None:
        return False
    if _bar_parts(models, str(view.get("model_id", ""))) is not None:
        return True
    return is_bar_line(str(data.get("text/plain", "")))  # a bar whose state was not saved


def finish_bars(nb: Any) -> int:
    """Set each tqdm widget bar's ``text/plain`` fallback to its final line (from the saved widget
    state), in place; returns how many bars it updated."""
    models, n = _models(nb), 0
    for cell in nb.get("cells", []):
        for out in cell.get("outputs", []) if cell.get("cell_type") == "code" else []:
            view = (out.get("data") or {}).get(WIDGET_VIEW)
            line = bar_line(models, str(view.get("model_id", ""))) if view else None
            if line is not None:
                out["data"]["text/plain"] = line
                n += 1
    return n


def _clean_stream(text: str) -> str:
    """A stream's text without tqdm's text bars (each ``\\r``-overwritten state) and its warnings."""
    kept = []
    for line in text.split("\n"):
        parts = line.split("\r")
        if not any(is_bar_line(s) or _TQDM_NOISE.search(s) for s in parts):
            kept.append(line)
            continue
        segs = [s for s in parts if s.strip() and not is_bar_line(s) and not _TQDM_NOISE.search(s)]
        if segs:
            kept.append(segs[-1])  # what a terminal shows of a \r-overwritten line
        elif not line.strip("\r"):
            kept.append("")
    out = "\n".join(kept)
    return "" if not out.strip() else out


def strip_bars(nb: Any) -> int:
    """Remove every progress bar from ``nb`` in place: tqdm widget views (and the saved widget state:
    a page must not load a widget manager), the view part of any other widget output (its text
    fallback stays), text bars and tqdm's warnings in streams.  Returns how many outputs it removed
    or changed."""
    models, n = _models(nb), 0
    for cell in nb.get("cells", []):
        if cell.get("cell_type") != "code":
            continue
        kept = []
        for out in cell.get("outputs", []):
            if out.get("output_type") in ("display_data", "execute_result") and WIDGET_VIEW in (out.get("data") or {}):
                n += 1
                if _is_bar_output(out, models):
                    continue
                out["data"].pop(WIDGET_VIEW)
                if not out["data"]:
                    continue
            elif out.get("output_type") == "stream":
                text = out.get("text", "")
                text = "".join(text) if isinstance(text, list) else text
                clean = _clean_stream(text)
                if clean != text:
                    n += 1
                    if not clean:
                        continue
                    out["text"] = clean
            kept.append(out)
        cell["outputs"] = kept
    if (nb.get("metadata") or {}).pop("widgets", None) is not None:
        n += 1
    return n


def count_bars(nb: Any) -> dict[str, int]:
    """What of progress bars ``nb`` holds: widget views, text bar lines (each ``\\r`` state counts),
    tqdm warnings ("IProgress not found")."""
    views = lines = warnings = 0
    for cell in nb.get("cells", []):
        for out in cell.get("outputs", []) if cell.get("cell_type") == "code" else []:
            data = out.get("data") or {}
            if WIDGET_VIEW in data:
                views += 1
            texts = [out.get("text", "")] if out.get("output_type") == "stream" else \
                [v for k, v in data.items() if k.startswith("text/")]
            for t in texts:
                t = "".join(t) if isinstance(t, list) else str(t)
                warnings += t.count("IProgress not found")
                lines += sum(1 for seg in re.split(r"[\r\n]", t) if seg.strip() and is_bar_line(seg))
    return {"widget_views": views, "bar_lines": lines, "iprogress_warnings": warnings}
