"""torch.distributed plumbing: one process per device, launched by `torchrun`.

Outside torchrun (no WORLD_SIZE in the environment, or WORLD_SIZE=1) everything runs as
rank 0 of 1 and no process group is created. The backend is NCCL when the default device
(`default_device`) is a GPU and gloo otherwise, so the same code runs in CPU tests and on GPUs.
"""

from __future__ import annotations

import os
from contextlib import contextmanager
from datetime import timedelta

import torch
import torch.distributed as dist


def world_info() -> tuple[int, int, int]:
    """(rank, world_size, local_rank) from torchrun's environment; (0, 1, 0) otherwise."""
    return int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1)), int(os.environ.get("LOCAL_RANK", 0))


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def default_device(device: str | None = None) -> str:
    """The device this process should use: ``device`` if given, else $CROPI_DEVICE if set (the test
    suite sets cpu), else cuda:LOCAL_RANK when CUDA is available, else cpu. Plain ``cuda`` = this
    rank's GPU, cuda:LOCAL_RANK."""
    device = device or os.environ.get("CROPI_DEVICE") or None
    if device == "cuda":
        return f"cuda:{world_info()[2]}"
    if device:
        return device
    if torch.cuda.is_available():
        return f"cuda:{world_info()[2]}"
    return "cpu"


@contextmanager
def dist_context(timeout_s: int = 1800):
    """Yield (rank, world). Initialises the process group under torchrun and tears it down."""
    rank, world, local = world_info()
    if world <= 1 or is_distributed():
        yield (dist.get_rank(), dist.get_world_size()) if is_distributed() else (0, 1)
        return
    backend = "nccl" if default_device().startswith("cuda") else "gloo"
    if backend == "nccl":
        torch.cuda.set_device(local)
    dist.init_process_group(backend, timeout=timedelta(seconds=timeout_s))
    try:
        yield rank, world
        dist.barrier()
    finally:
        dist.destroy_process_group()


def barrier() -> None:
    if is_distributed():
        dist.barrier()


def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    """In-place sum across ranks (no-op in one process). Moves to CUDA for NCCL if needed."""
    if not is_distributed():
        return t
    if dist.get_backend() == "nccl" and t.device.type != "cuda":
        tmp = t.cuda()
        dist.all_reduce(tmp)
        t.copy_(tmp.cpu())
    else:
        dist.all_reduce(t)
    return t
