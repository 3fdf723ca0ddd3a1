"""Notebooks: each .py converts cleanly, runs headless under papermill at the smoke profile, passes
nbval's lax check, and the Jupyter Book builds (and fails on a broken notebook)."""

import os
import shutil
import subprocess
import sys
from pathlib import Path

import jupytext
import nbformat
import pytest
import yaml

from microlm import book, course
from microlm.course import notebook_sources, to_ipynb
from microlm.errors import MicroLMError
from microlm.progress import WIDGET_STATE, WIDGET_VIEW, count_bars, finish_bars, strip_bars

from . import golden
from .book_browser import BrowserMissing, check_book
from .conftest import REPO

pytestmark = pytest.mark.xdist_group("notebooks")  # one worker: the book test renders what papermill executed

NOTEBOOKS = notebook_sources()
IDS = [p.stem for p in NOTEBOOKS]


def test_notebooks_exist_and_are_in_the_toc():
    toc = yaml.safe_load((REPO / "_toc.yml").read_text())
    files = [c["file"] for part in toc["parts"] for c in part["chapters"]]
    assert [f"notebooks/{s}" for s in IDS] == [f for f in files if f.startswith("notebooks/")]
    assert {"book/setup", "book/results", "book/stages", "book/glossary", "book/references"} <= set(files)
    assert all((REPO / f"{f}.md").is_file() for f in files if f.startswith("book/") and f != "book/results")
    assert IDS[:2] == ["00_overview", "01_corpus"]


@pytest.mark.parametrize("py", NOTEBOOKS, ids=IDS)
def test_py_notebook_converts_cleanly(py, tmp_path):
    nb = jupytext.read(py)
    nbformat.validate(nb)
    params = [c for c in nb.cells if "parameters" in c.metadata.get("tags", [])]
    assert len(params) == 1 and "profile" in params[0].source
    assert any("assert" in c.source for c in nb.cells if c.cell_type == "code")
    # round trip: py -> ipynb -> py keeps every cell
    again = jupytext.reads(jupytext.writes(nb, fmt="py:percent"), fmt="py:percent")
    assert [c.source for c in again.cells] == [c.source for c in nb.cells]


def _executed_dir(factory) -> "os.PathLike":
    """Where the papermill test leaves each executed notebook for the book test (one pytest session)."""
    d = factory.getbasetemp() / "executed_smoke"
    d.mkdir(exist_ok=True)
    return d


TRANSPORT_WARNING = "without encryption"  # ipykernel >= 7.4 on a TCP kernel without CurveZMQ keys


def _assert_quiet(nb, log: str) -> None:
    """No kernel transport warning in what papermill's run printed, no "IProgress not found" (tqdm's
    text fallback) in the notebook, and at most one line per progress bar (its widget's final line)."""
    assert TRANSPORT_WARNING not in log, log[-2000:]
    bars = count_bars(nb)
    assert bars["iprogress_warnings"] == 0, "tqdm fell back to text bars: is ipywidgets installed?"
    assert bars["bar_lines"] <= bars["widget_views"], bars


@pytest.mark.notebooks
@pytest.mark.parametrize("py", NOTEBOOKS, ids=IDS)
def test_notebook_runs_under_papermill_at_smoke(py, tmp_path, tmp_path_factory, capfd):
    ipynb = to_ipynb(py)
    out = tmp_path / ipynb.name
    course.execute(ipynb, out, "smoke", cwd=py.parent)  # as `make course` runs it
    captured = capfd.readouterr()
    nb = nbformat.read(out, as_version=4)
    errors = [o for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", []) if o.output_type == "error"]
    assert not errors
    injected = [c for c in nb.cells if "injected-parameters" in c.metadata.get("tags", [])]
    assert injected and "smoke" in injected[0].source
    _assert_quiet(nb, captured.out + captured.err)
    shutil.copy(out, _executed_dir(tmp_path_factory) / ipynb.name)


BAR_NOTEBOOK = """# %% tags=["parameters"]
profile = "cpu"

# %%
import sys
from tqdm.auto import tqdm

from microlm.tokenizer import bpe  # noqa: F401  (the package's bars: tqdm.auto)

for _ in tqdm(range(30), desc="known total", mininterval=0):
    pass
bar = tqdm(desc="no total", unit="rec", mininterval=0)
bar.update(7)
bar.close()
print("real output", profile)
print("stderr output", file=sys.stderr)
"""


@pytest.mark.notebooks
def test_progress_bars_are_widgets_with_a_final_line_and_stay_out_of_the_book(tmp_path, capfd):
    """tqdm.auto under papermill (`make course`): widgets, no "IProgress not found", no kernel transport
    warning; the stored copy's text fallback is each bar's final line (what JupyterLab shows of it);
    the book's copy keeps the prints and drops the bars."""
    src = tmp_path / "bars.ipynb"
    nb = jupytext.reads(BAR_NOTEBOOK, fmt="py:percent")
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    jupytext.write(nb, src)
    course.execute(src, tmp_path / "out.ipynb", "smoke", cwd=tmp_path)
    captured = capfd.readouterr()
    nb = nbformat.read(tmp_path / "out.ipynb", as_version=4)
    _assert_quiet(nb, captured.out + captured.err)
    views = [o for c in nb.cells for o in c.get("outputs", []) if WIDGET_VIEW in o.get("data", {})]
    assert len(views) == 2 and WIDGET_STATE in nb.metadata.widgets  # papermill saved the widgets' state
    assert [v.data["text/plain"].split("[")[0].strip() for v in views] == [
        "known total: 100%|██████████| 30/30", "no total: 7/?"]
    strip_bars(nb)
    assert count_bars(nb) == {"widget_views": 0, "bar_lines": 0, "iprogress_warnings": 0}
    assert "widgets" not in nb.metadata
    texts = [o.get("text", "") for c in nb.cells for o in c.get("outputs", [])]
    assert "real output smoke\n" in texts and "stderr output\n" in texts


def test_strip_bars_keeps_real_outputs():
    """The book's filter: text bars (each \\r state), tqdm's warning and widget bars go; prints, plots,
    other widgets' text fallbacks and lines that only look like times stay."""
    nb = nbformat.v4.new_notebook()
    nb.metadata["widgets"] = {WIDGET_STATE: {"state": {}, "version_major": 2, "version_minor": 0}}
    stream = nbformat.v4.new_output
    nb.cells = [nbformat.v4.new_code_cell("x", outputs=[
        stream("stream", name="stderr", text="/x/tqdm/auto.py:21: TqdmWarning: IProgress not found. Please update "
               "jupyter and ipywidgets.\n  from .autonotebook import tqdm as notebook_tqdm\n"),
        stream("stream", name="stderr", text="\rtrain:   0%|          | 0/9 [00:00<?, ?step/s]"
               "\rtrain: 100%|██████████| 9/9 [00:01<00:00, 8.1step/s]\n"),
        stream("stream", name="stdout", text="loss 2.31 at [12:30]\nstep 9 done\n"),
        stream("display_data", data={WIDGET_VIEW: {"model_id": "gone"}, "text/plain": "x:  50%|█  | 1/2 [00:00<00:00, 3it/s]"}),
        stream("display_data", data={WIDGET_VIEW: {"model_id": "slider"}, "text/plain": "IntSlider(value=3)"}),
        stream("display_data", data={"image/png": "iVBORw0KGgo=", "text/plain": "<Figure>"}),
    ])]
    assert count_bars(nb) == {"widget_views": 2, "bar_lines": 3, "iprogress_warnings": 1}
    assert finish_bars(nb) == 0  # no saved state for these: nothing to finish
    strip_bars(nb)
    outs = nb.cells[0].outputs
    assert [o.get("text") or sorted(o.data) for o in outs] == [
        "loss 2.31 at [12:30]\nstep 9 done\n", ["text/plain"], ["image/png", "text/plain"]]
    assert "widgets" not in nb.metadata


@pytest.mark.notebooks
def test_nbval_lax_on_overview(tmp_path):
    ipynb = to_ipynb(REPO / "notebooks" / "00_overview.py")
    r = subprocess.run([sys.executable, "-m", "pytest", "-q", "--nbval-lax", "-p", "no:cacheprovider", str(ipynb)],
                       capture_output=True, text=True, cwd=tmp_path, timeout=600,
                       env={**os.environ, "MICROLM_PROFILE": "smoke"})
    assert r.returncode == 0, r.stdout[-2000:]
    assert " passed" in r.stdout


@pytest.mark.notebooks
def test_golden_outputs_of_the_teaching_cells(tmp_path):
    """The chapters' deterministic teaching cells (tagged ``golden``) print what tests/golden/golden.ipynb
    stored — compared output by output by nbval (not lax), so a change to what the course teaches fails."""
    current = golden.golden_cells()
    assert {c for c, _ in current} >= {"02_bpe_from_scratch", "05_pretrain", "07_lora_math", "11_ie_eval"}
    assert golden.stored_cells() == current, "a golden cell changed: run `.venv/bin/python tests/golden.py`, review the diff"
    copy = tmp_path / "golden.ipynb"
    shutil.copy(golden.GOLDEN, copy)
    r = subprocess.run([sys.executable, "-m", "pytest", "-q", "--nbval", "--nbval-current-env", "-p", "no:cacheprovider",
                        str(copy)], capture_output=True, text=True, cwd=tmp_path, timeout=900,
                       env={**os.environ, "MICROLM_PROFILE": "smoke"})
    assert r.returncode == 0, r.stdout[-3000:]
    assert f"{len(current)} passed" in r.stdout  # every golden cell ran and matched


def _book(src, out, cache, execute="off"):
    return book.build(src, out, cache=cache, execute=execute, profile="smoke", timeout=900)


@pytest.mark.book
def test_book_builds_with_every_chapter(tmp_path, tmp_path_factory):
    """The book of every chapter, rendered from the notebooks the papermill test executed in this session
    (as `make course` does: no second execution).  Run alone (no papermill test before it) it executes
    them once itself; after a papermill failure it stops at once, naming the chapters it lacks."""
    executed = _executed_dir(tmp_path_factory)
    have = [s for s in IDS if (executed / f"{s}.ipynb").is_file()]
    if not have:
        for py in NOTEBOOKS:
            course.execute(to_ipynb(py), executed / f"{py.stem}.ipynb", "smoke", cwd=py.parent)
    src = book.assemble(executed, tmp_path / "src", profiles=("smoke",))  # one-line error naming missing chapters
    for s in IDS:  # the book's copies: no progress-bar widget, no text bars, no saved widget state
        bars = count_bars(nbformat.read(src / "notebooks" / f"{s}.ipynb", as_version=4))
        assert bars["widget_views"] == 0 and bars["bar_lines"] <= 3 and bars["iprogress_warnings"] == 0, (s, bars)
    r = _book(src, tmp_path / "book", tmp_path / "cache")
    assert r.returncode == 0, (r.stdout + r.stderr)[-3000:]
    html = tmp_path / "book" / "_build" / "html"
    for s in IDS:
        page = (html / "notebooks" / f"{s}.html").read_text(encoding="utf-8")
        assert "Traceback" not in page
        assert "widget-view+json" not in page and "IProgress" not in page, s
    assert "checked" in (html / "notebooks" / "01_corpus.html").read_text(encoding="utf-8")
    # the generated pages: the pipeline figure, and the results of the run that executed the chapters
    assert (html / "_images" / "pipelines.png").is_file() or "pipelines.png" in (html / "book" / "intro.html").read_text()
    results = (html / "book" / "results.html").read_text(encoding="utf-8")
    assert "smoke" in results and "No stage has finished" not in results
    from microlm.stages import load_config, read_manifest

    pre = read_manifest(load_config("smoke").run_path / "pretrain")
    assert f"{pre['metrics']['params']:,} params" in results  # the manifest's own numbers, not pasted ones
    assert "pretrain-curves.png" in results and "ie_eval-metrics.png" in results
    # in a real browser: every image loads, no error/stderr output, links resolve, search works, and no
    # page shows a path of this machine; screenshots of the intro, a chapter and the results page
    try:
        report = check_book(html, REPO / "_build" / "screenshots",
                            [str(REPO), str(tmp_path), "/tmp/", "/root/", str(Path.home()) + "/"])
    except BrowserMissing as e:
        pytest.fail(str(e), pytrace=False)
    assert report["problems"] == [], "\n".join(report["problems"][:30])
    assert len(report["pages"]) >= len(IDS) + 6 and report["search"]["results"] > 0
    assert len(report["screenshots"]) == 3


def test_book_names_the_chapters_it_lacks(tmp_path):
    (tmp_path / "ex").mkdir()
    (tmp_path / "ex" / "00_overview.ipynb").write_text("{}")
    with pytest.raises(MicroLMError, match=r"no executed notebook for 01_corpus, 02_bpe_from_scratch.*make course"):
        book.assemble(tmp_path / "ex", tmp_path / "src")


@pytest.mark.book
def test_book_build_fails_on_a_notebook_error(tmp_path):
    src = tmp_path / "src"
    (src / "notebooks").mkdir(parents=True)
    (src / "book").mkdir()
    (src / "book" / "intro.md").write_text("# Intro\n")
    (src / "notebooks" / "00_broken.py").write_text("# %% [markdown]\n# # Broken\n\n# %%\nraise RuntimeError('boom')\n")
    (src / "_toc.yml").write_text("format: jb-book\nroot: book/intro\nchapters:\n  - file: notebooks/00_broken\n")
    r = _book(src, tmp_path / "out", tmp_path / "cache", execute="cache")
    assert r.returncode != 0
    assert "boom" in r.stdout + r.stderr
