"""The course's server (``serve`` section): what ``microlm serve``, the ``serve_*`` stages and an
``ie_eval`` row with ``base_url: serve`` start — one spec, built here."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from microlm.config import stage_config
from microlm.errors import ConfigError, MicroLMError
from microlm.stages.registry import resolve_ref


@dataclass
class ServeConfig:
    """Stage B6's server (``microlm serve`` and the serve_* stages): vLLM from the serving environment
    for ``model`` (a stage reference like ``ie_merged:<run>``, or a folder), bound to ``host``;
    ``port`` 0 = a free port (the stages), ``tensor_parallel_size`` is passed to vLLM (several GPUs)."""

    model: str = "ie_merged:qwen2.5-1.5b"
    served_model_name: str = "microlm-ie"
    host: str = "127.0.0.1"
    port: int = 8000
    api_key_env: str | None = None  # the name of an environment variable holding the API key
    tensor_parallel_size: int = 1
    max_model_len: int | None = None
    dtype: str = "auto"
    kv_cache_gib: float = 1.0  # VLLM_CPU_KVCACHE_SPACE on CPU
    max_num_seqs: int = 64
    startup_timeout_s: float = 600.0


def check_serve(c: ServeConfig) -> None:
    # serve.model may name an ie_merged run that is not configured: the serve stages say so when they run
    if not 0 <= c.port <= 65535 or c.tensor_parallel_size < 1 or c.kv_cache_gib <= 0 or c.max_num_seqs < 1 \
            or c.startup_timeout_s <= 0 or (c.max_model_len is not None and c.max_model_len < 16):
        raise ConfigError("serve: port in 0..65535 (0 = free), tensor_parallel_size >= 1, kv_cache_gib > 0, "
                          "max_num_seqs >= 1, startup_timeout_s > 0, max_model_len >= 16 or null")
    if c.dtype not in ("auto", "float32", "bfloat16", "float16"):
        raise ConfigError(f"serve.dtype must be auto, float32, bfloat16 or float16, got {c.dtype!r}")


def server_spec(cfg, up: dict[str, Path], *, model: str | None = None, port: int | None = None, **over):
    """The ``ServerSpec`` of the ``serve`` section (``model``: a stage reference like ``ie_merged:<run>``,
    or a folder; resolved against ``up``); ``port`` 0 = a free port; ``over``: other fields given
    explicitly (the CLI's flags)."""
    from microlm.serve.server import ServerSpec, free_port

    sc = cfg.serve
    path = resolve_ref(model or sc.model, up)
    if not Path(path).is_dir():
        raise MicroLMError(f"serve.model {model or sc.model!r} is not a built folder ({path})")
    p = sc.port if port is None else port
    fields = dict(model=path, served_name=sc.served_model_name, host=sc.host,
                  api_key=os.environ.get(sc.api_key_env) if sc.api_key_env else None,
                  tensor_parallel_size=sc.tensor_parallel_size, max_model_len=sc.max_model_len, dtype=sc.dtype,
                  kv_cache_gib=sc.kv_cache_gib, max_num_seqs=sc.max_num_seqs)
    fields.update({k: v for k, v in over.items() if v is not None})
    return ServerSpec(port=p or free_port(fields["host"]), **fields)


def serve_key(cfg, section: str) -> dict:
    """A serve stage's fingerprint: its own section and the server's (not where it listens)."""
    return {"serve": {k: v for k, v in stage_config(cfg, "serve").items() if k not in ("port", "host")},
            section: stage_config(cfg, section)}
