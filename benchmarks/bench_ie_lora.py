"""Benchmark of stage B3: useful (non-pad) training tokens/s of our IE LoRA batches vs the usual recipe.

Same base model (the ``cpu`` profile's MicroLM HF export, ``runs/<profile>/hf``, or ``--base``), same
LoRA (r 8, all linear projections, PEFT), same IE training lines (``runs/<profile>/ie_data/06_train.jsonl``),
same batch size and number of steps, each variant in a fresh child process (peak RSS = its VmHWM):

- ``ours``: ``LengthGroupedBatches`` (length-grouped, right-padded to each batch's longest row) and
  the ``ie_lora`` stage's loss, stepped with fused AdamW (what the project's ``Trainer`` does per step);
- ``hf_dynamic``: a plain ``transformers.Trainer`` + ``DataCollatorForSeq2Seq`` (dynamic padding per
  batch) in random order — the baseline;
- ``hf_grouped``: the same with ``train_sampling_strategy="group_by_length"`` (what transformers < 5
  called ``group_by_length=True``): what a user who cares about padding would set;
- ``hf_cutoff``: the same, every batch padded to the cutoff (``padding="max_length"``), for reference.

Useful tokens = the real tokens of the examples the variant trained on; tokens/s over the timed steps
(the first step, with its one-off costs, is left out for all).  Also reported: the share of the real
tokens that are trained (the answers and their ``<|im_end|>``), and the padding share of each variant.

Writes ``benchmarks/results/ie_lora.json`` (``--out`` names another file, e.g. for a real Qwen base).
Usage: ``python benchmarks/bench_ie_lora.py [--profile cpu] [--steps 30] [--batch 8] [--base DIR]
[--variants ours hf_dynamic hf_grouped] [--out ie_lora_qwen.json]``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from microlm.io import json_line, write_json  # noqa: E402

VARIANTS = ("ours", "hf_dynamic", "hf_grouped", "hf_cutoff")


def _hwm() -> float:
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return 0.0


def child(variant: str, base: str, data: str, batch: int, steps: int, cutoff: int) -> None:
    import torch

    from microlm.ie.lora_data import ChatEncoder, LengthGroupedBatches, encode_chats
    from microlm.ie.train_lora import ALL_LINEAR, attach_peft, load_base, load_tokenizer, read_lines

    torch.manual_seed(0)
    torch.set_num_threads(int(os.environ.get("BENCH_THREADS", "2")))
    tok = load_tokenizer(base)
    exs, counts = encode_chats(ChatEncoder(tok), read_lines(Path(data)), cutoff)
    model = attach_peft(load_base(base), 8, 16.0, 0.0, ALL_LINEAR)
    params = [p for p in model.parameters() if p.requires_grad]
    # ours steps with the project Trainer's optimizer (fused AdamW); the Trainer baselines build their own
    opt = torch.optim.AdamW(params, lr=1e-4, weight_decay=0.0, fused=variant == "ours")
    times: list[float] = []
    useful = padded = 0

    if variant == "ours":  # the ie_lora stage's batches and loss (the Trainer adds no work per step)
        from microlm.ie.lora_data import SummedTokenLoss

        src = LengthGroupedBatches(exs, batch, tok.pad_token_id, 0)
        wrapped = SummedTokenLoss(model).train()
        for s in range(steps + 1):
            rows = src.rows(s)
            x, y, _ = src.collate(rows, 1.0)
            t0 = time.perf_counter()
            loss = wrapped.summed(x, y) / max(1, int((y[:, 1:] != -100).sum()))
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            if s:  # the first step pays one-off costs
                times.append(time.perf_counter() - t0)
                useful += sum(len(exs[int(r)].ids) for r in rows)
                padded += x.numel()
    else:  # a plain transformers.Trainer: DataCollatorForSeq2Seq, random order (its default sampler)
        import tempfile

        from transformers import DataCollatorForSeq2Seq, Trainer, TrainerCallback, TrainingArguments

        collator = DataCollatorForSeq2Seq(tok, padding="max_length" if variant == "hf_cutoff" else True,
                                          max_length=cutoff, label_pad_token_id=-100)
        feats = [{"input_ids": e.ids, "attention_mask": [1] * len(e.ids), "labels": e.labels} for e in exs]
        seen: list[tuple[int, int]] = []

        def collate(batch_feats):
            b = collator(batch_feats)
            seen.append((sum(len(f["input_ids"]) for f in batch_feats), b["input_ids"].numel()))
            return b

        class Clock(TrainerCallback):
            def on_step_begin(self, args, state, control, **kw):
                self.t0 = time.perf_counter()

            def on_step_end(self, args, state, control, **kw):
                times.append(time.perf_counter() - self.t0)

        with tempfile.TemporaryDirectory() as out:
            targs = TrainingArguments(output_dir=out, per_device_train_batch_size=batch, max_steps=steps + 1,
                                      learning_rate=1e-4, weight_decay=0.0, lr_scheduler_type="constant",
                                      logging_strategy="no", save_strategy="no", report_to=[], use_cpu=True,
                                      dataloader_num_workers=0, seed=0, disable_tqdm=True,
                                      train_sampling_strategy="group_by_length" if variant == "hf_grouped"
                                      else "random")
            Trainer(model=model, args=targs, train_dataset=feats, data_collator=collate,
                    callbacks=[Clock()]).train()
        # the collator runs outside the timed step in transformers (the data loader), as ours does
        times = times[1:]
        useful = sum(u for u, _ in seen[1:steps + 1])
        padded = sum(p for _, p in seen[1:steps + 1])
    secs = sum(times)
    print(json.dumps({"variant": variant, "useful_tokens_per_s": round(useful / secs, 1),
                      "padded_tokens_per_s": round(padded / secs, 1), "pad_share": round(1 - useful / padded, 4),
                      "step_s": round(secs / len(times), 4), "peak_rss_mb": round(_hwm(), 1),
                      "examples": counts["kept"], "dropped_over_cutoff": counts["dropped_over_cutoff"],
                      "trained_token_share": round(counts["trained_tokens"] / max(1, counts["tokens"]), 4)}))


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        child(sys.argv[2], sys.argv[3], sys.argv[4], int(sys.argv[5]), int(sys.argv[6]), int(sys.argv[7]))
        return
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--profile", default="cpu")
    ap.add_argument("--base", default=None, help="base model folder (default runs/<profile>/hf)")
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--rounds", type=int, default=2, help="alternating rounds of the variants")
    ap.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=VARIANTS)
    ap.add_argument("--out", default="ie_lora.json", help="file name under benchmarks/results")
    ap.add_argument("--examples", type=int, default=None,
                    help="train on the ie_lora stage's mix of this many conversations (default: the profile's "
                         "ie_lora.train_examples; 0 = all of 06_train.jsonl)")
    ap.add_argument("--cutoff", type=int, default=None, help="drop longer examples (default: ie_data.cutoff_tokens, "
                                                             "at most the base's context)")
    args = ap.parse_args()
    import dataclasses
    import tempfile

    from microlm.ie.train_lora import training_mix
    from microlm.stages import load_config

    cfg = load_config(args.profile)
    base = args.base or str(cfg.run_path / "hf")
    data_dir = cfg.run_path / "ie_data"
    for p in (Path(base) / "config.json", data_dir / "06_train.jsonl"):
        if not p.is_file():
            raise SystemExit(f"{p} is missing: run `microlm hf -p {args.profile}` and `microlm ie-data -p {args.profile}`")
    conf = json.loads((Path(base) / "config.json").read_text())
    cutoff = min(args.cutoff or cfg.ie_data.cutoff_tokens, conf.get("max_position_embeddings") or 10**9)
    examples = cfg.ie_lora.train_examples if args.examples is None else args.examples
    tmp = tempfile.TemporaryDirectory()
    data = data_dir / "06_train.jsonl"
    if examples:  # the stage's own sample: balanced by topic, decontaminated against the test split
        mix, _ = training_mix(dataclasses.replace(cfg.ie_lora, train_examples=examples), data_dir, cfg.seed)
        data = Path(tmp.name) / "mix.jsonl"
        data.write_text("".join(map(json_line, mix)), encoding="utf-8")
    print(f"{base}: {examples or 'all'} training conversations, cutoff {cutoff}, batch {args.batch}, "
          f"{args.steps} timed steps", flush=True)
    runs: dict[str, list[dict]] = {v: [] for v in args.variants}
    for r in range(args.rounds):
        for variant in runs:
            out = subprocess.run([sys.executable, __file__, "--child", variant, base, str(data), str(args.batch),
                                  str(args.steps), str(cutoff)], capture_output=True, text=True)
            if out.returncode:
                raise SystemExit(f"{variant} failed:\n{out.stderr[-3000:]}")
            res = json.loads(out.stdout.strip().splitlines()[-1])
            runs[variant].append(res)
            print(f"round {r + 1} {variant:<11} useful {res['useful_tokens_per_s']:>8,.0f} tok/s  pad "
                  f"{res['pad_share']:.1%}  step {res['step_s']:.3f} s  RSS {res['peak_rss_mb']:,.0f} MB", flush=True)
    best = {v: max(rs, key=lambda x: x["useful_tokens_per_s"]) for v, rs in runs.items()}
    ours = best["ours"]["useful_tokens_per_s"]
    ratios = {f"ours_vs_{v}": round(ours / best[v]["useful_tokens_per_s"], 3) for v in best if v != "ours"}
    result = {"machine": machine(), "base": base, "model_type": conf.get("model_type"),
              "profile": args.profile, "examples": examples or "all", "batch": args.batch,
              "steps": args.steps, "cutoff": cutoff, "threads": int(os.environ.get("BENCH_THREADS", "2")),
              "precision": "fp32", "rounds": runs, "best": best, **ratios, "target": 1.3,
              "meets_target": {k: r >= 1.3 for k, r in ratios.items() if k in ("ours_vs_hf_dynamic",
                                                                                "ours_vs_hf_grouped")}}
    write_json(REPO / "benchmarks" / "results" / args.out, result)
    for k, r in ratios.items():
        print(f"{k}: ×{r:.2f}" + (" (target ≥ 1.3)" if k in result["meets_target"] else ""))


def machine() -> dict:
    from microlm import hw

    return {"cpu": hw.cpu_name(), "cpus": os.cpu_count(), "python": platform.python_version(),
            "bf16_flags": sorted(hw.cpu_flags() & set(hw.BF16_FLAGS))}


if __name__ == "__main__":
    main()
