"""The chat loop behind ``microlm chat`` (MiniMind's ``chat.py``, hardened).

``ChatSession`` keeps the conversation and trims the oldest turns so prompt + answer fit the
context window; ``run_chat`` is the terminal/pipe loop with ``/reset``, ``/system <text>``,
``/exit``.  Ctrl-C while an answer streams stops that answer and returns to the prompt with the
history as it was before the question.  Models come from ``microlm.model.load_model``.
"""

from __future__ import annotations

import json
import signal
import sys
import threading
from collections.abc import Iterator
from typing import TextIO

from microlm.errors import MicroLMError
from microlm.infer.config import GenerationConfig
from microlm.infer.generate import Generation, stream_text

__all__ = ["ChatSession", "run_chat", "HELP"]

HELP = "commands: /reset (forget the conversation), /system <text> (set the system prompt; empty clears it), /exit"


class ChatSession:
    """A conversation with a model: history, system prompt, context-window trimming, streaming."""

    def __init__(self, model, tok, gen: GenerationConfig | None = None, system: str | None = None):
        self.model, self.tok = model, tok
        self.gen = (gen or GenerationConfig()).validate()
        ctx = model.cfg.max_seq_len
        if self.gen.max_new_tokens >= ctx:
            raise MicroLMError(f"max_new_tokens {self.gen.max_new_tokens} leaves no room for a message: the model's "
                               f"context is {ctx} tokens in all; ask for fewer (e.g. --max-new-tokens {ctx // 4})")
        self.system = system or None
        self.history: list[dict] = []
        self.last: Generation | None = None
        self.trimmed = 0  # turns dropped from the front for the last answer

    def reset(self) -> None:
        self.history = []

    def messages(self, user: str) -> list[dict]:
        """System prompt + as many recent turns as fit + the new question."""
        head = [{"role": "system", "content": self.system}] if self.system else []
        room = self.model.cfg.max_seq_len - self.gen.max_new_tokens
        turns = list(self.history)
        self.trimmed = 0
        while True:
            msgs = head + turns + [{"role": "user", "content": user}]
            n = len(self.tok.encode_chat(msgs, add_generation_prompt=True))
            if n <= room:
                return msgs
            if not turns:
                raise MicroLMError(f"message too long: {n} tokens with the system prompt, but only {room} fit "
                                   f"(context {self.model.cfg.max_seq_len} − {self.gen.max_new_tokens} new tokens)")
            turns = turns[2:]  # drop the oldest question and its answer
            self.trimmed += 1

    def reply(self, user: str) -> Iterator[str]:
        """Stream the answer; the turn joins the history only when the answer is complete."""
        if not user.strip():
            raise MicroLMError("empty message")
        msgs = self.messages(user)
        box: dict = {}
        parts = []
        for delta in stream_text(self.model, self.tok, msgs, self.gen, result=box):
            parts.append(delta)
            yield delta
        self.last = box["generation"]
        self.history += [{"role": "user", "content": user}, {"role": "assistant", "content": "".join(parts)}]


def _stats(s: ChatSession) -> str:
    g = s.last
    note = f", {s.trimmed} old turn(s) left out to fit the context" if s.trimmed else ""
    end = "" if g.finish_reason == "stop" else ", cut at max_new_tokens"
    return f"[{len(g.ids)} tokens, {g.tokens_per_s:.1f} tokens/s{end}{note}]"


def run_chat(session: ChatSession, inp: TextIO | None = None, out: TextIO | None = None, err: TextIO | None = None,
             *, interactive: bool | None = None, json_lines: bool = False) -> int:
    """The chat loop.  Interactive (a terminal): prompts, streamed answers and a stats line.
    Otherwise (a pipe): each non-empty input line is one user turn; each answer is streamed and
    ended by a newline (answers may span lines), stats go to ``err``.  ``json_lines``: one JSON
    object per answer instead (``user``, ``assistant``, ``tokens``, ``tokens_per_s``,
    ``finish_reason``), for scripts."""
    inp, out, err = inp or sys.stdin, out or sys.stdout, err or sys.stderr
    if interactive is None:
        interactive = inp.isatty()
    if interactive and inp is sys.stdin:
        try:  # line editing and ↑ history for input()
            import readline  # noqa: F401
        except ImportError:
            pass
    with _CtrlC(interactive) as ctrl_c:  # before the first prompt, so no Ctrl-C after it is missed
        if interactive:
            out.write(f"MicroLM chat — {session.model.num_parameters():,} parameters, context "
                      f"{session.model.cfg.max_seq_len} tokens. {HELP}\n")
            out.flush()
        return _loop(session, inp, out, err, interactive, json_lines, ctrl_c)


class _CtrlC:
    """Ctrl-C in an interactive chat, whatever SIGINT disposition the process inherited.

    A non-interactive shell starts a background job (``cmd &``) with SIGINT *ignored*, and so is
    everything that job starts: a test runner, and each chat it spawns in a pseudo-terminal.
    Python then installs no ``KeyboardInterrupt`` handler and Ctrl-C never stopped an answer.
    This handler is installed for the interactive loop (and the old one put back after it); it
    raises ``KeyboardInterrupt`` and also records the press, which the streaming loop checks per
    piece of text, so a press still stops the answer where its exception was swallowed on the
    way (Python discards an exception raised inside a finalizer or a ``__del__``)."""

    def __init__(self, enabled: bool) -> None:
        self.enabled = enabled and threading.current_thread() is threading.main_thread()
        self.pressed = False
        self._old = None

    def __call__(self, signum, frame) -> None:
        self.pressed = True
        raise KeyboardInterrupt

    def __enter__(self) -> _CtrlC:
        if self.enabled:
            self._old = signal.signal(signal.SIGINT, self)
        return self

    def __exit__(self, *exc) -> None:
        if self.enabled:  # None: a handler not set from Python; the default is the nearest
            signal.signal(signal.SIGINT, signal.SIG_DFL if self._old is None else self._old)


def _loop(session: ChatSession, inp: TextIO, out: TextIO, err: TextIO, interactive: bool, json_lines: bool,
          ctrl_c: _CtrlC) -> int:
    warned = False
    failed = 0  # turns that ended in an error: a script (pipe, --json) sees a non-zero exit status
    while True:
        ctrl_c.pressed = False
        try:
            if interactive:
                line = input("user> ") if inp is sys.stdin else _prompt(inp, out)
            else:
                line = inp.readline()
                if not line:
                    break
        except EOFError:
            break
        except KeyboardInterrupt:  # Ctrl-C at the prompt: leave
            out.write("\n")
            break
        line = line.strip()
        if "\ufffd" in line and not warned:
            err.write("chat: input was not valid UTF-8; undecodable bytes were replaced by U+FFFD\n")
            warned = True
        if not line:
            continue
        if line.startswith("/"):
            cmd, _, arg = line.partition(" ")
            if cmd in ("/exit", "/quit"):
                break
            if cmd == "/reset":
                session.reset()
                _say(out, "(conversation cleared)", interactive)
            elif cmd == "/system":
                session.system = arg.strip() or None
                session.reset()
                _say(out, f"(system prompt {'set' if session.system else 'cleared'}; conversation cleared)", interactive)
            else:
                (out if interactive else err).write(f"unknown command {cmd}; {HELP}\n")
            continue
        try:
            if json_lines:
                answer = "".join(session.reply(line))
                g = session.last
                out.write(json.dumps({"user": line, "assistant": answer, "tokens": len(g.ids),
                                      "tokens_per_s": round(g.tokens_per_s, 1), "finish_reason": g.finish_reason,
                                      "turns_left_out": session.trimmed}, ensure_ascii=False) + "\n")
                out.flush()
                continue
            if interactive:
                out.write("assistant> ")
            for delta in session.reply(line):
                if ctrl_c.pressed:  # a Ctrl-C whose KeyboardInterrupt did not reach this loop
                    raise KeyboardInterrupt
                out.write(delta)
                out.flush()
            out.write("\n")
            (out if interactive else err).write(_stats(session) + "\n")
        except KeyboardInterrupt:
            out.write("\n[interrupted — the question was not added to the history]\n")
        except MicroLMError as e:
            failed += 1
            if json_lines:  # one object per input turn, also for a failed one
                out.write(json.dumps({"user": line, "error": str(e)}, ensure_ascii=False) + "\n")
            else:
                out.write("\n" if interactive else "")
            err.write(f"chat: error: {e}\n")
        out.flush()
    return 1 if failed and not interactive else 0


def _say(out: TextIO, text: str, interactive: bool) -> None:
    if interactive:
        out.write(text + "\n")
        out.flush()


def _prompt(inp: TextIO, out: TextIO) -> str:
    out.write("user> ")
    out.flush()
    line = inp.readline()
    if not line:
        raise EOFError
    return line


