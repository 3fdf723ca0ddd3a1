"""A stand-in OpenAI-compatible server for the server-management tests: /health after a delay, a
chat completion (streamed when asked), and modes that fail on purpose (exit while starting, never
healthy, ``empty``: every streamed answer without text) or start slowly (3 s).

``stubborn``: like vLLM starting up — SIGTERM is ignored, an "engine core" grandchild in the same
process group (ignoring SIGTERM too, with no parent-death signal) shares the listening socket, and
it never gets healthy; ``<server pid> <grandchild pid>`` goes to ``fake.pids`` in the working folder
once both exist."""

import json
import os
import signal
import sys
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

port, mode = int(sys.argv[1]), sys.argv[2]
print(f"fake server starting on {port} ({mode})", flush=True)
if mode == "crash":
    print("CUDA out of memory: the fake engine failed", flush=True)
    sys.exit(3)
START = time.monotonic()


class H(BaseHTTPRequestHandler):
    def log_message(self, *a):
        pass

    def _send(self, code, obj):
        data = json.dumps(obj).encode()
        self.send_response(code)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def do_GET(self):
        ready = mode not in ("never", "stubborn") and time.monotonic() - START > (3.0 if mode == "slow" else 0.5)
        self._send(200 if ready else 503, {})

    def do_POST(self):  # validates like an OpenAI server: a bad request is a 4xx, never a 500
        try:
            body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        except ValueError:
            return self._send(400, {"error": "bad JSON body"})
        if body.get("model") != "m":
            return self._send(404, {"error": "unknown model"})
        if body.get("max_tokens", 1) < 0 or body.get("n", 1) > 8:
            return self._send(400, {"error": "bad sampling parameters"})
        if sum(len(m["content"]) for m in body["messages"]) > 256:
            return self._send(400, {"error": "prompt longer than the context"})
        time.sleep(0.02)
        if body.get("stream"):  # server-sent events as an OpenAI server streams them, usage last
            text = "" if mode == "empty" else "{}"
            chunks = [{"choices": [{"delta": {"role": "assistant"}}]},
                      *([{"choices": [{"delta": {"content": text}}]}] if text else []),
                      {"choices": [{"delta": {}, "finish_reason": "stop"}]},
                      {"choices": [], "usage": {"prompt_tokens": 3, "completion_tokens": 1}}]
            data = "".join(f"data: {json.dumps(c)}\n\n" for c in chunks).encode() + b"data: [DONE]\n\n"
            self.send_response(200)
            self.send_header("Content-Type", "text/event-stream")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            return self.wfile.write(data)
        self._send(200, {"choices": [{"message": {"content": "{}"}, "finish_reason": "stop"}]})


server = ThreadingHTTPServer(("127.0.0.1", port), H)
if mode == "stubborn":
    signal.signal(signal.SIGTERM, signal.SIG_IGN)  # inherited by the grandchild
    engine = os.fork()
    if engine == 0:  # the "engine core": holds the port too, until SIGKILL
        while True:
            signal.pause()
    with open("fake.pids.tmp", "w") as f:
        f.write(f"{os.getpid()} {engine}")
    os.replace("fake.pids.tmp", "fake.pids")
server.serve_forever()
