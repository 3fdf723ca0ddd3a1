"""Run the course headless: every notebook through papermill at one profile.

``python -m microlm.course --profile cpu`` converts ``notebooks/NN_*.py`` (jupytext py:percent) to
``.ipynb`` beside them and executes each with papermill, writing the executed copy to
``_build/executed/<profile>/``.  A failing cell stops the run with a non-zero exit.

The kernel talks to papermill over CurveZMQ-encrypted sockets (:func:`kernel_config`), so no kernel
prints "running over TCP without encryption" into the course log; ``tqdm.auto``'s progress bars are
widgets in the kernel (``ipywidgets``), saved with their final state in the executed copy (the book
strips them: ``microlm.book``).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from microlm.paths import REPO_ROOT
from microlm.progress import finish_bars

NOTEBOOK_DIR = REPO_ROOT / "notebooks"


def notebook_sources(names: list[str] | None = None) -> list[Path]:
    paths = sorted(NOTEBOOK_DIR.glob("[0-9][0-9]_*.py"))
    if names:
        paths = [p for p in paths if p.stem in names or p.stem[:2] in names]
    return paths


def to_ipynb(py_path: Path) -> Path:
    import jupytext

    nb = jupytext.read(py_path)
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    out = py_path.with_suffix(".ipynb")
    jupytext.write(nb, out)
    return out


def curve_available(manager_class: type) -> bool:
    """Whether a kernel manager class (``jupyter_client``'s ``KernelManager``, ``jupyter_server``'s
    ``MappingKernelManager``) has the ``transport_encryption`` setting and pyzmq has CurveZMQ."""
    import zmq

    return manager_class.class_traits().get("transport_encryption") is not None and bool(zmq.has("curve"))


def kernel_config():
    """The kernel manager's settings for a papermill run: transport encryption ``auto`` (CurveZMQ keys
    the manager provisions when the kernelspec declares ``supported_encryption: curve``, as ipykernel's
    does) where this jupyter_client has the setting and pyzmq has Curve.  Without it ipykernel >= 7.4
    warns at every start that it "is running over TCP without encryption" (its sockets are on 127.0.0.1
    either way): the warning goes by fixing its cause, not by a log filter.  ``make lab`` does the same
    for JupyterLab's kernels (``microlm.lab``)."""
    from jupyter_client.manager import KernelManager
    from traitlets.config import Config

    cfg = Config()
    if curve_available(KernelManager):
        cfg.KernelManager.transport_encryption = "auto"
    return cfg


def execute(ipynb: str | Path, out: str | Path, profile: str, *, cwd: str | Path = NOTEBOOK_DIR, **kw):
    """One notebook through papermill at ``profile`` (the ``parameters`` cell's ``profile``), written
    to ``out``; returns the executed notebook.  Each widget progress bar's text fallback is its final
    line (:func:`microlm.progress.finish_bars`: what JupyterLab shows of it when it opens the copy).
    ``kw`` go to ``papermill.execute_notebook``."""
    import nbformat
    import papermill as pm

    kw.setdefault("progress_bar", False)
    nb = pm.execute_notebook(str(ipynb), str(out), parameters={"profile": profile}, kernel_name="python3",
                             cwd=str(cwd), config=kernel_config(), **kw)
    if finish_bars(nb):
        nbformat.write(nb, str(out))
    return nb


def run(profile: str, names: list[str] | None = None, out_dir: Path | None = None) -> list[Path]:
    out_dir = out_dir or REPO_ROOT / "_build" / "executed" / profile
    out_dir.mkdir(parents=True, exist_ok=True)
    done = []
    for py in notebook_sources(names):
        ipynb = to_ipynb(py)
        out = out_dir / ipynb.name
        t0 = time.time()
        print(f"[course] {py.stem} (profile={profile}) ...", flush=True)
        execute(ipynb, out, profile, log_output=False)
        print(f"[course] {py.stem} ok in {time.time() - t0:.1f} s -> {out}", flush=True)
        done.append(out)
    return done


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m microlm.course")
    ap.add_argument("--profile", default="cpu")
    ap.add_argument("--only", nargs="*", help="notebook stems or numbers, e.g. 01 or 01_corpus")
    ap.add_argument("--convert-only", action="store_true", help="only write the .ipynb twins")
    args = ap.parse_args(argv)
    if args.convert_only:
        for py in notebook_sources(args.only):
            print(to_ipynb(py))
        return 0
    try:
        run(args.profile, args.only)
    except Exception as e:  # papermill raises PapermillExecutionError with the failing cell
        print(f"[course] failed: {type(e).__name__}: {str(e).strip().splitlines()[-1] if str(e).strip() else e}",
              file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
