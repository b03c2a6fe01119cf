"""What the fused-linear op tests share."""

import torch
from torch.utils._python_dispatch import TorchDispatchMode


def backend_keywords(mode: str) -> dict:
    """The ``fused_linear_turn_kl`` keywords that run ``mode``: ``"triton"``, or the torch
    backend's ``"slab"`` / ``"stream"`` chunk mode."""
    return dict(backend="triton") if mode == "triton" else dict(backend="torch", chunk_mode=mode)


class RecordAllocations(TorchDispatchMode):
    """Inside ``with RecordAllocations() as record:``, ``record.shapes`` lists ``(shape, dtype)`` of
    every tensor an op returns (what a computation allocates, views included)."""

    def __init__(self):
        super().__init__()
        self.shapes = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor):
                self.shapes.append((tuple(t.shape), t.dtype))
        return out


def peak_rss_resettable() -> bool:
    """Whether this Linux lets a process reset its peak-RSS counter (``/proc/self/clear_refs``)."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False
