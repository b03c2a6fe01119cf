"""``torch`` backend: plain PyTorch, chunked over rows.

Works on any device. It never holds more than ``chunk_rows x V`` float32 intermediates (a few
of them), so memory stays bounded however many tokens there are; it is the portable fallback
and the readable statement of what the native and Triton kernels compute.

Backend contract (shared by all three backends):
    forward(student, teacher, keep, target_ids, divergence, beta, temperature, vocab_size, grad,
            grad_scale=None)
        student ``(B, T, V_s)``, teacher ``(B, T, V_t)`` (last dim contiguous, any row strides),
        keep ``(B, T)`` bool, target_ids ``(B, T)`` int64 or None, grad ``(B, T, V_s)`` in the
        student's dtype or None (may alias ``student`` for the in-place mode).
    returns ``(div, entropy, logp_target, logq_target)``, each ``(B, T)`` float32, 0 at rows
    that are not kept. When ``grad`` is given it receives ``d div / d student`` per row (0 at
    dropped rows and at columns >= vocab_size), multiplied per row by ``grad_scale`` ``(B, T)``
    when it is given (the reduction's coefficients, so backward usually has nothing to do).
    ``student_transform``, ``teacher_transform`` (keywords, default the identity): each side's
    :class:`~tcod_fast.ops.logit_transform.LogitTransform` (soft cap, scale), applied to the
    logits as they are read, before the temperature; ``grad`` is then w.r.t. the untransformed
    student logits.
"""

from __future__ import annotations

import math

import torch

from tcod_fast.ops.common import DIVERGENCES
from tcod_fast.ops.logit_transform import IDENTITY

# Target size of one float32 (chunk_rows x V) intermediate; about six of them live at once.
_CHUNK_BYTES = 32 * 1024 * 1024


def _chunk_rows(vocab_size: int) -> int:
    return max(1, _CHUNK_BYTES // (4 * vocab_size))


def _anchor(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Row max of raw logits ``(R, 1)`` (0 for an all ``-inf`` row, NaN for a row with NaN) and its
    first index."""
    x_max, at = x.max(dim=-1, keepdim=True)  # propagates NaN: a NaN row stays NaN throughout
    return torch.where(x_max == float("-inf"), torch.zeros_like(x_max), x_max), at


def _fix_argmax(grad: torch.Tensor, p: torch.Tensor, at: torch.Tensor) -> torch.Tensor:
    """Where ``p_a > 1/2``, set ``g_a = -sum_{v != a} g_v`` (every row gradient sums to 0).

    Forward KL and JSD gradients cancel at the student's argmax ``a`` when ``p_a ~ 1`` (``p_a - q_a``
    with both near 1); the sum of the other entries is then the accurate value."""
    g_a = grad.gather(-1, at)
    others = grad.sum(-1, keepdim=True) - g_a
    peaked = (p.gather(-1, at) > 0.5) & torch.isfinite(others)
    return grad.scatter_(-1, at, torch.where(peaked, -others, g_a))


def _rows_forward(x_s, x_t, divergence, beta, inv_temp, want_grad):
    """Divergence, entropy, log-softmaxes and gradient for a chunk of rows of raw logits.

    Units: every logit is taken relative to its row max in raw units *before* the temperature
    scales it, ``z - max z = (x - max x) / T``; scaling first would round away the gaps between
    large logits (at ``|x / T| ~ 1e14`` one float32 ulp is ~1e7). Reverse KL also centres its
    log-ratio on the teacher's logit ``B`` at the student's argmax ``a``:
    ``u = (x_s - max x_s) - (x_t - B)``, ``u_a = 0``, so
    ``KL = (mean_p(u) + max x_t - B) / T + log l_t - log l_s`` and its gradient
    ``p (u - mean_p(u)) / T^2`` are exact even when the softmax is one-hot (the KL is then the
    finite difference ``(max x_t - x_t[a]) / T``). Returns ``(div, entropy, log_p, log_q, grad)``;
    ``grad`` is d div / d x (temperature included).
    """
    anchor_s, at_s = _anchor(x_s)
    anchor_t, at_t = _anchor(x_t)
    a_s = x_s - anchor_s
    u = None
    if divergence == "reverse_kl" or (divergence == "jsd" and beta == 1.0):
        x_t_at = x_t.gather(-1, at_s)
        centre = torch.where(torch.isfinite(x_t_at), x_t_at, torch.zeros_like(x_t_at))  # B; teacher -inf at a: +inf KL
        u = (x_t - centre).neg_().add_(a_s)  # (x_s - max x_s) - (x_t - B), before a_s is scaled in place
    log_p = torch.log_softmax(a_s.mul_(inv_temp), dim=-1)  # one fused kernel
    log_q = torch.log_softmax((x_t - anchor_t).mul_(inv_temp), dim=-1)
    p = log_p.exp()
    p_absent = p == 0  # -inf logits (and underflow): they contribute exactly 0
    # entropy = -sum p log p; p * log_p is 0 * -inf = nan where p == 0, hence the fill
    entropy = -(p * log_p).masked_fill_(p_absent, 0.0).sum(-1)
    if divergence == "jsd" and beta == 1.0:
        divergence = "reverse_kl"
    if divergence == "jsd" and beta == 0.0:
        divergence = "forward_kl"
    grad = None
    if divergence == "reverse_kl":
        log_l_s = -log_p.gather(-1, at_s)  # log_softmax at the max is exactly 0 - log l
        log_l_t = -log_q.gather(-1, at_t)
        mean_u = (p * u).masked_fill_(p_absent, 0.0).sum(-1, keepdim=True)
        div = ((mean_u + (anchor_t - centre)) * inv_temp + (log_l_t - log_l_s)).squeeze(-1)
        if want_grad:
            grad = u.sub_(mean_u).mul_(p).masked_fill_(p_absent, 0.0).mul_(inv_temp * inv_temp)
    elif divergence == "forward_kl":
        q = log_q.exp()
        div = (q * (log_q - log_p)).masked_fill_(q == 0, 0.0).sum(-1)
        if want_grad:
            grad = _fix_argmax((p - q).mul_(inv_temp), p, at_s)
    else:
        q = log_q.exp()
        # m = (1-beta) p + beta q, computed in log space so it never underflows before p or q do.
        log_m = torch.logaddexp(log_p + math.log1p(-beta), log_q + math.log(beta))
        q_term = (q * (log_q - log_m)).masked_fill_(q == 0, 0.0)
        p_log_ratio = log_p - log_m
        kl_p_m = (p * p_log_ratio).masked_fill_(p_absent, 0.0).sum(-1)
        div = beta * q_term.sum(-1) + (1.0 - beta) * kl_p_m
        if want_grad:
            grad = p_log_ratio.sub_(kl_p_m[:, None]).mul_(p).masked_fill_(p_absent, 0.0).mul_((1.0 - beta) * inv_temp)
            grad = _fix_argmax(grad, p, at_s)
    if grad is not None:
        # a NaN logit anywhere in a row: NaN divergence and a NaN gradient row (autograd's answer)
        grad = grad.masked_fill_(torch.isnan(div)[:, None], float("nan"))
    return div, entropy, log_p, log_q, grad


def _row_view(x: torch.Tensor) -> torch.Tensor | None:
    """``x`` as ``(B*T, V)`` sharing its storage, or None when its strides do not allow it."""
    try:
        return x.view(-1, x.shape[-1])
    except RuntimeError:
        return None


def forward(
    student, teacher, keep, target_ids, divergence, beta, temperature, vocab_size, grad, grad_scale=None,
    student_transform=IDENTITY, teacher_transform=IDENTITY,
):
    if divergence not in DIVERGENCES:
        raise ValueError(f"divergence must be one of {DIVERGENCES}, got {divergence!r}")
    B, T = keep.shape
    N = B * T
    inv_temp = 1.0 / temperature
    compute_dtype = torch.float64 if student.dtype == torch.float64 else torch.float32
    # reshape is a view for the usual layouts; a copy only for exotic row strides.
    s_rows = student.reshape(N, student.shape[-1])
    t_rows = teacher.reshape(N, teacher.shape[-1])
    keep_rows = keep.reshape(N)
    grad_rows = None if grad is None else _row_view(grad)
    outs = [torch.zeros(N, dtype=compute_dtype, device=student.device) for _ in range(4)]
    div_out, ent_out, logp_out, logq_out = outs
    tgt_rows = None if target_ids is None else target_ids.reshape(N, 1)
    scale_rows = None if grad_scale is None else grad_scale.reshape(N).to(compute_dtype)
    step = _chunk_rows(vocab_size)
    for start in range(0, N, step):
        stop = min(N, start + step)
        x_s = s_rows[start:stop, :vocab_size].to(compute_dtype)
        x_t = t_rows[start:stop, :vocab_size].to(compute_dtype)
        # the maps in place over a converted copy, else into a new chunk (the logits stay unwritten)
        if not student_transform.identity:
            x_s = student_transform.apply_(x_s) if student.dtype != compute_dtype else student_transform.apply(x_s)
        if not teacher_transform.identity:
            x_t = teacher_transform.apply_(x_t) if teacher.dtype != compute_dtype else teacher_transform.apply(x_t)
        div, ent, log_p, log_q, g = _rows_forward(x_s, x_t, divergence, beta, inv_temp, grad is not None)
        k = keep_rows[start:stop]
        zero = torch.zeros((), dtype=div.dtype, device=div.device)
        div_out[start:stop] = torch.where(k, div, zero)
        ent_out[start:stop] = torch.where(k, ent, zero)
        if tgt_rows is not None:
            tgt = tgt_rows[start:stop]
            logp_out[start:stop] = torch.where(k, log_p.gather(1, tgt).squeeze(1), zero)
            logq_out[start:stop] = torch.where(k, log_q.gather(1, tgt).squeeze(1), zero)
        if grad is not None:
            if not student_transform.identity:  # chain rule, at the raw logits (not yet overwritten)
                g = g.mul_(student_transform.derivative(s_rows[start:stop, :vocab_size].to(compute_dtype)))
            g = torch.where(k[:, None], g, zero)
            if scale_rows is not None:
                g = g.mul_(scale_rows[start:stop, None])
            if grad_rows is not None:
                grad_rows[start:stop, :vocab_size] = g
                grad_rows[start:stop, vocab_size:] = 0
            else:  # rows of an in-place target that cannot be flattened: index (b, t) directly
                idx = torch.arange(start, stop, device=grad.device)
                grad[idx // T, idx % T, :vocab_size] = g.to(grad.dtype)
                grad[idx // T, idx % T, vocab_size:] = 0
    return tuple(o.view(B, T) for o in outs)
