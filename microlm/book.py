"""Build the Jupyter Book from the notebooks papermill already executed (no second execution).

``python -m microlm.book --profile cpu`` assembles ``_build/book-src/<profile>/`` from ``book/``,
``_toc.yml`` and the executed copies in ``_build/executed/<profile>/`` (written by
``python -m microlm.course``), then runs ``jupyter-book build`` on it with execution off.  Every number
and plot in the book is therefore the one the course run printed.  A chapter that was not executed is
a one-line error naming it (run ``make course`` first).  The chapters' copies leave out progress bars
(widget views and text bars: :func:`microlm.progress.strip_bars`); every other output stays.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
from pathlib import Path

import nbformat
import yaml

from microlm.diagram import draw
from microlm.errors import MicroLMError
from microlm.paths import REPO_ROOT
from microlm.progress import strip_bars
from microlm.stages import REGISTRY, load_config, read_manifest

__all__ = ["toc_files", "assemble", "build", "results_markdown"]


def toc_files(toc_path: Path = REPO_ROOT / "_toc.yml") -> list[str]:
    """The chapter files of the table of contents (``notebooks/NN_name``), in order."""
    toc = yaml.safe_load(toc_path.read_text(encoding="utf-8"))
    return [c["file"] for part in toc.get("parts", []) for c in part["chapters"]] + \
        [c["file"] for c in toc.get("chapters", [])]


def book_config(cache: Path | None = None, execute: str = "off") -> dict:
    cfg = yaml.safe_load((REPO_ROOT / "_config.yml").read_text(encoding="utf-8"))
    cfg["execute"]["execute_notebooks"] = execute
    if cache is not None:
        cfg["execute"]["cache"] = str(cache)
    if execute == "off":  # the sources are the executed .ipynb copies
        cfg["exclude_patterns"] = [p for p in cfg["exclude_patterns"] if p != "notebooks/*.ipynb"]
    return cfg


def _fmt_seconds(s: float | None) -> str:
    if s is None:
        return "–"
    return f"{s:.1f} s" if s < 120 else f"{s / 60:.1f} min"


def results_markdown(profiles: list[str], out_dir: Path) -> str:
    """The results page: for each profile that has runs, one row per finished stage (time and its
    one-line summary from the manifest's metrics), then every plot and summary table the stages wrote.
    Plots are copied to ``out_dir`` (beside the page).  Generated at each build, never pasted."""
    lines = ["# Results", "",
             "Generated when this book was built, from the `manifest.json` and `report.json` of every finished stage "
             "(`runs/<profile>/<stage>/`): the numbers and plots of the run that built the book, not pasted ones. "
             "Chapters explain each number; `benchmarks/results/*.json` hold the speed comparisons with their baselines.",
             ""]
    found = False
    for profile in profiles:
        root = load_config(profile).run_path
        manifests = {}
        for name in REGISTRY:
            try:
                m = read_manifest(root / name)
            except (OSError, ValueError):
                m = None
            if m and m.get("stage") == name:
                manifests[name] = m
        if not manifests:
            continue
        found = True
        first = next(iter(manifests.values()))
        host = first.get("host", {})
        total = sum((m.get("timings") or {}).get("seconds", 0) for m in manifests.values())
        lines += [f"## Profile `{profile}`", "",
                  f"{len(manifests)} of {len(REGISTRY)} stages finished; built on {host.get('cpus', '?')} CPU cores "
                  f"({host.get('machine', '?')}, Python {host.get('python', '?')}); stage time in all "
                  f"{_fmt_seconds(total)}.", "",
                  "| part | stage | time | result |", "|---|---|---|---|"]
        for name, m in manifests.items():
            st = REGISTRY[name]
            try:
                summary = st.summary(m.get("metrics") or {}) if st.summary else ""
            except (KeyError, TypeError, ValueError, IndexError):
                summary = "(metrics of an older version of this stage)"
            summary = summary.replace("|", "\\|").replace("\n", " ")
            lines.append(f"| {st.part} | [{name}](../notebooks/{st.notebook}.ipynb) | "
                         f"{_fmt_seconds((m.get('timings') or {}).get('seconds'))} | {summary} |")
        lines.append("")
        for name in manifests:
            folder = root / name
            pngs = sorted(folder.glob("*.png"))
            tables = sorted(folder.glob("summary.md"))
            if not pngs and not tables:
                continue
            lines += [f"### {REGISTRY[name].part} · {name}", ""]
            for t in tables:  # its headings sit below this section's
                text = t.read_text(encoding="utf-8").strip()
                lines += ["\n".join("###" + ln if ln.startswith("#") else ln for ln in text.splitlines()), ""]
            for png in pngs:
                target = out_dir / profile / f"{name}-{png.name}"
                target.parent.mkdir(parents=True, exist_ok=True)
                shutil.copy(png, target)
                rel = target.relative_to(out_dir.parent).as_posix()
                lines += [f"![{name}: {png.stem}]({rel})", ""]
    if not found:
        lines += ["No stage has finished yet for " + ", ".join(f"`{p}`" for p in profiles)
                  + ": run `make course` (or a chapter) and build the book again.", ""]
    return "\n".join(lines)


def assemble(executed: Path, src: Path, repo: Path = REPO_ROOT, profiles: tuple[str, ...] = ("cpu", "gpu")) -> Path:
    """A book source tree: book/, _toc.yml, each chapter's executed notebook, and the generated
    pages (the results of ``profiles`` and the pipeline figure)."""
    chapters = [f for f in toc_files(repo / "_toc.yml") if f.startswith("notebooks/")]
    missing = [f for f in chapters if not (executed / f"{Path(f).name}.ipynb").is_file()]
    if missing:
        raise MicroLMError(f"book: no executed notebook for {', '.join(Path(m).name for m in missing)} in "
                           f"{executed} (run `make course`, or `python -m microlm.course --profile ...` first)")
    if src.exists():
        shutil.rmtree(src)
    (src / "notebooks").mkdir(parents=True)
    shutil.copytree(repo / "book", src / "book")
    shutil.copy(repo / "_toc.yml", src / "_toc.yml")
    for f in chapters:  # without progress bars: widget views, their state, text bars (microlm.progress)
        nb = nbformat.read(executed / f"{Path(f).name}.ipynb", as_version=4)
        strip_bars(nb)
        nbformat.write(nb, src / f"{f}.ipynb")
    draw(src / "book" / "figures" / "pipelines.png")
    (src / "book" / "results.md").write_text(results_markdown(list(profiles), src / "book" / "results"),
                                             encoding="utf-8")
    return src


def build(src: Path, out: Path, *, cache: Path | None = None, execute: str = "off", profile: str = "cpu",
          timeout: float = 1800) -> subprocess.CompletedProcess:
    """``jupyter-book build src`` into ``out`` (html); returns the finished process (output captured)."""
    out.mkdir(parents=True, exist_ok=True)
    cfg_path = out / "_config.yml"
    cfg_path.write_text(yaml.safe_dump(book_config(cache, execute), allow_unicode=True), encoding="utf-8")
    jb = shutil.which("jupyter-book", path=os.path.dirname(sys.executable)) or "jupyter-book"
    # -W: a Sphinx warning fails the build (after --keep-going has listed every one)
    return subprocess.run([jb, "build", str(src), "--config", str(cfg_path), "--path-output", str(out),
                           "--builder", "html", "-W", "--keep-going"], capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, "MICROLM_PROFILE": profile})


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m microlm.book")
    ap.add_argument("--profile", default="cpu")
    ap.add_argument("--executed", type=Path, help="folder of executed notebooks (default _build/executed/<profile>)")
    ap.add_argument("--out", type=Path, default=REPO_ROOT / "_build")
    args = ap.parse_args(argv)
    executed = args.executed or REPO_ROOT / "_build" / "executed" / args.profile
    try:
        src = assemble(executed, REPO_ROOT / "_build" / "book-src" / args.profile,
                       profiles=tuple(dict.fromkeys([args.profile, "gpu"])))
    except MicroLMError as e:
        print(e, file=sys.stderr)
        return 1
    r = build(src, args.out, profile=args.profile)
    sys.stdout.write(r.stdout)
    sys.stderr.write(r.stderr)
    if r.returncode == 0:
        print(f"book: {args.out / '_build' / 'html' / 'index.html'}")
    return r.returncode


if __name__ == "__main__":
    sys.exit(main())
