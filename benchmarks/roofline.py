"""This machine's own limits, measured in the benchmark's run: GEMM peak and weight-streaming bandwidth
per dtype, and the decode roofline they imply.

* **GEMM peak** (GFLOP/s): the best of square matrix products of 1024 and 2048 (``2·n³`` FLOPs each),
  per dtype.  A dtype the CPU has no native instructions for (bf16 without ``avx512_bf16``/``amx_bf16``)
  runs a slow fallback; it is measured on a 256² product only (a 2048² one would take minutes).
* **Weight-streaming bandwidth** (GB/s): a matrix-vector product over a weight matrix far larger
  than the caches (256 MiB in fp32) — the access pattern of decoding one token at batch 1 — as bytes
  of the matrix ÷ time, best of several.
* **Decode roofline** (tokens/s): bandwidth ÷ bytes read per decoded token (every weight matrix, one
  embedding row, the norms, and the KV cache up to the mean position); the measured decode rate over
  it is the fraction of the roofline reached.
"""

from __future__ import annotations

import time

import torch

from microlm.hw import cpu_bf16, torch_dtype

__all__ = ["native", "gemm_peak", "stream_bandwidth", "machine_limits", "decode_bytes_per_token",
           "roofline"]


def native(dtype: str) -> bool:
    return dtype == "fp32" or cpu_bf16()[0]


def _best_rate(fn, work: float, reps: int, inner: int) -> float:
    fn()  # warm-up (allocator, threads, kernel choice)
    best = 0.0
    for _ in range(reps):
        t0 = time.perf_counter()
        for _ in range(inner):
            fn()
        best = max(best, work * inner / (time.perf_counter() - t0))
    return best


def gemm_peak(dtype: str, reps: int = 3) -> dict:
    """``{"gflops", "sizes"}``: best GEMM rate in ``dtype``."""
    dt = torch_dtype(dtype)
    sizes = (1024, 2048) if native(dtype) else (256,)
    best = 0.0
    for n in sizes:
        a, b = torch.randn(n, n).to(dt), torch.randn(n, n).to(dt)
        best = max(best, _best_rate(lambda a=a, b=b: torch.mm(a, b), 2 * n ** 3, reps, 5 if native(dtype) else 1))
    return {"gflops": round(best / 1e9, 1), "sizes": list(sizes), "native": native(dtype)}


def stream_bandwidth(dtype: str, mib: int = 256, reps: int = 5) -> dict:
    """``{"gb_s", "matrix_mib"}``: bytes of a weight matrix read per second by ``W @ x`` (batch 1)."""
    dt = torch_dtype(dtype)
    size = torch.tensor([], dtype=dt).element_size()
    if not native(dtype):
        mib = 32  # the fallback is compute-bound: a smaller matrix says as much, sooner
    rows = 4096
    cols = mib * 2 ** 20 // (rows * size)
    w = torch.randn(rows, cols).to(dt)
    x = torch.randn(cols, 1).to(dt)
    rate = _best_rate(lambda: torch.mm(w, x), w.numel() * size, reps, 3)
    return {"gb_s": round(rate / 1e9, 2), "matrix_mib": round(w.numel() * size / 2 ** 20), "native": native(dtype)}


def machine_limits(dtypes=("fp32", "bf16")) -> dict:
    out = {"bf16_native": cpu_bf16()[0], "bf16_why": cpu_bf16()[1], "threads": torch.get_num_threads()}
    for d in dtypes:
        out[d] = {"gemm": gemm_peak(d), "stream": stream_bandwidth(d)}
        print(f"[bench] {d}: GEMM peak {out[d]['gemm']['gflops']} GFLOP/s, weight streaming "
              f"{out[d]['stream']['gb_s']} GB/s" + ("" if native(d) else "  (no native instructions: fallback)"),
              flush=True)
    return out


def decode_bytes_per_token(model, dtype: str, context: float, batch: int = 1) -> float:
    """Bytes one decode step reads per token: all weights except the embedding table (one row of it
    per sequence), shared by the batch, plus each sequence's KV cache at ``context`` positions."""
    size = torch.tensor([], dtype=torch_dtype(dtype)).element_size()
    cfg = model.cfg
    n = sum(p.numel() for p in model.parameters()) - model.embed.weight.numel()
    if cfg.tie_embeddings:
        n += model.embed.weight.numel()  # the LM head reads the (tied) table whole
    weights = n * size / batch + cfg.dim * size
    kv = 2 * cfg.n_layers * cfg.kv_heads * cfg.head_dim * context * size
    return weights + kv


def roofline(model, dtype: str, bandwidth_gb_s: float, prompt: int, new: int, batch: int = 1) -> float:
    """Tokens/s (all sequences together) if every decode step only streamed its bytes at the measured
    bandwidth; the KV cache read at the mean position of the generated tokens."""
    per_token = decode_bytes_per_token(model, dtype, prompt + new / 2, batch)
    return bandwidth_gb_s * 1e9 / per_token
