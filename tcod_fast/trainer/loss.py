"""The loss of one micro-batch of whole episodes, as named steps.

:func:`compute_loss` (at the end of this module) runs them in this order, on one of the
token-budget micro-batches of whole episodes that :func:`micro_batches` cuts:

1. :func:`pack_micro_batch`: episodes -> padded token rows, with the turn id of every
   target token after the plans' turn windows; the window mask (``trained``) is computed
   here, once, and every later step reuses it;
2. :func:`forward_models`: student (with grad) and teacher (frozen) forwards, to logits
   or, for the fused-linear op, to last hidden states;
3. :func:`turn_kl_statistics`: the fused teacher-student divergence per token and its
   per-(row, turn) sums;
4. :func:`episode_turn_statistics` and :func:`turn_weights`: those sums per episode (the
   KL-by-turn diagnostics) and the algorithm's per-turn weights (T-DUR, SOD);
5. :func:`opd_term`: the exact full-vocabulary OPD term;
6. :func:`ppo_term`: the PPO clipped surrogate on the advantage
   :func:`tcod_fast.objectives.token_advantages` assembles (GRPO, and the OPD term when it
   is the sampled-token estimator).

Shapes: ``R`` rows (one per episode in ``append`` mode, one per student turn in
``window`` mode), ``T`` tokens per row, ``E`` episodes, ``n`` = ``max_turns`` turn
columns. Losses are sums divided by ``normaliser``, the trained-token count of the whole
update across processes, so micro-batch losses add up to the update's token mean.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from tcod_fast import objectives
from tcod_fast.algorithms import TURN_WEIGHTINGS, LossCoefficients
from tcod_fast.curriculum import EpisodePlan, turn_windows_tensor
from tcod_fast.loss_settings import Estimator
from tcod_fast.ops.fused_linear_turn_kl import fused_linear_turn_kl
from tcod_fast.ops.topk_turn_kl import fused_topk_turn_kl
from tcod_fast.ops.turn_kl import fused_turn_kl
from tcod_fast.rollout import PackingConfig, apply_turn_windows, pack_trajectories
from tcod_fast.trainer.parallel import is_sharded, sharded_hidden_states
from tcod_fast.trainer.setup import TrainingRun
from tcod_fast.trainer.sparse_teacher import SparseTeacher, sparse_teacher_maps

__all__ = [
    "EpisodeTurnStats",
    "LossOutput",
    "ModelOutputs",
    "compute_loss",
    "micro_batches",
    "PPOTerm",
    "PackedMicroBatch",
    "episode_turn_statistics",
    "forward_models",
    "opd_term",
    "pack_micro_batch",
    "ppo_term",
    "sampled_token_logprobs",
    "trained_token_count",
    "turn_kl_statistics",
    "turn_weights",
]


def trained_token_count(trajectory: Any, plan: EpisodePlan) -> int:
    """Tokens of ``trajectory`` the loss trains: student tokens inside ``plan.turn_window``."""
    lo, hi = plan.turn_window
    return sum(1 for turn_id in trajectory.turn_ids if turn_id >= 0 and lo <= turn_id < hi)


# ======================================================================================
# 1. pack
# ======================================================================================
@dataclass
class PackedMicroBatch:
    """A micro-batch as token rows: padded (one sequence per row) or padding-free (every
    sequence end to end in one row, its bounds in ``cu_seqlens``).

    Attributes:
        model_inputs: keyword arguments of the models' forward.
        target_ids: ``(R, T)`` int64, the token each position predicts (``R = 1`` and
            ``T = N``, the micro-batch's tokens, when padding-free).
        turn_ids: ``(R, T)`` int64, the target token's turn index where it is trained
            (a student token inside its plan's turn window, index ``< num_turns``), else -1.
        trained: ``(R, T)`` bool, ``turn_ids >= 0``: the window mask every step uses.
        sequence_episode: ``(S,)`` int64, the episode (index into the micro-batch) of each
            sequence (one per episode in ``append`` mode, one per student turn in ``window``
            mode); padded, sequence ``s`` is row ``s``.
        num_episodes: ``E``.
        num_turns: ``n``, columns of the per-turn statistics.
        cu_seqlens: padding-free: ``(S+1,)`` int64, sequence ``s`` is tokens
            ``cu_seqlens[s]:cu_seqlens[s+1]`` of the row; ``None`` when padded.
        token_place: padding-free: ``(sequence, position)`` of every token of the row, each
            ``(N,)`` int64, for :meth:`per_sequence`.
        longest_sequence: padding-free: the longest sequence's token count.
    """

    model_inputs: dict
    target_ids: torch.Tensor
    turn_ids: torch.Tensor
    trained: torch.Tensor
    sequence_episode: torch.Tensor
    num_episodes: int
    num_turns: int
    cu_seqlens: torch.Tensor | None = None
    token_place: tuple[torch.Tensor, torch.Tensor] | None = None
    longest_sequence: int = 0

    def per_sequence(self, values: torch.Tensor, fill: float | int | bool = 0) -> torch.Tensor:
        """A per-token tensor ``(R, T, ...)`` as one row per sequence ``(S, L, ...)``, ``fill``
        past each sequence's end: itself when padded; when padding-free, the row cut at
        ``cu_seqlens`` (differentiable; ``O(N)``, never ``N x V``)."""
        if self.cu_seqlens is None:
            return values
        sequence, position = self.token_place
        shape = (len(self.cu_seqlens) - 1, self.longest_sequence, *values.shape[2:])
        return values.new_full(shape, fill).index_put((sequence, position), values[0])


def pack_micro_batch(
    trajectories: Sequence[Any],
    plans: Sequence[EpisodePlan],
    *,
    context_mode: str,
    pad_token_id: int,
    num_turns: int,
    device: torch.device | str = "cpu",
    padding_free: bool = False,
) -> PackedMicroBatch:
    """Pack ``trajectories`` (played under ``plans``) into token rows on ``device``.

    ``context_mode`` is ``append`` (one sequence per episode) or ``window`` (one sequence per
    student turn). Padded, each sequence is a row, right-padded to the longest; with
    ``padding_free``, the sequences lie end to end in one row whose ``position_ids`` restart
    at 0 at every sequence and no attention mask (the model keeps the sequences apart, see
    :func:`~tcod_fast.trainer.build.keeps_packed_sequences_apart`). Turn ids outside a plan's
    ``turn_window`` or ``>= num_turns`` become -1.
    """
    config = PackingConfig(mode=context_mode, layout="padded", pad_token_id=pad_token_id)
    if padding_free:  # one row, with room for every token the micro-batch's sequences can have
        room = sum(len(t.token_ids) + sum(len(turn.window_prompt_token_ids) for turn in t.turns) for t in trajectories)
        config = PackingConfig(mode=context_mode, layout="packed", pad_token_id=pad_token_id, max_row_tokens=room)
    batch = pack_trajectories(trajectories, config).to(device)
    turn_ids = apply_turn_windows(batch, turn_windows_tensor(plans))
    # turn ids are turn indices, < num_turns; the statistics are (sequences, num_turns)
    turn_ids = torch.where(turn_ids < num_turns, turn_ids, torch.full_like(turn_ids, -1))
    packed = PackedMicroBatch(
        model_inputs={k: v for k, v in batch.model_inputs().items() if v is not None},
        target_ids=batch.target_ids,
        turn_ids=turn_ids,
        trained=turn_ids >= 0,
        sequence_episode=batch.sequence_trajectory_index.to(device),
        num_episodes=len(trajectories),
        num_turns=num_turns,
    )
    if padding_free:
        lengths = batch.sequence_lengths.to(device)
        packed.cu_seqlens = torch.cat([lengths.new_zeros(1), lengths.cumsum(0)])
        sequence = batch.sequence_ids[0]
        packed.token_place = (sequence, batch.position_ids[0])
        packed.longest_sequence = int(batch.sequence_lengths.max())
    return packed


# ======================================================================================
# 2. forward
# ======================================================================================
@dataclass
class ModelOutputs:
    """Student and teacher outputs on one packed micro-batch.

    Attributes:
        student: ``(R, T, V)`` logits, or ``(R, T, H)`` last hidden states when ``hidden``;
            carries grad when the forward ran with grad.
        teacher: the same for the teacher (no grad), or ``None`` without a teacher.
        hidden: the outputs are hidden states (for ``fused_linear_turn_kl``).
    """

    student: torch.Tensor
    teacher: torch.Tensor | None
    hidden: bool


def _forward(model: torch.nn.Module, inputs: dict, hidden: bool) -> torch.Tensor:
    if hidden:
        if is_sharded(model):  # FSDP2: through the root module, which gathers the LM head
            return sharded_hidden_states(model, inputs)
        return model.base_model(**inputs).last_hidden_state
    return model(**inputs).logits


def forward_models(
    student: torch.nn.Module,
    teacher: torch.nn.Module | None,
    packed: PackedMicroBatch,
    *,
    hidden: bool = False,
    bf16: bool = False,
    device_type: str = "cpu",
) -> ModelOutputs:
    """Run both models on ``packed.model_inputs`` (the teacher under ``no_grad``), under
    bfloat16 autocast when ``bf16``. Grad mode for the student is the caller's."""
    autocast = torch.autocast(device_type=device_type, dtype=torch.bfloat16, enabled=bf16)
    with autocast:
        student_out = _forward(student, packed.model_inputs, hidden)
    teacher_out = None
    if teacher is not None:
        with torch.no_grad(), autocast:
            teacher_out = _forward(teacher, packed.model_inputs, hidden)
    return ModelOutputs(student=student_out, teacher=teacher_out, hidden=hidden)


# ======================================================================================
# 3. turn KL
# ======================================================================================
def turn_kl_statistics(
    outputs: ModelOutputs,
    packed: PackedMicroBatch,
    *,
    divergence: str,
    jsd_beta: float = 0.5,
    vocab_size: int | None = None,
    backend: str = "auto",
    student_grad: bool = True,
    lm_heads: tuple[torch.Tensor, torch.Tensor] | None = None,
    sparse_teacher: SparseTeacher | None = None,
):
    """Teacher-student divergence of every trained token and its per-(row, turn) sums.

    ``fused_turn_kl`` on logits; ``fused_linear_turn_kl`` on hidden states with
    ``lm_heads = (student_weight, teacher_weight)`` when ``outputs.hidden``;
    ``fused_topk_turn_kl`` against the teacher's top-K maps when ``sparse_teacher`` is given
    (``outputs.teacher`` is then not read; ``teacher_logprob`` is the teacher's exact log-prob
    of each target). Sum reduction; ``student_grad=False`` detaches the student logits (the
    KL is then a diagnostic).

    Returns:
        A ``TurnKLResult`` with ``(S, n)`` per-(sequence, turn) sums (``S = R`` when padded)
        and the sampled tokens' log-probs, or ``None`` without a teacher.
    """
    options = dict(
        target_ids=packed.target_ids,
        divergence=divergence,
        beta=jsd_beta,
        reduction="sum",
        return_stats=True,
        num_turns=packed.num_turns,
        backend=backend,
    )
    if packed.cu_seqlens is not None:  # padding-free: per-sequence statistics from the bounds
        options["cu_seqlens"] = packed.cu_seqlens
    if sparse_teacher is None and outputs.teacher is None:
        return None
    if outputs.hidden:
        if lm_heads is None:
            raise ValueError("hidden-state outputs need lm_heads=(student_weight, teacher_weight), got None")
        student_weight, teacher_weight = lm_heads
        return fused_linear_turn_kl(
            outputs.student, student_weight, outputs.teacher, teacher_weight, packed.turn_ids,
            vocab_size=vocab_size, **options,
        )
    student_logits = outputs.student if student_grad else outputs.student.detach()
    if sparse_teacher is not None:
        return fused_topk_turn_kl(
            student_logits, sparse_teacher.topk_ids, sparse_teacher.topk_logprobs, packed.turn_ids, **options
        )
    return fused_turn_kl(student_logits, outputs.teacher, packed.turn_ids, vocab_size=vocab_size, **options)


# ======================================================================================
# 4. per-episode turn statistics and turn weights
# ======================================================================================
@dataclass
class EpisodeTurnStats:
    """Per-(episode, turn) sums over trained tokens, each ``(E, n)`` float32.

    Attributes:
        kl_sum: divergence summed per turn (the KL-by-turn diagnostics).
        token_count: trained tokens per turn.
        abs_logratio_sum: ``|log p(a) - log q(a)|`` summed per turn (T-DUR's and SOD's
            ``d_k`` numerator); ``None`` without a teacher.
        neg_logprob_sum: ``-log p(a)`` summed per turn (T-DUR's ``h_k`` numerator);
            ``None`` without a teacher.
    """

    kl_sum: torch.Tensor
    token_count: torch.Tensor
    abs_logratio_sum: torch.Tensor | None = None
    neg_logprob_sum: torch.Tensor | None = None


def episode_turn_statistics(stats, packed: PackedMicroBatch) -> EpisodeTurnStats:
    """Add the per-(row, turn) sums of ``stats`` (a ``TurnKLResult``, or ``None`` without a
    teacher: zeros) into per-(episode, turn) sums; several rows of one episode (window
    mode) add up."""
    device = packed.turn_ids.device
    zeros = torch.zeros(packed.num_episodes, packed.num_turns, device=device)
    if stats is None:
        return EpisodeTurnStats(kl_sum=zeros.clone(), token_count=zeros.clone())

    def per_episode(row_values):
        if row_values is None:
            return None
        return zeros.index_add(0, packed.sequence_episode, row_values.float())

    return EpisodeTurnStats(
        kl_sum=per_episode(stats.turn_kl_sum),
        token_count=per_episode(stats.turn_token_count),
        abs_logratio_sum=per_episode(stats.turn_abs_logratio_sum),
        neg_logprob_sum=per_episode(stats.turn_neg_logprob_sum),
    )


def turn_weights(turn_stats: EpisodeTurnStats, weighting: str | None, *, sod_delta: float = 0.2) -> torch.Tensor | None:
    """Per-(episode, turn) weights ``(E, n)`` of the OPD term: ``None`` (unweighted),
    ``"tdur"`` (:func:`tcod_fast.objectives.tdur_weights`) or ``"sod"``
    (:func:`tcod_fast.objectives.sod_weights` with ``delta = sod_delta``)."""
    if weighting is None:
        return None
    if weighting not in TURN_WEIGHTINGS:
        raise ValueError(f"turn weighting must be None or one of {TURN_WEIGHTINGS}, got {weighting!r}")
    if turn_stats.abs_logratio_sum is None:
        raise ValueError(f"turn weighting {weighting!r} needs the teacher's per-turn statistics, got none (no teacher)")
    if weighting == "tdur":
        return objectives.tdur_weights(
            turn_abs_logratio_sum=turn_stats.abs_logratio_sum,
            turn_neg_logprob_sum=turn_stats.neg_logprob_sum,
            turn_token_count=turn_stats.token_count,
        )
    return objectives.sod_weights(
        turn_abs_logratio_sum=turn_stats.abs_logratio_sum, turn_token_count=turn_stats.token_count, delta=sod_delta
    )


# ======================================================================================
# 5. OPD term (exact, full vocabulary)
# ======================================================================================
def opd_term(
    stats,
    packed: PackedMicroBatch,
    opd_coef: float,
    normaliser: float,
    *,
    row_turn_weights: torch.Tensor | None = None,
) -> torch.Tensor:
    """``opd_coef * sum_t w_{k(t)} D_t / normaliser`` over the trained tokens, with ``D_t``
    the per-token divergence of ``stats`` and ``w`` the ``(S, n)`` per-sequence turn weights
    (``None``: 1, the summed loss of the fused op itself). Scalar, with grad."""
    if row_turn_weights is None:
        divergence_sum = stats.loss
    else:
        token_weights = objectives.broadcast_turn_weights(row_turn_weights, packed.per_sequence(packed.turn_ids, -1))
        divergence_sum = (packed.per_sequence(stats.kl) * token_weights).sum()
    return opd_coef * divergence_sum / normaliser


# ======================================================================================
# 6. PPO term
# ======================================================================================
@dataclass
class PPOTerm:
    """The PPO surrogate of one micro-batch.

    Attributes:
        loss: scalar, the token mean over this micro-batch rescaled to its share of the
            update's token mean (``* trained / normaliser``); with grad.
        stats: ``ppo/<name>`` -> statistic times this micro-batch's trained tokens (sum
            them over micro-batches and divide by ``normaliser`` for the update's mean).
        old_logprobs: ``(S, L)`` rollout-policy log-probs used for the ratio, one row per
            sequence.
    """

    loss: torch.Tensor
    stats: dict[str, float]
    old_logprobs: torch.Tensor


def sampled_token_logprobs(logits: torch.Tensor, target_ids: torch.Tensor) -> torch.Tensor:
    """``log p(target)`` per position, float32, with grad: ``(R, T, V), (R, T) -> (R, T)``."""
    logits = logits.float()
    return logits.gather(-1, target_ids.unsqueeze(-1)).squeeze(-1) - torch.logsumexp(logits, dim=-1)


def ppo_term(
    student_logits: torch.Tensor,
    packed: PackedMicroBatch,
    sequence_advantages: torch.Tensor,
    coefficients: LossCoefficients,
    normaliser: float,
    *,
    teacher_logprobs: torch.Tensor | None = None,
    row_turn_weights: torch.Tensor | None = None,
    sampled_kl: str = "k1",
    clip_low: float = 0.2,
    clip_high: float | None = None,
    dual_clip: float | None = 3.0,
    old_logprobs: torch.Tensor | None = None,
) -> PPOTerm:
    """PPO clipped surrogate (token mean) of the micro-batch.

    Args:
        student_logits: ``(R, T, V)``, with grad.
        sequence_advantages: ``(E,)`` one advantage per episode (GRPO; zeros without).
        coefficients: ``grpo_coef`` weighs the sequence advantage; with
            ``teacher_logprobs`` (the sampled-token OPD estimator) ``opd_coef`` weighs
            the OPD advantage, turn-weighted by ``row_turn_weights (S, n)``.
        teacher_logprobs: ``(R, T)`` ``log q`` of the sampled tokens, or ``None`` when the
            OPD term is not in the surrogate.
        sampled_kl: ``k1`` or ``k3`` estimator of the sampled OPD advantage.
        old_logprobs: ``(S, L)`` rollout-policy log-probs, one row per sequence (what an
            earlier call returned); ``None`` uses the current ones (detached), the on-policy
            first update.
    """
    # one row per sequence from here on (the padded rows as they are, a padding-free row cut)
    trained, turn_ids = packed.per_sequence(packed.trained, False), packed.per_sequence(packed.turn_ids, -1)
    logprobs = packed.per_sequence(sampled_token_logprobs(student_logits, packed.target_ids))
    logprobs = torch.where(trained, logprobs, torch.zeros_like(logprobs))
    old = old_logprobs.to(logprobs.device) if old_logprobs is not None else logprobs.detach()
    if teacher_logprobs is not None:
        teacher_logprobs = torch.where(trained, packed.per_sequence(teacher_logprobs), torch.zeros_like(old))
    advantages = objectives.token_advantages(
        old,
        turn_ids,
        sequence_advantages.to(logprobs.device)[packed.sequence_episode],
        opd_coef=coefficients.opd_coef,
        grpo_coef=coefficients.grpo_coef,
        teacher_logprobs=teacher_logprobs,
        turn_weights=row_turn_weights,
        kl_estimator=sampled_kl,
    )
    loss, raw_stats = objectives.ppo_clipped_loss(
        logprobs,
        old,
        advantages,
        trained,
        clip_low=clip_low,
        clip_high=clip_high,
        dual_clip=dual_clip,
        loss_agg="token_mean",
    )
    # token mean over this micro-batch -> its share of the update's token mean
    local = float(trained.sum())
    loss = loss * (local / normaliser)
    stats = {f"ppo/{k}": float(v) * local for k, v in raw_stats.items()}
    return PPOTerm(loss=loss, stats=stats, old_logprobs=old)


# ======================================================================================
# 7. the micro-batch loss, from these steps; micro-batches of whole episodes
# ======================================================================================
def _sequence_lengths(trajectory, mode: str) -> list[int]:
    """Tokens of each sequence this trajectory adds to a micro-batch."""
    if mode == "append":
        return [len(trajectory.token_ids)]
    return [len(t.window_prompt_token_ids) + len(t.response_token_ids) for t in trajectory.turns if t.is_student]


def micro_batches(
    trajectories: Sequence[Any],
    indices: Sequence[int],
    mode: str,
    budget: int,
    *,
    padding_free: bool = False,
    groups: Callable[[Any], Any] | None = None,
) -> list[list[int]]:
    """Split episode ``indices`` into micro-batches whose size fits ``budget`` tokens: padded,
    rows x longest row; ``padding_free``, the tokens themselves. Whole episodes only (T-DUR/SOD
    weights are per episode). ``groups``: a key of each trajectory (its teacher, in a run with
    several) that no micro-batch mixes; the keys' micro-batches follow each other in the order
    the keys first appear."""
    def size(lengths: list[int]) -> int:
        return sum(lengths) if padding_free else len(lengths) * max(lengths, default=0)

    by_key: dict[Any, list[int]] = {}
    for index in indices:
        by_key.setdefault(groups(trajectories[index]) if groups is not None else None, []).append(index)
    batches: list[list[int]] = []
    for key_indices in by_key.values():
        current: list[int] = []
        current_lengths: list[int] = []
        for index in key_indices:
            lengths = _sequence_lengths(trajectories[index], mode)
            if current and size(current_lengths + lengths) > budget:
                batches.append(current)
                current, current_lengths = [], []
            current.append(index)
            current_lengths += lengths
        if current:
            batches.append(current)
    return batches


@dataclass
class LossOutput:
    """A micro-batch's loss (already normalised by the global token count) and its stats."""

    loss: torch.Tensor
    turn_kl_sum: torch.Tensor  # (len(indices), max_turns) per episode
    turn_token_count: torch.Tensor
    kl_term: float
    ppo_term: float
    ppo_stats: dict[str, float]
    old_logprobs: torch.Tensor | None = None


def _can_use_fused_linear(run: TrainingRun, teacher_model, coefficients: LossCoefficients) -> bool:
    setting = run.config.loss.fused_linear
    if setting == "never" or not run.estimator.fused_linear:
        return False
    simple = coefficients.grpo_coef == 0.0 and coefficients.turn_weighting is None
    available = all(
        isinstance(m.get_output_embeddings(), torch.nn.Linear) and m.get_output_embeddings().bias is None
        for m in (run.student, teacher_model)
    )
    if setting == "always":
        if not available:
            raise RuntimeError("loss.fused_linear='always' but fused_linear_turn_kl or a plain Linear LM head is missing")
        return simple
    return simple and available


def needs_ppo(estimator: Estimator, coefficients: LossCoefficients) -> bool:
    """Whether the loss has a PPO clipped surrogate: the OPD term's as an advantage (the
    sampled estimator), or a GRPO term (``grpo_coef != 0``). Such a loss needs the rollout
    policy's log-probs when a step makes several updates."""
    return estimator.ppo_advantage or coefficients.grpo_coef != 0.0


def compute_loss(
    run: TrainingRun,
    trajectories: Sequence[Any],
    plans: Sequence[EpisodePlan],
    sequence_advantages: torch.Tensor,
    coefficients: LossCoefficients,
    normaliser: float,
    *,
    old_logprobs: torch.Tensor | None = None,
    with_grad: bool = True,
    divergence: str | None = None,
) -> LossOutput:
    """Loss of one micro-batch of whole episodes: the steps above, in order.

    ``normaliser`` is the number of trained tokens of the whole update across processes, so
    the micro-batch losses sum to the token mean of the update (and the gradients, summed
    over processes, to its gradient). Terms:

    * OPD, full vocabulary: ``opd_coef * sum_t w_{k(t)} KL_t / normaliser`` through the
      fused op;
    * PPO surrogate (GRPO term, and the OPD term for the sampled estimator):
      advantages ``opd_coef w_k (log q - log p_old)`` (or ``-opd_coef w_k k3``) plus
      ``grpo_coef A_GRPO``, token-mean aggregation rescaled to the global count.

    ``divergence`` overrides ``config.loss.divergence`` (evaluation always measures the
    reverse KL, whatever the training loss uses).

    The teacher is the episodes' own (``run.teacher_for``): a run with several teachers cuts
    micro-batches that never mix teachers (:func:`micro_batches`' ``groups``), so only that
    one teacher runs.
    """
    settings = run.config.loss
    teacher = run.teacher_for(trajectories[0].task) if trajectories else run.teachers["teacher"]
    if any(run.teacher_for(t.task).name != teacher.name for t in trajectories):
        raise ValueError("a micro-batch holds episodes of several teachers; cut micro-batches per teacher (micro_batches(groups=...))")
    teacher_model = teacher.model
    sampled = run.estimator.ppo_advantage  # the OPD term is an advantage of the surrogate
    sparse = run.estimator.sparse_teacher or teacher.served is not None  # teacher as top-K maps
    with_ppo = needs_ppo(run.estimator, coefficients)
    use_fused_linear = not with_ppo and _can_use_fused_linear(run, teacher_model, coefficients)

    packed = pack_micro_batch(
        trajectories,
        plans,
        context_mode=run.config.env.context_mode,
        pad_token_id=run.tokenizer.pad_token_id,
        num_turns=run.max_turns,
        device=run.device,
        padding_free=run.padding_free,
    )
    with torch.enable_grad() if with_grad else torch.no_grad():
        outputs = forward_models(
            run.student, teacher_model, packed, hidden=use_fused_linear, bf16=run.use_bf16, device_type=run.device.type
        )
        stats = turn_kl_statistics(
            outputs,
            packed,
            divergence=divergence or settings.divergence,
            jsd_beta=settings.jsd_beta,
            vocab_size=min(run.student.config.vocab_size, teacher_model.config.vocab_size) if teacher_model is not None else None,
            backend=settings.backend,
            student_grad=with_grad and not sampled and coefficients.opd_coef != 0.0,
            lm_heads=(
                (run.student.get_output_embeddings().weight, teacher_model.get_output_embeddings().weight)
                if use_fused_linear
                else None
            ),
            sparse_teacher=sparse_teacher_maps(run, teacher, outputs, packed) if sparse else None,
        )
        turn_stats = episode_turn_statistics(stats, packed)
        episode_weights = turn_weights(turn_stats, coefficients.turn_weighting, sod_delta=settings.sod_delta)
        row_turn_weights = episode_weights[packed.sequence_episode] if episode_weights is not None else None

        loss = torch.zeros((), device=run.device)
        kl_term = 0.0
        if not sampled and coefficients.opd_coef != 0.0 and stats is not None:
            opd_loss = opd_term(stats, packed, coefficients.opd_coef, normaliser, row_turn_weights=row_turn_weights)
            loss = loss + opd_loss
            kl_term = float(opd_loss.detach())

        ppo = None
        if with_ppo:
            if sampled and stats is None:
                raise ValueError("the sampled OPD estimator needs a teacher")
            ppo = ppo_term(
                outputs.student,
                packed,
                sequence_advantages,
                coefficients,
                normaliser,
                teacher_logprobs=stats.teacher_logprob if sampled else None,
                row_turn_weights=row_turn_weights,
                sampled_kl=settings.sampled_kl,
                clip_low=settings.clip_low,
                clip_high=settings.clip_high,
                dual_clip=settings.dual_clip,
                old_logprobs=old_logprobs,
            )
            loss = loss + ppo.loss

    return LossOutput(
        loss=loss,
        turn_kl_sum=turn_stats.kl_sum.detach(),
        turn_token_count=turn_stats.token_count.detach(),
        kl_term=kl_term,
        ppo_term=float(ppo.loss.detach()) if ppo is not None else 0.0,
        ppo_stats=ppo.stats if ppo is not None else {},
        old_logprobs=ppo.old_logprobs.detach() if ppo is not None else None,
    )
