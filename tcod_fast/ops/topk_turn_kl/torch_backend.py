"""``torch`` backend of ``fused_topk_turn_kl``: plain PyTorch, chunked over rows, any device.

It never holds more than a few ``chunk_rows x V`` float32 intermediates, so memory stays bounded
however many tokens there are. It is the portable fallback and the readable statement of what
the native and Triton kernels compute.

Backend contract (shared by all three backends):
    forward(student, topk_ids, topk_logprobs, keep, target_ids, divergence, beta, temperature,
            tail, tail_eps, grad, grad_scale=None, want_entropy=True)
        student ``(B, T, V)`` (last dim contiguous, any row strides); topk_ids ``(B, T, K)`` int32,
        each row sorted ascending with ``PAD_ID`` (>= V) in padded slots
        (``tcod_fast.ops.topk.prepare_topk``); topk_logprobs ``(B, T, K)`` float (0 at padding);
        keep ``(B, T)`` bool; target_ids ``(B, T)`` int64 or None; grad ``(B, T, V)`` in the
        student's dtype or None (may alias ``student``).
    returns ``(div, entropy, logp_target, logq_target)``, each ``(B, T)`` float32 (float64 for
    float64 logits), 0 at rows that are not kept; ``logq_target`` is NaN where the target is not
    among the row's top-k. When ``grad`` is given it receives ``grad_scale * d div / d student``
    (0 at dropped rows). ``want_entropy=False`` allows a backend to return zeros for the entropy.
    ``student_transform`` (keyword, default the identity): the student logits'
    :class:`~tcod_fast.ops.logit_transform.LogitTransform` (soft cap, scale), applied as they are
    read, before the temperature; ``grad`` is then w.r.t. the untransformed logits.

The math, per row (``z = student / temperature``, ``L = logsumexp(z)``, ``S`` the valid ids):
    ``tail="bucket"``: outcomes ``S`` plus one tail. ``log P_tail = logsumexp(z over the
    complement) - L`` (summed over the complement itself, never ``1 - sum``), ``Q_tail =
    max(1 - sum_S q, tail_eps)``; no tail outcome when ``S`` covers the whole vocabulary.
    ``tail="renormalize"``: outcomes ``S`` only, both sides renormalised over ``S``.
    With ``pi_o`` the student's outcome probabilities and ``q_o`` the teacher's, and ``o(v)`` the
    outcome of column ``v`` (its own id in ``S``, else the tail):
        reverse KL  D = sum pi (log pi - log q)           dD/dz_v = p_v (log pi_o(v) - log q_o(v) - D)
        forward KL  D = sum q (log q - log pi)            dD/dz_v = p_v sum_o q_o - q_o(v) p_v / pi_o(v)
        JSD(beta)   D = beta KL(q||m) + (1-beta) KL(pi||m), m = (1-beta) pi + beta q
                                                          dD/dz_v = (1-beta) p_v (log pi_o(v) - log m_o(v) - KL(pi||m))
    (``p_v`` the full-vocabulary softmax; in renormalize mode ``p_v`` is replaced by ``pi_v`` and
    columns outside ``S`` get 0). ``d/d student = (1/temperature) d/dz``.
"""

from __future__ import annotations

import math

import torch

from tcod_fast.ops.logit_transform import IDENTITY

# Target size of one float32 (chunk_rows x V) intermediate; a few of them live at once.
_CHUNK_BYTES = 32 * 1024 * 1024


def _chunk_rows(vocab: int) -> int:
    return max(1, _CHUNK_BYTES // (4 * vocab))


def _logaddexp(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``log(exp a + exp b)`` that is ``-inf`` (not NaN) when both are ``-inf``."""
    hi = torch.maximum(a, b)
    lo = torch.minimum(a, b)
    safe_hi = torch.where(torch.isneginf(hi), torch.zeros_like(hi), hi)
    return torch.where(torch.isneginf(hi), hi, hi + torch.log1p(torch.exp(lo - safe_hi)))


def _masked_logsumexp(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """logsumexp over the last dim of the entries where ``mask`` (``-inf`` where none is finite)."""
    x = torch.where(mask, x, torch.full_like(x, -math.inf))
    hi = x.amax(-1, keepdim=True)
    safe_hi = torch.where(torch.isneginf(hi), torch.zeros_like(hi), hi)
    out = safe_hi + torch.log(torch.exp(x - safe_hi).sum(-1, keepdim=True))
    return out.squeeze(-1)


def sparse_terms(log_pi, log_q, divergence, beta):
    """The divergence over a row's outcomes and its derivatives, from log-probabilities.

    Args:
        log_pi, log_q: ``(R, O)`` float64 student / teacher outcome log-probabilities (``-inf`` for
            an absent outcome; the teacher's need not sum to 1, e.g. at the ``tail_eps`` floor).
    Returns:
        ``(D, coef, per_p, per_ratio)``: ``D (R,)``; ``coef (R, O)`` = ``dD/dz`` at a column that is
        the outcome itself (its own id); for a column ``v`` inside an outcome of several columns
        (the tail, last outcome) ``dD/dz_v = p_v per_p - (p_v / pi_tail) per_ratio`` (``per_p``,
        ``per_ratio`` (R,), for the last outcome).
    """
    pi = log_pi.exp()
    q = log_q.exp()
    has_pi = pi > 0
    has_q = q > 0
    zero = torch.zeros_like(pi)
    if divergence == "jsd" and beta == 1.0:
        divergence = "reverse_kl"
    if divergence == "jsd" and beta == 0.0:
        divergence = "forward_kl"
    if divergence == "reverse_kl":
        ratio = torch.where(has_pi, log_pi - torch.where(has_pi, log_q, zero), zero)
        D = torch.where(has_pi, pi * ratio, zero).sum(-1)
        coef = torch.where(has_pi, pi * (ratio - D[:, None]), zero)
        per_p = torch.where(has_pi[:, -1], ratio[:, -1] - D, D * 0)
        per_ratio = torch.zeros_like(D)
    elif divergence == "forward_kl":
        D = torch.where(has_q, q * (log_q - torch.where(has_q, log_pi, zero)), zero).sum(-1)
        q_total = q.sum(-1)
        coef = pi * q_total[:, None] - q
        per_p = q_total
        per_ratio = q[:, -1]
    elif divergence == "jsd":
        log_m = _logaddexp(log_pi + math.log1p(-beta), log_q + math.log(beta))
        rho = torch.where(has_pi, log_pi - torch.where(has_pi, log_m, zero), zero)
        kl_pm = torch.where(has_pi, pi * rho, zero).sum(-1)
        kl_qm = torch.where(has_q, q * (log_q - torch.where(has_q, log_m, zero)), zero).sum(-1)
        D = beta * kl_qm + (1.0 - beta) * kl_pm
        coef = torch.where(has_pi, (1.0 - beta) * pi * (rho - kl_pm[:, None]), zero)
        per_p = torch.where(has_pi[:, -1], (1.0 - beta) * (rho[:, -1] - kl_pm), D * 0)
        per_ratio = torch.zeros_like(D)
    else:
        raise ValueError(f"unknown divergence {divergence!r}")
    return D, coef, per_p, per_ratio


def rows_forward(z, ids, logq, divergence, beta, tail, tail_eps, need_normaliser, want_grad, target):
    """One chunk of rows. ``z (R, V)`` already divided by the temperature (float32/float64).

    Returns ``(div, entropy, logp_target, logq_target, grad)`` with ``grad = d div / d z`` (R, V)
    or None; row quantities in float64.
    """
    R, V = z.shape
    ids = ids.long()
    valid = ids < V
    gather_ids = torch.where(valid, ids, torch.zeros_like(ids))
    z_k = torch.where(valid, z.gather(1, gather_ids), torch.full_like(logq, -math.inf, dtype=z.dtype)).double()
    lse_k = _masked_logsumexp(z_k, valid)
    logq = torch.where(valid, logq.double(), torch.full_like(logq, -math.inf, dtype=torch.float64))

    # One (R, V + 1) buffer holds exp(z - shift) over the complement and then the gradient; its
    # spare last column takes the writes of padded top-k slots.
    spare_ids = torch.where(valid, ids, torch.full_like(ids, V))
    wide = torch.empty(R, V + 1, dtype=z.dtype, device=z.device)
    e = shift = l_c = None
    need_stream = tail == "bucket" or need_normaliser
    if need_stream:
        in_topk = torch.zeros(R, V + 1, dtype=torch.bool, device=z.device)
        in_topk.scatter_(1, spare_ids, True)
        z_c = z.masked_fill(in_topk[:, :V], -math.inf)  # the complement of the top-k
        m_c = z_c.amax(1)
        shift = torch.where(torch.isneginf(m_c), torch.zeros_like(m_c), m_c)
        e = torch.sub(z_c, shift[:, None], out=wide[:, :V]).exp_()
        del z_c, in_topk
        l_c = e.sum(1).double()
        lse_c = shift.double() + torch.log(l_c)
        L = _logaddexp(lse_c, lse_k)
    has_tail = valid.sum(1) < V
    minus_inf = torch.full((R, 1), -math.inf, dtype=torch.float64, device=z.device)

    if tail == "bucket":
        log_pi = torch.cat([z_k - L[:, None], (lse_c - L)[:, None]], 1)
        q_tail = torch.clamp_min(1.0 - logq.exp().sum(1), tail_eps)
        log_q_tail = torch.where(has_tail, q_tail.log(), minus_inf.squeeze(1))
        log_q = torch.cat([logq, log_q_tail[:, None]], 1)
    else:
        any_valid = valid.any(1, keepdim=True)
        lse_k_safe = torch.where(any_valid.squeeze(1), lse_k, torch.zeros_like(lse_k))
        lse_q = _masked_logsumexp(logq, valid)
        lse_q_safe = torch.where(any_valid.squeeze(1), lse_q, torch.zeros_like(lse_q))
        log_pi = torch.cat([torch.where(valid, z_k - lse_k_safe[:, None], z_k), minus_inf], 1)
        log_q = torch.cat([torch.where(valid, logq - lse_q_safe[:, None], logq), minus_inf], 1)
    D, coef, per_p, per_ratio = sparse_terms(log_pi, log_q, divergence, beta)
    # a NaN logit the divergence depends on is reported, never hidden by the pi > 0 masks
    nan_row = torch.isnan(lse_k) | (torch.isnan(L) if tail == "bucket" else torch.zeros_like(lse_k, dtype=torch.bool))
    D = torch.where(nan_row, torch.full_like(D, math.nan), D)

    entropy = torch.zeros(R, dtype=torch.float64, device=z.device)
    logp_target = torch.zeros_like(entropy)
    logq_target = torch.zeros_like(entropy)
    if need_normaliser:
        p_k = torch.exp(z_k - L[:, None])
        ent_k = torch.where(p_k > 0, p_k * (z_k - L[:, None]), torch.zeros_like(p_k)).sum(1)
        ent_c = torch.where(e > 0, e * (z - shift[:, None]), torch.zeros_like(e)).sum(1).double()
        scale_c = torch.exp(shift.double() - L)
        complement = torch.where(l_c > 0, scale_c * (ent_c + (shift.double() - L) * l_c), torch.zeros_like(l_c))
        entropy = -(ent_k + complement)
        if target is not None:
            logp_target = z.gather(1, target[:, None]).squeeze(1).double() - L
            hit = (ids == target[:, None]) & valid
            found = torch.where(hit, logq, torch.zeros_like(logq)).sum(1)
            logq_target = torch.where(hit.any(1), found, torch.full_like(found, math.nan))

    grad = None
    if want_grad:
        if tail == "bucket":
            # complement columns: p_v per_p - (p_v / P_tail) per_ratio, with p_v = e_v exp(shift - L)
            # and p_v / P_tail = e_v / l_c (bounded even when P_tail underflows)
            ratio_term = torch.where(l_c > 0, per_ratio / torch.where(l_c > 0, l_c, torch.ones_like(l_c)), l_c * 0)
            factor = torch.where(l_c > 0, torch.exp(shift.double() - L) * per_p - ratio_term, l_c * 0)
            e.mul_(factor.to(e.dtype)[:, None])  # top-k columns of e are 0
        else:
            wide.zero_()
        wide.scatter_(1, spare_ids, coef[:, :-1].to(wide.dtype))
        grad = wide[:, :V]
    return D, entropy, logp_target, logq_target, grad


def forward(
    student, topk_ids, topk_logprobs, keep, target_ids, divergence, beta, temperature, tail, tail_eps, grad,
    grad_scale=None, want_entropy=True, student_transform=IDENTITY,
):
    B, T = keep.shape
    N = B * T
    V = student.shape[-1]
    inv_temp = 1.0 / temperature
    compute_dtype = torch.float64 if student.dtype == torch.float64 else torch.float32
    s_rows = student.reshape(N, V)
    ids_rows = topk_ids.reshape(N, -1)
    logq_rows = topk_logprobs.reshape(N, -1)
    keep_rows = keep.reshape(N)
    tgt_rows = None if target_ids is None else target_ids.reshape(N)
    scale_rows = None if grad_scale is None else grad_scale.reshape(N).to(compute_dtype)
    try:
        grad_rows = None if grad is None else grad.view(N, V)
    except RuntimeError:
        grad_rows = None
    outs = [torch.zeros(N, dtype=compute_dtype, device=student.device) for _ in range(4)]
    need_normaliser = want_entropy or target_ids is not None
    step = _chunk_rows(V)
    for start in range(0, N, step):
        stop = min(N, start + step)
        z = s_rows[start:stop].to(compute_dtype)
        if not student_transform.identity:  # in place over a converted copy, else into a new chunk
            z = student_transform.apply_(z) if student.dtype != compute_dtype else student_transform.apply(z)
            if inv_temp != 1.0:
                z = z.mul_(inv_temp)
        elif inv_temp != 1.0:
            z = z * inv_temp
        tgt = None if tgt_rows is None else tgt_rows[start:stop]
        results = rows_forward(
            z, ids_rows[start:stop], logq_rows[start:stop], divergence, beta, tail, tail_eps, need_normaliser,
            grad is not None, tgt,
        )
        k = keep_rows[start:stop]
        for out, value in zip(outs, results[:4]):
            out[start:stop] = torch.where(k, value.to(compute_dtype), torch.zeros((), dtype=compute_dtype, device=k.device))
        if not want_entropy:
            outs[1][start:stop] = 0
        if grad is not None:
            g = results[4]
            if not student_transform.identity:  # chain rule, at the raw logits (not yet overwritten)
                g = g.mul_(student_transform.derivative(s_rows[start:stop].to(compute_dtype)))
            row_factor = torch.where(k, torch.full_like(k, inv_temp, dtype=compute_dtype), torch.zeros_like(k, dtype=compute_dtype))
            if scale_rows is not None:
                row_factor = row_factor * scale_rows[start:stop]
            # where, not multiply: a dropped row may hold NaN or inf
            g = torch.where(k[:, None], g * row_factor[:, None], torch.zeros((), dtype=g.dtype, device=g.device))
            if grad_rows is not None:
                grad_rows[start:stop] = g
            else:  # rows of a target that cannot be flattened: index (b, t) directly
                idx = torch.arange(start, stop, device=grad.device)
                grad[idx // T, idx % T] = g.to(grad.dtype)
    return tuple(o.view(B, T) for o in outs)
