"""What this machine's hardware can do, and the precision a run uses on it.

``precision`` (``pretrain``, ``sft.train``, ``lora.train``) is ``fp32``, ``bf16`` or ``auto``:

* ``bf16`` is autocast — matrix products in bfloat16, fp32 master weights, fp32 optimizer state and
  an fp32 loss — on CUDA or on the CPU;
* ``auto`` picks ``bf16`` where the hardware multiplies bfloat16 natively (a CUDA GPU that supports
  it; a CPU whose flags include ``avx512_bf16`` or ``amx_bf16`` *and* whose oneDNN build says so),
  else ``fp32``.

Why the CPU flags and not ``torch.backends.cpu.get_cpu_capability()``: that only says ``AVX512``
or ``AVX2``, and an AVX-512 CPU without the bf16 extension (or an AVX2 one) runs bfloat16 products
through a slow fallback — measured on a 2-core AMD EPYC with AVX2 only: 1.2 GFLOP/s in bf16 against
97 GFLOP/s in fp32.  Asking for ``bf16`` there still runs (correct, ~80× slower on the products), with
a warning; ``auto`` never picks it.

The resolved precision is what a stage's fingerprint, a checkpoint and a reference curve record,
so an ``auto`` run on a bf16 machine and one on an fp32 machine are different runs.
"""

from __future__ import annotations

import contextlib
import functools
import platform
import resource
import warnings
from pathlib import Path

__all__ = ["PRECISIONS", "DTYPES", "cpu_flags", "cpu_bf16", "device_kind", "resolve_precision", "autocast",
           "resolve_dtype", "torch_dtype", "cpu_name", "reset_peak_rss", "peak_rss_mb"]

PRECISIONS = ("auto", "fp32", "bf16")
DTYPES = ("auto", "fp32", "bf16")
BF16_FLAGS = ("avx512_bf16", "amx_bf16")


@functools.lru_cache(maxsize=1)
def cpu_flags() -> frozenset[str]:
    """The CPU's feature flags (Linux ``/proc/cpuinfo``; empty elsewhere)."""
    try:
        for line in Path("/proc/cpuinfo").read_text(encoding="utf-8", errors="replace").splitlines():
            if line.startswith(("flags", "Features")):
                return frozenset(line.partition(":")[2].split())
    except OSError:
        pass
    return frozenset()


@functools.lru_cache(maxsize=1)
def cpu_bf16() -> tuple[bool, str]:
    """``(native bf16 on this CPU, why)``: a bf16 flag in the CPU flags and oneDNN's own check."""
    import torch

    flags = sorted(f for f in BF16_FLAGS if f in cpu_flags())
    onednn = bool(getattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", lambda: False)())
    model = platform.processor() or platform.machine()
    if flags and onednn:
        return True, f"CPU flags {', '.join(flags)}; oneDNN bf16 supported"
    if not flags:
        return False, f"no {' / '.join(BF16_FLAGS)} in the CPU flags ({model}, {torch.backends.cpu.get_cpu_capability()})"
    return False, f"CPU flags {', '.join(flags)}, but this torch's oneDNN reports no bf16 support"


def device_kind(device: str) -> str:
    """``cuda`` or ``cpu`` for a device string (``auto`` resolved the way the trainer does)."""
    import torch

    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return "cuda" if device.startswith("cuda") else "cpu"


def resolve_precision(precision: str, device: str = "auto") -> str:
    """``fp32`` or ``bf16``: what ``precision`` means on ``device`` of this machine."""
    import torch

    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
    if precision != "auto":
        return precision
    if device_kind(device) == "cuda":
        return "bf16" if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else "fp32"
    return "bf16" if cpu_bf16()[0] else "fp32"


def autocast(precision: str, device: str):
    """The context to run forward passes (and the loss) in: bf16 autocast, or nothing for fp32.
    ``precision`` may be ``auto``; an explicit ``bf16`` on a CPU without native bf16 warns once."""
    import torch

    resolved = resolve_precision(precision, device)
    if resolved == "fp32":
        return contextlib.nullcontext()
    kind = device_kind(device)
    if kind == "cpu" and not cpu_bf16()[0]:
        _warn_slow_bf16()
    return torch.autocast(kind, dtype=torch.bfloat16)


@functools.lru_cache(maxsize=1)
def _warn_slow_bf16() -> None:
    warnings.warn(f"bf16 asked for on a CPU without native bf16 ({cpu_bf16()[1]}): it runs, but its matrix "
                  f"products are far slower than fp32 here; precision: auto picks fp32 on this machine", stacklevel=3)


def resolve_dtype(dtype: str, device: str = "cpu") -> str:
    """Inference weights: ``fp32`` or ``bf16`` (``auto`` = bf16 where native, as for training)."""
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
    return resolve_precision(dtype, device)


def torch_dtype(name: str):
    import torch

    return {"fp32": torch.float32, "bf16": torch.bfloat16}[name]


@functools.lru_cache(maxsize=1)
def cpu_name() -> str:
    """The CPU's model name (``/proc/cpuinfo``), with whether it has native bf16 flags — what every
    measured number is reported with."""
    name = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text(encoding="utf-8", errors="replace").splitlines():
            if line.startswith("model name"):
                name = line.partition(":")[2].strip()
                break
    except OSError:
        pass
    flags = cpu_flags()
    isa = "AMX" if "amx_bf16" in flags else "AVX-512-bf16" if "avx512_bf16" in flags else \
        "AVX-512" if "avx512f" in flags else "AVX2" if "avx2" in flags else "no AVX2"
    return f"{name} ({isa})"


def reset_peak_rss() -> None:
    """Start this process's peak resident memory (VmHWM) afresh (Linux; elsewhere nothing happens),
    so a stage's peak is its own and not an earlier stage's of the same process."""
    with contextlib.suppress(OSError):
        Path("/proc/self/clear_refs").write_text("5")


def peak_rss_mb() -> int:
    """This process's peak resident memory since start or the last ``reset_peak_rss`` (VmHWM), MB."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return round(int(line.split()[1]) / 1024)
    except (OSError, ValueError, IndexError):
        pass
    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)
