"""Start, watch and stop an OpenAI-compatible server process: vLLM, or ``transformers serve`` (the
baseline, also with ``--continuous-batching``), from the serving environment.

The server runs in its own session (process group), so stopping it stops its engine workers too.
It never outlives the process that started it, however that process dies (``kill -9`` included):
a watcher (a tiny stdlib-only process in a session of its own) holds the read end of a pipe whose
write end only the starting process holds; at EOF it sends SIGTERM to the server's whole group and
SIGKILL a few seconds later (vLLM ignores SIGTERM while starting, and its engine core gets no
parent-death signal), then exits.  ``PR_SET_PDEATHSIG`` (SIGTERM to the server when its parent
dies, Linux) stays as a second line.  Its output goes to ``<run dir>/<name>.log`` and its
pid to ``<name>.pid``.  ``start`` refuses a port that is taken (one line, with the owner when it
is one of ours), waits for ``/health`` up to a timeout and, if the server dies or never gets
healthy, raises with the last lines of its log.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

from microlm.errors import MicroLMError
from microlm.serve.env import env_python

__all__ = ["ServerSpec", "ManagedServer", "port_free", "free_port", "vllm_command", "transformers_command",
           "transformers_model", "SERVER_KINDS", "log_tail", "VLLM_LAUNCHER", "WATCHER_TAG"]


@dataclass
class ServerSpec:
    """What to serve and how (``serve`` config section + CLI flags)."""

    model: str
    served_name: str
    host: str = "127.0.0.1"
    port: int = 8000
    api_key: str | None = None
    tensor_parallel_size: int = 1
    max_model_len: int | None = None
    dtype: str = "auto"
    kv_cache_gib: float = 1.0
    lora: dict[str, str] = field(default_factory=dict)  # adapter name → folder (vLLM --enable-lora)
    max_lora_rank: int = 8
    max_num_seqs: int = 64
    extra_args: list[str] = field(default_factory=list)


def port_free(host: str, port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError:
            return False
    return True


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


# vLLM's OpenAI-compatible server, with special-token text in message contents kept plain (see there)
VLLM_LAUNCHER = Path(__file__).with_name("vllm_launch.py")


def vllm_command(python: Path, spec: ServerSpec) -> list[str]:
    cmd = [str(python), str(VLLM_LAUNCHER), "--model", spec.model,
           "--served-model-name", spec.served_name, "--host", spec.host, "--port", str(spec.port),
           "--dtype", spec.dtype, "--tensor-parallel-size", str(spec.tensor_parallel_size),
           "--max-num-seqs", str(spec.max_num_seqs), "--generation-config", "auto", "--disable-log-stats",
           # JSON-schema answers through xgrammar without free whitespace (as the evaluation's own constrained row)
           "--structured-outputs-config", '{"backend": "xgrammar", "disable_any_whitespace": true}']
    if spec.max_model_len:
        cmd += ["--max-model-len", str(spec.max_model_len)]
    if spec.api_key:
        cmd += ["--api-key", spec.api_key]
    if spec.lora:
        cmd += ["--enable-lora", "--max-lora-rank", str(spec.max_lora_rank), "--lora-modules",
                *(f"{k}={v}" for k, v in spec.lora.items())]
    return cmd + list(spec.extra_args)


def transformers_model(spec: ServerSpec) -> str:
    """The model ``transformers serve`` is pinned to, which every request must name exactly: a local
    folder as an absolute path (the server runs in the run folder, and ``--continuous-batching``
    needs one), a hub id as given."""
    p = Path(spec.model).expanduser()
    return os.path.abspath(p) if p.exists() else spec.model


def transformers_command(python: Path, spec: ServerSpec, *, continuous_batching: bool = False) -> list[str]:
    """``transformers serve`` (transformers' own OpenAI-compatible server) for the same folder;
    ``continuous_batching``: its continuous-batching mode (paged attention), transformers 5.x."""
    exe = Path(python).parent / "transformers"
    return [str(exe), "serve", transformers_model(spec), *(["--continuous-batching"] if continuous_batching else []),
            "--host", spec.host, "--port", str(spec.port), "--dtype",
            "float32" if spec.dtype in ("auto", "float32") else spec.dtype, "--device", "cpu",
            "--log-level", "warning", *spec.extra_args]


# ``ManagedServer(kind=...)``: vLLM, ``transformers serve``, ``transformers serve --continuous-batching``
SERVER_KINDS = ("vllm", "transformers", "transformers-cb")


def log_tail(path: Path, n: int = 15) -> str:
    try:
        lines = path.read_text(encoding="utf-8", errors="replace").splitlines()
    except OSError:
        return "(no log)"
    keep = [ln for ln in lines if ln.strip() and "DeprecationWarning" not in ln and "warnings.warn" not in ln]
    return "\n".join(keep[-n:])


def _die_with_parent() -> None:  # runs in the child before exec
    os.setsid()
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


# The watcher (``python -I -S -c WATCHER microlm-watch <pgid> <grace>``, stdin: the pipe).  It
# exits as soon as the group has no live process (its job is done), or after stopping the group at
# EOF; a zombie (exited, not yet reaped) does not count as live.  It never reads the write end's
# data but one byte ``stop()`` sends before closing it (the group is stopped already).
WATCHER_TAG = "microlm-watch"
WATCHER = r"""
import os, select, signal, sys, time
pg, grace = int(sys.argv[2]), float(sys.argv[3])
for s in (signal.SIGINT, signal.SIGHUP, signal.SIGPIPE):
    signal.signal(s, signal.SIG_IGN)

def alive():
    try:
        os.killpg(pg, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        names = os.listdir("/proc")
    except OSError:
        return True
    for n in names:
        if n.isdigit():
            try:
                with open("/proc/%s/stat" % n, "rb") as f:
                    st = f.read().rsplit(b")", 1)[1].split()
            except (OSError, IndexError):
                continue
            if int(st[2]) == pg and st[0] not in (b"Z", b"X"):
                return True
    return False

def gone_within(t):
    end = time.monotonic() + t
    while alive():
        if time.monotonic() > end:
            return False
        time.sleep(0.1)
    return True

def kill(sig):
    try:
        os.killpg(pg, sig)
    except OSError:
        pass

stopping = False  # a byte before EOF: stop() has stopped the group (what is left is exiting)
while alive():
    if not select.select([0], [], [], 1.0)[0]:
        continue
    if os.read(0, 1):
        stopping = True
        continue
    if alive():  # EOF: the process that started the server is gone (or stop() is done)
        if not stopping:
            print("microlm: the process that started this server is gone: stopping it (group %d)" % pg, flush=True)
            kill(signal.SIGTERM)
        if stopping or not gone_within(grace):
            kill(signal.SIGKILL)
            gone_within(10.0)
    break
"""

_WATCH_FDS: set[int] = set()  # write ends held by this process: a child made by a bare fork() closes them


def _close_watch_fds() -> None:
    for fd in list(_WATCH_FDS):
        with contextlib.suppress(OSError):
            os.close(fd)
    _WATCH_FDS.clear()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_close_watch_fds)


class ManagedServer:
    """One server process (``kind``: ``vllm`` | ``transformers`` | ``transformers-cb``, the latter
    with ``--continuous-batching``) with its log and pid file in ``run_dir``, and its watcher; a
    context manager that always stops it."""

    orphan_grace_s = 5.0  # the watcher's SIGTERM → SIGKILL wait when the starting process died

    def __init__(self, spec: ServerSpec, run_dir: Path, *, kind: str = "vllm", python: Path | None = None,
                 name: str | None = None, env: dict | None = None, command: list[str] | None = None):
        if kind not in SERVER_KINDS:
            raise MicroLMError(f"server kind must be one of {', '.join(SERVER_KINDS)}, got {kind!r}")
        self.spec, self.kind = spec, kind
        self.run_dir = Path(run_dir)
        self.name = name or kind
        self.python = Path(python or env_python())
        self.log_path = self.run_dir / f"{self.name}.log"
        self.pid_path = self.run_dir / f"{self.name}.pid"
        self.env = env or {}
        self._command = command  # any other OpenAI-compatible server command (tests)
        self.proc: subprocess.Popen | None = None
        self.watcher: subprocess.Popen | None = None  # stops the server's group if this process dies
        self._watch_fd: int | None = None  # the pipe's write end: only this process holds it

    @property
    def base_url(self) -> str:
        return f"http://{self.spec.host}:{self.spec.port}/v1"

    @property
    def model_name(self) -> str:
        """The ``model`` a request names: vLLM's served name, or the folder ``transformers serve`` is pinned to."""
        return self.spec.served_name if self.kind == "vllm" else transformers_model(self.spec)

    def command(self) -> list[str]:
        if self._command is not None:
            return list(self._command)
        if self.kind == "vllm":
            return vllm_command(self.python, self.spec)
        return transformers_command(self.python, self.spec, continuous_batching=self.kind == "transformers-cb")

    def start(self, timeout: float = 600.0) -> ManagedServer:
        if not port_free(self.spec.host, self.spec.port):
            owner = ""
            for pid_file in self.run_dir.glob("*.pid"):
                owner = f" (by {pid_file.stem}, pid {pid_file.read_text().strip()}, one of ours)"
            raise MicroLMError(f"port {self.spec.port} on {self.spec.host} is taken{owner}: stop that server or "
                               f"choose another port (--port / serve.port)")
        if self._command is None and not self.python.is_file():
            raise MicroLMError(f"no serving environment at {self.python.parent.parent}: run `make serve-env`")
        self.run_dir.mkdir(parents=True, exist_ok=True)
        env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": str(max(1, int(self.spec.kv_cache_gib))),
               "VLLM_LOGGING_LEVEL": "WARNING", "TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1",
               "PYTHONWARNINGS": "ignore::DeprecationWarning", **self.env}
        env.pop("VIRTUAL_ENV", None)
        log = open(self.log_path, "ab")  # noqa: SIM115 (the child keeps writing to it)
        log.write(f"\n=== {time.strftime('%Y-%m-%d %H:%M:%S')} {' '.join(self.command())}\n".encode())
        log.flush()
        try:
            self.proc = subprocess.Popen(self.command(), stdout=log, stderr=subprocess.STDOUT, env=env,
                                         preexec_fn=_die_with_parent, cwd=self.run_dir)
        except OSError as e:
            log.close()
            raise MicroLMError(f"cannot start the {self.kind} server: {e}") from None
        try:
            self.pid_path.write_text(str(self.proc.pid))
            self._watch(log)
            log.close()
            self.wait_healthy(timeout)
        except BaseException:
            log.close()
            self.stop()
            raise
        return self

    def _watch(self, log) -> None:
        """Start the watcher of the server's group (its pgid is the server's pid: own session)."""
        r, w = os.pipe()  # both ends non-inheritable: the server and later children never hold w
        self._watch_fd = w
        _WATCH_FDS.add(w)
        try:
            self.watcher = subprocess.Popen(
                [sys.executable or "python3", "-I", "-S", "-c", WATCHER, WATCHER_TAG, str(self.proc.pid),
                 str(self.orphan_grace_s)], stdin=r, stdout=log, stderr=subprocess.STDOUT,
                start_new_session=True, cwd="/")
        finally:
            os.close(r)

    def healthy(self) -> bool:
        try:
            with urllib.request.urlopen(f"http://{self.spec.host}:{self.spec.port}/health", timeout=5) as r:
                return r.status == 200
        except (urllib.error.URLError, OSError, TimeoutError):
            return False

    def wait_healthy(self, timeout: float) -> None:
        t0 = time.monotonic()
        while time.monotonic() - t0 < timeout:
            if self.proc is not None and self.proc.poll() is not None:
                raise MicroLMError(f"{self.kind} server exited with code {self.proc.returncode} while starting; "
                                   f"last lines of {self.log_path}:\n{log_tail(self.log_path)}")
            if self.healthy():
                return
            time.sleep(1.0)
        raise MicroLMError(f"{self.kind} server not healthy after {timeout:.0f} s; last lines of {self.log_path}:\n"
                           f"{log_tail(self.log_path)}")

    def stop(self, grace: float = 30.0) -> int | None:
        """SIGTERM to the server's process group, SIGKILL after ``grace`` seconds; the exit code.
        Then the watcher is let go (the pipe closed: it finds the group gone and exits)."""
        p, self.proc = self.proc, None
        try:
            if p is None:
                return None
            if p.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(p.pid, signal.SIGTERM)
                try:
                    p.wait(grace)
                except subprocess.TimeoutExpired:
                    with contextlib.suppress(ProcessLookupError):
                        os.killpg(p.pid, signal.SIGKILL)
                    p.wait(10)
            with contextlib.suppress(ProcessLookupError):  # engine workers left in the group
                os.killpg(p.pid, signal.SIGKILL)
            self.pid_path.unlink(missing_ok=True)
            return p.returncode
        finally:
            self._unwatch()

    def _unwatch(self) -> None:
        w, self._watch_fd = self._watch_fd, None
        watcher, self.watcher = self.watcher, None
        if w is not None:
            _WATCH_FDS.discard(w)
            if watcher is not None and watcher.poll() is None:  # it exits by itself once the group is gone
                with contextlib.suppress(OSError):
                    os.write(w, b"s")  # stopped by us: no SIGTERM grace for what is left, no message
            os.close(w)
        if watcher is not None:
            try:  # the group is gone by now: it exits at once (it would stop the group itself otherwise)
                watcher.wait(self.orphan_grace_s + 15)
            except subprocess.TimeoutExpired:
                watcher.kill()
                watcher.wait()

    def restart(self, timeout: float = 600.0) -> None:
        self.stop()
        deadline = time.monotonic() + 30
        while not port_free(self.spec.host, self.spec.port) and time.monotonic() < deadline:
            time.sleep(0.5)
        self.start(timeout)

    def rss_mb(self) -> float:
        """Resident memory of the server and its children (engine workers), MB."""
        import psutil

        if self.proc is None:
            return 0.0
        try:
            root = psutil.Process(self.proc.pid)
            procs = [root, *root.children(recursive=True)]
            return sum(p.memory_info().rss for p in procs if p.is_running()) / 2**20
        except psutil.Error:
            return 0.0

    def __enter__(self) -> ManagedServer:
        return self.start() if self.proc is None else self

    def __exit__(self, *exc) -> None:
        self.stop()


