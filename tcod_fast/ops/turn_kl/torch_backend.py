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
"""

from __future__ import annotations

import math

import torch

from tcod_fast.ops.turn_kl.result import DIVERGENCES

# Target size of one float32 (chunk_rows x V) intermediate; about six of them live at once.
_CHUNK_BYTES = 32 * 1024 * 1024


def _chunk_rows(vocab_size: int) -> int:
    return max(1, _CHUNK_BYTES // (4 * vocab_size))


def _log_normaliser(z: torch.Tensor, log_softmax: torch.Tensor) -> torch.Tensor:
    """``logsumexp(z)`` per row, read off at the row's max, where both are finite."""
    z_max, at = z.max(dim=-1, keepdim=True)
    return z_max - log_softmax.gather(-1, at)


def _rows_forward(z_s, z_t, divergence, beta, inv_temp, want_grad):
    """Divergence, entropy and gradient for a chunk of rows of already-scaled logits (float32).

    In-place where it is safe, so a chunk costs a handful of ``chunk x V`` temporaries.
    """
    log_p = torch.log_softmax(z_s, dim=-1)  # one fused kernel; logsumexp is several passes
    log_q = torch.log_softmax(z_t, dim=-1)
    lse_s = _log_normaliser(z_s, log_p)
    lse_t = _log_normaliser(z_t, log_q)
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
        log_ratio = log_p - log_q
        div = (p * log_ratio).masked_fill_(p_absent, 0.0).sum(-1)
        if want_grad:
            grad = log_ratio.sub_(div[:, None]).mul_(p).masked_fill_(p_absent, 0.0).mul_(inv_temp)
    elif divergence == "forward_kl":
        q = log_q.exp()
        div = (q * (log_q - log_p)).masked_fill_(q == 0, 0.0).sum(-1)
        if want_grad:
            grad = p.sub_(q).mul_(inv_temp)
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
    return div, entropy, lse_s.squeeze(-1), lse_t.squeeze(-1), grad


def _row_view(x: torch.Tensor) -> torch.Tensor | None:
    """``x`` as ``(B*T, V)`` sharing its storage, or None when its strides do not allow it."""
    try:
        return x.view(-1, x.shape[-1])
    except RuntimeError:
        return None


def forward(student, teacher, keep, target_ids, divergence, beta, temperature, vocab_size, grad, grad_scale=None):
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
        z_s = s_rows[start:stop, :vocab_size].to(compute_dtype)
        z_t = t_rows[start:stop, :vocab_size].to(compute_dtype)
        if inv_temp != 1.0:
            z_s, z_t = z_s * inv_temp, z_t * inv_temp
        div, ent, lse_s, lse_t, g = _rows_forward(z_s, z_t, divergence, beta, inv_temp, grad is not None)
        k = keep_rows[start:stop]
        zero = torch.zeros((), dtype=div.dtype, device=div.device)
        div_out[start:stop] = torch.where(k, div, zero)
        ent_out[start:stop] = torch.where(k, ent, zero)
        if tgt_rows is not None:
            tgt = tgt_rows[start:stop]
            logp_out[start:stop] = torch.where(k, z_s.gather(1, tgt).squeeze(1) - lse_s, zero)
            logq_out[start:stop] = torch.where(k, z_t.gather(1, tgt).squeeze(1) - lse_t, zero)
        if grad is not None:
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
