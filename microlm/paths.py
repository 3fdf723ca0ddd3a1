"""Where things are: the source checkout, the course project a command runs in, and how a page or a
progress line shows a path (never the building machine's absolute path)."""

from __future__ import annotations

import contextlib
import os
from pathlib import Path

__all__ = ["display_path", "project_root", "REPO_ROOT", "ENV_RUNS"]

REPO_ROOT = Path(__file__).resolve().parent.parent  # the source checkout (shipped data, notebooks)
ENV_RUNS = "MICROLM_RUNS"  # where stage folders go, when set


def project_root(start: str | os.PathLike | None = None) -> Path | None:
    """The nearest folder at or above ``start`` (default: the working directory) that holds a
    ``configs/`` folder and a ``pyproject.toml`` or ``_config.yml`` — the course checkout, whether the
    CLI runs at its root or papermill/Jupyter Book/JupyterLab run a notebook in ``notebooks/``."""
    here = Path(start or Path.cwd()).resolve()
    for d in (here, *here.parents):
        if (d / "configs").is_dir() and ((d / "pyproject.toml").is_file() or (d / "_config.yml").is_file()):
            return d
    return None


def display_path(path: str | os.PathLike) -> str:
    """``path`` as a page or a progress line may show it, never the building machine's absolute path:
    relative to the project root (the course checkout: ``runs/cpu/ie_data``) when inside it, under
    ``$MICROLM_RUNS`` when that points elsewhere, else with the home folder written ``~``; a relative
    path or a hub id (``Qwen/Qwen2.5-1.5B-Instruct``) as given."""
    p = Path(path)
    if not p.is_absolute():
        return p.as_posix()
    p = Path(os.path.abspath(p))
    roots = [(r, "") for r in (project_root(), REPO_ROOT) if r is not None]
    if os.environ.get(ENV_RUNS):
        roots.append((Path(os.environ[ENV_RUNS]), f"${ENV_RUNS}/"))
    roots.append((Path.home(), "~/"))
    for root, prefix in roots:
        with contextlib.suppress(ValueError):
            return prefix + p.relative_to(Path(os.path.abspath(root))).as_posix()
    return p.as_posix()
