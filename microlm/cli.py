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
    "lora": "A7: train LoRA adapters on the SFT model (sentiment-instruction task)",
}


def _summary(name: str, out, rep: dict) -> str:
    if name == "pretrain":
        return (f"pretrain: {out}  {rep['params']:,} params, {rep['steps']} steps, val loss {rep['final_val_loss']}, "
                f"bpb {rep['final_val_bpb']}, unigram entropy {rep['unigram_entropy']:.3f}, "
                f"{rep['tokens_per_s']} tokens/s")
    if name == "sft":
        d = rep["train_data"]
        return (f"sft: {out}  {d['kept']:,} conversations ({d['truncated']} truncated, drops {d['drops']}), "
                f"{rep['steps']} steps, held-out loss {rep['first_val_loss']:.3f} -> {rep['final_val_loss']:.3f}")
    p, b, a = rep["params"], rep["before"] or {}, rep["after"]
    return (f"lora: {out}  {p['adapter_params']:,} trainable ({p['percent_of_base']} % of the base); held-out "
            f"accuracy {b.get('accuracy')} -> {a['accuracy']:.3f} (majority {a['majority_accuracy']:.3f})")


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
    raise AssertionError(args.command)


if __name__ == "__main__":
    sys.exit(main())
