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

Soft-capped and scaled logits: each block goes through its side's logit map as it is loaded
(``TF_S``/``TF_T`` constexprs, compiled in only when asked); the last pass multiplies the gradient
by the student map's derivative at the raw block (the argmax fix's sums are taken before).

Memory traffic per row: student and teacher read twice, gradient written once, i.e.
``5 * V * elem_size`` bytes (docs/performance.md#bytes); nothing ``N x V`` is allocated besides the
gradient. ``BLOCK_V = 4096`` keeps 16 fp32 values per thread per operand at 8 warps; the
interpreter and the tests use small blocks so several blocks and a ragged tail are exercised.
Rows that are not kept skip all work and write zeros.
"""

from __future__ import annotations

import torch

from tcod_fast.ops.common import DIVERGENCE_CODES
from tcod_fast.ops.logit_transform import IDENTITY

# whether triton imports and where the kernels run: this backend's API too
from tcod_fast.ops.triton_common import HAS_TRITON as HAS_TRITON
from tcod_fast.ops.triton_common import interpreter_enabled as interpreter_enabled
from tcod_fast.ops.triton_common import is_available as is_available
from tcod_fast.ops.triton_common import mixture_logs, require_triton, row_block_v, row_num_warps

if HAS_TRITON:
    import triton
    import triton.language as tl

    from tcod_fast.ops.triton_common import (
        block_argmax,
        jsd_block_sums,
        log_mixture,
        logit_transform,
        mapped_logits,
        online_softmax_finish,
        online_softmax_step,
        store_dropped_row,
        times_logit_transform_grad,
    )

DEFAULT_BLOCK_V = 4096


if HAS_TRITON:

    @triton.jit
    def _load_block(s_row, t_row, offs, in_vocab, s_scale, s_cap, t_scale, t_cap, TF_S: tl.constexpr,
                    TF_T: tl.constexpr):
        """The student's and the teacher's logits at ``offs`` as float32, after their logit maps
        (``TF_S``, ``TF_T``: ``LogitTransform.code``), -inf off the vocabulary."""
        xs = tl.load(s_row + offs, mask=in_vocab, other=float("-inf")).to(tl.float32)
        xt = tl.load(t_row + offs, mask=in_vocab, other=float("-inf")).to(tl.float32)
        return mapped_logits(xs, in_vocab, s_scale, s_cap, TF_S), mapped_logits(xt, in_vocab, t_scale, t_cap, TF_T)

    @triton.jit
    def _turn_kl_row_kernel(
        s_ptr, t_ptr, g_ptr, keep_ptr, target_ptr, scale_ptr,
        div_ptr, ent_ptr, logp_ptr, logq_ptr,
        rows_t, s_sb, s_st, t_sb, t_st, g_sb, g_st,
        vocab, grad_cols, inv_temp, beta, log_1m_beta, log_beta, s_scale, s_cap, t_scale, t_cap,
        DIVERGENCE: tl.constexpr, HAS_TARGET: tl.constexpr, WRITE_GRAD: tl.constexpr,
        HAS_SCALE: tl.constexpr, BLOCK_V: tl.constexpr, TF_S: tl.constexpr, TF_T: tl.constexpr,
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
            # the temperature scales them, (x - m) / T, and reverse KL's log-ratio centred on the
            # teacher's logit at the student's argmax: see online_softmax_step.
            m_s = float("-inf")
            m_t = float("-inf")
            shift_s = 0.0
            shift_t = 0.0
            centre = 0.0
            arg_s = tl.full((), 0, tl.int64)  # int64 whatever the type of vocab (loop-carried)
            l_s = 0.0
            l_t = 0.0
            acc_div = 0.0
            acc_ent = 0.0
            for v0 in range(0, vocab, BLOCK_V):
                offs = v0 + cols
                xs, xt = _load_block(s_row, t_row, offs, offs < vocab, s_scale, s_cap, t_scale, t_cap, TF_S, TF_T)
                block_ms, block_arg = block_argmax(xs, 0)
                block_arg += v0
                xt_at = tl.load(t_row + block_arg, mask=block_arg < vocab, other=0.0).to(tl.float32)
                xt_at = logit_transform(xt_at, t_scale, t_cap, TF_T)
                m_s, m_t, shift_s, shift_t, centre, arg_s, l_s, l_t, acc_div, acc_ent = online_softmax_step(
                    xs, xt, block_ms, block_arg, xt_at, m_s, m_t, shift_s, shift_t, centre, arg_s, l_s, l_t,
                    acc_div, acc_ent, inv_temp, DIVERGENCE, 0,
                )

            log_l_s, log_l_t, entropy, mean_u, div = online_softmax_finish(
                l_s, l_t, acc_div, acc_ent, shift_t, centre, inv_temp, DIVERGENCE
            )
            kl_p_m = 0.0
            if DIVERGENCE == 2:
                sum_p = 0.0
                sum_q = 0.0
                for v0 in range(0, vocab, BLOCK_V):
                    offs = v0 + cols
                    xs, xt = _load_block(s_row, t_row, offs, offs < vocab, s_scale, s_cap, t_scale, t_cap, TF_S,
                                         TF_T)
                    block_p, block_q = jsd_block_sums(
                        xs, xt, shift_s, shift_t, log_l_s, log_l_t, inv_temp, log_1m_beta, log_beta, 0
                    )
                    sum_p += block_p
                    sum_q += block_q
                kl_p_m = sum_p
                div = beta * sum_q + (1.0 - beta) * sum_p
            tl.store(div_ptr + row, div)
            tl.store(ent_ptr + row, entropy)
            if HAS_TARGET:
                tgt = tl.load(target_ptr + row)
                xs_tgt = logit_transform(tl.load(s_row + tgt).to(tl.float32), s_scale, s_cap, TF_S)
                xt_tgt = logit_transform(tl.load(t_row + tgt).to(tl.float32), t_scale, t_cap, TF_T)
                tl.store(logp_ptr + row, (xs_tgt - shift_s) * inv_temp - log_l_s)
                tl.store(logq_ptr + row, (xt_tgt - shift_t) * inv_temp - log_l_t)

            if WRITE_GRAD:
                # d/dx = (1/temperature) d/dz, times the caller's per-row scale
                grad_factor = inv_temp
                if HAS_SCALE:
                    grad_factor = inv_temp * tl.load(scale_ptr + row)
                row_is_nan = div != div  # a NaN logit in the row: a NaN gradient row (autograd's answer)
                sum_g = 0.0  # forward KL and JSD: see the argmax fix below
                g_at_arg = 0.0
                raw_at_arg = 0.0  # the untransformed student logit there (TF_S: its chain rule)
                for v0 in range(0, grad_cols, BLOCK_V):
                    offs = v0 + cols
                    in_vocab = offs < vocab
                    # the raw student block is kept for the chain rule through its map (read before
                    # this block's gradient is stored: the gradient may overwrite the logits)
                    xs_raw, xt = _load_block(s_row, t_row, offs, in_vocab, s_scale, s_cap, t_scale, t_cap, 0, TF_T)
                    xs = mapped_logits(xs_raw, in_vocab, s_scale, s_cap, TF_S)
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
                    if TF_S != 0:
                        raw_at_arg += tl.sum(tl.where(offs == arg_s, xs_raw, 0.0), axis=0)
                        g = times_logit_transform_grad(g, xs_raw, s_scale, s_cap, TF_S)
                    tl.store(g_row + offs, g.to(g_ptr.dtype.element_ty), mask=offs < grad_cols)
                if DIVERGENCE != 0:
                    # p - q and p (log p - log m - KL(p||m)) cancel at the student's argmax a when
                    # p_a ~ 1; every row gradient sums to 0, so -sum_{v != a} g_v is then the
                    # accurate g_a (used when p_a = 1 / l_s > 1/2); the sums are w.r.t. the mapped
                    # logits, the stored value goes through the map's derivative at a
                    others = sum_g - g_at_arg
                    if (l_s < 2.0) & (tl.abs(others) < float("inf")):
                        fixed = times_logit_transform_grad(-others, raw_at_arg, s_scale, s_cap, TF_S)
                        tl.debug_barrier()  # the block stores above are visible before this one
                        tl.store(g_row + arg_s, fixed.to(g_ptr.dtype.element_ty))
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
    student, teacher, keep, target_ids, divergence, beta, temperature, vocab_size, grad, grad_scale=None, block_v=None,
    student_transform=IDENTITY, teacher_transform=IDENTITY,
):
    """See ``torch_backend`` for the contract (the logit maps are applied in the kernel, as the
    logits are read)."""
    require_triton()
    B, T = keep.shape
    device = student.device
    outs = [torch.empty(B, T, dtype=torch.float32, device=device) for _ in range(4)]
    if block_v is None:
        block_v = row_block_v(vocab_size, DEFAULT_BLOCK_V)
    target = target_ids if target_ids is not None else keep  # dummy pointer when unused
    has_scale = grad_scale is not None and grad is not None
    scale = grad_scale.to(torch.float32).contiguous() if has_scale else outs[0]  # dummy when unused
    g = grad if grad is not None else student
    g_sb, g_st, grad_cols = (grad.stride(0), grad.stride(1), grad.shape[-1]) if grad is not None else (0, 0, 0)
    log_1m_beta, log_beta = mixture_logs(beta)
    if B * T > 0:
        _turn_kl_row_kernel[(B * T,)](
            student, teacher, g, keep, target, scale, *outs,
            T, student.stride(0), student.stride(1), teacher.stride(0), teacher.stride(1), g_sb, g_st,
            vocab_size, grad_cols, 1.0 / temperature, float(beta), log_1m_beta, log_beta,
            *student_transform.as_floats(), *teacher_transform.as_floats(),
            DIVERGENCE=DIVERGENCE_CODES[divergence], HAS_TARGET=target_ids is not None,
            WRITE_GRAD=grad is not None, HAS_SCALE=has_scale, BLOCK_V=block_v,
            TF_S=student_transform.code, TF_T=teacher_transform.code,
            num_warps=row_num_warps(block_v),
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
        block_v = row_block_v(V, DEFAULT_BLOCK_V)
    factor = factor.to(torch.float32).contiguous()
    grid = (B * T, triton.cdiv(V, block_v))
    _scale_rows_kernel[grid](grad, factor, T, grad.stride(0), grad.stride(1), V, BLOCK_V=block_v)
