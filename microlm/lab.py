"""JupyterLab on the course: ``make lab`` (``python -m microlm.lab --profile cpu``).

Serves the checkout (root: the repository, file browser opened at ``notebooks/``) on 127.0.0.1 from
this environment, so the kernel imports ``microlm`` and inherits ``MICROLM_DATA``; ``MICROLM_PROFILE``
is set to the chosen profile, which every notebook's ``parameters`` cell reads for its default.
Jupytext's contents manager serves the ``py:percent`` notebooks as notebooks (under the repository's
``jupytext.toml``) and saves them back to ``.py``; JupyterLab opens ``.py`` files with the
"Jupytext Notebook" viewer by default (right click → Open With → Editor for a plain editor).
Kernels talk to the server over CurveZMQ-encrypted sockets where jupyter_server and pyzmq allow it
(no "running over TCP without encryption" in the server log), and the package's ``tqdm.auto``
progress bars are ``ipywidgets`` widgets there (``jupyterlab_widgets`` comes with ``ipywidgets``).

Options other than ``--profile``/``--port``/``--token`` go to ``jupyter lab`` unchanged
(``make lab LAB_ARGS=--no-browser``).  The command is built by :func:`lab_command`, which
``tests/test_lab.py`` runs the same way.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from microlm.config import BASE
from microlm.course import curve_available
from microlm.paths import REPO_ROOT

HOST = "127.0.0.1"
SETTINGS_DIR = REPO_ROOT / "_build" / "lab" / "settings"  # JupyterLab app settings (generated, git-ignored)

# Defaults of JupyterLab settings (its overrides.json): text notebooks open as notebooks; no news or
# update checks over the network.
OVERRIDES = {
    "@jupyterlab/docmanager-extension:plugin": {"defaultViewers": {"python": "Jupytext Notebook"}},
    "@jupyterlab/apputils-extension:notification": {"checkForUpdates": False, "fetchNews": "false"},
}

__all__ = ["lab_command", "lab_env", "resolve_profile", "write_settings", "main"]


def resolve_profile(profile: str) -> str:
    """The profile as the notebooks will read it: a name with ``configs/<name>.yaml``, or a YAML path
    (made absolute: the kernel runs in ``notebooks/``).  Fails early on anything else."""
    if os.sep not in profile and not profile.endswith((".yaml", ".yml")):
        if profile != BASE and (REPO_ROOT / "configs" / f"{profile}.yaml").is_file():
            return profile
    elif Path(profile).is_file():
        return str(Path(profile).resolve())
    names = ", ".join(sorted(p.stem for p in (REPO_ROOT / "configs").glob("*.yaml") if p.stem != BASE))
    raise SystemExit(f"microlm.lab: no profile {profile!r} (profiles: {names}, or a YAML path)")


def _curve_available() -> bool:
    from jupyter_server.services.kernels.kernelmanager import MappingKernelManager

    return curve_available(MappingKernelManager)


def lab_command(profile: str = "cpu", port: int | None = None, token: str | None = None,
                extra: list[str] | tuple[str, ...] = ()) -> list[str]:
    """The ``jupyter lab`` command line (this interpreter).  ``port`` None: 8888 or the next free one;
    a given port is used exactly (no retries).  ``token`` None: Jupyter generates one and prints the URL.
    The profile goes to the kernel through the environment (:func:`lab_env`)."""
    cmd = [
        sys.executable, "-m", "jupyterlab",
        f"--ServerApp.ip={HOST}",
        f"--ServerApp.root_dir={REPO_ROOT}",
        "--LabApp.default_url=/lab/tree/notebooks",
        "--ServerApp.contents_manager_class=jupytext.AsyncTextFileContentsManager",
        f"--LabApp.app_settings_dir={SETTINGS_DIR}",
    ]
    if _curve_available():  # CurveZMQ between server and kernel: no "running over TCP without encryption"
        cmd.append("--MappingKernelManager.transport_encryption=auto")
    if hasattr(os, "geteuid") and os.geteuid() == 0:
        cmd.append("--ServerApp.allow_root=True")  # containers run as root; it serves 127.0.0.1 only
    if port is not None:
        cmd += [f"--ServerApp.port={port}", "--ServerApp.port_retries=0"]
    if token is not None:
        cmd.append(f"--IdentityProvider.token={token}")
    return cmd + list(extra)


def lab_env(profile: str, base: dict[str, str] | None = None) -> dict[str, str]:
    """The server's (hence every kernel's) environment: ``base`` (default: this one, so ``MICROLM_DATA``
    and ``MICROLM_RUNS`` pass through) with ``MICROLM_PROFILE`` set."""
    env = dict(os.environ if base is None else base)
    env["MICROLM_PROFILE"] = profile
    return env


def write_settings(settings_dir: Path = SETTINGS_DIR) -> Path:
    """Write ``overrides.json`` (only when it changed, atomically: two servers may start at once)."""
    path = settings_dir / "overrides.json"
    text = json.dumps(OVERRIDES, indent=2) + "\n"
    if path.is_file() and path.read_text(encoding="utf-8") == text:
        return path
    settings_dir.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".overrides.{os.getpid()}.json")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)
    return path


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m microlm.lab",
                                 description="JupyterLab on the course notebooks (other options go to jupyter lab)")
    ap.add_argument("--profile", default=os.environ.get("MICROLM_PROFILE") or "cpu",
                    help="MICROLM_PROFILE for the kernels (default: $MICROLM_PROFILE, else cpu)")
    ap.add_argument("--port", type=int, help="serve on exactly this port (default: 8888 or the next free one)")
    ap.add_argument("--token", help="access token (default: a random one, printed with the URL)")
    args, extra = ap.parse_known_args(argv)
    profile = resolve_profile(args.profile)
    write_settings()
    cmd = lab_command(profile, args.port, args.token, extra)
    sys.stdout.flush()
    os.execve(sys.executable, cmd, lab_env(profile))  # the server takes this process (signals, exit status)


if __name__ == "__main__":
    main()
