"""Data-parallel training on ``torch.distributed``: the same command runs on 1 process or N (``torchrun``), on CPU
(gloo) or GPUs (nccl). The trainer asks :func:`current_context` where it runs; nothing here is global state except
what ``torch.distributed`` itself holds.

Launch: ``torchrun --nproc_per_node 2 .venv/bin/lmshrink train ...`` (each process takes a shard of every global batch;
gradients are averaged by DDP, so N processes with micro-batch B match 1 process with micro-batch N x B).
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

from lmshrink.utils.env import resolve_device


@dataclass(frozen=True)
class DistContext:
    """Where this process runs: its rank among ``world_size`` processes and its device."""

    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        """True on rank 0 (the process that logs, evaluates for the record and writes files)."""
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        """True when more than one process takes part."""
        return self.world_size > 1


def init_distributed(device: str | None = None) -> DistContext:
    """Join the process group described by ``torchrun``'s environment (``WORLD_SIZE``, ``RANK``, ``LOCAL_RANK``);
    a plain single-process run returns a context of world size 1 without initialising anything.

    >>> init_distributed("cpu").world_size  # doctest: +SKIP
    1
    """
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1 and not dist.is_initialized():
        dev = resolve_device(device)
        backend = "nccl" if dev.type == "cuda" else "gloo"
        if dev.type == "cuda":
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group(backend=backend)
    return current_context(device)


def current_context(device: str | torch.device | None = None) -> DistContext:
    """The :class:`DistContext` of this process (world size 1 unless a process group is initialised)."""
    dev = device if isinstance(device, torch.device) else resolve_device(device)
    if not (dist.is_available() and dist.is_initialized()):
        return DistContext(0, 1, 0, dev)
    local = int(os.environ.get("LOCAL_RANK", dist.get_rank()))
    if dev.type == "cuda":
        dev = torch.device("cuda", local)
    return DistContext(dist.get_rank(), dist.get_world_size(), local, dev)


def wrap_model(model: nn.Module, ctx: DistContext) -> nn.Module:
    """``DistributedDataParallel(model)`` when distributed, else the model itself."""
    if not ctx.distributed:
        return model
    from torch.nn.parallel import DistributedDataParallel

    ids = [ctx.device.index] if ctx.device.type == "cuda" else None
    return DistributedDataParallel(model, device_ids=ids)


def unwrap_model(model: nn.Module) -> nn.Module:
    """The module inside a DDP wrapper (or the model itself)."""
    inner = getattr(model, "module", None)
    return (
        inner if isinstance(inner, nn.Module) and type(model).__name__ == "DistributedDataParallel" else model
    )


def no_sync(model: nn.Module, skip: bool) -> contextlib.AbstractContextManager[None]:
    """Skip the gradient all-reduce (for all but the last micro-batch of a gradient-accumulation step)."""
    if skip and type(model).__name__ == "DistributedDataParallel":
        return model.no_sync()  # type: ignore[operator, no-any-return]
    return contextlib.nullcontext()


def all_reduce_sum(t: torch.Tensor, ctx: DistContext) -> torch.Tensor:
    """Sum ``t`` over all processes (in place; a no-op for one process)."""
    if ctx.distributed:
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


def barrier(ctx: DistContext) -> None:
    """Wait for every process (a no-op for one process)."""
    if ctx.distributed:
        dist.barrier()


@contextlib.contextmanager
def process_group(rank: int, world_size: int, init_file: str, backend: str = "gloo") -> Iterator[DistContext]:
    """Initialise a process group from a shared file (for tests and notebooks that spawn workers themselves)."""
    dist.init_process_group(backend, init_method=f"file://{init_file}", rank=rank, world_size=world_size)
    try:
        yield current_context("cpu" if backend == "gloo" else "cuda")
    finally:
        dist.destroy_process_group()
