"""Benchmark of stage A8: our decode loop vs transformers ``generate``, KV cache vs none, repetition.

1. Decode tokens/s, greedy, 256 new tokens after a 16-token prompt, batch 1 and 8: our
   ``generate_ids`` on the 31.7M reference TransformerLM vs ``transformers`` ``generate`` on the
   same weights exported as a Llama folder (fp32, SDPA, all CPU threads).  Both produce exactly
   256 tokens (no stop ids); the tokens are compared too.  Runs alternate (ours, theirs) × 5,
   medians reported.
   Each of ours is also given as a **fraction of the decode roofline**: the weight-streaming bandwidth
   measured in the same run (``roofline.py``) ÷ bytes read per token (weights + KV cache) — what a
   decode step would reach if it did nothing but stream its bytes.  Target ≥ 60 % at batch 1.
   A third row runs ours with the weights stored column-major (``TransformerLM.decode_layout``, what
   ``microlm chat`` does on a CPU): the same products, streamed faster at batch 1.
2. **bf16 weights vs fp32** (``load_model(dtype="bf16")``, ``microlm chat --dtype bf16``), batch 1
   and 8, alternating — only where the CPU has native bf16 (elsewhere the bf16 products run a slow
   fallback: skipped, reason recorded).  Target ≥ 1.25×.  And the **share of greedy tokens that
   agree** with fp32 on the held-out task prompts of the ``cpu`` profile's SFT model
   (``runs/cpu/sft``; measured on any CPU, a fallback only makes it slower).
3. Our loop with and without the KV cache at 128/256/512 new tokens (batch 1).
4. Repetition on 50 held-out prompts (BELLE eval questions under ``$MICROLM_DATA``, else the
   embedded held-out set) with the ``cpu`` profile's SFT model: distinct-1/2 and the repeated
   4-gram rate of the answers (characters), with the default sampling settings and with the
   repetition penalty off — needs ``runs/cpu/sft`` (``make course`` or ``microlm sft -p cpu``).

Random weights serve for speed (the time per token does not depend on them).  Writes
``benchmarks/results/generate.json``.  Usage: ``python benchmarks/bench_generate.py [--quick]``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

sys.path.insert(0, str(Path(__file__).resolve().parent))

from roofline import machine_limits, native, roofline  # noqa: E402

from microlm.infer.generate import generate_ids  # noqa: E402
from microlm.io import write_json  # noqa: E402
from microlm.model import MODEL_PRESETS, TransformerLM  # noqa: E402
from microlm.model.hf_export import export_llama  # noqa: E402


def timed(fn, reps: int) -> tuple[float, object]:
    times, out = [], None
    for _ in range(reps):
        t0 = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times), out


def bench_vs_hf(cfg, new: int, batches: list[int], reps: int, limits: dict) -> dict:
    import copy

    import transformers

    torch.manual_seed(0)
    ours = TransformerLM(cfg).eval()
    ours_t = copy.deepcopy(ours).decode_layout()  # same weights stored column-major (what `microlm chat` runs)
    with tempfile.TemporaryDirectory() as d:
        export_llama(ours, d)
        hf = transformers.AutoModelForCausalLM.from_pretrained(d, dtype=torch.float32,
                                                               attn_implementation="sdpa").eval()
    res = {}
    for b in batches:
        prompt = torch.randint(3, cfg.vocab_size, (b, 16))

        def run_ours(n=new, prompt=prompt, model=ours):
            return generate_ids(model, prompt.tolist(), max_new_tokens=n, temperature=0, repetition_penalty=1.0,
                                ignore_eos=True)

        @torch.inference_mode()
        def run_hf(n=new, prompt=prompt):
            return hf.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=n, min_new_tokens=n,
                               do_sample=False, eos_token_id=None, pad_token_id=0,
                               repetition_penalty=1.0)[:, 16:].tolist()

        runs = {"ours": run_ours, "ours_decode_layout": lambda n=new, prompt=prompt: run_ours(n, prompt, ours_t),
                "hf": run_hf}
        for fn in runs.values():  # warm-up
            fn(8)
        # alternate the three, so drift in the machine's speed hits all alike; medians
        times, toks = {k: [] for k in runs}, {}
        for _ in range(reps):
            for k, fn in runs.items():
                t, toks[k] = timed(fn, 1)
                times[k].append(t)
        tps = {k: b * new / statistics.median(v) for k, v in times.items()}
        roof = roofline(ours, "fp32", limits["fp32"]["stream"]["gb_s"], 16, new, b)
        res[f"batch_{b}"] = r = {
            "ours_tokens_per_s": round(tps["ours"], 1), "hf_tokens_per_s": round(tps["hf"], 1),
            "speedup": round(tps["ours"] / tps["hf"], 2), "identical_tokens": toks["ours"] == toks["hf"],
            "ours_decode_layout_tokens_per_s": round(tps["ours_decode_layout"], 1),
            "decode_layout_speedup": round(tps["ours_decode_layout"] / tps["hf"], 2),
            "decode_layout_identical_tokens": toks["ours_decode_layout"] == toks["hf"],
            "roofline_tokens_per_s": round(roof, 1),
            "ours_fraction_of_roofline": round(tps["ours"] / roof, 3),
            "ours_decode_layout_fraction_of_roofline": round(tps["ours_decode_layout"] / roof, 3),
            "hf_fraction_of_roofline": round(tps["hf"] / roof, 3)}
        print(f"[bench] decode {new} tokens, batch {b}: ours {r['ours_tokens_per_s']} tok/s "
              f"({r['ours_fraction_of_roofline']:.0%} of the {roof:.0f} tok/s roofline) | decode layout "
              f"{r['ours_decode_layout_tokens_per_s']} tok/s ({r['ours_decode_layout_fraction_of_roofline']:.0%}) | "
              f"transformers {r['hf_tokens_per_s']} tok/s ({r['hf_fraction_of_roofline']:.0%}) | identical: "
              f"{r['identical_tokens']} / {r['decode_layout_identical_tokens']}", flush=True)
    res["new_tokens"], res["prompt_tokens"], res["transformers"] = new, 16, transformers.__version__
    return res


def bench_bf16(cfg, new: int, batches: list[int], reps: int, limits: dict) -> dict:
    """Our decode with bf16 weights against fp32 weights (random weights: speed only)."""
    if not native("bf16"):
        return {"skipped": f"no native bf16 on this CPU: {limits['bf16_why']}"}
    import copy

    torch.manual_seed(0)
    m32 = TransformerLM(cfg).eval()
    m16 = copy.deepcopy(m32).cast(torch.bfloat16)
    res = {}
    for b in batches:
        prompt = torch.randint(3, cfg.vocab_size, (b, 16)).tolist()
        runs = {name: (lambda m=m, prompt=prompt: generate_ids(m, prompt, max_new_tokens=new, temperature=0, repetition_penalty=1.0,
                                                ignore_eos=True)) for name, m in (("fp32", m32), ("bf16", m16))}
        for fn in runs.values():
            fn()
        times = {k: [] for k in runs}
        for _ in range(reps):
            for k, fn in runs.items():
                times[k].append(timed(fn, 1)[0])
        tps = {k: b * new / statistics.median(v) for k, v in times.items()}
        roof = roofline(m16, "bf16", limits["bf16"]["stream"]["gb_s"], 16, new, b)
        res[f"batch_{b}"] = {"fp32_tokens_per_s": round(tps["fp32"], 1), "bf16_tokens_per_s": round(tps["bf16"], 1),
                             "bf16_over_fp32": round(tps["bf16"] / tps["fp32"], 3),
                             "bf16_fraction_of_roofline": round(tps["bf16"] / roof, 3)}
        print(f"[bench] decode bf16 weights, batch {b}: {tps['bf16']:.1f} vs {tps['fp32']:.1f} tok/s fp32 | "
              f"x{tps['bf16'] / tps['fp32']:.2f}", flush=True)
    return res


def bench_agreement(n_prompts: int, new: int) -> dict | None:
    """Greedy ids of the cpu SFT model in bf16 against fp32 on held-out task prompts."""
    from microlm.data.tasks import task_examples
    from microlm.infer.metrics import greedy_agreement
    from microlm.model import load_model
    from microlm.stages import load_config
    from microlm.tokenizer import stop_ids_of

    cfg = load_config("cpu")
    sft = cfg.run_path / "sft"
    if not (sft / "ckpt" / "state.json").is_file():
        print("[bench] bf16 agreement: runs/cpu/sft missing (run `make course` first); skipped", flush=True)
        return None
    prompts = [ex["conversations"][:1] for t in cfg.sft.data.tasks
               for ex in task_examples(t, "heldout", n_prompts // len(cfg.sft.data.tasks), cfg.seed)]
    out = {"model": "runs/cpu/sft", "prompts": len(prompts), "max_new_tokens": new,
           "prompt_set": f"held-out {', '.join(cfg.sft.data.tasks)} task prompts"}
    ids = {}
    for dtype in ("fp32", "bf16"):
        model, tok = load_model(sft, tokenizer=cfg.run_path / "tokenizer", dtype=dtype)
        enc = [tok.encode_chat(p, add_generation_prompt=True) for p in prompts]
        ids[dtype] = [g for i in range(0, len(enc), 8)
                      for g in generate_ids(model, enc[i:i + 8], max_new_tokens=new, temperature=0,
                                            repetition_penalty=1.0, stop_ids=stop_ids_of(tok), pad_id=tok.eos_id or 0)]
    out.update(greedy_agreement(ids["fp32"], ids["bf16"]))
    print(f"[bench] bf16 vs fp32 greedy tokens on {len(prompts)} prompts: {out['prefix_share']:.1%} agree up to the "
          f"first difference, {out['identical']:.0%} of answers identical", flush=True)
    return out


def bench_cache(cfg, lengths: list[int], reps: int) -> dict:
    torch.manual_seed(0)
    cfg = dataclasses.replace(cfg, max_seq_len=max(lengths) + 16)
    m = TransformerLM(cfg).eval()
    prompt = torch.randint(3, cfg.vocab_size, (1, 16)).tolist()
    out = {}
    for n in lengths:
        row = {}
        for use_cache in (True, False):
            t, g = timed(lambda c=use_cache, n=n: generate_ids(m, prompt, max_new_tokens=n, temperature=0,
                                                                repetition_penalty=1.0, ignore_eos=True,
                                                                use_cache=c), reps)
            row["cache" if use_cache else "no_cache"] = {"seconds": round(t, 3), "tokens_per_s": round(n / t, 1),
                                                          "tokens": g[0]}
        row["identical_tokens"] = row["cache"].pop("tokens") == row["no_cache"].pop("tokens")
        row["speedup"] = round(row["no_cache"]["seconds"] / row["cache"]["seconds"], 2)
        out[str(n)] = row
        print(f"[bench] KV cache, {n} new tokens: {row['cache']['tokens_per_s']} vs {row['no_cache']['tokens_per_s']} "
              f"tok/s without | x{row['speedup']} | identical: {row['identical_tokens']}", flush=True)
    return out


def bench_repetition(n_prompts: int) -> dict | None:
    from microlm.data.sources import data_root
    from microlm.infer.generate import generate_text
    from microlm.infer.metrics import repetition_report
    from microlm.model import load_model
    from microlm.stages import load_config
    from microlm.train.sft import sft_records

    cfg = load_config("cpu")
    if not (cfg.run_path / "sft" / "ckpt" / "state.json").is_file():
        print("[bench] repetition: runs/cpu/sft missing (run `make course` first); skipped", flush=True)
        return None
    model, tok = load_model(cfg.run_path / "sft", tokenizer=cfg.run_path / "tokenizer")
    _, held, files = sft_records(cfg.sft.data, data_root(cfg.data.root))
    questions = [r["conversations"][0]["content"] for r in held if r.get("conversations")][:n_prompts]
    out = {"model": "runs/cpu/sft", "prompts": len(questions), "source": [Path(f).name for f in files][-1],
           "max_new_tokens": cfg.generate.max_new_tokens}
    for name, gen in (("default", cfg.generate),
                      ("no_penalty", dataclasses.replace(cfg.generate, repetition_penalty=1.0)),
                      ("greedy_no_penalty", dataclasses.replace(cfg.generate, temperature=0.0, repetition_penalty=1.0))):
        gen = dataclasses.replace(gen, seed=cfg.seed)
        answers = [g.text for i in range(0, len(questions), 10)
                   for g in generate_text(model, tok, questions[i:i + 10], gen, chat=True)]
        out[name] = {"settings": {k: getattr(gen, k) for k in ("temperature", "top_k", "top_p", "repetition_penalty")},
                     **repetition_report(answers), "example": answers[0][:120]}
        r = out[name]
        print(f"[bench] repetition ({name}): distinct-1 {r['distinct_1']:.3f}, distinct-2 {r['distinct_2']:.3f}, "
              f"repeated 4-grams {r['repeated_4gram_rate']:.3f}", flush=True)
    return out


SECTIONS = ("decode_vs_transformers", "bf16_weights", "bf16_agreement", "kv_cache", "repetition")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true", help="fewer tokens and repetitions (a smoke run of the script)")
    ap.add_argument("--only", nargs="+", choices=SECTIONS,
                    help="run these sections and update them in the existing results file (the rest kept)")
    args = ap.parse_args()
    torch.set_num_threads(os.cpu_count() or 1)
    reps = 1 if args.quick else 3
    new = 32 if args.quick else 256
    cfg = MODEL_PRESETS["microlm-31.7m"]
    name = "generate_quick.json" if args.quick else "generate.json"
    path = REPO / "benchmarks" / "results" / name
    results = json.loads(path.read_text()) if args.only and path.is_file() else {}
    results.update({"host": {"cpus": os.cpu_count(), "python": platform.python_version(), "torch": torch.__version__,
                             "machine": platform.machine(), "threads": torch.get_num_threads()},
                    "model": "microlm-31.7m (random weights)", "quick": args.quick})
    limits = machine_limits()
    results["machine_limits"] = limits
    run = {"decode_vs_transformers": lambda: bench_vs_hf(cfg, new, [1, 8], 1 if args.quick else 5, limits),
           "bf16_weights": lambda: bench_bf16(cfg, new, [1, 8], 1 if args.quick else 5, limits),
           "bf16_agreement": lambda: bench_agreement(10 if args.quick else 40, 32),
           "kv_cache": lambda: bench_cache(cfg, [32, 64] if args.quick else [128, 256, 512], reps),
           "repetition": lambda: bench_repetition(10 if args.quick else 50)}
    for section in args.only or SECTIONS:
        results[section] = run[section]()
    results["updated"] = {"sections": list(args.only or SECTIONS), "date": time.strftime("%Y-%m-%d")}
    write_json(path, results)
    print(f"[bench] wrote benchmarks/results/{name}")


if __name__ == "__main__":
    main()
