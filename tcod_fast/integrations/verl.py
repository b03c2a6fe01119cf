"""verl registrations: tcod-fast's fused divergence and TCOD's sampled-token OPD by name.

Importing this module (verl 0.9.1) registers, through verl's own registries:

* distillation loss ``tcod_fused_kl`` (``register_distillation_loss``, a top-k loss):
  the teacher's top-k log-probs, as verl's teacher server returns them, against the student's
  full-vocabulary distribution, with :func:`tcod_fast.fused_topk_turn_kl`: forward KL over the
  top-k ids plus one tail bucket holding the rest of the mass, exact (the student's tail is a
  log-sum-exp over the complement) and computed in one streaming pass over the logits, so no
  ``tokens x vocab`` log-softmax is formed (verl's ``forward_kl_topk`` instead drops the tail,
  and so can go negative and is clamped at 0). verl's packed layout (its sequences end to end
  in one row, their teacher tensors nested) reaches the op as ``cu_seqlens``. verl 0.9.1 forms
  every top-k loss in one fixed function of its FSDP/FSDP2/VeOmni step, the only place it hands
  over the student logits, not through the registry: this module wraps that function
  (``verl.trainer.distillation.fsdp.losses.compute_forward_kl_topk``) so it computes
  ``tcod_fused_kl`` when that is the configured ``loss_mode`` and is unchanged otherwise. The
  registered function then reports the per-token losses as ``forward_kl_topk`` does (top-k
  mass metrics). Megatron's step is not wrapped (its logits are vocabulary-parallel):
  ``tcod_fused_kl`` with ``strategy=megatron`` is an error.
* advantage estimator ``tcod_opd`` (``register_adv_est``): TCOD's sampled-token OPD
  advantage ``A_t = r_t``, the per-token reward ``r_t = log q(a_t) - log p(a_t)`` (teacher
  minus student log-prob of the sampled token) that the reward code writes into
  ``token_level_rewards``; 0 outside the response mask.
* policy losses ``tcod_opd`` and ``tcod_opd_tdur`` (``register_policy_loss``, the actor's
  ``policy_loss.loss_mode``): verl's PPO clipped surrogate (``vanilla``) on OPD advantages,
  per turn. A turn is a run of response
  tokens with ``response_mask = 1`` (verl masks tool/environment tokens, and rollout code
  masks the turns a curriculum leaves out: see
  :mod:`tcod_fast.integrations.curriculum`). ``tcod_opd_tdur`` multiplies each turn's
  advantages by ATOD's T-DUR weight (:func:`tcod_fast.objectives.tdur_weights`), with the
  student's sampled log-prob ``old_log_prob`` and the teacher's ``old_log_prob + advantages``
  (exact for the ``k1`` estimator / the ``tcod_opd`` advantage).

Switch them on from a verl config::

    # the distillation loss: top-k + tail forward KL, fused
    distillation.distillation_loss.loss_mode=tcod_fused_kl
    # sampled-token OPD as the RL objective, per-token OPD rewards in token_level_rewards:
    algorithm.adv_estimator=tcod_opd
    actor_rollout_ref.actor.policy_loss.loss_mode=tcod_opd_tdur    # or tcod_opd (no turn weights)

(verl 0.9.1 accepts only ``vanilla`` as ``distillation.distillation_loss.policy_loss_mode``,
so the turn-weighted losses are selected as the actor's policy loss.)

verl must import this module before it builds its configs (e.g. ``import
tcod_fast.integrations.verl`` at the top of the entry script, or in a module named by
verl's ``custom_reward_function.path`` that every worker imports).
"""

from __future__ import annotations

from typing import Any

import torch
import verl.trainer.distillation.fsdp.losses as _fsdp_losses
from verl.trainer.distillation.losses import (
    DISTILLATION_LOSS_REGISTRY,
    DistillationLossSettings,
    get_distillation_loss_fn,
    register_distillation_loss,
)
from verl.trainer.ppo.core_algos import (
    ADV_ESTIMATOR_REGISTRY,
    get_policy_loss_fn,
    register_adv_est,
    register_policy_loss,
)

from tcod_fast.objectives import broadcast_turn_weights, tdur_weights
from tcod_fast.ops.topk_turn_kl import fused_topk_turn_kl

__all__ = [
    "FUSED_KL_LOSS",
    "OPD_ADVANTAGE",
    "OPD_POLICY_LOSS",
    "OPD_TDUR_POLICY_LOSS",
    "compute_tcod_opd_advantage",
    "compute_tcod_opd_policy_loss",
    "compute_tcod_opd_tdur_policy_loss",
    "fused_topk_forward_kl",
    "packed_cu_seqlens",
    "turn_ids_from_response_mask",
]

FUSED_KL_LOSS = "tcod_fused_kl"
OPD_ADVANTAGE = "tcod_opd"
OPD_POLICY_LOSS = "tcod_opd"
OPD_TDUR_POLICY_LOSS = "tcod_opd_tdur"


def turn_ids_from_response_mask(response_mask: torch.Tensor) -> torch.Tensor:
    """``(B, L)`` turn ids: each run of 1s in ``response_mask`` is one turn, numbered ``0, 1, ...``
    per row; ``-1`` where the mask is 0. int64."""
    keep = response_mask.bool()
    previous = torch.zeros_like(keep)
    previous[:, 1:] = keep[:, :-1]
    turn = torch.cumsum((keep & ~previous).to(torch.int64), dim=1) - 1
    return torch.where(keep, turn, torch.full_like(turn, -1))


# ------------------------------------------------------------------ distillation loss


def _student_topk_mass(student_logits: torch.Tensor, topk_ids: torch.Tensor, rows: int = 1024) -> torch.Tensor:
    """``sum_k p(ids_k)`` per token, a few rows at a time (never a full ``tokens x vocab`` buffer)."""
    flat = student_logits.reshape(-1, student_logits.shape[-1])
    ids = topk_ids.reshape(-1, topk_ids.shape[-1])
    out = torch.empty(flat.shape[0], dtype=torch.float32, device=flat.device)
    with torch.no_grad():
        for start in range(0, flat.shape[0], rows):
            chunk = flat[start:start + rows].float()
            log_z = torch.logsumexp(chunk, dim=-1, keepdim=True)
            out[start:start + rows] = (chunk.gather(-1, ids[start:start + rows]) - log_z).exp().sum(-1)
    return out.reshape(student_logits.shape[:-1])


def fused_topk_forward_kl(
    student_logits: torch.Tensor,
    teacher_topk_log_probs: torch.Tensor,
    teacher_topk_ids: torch.Tensor,
    cu_seqlens: torch.Tensor | None = None,
) -> dict[str, torch.Tensor]:
    """Per-token forward KL(teacher || student) over the teacher's top-k plus a tail bucket.

    Args:
        student_logits: ``(B, T, V)`` (verl: ``(1, total_tokens, V)``, its sequences packed end
            to end), already divided by the sampling temperature; receives the gradient.
        teacher_topk_log_probs: ``(B, T, K)`` float, the teacher's log-probs of its top-k ids.
        teacher_topk_ids: ``(B, T, K)`` int, ids in ``[0, V)``.
        cu_seqlens: ``(S + 1,)`` int, the bounds of the ``S`` sequences of a packed
            ``(1, total_tokens, V)`` batch (FlashAttention's varlen convention; verl's nested
            tensors' ``offsets()``), or ``None``. Passed to the op, which refuses bounds that do
            not cover the tokens; each token's loss is the same with or without it.

    Returns:
        ``distillation_losses`` ``(B, T)`` float32 (carries grad), ``student_mass`` and
        ``teacher_mass`` ``(B, T)``: each model's probability on the top-k ids.
    """
    losses = fused_topk_turn_kl(
        student_logits, teacher_topk_ids, teacher_topk_log_probs.float(),
        divergence="forward_kl", tail="bucket", reduction="none", cu_seqlens=cu_seqlens,
    )
    return {
        "distillation_losses": losses,
        "student_mass": _student_topk_mass(student_logits, teacher_topk_ids),
        "teacher_mass": teacher_topk_log_probs.float().exp().sum(-1),
    }


def packed_cu_seqlens(nested: torch.Tensor, device: torch.device | str) -> torch.Tensor:
    """``(S + 1,)`` int64 ``cu_seqlens`` of verl's packed layout: the offsets of a jagged nested
    tensor of ``S`` sequences, whose values are the sequences end to end."""
    return nested.offsets().to(device=device, dtype=torch.int64)


_verl_forward_kl_topk = getattr(_fsdp_losses, "_tcod_original_forward_kl_topk", _fsdp_losses.compute_forward_kl_topk)


def _fsdp_topk_step(student_logits, teacher_topk_log_probs, teacher_topk_ids, config, data_format):
    """verl's FSDP top-k step, with ``tcod_fused_kl`` computed by :func:`fused_topk_forward_kl`."""
    if config.distillation_loss.loss_mode != FUSED_KL_LOSS:
        return _verl_forward_kl_topk(student_logits, teacher_topk_log_probs, teacher_topk_ids, config, data_format)
    from verl.utils.ulysses import get_ulysses_sequence_parallel_world_size, slice_input_tensor

    # The same layout handling as verl's compute_forward_kl_topk: packed tokens, then the sequence-parallel slice.
    cu_seqlens = None
    if teacher_topk_log_probs.is_nested:
        cu_seqlens = packed_cu_seqlens(teacher_topk_log_probs, student_logits.device)
        teacher_topk_log_probs = teacher_topk_log_probs.values().unsqueeze(0)
        teacher_topk_ids = teacher_topk_ids.values().unsqueeze(0)
    if get_ulysses_sequence_parallel_world_size() > 1:
        # Each rank holds a slice of the packed row, which cuts sequences: no bounds to pass.
        cu_seqlens = None
        teacher_topk_log_probs = slice_input_tensor(teacher_topk_log_probs, dim=1)
        teacher_topk_ids = slice_input_tensor(teacher_topk_ids, dim=1)
    if teacher_topk_ids.shape[:2] != student_logits.shape[:2]:
        raise ValueError(
            f"tcod_fused_kl: teacher top-k tensors cover {tuple(teacher_topk_ids.shape[:2])} tokens but the student "
            f"logits cover {tuple(student_logits.shape[:2])}"
        )
    if student_logits.shape[0] != 1:
        cu_seqlens = None  # a padded (B, T, V) batch: its rows are the sequences
    return fused_topk_forward_kl(student_logits, teacher_topk_log_probs, teacher_topk_ids, cu_seqlens=cu_seqlens)


_fsdp_losses._tcod_original_forward_kl_topk = _verl_forward_kl_topk
_fsdp_losses.compute_forward_kl_topk = _fsdp_topk_step


def compute_tcod_fused_kl(config, distillation_config, model_output: dict, data) -> tuple[torch.Tensor, dict[str, Any]]:
    """The ``tcod_fused_kl`` distillation loss: ``(per-token losses (B, L), metrics)``.

    The per-token losses were formed by :func:`fused_topk_forward_kl` in verl's top-k step;
    this reports them as verl's ``forward_kl_topk`` does (they are >= 0 already)."""
    if getattr(config, "strategy", None) == "megatron":
        raise ValueError(
            "distillation loss tcod_fused_kl runs on verl's fsdp, fsdp2 and veomni strategies, got strategy=megatron "
            "(use loss_mode=forward_kl_topk there)"
        )
    return get_distillation_loss_fn("forward_kl_topk")(
        config=config, distillation_config=distillation_config, model_output=model_output, data=data
    )


if FUSED_KL_LOSS not in DISTILLATION_LOSS_REGISTRY:
    register_distillation_loss(DistillationLossSettings(names=[FUSED_KL_LOSS], use_topk=True))(compute_tcod_fused_kl)


# ------------------------------------------------------------ advantage and policy loss


def compute_tcod_opd_advantage(
    token_level_rewards: torch.Tensor, response_mask: torch.Tensor, config=None, **kwargs: Any
) -> tuple[torch.Tensor, torch.Tensor]:
    """TCOD's sampled-token OPD advantage (the ``tcod_opd`` estimator).

    Args:
        token_level_rewards: ``(B, L)`` float, ``log q(a_t) - log p(a_t)`` of each sampled
            response token (teacher minus student).
        response_mask: ``(B, L)``, 1 on the tokens that are trained.

    Returns:
        ``(advantages, returns)``, both ``(B, L)``: the reward itself on masked-in tokens
        (no discount, no baseline: the teacher's log-prob is the per-token signal), 0 elsewhere.
    """
    advantages = token_level_rewards * response_mask.to(token_level_rewards.dtype)
    return advantages, advantages


if ADV_ESTIMATOR_REGISTRY.get(OPD_ADVANTAGE) is not compute_tcod_opd_advantage:
    ADV_ESTIMATOR_REGISTRY.pop(OPD_ADVANTAGE, None)  # a reload of this module re-registers
    register_adv_est(OPD_ADVANTAGE)(compute_tcod_opd_advantage)


def _vanilla(old_log_prob, log_prob, advantages, response_mask, loss_agg_mode, config, rollout_is_weights):
    return get_policy_loss_fn("vanilla")(
        old_log_prob=old_log_prob, log_prob=log_prob, advantages=advantages, response_mask=response_mask,
        loss_agg_mode=loss_agg_mode, config=config, rollout_is_weights=rollout_is_weights,
    )


def compute_tcod_opd_policy_loss(
    old_log_prob, log_prob, advantages, response_mask, loss_agg_mode="token-mean", config=None,
    rollout_is_weights=None,
):
    """``tcod_opd``: verl's PPO clipped surrogate on the OPD advantages, over the response mask.

    All tensors ``(B, L)``; returns ``(scalar loss, metrics)`` as every verl policy loss."""
    return _vanilla(old_log_prob, log_prob, advantages, response_mask, loss_agg_mode, config, rollout_is_weights)


def compute_tcod_opd_tdur_policy_loss(
    old_log_prob, log_prob, advantages, response_mask, loss_agg_mode="token-mean", config=None,
    rollout_is_weights=None,
):
    """``tcod_opd_tdur``: :func:`compute_tcod_opd_policy_loss` with each turn's advantages
    multiplied by its ATOD T-DUR weight.

    Turns are the runs of ``response_mask`` (:func:`turn_ids_from_response_mask`). Per turn,
    ``d_k = mean |log p(a) - log q(a)| = mean |A|`` and ``h_k = mean(-log p(a))`` with
    ``log p = old_log_prob`` and ``log q = old_log_prob + A``; weights as
    :func:`tcod_fast.objectives.tdur_weights`. The metric ``actor/tdur_weight_mean`` is the mean
    weight over trained tokens."""
    turn_ids = turn_ids_from_response_mask(response_mask)
    student = old_log_prob.detach().float()
    teacher = student + advantages.detach().float()
    keep = turn_ids >= 0
    if bool(keep.any()):
        weights = tdur_weights(student, teacher, turn_ids)
        token_weights = broadcast_turn_weights(weights, turn_ids).to(advantages.dtype)
    else:
        token_weights = torch.zeros_like(advantages)
    loss, metrics = _vanilla(
        old_log_prob, log_prob, advantages * token_weights, response_mask, loss_agg_mode, config, rollout_is_weights
    )
    metrics = dict(metrics)
    metrics["actor/tdur_weight_mean"] = float(token_weights[keep].mean()) if bool(keep.any()) else 0.0
    return loss, metrics


register_policy_loss(OPD_POLICY_LOSS)(compute_tcod_opd_policy_loss)
register_policy_loss(OPD_TDUR_POLICY_LOSS)(compute_tcod_opd_tdur_policy_loss)
