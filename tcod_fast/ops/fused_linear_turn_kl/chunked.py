"""``backend="torch"`` of ``fused_linear_turn_kl``: chunked over rows and vocabulary, any device.

Despite its backend name it is not torch-only: its per-chunk row math dispatches to
``fused_turn_kl``'s fastest row kernel for the device (native C++ on CPU, Triton on CUDA, its
torch backend otherwise); only the matmuls around it are plain torch.

Rows outside the turn mask are never gathered, so they cost no matmul work. The kept rows are
processed ``R`` at a time, in one of two modes:

* ``"slab"`` (default). For a chunk, the float32 student and teacher logits ``z = h @ W.T + b``
  are formed (in vocabulary blocks of ``BV`` columns when a weight must be upcast, so a bf16
  weight is never upcast whole; never rounded to the input dtype), handed to the row kernel of
  ``fused_turn_kl`` (see above), which writes ``d div / d z`` over the student slab in place; the
  slab, scaled per row, is then contracted: ``dh = G @ W_s`` and ``dW += G.T @ h``,
  ``db += G.sum(0)``, in float32. Each of the four GEMMs of the unfused path runs exactly once,
  on ``R``-row pieces.
* ``"stream"``. The vocabulary is streamed in ``BV``-column blocks with the online-softmax
  recurrences of docs/maths.md#one-streaming-pass-online-softmax (running maxima, sums,
  ``A = sum e_s (z_s - z_t)`` or ``sum e_t (z_t - z_s)``, ``B = sum e_s z_s``, rescaled by
  ``exp(m_old - m_new)``); JSD adds a sweep once both normalisers are known; a last sweep
  recomputes each logits block, forms ``G`` and accumulates ``dh``/``dW``/``db``. Two more GEMMs (1.5x the FLOPs), but the working
  set is ``O(R * BV)``, for vocabularies where even ``R * V`` floats are too many.

Peak extra memory, in float32 elements (``H = max(H_s, H_t)``):

    slab  : 2*R*V   + BV*H (weight block upcast, only for non-float32 weights) + R*(H_s + H_t)
            (+ ~6*R*V inside the torch row kernel, used only where neither the native nor the
             Triton kernel is available)
    stream: ~6*R*BV + 2*BV*H + R*(H_s + H_t)

plus the outputs the caller asks for: ``dh`` (``n_kept x H_s``), the float32 ``dW`` accumulator
(``V_s x H_s``) and ``db`` (``V_s``). Nothing scales with ``N x V``.

Soft-capped and scaled logits (``softcap=``, ``logit_scale=``): in slab mode the row kernel maps
the slabs as it reads them and writes ``d div / d z`` through the map (the native kernel keeps the
map's derivative in a per-thread row of ``V`` floats, the Triton kernel recomputes it per block,
the torch one maps a copy of each of its own row chunks and recomputes the derivative at the end);
in stream mode each logits block is mapped in place as it is formed, each sweep recomputes it, and
the last sweep also forms the derivative (one more ``R x BV`` block). Measured at N = 4096,
V = 32000, float32, CPU: +0.1 MB of peak memory in slab mode, +4 MB in stream mode.
"""

from __future__ import annotations

import math

import torch

from tcod_fast.ops.common import DIVERGENCES
from tcod_fast.ops.linear_head import gather_rows, linear_logits
from tcod_fast.ops.logit_transform import IDENTITY
from tcod_fast.ops.turn_kl import native_backend as logits_native
from tcod_fast.ops.turn_kl import torch_backend as logits_torch
from tcod_fast.ops.turn_kl import triton_backend as logits_triton

# Target bytes of one chunk's two float32 logits slabs (student + teacher, R x V each). 64 MiB
# gives R = 262 at V = 32000: measured on CPU, 131-row chunks cost ~15% more time than the
# unfused path (every chunk re-reads and re-writes the V x H weight-gradient accumulator), 262-row
# chunks match it, and the slabs stay at 1/8 of a 4096-row float32 logits tensor.
SLAB_BYTES = 64 * 1024 * 1024
DEFAULT_VOCAB_BLOCK = 4096
MODES = ("slab", "stream")
_MIN_ROWS, _MAX_ROWS = 16, 1024
_LOG_2 = math.log(2.0)


def default_chunk_rows(vocab_size: int) -> int:
    """Rows per chunk so that the two ``R x V`` float32 slabs take about ``SLAB_BYTES``."""
    rows = SLAB_BYTES // (2 * 4 * vocab_size)
    return int(min(_MAX_ROWS, max(_MIN_ROWS, rows)))


class _Heads:
    """Both LM heads plus the row gather (flat kept index -> (b, t) of the 3-D hidden states)."""

    def __init__(self, h_s, w_s, b_s, h_t, w_t, b_t, compute_dtype, vocab_size, vocab_block,
                 student_transform=IDENTITY, teacher_transform=IDENTITY):
        self.h_s, self.w_s, self.b_s = h_s, w_s, b_s
        self.h_t, self.w_t, self.b_t = h_t, w_t, b_t
        self.student_transform, self.teacher_transform = student_transform, teacher_transform
        self.dtype = compute_dtype
        self.vocab_size = vocab_size
        self.vocab_block = vocab_block
        self.blocks = [(v0, min(vocab_size, v0 + vocab_block)) for v0 in range(0, vocab_size, vocab_block)]
        # -inf can only enter the logits through a bias (banned / padded vocabulary entries);
        # without one the 0 * inf guards are skipped.
        self.may_have_inf = b_s is not None or b_t is not None
        self._slabs = None

    def rows(self, hidden, flat_rows):
        return gather_rows(hidden, flat_rows, self.dtype)

    def weight_block(self, weight, v0, v1):
        block = weight[v0:v1]
        return block if block.dtype == self.dtype else block.to(self.dtype)

    def logits_block(self, h, weight, bias, v0, v1, inv_temp=1.0, out=None):
        """``(h @ W[v0:v1].T + b[v0:v1]) * inv_temp`` in the compute dtype (into ``out`` if given)."""
        w = self.weight_block(weight, v0, v1)
        if bias is None:
            z = torch.mm(h, w.t(), out=out)
            if inv_temp != 1.0:
                z.mul_(inv_temp)
            return z
        return torch.addmm(bias[v0:v1].to(self.dtype), h, w.t(), beta=inv_temp, alpha=inv_temp, out=out)

    def logits_slab(self, h, weight, bias, out):
        """The ``(R, vocab_size)`` logits into ``out``; one GEMM, or one per block when the weight
        is upcast."""
        bias = None if bias is None else bias[: self.vocab_size]
        return linear_logits(h, weight[: self.vocab_size], bias, self.dtype, self.vocab_block, out)

    def slab_buffers(self, rows, device):
        """Two ``(rows, vocab_size)`` buffers reused by every chunk: allocating them once keeps
        the allocator from fragmenting (glibc would otherwise keep freed slabs in its heap)."""
        if self._slabs is None or self._slabs[0].shape[0] < rows:
            self._slabs = tuple(torch.empty(rows, self.vocab_size, dtype=self.dtype, device=device) for _ in range(2))
        return self._slabs

    def hidden_grad(self, g, dh_chunk, v0=0, v1=None, accumulate=True):
        """``dh (+)= g @ W_s[v0:v1]``, block by block when the weight must be upcast."""
        v1 = self.vocab_size if v1 is None else v1
        if self.w_s.dtype == self.dtype:
            if accumulate:
                return dh_chunk.addmm_(g, self.w_s[v0:v1])
            return torch.mm(g, self.w_s[v0:v1], out=dh_chunk)
        if not accumulate:
            dh_chunk.zero_()
        for b0 in range(v0, v1, self.vocab_block):
            b1 = min(v1, b0 + self.vocab_block)
            dh_chunk.addmm_(g[:, b0 - v0:b1 - v0], self.weight_block(self.w_s, b0, b1))
        return dh_chunk


def _logits_row_kernel(device, dtype):
    """The per-row kernel of ``fused_turn_kl`` that the slab mode reuses."""
    if dtype == torch.float32 and device.type == "cpu" and logits_native.try_load():
        return logits_native.forward
    if dtype == torch.float32 and logits_triton.is_available(device) and device.type == "cuda":
        return logits_triton.forward
    return logits_torch.forward


def _slab_chunk(heads, rows, targets, divergence, beta, temperature, row_scale, grads):
    dtype = heads.dtype
    h_s = heads.rows(heads.h_s, rows)
    R = h_s.shape[0]
    slab_s, slab_t = heads.slab_buffers(heads.chunk_rows, h_s.device)
    z_s = heads.logits_slab(h_s, heads.w_s, heads.b_s, out=slab_s[:R])
    z_t = heads.logits_slab(heads.rows(heads.h_t, rows), heads.w_t, heads.b_t, out=slab_t[:R])
    keep = torch.ones(1, R, dtype=torch.bool, device=h_s.device)
    tgt = None if targets is None else targets.view(1, R)
    kernel = _logits_row_kernel(h_s.device, dtype)
    want_grad = row_scale is not None
    # the kernel overwrites the student slab with d div / d z_s (temperature included)
    # the row kernel applies the logit maps as it reads the slabs (its gradient is w.r.t. z_s itself)
    div, entropy, logp, logq = kernel(
        z_s.view(1, R, -1), z_t.view(1, R, -1), keep, tgt, divergence, beta, temperature, heads.vocab_size,
        z_s.view(1, R, -1) if want_grad else None,
        student_transform=heads.student_transform, teacher_transform=heads.teacher_transform,
    )
    if want_grad:
        dh, dw, db = grads
        g = z_s  # unscaled per-row gradients; the row scale goes on the R x H side (V/H x cheaper)
        scale = row_scale.to(dtype)[:, None]
        if dh is not None:
            heads.hidden_grad(g, dh, accumulate=False).mul_(scale)
        if dw is not None:
            dw[: heads.vocab_size].addmm_(g.t(), (h_s * scale).to(dw.dtype))
        if db is not None:
            db[: heads.vocab_size].add_(torch.mv(g.t(), scale.squeeze(1)).to(db.dtype))
    return div.view(R), entropy.view(R), logp.view(R), logq.view(R)


def _masked(values_fn, present_fn, guard):
    """``values`` with 0 where not ``present``; the mask is only built when -inf is possible."""
    values = values_fn()
    if not guard:
        return values
    return torch.where(present_fn(), values, torch.zeros((), dtype=values.dtype, device=values.device))


def _shift(m):
    """The running max, or 0 while it is still -inf (never computes -inf - -inf)."""
    return torch.where(torch.isneginf(m), torch.zeros_like(m), m)


def _log_mixture(log_p, log_q, log_1m_beta, log_beta):
    return torch.logaddexp(log_p + log_1m_beta, log_q + log_beta)


def _stream_chunk(heads, rows, targets, divergence, beta, temperature, row_scale, grads):
    """The streaming mode; the units and centring are the logits kernels' (``torch_backend`` of
    ``fused_turn_kl``): raw logits relative to the running maxima before the temperature scales
    them, reverse KL centred on the teacher's logit at the student's argmax."""
    dtype = heads.dtype
    inv_temp = 1.0 / temperature
    h_s = heads.rows(heads.h_s, rows)
    h_t = heads.rows(heads.h_t, rows)
    R = h_s.shape[0]
    guard = heads.may_have_inf

    s_map, t_map = heads.student_transform, heads.teacher_transform

    def student_block(v0, v1, with_derivative=False):
        """The block's logits after the student's map (the temperature is applied after the
        shift), with the map's derivative when asked (None for the identity)."""
        z = heads.logits_block(h_s, heads.w_s, heads.b_s, v0, v1)
        if s_map.identity:
            return (z, None) if with_derivative else z
        return s_map.apply_with_derivative(z, inplace=True) if with_derivative else s_map.apply_(z)

    def teacher_block(v0, v1):
        z = heads.logits_block(h_t, heads.w_t, heads.b_t, v0, v1)
        return z if t_map.identity else t_map.apply_(z)

    m_s = torch.full((R,), float("-inf"), dtype=dtype, device=h_s.device)
    m_t = m_s.clone()
    shift_s = torch.zeros(R, dtype=dtype, device=h_s.device)
    shift_t, centre = shift_s.clone(), shift_s.clone()
    arg_s = torch.zeros(R, dtype=torch.long, device=h_s.device)
    l_s = torch.zeros(R, dtype=dtype, device=h_s.device)
    l_t, acc_div, acc_ent = l_s.clone(), l_s.clone(), l_s.clone()

    # ---- sweep 1: online softmax over the vocabulary blocks ----
    for v0, v1 in heads.blocks:
        z_s, z_t = student_block(v0, v1), teacher_block(v0, v1)
        block_ms, block_arg = z_s.max(1)
        new_ms = torch.maximum(m_s, block_ms)
        new_mt = torch.maximum(m_t, z_t.amax(1))
        new_shift_s, new_shift_t = _shift(new_ms), _shift(new_mt)
        moved_arg = block_ms > m_s
        x_t_at = z_t.gather(1, block_arg[:, None]).squeeze(1)
        new_centre = torch.where(moved_arg, torch.where(torch.isfinite(x_t_at), x_t_at, 0.0), centre)
        arg_s = torch.where(moved_arg, block_arg + v0, arg_s)
        moved_s, moved_t = shift_s - new_shift_s, shift_t - new_shift_t  # raw units, <= 0 once finite
        scale_s = torch.exp((m_s - new_shift_s) * inv_temp)  # 0 while the row was all -inf
        scale_t = torch.exp((m_t - new_shift_t) * inv_temp)
        a_s = z_s - new_shift_s[:, None]
        a_t = z_t - new_shift_t[:, None]
        e_s = torch.exp(a_s * inv_temp)
        e_t = torch.exp(a_t * inv_temp)
        keep_s = scale_s > 0
        ent_block = _masked(lambda: e_s * a_s, lambda: e_s > 0, guard).sum(1)
        acc_ent = torch.where(keep_s, (acc_ent + moved_s * l_s) * scale_s, 0.0) + ent_block
        if divergence == "reverse_kl":
            u = a_s - (z_t - new_centre[:, None])
            acc_div = torch.where(keep_s, (acc_div + l_s * (moved_s - (centre - new_centre))) * scale_s, 0.0)
            acc_div = acc_div + _masked(lambda: e_s * u, lambda: e_s > 0, guard).sum(1)
        elif divergence == "forward_kl":
            acc_div = acc_div - l_t * moved_s
            acc_div = torch.where(scale_t > 0, (acc_div + l_t * moved_t) * scale_t, 0.0)
            acc_div = acc_div + _masked(lambda: e_t * (a_t - a_s), lambda: e_t > 0, guard).sum(1)
        l_s = l_s * scale_s + e_s.sum(1)
        l_t = l_t * scale_t + e_t.sum(1)
        m_s, m_t, shift_s, shift_t, centre = new_ms, new_mt, new_shift_s, new_shift_t, new_centre

    log_l_s, log_l_t = torch.log(l_s), torch.log(l_t)
    entropy = log_l_s - inv_temp * acc_ent / l_s
    kl_p_m = None
    mean_u = acc_div / l_s
    if divergence == "reverse_kl":
        div = (mean_u + (shift_t - centre)) * inv_temp + (log_l_t - log_l_s)
    elif divergence == "forward_kl":
        div = acc_div / l_t * inv_temp + (log_l_s - log_l_t)
    else:
        # ---- sweep 1b (JSD): the mixture needs both normalisers ----
        log_1m_beta = torch.log1p(torch.tensor(-beta, dtype=dtype)).to(h_s.device)
        log_beta = torch.log(torch.tensor(beta, dtype=dtype)).to(h_s.device)
        sum_p = torch.zeros_like(l_s)
        sum_q = torch.zeros_like(l_s)
        for v0, v1 in heads.blocks:
            log_p = (student_block(v0, v1) - shift_s[:, None]).mul_(inv_temp).sub_(log_l_s[:, None])
            log_q = (teacher_block(v0, v1) - shift_t[:, None]).mul_(inv_temp).sub_(log_l_t[:, None])
            p, q = log_p.exp(), log_q.exp()
            log_m = _log_mixture(log_p, log_q, log_1m_beta, log_beta)
            # p or q may underflow to 0 with finite logits (0 * finite = 0); only -inf needs the guard
            sum_p += _masked(lambda: p * (log_p - log_m), lambda: p > 0, guard).sum(1)
            sum_q += _masked(lambda: q * (log_q - log_m), lambda: q > 0, guard).sum(1)
        kl_p_m = sum_p
        div = beta * sum_q + (1.0 - beta) * sum_p

    logp_target = logq_target = None
    if targets is not None:
        # the sampled token's logit as a row dot product: R x H work, no extra vocabulary pass
        z_a = (h_s * heads.w_s[targets].to(dtype)).sum(1)
        zt_a = (h_t * heads.w_t[targets].to(dtype)).sum(1)
        if heads.b_s is not None:
            z_a = z_a + heads.b_s[targets].to(dtype)
        if heads.b_t is not None:
            zt_a = zt_a + heads.b_t[targets].to(dtype)
        if not s_map.identity:
            z_a = s_map.apply(z_a)
        if not t_map.identity:
            zt_a = t_map.apply(zt_a)
        logp_target = (z_a - shift_s) * inv_temp - log_l_s
        logq_target = (zt_a - shift_t) * inv_temp - log_l_t

    # ---- sweep 2: recompute each block, form G, contract it into dh / dW / db ----
    if row_scale is not None:
        dh, dw, db = grads
        scale = (row_scale.to(dtype) * inv_temp)[:, None]
        dh_chunk = dh.zero_() if dh is not None else None
        row_is_nan = torch.isnan(div)[:, None]
        sum_g = torch.zeros_like(l_s)
        for v0, v1 in heads.blocks:
            a_s, dy_dz = student_block(v0, v1, with_derivative=True)
            a_s = a_s.sub_(shift_s[:, None])
            z_t = teacher_block(v0, v1)
            p = torch.exp(a_s * inv_temp - log_l_s[:, None])
            if divergence == "reverse_kl":
                # d KL / d z_s = p (u - mean_u) / T, with u = (x_s - m_s) - (x_t - B)
                g = _masked(
                    lambda: a_s.sub_(z_t.sub_(centre[:, None])).sub_(mean_u[:, None]).mul_(inv_temp).mul_(p),
                    lambda: p > 0, guard,
                )
            elif divergence == "forward_kl":
                g = p.sub_(z_t.sub_(shift_t[:, None]).mul_(inv_temp).sub_(log_l_t[:, None]).exp_())
            else:
                log_p = a_s * inv_temp - log_l_s[:, None]
                log_q = z_t.sub_(shift_t[:, None]).mul_(inv_temp).sub_(log_l_t[:, None])
                log_m = _log_mixture(log_p, log_q, log_1m_beta, log_beta)
                g = _masked(lambda: (1.0 - beta) * p * (log_p - log_m - kl_p_m[:, None]), lambda: p > 0, guard)
            g = g.mul_(scale).masked_fill_(row_is_nan, float("nan"))
            if divergence != "reverse_kl":
                sum_g += g.sum(1)
            if dy_dz is not None:  # chain rule through the student's map
                g = g.mul_(dy_dz)
            if dh_chunk is not None:
                heads.hidden_grad(g, dh_chunk, v0, v1)
            if dw is not None:
                dw[v0:v1].addmm_(g.t(), h_s.to(dw.dtype))
            if db is not None:
                db[v0:v1] += g.sum(0).to(db.dtype)
        if divergence != "reverse_kl":
            _fix_argmax_rank1(heads, h_s, arg_s, log_l_s, sum_g, dh_chunk, dw, db)
    zero = torch.zeros_like(div)
    return div, entropy, (zero if logp_target is None else logp_target), (zero if logq_target is None else logq_target)


def _fix_argmax_rank1(heads, h_s, arg_s, log_l_s, sum_g, dh, dw, db):
    """Forward KL and JSD: where ``p_a > 1/2`` at the student's argmax ``a``, replace ``G[r, a]`` by
    ``-sum_{v != a} G[r, v]`` (the two cancel there in the one-hot limit; every row of ``G`` sums
    to 0), i.e. add ``delta = -sum_v G[r, v]`` to ``G[r, a]``: a rank-1 update of the contracted
    gradients, since ``G`` itself is never stored."""
    peaked = (log_l_s < _LOG_2) & torch.isfinite(sum_g)  # p_a = 1 / l_s
    delta = torch.where(peaked, -sum_g, torch.zeros_like(sum_g))
    if not heads.student_transform.identity:  # d div / d y_a times the map's derivative at a
        z_a = (h_s * heads.w_s[arg_s].to(h_s.dtype)).sum(1)
        if heads.b_s is not None:
            z_a = z_a + heads.b_s[arg_s].to(h_s.dtype)
        delta = delta * heads.student_transform.derivative(z_a)
    if dh is not None:
        dh.add_(delta[:, None] * heads.w_s[arg_s].to(dh.dtype))
    if dw is not None:
        dw.index_add_(0, arg_s, (delta[:, None] * h_s).to(dw.dtype))
    if db is not None:
        db.index_add_(0, arg_s, delta.to(db.dtype))


def forward(
    student_hidden,
    student_weight,
    student_bias,
    teacher_hidden,
    teacher_weight,
    teacher_bias,
    kept_rows,
    target_ids,
    divergence,
    beta,
    temperature,
    vocab_size,
    row_scale=None,
    want_hidden_grad=False,
    weight_grad=None,
    bias_grad=None,
    chunk_rows=None,
    vocab_block=None,
    mode="slab",
    student_transform=IDENTITY,
    teacher_transform=IDENTITY,
):
    """Per-kept-row stats and (optionally) gradients of the fused linear divergence.

    Backend contract (the Triton backend implements the same ``forward``):

    Args:
        student_hidden: ``(B, T, H_s)`` any float dtype, any row strides.
        student_weight: ``(V_s, H_s)``; student_bias ``(V_s,)`` or None.
        teacher_hidden, teacher_weight, teacher_bias: the same for the teacher (``H_t``, ``V_t``).
        kept_rows: ``(n_kept,)`` int64 flat indices ``b * T + t`` of the rows to compute.
        target_ids: ``(B*T,)`` int64 or None (sampled tokens, ``< vocab_size``).
        divergence, beta, temperature, vocab_size: as in ``fused_turn_kl`` (validated).
        row_scale: ``(n_kept,)`` float, the factor each row's divergence gradient is multiplied
            by (the reduction's coefficient or the incoming per-token gradient); None = no grads.
        want_hidden_grad: return ``dh`` (``(n_kept, H_s)``, compute dtype).
        weight_grad: ``(V_s, H_s)`` compute-dtype buffer the weight gradient is ADDED to, or None.
        bias_grad: ``(V_s,)`` compute-dtype buffer the bias gradient is added to, or None.
        chunk_rows, vocab_block: tiling (defaults: ``default_chunk_rows``, ``DEFAULT_VOCAB_BLOCK``).
        mode: ``"slab"`` or ``"stream"`` (the module docstring describes both).
        student_transform, teacher_transform: each side's
            :class:`~tcod_fast.ops.logit_transform.LogitTransform` (soft cap, scale), applied to
            the float32 logits of each block as they are formed; the gradients are w.r.t. the
            untransformed logits ``h @ W.T + b``.

    Returns:
        ``(div, entropy, logp_target, logq_target, dh)``: ``(n_kept,)`` each, float32 (float64
        when the student is float64); the log-probs are 0 without targets and ``dh`` is None
        unless asked for.
    """
    if divergence not in DIVERGENCES:
        raise ValueError(f"divergence must be one of {DIVERGENCES}, got {divergence!r}")
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    float64 = torch.float64 in (student_hidden.dtype, student_weight.dtype)
    dtype = torch.float64 if float64 else torch.float32
    vocab_block = min(vocab_block or DEFAULT_VOCAB_BLOCK, vocab_size)
    heads = _Heads(
        student_hidden, student_weight, student_bias, teacher_hidden, teacher_weight, teacher_bias,
        dtype, vocab_size, vocab_block, student_transform, teacher_transform,
    )
    chunk_rows = min(chunk_rows or default_chunk_rows(vocab_size), max(1, kept_rows.shape[0]))
    heads.chunk_rows = chunk_rows
    process_chunk = _slab_chunk if mode == "slab" else _stream_chunk
    n_kept = kept_rows.shape[0]
    device = student_hidden.device
    outs = [torch.zeros(n_kept, dtype=dtype, device=device) for _ in range(4)]
    dh = None
    if row_scale is not None and want_hidden_grad:
        dh = torch.empty(n_kept, student_weight.shape[1], dtype=dtype, device=device)
    for start in range(0, n_kept, chunk_rows):
        stop = min(n_kept, start + chunk_rows)
        rows = kept_rows[start:stop]
        targets = None if target_ids is None else target_ids[rows]
        scale = None if row_scale is None else row_scale[start:stop]
        grads = (None if dh is None else dh[start:stop], weight_grad, bias_grad)
        results = process_chunk(heads, rows, targets, divergence, beta, temperature, scale, grads)
        for out, value in zip(outs, results):
            out[start:stop] = value
    return (*outs, dh)
