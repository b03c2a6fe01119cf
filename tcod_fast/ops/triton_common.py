"""What the Triton backends of every op share: the optional ``triton`` import, where the kernels
can run, and ``@triton.jit`` helpers called from more than one kernel.

Kernels run on CUDA tensors, or on CPU tensors under the Triton interpreter
(``TRITON_INTERPRET=1``, which must be set before ``triton`` is first imported).
"""

from __future__ import annotations

import os

import torch

try:
    import triton
    import triton.language as tl

    HAS_TRITON = True
except ImportError:  # pragma: no cover - exercised only where triton is missing
    HAS_TRITON = False


def interpreter_enabled() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def is_available(device: torch.device) -> bool:
    """Whether the Triton kernels can run on ``device``: CUDA, or CPU under the interpreter."""
    if not HAS_TRITON:
        return False
    return device.type == "cuda" or (device.type == "cpu" and interpreter_enabled())


if HAS_TRITON:

    @triton.jit
    def log_mixture(log_p, log_q, log_1m_beta, log_beta):
        """``log m = logaddexp(log p + log(1 - beta), log q + log beta)``, the JSD mixture; never
        evaluates ``-inf - (-inf)``."""
        a = log_p + log_1m_beta
        b = log_q + log_beta
        hi = tl.maximum(a, b)
        lo = tl.minimum(a, b)
        safe_hi = tl.where(hi == float("-inf"), 0.0, hi)
        return hi + tl.log(1.0 + tl.exp(lo - safe_hi))

    @triton.jit
    def store_dropped_row(
        row, div_ptr, ent_ptr, logp_ptr, logq_ptr, g_ptr, g_row, n_cols,
        HAS_TARGET: tl.constexpr, WRITE_GRAD: tl.constexpr, BLOCK_V: tl.constexpr,
    ):
        """A row outside the turn mask: zero divergence, entropy and sampled-token log-probs, and
        (with ``WRITE_GRAD``) zeros over the ``n_cols`` gradient columns at ``g_row``."""
        tl.store(div_ptr + row, 0.0)
        tl.store(ent_ptr + row, 0.0)
        if HAS_TARGET:
            tl.store(logp_ptr + row, 0.0)
            tl.store(logq_ptr + row, 0.0)
        if WRITE_GRAD:
            cols = tl.arange(0, BLOCK_V)
            zeros = tl.zeros([BLOCK_V], dtype=tl.float32)
            for v0 in range(0, n_cols, BLOCK_V):
                offs = v0 + cols
                tl.store(g_row + offs, zeros.to(g_ptr.dtype.element_ty), mask=offs < n_cols)
