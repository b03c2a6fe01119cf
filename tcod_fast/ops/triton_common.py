"""What the Triton backends of every op share: the optional ``triton`` import, where the kernels
can run, small launch-side helpers, and ``@triton.jit`` helpers called from more than one kernel
(Triton inlines them), among them the online-softmax pass of ``fused_turn_kl``'s row kernel and
``fused_linear_turn_kl``'s tiled kernel.

Kernels run on CUDA tensors, or on CPU tensors under the Triton interpreter
(``TRITON_INTERPRET=1``, which must be set before ``triton`` is first imported).
"""

from __future__ import annotations

import math
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


def require_triton() -> None:
    """Raise the error a ``backend="triton"`` call gets where the triton package is missing."""
    if not HAS_TRITON:
        raise RuntimeError("backend='triton' needs the triton package (pip install 'tcod-fast[triton]')")


def mixture_logs(beta: float) -> tuple[float, float]:
    """``(log(1 - beta), log(beta))``, the JSD mixture's log-weights (``-inf`` at ``beta`` 1 and 0)."""
    log_1m_beta = math.log1p(-beta) if beta < 1.0 else float("-inf")
    log_beta = math.log(beta) if beta > 0.0 else float("-inf")
    return log_1m_beta, log_beta


def row_block_v(vocab: int, default: int) -> int:
    """Columns per block of a one-program-per-row kernel: ``default``, or the vocabulary rounded up
    to a power of two (at least 16) when that is smaller."""
    return min(default, triton.next_power_of_2(max(vocab, 16)))


def row_num_warps(block_v: int) -> int:
    """Warps of a one-program-per-row kernel: 8 for blocks of 2048 columns and more, else 4."""
    return 8 if block_v >= 2048 else 4


if HAS_TRITON:

    @triton.jit
    def logaddexp(a, b):
        """``log(exp(a) + exp(b))``; never evaluates ``-inf - (-inf)`` (two ``-inf`` give ``-inf``)."""
        hi = tl.maximum(a, b)
        lo = tl.minimum(a, b)
        safe_hi = tl.where(hi == float("-inf"), 0.0, hi)
        return hi + tl.log(1.0 + tl.exp(lo - safe_hi))

    @triton.jit
    def log_mixture(log_p, log_q, log_1m_beta, log_beta):
        """``log m = logaddexp(log p + log(1 - beta), log q + log beta)``, the JSD mixture."""
        return logaddexp(log_p + log_1m_beta, log_q + log_beta)

    @triton.jit
    def block_argmax(x, AXIS: tl.constexpr):
        """The maxima of ``x`` along ``AXIS`` and where they are (the first; any index in a row with
        a NaN, whose result is NaN anyway)."""
        return tl.max(x, axis=AXIS), tl.argmax(tl.where(x == x, x, float("-inf")), axis=AXIS)

    @triton.jit
    def online_softmax_step(
        xs, xt, block_ms, block_arg, xt_at, m_s, m_t, shift_s, shift_t, centre, arg_s, l_s, l_t, acc_div, acc_ent,
        inv_temp, DIVERGENCE: tl.constexpr, AXIS: tl.constexpr,
    ):
        """One block of the student/teacher online-softmax pass on raw logits
        (docs/maths.md#one-streaming-pass-online-softmax).

        ``xs``, ``xt``: the block's student and teacher logits, float32, ``-inf`` off the vocabulary,
        reduced along ``AXIS`` (0: one row, the row state is scalars; 1: a tile of rows, the row
        state is vectors). ``block_ms``, ``block_arg``: the block's student max and its column index
        (``block_argmax``, the index already global); ``xt_at``: the teacher's logit there.
        The row state, returned updated in the same order: running maxima ``m_s, m_t``; their
        anchors ``shift_s, shift_t`` (the max, 0 while it is -inf, so never -inf - (-inf));
        ``centre`` B, the teacher's logit at the student's argmax ``arg_s``; the sums
        ``l = sum exp((x - shift) / T)``; ``acc_ent = sum es (x_s - shift_s)``; ``acc_div``, reverse
        KL: ``sum es u`` with ``u = (x_s - shift_s) - (x_t - B)``, forward KL:
        ``sum et ((x_t - shift_t) - (x_s - shift_s))``. The temperature only multiplies differences
        from an anchor, so logits far from 0, or 1e14 apart after scaling, keep their precision.
        """
        new_ms = tl.maximum(m_s, block_ms)
        new_mt = tl.maximum(m_t, tl.max(xt, axis=AXIS))
        new_shift_s = tl.where(new_ms == float("-inf"), 0.0, new_ms)
        new_shift_t = tl.where(new_mt == float("-inf"), 0.0, new_mt)
        # a new student argmax in this block: the teacher's logit there is the new centre (any
        # finite centre will do where the teacher is -inf there: the KL is +inf anyway)
        moved_arg = block_ms > m_s
        xt_at = tl.where(tl.abs(xt_at) < float("inf"), xt_at, 0.0)
        new_centre = tl.where(moved_arg, xt_at, centre)
        arg_s = tl.where(moved_arg, block_arg, arg_s)
        moved_s = shift_s - new_shift_s  # <= 0, raw units
        moved_t = shift_t - new_shift_t
        scale_s = tl.exp((m_s - new_shift_s) * inv_temp)  # 0 while the row was all -inf
        scale_t = tl.exp((m_t - new_shift_t) * inv_temp)
        a_s = xs - tl.expand_dims(new_shift_s, AXIS)
        a_t = xt - tl.expand_dims(new_shift_t, AXIS)
        es = tl.exp(a_s * inv_temp)
        et = tl.exp(a_t * inv_temp)
        # moving the anchor adds moved_s to every term of acc_ent so far
        acc_ent = tl.where(scale_s > 0, (acc_ent + moved_s * l_s) * scale_s, 0.0) + tl.sum(
            tl.where(es > 0, es * a_s, 0.0), axis=AXIS
        )
        if DIVERGENCE == 0:
            u = a_s - (xt - tl.expand_dims(new_centre, AXIS))
            acc_div = tl.where(scale_s > 0, (acc_div + l_s * (moved_s - (centre - new_centre))) * scale_s, 0.0)
            acc_div += tl.sum(tl.where(es > 0, es * u, 0.0), axis=AXIS)
        if DIVERGENCE == 1:
            acc_div = acc_div - l_t * moved_s
            acc_div = tl.where(scale_t > 0, (acc_div + l_t * moved_t) * scale_t, 0.0)
            acc_div += tl.sum(tl.where(et > 0, et * (a_t - a_s), 0.0), axis=AXIS)
        l_s = l_s * scale_s + tl.sum(es, axis=AXIS)
        l_t = l_t * scale_t + tl.sum(et, axis=AXIS)
        return new_ms, new_mt, new_shift_s, new_shift_t, new_centre, arg_s, l_s, l_t, acc_div, acc_ent

    @triton.jit
    def online_softmax_finish(l_s, l_t, acc_div, acc_ent, shift_t, centre, inv_temp, DIVERGENCE: tl.constexpr):
        """After the last block of ``online_softmax_step``: ``(log l_s, log l_t, entropy, mean_p(u),
        div)``, where div is reverse or forward KL (``0`` for JSD, which needs ``jsd_block_sums``):
        KL(p||q) = (mean_p(u) + shift_t - B) / T + log l_t - log l_s, exact even for a one-hot p."""
        log_l_s = tl.log(l_s)
        log_l_t = tl.log(l_t)
        entropy = log_l_s - inv_temp * acc_ent / l_s
        mean_u = acc_div / l_s
        div = tl.zeros_like(l_s)
        if DIVERGENCE == 0:
            div = (mean_u + (shift_t - centre)) * inv_temp + (log_l_t - log_l_s)
        if DIVERGENCE == 1:
            div = inv_temp * acc_div / l_t + (log_l_s - log_l_t)
        return log_l_s, log_l_t, entropy, mean_u, div

    @triton.jit
    def jsd_block_sums(
        xs, xt, shift_s, shift_t, log_l_s, log_l_t, inv_temp, log_1m_beta, log_beta, AXIS: tl.constexpr,
    ):
        """One block of the JSD pass, once ``online_softmax_finish`` has the log-normalisers:
        ``(sum p (log p - log m), sum q (log q - log m))`` along ``AXIS`` (see ``online_softmax_step``)."""
        log_p = (xs - tl.expand_dims(shift_s, AXIS)) * inv_temp - tl.expand_dims(log_l_s, AXIS)
        log_q = (xt - tl.expand_dims(shift_t, AXIS)) * inv_temp - tl.expand_dims(log_l_t, AXIS)
        p = tl.exp(log_p)
        q = tl.exp(log_q)
        log_m = log_mixture(log_p, log_q, log_1m_beta, log_beta)
        sum_p = tl.sum(tl.where(p != 0, p * (log_p - log_m), 0.0), axis=AXIS)
        sum_q = tl.sum(tl.where(q != 0, q * (log_q - log_m), 0.0), axis=AXIS)
        return sum_p, sum_q

    @triton.jit
    def logit_transform(x, scale, cap, CODE: tl.constexpr):
        """The logit map of ``tcod_fast.ops.logit_transform`` on float32 ``x``: ``x`` (``CODE`` 0),
        ``scale * x`` (1) or ``cap * tanh(scale * x / cap)`` (2), with ``tanh |u| = (1 - e) / (1 + e)``,
        ``e = exp(-2 |u|)`` (absolute error a few float32 ulps of 1; ``-inf`` gives ``-cap``). Callers
        keep off-vocabulary lanes at ``-inf`` themselves."""
        y = x
        if CODE == 1:
            y = x * scale
        if CODE == 2:
            u = x * (scale / cap)
            e = tl.exp(-2.0 * tl.abs(u))
            t = (1.0 - e) / (1.0 + e)
            y = cap * tl.where(u < 0, -t, t)
        return y

    @triton.jit
    def mapped_logits(x, in_vocab, scale, cap, CODE: tl.constexpr):
        """``logit_transform`` of a block of logits, ``-inf`` where ``in_vocab`` is False (off the
        vocabulary: the map would turn those ``-inf`` into ``-cap``); ``x`` itself for ``CODE`` 0."""
        y = x
        if CODE != 0:
            y = tl.where(in_vocab, logit_transform(x, scale, cap, CODE), float("-inf"))
        return y

    @triton.jit
    def times_logit_transform_grad(g, x, scale, cap, CODE: tl.constexpr):
        """``g * dy/dx`` of ``logit_transform`` at ``x`` (the chain rule to the untransformed logits):
        ``dy/dx = scale * 4 e / (1 + e)^2`` with a soft cap, which keeps its relative precision where
        ``tanh`` saturates."""
        out = g
        if CODE == 1:
            out = g * scale
        if CODE == 2:
            e = tl.exp(-2.0 * tl.abs(x * (scale / cap)))
            out = g * (scale * 4.0 * e / ((1.0 + e) * (1.0 + e)))
        return out

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
