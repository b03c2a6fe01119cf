"""Evaluation: full-depth student episodes on held-out tasks (success, turns, and the
teacher-student KL by turn index), and the KL metrics of a step's episodes."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.distributed as dist

from tcod_fast import objectives
from tcod_fast.algorithms import LossCoefficients
from tcod_fast.curriculum import EpisodePlan
from tcod_fast.trainer import parallel
from tcod_fast.trainer.config import TrainConfig
from tcod_fast.trainer.distributed import DistContext, all_reduce_sum
from tcod_fast.trainer.loss import compute_loss, micro_batches, trained_token_count
from tcod_fast.trainer.setup import TrainingRun, generators, play_episodes, setup_run

__all__ = ["evaluate", "evaluate_model", "kl_metrics", "measure_kl_by_turn"]


def evaluate_model(config: TrainConfig, *, tokenizer=None) -> TrainingRun:
    """Evaluate ``config.model.student_path`` as it is (no training step, nothing saved but
    the metrics): one evaluation record, also in ``run.state.last_eval``."""
    run = setup_run(config, tokenizer=tokenizer)
    with run.closing():
        if config.eval.num_tasks > 0:
            run.log(0, evaluate(run, 0), kind="eval")
    return run


def evaluate(run: TrainingRun, step: int, *, splits: Sequence[str] = ("seen", "unseen")) -> dict[str, Any]:
    """Full-depth student episodes on held-out tasks at ``eval.temperature``.

    Returns per split: success rate, average turns and, with a teacher, the teacher-student
    KL by turn index on those episodes (the escalation curve of the final policy). Under
    ``torchrun`` each process plays every ``world_size``-th task and the metrics are reduced
    over all of them.
    """
    results: dict[str, Any] = {"step": step}
    student, _ = generators(run, for_eval=True)
    settings = run.config.eval
    final = step >= run.config.trainer.steps
    count = settings.num_tasks if final or settings.interim_num_tasks is None else settings.interim_num_tasks
    for split in splits:
        tasks = eval_tasks(run, split, count)
        if not tasks:
            continue
        plans = run.sampler.plan_eval_batch(tasks)[run.dist.rank :: run.dist.world_size]
        trajectories = play_episodes(
            run,
            tasks,
            plans,
            student=student,
            temperature=run.config.eval.temperature,
            seed=run.config.eval.seed,
            description=f"eval {split}",
        )
        won, turns = all_reduce_sum(
            torch.tensor([sum(t.won for t in trajectories), sum(t.num_turns for t in trajectories)], dtype=torch.float64),
            run.dist,
        ).tolist()
        results[f"success_{split}"] = won / len(tasks)
        results[f"turns_{split}"] = turns / len(tasks)
        results[f"tasks_{split}"] = len(tasks)
        results.update(success_by_env(run, trajectories, split=split))
        if (
            run.has_teacher
            and settings.kl_by_turn
            and split in settings.kl_by_turn_splits
            and (final or not settings.kl_by_turn_final_only)
        ):
            for key, value in measure_kl_by_turn(run, trajectories, plans).items():
                results[f"{key}_{split}" if not key.startswith("kl/") else f"kl_{split}/{key[3:]}"] = value
    run.state.last_eval = results
    return results


def eval_tasks(run: TrainingRun, split: str, count: int) -> list:
    """The first ``count`` tasks of ``split``: of the run's environment, or of each of its
    environments (so each is evaluated on as many)."""
    if not run.config.envs:
        return run.tasks[split][:count]
    by_env: dict[str, list] = {name: [] for name in run.env_names}
    for task in run.tasks[split]:
        chosen = by_env[run.env_of(task)]
        if len(chosen) < count:
            chosen.append(task)
    return [task for tasks in by_env.values() for task in tasks]


@torch.no_grad()
def measure_kl_by_turn(run: TrainingRun, trajectories: Sequence[Any], plans: Sequence[EpisodePlan]) -> dict:
    """Teacher-student reverse KL(student || teacher) per turn index on already played
    episodes (no update), whatever divergence the training loss uses; over every process's
    episodes under ``torchrun`` (each process passes its own)."""
    indices = [i for i, (t, p) in enumerate(zip(trajectories, plans)) if trained_token_count(t, p) > 0]
    turn_kl_sum = torch.zeros(len(trajectories), run.max_turns)
    turn_count = torch.zeros(len(trajectories), run.max_turns)
    no_signal = LossCoefficients(run.config.loss.kl_coef, 0.0, None)
    groups = micro_batches(
        trajectories, indices, run.config.env.context_mode, run.config.trainer.micro_batch_tokens,
        padding_free=run.padding_free, groups=lambda t: run.teacher_for(t.task).name,
    )
    parallel.pad_micro_batches(run, len(groups), with_grad=False)  # FSDP2: equal counts
    for group in groups:
        out = compute_loss(
            run,
            [trajectories[i] for i in group],
            [plans[i] for i in group],
            torch.zeros(len(group)),
            no_signal,
            1.0,
            with_grad=False,
            divergence="reverse_kl",
        )
        index = torch.tensor(group)
        turn_kl_sum.index_add_(0, index, out.turn_kl_sum.cpu())
        turn_count.index_add_(0, index, out.turn_token_count.cpu())
    metrics = kl_metrics(turn_kl_sum, turn_count, run.dist)
    metrics.update(kl_metrics_by_env(run, trajectories, turn_kl_sum, turn_count))
    return metrics


def kl_metrics_by_env(run: TrainingRun, trajectories: Sequence[Any], turn_kl_sum: torch.Tensor, turn_count: torch.Tensor) -> dict:
    """:func:`kl_metrics` of each environment's episodes, keyed ``env/<name>/kl/...`` (a run
    with several environments; ``{}`` otherwise). Every process takes part for every
    environment, in the run's order (the statistics are gathered over processes)."""
    if not run.config.envs:
        return {}
    metrics = {}
    for name in run.env_names:
        rows = torch.tensor([i for i, t in enumerate(trajectories) if run.env_of(t.task) == name], dtype=torch.int64)
        episodes = float(all_reduce_sum(torch.tensor([float(len(rows))], dtype=torch.float64), run.dist)[0])
        if episodes == 0:
            continue
        for key, value in kl_metrics(turn_kl_sum[rows], turn_count[rows], run.dist).items():
            metrics[f"env/{name}/{key}"] = value
    return metrics


def success_by_env(run: TrainingRun, trajectories: Sequence[Any], *, split: str | None = None) -> dict:
    """Per environment of a run with several, over every process's episodes (``{}`` for a run
    with one): ``env/<name>/success``, ``.../turns_mean`` and ``.../episodes`` of training
    episodes, or ``env/<name>/success_<split>`` and ``.../turns_<split>`` of an evaluation split."""
    if not run.config.envs:
        return {}
    counts = []
    for name in run.env_names:
        own = [t for t in trajectories if run.env_of(t.task) == name]
        counts += [len(own), sum(float(t.won) for t in own), sum(t.num_turns for t in own)]
    totals = all_reduce_sum(torch.tensor(counts, dtype=torch.float64), run.dist).tolist()
    metrics = {}
    for index, name in enumerate(run.env_names):
        episodes, won, turns = totals[3 * index : 3 * index + 3]
        if not episodes:
            continue
        if split is None:
            metrics.update({f"env/{name}/episodes": episodes, f"env/{name}/success": won / episodes, f"env/{name}/turns_mean": turns / episodes})
        else:
            metrics.update({f"env/{name}/success_{split}": won / episodes, f"env/{name}/turns_{split}": turns / episodes})
    return metrics


def kl_metrics(turn_kl_sum: torch.Tensor, turn_count: torch.Tensor, context: DistContext | None = None) -> dict:
    """KL mean/std over episodes, per turn index (the escalation curve) and its slope.

    In a distributed run the per-episode sums are gathered first so every statistic is over
    all episodes of the step.
    """
    if context is not None and context.enabled:
        sizes = [torch.zeros(1, dtype=torch.int64) for _ in range(context.world_size)]
        dist.all_gather(sizes, torch.tensor([turn_kl_sum.shape[0]]))
        width = int(max(s.item() for s in sizes))
        pad = width - turn_kl_sum.shape[0]
        padded_kl = torch.cat([turn_kl_sum, torch.zeros(pad, turn_kl_sum.shape[1])])
        padded_count = torch.cat([turn_count, torch.zeros(pad, turn_count.shape[1])])
        gathered_kl = [torch.zeros_like(padded_kl) for _ in range(context.world_size)]
        gathered_count = [torch.zeros_like(padded_count) for _ in range(context.world_size)]
        dist.all_gather(gathered_kl, padded_kl)
        dist.all_gather(gathered_count, padded_count)
        turn_kl_sum, turn_count = torch.cat(gathered_kl), torch.cat(gathered_count)
    diagnostics = objectives.turn_diagnostics(turn_kl_sum, turn_count)
    present = diagnostics.turn_count > 0
    last = int(present.nonzero().max()) + 1 if bool(present.any()) else 0
    return {
        "kl/trajectory_mean": diagnostics.trajectory_kl_mean,
        "kl/trajectory_std": diagnostics.trajectory_kl_std,
        "kl/escalation_slope": diagnostics.kl_escalation_slope,
        "kl_by_turn": [float(v) for v in diagnostics.kl_per_turn[:last]],
        "kl_by_turn_count": [int(v) for v in diagnostics.turn_count[:last]],
    }

