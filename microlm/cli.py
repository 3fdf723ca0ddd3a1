"""``microlm`` — a thin command-line shell over the stage registry (``microlm.stages``) the notebooks use.

Every stage is a verb (``microlm corpus``, ``microlm ie-data``; the seed's script names such as
``prepare-pretrain`` stay as aliases); ``chat`` and ``import-hf`` are plain commands."""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import errno
import json
import logging
import os
import signal
import sys
import time

from microlm import stages
from microlm.errors import MicroLMError
from microlm.serve.env import ensure_env
from microlm.serve.server import ManagedServer
from microlm.stages import (
    build,
    course_map_markdown,
    get_stage,
    load_config,
    read_manifest,
    stage_table,
    upstream,
    write_course_map,
)
from microlm.stages.server import server_spec


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("-p", "--profile", default="cpu", help="smoke | cpu | gpu, or a path to a YAML config")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config value, e.g. --set corpus.dedup.threshold=0.85 (repeatable)")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bars")
    p.add_argument("--debug", action="store_true", help="show the traceback of an expected error too")


def _stage_parser(sub, st) -> None:
    """``microlm <stage>``: the same flags for every stage, plus the stage's own options."""
    p = sub.add_parser(st.name.replace("_", "-"), aliases=list(st.aliases), help=f"{st.part}: {st.help}")
    _common(p)
    p.add_argument("--out", default=None, help=f"output folder (default runs/<profile>/{st.name})")
    p.add_argument("--force", action="store_true", help="build again even if inputs and config are unchanged")
    for o in st.all_options:
        flag = "--" + o.name.replace("_", "-")
        if o.flag:
            p.add_argument(flag, dest=o.name, action="store_true", help=o.help)
        elif o.many:
            p.add_argument(flag, dest=o.name, action="append", type=o.type, default=None, metavar=o.name.upper(),
                           help=o.help + " (repeatable)")
        else:
            p.add_argument(flag, dest=o.name, type=o.type, default=o.default, choices=o.choices,
                           metavar=None if o.choices else o.name.upper(), help=o.help)
    p.set_defaults(stage=st.name)


def _port(text: str) -> int:
    """``--port``: 1..65535 (argparse turns the ValueError into one usage line)."""
    port = int(text)
    if not 1 <= port <= 65535:
        raise argparse.ArgumentTypeError(f"a port is 1..65535, got {port}")
    return port


def _device(text: str) -> str:
    """``--device``: cpu, cuda or cuda:N — and cuda only where this torch has it (checked when used)."""
    if text != "cpu" and text != "cuda" and not (text.startswith("cuda:") and text[5:].isdigit()):
        raise argparse.ArgumentTypeError(f"a device is cpu, cuda or cuda:N, got {text!r}")
    return text


def build_parser() -> argparse.ArgumentParser:
    from microlm.stages import REGISTRY

    ap = argparse.ArgumentParser(prog="microlm", description="MicroLM course pipeline: `microlm <stage>` builds a "
                                 "stage (and whatever it needs); `microlm stages` shows the map")
    sub = ap.add_subparsers(dest="command", required=True)

    p = sub.add_parser("config", help="print the resolved config of a profile")
    _common(p)
    p = sub.add_parser("stages", help="the stage map: stage, CLI, config section, folder, notebook, status")
    _common(p)
    p.add_argument("--markdown", action="store_true", help="the course map table of the README and the book")
    p.add_argument("--write-map", nargs="+", metavar="FILE", help="write the course map into these Markdown files "
                   "(between their markers)")
    for st in REGISTRY.values():
        _stage_parser(sub, st)

    p = sub.add_parser("import-hf", help="A8: a Llama-layout Hugging Face folder → our checkpoint + tokenizer")
    _common(p)
    p.add_argument("folder", help="Hugging Face model folder (config.json, model*.safetensors, tokenizer.json)")
    p.add_argument("--out", required=True, help="output folder: <out>/ckpt and <out>/tokenizer")

    p = sub.add_parser("chat", help="A8: chat with a model in the terminal (or stdin → stdout)")
    _common(p)
    p.add_argument("--model", default=None,
                   help="a stage folder (runs/<p>/sft), a checkpoint folder or a Hugging Face folder "
                        "(default: the profile's sft stage)")
    p.add_argument("--tokenizer", default=None, help="tokenizer folder (default: beside the model)")
    p.add_argument("--adapter", default=None, help="a LoRA adapter folder (e.g. runs/<p>/lora/adapter)")
    p.add_argument("--system", default=None, help="system prompt")
    p.add_argument("--device", type=_device, default="cpu", help="cpu, cuda or cuda:N")
    p.add_argument("--dtype", choices=["fp32", "bf16", "auto"], default="fp32",
                   help="weights for inference: bf16 halves the bytes per token (auto: bf16 where the CPU/GPU "
                        "has it natively); the benchmark reports how many greedy tokens agree with fp32")
    for flag, typ in (("max-new-tokens", int), ("temperature", float), ("top-k", int), ("top-p", float),
                      ("repetition-penalty", float), ("seed", int)):
        p.add_argument(f"--{flag}", type=typ, default=None, help="default: the config's generate section")
    p.add_argument("--context", choices=["error", "truncate"], default=None)
    p.add_argument("--json", action="store_true", help="non-interactive: one JSON object per answer")

    p = sub.add_parser("serve", help="B6: serve a model with vLLM (OpenAI-compatible, loopback by default) until "
                                     "Ctrl-C")
    _common(p)
    p.add_argument("--model", default=None, help="a stage reference (ie_merged:<run>, hf) or a folder "
                                                 "(default: serve.model)")
    p.add_argument("--lora", action="append", default=[], metavar="NAME=FOLDER",
                   help="serve --model as the base plus this LoRA adapter by name (repeatable; vLLM --enable-lora)")
    p.add_argument("--host", default=None, help="default: serve.host (127.0.0.1)")
    p.add_argument("--port", type=_port, default=None, help="default: serve.port, 8000 when that is 0")
    p.add_argument("--served-model-name", default=None)
    p.add_argument("--api-key-env", default=None, help="an environment variable holding the API key to require")
    p.add_argument("--tensor-parallel-size", type=int, default=None)
    p.add_argument("--baseline", action="store_true", help="serve with `transformers serve` instead (the "
                                                           "benchmark's baseline)")
    return ap


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and "_" in argv[0] and not argv[0].startswith("-"):
        argv[0] = argv[0].replace("_", "-")  # `microlm ie_data` = `microlm ie-data`
    debug = "--debug" in argv or os.environ.get("MICROLM_DEBUG", "") not in ("", "0")
    argv = [a for a in argv if a != "--debug"]
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        return _run(args)
    except KeyboardInterrupt:
        print(f"microlm {args.command}: interrupted", file=sys.stderr)
        return 130
    except (MicroLMError, OSError, UnicodeDecodeError) as e:
        if debug:
            raise
        print(f"microlm {args.command}: error: {one_line(e)}", file=sys.stderr)
        return 2


def one_line(e: BaseException) -> str:
    """An expected failure as one line: what went wrong, on which path, and what to do (a genuine bug
    keeps its traceback; ``--debug`` or ``MICROLM_DEBUG=1`` shows it for these too)."""
    if isinstance(e, MicroLMError):
        return str(e)
    if isinstance(e, UnicodeDecodeError):
        return f"a file is not UTF-8 text ({e.reason} at byte {e.start}); rerun with --debug to see which"
    if isinstance(e, OSError) and not isinstance(e, MicroLMError):
        where = " → ".join(str(p) for p in (e.filename, e.filename2) if p) or "(the writer named no file; --debug shows where)"
        hint = {errno.ENOSPC: "the disk is full: free space, or write elsewhere (--out, MICROLM_RUNS)",
                errno.EDQUOT: "the disk quota is full: free space, or write elsewhere (--out, MICROLM_RUNS)",
                errno.EFBIG: "a file outgrew the size limit (ulimit -f) or the disk: free space or write elsewhere",
                errno.EACCES: "no permission: check the path's owner and mode, or write elsewhere",
                errno.EROFS: "the filesystem is read-only: write elsewhere (--out, MICROLM_RUNS)",
                errno.ENOTDIR: "a part of the path is a file, not a folder",
                errno.EISDIR: "the path is a folder, a file was expected",
                errno.ENOENT: "no such file or folder"}.get(e.errno, "")
        return f"{e.strerror or e}: {where}" + (f" — {hint}" if hint else "")
    return str(e).splitlines()[0] if str(e) else type(e).__name__


def _run(args: argparse.Namespace) -> int:
    cfg = load_config(args.profile, args.overrides)
    if args.command == "config":
        print(json.dumps(cfg.to_dict(), indent=2, ensure_ascii=False))
        return 0
    if args.command == "stages":
        if args.write_map:
            for f in args.write_map:
                print(f"{f}: {'written' if write_course_map(f) else 'up to date'}")
            return 0
        if args.markdown:
            print(course_map_markdown())
            return 0
        print(f"profile {cfg.profile}, runs in {cfg.run_path}")
        print(format_table(stage_table(cfg)))
        return 0
    if getattr(args, "stage", None):
        return _stage(args, cfg)
    if args.command == "import-hf":
        from microlm.model.hf_export import import_checkpoint

        out = import_checkpoint(args.folder, args.out)
        print(f"import-hf: {out}/ckpt + {out}/tokenizer  (load with microlm.model.load_model or "
              f"microlm chat --model {out})")
        return 0
    if args.command == "chat":
        return _chat(args, cfg)
    if args.command == "serve":
        return _serve(args, cfg)
    raise AssertionError(args.command)


def _serve(args: argparse.Namespace, cfg) -> int:
    """``microlm serve``: start the server, print where it listens, wait until Ctrl-C (or its exit)."""
    def built(r: str) -> dict:  # the stage a reference names, built if missing
        stage = r.partition(":")[0]
        return {stage: stages.require(stage, cfg)} if stage in stages.REGISTRY else {}

    sc = cfg.serve
    lora = {}
    for item in args.lora:
        name, eq, folder = item.partition("=")
        if not eq or not name:
            raise MicroLMError(f"--lora takes NAME=FOLDER, got {item!r}")
        lora[name] = stages.resolve_ref(folder, built(folder))
    key_env = args.api_key_env or sc.api_key_env
    key = os.environ.get(key_env) if key_env else None
    if key_env and not key:
        raise MicroLMError(f"--api-key-env {key_env}: that environment variable is not set")
    model = args.model or sc.model
    spec = server_spec(cfg, built(model), model=model, port=args.port or sc.port or 8000,
                       served_name=args.served_model_name, host=args.host, api_key=key,
                       tensor_parallel_size=args.tensor_parallel_size, lora=lora)
    srv = ManagedServer(spec, cfg.run_path / "serve", python=ensure_env(),
                        kind="transformers" if args.baseline else "vllm")
    print(f"serve: starting {srv.kind} for {spec.model} (log {srv.log_path}) ...", flush=True)
    with term_as_interrupt():
        return _serve_until_interrupted(srv, spec, lora, sc)


def _serve_until_interrupted(srv, spec, lora, sc) -> int:
    try:
        srv.start(sc.startup_timeout_s)
        print(f"serve: {srv.base_url}  model {srv.model_name}" + (f" + adapters {', '.join(lora)}" if lora else "")
              + "  (Ctrl-C stops it)", flush=True)
        while srv.proc is not None and srv.proc.poll() is None:
            time.sleep(0.5)
        code = srv.proc.returncode if srv.proc is not None else 0
        raise MicroLMError(f"the server exited with code {code}; see {srv.log_path}")
    except KeyboardInterrupt:
        srv.stop()
        print("serve: stopped", flush=True)
        return 0
    finally:
        srv.stop()


@contextlib.contextmanager
def term_as_interrupt():
    """``kill`` (SIGTERM) stops the block like Ctrl-C: a ``KeyboardInterrupt`` is raised, so staging
    folders are removed at once (``microlm.io.staged_dir``) and locks released, instead of the process
    vanishing with them left behind.  Ctrl-C (SIGINT) raises it too even where the process inherited
    SIGINT ignored (a shell's background job, some test runners): the stages and ``microlm serve`` say
    Ctrl-C stops them, so it does."""
    def _term(*_):
        raise KeyboardInterrupt

    old = signal.signal(signal.SIGTERM, _term)
    old_int = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, old)
        signal.signal(signal.SIGINT, old_int)


def _stage(args: argparse.Namespace, cfg) -> int:
    st = get_stage(args.stage)
    options = {o.name: getattr(args, o.name) for o in st.all_options}
    with term_as_interrupt():
        out = build(st.name, cfg, force=args.force, progress=not args.quiet, out_dir=args.out, **options)
    m = read_manifest(out)
    if int(os.environ.get("RANK", "0")) == 0:
        partial = any(options[o.name] not in (None, False, []) for o in st.all_options if o.partial)
        if m is not None and not partial:
            print(f"{st.name}: {out}  {st.summary(m['metrics']) if st.summary else ''}")
        else:
            print(f"{st.name}: {out}  (not finished: no manifest written)")
    return 0


def format_table(rows: list[dict]) -> str:
    """A plain-text table of dict rows (columns in the first row's order)."""
    cols = list(rows[0])
    width = {c: max(len(c), *(len(str(r[c])) for r in rows)) for c in cols}
    lines = ["  ".join(c.ljust(width[c]) for c in cols), "  ".join("-" * width[c] for c in cols)]
    lines += ["  ".join(str(r[c]).ljust(width[c]) for c in cols) for r in rows]
    return "\n".join(lines)


def _chat(args: argparse.Namespace, cfg) -> int:
    from microlm.infer.chat import ChatSession, run_chat
    from microlm.model.load import load_model

    flags = {"max_new_tokens": args.max_new_tokens, "temperature": args.temperature, "top_k": args.top_k,
             "top_p": args.top_p, "repetition_penalty": args.repetition_penalty, "seed": args.seed,
             "context": args.context}
    gen = dataclasses.replace(cfg.generate, **{k: v for k, v in flags.items() if v is not None}).validate()
    if args.device != "cpu":
        import torch

        if not torch.cuda.is_available():
            raise MicroLMError(f"--device {args.device}: this torch has no CUDA device (torch {torch.__version__}); "
                               f"use --device cpu")
    if args.model is None and args.tokenizer is not None:
        raise MicroLMError(f"--tokenizer {args.tokenizer} needs --model: the profile's sft stage is used with its own "
                           f"tokenizer stage; give --model with it, or drop --tokenizer")
    if args.model is None:
        model_dir, tok_dir = upstream("sft", cfg), upstream("tokenizer", cfg)
    else:
        model_dir, tok_dir = args.model, args.tokenizer
    model, tok = load_model(model_dir, tokenizer=tok_dir, adapter=args.adapter, device=args.device,
                            dtype=args.dtype)
    if args.device == "cpu":  # one stream: decode_layout() streams the weights faster at batch 1 (same tokens)
        model.decode_layout()
    # undecodable input bytes become U+FFFD (and a warning) instead of a crash
    for stream in (sys.stdin,):
        if hasattr(stream, "reconfigure"):
            stream.reconfigure(encoding="utf-8", errors="replace")
    if hasattr(sys.stdout, "reconfigure"):
        sys.stdout.reconfigure(encoding="utf-8", errors="replace")
    return run_chat(ChatSession(model, tok, gen, system=args.system), json_lines=args.json,
                    interactive=False if args.json else None)


if __name__ == "__main__":
    sys.exit(main())
