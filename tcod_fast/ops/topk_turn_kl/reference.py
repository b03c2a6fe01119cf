"""Plain float64 reference of ``fused_topk_turn_kl``.

Materialises the student's full softmax in float64, builds the top-k membership mask over the
vocabulary, sums the tail over the complement directly, and lets autograd produce the gradient.
Slow and memory hungry on purpose: it is the yardstick the fast backends are tested against and
shares none of their code (no sorting of ids, no streaming, no hand-derived gradient), so a bug
in either cannot hide in both.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from tcod_fast.ops.turn_kl.reference import (
    TurnOptions,
    reference_loss,
    reference_result,
    reference_turns,
    transformed_logits,
)


def _weighted_log_ratio(weight: torch.Tensor, log_a: torch.Tensor, log_b: torch.Tensor) -> torch.Tensor:
    """``weight * (log_a - log_b)`` with ``0 * anything = 0``; autograd never sees ``0 * inf``."""
    present = weight > 0
    safe_a = torch.where(present, log_a, torch.zeros_like(log_a))
    safe_b = torch.where(present, log_b, torch.zeros_like(log_b))
    return torch.where(present, weight * (safe_a - safe_b), torch.zeros_like(weight))


def _safe_log(x: torch.Tensor) -> torch.Tensor:
    """``log(x)`` with ``log(0) = -inf`` and a finite gradient path where ``x == 0``."""
    positive = x > 0
    return torch.where(positive, torch.where(positive, x, torch.ones_like(x)).log(), torch.full_like(x, -math.inf))


def _masked_logsumexp(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """``logsumexp`` of ``x`` over the last dim where ``mask``; ``-inf`` (gradient 0) where none is."""
    any_valid = mask.any(-1, keepdim=True)
    # rows without a valid entry get finite stand-ins so autograd never evaluates exp(-inf - -inf)
    filled = torch.where(mask, x, torch.where(any_valid, torch.full_like(x, -math.inf), torch.zeros_like(x)))
    lse = torch.logsumexp(filled, dim=-1)
    return torch.where(any_valid.squeeze(-1), lse, torch.full_like(lse, -math.inf))


def sparse_divergence_per_row(
    student_logits: torch.Tensor,
    teacher_topk_ids: torch.Tensor,
    teacher_topk_logprobs: torch.Tensor,
    divergence: str = "reverse_kl",
    beta: float = 0.5,
    temperature: float = 1.0,
    tail: str = "bucket",
    tail_eps: float = 1e-6,
):
    """Per-row divergence between the student and a sparse (top-k) teacher, in float64.

    Args:
        student_logits: ``(..., V)`` any float dtype (upcast to float64); carries the gradient.
        teacher_topk_ids: ``(..., K)`` int, ``-1`` = padding.
        teacher_topk_logprobs: ``(..., K)`` float, the teacher's log-probs of those ids.
    Returns:
        ``(divergence, entropy, log_p)``: divergence and student entropy shaped ``(...)``, and the
        student's full log-softmax ``(..., V)``.
    """
    z = student_logits.double() / temperature
    log_p = torch.log_softmax(z, dim=-1)
    p = log_p.exp()
    valid = teacher_topk_ids >= 0
    safe_ids = torch.where(valid, teacher_topk_ids, torch.zeros_like(teacher_topk_ids)).long()
    # membership of each vocabulary column in the row's top-k set (padding counts for nothing)
    in_topk = torch.zeros(z.shape, dtype=torch.long, device=z.device).scatter_add(-1, safe_ids, valid.long()) > 0
    minus_inf = torch.full_like(log_p[..., :1], -math.inf).expand(safe_ids.shape)
    log_p_k = torch.where(valid, log_p.gather(-1, safe_ids), minus_inf)
    log_q_k = torch.where(valid, teacher_topk_logprobs.double().to(z.device), minus_inf)

    if tail == "bucket":
        p_tail = torch.where(in_topk, torch.zeros_like(p), p).sum(-1)  # the complement, summed directly
        has_tail = (~in_topk).any(-1)
        q_tail = torch.clamp_min(1.0 - log_q_k.exp().sum(-1), tail_eps)
        q_tail = torch.where(has_tail, q_tail, torch.zeros_like(q_tail))  # no tail outcome when S = V
        log_pi = torch.cat([log_p_k, _safe_log(p_tail).unsqueeze(-1)], dim=-1)
        log_q = torch.cat([log_q_k, _safe_log(q_tail).unsqueeze(-1)], dim=-1)
    elif tail == "renormalize":
        log_pi = torch.where(valid, log_p_k - _masked_logsumexp(log_p_k, valid).unsqueeze(-1), minus_inf)
        log_q = torch.where(valid, log_q_k - _masked_logsumexp(log_q_k, valid).unsqueeze(-1), minus_inf)
    else:
        raise ValueError(f"unknown tail mode {tail!r}")
    pi, q = log_pi.exp(), log_q.exp()

    if divergence == "reverse_kl" or (divergence == "jsd" and beta == 1.0):
        value = _weighted_log_ratio(pi, log_pi, log_q).sum(-1)
    elif divergence == "forward_kl" or (divergence == "jsd" and beta == 0.0):
        value = _weighted_log_ratio(q, log_q, log_pi).sum(-1)
    elif divergence == "jsd":
        m = (1.0 - beta) * pi + beta * q
        log_m = _safe_log(m)
        value = beta * _weighted_log_ratio(q, log_q, log_m).sum(-1) + (1.0 - beta) * _weighted_log_ratio(
            pi, log_pi, log_m
        ).sum(-1)
    else:
        raise ValueError(f"unknown divergence {divergence!r}")
    entropy = -_weighted_log_ratio(p, log_p, torch.zeros_like(log_p)).sum(-1)
    return value, entropy.detach(), log_p


@dataclass(frozen=True)
class TopkTurnKLOptions(TurnOptions):
    """The keyword options of :func:`topk_turn_kl_reference`."""

    tail: str = "bucket"
    tail_eps: float = 1e-6


def topk_turn_kl_reference(
    student_logits: torch.Tensor,
    teacher_topk_ids: torch.Tensor,
    teacher_topk_logprobs: torch.Tensor,
    turn_ids: torch.Tensor | None = None,
    **options,
):
    """Float64 reference of :func:`tcod_fast.fused_topk_turn_kl`: the student's full softmax
    against the teacher's top-k, then the token masks, reductions and statistics of
    :func:`~tcod_fast.ops.turn_kl.reference.turn_kl_reference` (same return types, float64).

    ``student_logits`` is ``(B, T, V)`` or ``(N, V)`` in any float dtype (gradients reach it
    through autograd), ``teacher_topk_ids`` integer ``(..., K)`` with ``-1`` for padding,
    ``teacher_topk_logprobs`` float ``(..., K)``, ``turn_ids`` integer with the leading shape or
    None. ``**options`` are :class:`TopkTurnKLOptions`: the keywords of ``fused_topk_turn_kl``
    with its defaults (``tail`` and ``tail_eps`` besides the shared ones); its backend-only
    keywords are ignored, any other is a TypeError. ``softcap`` and ``logit_scale`` transform the
    student logits only (a pair's teacher entry is ignored). No input validation.
    """
    options = TopkTurnKLOptions.from_keywords("topk_turn_kl_reference", options)
    squeeze = student_logits.dim() == 2
    s = student_logits.unsqueeze(0) if squeeze else student_logits
    ids = teacher_topk_ids.unsqueeze(0) if squeeze else teacher_topk_ids
    logq = teacher_topk_logprobs.unsqueeze(0) if squeeze else teacher_topk_logprobs
    B, T = s.shape[:2]
    turn, kept, num_turns, weights, sequences = reference_turns(turn_ids, options, B, T)

    # Dropped rows never take part: give them harmless stand-ins (their ids and log-probs may be
    # anything) so nothing there reaches the kept rows' gradient.
    row_kept = kept.to(s.device).unsqueeze(-1)
    s = torch.where(row_kept, s, torch.zeros((), dtype=s.dtype, device=s.device))
    ids = torch.where(row_kept.to(ids.device), ids, torch.full_like(ids, -1))
    logq = torch.where(row_kept.to(logq.device), logq, torch.zeros_like(logq))
    if options.softcap is not None or options.logit_scale is not None:
        s = transformed_logits(s, options.softcap, options.logit_scale, side=0)
    div, entropy, log_p = sparse_divergence_per_row(
        s, ids, logq, options.divergence, options.beta, options.temperature, options.tail, options.tail_eps
    )
    per_token, loss = reference_loss(div.cpu(), kept, turn, weights, options.reduction, num_turns, squeeze, sequences)
    if not options.return_stats:
        return loss

    logp_a = logq_a = None
    if options.target_ids is not None:
        # the teacher's log q(a) is known only when a is among the row's top-k: NaN otherwise
        tgt = options.target_ids.reshape(B, T).long().cpu()
        logp_a = torch.zeros(B, T, dtype=torch.float64)
        logq_a = torch.zeros(B, T, dtype=torch.float64)
        ids_cpu, logq_cpu, log_p_cpu = ids.cpu(), logq.double().cpu(), log_p.detach().cpu()
        for b in range(B):
            for i in range(T):
                if not kept[b, i]:
                    continue
                a = int(tgt[b, i])
                logp_a[b, i] = log_p_cpu[b, i, a]
                hits = (ids_cpu[b, i] == a).nonzero()
                logq_a[b, i] = float(logq_cpu[b, i, hits[0, 0]]) if len(hits) else math.nan
    return reference_result(loss, per_token, entropy, kept, turn, num_turns, logp_a, logq_a, squeeze, sequences)
