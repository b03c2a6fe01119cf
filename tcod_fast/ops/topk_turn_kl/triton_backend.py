"""``triton`` backend of ``fused_topk_turn_kl``: one program per token row (CUDA; CPU under
``TRITON_INTERPRET=1``).

Per row (raw student logits x, ``z = x / temperature``, S the row's valid top-k ids, sorted):

* gather: the ``BLOCK_K >= K`` top-k logits and teacher log-probs (one vector each).
* pass 1 (``tail="bucket"``, or when statistics need the full normaliser): streams the row in
  ``BLOCK_V`` columns with the online-softmax recurrence over the complement of S: running max
  ``m`` of the raw logits, ``l = sum exp((x - m) / T)`` and the entropy sum, rescaled once per
  block. The columns of S inside a block are found by walking a pointer along the sorted ids
  (``K + blocks`` scalar steps per row, not ``K x V`` comparisons) and masked to ``-inf``, so the
  tail mass is a sum over the complement itself, never ``1 - sum``. The temperature multiplies
  only differences from a maximum, so logits far from 0 keep their absolute precision.
* row: ``L``, the outcome log-probabilities, the divergence and its gradient coefficients, in
  float64 (scalars and one ``BLOCK_K`` vector: the coefficients are differences of nearby logs).
* last pass: writes ``grad_scale * d div / d x`` in the logits' dtype; every complement column
  is ``exp((x - m) / T)`` times one row factor; the S columns are skipped by the block stores
  (same pointer walk) and written by one scatter, so no two stores touch the same address.

Soft-capped and scaled student logits: the gather, the target and every block go through the
map as they are loaded (``TF_S`` constexpr, compiled in only when asked); both gradient stores
multiply by its derivative at the raw logits.

Memory traffic per row: the logits read twice, the gradient written once, i.e. ``3 V e`` bytes
(the "student read twice, gradient written once" floor); nothing ``N x V`` is allocated besides
the gradient. ``BLOCK_V = 4096`` with 8 warps as in ``fused_turn_kl``; the tests use small blocks
so that small vocabularies span several blocks and a ragged tail.

Status: verified under the Triton interpreter and compiled for sm_90 in the tests; not yet run
or timed on a GPU.
"""

from __future__ import annotations

import torch

from tcod_fast.ops.common import DIVERGENCE_CODES
from tcod_fast.ops.logit_transform import IDENTITY
from tcod_fast.ops.topk import PAD_ID

# whether triton imports and where the kernels run: this backend's API too
from tcod_fast.ops.triton_common import HAS_TRITON as HAS_TRITON
from tcod_fast.ops.triton_common import interpreter_enabled as interpreter_enabled
from tcod_fast.ops.triton_common import is_available as is_available
from tcod_fast.ops.triton_common import mixture_logs, require_triton, row_block_v, row_num_warps

if HAS_TRITON:
    import triton
    import triton.language as tl

    from tcod_fast.ops.triton_common import (
        logaddexp,
        logit_transform,
        mapped_logits,
        store_dropped_row,
        times_logit_transform_grad,
    )

DEFAULT_BLOCK_V = 4096


if HAS_TRITON:

    @triton.jit
    def _topk_mask(ids_row, K, ptr, offs, v_end, PAD: tl.constexpr):
        """Columns of ``offs`` that are top-k ids below ``v_end``, walking the sorted ids from ``ptr``.

        Returns ``(mask, ptr)`` with ``ptr`` at the first id >= ``v_end``."""
        in_topk = offs < 0
        nxt = tl.load(ids_row + ptr, mask=ptr < K, other=PAD)
        while nxt < v_end:
            in_topk = in_topk | (offs == nxt)
            ptr += 1
            nxt = tl.load(ids_row + ptr, mask=ptr < K, other=PAD)
        return in_topk, ptr

    @triton.jit
    def _topk_row_kernel(
        s_ptr, g_ptr, ids_ptr, lq_ptr, keep_ptr, target_ptr, scale_ptr,
        div_ptr, ent_ptr, logp_ptr, logq_ptr,
        rows_t, s_sb, s_st, g_sb, g_st, vocab, K,
        inv_temp, beta, log_1m_beta, log_beta, tail_eps, s_scale, s_cap,
        DIVERGENCE: tl.constexpr, BUCKET: tl.constexpr, NEED_NORMALISER: tl.constexpr,
        HAS_TARGET: tl.constexpr, WRITE_GRAD: tl.constexpr, HAS_SCALE: tl.constexpr,
        BLOCK_V: tl.constexpr, BLOCK_K: tl.constexpr, PAD: tl.constexpr, TF_S: tl.constexpr,
    ):
        # TF_S != 0: the student logits go through their map (logit_transform) as they are read,
        # and the gradient through its derivative at the raw logits
        row = tl.program_id(0).to(tl.int64)
        b = row // rows_t
        t = row % rows_t
        s_row = s_ptr + b * s_sb + t * s_st
        g_row = g_ptr + b * g_sb + t * g_st
        ids_row = ids_ptr + row * K
        cols = tl.arange(0, BLOCK_V)
        keep = tl.load(keep_ptr + row)

        if keep != 0:
            # ---- the top-k columns (read before anything is written: grad may alias x) ----
            ks = tl.arange(0, BLOCK_K)
            ids = tl.load(ids_row + ks, mask=ks < K, other=PAD)
            valid = ids < vocab
            x_k_raw = tl.load(s_row + ids, mask=valid, other=float("-inf")).to(tl.float32)
            x_k = mapped_logits(x_k_raw, valid, s_scale, s_cap, TF_S)
            lq_k = tl.load(lq_ptr + row * K + ks, mask=valid, other=float("-inf")).to(tl.float32)
            k_valid = tl.sum(valid.to(tl.int32), axis=0)
            max_k = tl.max(x_k, axis=0)
            x_target = 0.0
            if HAS_TARGET:
                tgt = tl.load(target_ptr + row)
                x_target = logit_transform(tl.load(s_row + tgt).to(tl.float32), s_scale, s_cap, TF_S)

            # ---- pass 1: online softmax over the complement of S ----
            m_c = float("-inf")
            l_c = 0.0
            acc_ent = 0.0  # sum e (x - m_c), raw units
            if BUCKET or NEED_NORMALISER:
                ptr = tl.program_id(0) * 0
                for v0 in range(0, vocab, BLOCK_V):
                    offs = v0 + cols
                    in_topk, ptr = _topk_mask(ids_row, K, ptr, offs, v0 + BLOCK_V, PAD)
                    xs = tl.load(s_row + offs, mask=offs < vocab, other=float("-inf")).to(tl.float32)
                    xs = mapped_logits(xs, offs < vocab, s_scale, s_cap, TF_S)
                    xs = tl.where(in_topk, float("-inf"), xs)
                    new_m = tl.maximum(m_c, tl.max(xs, axis=0))
                    shift = tl.where(new_m == float("-inf"), 0.0, new_m)
                    scale = tl.exp((m_c - shift) * inv_temp)
                    e = tl.exp((xs - shift) * inv_temp)
                    moved = tl.where(m_c == float("-inf"), 0.0, (m_c - shift) * l_c)
                    acc_ent = (acc_ent + moved) * scale + tl.sum(tl.where(e > 0, e * (xs - shift), 0.0), axis=0)
                    l_c = l_c * scale + tl.sum(e, axis=0)
                    m_c = new_m

            # ---- the row, in float64 (K values and scalars: the divergence and the gradient
            # coefficients are differences of nearby logs), relative to a reference max ----
            f64 = tl.float64
            it = tl.cast(inv_temp, f64)
            m_c64 = tl.cast(m_c, f64)
            l_c64 = tl.cast(l_c, f64)
            x_k64 = x_k.to(f64)
            lq_k64 = lq_k.to(f64)
            max_k64 = tl.cast(max_k, f64)
            safe_max_k64 = tl.where(max_k64 == float("-inf"), 0.0, max_k64)
            sum_k64 = tl.sum(tl.exp((x_k64 - safe_max_k64) * it), axis=0)
            ref = tl.maximum(m_c64, max_k64)
            ref = tl.where(ref == float("-inf"), 0.0, ref)
            safe_m_c = tl.where(m_c64 == float("-inf"), 0.0, m_c64)
            shift_c = (safe_m_c - ref) * it
            # NaN logits make l_c NaN (whether or not the max propagated them): keep it NaN
            lse_c = tl.where(l_c64 > 0, shift_c + tl.log(l_c64), tl.where(l_c64 == 0, float("-inf"), float("nan")))
            lse_k = (safe_max_k64 - ref) * it + tl.log(sum_k64)  # -inf when S is empty / all -inf
            L = logaddexp(lse_c, lse_k)
            log_p_k = tl.where(valid, (x_k64 - ref) * it - L, float("-inf"))

            if BUCKET:
                log_pi_k = log_p_k
                log_pi_t = lse_c - L
                q_sum = tl.sum(tl.where(valid, tl.exp(lq_k64), 0.0), axis=0)
                log_q_k = lq_k64
                floor = tl.cast(tail_eps, f64)
                log_q_t = tl.where(k_valid < vocab, tl.log(tl.maximum(1.0 - q_sum, floor)), float("-inf"))
            else:
                log_pi_k = tl.where(valid, (x_k64 - safe_max_k64) * it - tl.log(sum_k64), float("-inf"))
                max_q = tl.max(lq_k64, axis=0)
                safe_max_q = tl.where(max_q == float("-inf"), 0.0, max_q)
                lse_q = safe_max_q + tl.log(tl.sum(tl.exp(lq_k64 - safe_max_q), axis=0))
                log_q_k = tl.where(valid, lq_k64 - lse_q, float("-inf"))
                log_pi_t = tl.cast(float("-inf"), f64)
                log_q_t = tl.cast(float("-inf"), f64)

            # ---- divergence over the outcomes, and its gradient coefficients ----
            pi_k = tl.exp(log_pi_k)
            q_k = tl.exp(log_q_k)
            pi_t = tl.exp(log_pi_t)
            q_t = tl.exp(log_q_t)
            per_ratio = tl.cast(0.0, f64)
            if DIVERGENCE == 0:
                r_k = tl.where(pi_k > 0, log_pi_k - log_q_k, 0.0)
                r_t = tl.where(pi_t > 0, log_pi_t - log_q_t, 0.0)
                div = tl.sum(tl.where(pi_k > 0, pi_k * r_k, 0.0), axis=0) + tl.where(pi_t > 0, pi_t * r_t, 0.0)
                coef_k = tl.where(pi_k > 0, pi_k * (r_k - div), 0.0)
                per_p = tl.where(pi_t > 0, r_t - div, 0.0)
            elif DIVERGENCE == 1:
                fwd_k = tl.where(q_k > 0, q_k * (log_q_k - log_pi_k), 0.0)
                div = tl.sum(fwd_k, axis=0) + tl.where(q_t > 0, q_t * (log_q_t - log_pi_t), 0.0)
                q_total = tl.sum(q_k, axis=0) + q_t
                coef_k = pi_k * q_total - q_k
                per_p = q_total
                per_ratio = q_t
            else:
                b64 = tl.cast(beta, f64)
                log_1m_b = tl.cast(log_1m_beta, f64)
                log_b = tl.cast(log_beta, f64)
                log_m_k = logaddexp(log_pi_k + log_1m_b, log_q_k + log_b)
                log_m_t = logaddexp(log_pi_t + log_1m_b, log_q_t + log_b)
                rho_k = tl.where(pi_k > 0, log_pi_k - log_m_k, 0.0)
                rho_t = tl.where(pi_t > 0, log_pi_t - log_m_t, 0.0)
                kl_pm = tl.sum(tl.where(pi_k > 0, pi_k * rho_k, 0.0), axis=0) + tl.where(pi_t > 0, pi_t * rho_t, 0.0)
                kl_qm = tl.sum(tl.where(q_k > 0, q_k * (log_q_k - log_m_k), 0.0), axis=0) + tl.where(
                    q_t > 0, q_t * (log_q_t - log_m_t), 0.0
                )
                div = b64 * kl_qm + (1.0 - b64) * kl_pm
                coef_k = tl.where(pi_k > 0, (1.0 - b64) * pi_k * (rho_k - kl_pm), 0.0)
                per_p = tl.where(pi_t > 0, (1.0 - b64) * (rho_t - kl_pm), 0.0)
            # a NaN logit the divergence depends on is reported, never hidden by the pi > 0 masks
            # (tested on lse_c itself: tl.maximum ignores NaN, so L may not carry it)
            nan_row = lse_k != lse_k
            if BUCKET:
                nan_row = nan_row | (lse_c != lse_c)
            tl.store(div_ptr + row, tl.where(nan_row, float("nan"), div).to(tl.float32))

            # ---- statistics: full-vocabulary entropy, sampled-token log-probs ----
            entropy = tl.cast(0.0, f64)
            if NEED_NORMALISER:
                p_k = tl.exp(log_p_k)
                ent_k = tl.sum(tl.where(p_k > 0, p_k * log_p_k, 0.0), axis=0)
                ent_c = tl.where(
                    l_c64 > 0, tl.exp(shift_c - L) * (it * tl.cast(acc_ent, f64) + (shift_c - L) * l_c64), 0.0
                )
                entropy = -(ent_k + ent_c)
            tl.store(ent_ptr + row, entropy.to(tl.float32))
            if HAS_TARGET:
                tl.store(logp_ptr + row, ((tl.cast(x_target, f64) - ref) * it - L).to(tl.float32))
                hit = valid & (ids == tgt)
                found = tl.sum(tl.where(hit, lq_k, 0.0), axis=0)
                tl.store(logq_ptr + row, tl.where(tl.sum(hit.to(tl.int32), axis=0) > 0, found, float("nan")))

            if WRITE_GRAD:
                to_x = it  # d/dx = (1/T) d/dz, times the caller's per-row scale
                if HAS_SCALE:
                    to_x = it * tl.cast(tl.load(scale_ptr + row), f64)
                # complement column v: p_v per_p - (p_v / P_tail) per_ratio, with
                # p_v = exp((x_v - m_c) / T) exp(shift_c - L) and p_v / P_tail = exp((x_v - m_c) / T) / l_c
                row_factor = tl.where(
                    l_c64 > 0, (tl.exp(shift_c - L) * per_p - per_ratio / tl.where(l_c64 > 0, l_c64, 1.0)) * to_x, 0.0
                ).to(tl.float32)
                if not BUCKET:
                    row_factor = 0.0
                safe_m_c32 = tl.where(m_c == float("-inf"), 0.0, m_c)
                ptr = tl.program_id(0) * 0
                for v0 in range(0, vocab, BLOCK_V):
                    offs = v0 + cols
                    in_topk, ptr = _topk_mask(ids_row, K, ptr, offs, v0 + BLOCK_V, PAD)
                    in_vocab = offs < vocab
                    xs_raw = tl.load(s_row + offs, mask=in_vocab, other=float("-inf")).to(tl.float32)
                    xs = mapped_logits(xs_raw, in_vocab, s_scale, s_cap, TF_S)
                    e = tl.exp((xs - safe_m_c32) * inv_temp)
                    g = tl.where(e > 0, e * row_factor, 0.0)  # 0 * inf stays 0 (an infinite divergence)
                    g = times_logit_transform_grad(g, xs_raw, s_scale, s_cap, TF_S)
                    # S columns are left to the scatter below: no two stores to one address
                    tl.store(g_row + offs, g.to(g_ptr.dtype.element_ty), mask=in_vocab & (in_topk == 0))
                g_k = times_logit_transform_grad((coef_k * to_x).to(tl.float32), x_k_raw, s_scale, s_cap, TF_S)
                tl.store(g_row + ids, g_k.to(g_ptr.dtype.element_ty), mask=valid)
        else:
            store_dropped_row(
                row, div_ptr, ent_ptr, logp_ptr, logq_ptr, g_ptr, g_row, vocab, HAS_TARGET, WRITE_GRAD, BLOCK_V
            )


def forward(
    student, topk_ids, topk_logprobs, keep, target_ids, divergence, beta, temperature, tail, tail_eps, grad,
    grad_scale=None, want_entropy=True, block_v=None, student_transform=IDENTITY,
):
    """See ``torch_backend`` for the contract (the logit map is applied in the kernel, as the
    logits are read)."""
    require_triton()
    B, T = keep.shape
    V = student.shape[-1]
    K = topk_ids.shape[-1]
    device = student.device
    outs = [torch.empty(B, T, dtype=torch.float32, device=device) for _ in range(4)]
    if block_v is None:
        block_v = row_block_v(V, DEFAULT_BLOCK_V)
    topk_ids = topk_ids.to(torch.int32).contiguous()
    topk_logprobs = topk_logprobs.to(torch.float32).contiguous()
    # read as flat rows: a strided view (e.g. ids[..., 0]) must not reach the kernel
    target = target_ids.contiguous() if target_ids is not None else keep  # dummy pointer when unused
    keep = keep.contiguous()
    has_scale = grad_scale is not None and grad is not None
    scale = grad_scale.to(torch.float32).contiguous() if has_scale else outs[0]  # dummy when unused
    g = grad if grad is not None else student
    g_sb, g_st = (grad.stride(0), grad.stride(1)) if grad is not None else (0, 0)
    log_1m_beta, log_beta = mixture_logs(beta)
    if B * T > 0:
        _topk_row_kernel[(B * T,)](
            student, g, topk_ids, topk_logprobs, keep, target, scale, *outs,
            T, student.stride(0), student.stride(1), g_sb, g_st, V, K,
            1.0 / temperature, float(beta), log_1m_beta, log_beta, float(tail_eps), *student_transform.as_floats(),
            DIVERGENCE=DIVERGENCE_CODES[divergence], BUCKET=tail == "bucket",
            NEED_NORMALISER=bool(want_entropy or target_ids is not None), HAS_TARGET=target_ids is not None,
            WRITE_GRAD=grad is not None, HAS_SCALE=has_scale, BLOCK_V=block_v,
            BLOCK_K=triton.next_power_of_2(max(K, 2)), PAD=PAD_ID, TF_S=student_transform.code,
            num_warps=row_num_warps(block_v),
        )
    return tuple(outs)
