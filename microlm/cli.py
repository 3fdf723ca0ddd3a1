"""``microlm`` — a thin command-line shell over the stage functions the notebooks call."""

from __future__ import annotations

import argparse
import json
import logging
import sys

from microlm.errors import MicroLMError

# training stages share their flags and run under torchrun as well
TRAINING_STAGES = {
    "pretrain": "A5: pretrain the TransformerLM (runs under torchrun for DDP)",
    "sft": "A6: full-parameter SFT from the pretraining checkpoint (torchrun-able)",
    "lora": "A7: train LoRA adapters on the SFT model (a derived task SFT never saw: lora.task)",
}


def _summary(name: str, out, rep: dict) -> str:
    if name == "pretrain":
        return (f"pretrain: {out}  {rep['params']:,} params, {rep['steps']} steps, val loss {rep['final_val_loss']}, "
                f"bpb {rep['final_val_bpb']}, unigram entropy {rep['unigram_entropy']:.3f}, "
                f"{rep['tokens_per_s']} tokens/s")
    if name == "sft":
        d = rep["train_data"]
        tasks = ", ".join(f"{t} F1 {v['before']['f1']:.2f} -> {v['after']['f1']:.2f}" for t, v in rep["tasks"].items())
        return (f"sft: {out}  {d['kept']:,} conversations ({d['truncated']} truncated, drops {d['drops']}), "
                f"{rep['steps']} steps, held-out loss {rep['base_val_loss'] or float('nan'):.3f} -> "
                f"{rep['final_val_loss']:.3f}; {tasks}")
    p, b, a = rep["params"], rep["before"], rep["after"]
    return (f"lora: {out}  {p['adapter_params']:,} trainable ({p['percent_of_base']} % of the base); held-out "
            f"{rep['task']}: F1 {b['f1']:.3f} -> {a['f1']:.3f}, exact match {b['exact_match']:.3f} -> "
            f"{a['exact_match']:.3f} (empty answer {rep['baselines']['empty']['exact_match']:.3f})")


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("-p", "--profile", default="cpu", help="smoke | cpu | gpu, or a path to a YAML config")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config value, e.g. --set corpus.dedup.threshold=0.85 (repeatable)")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bars")


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="microlm", description="MicroLM course pipeline")
    sub = ap.add_subparsers(dest="command", required=True)

    p = sub.add_parser("config", help="print the resolved config of a profile")
    _common(p)

    p = sub.add_parser("prepare-pretrain", help="A1–A2: clean · dedup · split · EOS the pretraining corpus")
    _common(p)
    p.add_argument("--input", action="append", default=None, metavar="FILE",
                   help="read these files instead of data.pretrain under MICROLM_DATA (repeatable)")
    p.add_argument("--out", default=None, help="output folder (default runs/<profile>/corpus)")
    p.add_argument("--force", action="store_true", help="rebuild even if inputs and config are unchanged")

    p = sub.add_parser("train-tokenizer", help="A3: train the byte-level BPE tokenizer on the corpus train split")
    _common(p)
    p.add_argument("--out", default=None, help="output folder (default runs/<profile>/tokenizer)")
    p.add_argument("--force", action="store_true", help="retrain even if inputs and config are unchanged")

    p = sub.add_parser("tokenize", help="A4: encode the corpus splits into uint16 token files + index")
    _common(p)
    p.add_argument("--out", default=None, help="output folder (default runs/<profile>/tokens)")
    p.add_argument("--force", action="store_true", help="re-encode even if inputs are unchanged")

    for name, text in TRAINING_STAGES.items():
        p = sub.add_parser(name, help=text)
        _common(p)
        p.add_argument("--out", default=None, help=f"output folder (default runs/<profile>/{name})")
        p.add_argument("--resume", action="store_true", help="continue from the folder's last checkpoint")
        p.add_argument("--force", action="store_true", help="train again even if inputs and config are unchanged")
        p.add_argument("--stop-after", type=int, default=None, metavar="STEPS",
                       help="stop after this many steps (checkpointing as configured); resume later")
    p = sub.add_parser("export-hf", help="A8: export a model as a transformers/vLLM-loadable Llama folder (runs/<p>/hf)")
    _common(p)
    p.add_argument("--source", default="sft", choices=["sft", "pretrain", "lora"],
                   help="which stage's model (lora: the SFT model with the adapter merged)")
    p.add_argument("--out", default=None, help="output folder (default runs/<profile>/hf)")
    p.add_argument("--force", action="store_true", help="export again even if nothing changed")

    p = sub.add_parser("import-hf", help="A8: a Llama-layout Hugging Face folder → our checkpoint + tokenizer")
    _common(p)
    p.add_argument("folder", help="Hugging Face model folder (config.json, model*.safetensors, tokenizer.json)")
    p.add_argument("--out", required=True, help="output folder: <out>/ckpt and <out>/tokenizer")

    p = sub.add_parser("ie-data", help="B1–B2: the InstructIE data pipeline, one step at a time")
    _common(p)
    p.add_argument("--step", type=int, default=None, metavar="N",
                   help="run one step: 1 standardize, 2 filter, 3 stratify, 4 derive, 5 sample, 6 render "
                        "(default: all six as a stage, skipped when nothing changed)")
    p.add_argument("--force", action="store_true", help="without --step: run again even if nothing changed")
    p.add_argument("--out", default=None, help="output folder (default runs/<profile>/ie_data)")

    p = sub.add_parser("chat", help="A8: chat with a model in the terminal (or stdin → stdout)")
    _common(p)
    p.add_argument("--model", default=None,
                   help="a stage folder (runs/<p>/sft), a checkpoint folder or a Hugging Face folder "
                        "(default: the profile's sft stage)")
    p.add_argument("--tokenizer", default=None, help="tokenizer folder (default: beside the model)")
    p.add_argument("--adapter", default=None, help="a LoRA adapter folder (e.g. runs/<p>/lora/adapter)")
    p.add_argument("--system", default=None, help="system prompt")
    p.add_argument("--device", default="cpu")
    for flag, typ in (("max-new-tokens", int), ("temperature", float), ("top-k", int), ("top-p", float),
                      ("repetition-penalty", float), ("seed", int)):
        p.add_argument(f"--{flag}", type=typ, default=None, help="default: the config's generate section")
    p.add_argument("--context", choices=["error", "truncate"], default=None)
    p.add_argument("--json", action="store_true", help="non-interactive: one JSON object per answer")
    return ap


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        return _run(args)
    except MicroLMError as e:
        print(f"microlm {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"microlm {args.command}: interrupted", file=sys.stderr)
        return 130


def _run(args: argparse.Namespace) -> int:
    from microlm.config import load_config

    cfg = load_config(args.profile, args.overrides)
    if args.command == "config":
        print(json.dumps(cfg.to_dict(), indent=2, ensure_ascii=False))
        return 0
    if args.command == "prepare-pretrain":
        from microlm import stages

        out = stages.corpus(cfg, force=args.force, inputs=args.input, progress=not args.quiet, out_dir=args.out)
        m = stages.read_manifest(out)
        met = m["metrics"] if m else {}
        print(f"corpus: {out}  records in {met.get('records_in')} → out {met.get('records_out')} "
              f"(train {met.get('train_docs')}, val {met.get('val_docs')}); drops {met.get('drops')}")
        return 0
    if args.command == "train-tokenizer":
        from microlm import stages

        out = stages.tokenizer(cfg, force=args.force, progress=not args.quiet, out_dir=args.out)
        rep = json.loads((out / "report.json").read_text(encoding="utf-8"))
        table = "  ".join(f"{k} {v['chars_per_token']:.3f}" for k, v in rep["compression"].items())
        print(f"tokenizer: {out}  vocab {rep['vocab_size']}, trained in {rep['train_s']} s; "
              f"val chars/token: {table}")
        return 0
    if args.command == "tokenize":
        from microlm import stages

        out = stages.tokens(cfg, force=args.force, progress=not args.quiet, out_dir=args.out)
        meta = json.loads((out / "meta.json").read_text(encoding="utf-8"))
        sp = meta["splits"]
        print(f"tokens: {out}  train {sp['train']['tokens']:,} tokens / {sp['train']['docs']:,} docs, "
              f"val {sp['val']['tokens']:,} / {sp['val']['docs']:,}; {meta['tokens_per_s']:,} tokens/s")
        return 0
    if args.command in TRAINING_STAGES:
        import os

        from microlm import stages

        out = stages.STAGES[args.command](cfg, force=args.force, resume=args.resume, progress=not args.quiet,
                                          out_dir=args.out, stop_after=args.stop_after)
        if int(os.environ.get("RANK", "0")) == 0 and (out / "report.json").exists():
            print(_summary(args.command, out, json.loads((out / "report.json").read_text(encoding="utf-8"))))
        return 0
    if args.command == "export-hf":
        from microlm import stages

        out = stages.hf(cfg, source=args.source, force=args.force, progress=not args.quiet, out_dir=args.out)
        chk = json.loads((out / "report.json").read_text(encoding="utf-8"))["check"]
        verdict = (f"transformers {chk['transformers']}: max |Δlogit| {chk['logits_max_abs_diff']:.1e}, greedy "
                   f"tokens equal {chk['greedy_tokens_equal']}, chat template equal {chk['chat_template_equal']}"
                   if chk["checked"] else f"not checked ({chk['why']})")
        print(f"export-hf: {out}  ({args.source}); {verdict}")
        return 0
    if args.command == "import-hf":
        from microlm.model.hf_export import import_checkpoint

        out = import_checkpoint(args.folder, args.out)
        print(f"import-hf: {out}/ckpt + {out}/tokenizer  (load with microlm.infer.chat.load_model or "
              f"microlm chat --model {out})")
        return 0
    if args.command == "chat":
        return _chat(args, cfg)
    if args.command == "ie-data":
        from pathlib import Path

        from microlm.ie.pipeline import run_step

        if args.step is None:
            from microlm import stages

            folder = stages.ie_data(cfg, force=args.force, progress=not args.quiet, out_dir=args.out)
            m = stages.read_manifest(folder)
            print(f"ie-data: {folder} — {m['metrics'] if m else ''}")
            return 0
        st = run_step(cfg, args.step, Path(args.out) if args.out else None)
        top = ", ".join(f"{k} {v['out'] if isinstance(v, dict) else v}" for k, v in list(st["by_topic"].items())[:6])
        issues = st.get("issues", {}).get("counts", {})
        extra = f"; {sum(issues.values()):,} issues in {len(issues)} reasons" if issues else ""
        print(f"ie-data {st['step']}: {st['records']:,} records ({top}, …){extra}; {st['seconds']} s")
        return 0
    raise AssertionError(args.command)


def _chat(args: argparse.Namespace, cfg) -> int:
    import dataclasses

    from microlm.infer.chat import ChatSession, load_model, run_chat

    flags = {"max_new_tokens": args.max_new_tokens, "temperature": args.temperature, "top_k": args.top_k,
             "top_p": args.top_p, "repetition_penalty": args.repetition_penalty, "seed": args.seed,
             "context": args.context}
    gen = dataclasses.replace(cfg.generate, **{k: v for k, v in flags.items() if v is not None}).validate()
    if args.model is None:
        from microlm import stages

        model_dir, tok_dir = stages.upstream("sft", cfg), stages.upstream("tokenizer", cfg)
    else:
        model_dir, tok_dir = args.model, args.tokenizer
    model, tok = load_model(model_dir, tokenizer=tok_dir, adapter=args.adapter, device=args.device)
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
