"""Benchmark of stage A5 (the TransformerLM): training throughput vs transformers' Llama, MFU, KV cache.

1. **Training throughput** (tokens/s of forward + backward + AdamW step, fp32, CPU) of our model and
   of ``transformers.LlamaForCausalLM`` with identical dimensions (``attn_implementation="sdpa"``,
   same parameter count, asserted), for the 31.7M reference at seq 512 and the ``cpu`` profile's
   model at seq 256.  The two are timed in alternating rounds in the same process; the median round
   counts.  Target: ours ≥ 1.1× faster.
2. **bf16 autocast vs fp32** (ours, same rounds, alternating): tokens/s of each and the ratio — only
   where the CPU multiplies bf16 natively (``microlm.hw.cpu_bf16``; elsewhere bf16 is a fallback ~80×
   slower and the rounds are skipped, with the reason recorded; ``bench_precision.py`` still compares
   the two on a small model).  Target on a bf16 CPU: ≥ 1.5×.
3. **MFU per dtype**: model FLOPs per token (6·N + attention) × tokens/s over that dtype's own GEMM
   peak, measured in the same run (``roofline.py``: a CPU has no honest datasheet number).

Writes ``benchmarks/results/model.json``.  Usage: ``python benchmarks/bench_model.py [--quick]``.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

sys.path.insert(0, str(Path(__file__).resolve().parent))

from roofline import machine_limits, native  # noqa: E402

from microlm.hw import autocast  # noqa: E402
from microlm.io import write_json  # noqa: E402
from microlm.model import MODEL_PRESETS, TransformerLM  # noqa: E402


def hf_llama(cfg):
    from transformers import LlamaConfig, LlamaForCausalLM

    hc = LlamaConfig(vocab_size=cfg.vocab_size, hidden_size=cfg.dim, intermediate_size=cfg.hidden_dim,
                     num_hidden_layers=cfg.n_layers, num_attention_heads=cfg.n_heads,
                     num_key_value_heads=cfg.kv_heads, max_position_embeddings=cfg.max_seq_len,
                     rms_norm_eps=cfg.norm_eps, rope_theta=cfg.rope_theta, tie_word_embeddings=cfg.tie_embeddings,
                     attention_bias=False, mlp_bias=False, use_cache=False)
    return LlamaForCausalLM._from_config(hc, attn_implementation="sdpa")


def train_steps(model, x, y, n, hf: bool, precision: str = "fp32") -> float:
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    model.train()
    t0 = time.perf_counter()
    for _ in range(n):
        with autocast(precision, "cpu"):
            if hf:
                loss = model(input_ids=x, labels=x).loss
            else:
                _, loss = model(x, y)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    return time.perf_counter() - t0


def bench_train(name: str, cfg, seq: int, batch: int, rounds: int, steps: int, peaks: dict) -> dict:
    torch.manual_seed(0)
    ours = TransformerLM(cfg)
    theirs = hf_llama(cfg)
    n_ours = ours.num_parameters()
    n_hf = sum(p.numel() for p in theirs.parameters())
    assert n_ours == n_hf, (n_ours, n_hf)
    x = torch.randint(0, cfg.vocab_size, (batch, seq + 1))
    inp, tgt = x[:, :-1], x[:, 1:]
    hf_inp = inp
    # warm up both (allocator, threads)
    bf16 = native("bf16")
    train_steps(ours, inp, tgt, 1, False)
    train_steps(theirs, hf_inp, None, 1, True)
    if bf16:
        train_steps(ours, inp, tgt, 1, False, "bf16")
    t_ours, t_hf, t_bf16 = [], [], []
    for _ in range(rounds):  # alternating, so drift in the machine's speed hits all alike
        t_ours.append(train_steps(ours, inp, tgt, steps, False))
        t_hf.append(train_steps(theirs, hf_inp, None, steps, True))
        if bf16:
            t_bf16.append(train_steps(ours, inp, tgt, steps, False, "bf16"))
    tok = batch * seq * steps
    tps_ours = tok / statistics.median(t_ours)
    tps_hf = tok / statistics.median(t_hf)
    fpt = ours.flops_per_token(seq)
    fp32_peak = peaks["fp32"]["gemm"]["gflops"] * 1e9
    res = {"params": n_ours, "seq_len": seq, "batch": batch, "steps_per_round": steps, "rounds": rounds,
           "ours_tokens_per_s": round(tps_ours, 1), "hf_llama_tokens_per_s": round(tps_hf, 1),
           "speedup_ours_over_hf": round(tps_ours / tps_hf, 3), "flops_per_token": fpt,
           "ours_mfu_vs_gemm_peak": round(fpt * tps_ours / fp32_peak, 4),
           "hf_mfu_vs_gemm_peak": round(fpt * tps_hf / fp32_peak, 4)}
    if bf16:
        tps_bf16 = tok / statistics.median(t_bf16)
        res["bf16"] = {"ours_tokens_per_s": round(tps_bf16, 1), "bf16_over_fp32": round(tps_bf16 / tps_ours, 3),
                       "mfu_vs_bf16_gemm_peak": round(fpt * tps_bf16 / (peaks["bf16"]["gemm"]["gflops"] * 1e9), 4)}
    else:
        res["bf16"] = {"skipped": f"no native bf16 on this CPU: {peaks['bf16_why']}"}
    print(f"[bench] train {name} (seq {seq}, batch {batch}): ours {tps_ours:,.0f} tok/s | HF Llama "
          f"{tps_hf:,.0f} tok/s | x{res['speedup_ours_over_hf']:.2f} | MFU ours {res['ours_mfu_vs_gemm_peak']:.1%}"
          + (f" | bf16 {res['bf16']['ours_tokens_per_s']:,.0f} tok/s x{res['bf16']['bf16_over_fp32']:.2f}, MFU "
             f"{res['bf16']['mfu_vs_bf16_gemm_peak']:.1%} of the bf16 peak" if bf16 else " | bf16 skipped (fallback)"),
          flush=True)
    return res


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    args = ap.parse_args()
    torch.set_num_threads(os.cpu_count() or 1)
    peaks = machine_limits()
    rounds, steps = (2, 2) if args.quick else (5, 3)
    results = {"host": {"cpus": os.cpu_count(), "python": platform.python_version(), "torch": torch.__version__,
                        "machine": platform.machine(), "threads": torch.get_num_threads()},
               "processor": platform.processor(), "machine_limits": peaks,
               "gemm_peak_gflops": peaks["fp32"]["gemm"]["gflops"], "quick": args.quick}
    results["train_31.7m"] = bench_train("microlm-31.7m", MODEL_PRESETS["microlm-31.7m"], 512, 4, rounds, steps, peaks)
    results["train_cpu"] = bench_train("microlm-cpu", MODEL_PRESETS["microlm-cpu"], 256, 16, rounds, steps, peaks)
    name = "model_quick.json" if args.quick else "model.json"
    write_json(REPO / "benchmarks" / "results" / name, results)
    print(f"[bench] wrote benchmarks/results/{name}")


if __name__ == "__main__":
    main()
