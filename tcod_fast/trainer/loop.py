"""The training loop: rollout -> score -> advantages -> loss -> update -> evaluate -> log -> checkpoint.

Read :func:`train` first; the stages of a step follow it, in that order. How a run is built
is :mod:`tcod_fast.trainer.setup`, the loss of a micro-batch :mod:`tcod_fast.trainer.loss`,
evaluation :mod:`tcod_fast.trainer.evaluation`, checkpoints :mod:`tcod_fast.trainer.checkpoint`.

Each algorithm is one record in :mod:`tcod_fast.algorithms` (docs/algorithms.md), reached
as ``run.algorithm``; this module asks the record and never branches on a name:

* *who plays which turn* (TCOD-F2B depth, TCOD-B2F prefix, Guided-OPD teacher coin): the
  record's ``plan_episode``, called by the curriculum sampler; :func:`rollout` plays the
  plans, and each plan's turn window masks the loss in
  :func:`~tcod_fast.trainer.loss.compute_loss`;
* *what signal trains a turn*: the record's ``coefficients`` at the step
  (:func:`algorithm_coefficients`; the table is in :mod:`tcod_fast.algorithms`);
* *what it needs*: a teacher model (:func:`~tcod_fast.trainer.setup.setup_run`), a teacher
  generator and expert action counts (:func:`rollout`).

*How the OPD term is estimated* (``loss.estimator``) is the loss's: ``full_vocab`` -- the
exact reverse KL over the vocabulary through ``fused_linear_turn_kl`` / ``fused_turn_kl``,
weighted by the turn weights; ``sampled`` -- TCOD's reference: the advantage
``kl_coef (log q - log p_old)`` (k1, or ``-kl_coef k3``) in a PPO clipped surrogate, summed
with the GRPO advantage.
"""

from __future__ import annotations

import os
import time
import warnings
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from tcod_fast import objectives
from tcod_fast.algorithms import LossCoefficients
from tcod_fast.curriculum import EpisodePlan
from tcod_fast.errors import TcodFastWarning
from tcod_fast.trainer import build, parallel
from tcod_fast.trainer.checkpoint import checkpoint, checkpoint_to_resume, export_student, restore
from tcod_fast.trainer.config import TrainConfig
from tcod_fast.trainer.distributed import all_reduce_sum
from tcod_fast.trainer.evaluation import evaluate, kl_metrics, kl_metrics_by_env, success_by_env
from tcod_fast.trainer.generators import weight_push_metrics
from tcod_fast.trainer.loss import compute_loss, micro_batches, needs_ppo, trained_token_count
from tcod_fast.trainer.run_folder import check_new_run_folder
from tcod_fast.trainer.setup import (
    TrainingRun,
    generators,
    play_episodes,
    preflight,
    setup_run_or_remove_folder,
    warn_if_random_teacher,
)

__all__ = [
    "Advantages",
    "Scores",
    "StepBatch",
    "algorithm_coefficients",
    "compute_advantages",
    "rollout",
    "score",
    "train",
    "train_on_batch",
    "update",
]


@dataclass
class StepBatch:
    """One step's episodes (this process's share) with the plans that made them."""

    step: int
    plans: list[EpisodePlan]
    trajectories: list[Any]


# ======================================================================================
# the loop
# ======================================================================================
def train(
    config: TrainConfig,
    *,
    resume: bool = False,
    stop_after_step: int | None = None,
    tokenizer=None,
) -> TrainingRun:
    """Train a student with ``config.curriculum.algorithm``; returns the finished run.

    Args:
        config: the run's configuration.
        resume: continue from the newest readable checkpoint in ``output_dir/checkpoints``
            (exactly: weights, optimiser, scheduler, sampler and RNG states, and the metrics
            file cut back to that step). A larger ``trainer.steps`` than the run had trains
            further; a run already at ``trainer.steps`` is left as it is (a warning says so).
        stop_after_step: stop (after checkpointing) once this many steps are done; simulates
            a pre-empted job in tests.
        tokenizer: use this tokenizer instead of building/loading one.

    Raises:
        UserError: before any model is built or any file written, when the config is
            refused (:func:`~tcod_fast.trainer.setup.preflight`), or ``output_dir`` holds a
            run already and ``resume`` is False, or ``resume`` finds no checkpoint, or one
            made with another curriculum or student, or one past ``trainer.steps``.
    """
    preflight(config)
    if not resume and os.environ.get("RANK", "0") == "0":  # other ranks may start after rank 0 wrote
        check_new_run_folder(config.trainer.output_dir)
    resume_state = checkpoint_to_resume(config)[1] if resume else None
    finished = resume_state is not None and int(resume_state["step"]) >= config.trainer.steps
    if not finished:
        warn_if_random_teacher(config)
    run = setup_run_or_remove_folder(config, tokenizer=tokenizer, write_run_files=not finished)
    with run.closing():  # every way out (the end, an error, Ctrl-C) releases the process group
        if resume_state is not None:
            restore(run, resume_state)
            resume_state = None  # the checkpoint's tensors are in the run now: free the copy
        elif config.eval.at_start and config.eval.num_tasks > 0:
            run.log(0, evaluate(run, 0), kind="eval")
        if finished:
            # Its final evaluation and checkpoint exist already: do not repeat them.
            warnings.warn(
                f"the run in {run.output_dir} finished at step {run.state.next_step} (trainer.steps={config.trainer.steps}): "
                "nothing to do; raise trainer.steps to train further",
                TcodFastWarning,
                stacklevel=2,
            )
            if not (run.output_dir / "final" / "config.json").is_file():
                export_student(run, run.output_dir / "final")  # killed between checkpoint and export
        else:
            _train_steps(run, stop_after_step)
    return run


def _train_steps(run: TrainingRun, stop_after_step: int | None) -> None:
    """The steps from ``run.state.next_step`` on, then the final evaluation, checkpoint and export."""
    config = run.config
    last = config.trainer.steps if stop_after_step is None else min(stop_after_step, config.trainer.steps)
    steps = tqdm(
        range(run.state.next_step, last),
        desc=f"train {config.logging.run_name or config.algorithm}",
        disable=not (config.logging.progress and run.dist.is_main),
        initial=run.state.next_step,
        total=config.trainer.steps,
    )
    for step in steps:
        started = time.perf_counter()
        batch = rollout(run, step)
        scores = score(run, batch)
        advantages = compute_advantages(run, batch, scores)
        rolled = time.perf_counter()
        train_metrics = train_on_batch(run, batch, advantages)  # loss -> update
        trained = time.perf_counter()
        metrics = {**scores.metrics, **train_metrics, **run.sampler.summary(step)}
        metrics["time/rollout_s"] = rolled - started
        metrics.update(weight_push_metrics(run))
        metrics["time/train_s"] = trained - rolled
        metrics["tokens_per_s"] = train_metrics["trained_tokens"] / max(trained - rolled, 1e-9)
        run.log(step, metrics)
        steps.set_postfix(loss=f"{metrics['loss']:.4f}", kl=f"{metrics.get('kl/trajectory_mean', 0.0):.3f}", refresh=False)
        run.state.next_step = step + 1
        cadence = config.trainer.eval_every
        if cadence and run.state.next_step % cadence == 0 and run.state.next_step < config.trainer.steps:
            run.log(run.state.next_step, evaluate(run, run.state.next_step), kind="eval")
        cadence = config.trainer.checkpoint_every
        # The last step's checkpoint is written after the final evaluation, below: a
        # checkpoint at trainer.steps always means "evaluated and finished".
        if cadence and run.state.next_step % cadence == 0 and run.state.next_step < config.trainer.steps:
            checkpoint(run)
    steps.close()

    if run.state.next_step >= config.trainer.steps:
        if config.eval.num_tasks > 0:
            run.log(run.state.next_step, evaluate(run, run.state.next_step), kind="eval")
        checkpoint(run)
        export_student(run, run.output_dir / "final")
    elif run.state.next_step % max(config.trainer.checkpoint_every, 1) != 0 or not config.trainer.checkpoint_every:
        checkpoint(run)  # stopped early: keep where it got to


# ======================================================================================
# 1. rollout
# ======================================================================================
def _step_seed(run: TrainingRun, step: int, salt: int) -> int:
    # Every random draw of a step derives from (seed, step), the same on every process: a
    # resumed run replays exactly what an uninterrupted one would have drawn, and each episode
    # samples from generators seeded by it and the episode's index in the step, so the episodes
    # are the same on any number of processes.
    return int(np.random.default_rng([run.config.trainer.seed, step, salt]).integers(2**31 - 1))


def sample_step_tasks(run: TrainingRun, step: int) -> list[str]:
    """The step's training tasks (same on every process; without replacement within a step).

    With several environments each task's environment is drawn first, by the ``envs``
    weights, then the task among that environment's. The draws are a function of
    ``(trainer.seed, step)`` alone: a resumed run draws what an uninterrupted one would."""
    train_tasks = run.tasks["train"]
    rng = np.random.default_rng([run.config.trainer.seed, step, 7])
    count = run.config.rollout.tasks_per_step
    if not run.config.envs:
        picks = rng.choice(len(train_tasks), size=count, replace=count > len(train_tasks))
        return [train_tasks[int(i)] for i in picks]
    weights = build.env_weights(run.config)
    names = run.env_names
    draws = rng.choice(len(names), size=count, p=np.array([weights[n] for n in names]) / sum(weights.values()))
    tasks = []
    for index, name in enumerate(names):
        own = [t for t in train_tasks if run.env_of(t) == name]
        wanted = int((draws == index).sum())
        if wanted:
            picks = rng.choice(len(own), size=wanted, replace=wanted > len(own))
            tasks += [own[int(i)] for i in picks]
    order = rng.permutation(len(tasks))  # environments interleave through the step
    return [tasks[int(i)] for i in order]


def expert_length(run: TrainingRun, task: str) -> int:
    """Number of expert actions of ``task`` (TCOD-B2F's ``L``), cached."""
    if task not in run.state.expert_lens:
        env = build.make_run_env(run.config)
        try:
            env.reset(task)
            run.state.expert_lens[task] = len(env.expert_actions() or [])
        finally:
            env.close()
    return run.state.expert_lens[task]


def rollout(run: TrainingRun, step: int) -> StepBatch:
    """Plan the step's episodes with the curriculum and play this process's share."""
    tasks = sample_step_tasks(run, step)
    expert_lens = [expert_length(run, t) for t in tasks] if run.algorithm.needs_expert_lens else None
    plans = run.sampler.plan_batch(step, tasks, expert_lens)
    # Whole GRPO groups per process: task i goes to process i % world_size.
    plans = [p for p in plans if p.task_index % run.dist.world_size == run.dist.rank]
    student, teacher = generators(run)
    if not run.algorithm.needs_teacher_generator and not any("teacher" in p.players for p in plans):
        teacher = None
    trajectories = play_episodes(
        run,
        tasks,
        plans,
        student=student,
        teacher=teacher,
        temperature=run.config.rollout.temperature,
        seed=_step_seed(run, step, 1),
        description="rollout",
        gather_teacher=True,
    )
    return StepBatch(step=step, plans=plans, trajectories=trajectories)


# ======================================================================================
# 2. score
# ======================================================================================
@dataclass
class Scores:
    """Per-episode outcome and the step's summary metrics."""

    rewards: torch.Tensor  # (E,) 1.0 for a won episode, else 0.0 (the papers' success reward)
    group_ids: torch.Tensor  # (E,) task index within the step: one GRPO group per task
    metrics: dict[str, float]


def score(run: TrainingRun, batch: StepBatch) -> Scores:
    """Success reward per episode, plus the turn counts every run must log."""
    trajectories = batch.trajectories
    won = [float(t.won) for t in trajectories]
    totals = all_reduce_sum(
        torch.tensor(
            [
                len(trajectories),
                sum(won),
                sum(t.total_reward for t in trajectories),
                sum(t.num_turns for t in trajectories),
                sum(t.num_student_turns for t in trajectories),
                sum(t.num_teacher_turns for t in trajectories),
                sum(t.num_expert_turns for t in trajectories),
                sum(t.num_format_errors for t in trajectories),
            ],
            dtype=torch.float64,
        ),
        run.dist,
    ).tolist()
    episodes = max(totals[0], 1.0)
    metrics = {
        "episodes": totals[0],
        "success": totals[1] / episodes,
        "reward_mean": totals[2] / episodes,
        "turns/total_mean": totals[3] / episodes,
        "turns/student_mean": totals[4] / episodes,
        "turns/teacher_mean": totals[5] / episodes,
        "turns/expert_mean": totals[6] / episodes,
        "format_errors_per_episode": totals[7] / episodes,
    }
    metrics.update(success_by_env(run, trajectories))
    return Scores(
        rewards=torch.tensor(won, dtype=torch.float32),
        group_ids=torch.tensor([p.task_index for p in batch.plans], dtype=torch.int64),
        metrics=metrics,
    )


# ======================================================================================
# 3. advantages
# ======================================================================================
def algorithm_coefficients(run: TrainingRun, step: int) -> LossCoefficients:
    """The training signal of the run's algorithm at ``step`` (its record's ``coefficients``)."""
    return run.algorithm.coefficients(run.config.loss, run.sampler, step)


@dataclass
class Advantages:
    """Sequence-level GRPO advantages (one per episode) and the step's coefficients."""

    sequence: torch.Tensor  # (E,)
    coefficients: LossCoefficients


def compute_advantages(run: TrainingRun, batch: StepBatch, scores: Scores) -> Advantages:
    """GRPO's group-relative advantage per episode (0 for algorithms without a GRPO term).

    Token-level OPD advantages need the teacher's and student's log-probs, which the loss
    pass produces; they are combined in :func:`~tcod_fast.trainer.loss.compute_loss`.
    """
    coefficients = algorithm_coefficients(run, batch.step)
    if coefficients.grpo_coef != 0.0 and len(batch.trajectories):
        sequence = objectives.grpo_advantages(scores.rewards, scores.group_ids, eps=run.config.loss.grpo_eps)
    else:
        sequence = torch.zeros(len(batch.trajectories))
    return Advantages(sequence=sequence, coefficients=coefficients)


# ======================================================================================
# 4. loss -> 5. update
# ======================================================================================
def update(run: TrainingRun) -> dict[str, float]:
    """Sum gradients over processes, clip and step AdamW (the LR schedule moves once per
    training step, in :func:`train_on_batch`)."""
    parallel.synchronise_gradients(run.student, run.dist)
    max_norm = run.config.trainer.max_grad_norm
    params = [p for p in run.student.parameters() if p.grad is not None]
    if max_norm:
        grad_norm = parallel.to_float(torch.nn.utils.clip_grad_norm_(params, max_norm))
    else:
        grad_norm = parallel.to_float(torch.nn.utils.get_total_norm([p.grad for p in params])) if params else 0.0
    lr = run.optimizer.param_groups[0]["lr"]
    run.optimizer.step()
    run.optimizer.zero_grad(set_to_none=True)
    return {"grad_norm": grad_norm, "lr": lr}


def train_on_batch(run: TrainingRun, batch: StepBatch, advantages: Advantages) -> dict[str, float]:
    """loss -> update over the step's episodes: ``updates_per_step`` mini-batches, each
    accumulated over token-budget micro-batches, then one optimiser step."""
    config = run.config
    trajectories, plans = batch.trajectories, batch.plans
    trainable = [i for i, (t, p) in enumerate(zip(trajectories, plans)) if trained_token_count(t, p) > 0]
    updates = config.trainer.updates_per_step
    # Mini-batches are cut from the step's global episode order (the plans' episode_index),
    # so on any number of processes each update sees the same episodes.
    minis = [[i for i in trainable if plans[i].episode_index % updates == u] for u in range(updates)]
    coefficients = advantages.coefficients
    mode, budget = config.env.context_mode, config.trainer.micro_batch_tokens

    def parts(indices):
        return [
            ([trajectories[i] for i in group], [plans[i] for i in group], advantages.sequence[group], group)
            for group in micro_batches(
                trajectories, indices, mode, budget, padding_free=run.padding_free, groups=lambda t: run.teacher_for(t.task).name
            )
        ]

    # PPO with several updates: log-probs of the rollout policy, before any update.
    old_logprobs: dict[tuple[int, int], torch.Tensor] = {}
    if needs_ppo(run.estimator, coefficients) and updates > 1:
        for u, mini in enumerate(minis):
            micro = parts(mini)
            parallel.pad_micro_batches(run, len(micro), with_grad=False)
            for m, (trajs, micro_plans, seq_adv, _) in enumerate(micro):
                out = compute_loss(run, trajs, micro_plans, seq_adv, coefficients, 1.0, with_grad=False)
                old_logprobs[(u, m)] = out.old_logprobs

    episodes = len(trajectories)
    turn_kl_sum = torch.zeros(episodes, run.max_turns)
    turn_count = torch.zeros(episodes, run.max_turns)
    totals = {"loss": 0.0, "loss/kl_term": 0.0, "loss/ppo_term": 0.0}
    ppo_totals: dict[str, float] = {}
    update_metrics: dict[str, float] = {}
    trained_tokens = padding = 0
    for u, mini in enumerate(minis):
        local_tokens = sum(trained_token_count(trajectories[i], plans[i]) for i in mini)
        normaliser = float(all_reduce_sum(torch.tensor([float(local_tokens)]), run.dist)[0])
        trained_tokens += local_tokens
        if normaliser == 0:
            continue
        micro = parts(mini)
        padding += parallel.pad_micro_batches(run, len(micro), with_grad=True)  # FSDP2: equal counts
        for m, (trajs, micro_plans, seq_adv, group) in enumerate(micro):
            out = compute_loss(
                run, trajs, micro_plans, seq_adv, coefficients, normaliser, old_logprobs=old_logprobs.get((u, m))
            )
            if out.loss.requires_grad:
                out.loss.backward()
            index = torch.tensor(group)
            turn_kl_sum.index_add_(0, index, out.turn_kl_sum.cpu())
            turn_count.index_add_(0, index, out.turn_token_count.cpu())
            totals["loss"] += float(out.loss.detach())
            totals["loss/kl_term"] += out.kl_term
            totals["loss/ppo_term"] += out.ppo_term
            for key, value in out.ppo_stats.items():
                ppo_totals[key] = ppo_totals.get(key, 0.0) + value / normaliser
        update_metrics = update(run)
    # The schedule is a function of the training step, whatever the number of updates in it
    # (a step with nothing to train, hence no optimizer step, still advances it).
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r"Detected call of `lr_scheduler\.step\(\)` before")
        run.scheduler.step()

    # Sum the per-process losses: each is a share of the global token mean.
    reduced = all_reduce_sum(torch.tensor([totals["loss"], totals["loss/kl_term"], totals["loss/ppo_term"]], dtype=torch.float64), run.dist)
    metrics = {
        "loss": float(reduced[0]) / len(minis),
        "loss/kl_term": float(reduced[1]) / len(minis),
        "loss/ppo_term": float(reduced[2]) / len(minis),
        "trained_tokens": float(all_reduce_sum(torch.tensor([float(trained_tokens)]), run.dist)[0]),
        "opd_coef": coefficients.opd_coef,
        "grpo_coef": coefficients.grpo_coef,
        **update_metrics,
        **{k: v / len(minis) for k, v in ppo_totals.items()},
    }
    metrics.update(kl_metrics(turn_kl_sum, turn_count, run.dist))
    metrics.update(kl_metrics_by_env(run, trajectories, turn_kl_sum, turn_count))
    if parallel.is_sharded(run.student):
        metrics["padding_micro_batches"] = padding  # zero-weight passes this process ran
    return metrics

