"""`make lab`: JupyterLab from this environment on 127.0.0.1, started the way the Makefile starts it
(``python -m microlm.lab --profile P --port N ...``).  The py:percent notebooks come back from the
contents API as notebooks (and save back to py:percent), a kernel started for a notebook runs in this
environment with ``MICROLM_PROFILE`` and ``MICROLM_DATA``, and the server stops cleanly on SIGTERM.
Saving a chapter the way JupyterLab does leaves its .py byte for byte, and a generated .ipynb twin never
stops a chapter from opening.

Every wait polls with a deadline sized for a busy 2-core machine (JupyterLab takes ~10 s to start on
an idle one)."""

import asyncio
import difflib
import json
import os
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
import uuid
from datetime import UTC, datetime
from pathlib import Path

import jupytext
import psutil
import pytest
import websocket
from jupyter_client.kernelspec import KernelSpecManager
from jupytext import AsyncTextFileContentsManager

from microlm import lab
from microlm.course import to_ipynb

from .conftest import REPO

START_S = 300  # server answering /api/status
KERNEL_S = 300  # session + kernel started, one cell executed
STOP_S = 60  # SIGTERM -> exit (it shuts its kernels down first); then SIGKILL
PORT_TRIES = 3
NOTEBOOKS = sorted((REPO / "notebooks").glob("[0-9][0-9]_*.py"))
_HTTP = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # 127.0.0.1: never via a proxy


def _free_port() -> int:
    with socket.socket() as s:
        s.bind((lab.HOST, 0))
        return s.getsockname()[1]


def _port_free(port: int) -> bool:
    with socket.socket() as s:  # nothing accepts ...
        s.settimeout(2)
        if s.connect_ex((lab.HOST, port)) == 0:
            return False
    with socket.socket() as s:  # ... and a server could bind it again
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((lab.HOST, port))
        except OSError:
            return False
    return True


def _tail(path: Path, n: int = 4000) -> str:
    try:
        return path.read_text(encoding="utf-8", errors="replace")[-n:]
    except OSError:
        return ""


class Server:
    """One `python -m microlm.lab` in its own session, its output in ``log``."""

    def __init__(self, tmp: Path, profile: str, data: str):
        self.tmp, self.profile, self.token = tmp, profile, uuid.uuid4().hex
        jup = tmp / "jupyter"  # keep the user's Jupyter config, runtime, settings and history out
        self.env = {**os.environ, "MICROLM_DATA": data, "PYTHONUNBUFFERED": "1",
                    "JUPYTER_CONFIG_DIR": str(jup / "config"), "JUPYTER_DATA_DIR": str(jup / "data"),
                    "JUPYTER_RUNTIME_DIR": str(jup / "runtime"), "IPYTHONDIR": str(jup / "ipython"),
                    "JUPYTERLAB_SETTINGS_DIR": str(jup / "user-settings"),
                    "JUPYTERLAB_WORKSPACES_DIR": str(jup / "workspaces")}
        self.env.pop("MICROLM_PROFILE", None)  # only --profile decides
        self.proc: subprocess.Popen | None = None
        self.port = 0
        self.log = tmp / "lab.log"

    def argv(self, port: int) -> list[str]:
        return [sys.executable, "-m", "microlm.lab", "--profile", self.profile, "--port", str(port),
                "--token", self.token, "--no-browser"]

    @property
    def base(self) -> str:
        return f"http://{lab.HOST}:{self.port}"

    def request(self, method: str, path: str, body=None, token: bool = True, timeout: float = 120):
        headers = {"Content-Type": "application/json"}
        if token:
            headers["Authorization"] = f"token {self.token}"
        data = None if body is None else json.dumps(body).encode()
        req = urllib.request.Request(self.base + path, data=data, method=method, headers=headers)
        try:
            with _HTTP.open(req, timeout=timeout) as r:
                return r.status, r.read()
        except urllib.error.HTTPError as e:
            return e.code, e.read()

    def json(self, method: str, path: str, body=None, expect: int = 200):
        status, raw = self.request(method, path, body)
        assert status == expect, f"{method} {path}: {status} {raw[:2000]!r}\n{_tail(self.log)}"
        return json.loads(raw) if raw else None

    def start(self) -> None:
        for attempt in range(PORT_TRIES):
            self.port = _free_port()
            with open(self.log, "w") as out:
                self.proc = subprocess.Popen(self.argv(self.port), cwd=self.tmp, env=self.env, stdin=subprocess.DEVNULL,
                                             stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
            deadline = time.monotonic() + START_S
            while time.monotonic() < deadline:
                if self.proc.poll() is not None:
                    break
                try:
                    status, _ = self.request("GET", "/api/status", timeout=10)
                    if status == 200:
                        return
                except OSError:
                    pass
                time.sleep(0.5)
            else:
                pytest.fail(f"no /api/status within {START_S} s\n{_tail(self.log)}")
            lost_port = "already in use" in _tail(self.log)  # another process took the free port first
            if not lost_port or attempt == PORT_TRIES - 1:
                pytest.fail(f"the server exited ({self.proc.returncode})\n{_tail(self.log)}")

    def stop(self) -> int | None:
        """SIGTERM, then SIGKILL to its process group after STOP_S; its exit status (None: no process)."""
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(STOP_S)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(STOP_S)
        return self.proc.returncode


def _execute(server: Server, kernel_id: str, code: str, deadline: float) -> str:
    """Run ``code`` in the kernel over the server's websocket (Jupyter's JSON protocol); its stdout."""
    session = uuid.uuid4().hex
    ws = websocket.create_connection(
        f"ws://{lab.HOST}:{server.port}/api/kernels/{kernel_id}/channels?session_id={session}",
        header=[f"Authorization: token {server.token}"], timeout=60)
    try:
        msg_id = uuid.uuid4().hex
        ws.send(json.dumps({
            "header": {"msg_id": msg_id, "msg_type": "execute_request", "username": "test", "session": session,
                       "date": datetime.now(UTC).isoformat(), "version": "5.3"},
            "parent_header": {}, "metadata": {}, "channel": "shell", "buffers": [],
            "content": {"code": code, "silent": False, "store_history": False, "user_expressions": {},
                        "allow_stdin": False, "stop_on_error": True}}))
        ws.settimeout(5)
        out, replied, idle = [], False, False
        while not (replied and idle):
            if time.monotonic() > deadline:
                pytest.fail(f"no reply from the kernel within {KERNEL_S} s; stdout {''.join(out)!r}\n{_tail(server.log)}")
            try:
                frame = ws.recv()
            except websocket.WebSocketTimeoutException:
                continue
            if not isinstance(frame, str):
                continue  # binary frames carry buffers; none here
            msg = json.loads(frame)
            if msg.get("parent_header", {}).get("msg_id") != msg_id:
                continue
            kind, content = msg["header"]["msg_type"], msg["content"]
            if kind == "stream" and content["name"] == "stdout":
                out.append(content["text"])
            elif kind == "error":
                pytest.fail("the cell failed:\n" + "\n".join(content["traceback"]))
            elif kind == "execute_reply":
                assert content["status"] == "ok", content
                replied = True
            elif kind == "status" and content["execution_state"] == "idle":
                idle = True
        return "".join(out)
    finally:
        ws.close()


@pytest.fixture
def scratch():
    """A folder under the repository (so its jupytext.toml applies) that git ignores: _build/lab-test-*."""
    (REPO / "_build").mkdir(exist_ok=True)
    d = Path(tempfile.mkdtemp(prefix="lab-test-", dir=REPO / "_build"))
    yield d
    shutil.rmtree(d, ignore_errors=True)


def test_lab_command_serves_localhost_with_jupytext():
    cmd = lab.lab_command("smoke", 8123, "tok", ["--no-browser"])
    assert cmd[:3] == [sys.executable, "-m", "jupyterlab"] and cmd[-1] == "--no-browser"
    assert "--ServerApp.ip=127.0.0.1" in cmd
    assert {"--ServerApp.port=8123", "--ServerApp.port_retries=0", "--IdentityProvider.token=tok"} <= set(cmd)
    assert "--ServerApp.contents_manager_class=jupytext.AsyncTextFileContentsManager" in cmd
    assert f"--ServerApp.root_dir={REPO}" in cmd
    assert "--MappingKernelManager.transport_encryption=auto" in cmd  # CurveZMQ: no transport warning
    assert not any(a.startswith(("--ServerApp.port", "--IdentityProvider.token")) for a in lab.lab_command("cpu"))  # defaults: Jupyter's
    assert lab.lab_env("gpu", {"MICROLM_DATA": "/d"}) == {"MICROLM_DATA": "/d", "MICROLM_PROFILE": "gpu"}
    assert lab.resolve_profile("smoke") == "smoke"
    assert lab.resolve_profile(str(REPO / "configs" / "cpu.yaml")) == str(REPO / "configs" / "cpu.yaml")
    with pytest.raises(SystemExit, match="no profile 'nope'"):
        lab.resolve_profile("nope")


def test_make_lab_runs_microlm_lab():
    env = {k: v for k, v in os.environ.items() if k not in ("MAKEFLAGS", "MAKELEVEL", "MFLAGS")}  # under `make test`
    r = subprocess.run(["make", "--no-print-directory", "-n", "lab", "PROFILE=smoke", "PORT=8123", "LAB_ARGS=--no-browser"],
                       cwd=REPO, capture_output=True, text=True, timeout=120, env=env)
    assert r.returncode == 0, r.stderr
    assert shlex.split(r.stdout.strip().splitlines()[-1])[1:] == [
        "-m", "microlm.lab", "--profile", "smoke", "--port", "8123", "--no-browser"]


def test_lab_serves_notebooks_and_a_kernel_with_the_profile(tmp_path, scratch):
    data = str(tmp_path / "datasets")
    server = Server(tmp_path, "smoke", data)
    kernel = None
    try:
        server.start()
        pid, port = server.proc.pid, server.port

        # 127.0.0.1 only, and only with the token
        listening = {c.laddr.ip for c in psutil.Process(pid).net_connections(kind="inet")
                     if c.status == psutil.CONN_LISTEN}
        assert listening == {"127.0.0.1"}, listening
        assert server.request("GET", "/api/contents/notebooks", token=False)[0] == 403
        status, page = server.request("GET", "/lab")
        assert status == 200 and b"jupyterlab-jupytext" in page  # the lab extension is there
        viewers = server.json("GET", "/lab/api/settings/@jupyterlab/docmanager-extension:plugin")
        assert viewers["schema"]["properties"]["defaultViewers"]["default"]["python"] == "Jupytext Notebook"

        # every py:percent notebook opens as a notebook, cell for cell
        for py in NOTEBOOKS:
            model = server.json("GET", f"/api/contents/notebooks/{py.name}?content=1&type=notebook")
            assert (model["type"], model["format"]) == ("notebook", "json"), py.name
            cells = model["content"]["cells"]
            assert [c["source"] for c in cells] == [c.source for c in jupytext.read(py).cells], py.name
            assert cells[0]["cell_type"] == "markdown" and cells[0]["source"].startswith(f"# {py.stem[:2]} · ")
            params = [c for c in cells if "parameters" in c["metadata"].get("tags", [])]
            assert len(params) == 1 and "MICROLM_PROFILE" in params[0]["source"], py.name
        model = server.json("GET", "/api/contents/notebooks/01_corpus.py?content=1&type=notebook")
        nb = model["content"]
        assert nb["cells"][0]["source"].startswith("# 01 · The corpus")
        params = [c for c in nb["cells"] if "parameters" in c["metadata"].get("tags", [])]

        # ... and saves back to py:percent (to a scratch copy)
        rel = f"{scratch.relative_to(REPO).as_posix()}/01_corpus.py"
        server.json("PUT", f"/api/contents/{rel}", {"type": "notebook", "format": "json", "content": nb}, expect=201)
        text = (scratch / "01_corpus.py").read_text(encoding="utf-8")
        assert '# %% tags=["parameters"]' in text and "# %% [markdown]" in text
        saved = jupytext.reads(text, fmt="py:percent")
        assert [(c.cell_type, c.source, c.metadata) for c in saved.cells] == [
            (c["cell_type"], c["source"], c["metadata"]) for c in nb["cells"]]

        # a kernel for the notebook: this environment, the profile, MICROLM_DATA, cwd notebooks/
        deadline = time.monotonic() + KERNEL_S
        sess = server.json("POST", "/api/sessions", {"path": "notebooks/01_corpus.py", "name": "01_corpus.py",
                                                     "type": "notebook", "kernel": {"name": "python3"}}, expect=201)
        probe = ('import json, os, sys, microlm, tqdm.auto, tqdm.notebook\n'
                 'print("PROBE", json.dumps({"profile": profile, "data": os.environ.get("MICROLM_DATA"),'
                 ' "prefix": sys.prefix, "cwd": os.getcwd(), "microlm": microlm.__file__, "pid": os.getpid(),'
                 ' "tqdm": issubclass(tqdm.auto.tqdm, tqdm.notebook.tqdm)}))\n')
        out = _execute(server, sess["kernel"]["id"], params[0]["source"] + "\n" + probe, deadline)
        seen = json.loads(out.split("PROBE ", 1)[1])
        kernel = psutil.Process(seen["pid"])
        assert seen["profile"] == "smoke" and seen["data"] == data
        assert Path(seen["prefix"]).resolve() == Path(sys.prefix).resolve()
        assert Path(seen["cwd"]).resolve() == REPO / "notebooks"
        assert Path(seen["microlm"]).resolve().is_relative_to(REPO / "microlm")
        assert seen["tqdm"] is True  # tqdm.auto's bars are widgets here (ipywidgets is installed)
        assert "without encryption" not in _tail(server.log, 100_000)  # the kernel's sockets use CurveZMQ

        # SIGTERM: the server shuts its kernel down and exits; the port is free again
        assert server.stop() is not None
        assert psutil.wait_procs([kernel], timeout=STOP_S)[1] == [], "the kernel outlived the server"
        deadline = time.monotonic() + STOP_S
        while not _port_free(port):
            assert time.monotonic() < deadline, f"port {port} still taken after the server exited"
            time.sleep(0.5)
    finally:
        server.stop()
        if kernel is not None and kernel.is_running():
            kernel.kill()


def test_saving_from_lab_keeps_each_py_byte_for_byte_and_twins_never_block(scratch):
    """What JupyterLab does to a chapter, through the contents manager `make lab` configures (the
    repository's jupytext.toml): open it, let the kernel stamp its kernelspec and language_info into the
    metadata (it marks the notebook dirty, so autosave writes it within two minutes), save.  The .py must
    not change.  And a generated .ipynb twin newer than its .py (`make notebooks`, `make course` and the
    notebook tests write them) must not stop the .py from opening."""
    cm = AsyncTextFileContentsManager(root_dir=str(REPO))
    spec = KernelSpecManager().get_kernel_spec("python3")
    stamped = {"kernelspec": {"display_name": spec.display_name, "language": spec.language, "name": "python3"},
               "language_info": {"name": "python", "version": sys.version.split()[0], "mimetype": "text/x-python",
                                 "file_extension": ".py", "codemirror_mode": {"name": "ipython", "version": 3},
                                 "nbconvert_exporter": "python", "pygments_lexer": "ipython3"}}
    rel = scratch.relative_to(REPO).as_posix()

    async def check() -> tuple[list[str], list[str]]:
        changed, blocked = [], []
        for py in NOTEBOOKS:
            try:
                model = await cm.get(f"notebooks/{py.name}", content=True, type="notebook")
            except Exception as e:  # this checkout's own twin (notebooks/*.ipynb) is newer
                blocked.append(f"notebooks/{py.name}: {str(e).splitlines()[0][:160]}")
                continue
            model["content"].metadata.update(stamped)
            await cm.save({"type": "notebook", "content": model["content"]}, f"{rel}/{py.name}")
            saved, committed = (scratch / py.name).read_text(encoding="utf-8"), py.read_text(encoding="utf-8")
            if saved != committed:
                diff = difflib.unified_diff(committed.splitlines(), saved.splitlines(), py.name, "saved", lineterm="")
                changed.append(py.name + "\n" + "\n".join(list(diff)[:24]))
            twin = scratch / "twin" / py.name
            twin.parent.mkdir(exist_ok=True)
            shutil.copy(py, twin)
            old = time.time() - 3600
            os.utime(twin, (old, old))
            to_ipynb(twin)
            try:
                await cm.get(f"{rel}/twin/{py.name}", content=True, type="notebook")
            except Exception as e:  # tornado.web.HTTPError 400: "... is more recent than ..."
                blocked.append(f"{py.name}: {str(e).splitlines()[0][:160]}")
        return changed, blocked

    changed, blocked = asyncio.run(check())
    assert not changed, (f"saving from JupyterLab rewrites {len(changed)} notebook(s) (jupytext.toml's "
                         "notebook_metadata_filter must keep exactly the header they have):\n" + "\n".join(changed[:2]))
    assert not blocked, ("a newer .ipynb twin stops the .py from opening (jupytext.toml pairs them: `formats`): "
                         + "; ".join(blocked))
