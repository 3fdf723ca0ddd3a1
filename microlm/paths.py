"""How a page or a progress line shows a path: never the building machine's absolute path."""

from __future__ import annotations

import contextlib
import os
from pathlib import Path

__all__ = ["display_path"]


def display_path(path: str | os.PathLike) -> str:
    """``path`` as a page or a progress line may show it, never the building machine's absolute path:
    relative to the project root (the course checkout: ``runs/cpu/ie_data``) when inside it, under
    ``$MICROLM_RUNS`` when that points elsewhere, else with the home folder written ``~``; a relative
    path or a hub id (``Qwen/Qwen2.5-1.5B-Instruct``) as given."""
    from microlm.config import ENV_RUNS, REPO_ROOT, project_root

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
