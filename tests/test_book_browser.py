"""The headless-Chromium book check (tests/book_browser.py) on a small book built here: a clean one
passes, and a broken one is reported once per kind of fault, naming the page."""

import base64
import io
import re
from pathlib import Path

import nbformat
import pytest
from nbformat.v4 import new_code_cell, new_markdown_cell, new_notebook, new_output

from microlm import book

from .book_browser import CHROMIUM
from .conftest import REPO

pytestmark = pytest.mark.book

CHAPTER = "notebooks/01_tokenizer.html"


def browser_ready():
    """``check_book``; Chromium and Playwright are test requirements: missing, the test fails (not skips)
    with the install line."""
    if not Path(CHROMIUM).is_file():
        pytest.fail(f"no Chromium at {CHROMIUM}: apt-get install chromium", pytrace=False)
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError:
        pytest.fail("playwright is not installed: pip install -e '.[dev]' (and apt-get install chromium)",
                    pytrace=False)
    from .book_browser import check_book

    return check_book


def _png(ys=(2.0, 1.2, 0.9)) -> str:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(3, 2), layout="constrained")
    ax.plot(range(len(ys)), ys)
    ax.set_xlabel("step")
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=60)
    plt.close(fig)
    return base64.b64encode(buf.getvalue()).decode()


def _small_book(tmp_path: Path, extra_cells: list | None = None) -> Path:
    """Build a two-page book (intro.md + one executed notebook with a plot) and return its html dir."""
    src = tmp_path / "src"
    (src / "notebooks").mkdir(parents=True)
    cells = [
        new_markdown_cell("# Tokenizer walkthrough\n\nByte-level merges, counted."),
        new_code_cell("print('merges:', 42)", execution_count=1,
                      outputs=[new_output("stream", name="stdout", text="merges: 42\n")]),
        new_code_cell("plot_loss()", execution_count=2,
                      outputs=[new_output("display_data", data={"image/png": _png(), "text/plain": "<Figure>"})]),
        *(extra_cells or []),
    ]
    nb = new_notebook(cells=cells)
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    nbformat.write(nb, src / "notebooks" / "01_tokenizer.ipynb")
    (src / "intro.md").write_text("# Intro\n\nStart with [the tokenizer chapter](notebooks/01_tokenizer.ipynb).\n",
                                  encoding="utf-8")
    (src / "_toc.yml").write_text("format: jb-book\nroot: intro\nchapters:\n  - file: notebooks/01_tokenizer\n",
                                  encoding="utf-8")
    r = book.build(src, tmp_path / "out", cache=tmp_path / "cache", execute="off", profile="smoke", timeout=600)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    html = tmp_path / "out" / "_build" / "html"
    assert (html / CHAPTER).is_file() and list((html / "_images").glob("*.png"))
    return html


def _forbidden(tmp_path: Path) -> list[str]:
    return [str(tmp_path), str(REPO), "/tmp/", "/root/", str(Path.home()) + "/"]


def test_small_book_passes_in_chromium(tmp_path):
    check_book = browser_ready()
    html = _small_book(tmp_path)
    shots = tmp_path / "shots"
    report = check_book(html, shots, _forbidden(tmp_path))
    assert report["problems"] == []
    assert {"index.html", "intro.html", CHAPTER, "search.html"} <= set(report["pages"])
    assert report["search"]["results"] >= 1
    for name in ("index.png", "notebooks_01_tokenizer.png"):
        png = shots / name
        assert png.is_file() and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 5000


def test_small_book_faults_are_reported(tmp_path):
    check_book = browser_ready()
    leak = f"{tmp_path}/runs/smoke/tokenizer/report.json"
    stderr = "UserWarning: slow"
    html = _small_book(tmp_path, [
        new_code_cell("warnings.warn('slow')", execution_count=3,  # (a) stderr
                      outputs=[new_output("stream", name="stderr", text=stderr + "\n")]),
        new_code_cell("print(path)", execution_count=4,  # (b) a build-machine path
                      outputs=[new_output("stream", name="stdout", text=f"wrote {leak}\n")]),
        new_code_cell("plot_lr()", execution_count=5,  # (c) an image whose file goes missing
                      outputs=[new_output("display_data", data={"image/png": _png((1, 3, 2)), "text/plain": "<F>"})]),
        new_code_cell("1 / 0", execution_count=6,  # (e) an error output
                      outputs=[new_output("error", ename="ZeroDivisionError", evalue="division by zero",
                                          traceback=["Traceback (most recent call last)",
                                                     "ZeroDivisionError: division by zero"])]),
    ])
    page = html / CHAPTER
    text = page.read_text(encoding="utf-8")
    # (c) the build fails (-W) on a markdown image it cannot read, so the second plot's file goes instead
    imgs = re.findall(r'<img [^>]*src="\.\./(_images/[^"]+\.png)"', text)
    assert len(imgs) == 2 and imgs[0] != imgs[1], imgs
    (html / imgs[1]).unlink()
    extra = '<a href="nope.html">x</a> <a href="../intro.html#no-such">y</a>'  # (d) a missing page, a missing anchor
    if 'class="output stderr' not in text:  # the repo's _config.yml removes stderr: render it as MyST-NB shows it
        extra += ('<div class="cell_output docutils container"><div class="output stderr highlight-myst-ansi '
                  f'notranslate"><div class="highlight"><pre><span></span>{stderr}\n</pre></div></div></div>')
    page.write_text(text.replace("</main>", extra + "</main>", 1), encoding="utf-8")
    assert "nope.html" in page.read_text(encoding="utf-8")

    report = check_book(html, None, _forbidden(tmp_path))
    problems = report["problems"]
    assert all(p.startswith(f"{CHAPTER}: ") for p in problems), problems

    def one(kind: str) -> str:
        hits = [p for p in problems if kind in p]
        assert len(hits) == 1, (kind, problems)
        return hits[0]

    assert stderr in one("stderr output")
    assert leak in one("build-machine path")
    assert imgs[1] in one("1 image(s) not loaded")
    links = one("broken internal link")
    assert "nope.html" in links and "../intro.html#no-such" in links
    assert "ZeroDivisionError" in one("error/traceback output")
    assert len(problems) == 5, problems
    assert report["screenshots"] == []
