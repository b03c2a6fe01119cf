"""Data parallelism with PyTorch's own stack: ``torchrun`` + ``torch.distributed``.

Run the same trainer under ``torchrun --nproc_per_node=N -m tcod_fast.cli train ...``: each
process plays its share of the step's episodes (whole GRPO groups), computes its loss
normalised by the *global* token count, and the gradients are summed across processes
before the optimiser step, so every process takes the identical step (the math of DDP).

Why an explicit all-reduce instead of wrapping the student in ``DistributedDataParallel``:
micro-batches are cut by a token budget, so processes may run different numbers of
forward/backward passes per step; DDP's per-backward hooks would then wait forever. One
flat all-reduce per optimiser step after accumulation has no such constraint. CPU runs use
the ``gloo`` backend, GPU runs ``nccl``.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

__all__ = [
    "DistContext",
    "all_reduce_gradients",
    "all_reduce_sum",
    "broadcast_parameters",
    "close_distributed",
    "init_distributed",
]


@dataclass
class DistContext:
    """This process's place in the run. ``world_size == 1`` means not distributed."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    #: the process group was created by :func:`init_distributed` (so :func:`close_distributed`
    #: destroys it); a group the caller created is the caller's to destroy
    owns_process_group: bool = False

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    def barrier(self) -> None:
        if self.enabled:
            dist.barrier()


def init_distributed(device_type: str = "cpu") -> DistContext:
    """Join the process group ``torchrun`` describes (``WORLD_SIZE`` > 1), else run alone."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size <= 1:
        return DistContext()
    owns = not dist.is_initialized()
    if owns:
        backend = "nccl" if device_type == "cuda" else "gloo"
        dist.init_process_group(backend=backend)
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if device_type == "cuda":
        torch.cuda.set_device(local_rank)
    return DistContext(
        rank=dist.get_rank(), world_size=dist.get_world_size(), local_rank=local_rank, owns_process_group=owns
    )


def close_distributed(context: DistContext, *, finished: bool) -> None:
    """Destroy the process group :func:`init_distributed` created, on every way out of a run.

    A process that ends with its group alive leaves the group's C++ threads (gloo's I/O loop,
    the store's client) running while the interpreter tears down, which aborts it ("terminate
    called without an active exception", SIGABRT) when they are still joinable. ``finished``:
    the run ended normally on every process, so they first wait for each other (no process
    leaves while another still talks to it); after an error or an interrupt nothing waits,
    since the other processes may be gone."""
    if not (context.owns_process_group and dist.is_initialized()):
        return
    try:
        if finished:
            dist.barrier()
    finally:
        dist.destroy_process_group()


def all_reduce_sum(values: torch.Tensor, context: DistContext) -> torch.Tensor:
    """Sum of ``values`` over processes (a copy; ``values`` itself is unchanged)."""
    out = values.clone()
    if context.enabled:
        dist.all_reduce(out, op=dist.ReduceOp.SUM)
    return out


def all_reduce_gradients(model: torch.nn.Module, context: DistContext) -> None:
    """Sum every parameter's gradient over processes, in one flat buffer.

    The losses are already divided by the global token count, so the sum (not the mean)
    is the gradient of the global loss. Parameters without a gradient on some process
    contribute zeros, so every process reduces the same buffer layout.
    """
    if not context.enabled:
        return
    params = [p for p in model.parameters() if p.requires_grad]
    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
    flat = torch.cat([g.reshape(-1).to(torch.float32) for g in grads])
    dist.all_reduce(flat, op=dist.ReduceOp.SUM)
    offset = 0
    for param in params:
        count = param.numel()
        reduced = flat[offset : offset + count].view_as(param).to(param.dtype)
        if param.grad is None:
            param.grad = reduced.clone()
        else:
            param.grad.copy_(reduced)
        offset += count


def broadcast_parameters(model: torch.nn.Module, context: DistContext) -> None:
    """Make every process start from rank 0's weights."""
    if not context.enabled:
        return
    with torch.no_grad():
        for tensor in list(model.parameters()) + list(model.buffers()):
            dist.broadcast(tensor.data, src=0)
