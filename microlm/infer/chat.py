"""Stage A8: the chat loop behind ``microlm chat`` (MiniMind's ``chat.py``, hardened).

``ChatSession`` keeps the conversation and trims the oldest turns so prompt + answer fit the
context window; ``run_chat`` is the terminal/pipe loop with ``/reset``, ``/system <text>``,
``/exit``.  Ctrl-C while an answer streams stops that answer and returns to the prompt with the
history as it was before the question.  ``load_model`` opens a stage folder (``runs/<p>/sft``),
a checkpoint folder or a Hugging Face export, with an optional LoRA adapter.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import TextIO

from microlm.errors import MicroLMError
from microlm.infer.config import GenerationConfig
from microlm.infer.generate import Generation, stream_text

__all__ = ["ChatSession", "load_model", "run_chat", "HELP"]

HELP = "commands: /reset (forget the conversation), /system <text> (set the system prompt; empty clears it), /exit"


def load_model(path: str | Path, *, tokenizer: str | Path | None = None, adapter: str | Path | None = None,
               device: str = "cpu"):
    """``(model, tokenizer)`` from a Hugging Face folder (``config.json``), a stage folder with
    ``ckpt/`` or a checkpoint folder (``state.json``; the tokenizer from ``tokenizer`` or the
    ``tokenizer/`` folder beside the stage).  ``adapter``: a LoRA folder saved by ``microlm lora``."""
    from microlm.model import ModelConfig, TransformerLM
    from microlm.model.hf_export import import_hf
    from microlm.model.lora import load_adapter
    from microlm.tokenizer import Tokenizer
    from microlm.train.checkpoint import load_checkpoint, read_state

    path = Path(path)
    if not path.exists():
        raise MicroLMError(f"model path not found: {path}")
    if adapter is not None and not Path(adapter).is_dir():
        raise MicroLMError(f"adapter folder not found: {adapter}")
    if (path / "config.json").is_file():
        model, tok = import_hf(path, device=device)
    else:
        ckpt = path / "ckpt" if (path / "ckpt" / "state.json").is_file() else path
        if not (ckpt / "state.json").is_file():
            raise MicroLMError(f"not a model folder (no config.json, ckpt/state.json or state.json): {path}")
        state = read_state(ckpt)
        model = TransformerLM(ModelConfig(**state["model"]))
        load_checkpoint(ckpt, model, restore_rng=False)
        if tokenizer is None:  # beside the checkpoint (an import), else the run's tokenizer stage
            near = [ckpt.parent / "tokenizer", ckpt.parent.parent / "tokenizer"]
            tokenizer = next((t for t in near if (t / "microlm_tokenizer.json").is_file()), near[-1])
        tok = Tokenizer.load(tokenizer)
        model = model.to(device).eval()
    if tok.vocab_size > model.cfg.vocab_size:
        raise MicroLMError(f"tokenizer has {tok.vocab_size} ids but the model only {model.cfg.vocab_size}")
    if adapter is not None:
        load_adapter(model, adapter)
        model.eval()
    return model, tok


class ChatSession:
    """A conversation with a model: history, system prompt, context-window trimming, streaming."""

    def __init__(self, model, tok, gen: GenerationConfig | None = None, system: str | None = None):
        self.model, self.tok = model, tok
        self.gen = (gen or GenerationConfig()).validate()
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
    if interactive:
        out.write(f"MicroLM chat — {session.model.num_parameters():,} parameters, context "
                  f"{session.model.cfg.max_seq_len} tokens. {HELP}\n")
        out.flush()
    warned = False
    while True:
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
                out.write(delta)
                out.flush()
            out.write("\n")
            (out if interactive else err).write(_stats(session) + "\n")
        except KeyboardInterrupt:
            out.write("\n[interrupted — the question was not added to the history]\n")
        except MicroLMError as e:
            out.write("\n" if interactive else "")
            err.write(f"chat: error: {e}\n")
        out.flush()
    return 0


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


