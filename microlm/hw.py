"""What this machine's hardware can do, and the precision a run uses on it.

``precision`` (``pretrain``, ``sft.train``, ``lora.train``) is ``fp32``, ``bf16`` or ``auto``:

* ``bf16`` is autocast — matrix products in bfloat16, fp32 master weights, fp32 optimizer state and
  an fp32 loss — on CUDA or on the CPU;
* ``auto`` picks ``bf16`` where it is measurably faster: on a CUDA GPU that supports it; on a CPU
  whose flags include ``avx512_bf16`` or ``amx_bf16``, whose oneDNN build says so *and* where a short
  probe (``precision_probe``: a few training steps of a small TransformerLM in each precision, about
  3 s, cached per machine) finds the bf16 step at least ``BF16_MIN_SPEEDUP`` times faster; else ``fp32``.
  A stage's report records the choice and the probe's numbers.

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
import fcntl
import functools
import hashlib
import json
import os
import platform
import resource
import shutil
import statistics
import sysconfig
import tempfile
import time
import warnings
from pathlib import Path

__all__ = ["PRECISIONS", "DTYPES", "cpu_flags", "cpu_bf16", "device_kind", "resolve_precision", "autocast",
           "resolve_dtype", "torch_dtype", "cpu_name", "reset_peak_rss", "peak_rss_mb", "precision_probe", "machine_busy",
           "resolve_compile", "cache_dir", "BF16_MIN_SPEEDUP", "COMPILE_MIN_TOKENS"]

PRECISIONS = ("auto", "fp32", "bf16")
DTYPES = ("auto", "fp32", "bf16")
BF16_FLAGS = ("avx512_bf16", "amx_bf16")
BF16_MIN_SPEEDUP = 1.1  # precision: auto picks bf16 on a CPU only where its probe step is this much faster
PROBE_VERSION = 2  # bump when the probe changes: cached results of another version are re-measured (2: contention)
PROBE_MAX_WAIT = 0.1  # a probe whose threads waited for a CPU this share of the time was contended: measured again
PROBE_TRIES = 3
PROBE_CONTENDED_TTL_S = 3600  # a probe still contended after its tries is cached this long only
COMPILE_MIN_TOKENS = 2_000_000  # compile: auto compiles a run that trains at least this many tokens


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
    return precision_probe()["choice"]


def cache_dir() -> Path:
    """Per-machine measurements: ``$MICROLM_CACHE``, else ``$XDG_CACHE_HOME/microlm`` (``~/.cache/microlm``)."""
    if os.environ.get("MICROLM_CACHE"):
        return Path(os.environ["MICROLM_CACHE"])
    try:
        home = Path.home()
    except RuntimeError:  # no HOME and no passwd entry
        return Path(tempfile.gettempdir()) / "microlm-cache"
    return Path(os.environ.get("XDG_CACHE_HOME") or home / ".cache") / "microlm"


def machine_busy() -> dict:
    """``{"load_1m", "cores_in_use", "busy"}``: the 1-minute load average against the cores this process
    may use; ``busy`` means other work shares them, so a speed measured now is not a speed figure."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    try:
        load = os.getloadavg()[0]
    except OSError:
        return {"load_1m": None, "cores_in_use": cores, "busy": False}
    return {"load_1m": round(load, 2), "cores_in_use": cores, "busy": load > cores * 0.75 + 0.5}


def _probe_key() -> dict:
    import torch

    flags = sorted(f for f in (*BF16_FLAGS, "amx_tile", "avx512f", "avx2") if f in cpu_flags())
    # no thread count: the choice is a ratio, and it feeds stage fingerprints, so every process of one
    # machine (a notebook kernel, a CLI run, a test worker on one thread) must read the same one
    return {"cpu": cpu_name(), "flags": flags, "torch": torch.__version__, "version": PROBE_VERSION}


def _probe_steps() -> dict:
    """Median seconds of one training step (forward, backward, AdamW) of a small Llama-style block
    stack — the ``cpu`` profile's width (256, SwiGLU 683, heads of 64), 2 layers, 4 × 256 tokens, a
    2,048-word head — in fp32 and in bf16 autocast, steps interleaved so a neighbour's load hits both
    alike.  Plain torch (this module sits below ``microlm.model``)."""
    import torch
    import torch.nn.functional as F
    from torch import nn

    dim, hidden, heads, vocab, b, t = 256, 683, 4, 2048, 4, 256

    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.qkv, self.o = nn.Linear(dim, 3 * dim, bias=False), nn.Linear(dim, dim, bias=False)
            self.up, self.down = nn.Linear(dim, 2 * hidden, bias=False), nn.Linear(hidden, dim, bias=False)

        def forward(self, x):
            q, k, v = self.qkv(F.rms_norm(x, (dim,))).view(b, t, 3, heads, dim // heads).permute(2, 0, 3, 1, 4)
            a = F.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(1, 2).reshape(b, t, dim)
            x = x + self.o(a)
            gate, up = self.up(F.rms_norm(x, (dim,))).split(hidden, dim=-1)
            return x + self.down(F.silu(gate) * up)

    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, vocab, (b, t), generator=g)
    steps, times = {}, {"fp32": [], "bf16": []}
    for name in times:
        model = nn.ModuleDict({"embed": nn.Embedding(vocab, dim), "blocks": nn.Sequential(Block(), Block()),
                               "head": nn.Linear(dim, vocab, bias=False)})
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)

        def step(model=model, opt=opt, bf16=name == "bf16"):
            opt.zero_grad(set_to_none=True)
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
                logits = model["head"](model["blocks"](model["embed"](ids)))
                loss = F.cross_entropy(logits.float().view(-1, vocab), ids.view(-1))
            loss.backward()
            opt.step()
        step()  # warm-up: oneDNN builds its kernels
        steps[name] = step
    waited0, wall0 = _run_delay_s(), time.perf_counter()
    for _ in range(5):
        for name, step in steps.items():
            t0 = time.perf_counter()
            step()
            times[name].append(time.perf_counter() - t0)
    waited1, wall = _run_delay_s(), time.perf_counter() - wall0
    out = {name: statistics.median(ts) for name, ts in times.items()}
    # the share of the time the process's threads were ready to run but waited for a CPU: ~0 when the
    # cores are ours, ~0.5 when another busy process shares them (then both speeds are someone else's)
    out["waited"] = None if waited0 is None or waited1 is None else (waited1 - waited0) / (wall * torch.get_num_threads())
    return out


def _run_delay_s() -> float | None:
    """Seconds this process's threads have spent runnable but waiting for a CPU (Linux schedstat), or
    ``None`` where the kernel does not say."""
    try:
        tids = os.listdir("/proc/self/task")
    except OSError:
        return None
    total, seen = 0, False
    for tid in tids:
        with contextlib.suppress(OSError, ValueError, IndexError):
            total += int(Path(f"/proc/self/task/{tid}/schedstat").read_text().split()[1])
            seen = True
    return total / 1e9 if seen else None


@functools.lru_cache(maxsize=1)
def precision_probe() -> dict:
    """What ``precision: auto`` picks on this CPU, and why: ``{"choice", "why", "fp32_step_ms",
    "bf16_step_ms", "bf16_speedup", "busy", "threads", ...}``.  Without native bf16 (flags or oneDNN)
    nothing is measured (bf16 runs a fallback ~80× slower).  Otherwise the probe runs once per machine
    (CPU, flags, torch version) and is cached in ``cache_dir()``.  A probe whose threads had to wait for a
    CPU (another process shared the cores: both step times are then that process's doing — one such
    probe once chose fp32 at ×0.96 where a quiet one measures ×1.6) is measured again up to
    ``PROBE_TRIES`` times; one still contended is used and cached for an hour only, and says so."""
    native, why = cpu_bf16()
    key = _probe_key()
    if not native:
        return {"choice": "fp32", "why": why, "measured": False, **key}
    path = cache_dir() / f"precision-probe-{hashlib.sha1(json.dumps(key, sort_keys=True).encode()).hexdigest()[:12]}.json"
    rec = _cached_probe(path, key)
    if rec is not None:
        return rec
    lock = None
    with contextlib.suppress(OSError):  # one process measures, the others wait for its file
        path.parent.mkdir(parents=True, exist_ok=True)
        lock = open(path.with_suffix(".lock"), "a")  # noqa: SIM115 (held until the probe is written)
        fcntl.flock(lock, fcntl.LOCK_EX)
    try:
        rec = _cached_probe(path, key)  # another process may have written it while this one waited
        if rec is None:
            rec = _measure_probe(key, why)
            with contextlib.suppress(OSError):  # no writable cache: measured again next time
                tmp = path.with_name(f".{path.name}.{os.getpid()}")
                tmp.write_text(json.dumps(rec, indent=1), encoding="utf-8")
                os.replace(tmp, path)
        return rec
    finally:
        if lock is not None:
            lock.close()


def _cached_probe(path: Path, key: dict) -> dict | None:
    with contextlib.suppress(OSError, ValueError):
        rec = json.loads(path.read_text(encoding="utf-8"))
        if rec.get("key") == key and rec.get("choice") in ("fp32", "bf16"):
            if rec.get("contended") and time.time() - rec.get("at_s", 0) > PROBE_CONTENDED_TTL_S:
                return None  # a contended probe is not this machine's answer for good: measured again
            return {**rec, "cached": str(path)}
    return None


def _measure_probe(key: dict, why: str) -> dict:
    """The probe on every core this process may use (a test worker set to one thread still measures
    what a course run will see), the thread count restored after."""
    import torch

    load = machine_busy()
    threads = torch.get_num_threads()
    torch.set_num_threads(load["cores_in_use"])
    try:
        for tries in range(1, PROBE_TRIES + 1):
            t = _probe_steps()
            if t["waited"] is None or t["waited"] <= PROBE_MAX_WAIT:
                break
            if tries < PROBE_TRIES:
                time.sleep(2.0)  # a neighbour's burst may pass
    finally:
        torch.set_num_threads(threads)
    contended = t["waited"] is not None and t["waited"] > PROBE_MAX_WAIT
    speedup = t["fp32"] / t["bf16"]
    choice = "bf16" if speedup >= BF16_MIN_SPEEDUP else "fp32"
    return {"choice": choice, "measured": True,
            "why": f"{why}; probe: bf16 step ×{speedup:.2f} the fp32 step's speed "
                   f"({'≥' if choice == 'bf16' else '<'} {BF16_MIN_SPEEDUP})"
                   + (f"; contended: its threads waited for a CPU {t['waited']:.0%} of the time "
                      f"({tries} tries), re-measured after an hour" if contended else ""),
            "fp32_step_ms": round(t["fp32"] * 1e3, 1), "bf16_step_ms": round(t["bf16"] * 1e3, 1),
            "bf16_speedup": round(speedup, 3), "threads": load["cores_in_use"], **load,
            "waited_share": None if t["waited"] is None else round(t["waited"], 3), "tries": tries,
            "contended": contended, "key": key, "at": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "at_s": time.time()}


def resolve_compile(compile: bool | str, device: str, tokens: int) -> tuple[bool, str]:
    """``(compile or not, why)`` for a run that trains ``tokens`` tokens.  ``auto`` compiles on CUDA,
    and on a CPU with a C++ compiler (inductor's CPU backend builds C++) when the run is long enough to
    pay back the compilation (~30 s on 2 cores; ``benchmarks/bench_train.py`` measures both)."""
    if compile not in (True, False, "auto"):
        raise ValueError(f"compile must be true, false or auto, got {compile!r}")
    if compile is False:
        return False, "compile: false"
    kind = device_kind(device)
    missing = None
    if kind == "cpu" and not any(shutil.which(c) for c in (os.environ.get("CXX") or "g++", "c++", "clang++")):
        missing = "no C++ compiler for torch.compile's CPU backend"
    elif kind == "cpu" and not (Path(sysconfig.get_paths()["include"]) / "Python.h").is_file():
        missing = "no Python.h (python3-dev) for torch.compile's CPU backend"
    if missing:
        if compile is True:
            warnings.warn(f"compile: true, but {missing}: training runs uncompiled", stacklevel=2)
        return False, missing
    if compile == "auto" and tokens < COMPILE_MIN_TOKENS:
        return False, f"compile: auto, {tokens:,} tokens to train (< {COMPILE_MIN_TOKENS:,}: compiling would not pay)"
    return True, "compile: true" if compile is True else f"compile: auto, {tokens:,} tokens to train"


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
