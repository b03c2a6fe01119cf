"""``triton`` backend: one Triton program per token row (CUDA; CPU under ``TRITON_INTERPRET=1``).

Per row (``z = logits / temperature``):

* pass 1 streams the row in ``BLOCK_V`` columns with the online-softmax recurrence: running
  maxima ``m_s, m_t`` of the raw logits, sums ``l_s, l_t``, and the divergence/entropy
  accumulators, all rescaled once per block by ``exp((m_old - m_new) / T)``. The temperature
  only ever multiplies differences from the running max (and reverse KL's log-ratio is centred
  on the student's argmax, see the kernel), so the result is exact at any logit scale and
  temperature. Accumulation is float32 whatever the input dtype.
* pass 2 (JSD only) sums the JSD terms and ``KL(p||m)``, which its gradient needs.
* the last pass writes ``d div / d student_logits`` in the logits' dtype.

Memory traffic per row: student and teacher read twice, gradient written once, i.e.
``5 * V * elem_size`` bytes (docs/performance.md#bytes); nothing ``N x V`` is allocated besides the
gradient. ``BLOCK_V = 4096`` keeps 16 fp32 values per thread per operand at 8 warps; the
interpreter and the tests use small blocks so several blocks and a ragged tail are exercised.
Rows that are not kept skip all work and write zeros.
"""

from __future__ import annotations

import torch

from tcod_fast.ops.common import DIVERGENCE_CODES
# HAS_TRITON, interpreter_enabled and is_available are this backend's API too
from tcod_fast.ops.triton_common import HAS_TRITON, interpreter_enabled, is_available  # noqa: F401

if HAS_TRITON:
    import triton
    import triton.language as tl

    from tcod_fast.ops.triton_common import log_mixture, store_dropped_row

DEFAULT_BLOCK_V = 4096


if HAS_TRITON:

    @triton.jit
    def _turn_kl_row_kernel(
        s_ptr, t_ptr, g_ptr, keep_ptr, target_ptr, scale_ptr,
        div_ptr, ent_ptr, logp_ptr, logq_ptr,
        rows_t, s_sb, s_st, t_sb, t_st, g_sb, g_st,
        vocab, grad_cols, inv_temp, beta, log_1m_beta, log_beta,
        DIVERGENCE: tl.constexpr, HAS_TARGET: tl.constexpr, WRITE_GRAD: tl.constexpr,
        HAS_SCALE: tl.constexpr, BLOCK_V: tl.constexpr,
    ):
        row = tl.program_id(0).to(tl.int64)
        b = row // rows_t
        t = row % rows_t
        s_row = s_ptr + b * s_sb + t * s_st
        t_row = t_ptr + b * t_sb + t * t_st
        g_row = g_ptr + b * g_sb + t * g_st
        cols = tl.arange(0, BLOCK_V)
        keep = tl.load(keep_ptr + row)

        if keep != 0:
            # Raw logits x throughout, taken relative to the running maxima (the anchors) before
            # the temperature scales them, (x - m) / T: logits far from 0, or 1e14 apart after
            # scaling, keep their absolute precision. Reverse KL centres its log-ratio on B, the
            # teacher's logit at the student's argmax a: u = (x_s - m_s) - (x_t - B), u_a = 0, so
            # KL = (mean_p(u) + m_t - B) / T + log l_t - log l_s and the gradient
            # p (u - mean_p(u)) / T^2 are exact even for a one-hot softmax.
            m_s = float("-inf")
            m_t = float("-inf")
            shift_s = 0.0  # anchors: the running max, 0 while it is -inf (never -inf - (-inf))
            shift_t = 0.0
            centre = 0.0  # B
            arg_s = tl.full((), 0, tl.int64)  # int64 whatever the type of vocab (loop-carried)
            l_s = 0.0
            l_t = 0.0
            acc_div = 0.0  # reverse: sum es u; forward: sum et ((x_t - m_t) - (x_s - m_s))
            acc_ent = 0.0  # sum es (x_s - shift_s)
            for v0 in range(0, vocab, BLOCK_V):
                offs = v0 + cols
                in_vocab = offs < vocab
                xs = tl.load(s_row + offs, mask=in_vocab, other=float("-inf")).to(tl.float32)
                xt = tl.load(t_row + offs, mask=in_vocab, other=float("-inf")).to(tl.float32)
                block_ms = tl.max(xs, axis=0)
                new_ms = tl.maximum(m_s, block_ms)
                new_mt = tl.maximum(m_t, tl.max(xt, axis=0))
                new_shift_s = tl.where(new_ms == float("-inf"), 0.0, new_ms)
                new_shift_t = tl.where(new_mt == float("-inf"), 0.0, new_mt)
                # a new student argmax in this block: the teacher's logit there is the new centre
                moved_arg = block_ms > m_s
                block_arg = v0 + tl.argmax(tl.where(xs == xs, xs, float("-inf")), axis=0)  # NaN: any index
                xt_at = tl.load(t_row + block_arg, mask=block_arg < vocab, other=0.0).to(tl.float32)
                # teacher -inf at a: the KL is +inf anyway; any finite centre will do
                xt_at = tl.where(tl.abs(xt_at) < float("inf"), xt_at, 0.0)
                new_centre = tl.where(moved_arg, xt_at, centre)
                arg_s = tl.where(moved_arg, block_arg, arg_s)
                moved_s = shift_s - new_shift_s  # <= 0, raw units
                moved_t = shift_t - new_shift_t
                scale_s = tl.exp((m_s - new_shift_s) * inv_temp)  # 0 while the row was all -inf
                scale_t = tl.exp((m_t - new_shift_t) * inv_temp)
                es = tl.exp((xs - new_shift_s) * inv_temp)
                et = tl.exp((xt - new_shift_t) * inv_temp)
                # moving the anchor adds moved_s to every term of acc_ent so far
                acc_ent = tl.where(scale_s > 0, (acc_ent + moved_s * l_s) * scale_s, 0.0) + tl.sum(
                    tl.where(es > 0, es * (xs - new_shift_s), 0.0), axis=0
                )
                if DIVERGENCE == 0:
                    u = (xs - new_shift_s) - (xt - new_centre)
                    acc_div = tl.where(scale_s > 0, (acc_div + l_s * (moved_s - (centre - new_centre))) * scale_s, 0.0)
                    acc_div += tl.sum(tl.where(es > 0, es * u, 0.0), axis=0)
                if DIVERGENCE == 1:
                    acc_div = acc_div - l_t * moved_s
                    acc_div = tl.where(scale_t > 0, (acc_div + l_t * moved_t) * scale_t, 0.0)
                    acc_div += tl.sum(tl.where(et > 0, et * ((xt - new_shift_t) - (xs - new_shift_s)), 0.0), axis=0)
                l_s = l_s * scale_s + tl.sum(es, axis=0)
                l_t = l_t * scale_t + tl.sum(et, axis=0)
                m_s = new_ms
                m_t = new_mt
                shift_s = new_shift_s
                shift_t = new_shift_t
                centre = new_centre

            log_l_s = tl.log(l_s)
            log_l_t = tl.log(l_t)
            entropy = log_l_s - inv_temp * acc_ent / l_s
            div = 0.0
            kl_p_m = 0.0
            mean_u = acc_div / l_s
            if DIVERGENCE == 0:
                div = (mean_u + (shift_t - centre)) * inv_temp + (log_l_t - log_l_s)
            if DIVERGENCE == 1:
                div = inv_temp * acc_div / l_t + (log_l_s - log_l_t)
            if DIVERGENCE == 2:
                sum_p = 0.0
                sum_q = 0.0
                for v0 in range(0, vocab, BLOCK_V):
                    offs = v0 + cols
                    in_vocab = offs < vocab
                    xs = tl.load(s_row + offs, mask=in_vocab, other=float("-inf")).to(tl.float32)
                    xt = tl.load(t_row + offs, mask=in_vocab, other=float("-inf")).to(tl.float32)
                    log_p = (xs - shift_s) * inv_temp - log_l_s
                    log_q = (xt - shift_t) * inv_temp - log_l_t
                    p = tl.exp(log_p)
                    q = tl.exp(log_q)
                    log_m = log_mixture(log_p, log_q, log_1m_beta, log_beta)
                    sum_p += tl.sum(tl.where(p != 0, p * (log_p - log_m), 0.0), axis=0)
                    sum_q += tl.sum(tl.where(q != 0, q * (log_q - log_m), 0.0), axis=0)
                kl_p_m = sum_p
                div = beta * sum_q + (1.0 - beta) * sum_p
            tl.store(div_ptr + row, div)
            tl.store(ent_ptr + row, entropy)
            if HAS_TARGET:
                tgt = tl.load(target_ptr + row)
                tl.store(logp_ptr + row, (tl.load(s_row + tgt).to(tl.float32) - shift_s) * inv_temp - log_l_s)
                tl.store(logq_ptr + row, (tl.load(t_row + tgt).to(tl.float32) - shift_t) * inv_temp - log_l_t)

            if WRITE_GRAD:
                # d/dx = (1/temperature) d/dz, times the caller's per-row scale
                grad_factor = inv_temp
                if HAS_SCALE:
                    grad_factor = inv_temp * tl.load(scale_ptr + row)
                row_is_nan = div != div  # a NaN logit in the row: a NaN gradient row (autograd's answer)
                sum_g = 0.0  # forward KL and JSD: see the argmax fix below
                g_at_arg = 0.0
                for v0 in range(0, grad_cols, BLOCK_V):
                    offs = v0 + cols
                    in_vocab = offs < vocab
                    xs = tl.load(s_row + offs, mask=in_vocab, other=float("-inf")).to(tl.float32)
                    xt = tl.load(t_row + offs, mask=in_vocab, other=float("-inf")).to(tl.float32)
                    log_p = (xs - shift_s) * inv_temp - log_l_s
                    p = tl.exp(log_p)
                    if DIVERGENCE == 0:
                        u = (xs - shift_s) - (xt - centre)
                        g = tl.where(p > 0, p * ((u - mean_u) * inv_temp) * grad_factor, 0.0)
                    elif DIVERGENCE == 1:
                        g = (p - tl.exp((xt - shift_t) * inv_temp - log_l_t)) * grad_factor
                    else:
                        log_q = (xt - shift_t) * inv_temp - log_l_t
                        log_m = log_mixture(log_p, log_q, log_1m_beta, log_beta)
                        g = tl.where(p > 0, (1.0 - beta) * p * (log_p - log_m - kl_p_m) * grad_factor, 0.0)
                    g = tl.where(row_is_nan, float("nan"), g)
                    g = tl.where(in_vocab, g, 0.0)
                    sum_g += tl.sum(g, axis=0)
                    g_at_arg += tl.sum(tl.where(offs == arg_s, g, 0.0), axis=0)
                    tl.store(g_row + offs, g.to(g_ptr.dtype.element_ty), mask=offs < grad_cols)
                if DIVERGENCE != 0:
                    # p - q and p (log p - log m - KL(p||m)) cancel at the student's argmax a when
                    # p_a ~ 1; every row gradient sums to 0, so -sum_{v != a} g_v is then the
                    # accurate g_a (used when p_a = 1 / l_s > 1/2)
                    others = sum_g - g_at_arg
                    if (l_s < 2.0) & (tl.abs(others) < float("inf")):
                        tl.debug_barrier()  # the block stores above are visible before this one
                        tl.store(g_row + arg_s, (-others).to(g_ptr.dtype.element_ty))
        else:
            store_dropped_row(
                row, div_ptr, ent_ptr, logp_ptr, logq_ptr, g_ptr, g_row, grad_cols, HAS_TARGET, WRITE_GRAD, BLOCK_V
            )


    @triton.jit
    def _scale_rows_kernel(g_ptr, factor_ptr, rows_t, g_sb, g_st, cols, BLOCK_V: tl.constexpr):
        """grad[b, t, block] *= factor[b, t]; rows whose factor is exactly 1 cost one load."""
        row = tl.program_id(0).to(tl.int64)
        factor = tl.load(factor_ptr + row)
        if factor != 1.0:
            g_row = g_ptr + (row // rows_t) * g_sb + (row % rows_t) * g_st
            offs = tl.program_id(1) * BLOCK_V + tl.arange(0, BLOCK_V)
            in_row = offs < cols
            g = tl.load(g_row + offs, mask=in_row, other=0.0).to(tl.float32)
            tl.store(g_row + offs, (g * factor).to(g_ptr.dtype.element_ty), mask=in_row)


def forward(
    student, teacher, keep, target_ids, divergence, beta, temperature, vocab_size, grad, grad_scale=None, block_v=None
):
    """See ``torch_backend`` for the contract."""
    if not HAS_TRITON:
        raise RuntimeError("backend='triton' needs the triton package (pip install 'tcod-fast[triton]')")
    import math

    B, T = keep.shape
    device = student.device
    outs = [torch.empty(B, T, dtype=torch.float32, device=device) for _ in range(4)]
    if block_v is None:
        block_v = min(DEFAULT_BLOCK_V, triton.next_power_of_2(max(vocab_size, 16)))
    target = target_ids if target_ids is not None else keep  # dummy pointer when unused
    has_scale = grad_scale is not None and grad is not None
    scale = grad_scale.to(torch.float32).contiguous() if has_scale else outs[0]  # dummy when unused
    g = grad if grad is not None else student
    g_sb, g_st, grad_cols = (grad.stride(0), grad.stride(1), grad.shape[-1]) if grad is not None else (0, 0, 0)
    log_1m_beta = math.log1p(-beta) if beta < 1.0 else float("-inf")
    log_beta = math.log(beta) if beta > 0.0 else float("-inf")
    if B * T > 0:
        _turn_kl_row_kernel[(B * T,)](
            student, teacher, g, keep, target, scale, *outs,
            T, student.stride(0), student.stride(1), teacher.stride(0), teacher.stride(1), g_sb, g_st,
            vocab_size, grad_cols, 1.0 / temperature, float(beta), log_1m_beta, log_beta,
            DIVERGENCE=DIVERGENCE_CODES[divergence], HAS_TARGET=target_ids is not None,
            WRITE_GRAD=grad is not None, HAS_SCALE=has_scale, BLOCK_V=block_v,
            num_warps=8 if block_v >= 2048 else 4,
        )
    return tuple(outs)


def scale_rows_(grad: torch.Tensor, factor: torch.Tensor, block_v: int | None = None) -> None:
    """``grad[b, t, :] *= factor[b, t]`` in place; rows whose factor is exactly 1 are not touched.

    grad ``(B, T, V)`` with a contiguous last dim (any row strides); factor ``(B, T)``.
    """
    B, T, V = grad.shape
    if B * T == 0 or V == 0:
        return
    if block_v is None:
        block_v = min(DEFAULT_BLOCK_V, triton.next_power_of_2(max(V, 16)))
    factor = factor.to(torch.float32).contiguous()
    grid = (B * T, triton.cdiv(V, block_v))
    _scale_rows_kernel[grid](grad, factor, T, grad.stride(0), grad.stride(1), V, BLOCK_V=block_v)
