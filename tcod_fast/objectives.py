"""Training signals of the OPD family: estimators, advantages, turn weights, losses and
diagnostics (docs/algorithms.md).

Conventions (docs/turns.md#turn-ids): per-token tensors are ``(B, T)`` (or ``(T,)`` for one
trajectory) and come with ``turn_ids`` of the same shape: ``k >= 0`` for tokens the
student generated in turn ``k``, ``-1`` for everything not trained. Per-turn tensors are
``(B, num_turns)`` (or ``(num_turns,)``). A turn a trajectory does not have (token
count 0) is left out of every statistic and gets weight 0, never NaN.

``student_logprobs`` / ``teacher_logprobs`` are ``log p(a)`` / ``log q(a)`` of the
sampled tokens (float tensors); none of the functions here differentiates through
them except :func:`ppo_clipped_loss` (through ``logprobs``) and
:func:`full_vocab_kl_loss` (through the student logits).

Pieces, in the order a trainer uses them:

* estimators: :func:`k1_kl`, :func:`k3_kl`, :func:`opd_advantages` (TCOD's sampled-token
  advantage);
* per-turn statistics: :func:`turn_sums`, :func:`broadcast_turn_weights`;
* turn weights: :func:`tdur_weights` (ATOD's T-DUR), :func:`sod_weights` (SOD);
* advantages: :func:`grpo_advantages`, :func:`hybrid_advantages` (ATOD / SOD),
  :func:`token_advantages` (what a PPO surrogate gets: hybrid, or GRPO alone);
* losses: :func:`ppo_clipped_loss` (+ :func:`aggregate_loss`), :func:`full_vocab_kl_loss`;
* diagnostics: :func:`turn_diagnostics`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from tcod_fast.ops.turn_kl import fused_turn_kl

__all__ = [
    "LOSS_AGGREGATIONS",
    "SAMPLED_KL_ESTIMATORS",
    "TurnDiagnostics",
    "aggregate_loss",
    "broadcast_turn_weights",
    "full_vocab_kl_loss",
    "grpo_advantages",
    "hybrid_advantages",
    "k1_kl",
    "k3_kl",
    "opd_advantages",
    "ppo_clipped_loss",
    "sod_weights",
    "student_token_mask",
    "tdur_weights",
    "token_advantages",
    "turn_diagnostics",
    "turn_sums",
]

LOSS_AGGREGATIONS = ("token_mean", "seq_mean_token_mean", "seq_mean_token_sum")
SAMPLED_KL_ESTIMATORS = ("k1", "k3")


def _check_same_shape(**tensors: torch.Tensor) -> None:
    shapes = {name: tuple(t.shape) for name, t in tensors.items() if t is not None}
    if len(set(shapes.values())) > 1:
        detail = ", ".join(f"{name} {shape}" for name, shape in shapes.items())
        raise ValueError(f"expected tensors of one shape, got {detail}")


# ------------------------------------------------------------------ estimators


def k1_kl(student_logprobs: torch.Tensor, teacher_logprobs: torch.Tensor) -> torch.Tensor:
    """k1 estimator of ``KL(p||q)`` per sampled token: ``log p(a) - log q(a)``.

    Unbiased for tokens sampled from the student, but signed and high-variance.
    Shapes: any, both equal; returns the same shape and dtype.
    """
    _check_same_shape(student_logprobs=student_logprobs, teacher_logprobs=teacher_logprobs)
    return student_logprobs - teacher_logprobs


def k3_kl(student_logprobs: torch.Tensor, teacher_logprobs: torch.Tensor) -> torch.Tensor:
    """k3 estimator of ``KL(p||q)`` per sampled token: ``exp(r) - 1 - r`` with
    ``r = log q(a) - log p(a)``. Unbiased for student samples and never negative.
    Shapes: any, both equal; returns the same shape and dtype."""
    _check_same_shape(student_logprobs=student_logprobs, teacher_logprobs=teacher_logprobs)
    log_ratio = teacher_logprobs - student_logprobs
    # expm1 keeps precision where r ~ 0, which is where a converged student lives.
    return torch.expm1(log_ratio) - log_ratio


def student_token_mask(
    turn_ids: torch.Tensor, turn_window: tuple[int, int] | torch.Tensor | None = None
) -> torch.Tensor:
    """Bool mask of trained tokens: ``turn_id >= 0`` and, with a window,
    ``lo <= turn_id < hi``. ``turn_window`` is one ``(lo, hi)`` pair or a ``(B, 2)``
    tensor of per-sequence pairs (then ``turn_ids`` must be ``(B, T)``)."""
    mask = turn_ids >= 0
    if turn_window is None:
        return mask
    window = torch.as_tensor(turn_window, device=turn_ids.device, dtype=torch.int64)
    if window.dim() == 1:
        lo, hi = window[0], window[1]
    else:
        if turn_ids.dim() != 2 or window.shape != (turn_ids.shape[0], 2):
            raise ValueError(
                f"per-sequence turn_window must be ({turn_ids.shape[0]}, 2) for turn_ids "
                f"{tuple(turn_ids.shape)}, got {tuple(window.shape)}"
            )
        lo, hi = window[:, :1], window[:, 1:]
    return mask & (turn_ids >= lo) & (turn_ids < hi)


def opd_advantages(
    student_logprobs: torch.Tensor,
    teacher_logprobs: torch.Tensor,
    turn_ids: torch.Tensor,
    kl_coef: float = 1.0,
) -> torch.Tensor:
    """TCOD's sampled-token OPD advantage ``kl_coef * (log q(a) - log p_old(a))`` per
    token (``-kl_coef * k1``), 0 at untrained tokens (``turn_id < 0``).

    Shapes: all ``(B, T)`` or ``(T,)``; returns the logprobs' shape and dtype.
    """
    _check_same_shape(
        student_logprobs=student_logprobs, teacher_logprobs=teacher_logprobs, turn_ids=turn_ids
    )
    advantage = kl_coef * (teacher_logprobs - student_logprobs)
    return torch.where(turn_ids >= 0, advantage, torch.zeros_like(advantage))


# --------------------------------------------------------------- per-turn sums


def _num_turns(turn_ids: torch.Tensor, num_turns: int | None) -> int:
    max_id = int(turn_ids.max()) if turn_ids.numel() else -1
    if num_turns is None:
        return max(max_id + 1, 0)
    if max_id >= num_turns:
        raise ValueError(f"turn_ids go up to {max_id} but num_turns is {num_turns}")
    return num_turns


def turn_sums(
    values: torch.Tensor, turn_ids: torch.Tensor, num_turns: int | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Sum of ``values`` and token count per (sequence, turn) over tokens with
    ``turn_id >= 0``.

    Args:
        values: ``(B, T)`` or ``(T,)`` float.
        turn_ids: same shape, int.
        num_turns: number of turn columns; default ``max(turn_ids) + 1``.
    Returns:
        ``(sums, counts)``, each ``(B, num_turns)`` (``(num_turns,)`` for 1-D input),
        in ``values.dtype``.
    """
    _check_same_shape(values=values, turn_ids=turn_ids)
    one_dim = values.dim() == 1
    if one_dim:
        values, turn_ids = values.unsqueeze(0), turn_ids.unsqueeze(0)
    if values.dim() != 2:
        raise ValueError(f"expected (B, T) or (T,) tensors, got shape {tuple(values.shape)}")
    n_turns = _num_turns(turn_ids, num_turns)
    kept = turn_ids >= 0
    # Untrained tokens go to an extra column that is dropped, so scatter needs no branch.
    index = torch.where(kept, turn_ids, torch.full_like(turn_ids, n_turns)).long()
    shape = (values.shape[0], n_turns + 1)
    sums = torch.zeros(shape, dtype=values.dtype, device=values.device)
    sums.scatter_add_(1, index, torch.where(kept, values, torch.zeros_like(values)))
    counts = torch.zeros(shape, dtype=values.dtype, device=values.device)
    counts.scatter_add_(1, index, kept.to(values.dtype))
    sums, counts = sums[:, :n_turns], counts[:, :n_turns]
    if one_dim:
        return sums[0], counts[0]
    return sums, counts


def broadcast_turn_weights(
    turn_weights: torch.Tensor, turn_ids: torch.Tensor, fill_value: float = 0.0
) -> torch.Tensor:
    """Per-token weights from per-turn weights: token with turn id ``k`` gets
    ``turn_weights[..., k]``; tokens with ``turn_id < 0`` get ``fill_value``.

    Shapes: ``turn_weights (B, n)`` with ``turn_ids (B, T)``, or ``(n,)`` with ``(T,)``;
    returns ``turn_ids``' shape in ``turn_weights.dtype``.
    """
    if turn_weights.dim() != turn_ids.dim() or (
        turn_ids.dim() == 2 and turn_weights.shape[0] != turn_ids.shape[0]
    ):
        raise ValueError(
            f"turn_weights {tuple(turn_weights.shape)} does not match turn_ids "
            f"{tuple(turn_ids.shape)}: expected (B, n) with (B, T) or (n,) with (T,)"
        )
    n_turns = turn_weights.shape[-1]
    if turn_ids.numel() and int(turn_ids.max()) >= n_turns:
        raise ValueError(f"turn_ids go up to {int(turn_ids.max())} but turn_weights has {n_turns} turns")
    kept = turn_ids >= 0
    index = torch.where(kept, turn_ids, torch.zeros_like(turn_ids)).long()
    if n_turns == 0:
        gathered = torch.zeros(turn_ids.shape, dtype=turn_weights.dtype, device=turn_ids.device)
    else:
        gathered = torch.gather(turn_weights, -1, index)
    return torch.where(kept, gathered, torch.full_like(gathered, fill_value))


def _turn_means(
    student_logprobs: torch.Tensor | None,
    teacher_logprobs: torch.Tensor | None,
    turn_ids: torch.Tensor | None,
    num_turns: int | None,
    turn_abs_logratio_sum: torch.Tensor | None,
    turn_neg_logprob_sum: torch.Tensor | None,
    turn_token_count: torch.Tensor | None,
    need_entropy_proxy: bool,
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
    """``(d, h, present)`` per turn from per-token log-probs or from the kernel's sums."""
    token_form = student_logprobs is not None
    sums_form = turn_abs_logratio_sum is not None or turn_token_count is not None
    if token_form == sums_form:
        raise ValueError(
            "give either per-token (student_logprobs, teacher_logprobs, turn_ids) or the "
            "per-turn sums (turn_abs_logratio_sum, [turn_neg_logprob_sum,] turn_token_count), not both"
        )
    if token_form:
        if teacher_logprobs is None or turn_ids is None:
            raise ValueError("student_logprobs needs teacher_logprobs and turn_ids too")
        _check_same_shape(
            student_logprobs=student_logprobs, teacher_logprobs=teacher_logprobs, turn_ids=turn_ids
        )
        abs_sum, counts = turn_sums((student_logprobs - teacher_logprobs).abs(), turn_ids, num_turns)
        neg_sum = turn_sums(-student_logprobs, turn_ids, num_turns)[0] if need_entropy_proxy else None
    else:
        if turn_abs_logratio_sum is None or turn_token_count is None:
            raise ValueError("the per-turn form needs turn_abs_logratio_sum and turn_token_count")
        if need_entropy_proxy and turn_neg_logprob_sum is None:
            raise ValueError("T-DUR's per-turn form needs turn_neg_logprob_sum too")
        _check_same_shape(
            turn_abs_logratio_sum=turn_abs_logratio_sum,
            turn_neg_logprob_sum=turn_neg_logprob_sum,
            turn_token_count=turn_token_count,
        )
        abs_sum, neg_sum, counts = turn_abs_logratio_sum, turn_neg_logprob_sum, turn_token_count
    present = counts > 0
    safe_counts = torch.where(present, counts, torch.ones_like(counts))
    d = torch.where(present, abs_sum / safe_counts, torch.zeros_like(abs_sum))
    h = None
    if neg_sum is not None:
        h = torch.where(present, neg_sum / safe_counts, torch.zeros_like(neg_sum))
    return d, h, present


def _minmax_normalise(values: torch.Tensor, present: torch.Tensor, min_range: float) -> torch.Tensor:
    """Min-max over the present turns of each row (last dim); 0.5 where the range is
    below ``min_range`` (ATOD eq. 15); 0 at absent turns."""
    big = torch.finfo(values.dtype).max
    low = torch.where(present, values, torch.full_like(values, big)).amin(-1, keepdim=True)
    high = torch.where(present, values, torch.full_like(values, -big)).amax(-1, keepdim=True)
    spread = high - low
    flat = spread < min_range  # also true for rows with no present turn (negative spread)
    scaled = (values - low) / torch.where(flat, torch.ones_like(spread), spread)
    normalised = torch.where(flat, torch.full_like(values, 0.5), scaled)
    return torch.where(present, normalised, torch.zeros_like(values))


def tdur_weights(
    student_logprobs: torch.Tensor | None = None,
    teacher_logprobs: torch.Tensor | None = None,
    turn_ids: torch.Tensor | None = None,
    *,
    num_turns: int | None = None,
    turn_abs_logratio_sum: torch.Tensor | None = None,
    turn_neg_logprob_sum: torch.Tensor | None = None,
    turn_token_count: torch.Tensor | None = None,
    min_range: float = 1e-8,
) -> torch.Tensor:
    """ATOD's T-DUR turn weights (eqs. 13-16).

    Per turn k: ``d_k = mean |log p(a) - log q(a)|`` and ``h_k = mean(-log p(a))`` over
    the turn's sampled tokens; each min-max normalised over the trajectory's turns
    (0.5 when ``max - min < min_range``); ``w_k = 1 - (1 - d~_k)(1 - h~_k)`` (soft-OR,
    in ``[0, 1]`` and ``>= max(d~_k, h~_k)``). A single-turn trajectory or constant
    signals therefore give ``w = 0.75``. Turns without tokens get 0.

    Give either the per-token tensors:
        student_logprobs, teacher_logprobs: ``(B, T)`` or ``(T,)`` float, log-probs of
            the sampled tokens; turn_ids: same shape, int.
        num_turns: columns of the result (default ``max(turn_ids) + 1``).
    or the per-turn sums of ``TurnKLResult`` (``fused_turn_kl(..., target_ids=...,
    return_stats=True)``):
        turn_abs_logratio_sum, turn_neg_logprob_sum, turn_token_count: ``(B, n)`` or ``(n,)``.

    Returns:
        ``(B, num_turns)`` or ``(num_turns,)`` weights in the inputs' float dtype,
        without grad (they are a detached weighting).
    """
    with torch.no_grad():
        d, h, present = _turn_means(
            student_logprobs, teacher_logprobs, turn_ids, num_turns,
            turn_abs_logratio_sum, turn_neg_logprob_sum, turn_token_count,
            need_entropy_proxy=True,
        )
        d_norm = _minmax_normalise(d, present, min_range)
        h_norm = _minmax_normalise(h, present, min_range)
        weights = 1.0 - (1.0 - d_norm) * (1.0 - h_norm)
        return torch.where(present, weights, torch.zeros_like(weights))


def sod_weights(
    student_logprobs: torch.Tensor | None = None,
    teacher_logprobs: torch.Tensor | None = None,
    turn_ids: torch.Tensor | None = None,
    eps: float = 1e-6,
    delta: float = 0.2,
    *,
    num_turns: int | None = None,
    turn_abs_logratio_sum: torch.Tensor | None = None,
    turn_token_count: torch.Tensor | None = None,
) -> torch.Tensor:
    """SOD's step-wise weights ``w_k = min((d_1 + eps) / (d_k + eps), 1 + delta)`` with
    ``d_k = mean |log p(a) - log q(a)|`` over turn k's sampled tokens.

    ``d_1`` is the trajectory's first turn that has tokens (turn 0 for a full student
    episode, the first student turn after a B2F prefix). Turns where the student
    drifted further from the teacher than on its first turn get less weight; no turn
    gets more than ``1 + delta``. Turns without tokens get 0.

    Inputs as :func:`tdur_weights` (the per-turn form needs only
    ``turn_abs_logratio_sum`` and ``turn_token_count``). Returns ``(B, num_turns)`` or
    ``(num_turns,)``, without grad.
    """
    if delta < 0:
        raise ValueError(f"delta must be >= 0, got {delta}")
    if not eps > 0:
        raise ValueError(f"eps must be > 0, got {eps}")
    with torch.no_grad():
        d, _, present = _turn_means(
            student_logprobs, teacher_logprobs, turn_ids, num_turns,
            turn_abs_logratio_sum, None, turn_token_count,
            need_entropy_proxy=False,
        )
        if d.shape[-1] == 0:
            return d.clone()
        first = present.to(torch.int8).argmax(-1, keepdim=True)  # first present turn per row
        d_first = torch.gather(d, -1, first)
        weights = ((d_first + eps) / (d + eps)).clamp_max(1.0 + delta)
        return torch.where(present, weights, torch.zeros_like(weights))


# ------------------------------------------------------------------ advantages


def grpo_advantages(
    rewards: torch.Tensor,
    group_ids: torch.Tensor,
    eps: float = 1e-6,
    *,
    scale_by_std: bool = True,
    unbiased_std: bool = True,
) -> torch.Tensor:
    """Group-relative advantages ``(r_i - mean_g r) / (std_g r + eps)``.

    Args:
        rewards: ``(N,)`` float, one scalar reward per trajectory.
        group_ids: ``(N,)`` int, equal ids form one group (any values, any order).
        eps: added to the standard deviation.
        scale_by_std: divide by ``std + eps`` (False gives the mean-centred
            Dr. GRPO variant).
        unbiased_std: Bessel-corrected std (``torch.std`` default, as verl does);
            False uses the population std.
    Returns:
        ``(N,)`` advantages in ``rewards.dtype``. A group of one gets 0 (there is
        nothing to compare with), never NaN; ``N = 0`` gives an empty tensor.
    """
    if rewards.dim() != 1 or group_ids.shape != rewards.shape:
        raise ValueError(
            f"expected rewards (N,) and group_ids (N,), got {tuple(rewards.shape)} and "
            f"{tuple(group_ids.shape)}"
        )
    if rewards.numel() == 0:
        return rewards.clone()
    _, group_index = torch.unique(group_ids, return_inverse=True)
    n_groups = int(group_index.max()) + 1
    zeros = torch.zeros(n_groups, dtype=rewards.dtype, device=rewards.device)
    counts = zeros.index_add(0, group_index, torch.ones_like(rewards))
    means = zeros.index_add(0, group_index, rewards) / counts
    centred = rewards - means[group_index]
    sq_sum = zeros.index_add(0, group_index, centred * centred)
    denominators = (counts - 1.0).clamp_min(1.0) if unbiased_std else counts
    stds = (sq_sum / denominators).sqrt()
    advantages = centred / (stds[group_index] + eps) if scale_by_std else centred
    singleton = counts[group_index] < 2
    return torch.where(singleton, torch.zeros_like(advantages), advantages)


def hybrid_advantages(
    student_logprobs: torch.Tensor,
    teacher_logprobs: torch.Tensor,
    turn_ids: torch.Tensor,
    sequence_advantages: torch.Tensor | None,
    *,
    opd_coef: float,
    grpo_coef: float,
    turn_weights: torch.Tensor | None = None,
    kl_estimator: str = "k1",
) -> torch.Tensor:
    """Per-token hybrid advantage
    ``A_t = opd_coef * w_{k(t)} * (log q(a_t) - log p_old(a_t)) + grpo_coef * A_seq``
    (``kl_estimator="k1"``), or with ``-k3`` in place of the log-ratio (``"k3"``: an OPD
    advantage that is never positive, see :func:`k3_kl`).

    * ATOD: ``opd_coef = kappa(s)``, ``grpo_coef = rho(s)``, ``w`` = :func:`tdur_weights`.
    * SOD: ``opd_coef = c``, ``grpo_coef = 1``, ``w`` = :func:`sod_weights`.
    * TCOD/vanilla sampled-token OPD: ``opd_coef = kl_coef``, ``grpo_coef = 0``, no ``w``.
    * GRPO: ``opd_coef = 0``, ``grpo_coef = 1``.

    Args:
        student_logprobs, teacher_logprobs: ``(B, T)`` log-probs of the sampled tokens
            (student under the rollout policy).
        turn_ids: ``(B, T)`` int.
        sequence_advantages: ``(B,)`` per-trajectory advantage (e.g.
            :func:`grpo_advantages`), broadcast to every trained token; ``None`` = 0.
        turn_weights: ``(B, n_turns)`` per-turn weights; ``None`` = 1.
    Returns:
        ``(B, T)`` advantages, 0 at tokens with ``turn_id < 0``, without grad.
    """
    _check_same_shape(
        student_logprobs=student_logprobs, teacher_logprobs=teacher_logprobs, turn_ids=turn_ids
    )
    if student_logprobs.dim() != 2:
        raise ValueError(f"expected (B, T) tensors, got shape {tuple(student_logprobs.shape)}")
    if kl_estimator not in SAMPLED_KL_ESTIMATORS:
        raise ValueError(f"kl_estimator must be one of {SAMPLED_KL_ESTIMATORS}, got {kl_estimator!r}")
    with torch.no_grad():
        if kl_estimator == "k1":
            opd = teacher_logprobs - student_logprobs
        else:
            opd = -k3_kl(student_logprobs, teacher_logprobs)
        if turn_weights is not None:
            opd = opd * broadcast_turn_weights(turn_weights.to(opd.dtype), turn_ids)
        advantage = opd_coef * opd
        if sequence_advantages is not None:
            if sequence_advantages.shape != (student_logprobs.shape[0],):
                raise ValueError(
                    f"sequence_advantages must be ({student_logprobs.shape[0]},), got "
                    f"{tuple(sequence_advantages.shape)}"
                )
            advantage = advantage + grpo_coef * sequence_advantages.to(opd.dtype).unsqueeze(-1)
        return torch.where(turn_ids >= 0, advantage, torch.zeros_like(advantage))


def token_advantages(
    old_logprobs: torch.Tensor,
    turn_ids: torch.Tensor,
    sequence_advantages: torch.Tensor,
    *,
    opd_coef: float,
    grpo_coef: float,
    teacher_logprobs: torch.Tensor | None = None,
    turn_weights: torch.Tensor | None = None,
    kl_estimator: str = "k1",
) -> torch.Tensor:
    """The per-token advantage of a PPO surrogate, assembled from its terms.

    * With ``teacher_logprobs`` (the OPD term is the sampled-token estimator):
      :func:`hybrid_advantages`, ``opd_coef * w_k * (log q - log p_old)`` (k1) or
      ``-opd_coef * w_k * k3`` (k3), plus ``grpo_coef * A_seq``.
    * Without (no OPD term in the surrogate, e.g. it is the exact full-vocabulary KL
      elsewhere): ``grpo_coef * A_seq`` on every trained token.

    Args:
        old_logprobs: ``(B, T)`` log-probs of the sampled tokens under the rollout policy.
        turn_ids: ``(B, T)`` int; tokens with ``turn_id < 0`` get advantage 0.
        sequence_advantages: ``(B,)`` per-row sequence advantage (e.g.
            :func:`grpo_advantages` of the row's episode).
        teacher_logprobs: ``(B, T)`` teacher log-probs of the same tokens, or ``None``.
        turn_weights: ``(B, n_turns)`` per-turn weights of the OPD term; ``None`` = 1.
        kl_estimator: ``"k1"`` or ``"k3"``.
    Returns:
        ``(B, T)`` advantages in ``old_logprobs.dtype``, without grad.
    """
    if teacher_logprobs is not None:
        return hybrid_advantages(
            old_logprobs,
            teacher_logprobs,
            turn_ids,
            sequence_advantages,
            opd_coef=opd_coef,
            grpo_coef=grpo_coef,
            turn_weights=turn_weights,
            kl_estimator=kl_estimator,
        )
    _check_same_shape(old_logprobs=old_logprobs, turn_ids=turn_ids)
    with torch.no_grad():
        advantage = grpo_coef * sequence_advantages.unsqueeze(-1).expand_as(old_logprobs)
        return torch.where(turn_ids >= 0, advantage, torch.zeros_like(advantage))


# ---------------------------------------------------------------------- losses


def aggregate_loss(
    token_losses: torch.Tensor, token_mask: torch.Tensor, mode: str = "token_mean"
) -> torch.Tensor:
    """Reduce ``(B, T)`` per-token losses over kept tokens (``token_mask``) to a scalar.

    * ``token_mean``: sum over kept tokens / number of kept tokens.
    * ``seq_mean_token_mean``: mean over sequences of each sequence's token mean.
    * ``seq_mean_token_sum``: mean over sequences of each sequence's token sum.

    Sequences with no kept token are left out of the sequence means (a trajectory the
    teacher played alone must not dilute the batch). No kept token at all gives 0
    (with a zero gradient), not 0/0.
    """
    if mode not in LOSS_AGGREGATIONS:
        raise ValueError(f"loss aggregation must be one of {LOSS_AGGREGATIONS}, got {mode!r}")
    _check_same_shape(token_losses=token_losses, token_mask=token_mask)
    if token_losses.dim() == 1:
        token_losses, token_mask = token_losses.unsqueeze(0), token_mask.unsqueeze(0)
    mask = token_mask.to(token_losses.dtype)
    masked = torch.where(token_mask, token_losses, torch.zeros_like(token_losses))
    if mode == "token_mean":
        return masked.sum() / mask.sum().clamp_min(1.0)
    seq_counts = mask.sum(-1)
    seq_sums = masked.sum(-1)
    per_seq = seq_sums / seq_counts.clamp_min(1.0) if mode == "seq_mean_token_mean" else seq_sums
    has_tokens = (seq_counts > 0).to(token_losses.dtype)
    return (per_seq * has_tokens).sum() / has_tokens.sum().clamp_min(1.0)


def ppo_clipped_loss(
    logprobs: torch.Tensor,
    old_logprobs: torch.Tensor,
    advantages: torch.Tensor,
    token_mask: torch.Tensor,
    *,
    clip_low: float = 0.2,
    clip_high: float | None = None,
    dual_clip: float | None = 3.0,
    loss_agg: str = "token_mean",
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """PPO clipped surrogate with dual-clip (Ye et al. 2020), as in TCOD's code.

    With ratio ``r = exp(logprobs - old_logprobs)``:
    ``l = max(-A r, -A clip(r, 1 - clip_low, 1 + clip_high))``, and for ``A < 0`` also
    ``l = min(l, -dual_clip * A)``, which bounds the loss of a token whose ratio blew up
    under a negative advantage. ``dual_clip=None`` turns the dual clip off.

    Args:
        logprobs: ``(B, T)`` log-probs of the sampled tokens under the current policy
            (carries grad).
        old_logprobs: ``(B, T)`` under the rollout policy.
        advantages: ``(B, T)`` per-token advantages.
        token_mask: ``(B, T)`` bool, tokens to train (e.g. :func:`student_token_mask`).
        clip_high: upper clip; default ``clip_low``.
        loss_agg: see :func:`aggregate_loss`.
    Returns:
        ``(loss, stats)``: scalar loss, and detached scalars ``clip_fraction`` (tokens
        where the ratio clip was active), ``dual_clip_fraction``, ``approx_kl``
        (k3 of old vs new, token mean) and ``ratio_mean``.
    """
    _check_same_shape(
        logprobs=logprobs, old_logprobs=old_logprobs, advantages=advantages, token_mask=token_mask
    )
    clip_high = clip_low if clip_high is None else clip_high
    if dual_clip is not None and dual_clip <= 1.0:
        raise ValueError(f"dual_clip must be > 1 (or None), got {dual_clip}")
    advantages = advantages.detach()
    log_ratio = logprobs - old_logprobs.detach()
    # Masked tokens may hold garbage log-probs (padding); keep exp() finite there.
    log_ratio = torch.where(token_mask, log_ratio, torch.zeros_like(log_ratio))
    ratio = log_ratio.exp()
    unclipped = -advantages * ratio
    clipped = -advantages * ratio.clamp(1.0 - clip_low, 1.0 + clip_high)
    token_losses = torch.maximum(unclipped, clipped)
    dual_active = torch.zeros_like(token_mask)
    if dual_clip is not None:
        dual_bound = -advantages * dual_clip
        dual_active = (advantages < 0) & (token_losses > dual_bound)
        token_losses = torch.where(advantages < 0, torch.minimum(token_losses, dual_bound), token_losses)
    loss = aggregate_loss(token_losses, token_mask, loss_agg)
    with torch.no_grad():
        kept = token_mask.to(log_ratio.dtype)
        n_kept = kept.sum().clamp_min(1.0)
        stats = {
            "clip_fraction": ((clipped > unclipped) & token_mask).to(kept.dtype).sum() / n_kept,
            "dual_clip_fraction": (dual_active & token_mask).to(kept.dtype).sum() / n_kept,
            "approx_kl": (k3_kl(old_logprobs.detach(), logprobs.detach()) * kept).sum() / n_kept,
            "ratio_mean": (ratio.detach() * kept).sum() / n_kept,
        }
    return loss, stats


def full_vocab_kl_loss(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    turn_ids: torch.Tensor,
    *,
    turn_weights: torch.Tensor | None = None,
    turn_window: Any = None,
    divergence: str = "reverse_kl",
    temperature: float = 1.0,
    reduction: str = "mean",
    return_stats: bool = False,
    **kwargs: Any,
):
    """Exact full-vocabulary OPD loss through :func:`tcod_fast.fused_turn_kl`.

    The low-variance alternative to the sampled-token estimators: the student's tokens
    (``turn_id >= 0``, inside ``turn_window``) get ``KL(p||q)`` over the whole
    vocabulary (or forward KL / JSD via ``divergence``), each multiplied by its turn's
    weight when ``turn_weights (B, num_turns)`` is given (e.g. T-DUR or SOD weights
    from a previous pass; they are detached here).

    Args:
        student_logits, teacher_logits: ``(B, T, V)`` (or ``(N, V)``), any float dtype.
        turn_ids: ``(B, T)`` (or ``(N,)``) int.
        kwargs: passed to ``fused_turn_kl`` (``target_ids``, ``backend``, ...).
    Returns:
        The loss (scalar for reducing ``reduction``), or a ``TurnKLResult`` with
        ``return_stats=True``.
    """
    if turn_weights is not None:
        turn_weights = turn_weights.detach()
        kwargs.setdefault("num_turns", turn_weights.shape[-1])
    return fused_turn_kl(
        student_logits,
        teacher_logits,
        turn_ids,
        turn_window=turn_window,
        turn_weights=turn_weights,
        divergence=divergence,
        temperature=temperature,
        reduction=reduction,
        return_stats=return_stats,
        **kwargs,
    )


# ----------------------------------------------------------------- diagnostics


@dataclass
class TurnDiagnostics:
    """Batch diagnostics of the KL-by-turn behaviour (TCOD's escalation curve).

    Attributes:
        kl_per_turn: ``(n,)`` mean over trajectories that have turn k of the turn's
            token-mean KL; 0 where no trajectory has turn k.
        turn_count: ``(n,)`` number of trajectories that have turn k.
        entropy_per_turn: ``(n,)`` same for the student's entropy, or ``None``.
        trajectory_kl_mean, trajectory_kl_std: mean and population std over
            trajectories (with at least one kept token) of each trajectory's token-mean KL.
        kl_escalation_slope: least-squares slope of the (turn index, turn-mean KL) points
            of every (trajectory, turn) pair present; positive when KL grows with
            depth. 0 with fewer than two distinct turn indices.
        num_trajectories: trajectories with at least one kept token.
    """

    kl_per_turn: torch.Tensor
    turn_count: torch.Tensor
    entropy_per_turn: torch.Tensor | None
    trajectory_kl_mean: float
    trajectory_kl_std: float
    kl_escalation_slope: float
    num_trajectories: int

    def to_log_dict(self, prefix: str = "kl/") -> dict[str, float]:
        """Flat ``{name: float}`` for a logger; turns nobody reached are left out."""
        out = {
            f"{prefix}trajectory_mean": self.trajectory_kl_mean,
            f"{prefix}trajectory_std": self.trajectory_kl_std,
            f"{prefix}escalation_slope": self.kl_escalation_slope,
            f"{prefix}num_trajectories": float(self.num_trajectories),
        }
        for k in range(self.kl_per_turn.shape[0]):
            if self.turn_count[k] > 0:
                out[f"{prefix}turn_{k}"] = float(self.kl_per_turn[k])
                out[f"{prefix}turn_{k}_count"] = float(self.turn_count[k])
                if self.entropy_per_turn is not None:
                    out[f"{prefix}entropy_turn_{k}"] = float(self.entropy_per_turn[k])
        return out


def _mean_over_present(turn_means: torch.Tensor, present: torch.Tensor) -> torch.Tensor:
    counts = present.sum(0)
    total = torch.where(present, turn_means, torch.zeros_like(turn_means)).sum(0)
    return torch.where(counts > 0, total / counts.clamp_min(1), torch.zeros_like(total))


def turn_diagnostics(
    turn_kl_sum: torch.Tensor,
    turn_token_count: torch.Tensor,
    turn_entropy_sum: torch.Tensor | None = None,
) -> TurnDiagnostics:
    """KL-by-turn diagnostics from per-(sequence, turn) sums.

    Takes the ``TurnKLResult`` fields of the same names (or :func:`turn_sums` of
    per-token KL / entropy), shaped ``(B, n)`` or ``(n,)``. Computed in float64
    without grad; turns with count 0 are excluded everywhere.
    """
    _check_same_shape(
        turn_kl_sum=turn_kl_sum, turn_token_count=turn_token_count, turn_entropy_sum=turn_entropy_sum
    )
    with torch.no_grad():
        kl_sum = turn_kl_sum.detach().double()
        counts = turn_token_count.detach().double()
        if kl_sum.dim() == 1:
            kl_sum, counts = kl_sum.unsqueeze(0), counts.unsqueeze(0)
        present = counts > 0
        safe = torch.where(present, counts, torch.ones_like(counts))
        turn_means = torch.where(present, kl_sum / safe, torch.zeros_like(kl_sum))
        kl_per_turn = _mean_over_present(turn_means, present)
        turn_count = present.sum(0)

        entropy_per_turn = None
        if turn_entropy_sum is not None:
            ent = turn_entropy_sum.detach().double().reshape(kl_sum.shape)
            entropy_per_turn = _mean_over_present(
                torch.where(present, ent / safe, torch.zeros_like(ent)), present
            )

        seq_counts = counts.sum(-1)
        has_tokens = seq_counts > 0
        traj_kl = kl_sum.sum(-1)[has_tokens] / seq_counts[has_tokens]
        n_traj = int(has_tokens.sum())
        traj_mean = float(traj_kl.mean()) if n_traj else 0.0
        traj_std = float(traj_kl.std(unbiased=False)) if n_traj else 0.0

        turn_index = torch.arange(kl_sum.shape[-1], dtype=torch.float64).expand_as(kl_sum)
        xs, ys = turn_index[present], turn_means[present]
        slope = 0.0
        if xs.numel() >= 2 and float(xs.max() - xs.min()) > 0:
            x_centred = xs - xs.mean()
            slope = float((x_centred * (ys - ys.mean())).sum() / (x_centred * x_centred).sum())

        return TurnDiagnostics(
            kl_per_turn=kl_per_turn,
            turn_count=turn_count,
            entropy_per_turn=entropy_per_turn,
            trajectory_kl_mean=traj_mean,
            trajectory_kl_std=traj_std,
            kl_escalation_slope=slope,
            num_trajectories=n_traj,
        )
