"""``torch`` backend of ``fused_linear_turn_kl``: chunked over rows and vocabulary, any device.

For one chunk of ``R`` kept rows (rows that are masked out are never gathered, so they cost no
matmul work) the vocabulary is streamed in blocks of ``BV`` columns:

* **sweep 1** forms each logits block ``z = (h @ W[v0:v1].T + b[v0:v1]) / temperature`` in
  float32 (hidden rows and weight block are upcast per block; the logits are never rounded to
  the input dtype) and feeds it to the online-softmax recurrences of DESIGN.md section 2:
  running maxima ``m_s, m_t``, sums ``l_s, l_t``, ``A = sum e_s (z_s - z_t)`` (reverse KL) or
  ``sum e_t (z_t - z_s)`` (forward KL) and ``B = sum e_s z_s`` (entropy), all rescaled by
  ``exp(m_old - m_new)``.
* **sweep 1b** (JSD only): ``KL(p||m)`` and ``KL(q||m)`` need both log-normalisers first.
* **sweep 2** (only when gradients are wanted) forms the logits-gradient block
  ``G = row_scale * d div / d z_s / temperature`` and accumulates ``dh += G @ W_blk`` and
  ``dW[v0:v1] += G.T @ h``, ``db[v0:v1] += G.sum(0)``, all in float32.

Two modes for the logits blocks of sweep 2:

* ``cache_logits=True`` (default): the chunk's float32 student and teacher logits blocks from
  sweep 1 are kept until sweep 2 (``2 * R * V`` floats). Then each of the four GEMMs (student
  and teacher logits, ``dh``, ``dW``) runs exactly once, as in the unfused path.
* ``cache_logits=False``: sweep 2 recomputes the blocks (two more GEMMs, 1.5x the FLOPs) and
  the working set shrinks to ``O(R * BV)``, for vocabularies where even ``R * V`` is too much.

Peak extra memory, in float32 elements (``H = max(H_s, H_t)``):

    cache_logits=True : 2*R*V      + ~6*R*BV + 2*BV*H + R*(H_s + H_t)
    cache_logits=False:               ~6*R*BV + 2*BV*H + R*(H_s + H_t)

plus the outputs the caller asks for: ``dh`` (``n_kept x H_s``), the float32 ``dW`` accumulator
(``V_s x H_s``) and ``db`` (``V_s``). Nothing scales with ``N x V``.
"""

from __future__ import annotations

import torch

from tcod_fast.ops.turn_kl.result import DIVERGENCES

# Target bytes of the chunk's two cached float32 logits slabs (student + teacher, R x V each).
CACHE_BYTES = 32 * 1024 * 1024
DEFAULT_VOCAB_BLOCK = 4096
CACHE_LOGITS = True
_MIN_ROWS, _MAX_ROWS = 16, 1024


def default_chunk_rows(vocab_size: int) -> int:
    """Rows per chunk so that the two cached ``R x V`` float32 slabs take about ``CACHE_BYTES``."""
    rows = CACHE_BYTES // (2 * 4 * vocab_size)
    return int(min(_MAX_ROWS, max(_MIN_ROWS, rows)))


class _Inputs:
    """The two LM heads and the row gather (flat kept index -> (b, t) of the 3-D hidden)."""

    def __init__(self, h_s, w_s, b_s, h_t, w_t, b_t, compute_dtype):
        self.h_s, self.w_s, self.b_s = h_s, w_s, b_s
        self.h_t, self.w_t, self.b_t = h_t, w_t, b_t
        self.T = h_s.shape[1]
        self.dtype = compute_dtype
        # -inf can only enter the logits through a bias (banned / padded vocabulary entries);
        # without one the 0 * inf guards are skipped.
        self.may_have_inf = b_s is not None or b_t is not None

    def rows(self, hidden, flat_rows):
        # advanced indexing on (b, t) reads any row strides without an N x H copy
        return hidden[flat_rows // self.T, flat_rows % self.T].to(self.dtype)


def _weight_block(weight, v0, v1, dtype):
    block = weight[v0:v1]
    return block if block.dtype == dtype else block.to(dtype)


def _logits_block(h, weight, bias, v0, v1, inv_temp, dtype):
    """``(h @ W[v0:v1].T + b[v0:v1]) * inv_temp`` in ``dtype`` (float32 or float64)."""
    w = _weight_block(weight, v0, v1, dtype)
    if bias is None:
        z = torch.mm(h, w.t())
        if inv_temp != 1.0:
            z.mul_(inv_temp)
        return z
    return torch.addmm(bias[v0:v1].to(dtype), h, w.t(), beta=inv_temp, alpha=inv_temp)


def _masked(values, present, guard):
    return torch.where(present, values, torch.zeros((), dtype=values.dtype, device=values.device)) if guard else values


def _shift(m):
    """The running max, or 0 while it is still -inf (never computes -inf - -inf)."""
    return torch.where(torch.isneginf(m), torch.zeros_like(m), m)


def _log_mixture(log_p, log_q, log_1m_beta, log_beta):
    return torch.logaddexp(log_p + log_1m_beta, log_q + log_beta)


def _chunk(inp, rows, targets, divergence, beta, inv_temp, vocab_size, vocab_block, cache_logits, row_scale, grads):
    """Stats (and gradient contributions) of one chunk of kept rows; see the module docstring."""
    dtype = inp.dtype
    h_s = inp.rows(inp.h_s, rows)
    h_t = inp.rows(inp.h_t, rows)
    R = h_s.shape[0]
    guard = inp.may_have_inf
    neg_inf = torch.full((R,), float("-inf"), dtype=dtype, device=h_s.device)
    m_s, m_t = neg_inf, neg_inf.clone()
    l_s = torch.zeros(R, dtype=dtype, device=h_s.device)
    l_t, acc_div, acc_ent = l_s.clone(), l_s.clone(), l_s.clone()
    blocks = [(v0, min(vocab_size, v0 + vocab_block)) for v0 in range(0, vocab_size, vocab_block)]
    cache = []

    # ---- sweep 1: online softmax over the vocabulary blocks ----
    for v0, v1 in blocks:
        z_s = _logits_block(h_s, inp.w_s, inp.b_s, v0, v1, inv_temp, dtype)
        z_t = _logits_block(h_t, inp.w_t, inp.b_t, v0, v1, inv_temp, dtype)
        if cache_logits:
            cache.append((z_s, z_t))
        new_ms = torch.maximum(m_s, z_s.amax(1))
        new_mt = torch.maximum(m_t, z_t.amax(1))
        shift_s, shift_t = _shift(new_ms), _shift(new_mt)
        scale_s, scale_t = torch.exp(m_s - shift_s), torch.exp(m_t - shift_t)
        e_s = torch.exp(z_s - shift_s[:, None])
        l_s = l_s * scale_s + e_s.sum(1)
        acc_ent = acc_ent * scale_s + _masked(e_s * z_s, e_s > 0, guard).sum(1)
        if divergence == "reverse_kl":
            acc_div = acc_div * scale_s + _masked(e_s * (z_s - z_t), e_s > 0, guard).sum(1)
            e_t = torch.exp(z_t - shift_t[:, None])
            l_t = l_t * scale_t + e_t.sum(1)
        else:
            e_t = torch.exp(z_t - shift_t[:, None])
            l_t = l_t * scale_t + e_t.sum(1)
            if divergence == "forward_kl":
                acc_div = acc_div * scale_t + _masked(e_t * (z_t - z_s), e_t > 0, guard).sum(1)
        m_s, m_t = new_ms, new_mt

    lse_s = m_s + torch.log(l_s)
    lse_t = m_t + torch.log(l_t)
    entropy = lse_s - acc_ent / l_s
    kl_p_m = None
    if divergence == "reverse_kl":
        div = acc_div / l_s - lse_s + lse_t
    elif divergence == "forward_kl":
        div = acc_div / l_t - lse_t + lse_s
    else:
        # ---- sweep 1b (JSD): the mixture needs both normalisers ----
        log_1m_beta = torch.log1p(torch.tensor(-beta, dtype=dtype)).to(h_s.device)
        log_beta = torch.log(torch.tensor(beta, dtype=dtype)).to(h_s.device)
        sum_p = torch.zeros_like(l_s)
        sum_q = torch.zeros_like(l_s)
        for i, (v0, v1) in enumerate(blocks):
            z_s, z_t = cache[i] if cache_logits else (
                _logits_block(h_s, inp.w_s, inp.b_s, v0, v1, inv_temp, dtype),
                _logits_block(h_t, inp.w_t, inp.b_t, v0, v1, inv_temp, dtype),
            )
            log_p, log_q = z_s - lse_s[:, None], z_t - lse_t[:, None]
            p, q = log_p.exp(), log_q.exp()
            log_m = _log_mixture(log_p, log_q, log_1m_beta, log_beta)
            # p or q can underflow to 0 even with finite logits; 0 * finite is 0, so the guard is
            # needed only where -inf logits can occur.
            sum_p += _masked(p * (log_p - log_m), p > 0, guard).sum(1)
            sum_q += _masked(q * (log_q - log_m), q > 0, guard).sum(1)
        kl_p_m = sum_p
        div = beta * sum_q + (1.0 - beta) * sum_p

    logp_target = logq_target = None
    if targets is not None:
        # the sampled token's logit as a row dot product: R x H work, no extra vocab pass
        z_a = (h_s * inp.w_s[targets].to(dtype)).sum(1)
        zt_a = (h_t * inp.w_t[targets].to(dtype)).sum(1)
        if inp.b_s is not None:
            z_a = z_a + inp.b_s[targets].to(dtype)
        if inp.b_t is not None:
            zt_a = zt_a + inp.b_t[targets].to(dtype)
        logp_target = z_a * inv_temp - lse_s
        logq_target = zt_a * inv_temp - lse_t

    # ---- sweep 2: logits gradient G, then the three GEMM-shaped accumulations ----
    if row_scale is not None:
        dh, dw, db = grads
        scale = (row_scale.to(dtype) * inv_temp)[:, None]
        dh_chunk = torch.zeros(R, inp.w_s.shape[1], dtype=dtype, device=h_s.device) if dh is not None else None
        for i, (v0, v1) in enumerate(blocks):
            if cache_logits:
                z_s, z_t = cache[i]
                cache[i] = None  # free each slab as soon as it is used
            else:
                z_s = _logits_block(h_s, inp.w_s, inp.b_s, v0, v1, inv_temp, dtype)
                z_t = _logits_block(h_t, inp.w_t, inp.b_t, v0, v1, inv_temp, dtype)
            log_p = z_s.sub_(lse_s[:, None])  # in place: the slab is not needed afterwards
            p = torch.exp(log_p)
            if divergence == "reverse_kl":
                # d KL(p||q) / d z_s = p (log p - log q - KL)
                g = z_t.sub_((lse_t - div)[:, None]).neg_().add_(log_p).mul_(p)
                g = _masked(g, p > 0, guard)
            elif divergence == "forward_kl":
                g = p.sub_(z_t.sub_(lse_t[:, None]).exp_())
            else:
                log_q = z_t.sub_(lse_t[:, None])
                log_m = _log_mixture(log_p, log_q, log_1m_beta, log_beta)
                g = _masked((1.0 - beta) * p * (log_p - log_m - kl_p_m[:, None]), p > 0, guard)
            g.mul_(scale)
            if dh_chunk is not None:
                dh_chunk.addmm_(g, _weight_block(inp.w_s, v0, v1, dtype))
            if dw is not None:
                dw[v0:v1].addmm_(g.t(), h_s.to(dw.dtype))
            if db is not None:
                db[v0:v1] += g.sum(0).to(db.dtype)
        if dh is not None:
            dh.append(dh_chunk)
    return div, entropy, lse_s, lse_t, logp_target, logq_target


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
    cache_logits=None,
):
    """Per-kept-row stats and (optionally) gradients of the fused linear divergence.

    Args:
        student_hidden: ``(B, T, H_s)`` any float dtype, any row strides.
        student_weight: ``(V_s, H_s)``; student_bias ``(V_s,)`` or None.
        teacher_hidden, teacher_weight, teacher_bias: the same for the teacher (``H_t``, ``V_t``).
        kept_rows: ``(n_kept,)`` int64 flat indices ``b * T + t`` of the rows to compute.
        target_ids: ``(B*T,)`` int64 or None (sampled tokens, ``< vocab_size``).
        row_scale: ``(n_kept,)`` float, the factor each row's divergence gradient is multiplied
            by (the reduction's coefficient or the incoming per-token gradient); None = no grads.
        want_hidden_grad: return ``dh`` (``(n_kept, H_s)``, compute dtype).
        weight_grad: float32/float64 ``(V_s, H_s)`` buffer the weight gradient is ADDED to, or None.
        bias_grad: float ``(V_s,)`` buffer the bias gradient is added to, or None.

    Returns:
        ``(div, entropy, lse_s, lse_t, logp_target, logq_target, dh)``: per kept row, float32
        (float64 when the student is float64); the log-probs are None without targets and
        ``dh`` is None unless asked for.
    """
    if divergence not in DIVERGENCES:
        raise ValueError(f"divergence must be one of {DIVERGENCES}, got {divergence!r}")
    float64 = torch.float64 in (student_hidden.dtype, student_weight.dtype)
    dtype = torch.float64 if float64 else torch.float32
    inp = _Inputs(student_hidden, student_weight, student_bias, teacher_hidden, teacher_weight, teacher_bias, dtype)
    chunk_rows = chunk_rows or default_chunk_rows(vocab_size)
    vocab_block = min(vocab_block or DEFAULT_VOCAB_BLOCK, vocab_size)
    cache_logits = CACHE_LOGITS if cache_logits is None else cache_logits
    inv_temp = 1.0 / temperature
    n_kept = kept_rows.shape[0]
    device = student_hidden.device
    outs = [torch.zeros(n_kept, dtype=dtype, device=device) for _ in range(6)]
    dh_parts = [] if (row_scale is not None and want_hidden_grad) else None
    grads = (dh_parts, weight_grad, bias_grad)
    for start in range(0, n_kept, chunk_rows):
        stop = min(n_kept, start + chunk_rows)
        rows = kept_rows[start:stop]
        targets = None if target_ids is None else target_ids[rows]
        scale = None if row_scale is None else row_scale[start:stop]
        results = _chunk(
            inp, rows, targets, divergence, beta, inv_temp, vocab_size, vocab_block, cache_logits, scale, grads
        )
        for out, value in zip(outs, results):
            if value is not None:
                out[start:stop] = value
    div, entropy, lse_s, lse_t, logp, logq = outs
    has_target = target_ids is not None
    dh = None
    if dh_parts is not None:
        dh = torch.cat(dh_parts) if dh_parts else torch.zeros(0, student_weight.shape[1], dtype=dtype, device=device)
    return div, entropy, lse_s, lse_t, (logp if has_target else None), (logq if has_target else None), dh
