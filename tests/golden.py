"""Golden outputs: the chapters' deterministic teaching cells (tagged ``golden``) with their stored outputs.

``tests/golden/golden.ipynb`` holds every ``golden`` cell of ``notebooks/NN_*.py`` in chapter order, with
the outputs they printed when the file was written.  ``tests/test_notebooks.py`` checks that the stored
cells are still the chapters' cells and runs ``pytest --nbval`` on the file, which compares every output
with the stored one — so a change that alters what the course teaches (a parameter count, the first BPE
merges, a tokenization, a LoRA share, a metric on hand-made answers) fails even where no assert covers it.

After an intended change: ``.venv/bin/python tests/golden.py`` rewrites the file; review its diff.
A golden cell must be self-contained (its own imports) and print only deterministic values.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import jupytext
import nbformat

REPO = Path(__file__).resolve().parent.parent
GOLDEN = REPO / "tests" / "golden" / "golden.ipynb"


def golden_cells() -> list[tuple[str, str]]:
    """(chapter, source) of every cell tagged ``golden``, in chapter order."""
    out = []
    for py in sorted((REPO / "notebooks").glob("[0-9][0-9]_*.py")):
        for c in jupytext.read(py).cells:
            if c.cell_type == "code" and "golden" in c.metadata.get("tags", []):
                out.append((py.stem, c.source))
    return out


def build_notebook(cells: list[tuple[str, str]]) -> nbformat.NotebookNode:
    nb = nbformat.v4.new_notebook()
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    for chapter, source in cells:
        nb.cells.append(nbformat.v4.new_markdown_cell(f"From `notebooks/{chapter}.py`"))
        nb.cells.append(nbformat.v4.new_code_cell(source, metadata={"chapter": chapter}))
    return nb


def stored_cells(path: Path = GOLDEN) -> list[tuple[str, str]]:
    nb = nbformat.read(path, as_version=4)
    return [(c.metadata.get("chapter"), c.source) for c in nb.cells if c.cell_type == "code"]


def write(path: Path = GOLDEN) -> Path:
    from nbclient import NotebookClient

    nb = build_notebook(golden_cells())
    os.environ.setdefault("MICROLM_PROFILE", "smoke")
    NotebookClient(nb, timeout=600, kernel_name="python3", resources={"metadata": {"path": str(REPO / "notebooks")}}).execute()
    for c in nb.cells:  # execution counts and timings are not part of what is compared
        c.metadata.pop("execution", None)
    path.parent.mkdir(parents=True, exist_ok=True)
    nbformat.write(nb, path)
    return path


if __name__ == "__main__":
    print(write(Path(sys.argv[1]) if len(sys.argv) > 1 else GOLDEN))
