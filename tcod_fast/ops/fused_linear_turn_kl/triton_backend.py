"""``triton`` backend of ``fused_linear_turn_kl`` (CUDA; CPU under ``TRITON_INTERPRET=1``).

Two kernels, both tiled over (kept rows x vocabulary) and never writing a logits tile to memory:

* ``_stats_kernel``, one program per ``BLOCK_M`` kept rows. It streams the vocabulary in
  ``BLOCK_V`` tiles; each logits tile is a ``tl.dot`` over ``BLOCK_K`` slices of the hidden size,
  accumulated in float32 (float32 inputs use ``input_precision="ieee"``: TF32 would round the
  operands to 10 mantissa bits, the very rounding this op exists to avoid), then fed to the
  online-softmax recurrences of docs/maths.md#one-streaming-pass-online-softmax (running max,
  sums, ``A``, ``B``, rescaled by ``exp(m_old - m_new)``). JSD adds a second sweep once both
  normalisers are known. Writes per row: divergence, entropy, ``lse_s``, ``lse_t`` and
  ``KL(p||m)``.
* ``_grad_kernel``, one program per (``BLOCK_M`` rows, ``BLOCK_V`` columns) tile. It recomputes
  the two logits tiles, forms ``G = row_scale * d div / d z_s / temperature`` in registers and
  adds ``G @ W_s[tile]`` into ``dh`` and ``G.T @ h_s[rows]`` into ``dW`` (and ``sum G`` into
  ``db``) with float32 atomics, ``BLOCK_K`` columns of the hidden size at a time.

Memory: ``O(BLOCK_M x BLOCK_V)`` per program plus the outputs (``dh`` ``n_kept x H_s``, ``dW``
``V_s x H_s``, ``db``, all float32); nothing depends on ``N x V``. FLOPs: forward 2 GEMMs
(+2 for JSD), gradient 2 logits GEMMs recomputed + 2 gradient GEMMs. Rows outside the mask are
never gathered. Tile sizes are explicit: ``BLOCK_M = 64, BLOCK_V = 128, BLOCK_K = 64`` on GPU
(two 64 x 128 float32 accumulators per program); the tests use 16 x 32 x 16 so small shapes span
several tiles and ragged tails in every dimension.

Soft-capped and scaled logits (``softcap=``, ``logit_scale=``): ``_logits_tiles`` maps each
float32 tile as it leaves the dot (``triton_common.logit_transform``, compiled in only when asked:
``TF_S``/``TF_T`` constexprs); ``_grad_kernel`` keeps the student's raw tile to multiply ``G`` by the
map's derivative before contracting it, after the row sums of the argmax fix.

The JSD sweep of ``_stats_kernel`` repeats the first sweep's ``_logits_tiles`` call: it recomputes
the same logits tiles, as storing them would be the ``N x V`` memory the op avoids.

Status: tested under the Triton interpreter only; no GPU was available when it was written, so
it has not been timed or tuned on hardware.
"""

from __future__ import annotations

import math

import torch

from tcod_fast.ops.common import DIVERGENCE_CODES
from tcod_fast.ops.logit_transform import IDENTITY

# whether triton imports and where the kernels run: this backend's API too
from tcod_fast.ops.triton_common import HAS_TRITON as HAS_TRITON
from tcod_fast.ops.triton_common import interpreter_enabled as interpreter_enabled
from tcod_fast.ops.triton_common import is_available as is_available
from tcod_fast.ops.triton_common import mixture_logs, require_triton

if HAS_TRITON:
    import triton
    import triton.language as tl

    from tcod_fast.ops.triton_common import (
        block_argmax,
        jsd_block_sums,
        log_mixture,
        mapped_logits,
        online_softmax_finish,
        online_softmax_step,
        times_logit_transform_grad,
    )

DEFAULT_BLOCK_M = 64
DEFAULT_BLOCK_V = 128
DEFAULT_BLOCK_K = 64
# per-row statistics the stats kernel leaves for the gradient kernel (see _stats_kernel)
ROW_STATS = 7


if HAS_TRITON:

    @triton.jit
    def _logits_tile(h_rows, w_ptr, w_sv, b_ptr, offs_v, v_mask, m_mask, hidden, inv_temp,
                     HAS_BIAS: tl.constexpr, DOT_FP32: tl.constexpr, BLOCK_M: tl.constexpr,
                     BLOCK_V: tl.constexpr, BLOCK_K: tl.constexpr):
        """``(h @ W[offs_v].T + b) * inv_temp`` for a (BLOCK_M, BLOCK_V) tile, float32, -inf off-vocab."""
        offs_k = tl.arange(0, BLOCK_K)
        acc = tl.zeros((BLOCK_M, BLOCK_V), dtype=tl.float32)
        for k0 in range(0, hidden, BLOCK_K):
            k = k0 + offs_k
            k_mask = k < hidden
            a = tl.load(h_rows[:, None] + k[None, :], mask=m_mask[:, None] & k_mask[None, :], other=0.0)
            w = tl.load(w_ptr + offs_v.to(tl.int64)[None, :] * w_sv + k[:, None],
                        mask=v_mask[None, :] & k_mask[:, None], other=0.0)
            if DOT_FP32:
                acc = tl.dot(a.to(tl.float32), w.to(tl.float32), acc, input_precision="ieee")
            else:
                acc = tl.dot(a, w, acc)
        if HAS_BIAS:
            acc += tl.load(b_ptr + offs_v, mask=v_mask, other=0.0).to(tl.float32)[None, :]
        return tl.where(v_mask[None, :], acc * inv_temp, float("-inf"))

    @triton.jit
    def _logits_tiles(hs_rows, ws_ptr, ws_sv, bs_ptr, ht_rows, wt_ptr, wt_sv, bt_ptr, offs_v, v_mask, m_mask,
                      hidden_s, hidden_t, s_scale, s_cap, t_scale, t_cap, HAS_BS: tl.constexpr, HAS_BT: tl.constexpr,
                      DOT_FP32_S: tl.constexpr, DOT_FP32_T: tl.constexpr, BLOCK_M: tl.constexpr,
                      BLOCK_V: tl.constexpr, BLOCK_K: tl.constexpr, TF_S: tl.constexpr, TF_T: tl.constexpr):
        """The student's and the teacher's logits tiles (``_logits_tile`` at temperature 1), each
        through its logit map (``TF_S``, ``TF_T``: ``LogitTransform.code``; 0 leaves it raw)."""
        zs = _logits_tile(hs_rows, ws_ptr, ws_sv, bs_ptr, offs_v, v_mask, m_mask, hidden_s, 1.0,
                          HAS_BS, DOT_FP32_S, BLOCK_M, BLOCK_V, BLOCK_K)
        zt = _logits_tile(ht_rows, wt_ptr, wt_sv, bt_ptr, offs_v, v_mask, m_mask, hidden_t, 1.0,
                          HAS_BT, DOT_FP32_T, BLOCK_M, BLOCK_V, BLOCK_K)
        return (mapped_logits(zs, v_mask[None, :], s_scale, s_cap, TF_S),
                mapped_logits(zt, v_mask[None, :], t_scale, t_cap, TF_T))

    @triton.jit
    def _row_pointers(hs_ptr, ht_ptr, rows_ptr, offs_m, m_mask, rows_t, hs_sb, hs_st, ht_sb, ht_st):
        rows = tl.load(rows_ptr + offs_m, mask=m_mask, other=0).to(tl.int64)
        b = rows // rows_t
        t = rows % rows_t
        return hs_ptr + b * hs_sb + t * hs_st, ht_ptr + b * ht_sb + t * ht_st

    @triton.jit
    def _stats_kernel(
        hs_ptr, ws_ptr, bs_ptr, ht_ptr, wt_ptr, bt_ptr, rows_ptr,
        div_ptr, ent_ptr, row_ptr, arg_ptr,
        n_rows, rows_t, hs_sb, hs_st, ht_sb, ht_st, ws_sv, wt_sv, hidden_s, hidden_t,
        vocab, inv_temp, beta, log_1m_beta, log_beta, s_scale, s_cap, t_scale, t_cap,
        HAS_BS: tl.constexpr, HAS_BT: tl.constexpr, DIVERGENCE: tl.constexpr,
        DOT_FP32_S: tl.constexpr, DOT_FP32_T: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_K: tl.constexpr, TF_S: tl.constexpr, TF_T: tl.constexpr,
    ):
        """Per row: div, entropy, the student's argmax, and ROW_STATS = 7 floats in ``row_ptr``
        (shift_s, shift_t, log l_s, log l_t, centre B, mean_p(u), KL(p||m)) for the gradient."""
        offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
        m_mask = offs_m < n_rows
        hs_rows, ht_rows = _row_pointers(hs_ptr, ht_ptr, rows_ptr, offs_m, m_mask, rows_t, hs_sb, hs_st, ht_sb, ht_st)
        offs_v0 = tl.arange(0, BLOCK_V)
        m_s = tl.full((BLOCK_M,), float("-inf"), tl.float32)
        m_t = tl.full((BLOCK_M,), float("-inf"), tl.float32)
        shift_s = tl.zeros((BLOCK_M,), tl.float32)
        shift_t = tl.zeros((BLOCK_M,), tl.float32)
        centre = tl.zeros((BLOCK_M,), tl.float32)
        arg_s = tl.zeros((BLOCK_M,), tl.int32)
        l_s = tl.zeros((BLOCK_M,), tl.float32)
        l_t = tl.zeros((BLOCK_M,), tl.float32)
        acc_div = tl.zeros((BLOCK_M,), tl.float32)
        acc_ent = tl.zeros((BLOCK_M,), tl.float32)
        for v0 in range(0, vocab, BLOCK_V):
            offs_v = v0 + offs_v0
            # raw logits: the temperature multiplies only differences from the running maxima, so
            # logits 1e14 apart after scaling keep their float32 precision (see online_softmax_step)
            zs, zt = _logits_tiles(hs_rows, ws_ptr, ws_sv, bs_ptr, ht_rows, wt_ptr, wt_sv, bt_ptr, offs_v,
                                   offs_v < vocab, m_mask, hidden_s, hidden_t, s_scale, s_cap, t_scale, t_cap, HAS_BS,
                                   HAS_BT, DOT_FP32_S, DOT_FP32_T, BLOCK_M, BLOCK_V, BLOCK_K, TF_S, TF_T)
            block_ms, block_arg = block_argmax(zs, 1)
            xt_at = tl.sum(tl.where(offs_v0[None, :] == block_arg[:, None], zt, 0.0), axis=1)
            m_s, m_t, shift_s, shift_t, centre, arg_s, l_s, l_t, acc_div, acc_ent = online_softmax_step(
                zs, zt, block_ms, v0 + block_arg, xt_at, m_s, m_t, shift_s, shift_t, centre, arg_s, l_s, l_t,
                acc_div, acc_ent, inv_temp, DIVERGENCE, 1,
            )
        log_l_s, log_l_t, entropy, mean_u, div = online_softmax_finish(
            l_s, l_t, acc_div, acc_ent, shift_t, centre, inv_temp, DIVERGENCE
        )
        kl_p_m = tl.zeros((BLOCK_M,), tl.float32)
        if DIVERGENCE == 2:
            sum_q = tl.zeros((BLOCK_M,), tl.float32)
            for v0 in range(0, vocab, BLOCK_V):
                offs_v = v0 + offs_v0
                zs, zt = _logits_tiles(hs_rows, ws_ptr, ws_sv, bs_ptr, ht_rows, wt_ptr, wt_sv, bt_ptr, offs_v,
                                       offs_v < vocab, m_mask, hidden_s, hidden_t, s_scale, s_cap, t_scale, t_cap,
                                       HAS_BS, HAS_BT, DOT_FP32_S, DOT_FP32_T, BLOCK_M, BLOCK_V, BLOCK_K, TF_S, TF_T)
                block_p, block_q = jsd_block_sums(
                    zs, zt, shift_s, shift_t, log_l_s, log_l_t, inv_temp, log_1m_beta, log_beta, 1
                )
                kl_p_m += block_p
                sum_q += block_q
            div = beta * sum_q + (1.0 - beta) * kl_p_m
        tl.store(div_ptr + offs_m, div, mask=m_mask)
        tl.store(ent_ptr + offs_m, entropy, mask=m_mask)
        tl.store(arg_ptr + offs_m, arg_s, mask=m_mask)
        stats = row_ptr + offs_m.to(tl.int64) * 7  # ROW_STATS floats per row
        tl.store(stats + 0, shift_s, mask=m_mask)
        tl.store(stats + 1, shift_t, mask=m_mask)
        tl.store(stats + 2, log_l_s, mask=m_mask)
        tl.store(stats + 3, log_l_t, mask=m_mask)
        tl.store(stats + 4, centre, mask=m_mask)
        tl.store(stats + 5, mean_u, mask=m_mask)
        tl.store(stats + 6, kl_p_m, mask=m_mask)

    @triton.jit
    def _grad_kernel(
        hs_ptr, ws_ptr, bs_ptr, ht_ptr, wt_ptr, bt_ptr, rows_ptr,
        div_ptr, row_ptr, scale_ptr, sumg_ptr, dh_ptr, dw_ptr, db_ptr,
        n_rows, rows_t, hs_sb, hs_st, ht_sb, ht_st, ws_sv, wt_sv, hidden_s, hidden_t,
        vocab, inv_temp, beta, log_1m_beta, log_beta, s_scale, s_cap, t_scale, t_cap,
        HAS_BS: tl.constexpr, HAS_BT: tl.constexpr, DIVERGENCE: tl.constexpr,
        DOT_FP32_S: tl.constexpr, DOT_FP32_T: tl.constexpr,
        WANT_DH: tl.constexpr, WANT_DW: tl.constexpr, WANT_DB: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_K: tl.constexpr, TF_S: tl.constexpr, TF_T: tl.constexpr,
    ):
        offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_v = tl.program_id(1) * BLOCK_V + tl.arange(0, BLOCK_V)
        m_mask = offs_m < n_rows
        v_mask = offs_v < vocab
        hs_rows, ht_rows = _row_pointers(hs_ptr, ht_ptr, rows_ptr, offs_m, m_mask, rows_t, hs_sb, hs_st, ht_sb, ht_st)
        stats = row_ptr + offs_m.to(tl.int64) * 7  # ROW_STATS floats per row
        shift_s = tl.load(stats + 0, mask=m_mask, other=0.0)
        shift_t = tl.load(stats + 1, mask=m_mask, other=0.0)
        log_l_s = tl.load(stats + 2, mask=m_mask, other=0.0)
        log_l_t = tl.load(stats + 3, mask=m_mask, other=0.0)
        row_scale = tl.load(scale_ptr + offs_m, mask=m_mask, other=0.0) * inv_temp
        # the student tile raw (its map is applied here, its derivative needed below)
        zs_raw, zt = _logits_tiles(hs_rows, ws_ptr, ws_sv, bs_ptr, ht_rows, wt_ptr, wt_sv, bt_ptr, offs_v, v_mask,
                                   m_mask, hidden_s, hidden_t, s_scale, s_cap, t_scale, t_cap, HAS_BS, HAS_BT,
                                   DOT_FP32_S, DOT_FP32_T, BLOCK_M, BLOCK_V, BLOCK_K, 0, TF_T)
        zs = mapped_logits(zs_raw, v_mask[None, :], s_scale, s_cap, TF_S)
        a_s = zs - shift_s[:, None]
        log_p = a_s * inv_temp - log_l_s[:, None]
        p = tl.exp(log_p)
        if DIVERGENCE == 0:
            centre = tl.load(stats + 4, mask=m_mask, other=0.0)
            mean_u = tl.load(stats + 5, mask=m_mask, other=0.0)
            u = a_s - (zt - centre[:, None])
            g = tl.where(p > 0, p * ((u - mean_u[:, None]) * inv_temp), 0.0)
        elif DIVERGENCE == 1:
            g = p - tl.exp((zt - shift_t[:, None]) * inv_temp - log_l_t[:, None])
        else:
            kl_p_m = tl.load(stats + 6, mask=m_mask, other=0.0)
            log_q = (zt - shift_t[:, None]) * inv_temp - log_l_t[:, None]
            log_m = log_mixture(log_p, log_q, log_1m_beta, log_beta)
            g = tl.where(p > 0, (1.0 - beta) * p * (log_p - log_m - kl_p_m[:, None]), 0.0)
        div = tl.load(div_ptr + offs_m, mask=m_mask, other=0.0)
        g = tl.where((div != div)[:, None], float("nan"), g)  # a NaN row: a NaN gradient row
        g = tl.where(m_mask[:, None] & v_mask[None, :], g * row_scale[:, None], 0.0)
        if DIVERGENCE != 0:  # for the argmax fix of forward KL and JSD (see forward)
            tl.atomic_add(sumg_ptr + offs_m, tl.sum(g, axis=1), mask=m_mask)
        g = times_logit_transform_grad(g, zs_raw, s_scale, s_cap, TF_S)  # chain rule through the map

        if WANT_DB:
            tl.atomic_add(db_ptr + offs_v, tl.sum(g, axis=0), mask=v_mask)
        offs_k0 = tl.arange(0, BLOCK_K)
        for k0 in range(0, hidden_s, BLOCK_K):
            k = k0 + offs_k0
            k_mask = k < hidden_s
            if WANT_DH:
                w = tl.load(ws_ptr + offs_v.to(tl.int64)[:, None] * ws_sv + k[None, :],
                            mask=v_mask[:, None] & k_mask[None, :], other=0.0).to(tl.float32)
                dh_part = tl.dot(g, w, input_precision="ieee")
                tl.atomic_add(dh_ptr + offs_m.to(tl.int64)[:, None] * hidden_s + k[None, :], dh_part,
                              mask=m_mask[:, None] & k_mask[None, :])
            if WANT_DW:
                a = tl.load(hs_rows[:, None] + k[None, :], mask=m_mask[:, None] & k_mask[None, :],
                            other=0.0).to(tl.float32)
                dw_part = tl.dot(tl.trans(g), a, input_precision="ieee")
                tl.atomic_add(dw_ptr + offs_v.to(tl.int64)[:, None] * hidden_s + k[None, :], dw_part,
                              mask=v_mask[:, None] & k_mask[None, :])


def _dot_fp32(hidden: torch.Tensor, weight: torch.Tensor) -> bool:
    """float32 operands (exact, IEEE dot) unless both are the same 16-bit type (fp32 accumulation).

    The Triton 3.9 interpreter's ``tl.dot`` on bfloat16 operands returns garbage (it multiplies
    the raw bit patterns), so under the interpreter 16-bit operands are upcast in registers
    first. The products of two bf16/fp16 values are exact in float32 either way, so the tests
    check the same numbers a GPU's fp32-accumulating 16-bit dot produces, up to summation order.
    """
    if interpreter_enabled():
        return True
    return not (hidden.dtype == weight.dtype and hidden.dtype in (torch.bfloat16, torch.float16))


def forward(
    student_hidden, student_weight, student_bias, teacher_hidden, teacher_weight, teacher_bias,
    kept_rows, target_ids, divergence, beta, temperature, vocab_size,
    row_scale=None, want_hidden_grad=False, weight_grad=None, bias_grad=None, chunk_rows=None,
    block_m=None, block_v=None, block_k=None, student_transform=IDENTITY, teacher_transform=IDENTITY,
):
    """Same contract as ``chunked.forward`` (``chunk_rows`` is ignored: tiles replace chunks). The
    logit maps are applied to each float32 logits tile where it is formed; the gradient kernel
    recomputes the student's raw tile and the map's derivative on it."""
    require_triton()
    block_m = block_m or DEFAULT_BLOCK_M
    block_v = block_v or DEFAULT_BLOCK_V
    block_k = block_k or DEFAULT_BLOCK_K
    device = student_hidden.device
    n_kept = kept_rows.shape[0]
    T = student_hidden.shape[1]
    h_s = student_hidden if student_hidden.stride(-1) == 1 else student_hidden.contiguous()
    h_t = teacher_hidden if teacher_hidden.stride(-1) == 1 else teacher_hidden.contiguous()
    w_s = student_weight if student_weight.stride(-1) == 1 else student_weight.contiguous()
    w_t = teacher_weight if teacher_weight.stride(-1) == 1 else teacher_weight.contiguous()
    div, entropy = (torch.zeros(n_kept, dtype=torch.float32, device=device) for _ in range(2))
    row_stats = torch.zeros(n_kept, ROW_STATS, dtype=torch.float32, device=device)
    argmax_s = torch.zeros(n_kept, dtype=torch.int32, device=device)
    rows = kept_rows.contiguous()
    inv_temp = 1.0 / temperature
    log_1m_beta, log_beta = mixture_logs(beta)
    # dummy pointers for absent biases: never read (HAS_BS / HAS_BT are constexpr False)
    b_s = student_bias if student_bias is not None else div
    b_t = teacher_bias if teacher_bias is not None else div
    common = (
        n_kept, T, h_s.stride(0), h_s.stride(1), h_t.stride(0), h_t.stride(1), w_s.stride(0), w_t.stride(0),
        h_s.shape[-1], h_t.shape[-1], vocab_size, inv_temp, float(beta), log_1m_beta, log_beta,
        *student_transform.as_floats(), *teacher_transform.as_floats(),
    )
    flags = dict(
        HAS_BS=student_bias is not None, HAS_BT=teacher_bias is not None, DIVERGENCE=DIVERGENCE_CODES[divergence],
        DOT_FP32_S=_dot_fp32(h_s, w_s), DOT_FP32_T=_dot_fp32(h_t, w_t),
        BLOCK_M=block_m, BLOCK_V=block_v, BLOCK_K=block_k, TF_S=student_transform.code, TF_T=teacher_transform.code,
    )
    if n_kept:
        _stats_kernel[(triton.cdiv(n_kept, block_m),)](
            h_s, w_s, b_s, h_t, w_t, b_t, rows, div, entropy, row_stats, argmax_s, *common, **flags,
        )

    dh = None
    if row_scale is not None:
        dh = torch.zeros(n_kept, h_s.shape[-1], dtype=torch.float32, device=device) if want_hidden_grad else None
        scale = row_scale.to(torch.float32).contiguous()
        want_dw = weight_grad is not None
        want_db = bias_grad is not None
        sum_g = torch.zeros(n_kept, dtype=torch.float32, device=device)
        # atomics need float32 targets; the caller's buffers are float32 (float64 never comes here)
        if n_kept and (dh is not None or want_dw or want_db):
            grid = (triton.cdiv(n_kept, block_m), triton.cdiv(vocab_size, block_v))
            _grad_kernel[grid](
                h_s, w_s, b_s, h_t, w_t, b_t, rows, div, row_stats, scale, sum_g,
                dh if dh is not None else div, weight_grad if want_dw else div, bias_grad if want_db else div,
                *common, WANT_DH=dh is not None, WANT_DW=want_dw, WANT_DB=want_db, **flags,
            )
            if divergence != "reverse_kl":
                # Forward KL and JSD gradients cancel at the student's argmax a when p_a ~ 1; where
                # p_a = 1 / l_s > 1/2, G[r, a] becomes -sum_{v != a} G[r, v] (rows of G sum to 0),
                # i.e. G[r, a] += -sum_v G[r, v]: a rank-1 update of the contracted gradients.
                delta = torch.where((row_stats[:, 2] < math.log(2.0)) & torch.isfinite(sum_g), -sum_g, 0.0)
                arg = argmax_s.long()
                h_rows = None
                if want_dw or want_db or not student_transform.identity:
                    h_rows = h_s[rows // T, rows % T].float()
                if not student_transform.identity:  # through the map's derivative at the argmax
                    z_a = (h_rows * w_s[arg].float()).sum(1)
                    if student_bias is not None:
                        z_a = z_a + student_bias[arg].float()
                    delta = delta * student_transform.derivative(z_a)
                if dh is not None:
                    dh.add_(delta[:, None] * w_s[arg].float())
                if want_dw or want_db:
                    if want_dw:
                        weight_grad.index_add_(0, arg, delta[:, None] * h_rows)
                    if want_db:
                        bias_grad.index_add_(0, arg, delta)

    logp = torch.zeros(n_kept, dtype=torch.float32, device=device)
    logq = torch.zeros(n_kept, dtype=torch.float32, device=device)
    if target_ids is not None and n_kept:
        logp, logq = _target_logprobs(h_s, w_s, student_bias, h_t, w_t, teacher_bias, rows, target_ids, inv_temp,
                                      row_stats, student_transform, teacher_transform)
    return div, entropy, logp, logq, dh


def _target_logprobs(h_s, w_s, b_s, h_t, w_t, b_t, rows, target_ids, inv_temp, row_stats,
                     student_transform=IDENTITY, teacher_transform=IDENTITY, chunk=4096):
    """``log p(a)``, ``log q(a)`` as row dot products with the sampled tokens' weight rows (through
    the logit maps)."""
    T = h_s.shape[1]
    shift_s, shift_t, log_l_s, log_l_t = row_stats[:, 0], row_stats[:, 1], row_stats[:, 2], row_stats[:, 3]
    logp = torch.empty_like(shift_s)
    logq = torch.empty_like(shift_t)
    for start in range(0, rows.shape[0], chunk):
        r = rows[start:start + chunk]
        part = slice(start, start + chunk)
        tgt = target_ids[r]
        hs = h_s[r // T, r % T].float()
        ht = h_t[r // T, r % T].float()
        z_a = (hs * w_s[tgt].float()).sum(1) + (b_s[tgt].float() if b_s is not None else 0.0)
        zt_a = (ht * w_t[tgt].float()).sum(1) + (b_t[tgt].float() if b_t is not None else 0.0)
        if not student_transform.identity:
            z_a = student_transform.apply(z_a)
        if not teacher_transform.identity:
            zt_a = teacher_transform.apply(zt_a)
        logp[part] = (z_a - shift_s[part]) * inv_temp - log_l_s[part]
        logq[part] = (zt_a - shift_t[part]) * inv_temp - log_l_t[part]
    return logp, logq
