"""Where the ops' ``N x V`` gradient lives on CPU: one buffer kept between calls, in huge pages.

``fused_turn_kl`` and ``fused_topk_turn_kl`` write the gradient of the student logits during
the forward pass, into a tensor as large as the logits (311 MB at N=512, V=151936 fp32). PyTorch
has no caching allocator on CPU: under glibc's defaults a tensor that size gets new pages from
the kernel, and the first write to each 4 KiB page is a page fault plus the zeroing of the page.
On a Zen 4 VM that costs about 70 ms for 311 MB, twice the kernel itself. Two remedies, both
CPU only and both from ``GRADIENT_BUFFER_MIN_BYTES`` on:

* **Reuse.** The last large gradient's storage is kept. The next call of the same or a smaller
  size writes into it again, if nothing else holds it any more: not the user (a leaf's
  ``.grad``), not an autograd graph awaiting backward, not a view. The check is the storage's
  reference count, so a gradient still in use is never overwritten; the call then allocates
  anew. A training loop that drops its gradients between steps (``zero_grad(set_to_none=True)``,
  or logits that are not leaves) pays the page faults once. The cost: one gradient's memory
  stays allocated between calls (:func:`release_gradient_buffer` frees it;
  ``TCOD_FAST_REUSE_GRADIENT=0`` turns reuse off).
* **Huge pages.** A new gradient's whole 2 MiB pages are marked ``MADV_HUGEPAGE`` where Linux
  gives transparent huge pages on request (mode ``madvise``), so they fault in 2 MiB at a time
  (on that VM the first write of 311 MB then costs 20-50 ms more than a warm one instead of
  about 70 ms). The mark is a hint; where the kernel ignores it nothing changes.
"""

from __future__ import annotations

import ctypes
import functools
import os
import threading
from pathlib import Path

import torch

__all__ = [
    "GRADIENT_BUFFER_MIN_BYTES",
    "empty_gradient",
    "new_gradient",
    "release_gradient_buffer",
    "reuse_enabled",
    "transparent_huge_page_mode",
]

HUGE_PAGE_BYTES = 2 << 20
# Smaller gradients come from glibc's heap, mixed with other allocations, and cost little to fault in.
GRADIENT_BUFFER_MIN_BYTES = 32 << 20
REUSE_ENV = "TCOD_FAST_REUSE_GRADIENT"
_MADV_HUGEPAGE = 14  # <sys/mman.h>, Linux


def transparent_huge_page_mode() -> str | None:
    """The kernel's transparent huge page modes, the current one bracketed (``always [madvise]
    never``); None where there is no such file (not Linux)."""
    try:
        return Path("/sys/kernel/mm/transparent_hugepage/enabled").read_text().strip()
    except OSError:
        return None


def reuse_enabled() -> bool:
    """Whether large CPU gradients go to the kept buffer (``TCOD_FAST_REUSE_GRADIENT`` is not ``0``)."""
    return os.environ.get(REUSE_ENV, "1") != "0"


@functools.lru_cache(maxsize=None)
def _madvise():
    """libc's ``madvise`` when Linux gives transparent huge pages on request (THP mode ``madvise``),
    else None (mode ``always`` gives them unasked, ``never`` not at all; or not Linux)."""
    if "[madvise]" not in (transparent_huge_page_mode() or ""):
        return None
    try:
        madvise = ctypes.CDLL(None, use_errno=True).madvise
    except (OSError, AttributeError):
        return None
    madvise.argtypes, madvise.restype = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int], ctypes.c_int
    return madvise


def _large_cpu(like: torch.Tensor) -> bool:
    return like.device.type == "cpu" and like.numel() * like.element_size() >= GRADIENT_BUFFER_MIN_BYTES


def new_gradient(like: torch.Tensor) -> torch.Tensor:
    """A new ``torch.empty`` of ``like``'s shape, dtype and device; from ``GRADIENT_BUFFER_MIN_BYTES``
    on CPU, its whole 2 MiB pages marked for transparent huge pages (a hint)."""
    grad = torch.empty(like.shape, dtype=like.dtype, device=like.device)
    if _large_cpu(like) and (madvise := _madvise()) is not None:
        nbytes = grad.numel() * grad.element_size()
        start = -(-grad.data_ptr() // HUGE_PAGE_BYTES) * HUGE_PAGE_BYTES
        end = (grad.data_ptr() + nbytes) // HUGE_PAGE_BYTES * HUGE_PAGE_BYTES
        if end > start:
            madvise(start, end - start, _MADV_HUGEPAGE)
    return grad


class _KeptBuffer:
    """The storage of the last large CPU gradient, handed out again once nothing else holds it."""

    def __init__(self) -> None:
        self._storage: torch.UntypedStorage | None = None
        self._lock = threading.Lock()

    def take(self, like: torch.Tensor) -> torch.Tensor:
        nbytes = like.numel() * like.element_size()
        with self._lock:
            kept = self._storage
            # one reference: this object's; any other (a tensor, a view, a saved graph) means in use
            if kept is not None and kept.nbytes() >= nbytes and torch._C._storage_Use_Count(kept._cdata) == 1:
                return torch.empty(0, dtype=like.dtype).set_(kept, 0, like.shape)
            grad = new_gradient(like)
            self._storage = grad.untyped_storage()
            return grad

    def release(self) -> None:
        with self._lock:
            self._storage = None


_KEPT = _KeptBuffer()


def empty_gradient(like: torch.Tensor) -> torch.Tensor:
    """An uninitialised tensor of ``like``'s shape, dtype and device (contiguous) for an op to write
    its gradient into: on CPU from ``GRADIENT_BUFFER_MIN_BYTES``, the kept buffer when nothing else
    holds it, else :func:`new_gradient` (which becomes the kept buffer)."""
    if not _large_cpu(like) or not reuse_enabled():
        return new_gradient(like)
    return _KEPT.take(like)


def release_gradient_buffer() -> None:
    """Free the kept gradient buffer (once nothing else holds it); the next large call allocates anew."""
    _KEPT.release()
