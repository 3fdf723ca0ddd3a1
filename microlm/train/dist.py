"""Process-group setup for ``torchrun`` (DDP: gloo on CPU, NCCL on CUDA) — or a single process."""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch

from microlm.errors import MicroLMError

__all__ = ["DistInfo", "setup_distributed", "cleanup_distributed", "distributed", "resolve_device"]


@dataclass
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: str = "cpu"

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def resolve_device(device: str) -> str:
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise MicroLMError(f"device {device!r} asked for, but this torch ({torch.__version__}) sees no CUDA GPU; "
                           f"set the stage's device to cpu or auto")
    index = device.partition(":")[2]
    if device.startswith("cuda") and index.isdigit() and int(index) >= torch.cuda.device_count():
        raise MicroLMError(f"device {device!r} asked for, but this machine has {torch.cuda.device_count()} CUDA GPU(s); "
                           f"set the stage's device to cuda, cpu or auto")
    return device


def setup_distributed(device: str = "auto") -> DistInfo:
    """Read torchrun's environment; start the process group when there is more than one process."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local = int(os.environ.get("LOCAL_RANK", "0"))
    dev = resolve_device(device)
    if world > 1:
        import torch.distributed as dist

        backend = "nccl" if dev.startswith("cuda") else "gloo"
        if dev.startswith("cuda"):
            torch.cuda.set_device(local)
            dev = f"cuda:{local}"
        if not dist.is_initialized():
            dist.init_process_group(backend=backend)
    elif dev == "cuda":
        dev = "cuda:0"
    return DistInfo(rank=rank, world_size=world, local_rank=local, device=dev)


def cleanup_distributed(info: DistInfo) -> None:
    if info.distributed:
        import torch.distributed as dist

        if dist.is_initialized():
            dist.destroy_process_group()


@contextmanager
def distributed(device: str = "auto", dist: DistInfo | None = None) -> Iterator[DistInfo]:
    """``dist`` when a caller already holds the process group, else this process's own: set up on
    entry, torn down on exit (also after an error or Ctrl-C)."""
    if dist is not None:
        yield dist
        return
    info = setup_distributed(device)
    try:
        yield info
    finally:
        cleanup_distributed(info)
