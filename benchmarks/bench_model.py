"""Benchmark of stage A5 (the TransformerLM): training throughput vs transformers' Llama, MFU, KV cache.

1. **Training throughput** (tokens/s of forward + backward + AdamW step, fp32, CPU) of our model and
   of ``transformers.LlamaForCausalLM`` with identical dimensions (``attn_implementation="sdpa"``,
   same parameter count, asserted), for the 31.7M reference at seq 512 and the ``cpu`` profile's
   model at seq 256.  The two are timed in alternating rounds in the same process; the median round
   counts.  Target: ours ≥ 1.1× faster.
2. **MFU**: model FLOPs per token (6·N + attention) × tokens/s over the peak of this machine, taken as
   the best fp32 GEMM rate measured here (a CPU has no honest datasheet number).
3. **Decode** with vs without the KV cache: 256 new tokens after a 16-token prompt, batch 1, greedy.
   Target ≥ 5× speedup.

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


def train_steps(model, x, y, n, hf: bool) -> float:
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    model.train()
    t0 = time.perf_counter()
    for _ in range(n):
        if hf:
            loss = model(input_ids=x, labels=x).loss
        else:
            _, loss = model(x, y)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    return time.perf_counter() - t0


def gemm_peak_gflops() -> float:
    best = 0.0
    for n in (1024, 2048):
        a, b = torch.randn(n, n), torch.randn(n, n)
        torch.mm(a, b)
        for _ in range(3):
            t0 = time.perf_counter()
            for _ in range(5):
                torch.mm(a, b)
            dt = (time.perf_counter() - t0) / 5
            best = max(best, 2 * n ** 3 / dt / 1e9)
    return best


def bench_train(name: str, cfg, seq: int, batch: int, rounds: int, steps: int, peak: float) -> dict:
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
    train_steps(ours, inp, tgt, 1, False)
    train_steps(theirs, hf_inp, None, 1, True)
    t_ours, t_hf = [], []
    for _ in range(rounds):
        t_ours.append(train_steps(ours, inp, tgt, steps, False))
        t_hf.append(train_steps(theirs, hf_inp, None, steps, True))
    tok = batch * seq * steps
    tps_ours = tok / statistics.median(t_ours)
    tps_hf = tok / statistics.median(t_hf)
    fpt = ours.flops_per_token(seq)
    res = {"params": n_ours, "seq_len": seq, "batch": batch, "steps_per_round": steps, "rounds": rounds,
           "ours_tokens_per_s": round(tps_ours, 1), "hf_llama_tokens_per_s": round(tps_hf, 1),
           "speedup_ours_over_hf": round(tps_ours / tps_hf, 3), "flops_per_token": fpt,
           "ours_mfu_vs_gemm_peak": round(fpt * tps_ours / (peak * 1e9), 4),
           "hf_mfu_vs_gemm_peak": round(fpt * tps_hf / (peak * 1e9), 4)}
    print(f"[bench] train {name} (seq {seq}, batch {batch}): ours {tps_ours:,.0f} tok/s | HF Llama "
          f"{tps_hf:,.0f} tok/s | x{res['speedup_ours_over_hf']:.2f} | MFU ours {res['ours_mfu_vs_gemm_peak']:.1%}",
          flush=True)
    return res


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    args = ap.parse_args()
    torch.set_num_threads(os.cpu_count() or 1)
    peak = gemm_peak_gflops()
    print(f"[bench] best fp32 GEMM on this machine: {peak:.1f} GFLOP/s ({torch.get_num_threads()} threads)", flush=True)
    rounds, steps = (2, 2) if args.quick else (5, 3)
    results = {"host": {"cpus": os.cpu_count(), "python": platform.python_version(), "torch": torch.__version__,
                        "machine": platform.machine(), "threads": torch.get_num_threads()},
               "gemm_peak_gflops": round(peak, 1), "quick": args.quick}
    results["train_31.7m"] = bench_train("microlm-31.7m", MODEL_PRESETS["microlm-31.7m"], 512, 4, rounds, steps, peak)
    results["train_cpu"] = bench_train("microlm-cpu", MODEL_PRESETS["microlm-cpu"], 256, 16, rounds, steps, peak)
    name = "model_quick.json" if args.quick else "model.json"
    write_json(REPO / "benchmarks" / "results" / name, results)
    print(f"[bench] wrote benchmarks/results/{name}")


if __name__ == "__main__":
    main()
