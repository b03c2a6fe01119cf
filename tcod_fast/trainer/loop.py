"""The training loop: rollout -> score -> advantages -> loss -> update -> evaluate -> log -> checkpoint.

Read :func:`train` first; every stage is a function of that name below it, in that order.

Each algorithm is one record in :mod:`tcod_fast.algorithms` (docs/algorithms.md), reached
as ``run.algorithm``; this module asks the record and never branches on a name:

* *who plays which turn* (TCOD-F2B depth, TCOD-B2F prefix, Guided-OPD teacher coin): the
  record's ``plan_episode``, called by the curriculum sampler; :func:`rollout` plays the
  plans, and each plan's turn window masks the loss in :func:`compute_loss`;
* *what signal trains a turn*: the record's ``coefficients`` at the step
  (:func:`algorithm_coefficients`; the table is in :mod:`tcod_fast.algorithms`);
* *what it needs*: a teacher model (:func:`setup_run`), a teacher generator and expert
  action counts (:func:`rollout`).

*How the OPD term is estimated* (``loss.estimator``) is the loss's: ``full_vocab`` -- the
exact reverse KL over the vocabulary through ``fused_linear_turn_kl`` / ``fused_turn_kl``,
weighted by the turn weights; ``sampled`` -- TCOD's reference: the advantage
``kl_coef (log q - log p_old)`` (k1, or ``-kl_coef k3``) in a PPO clipped surrogate, summed
with the GRPO advantage. :func:`compute_loss` runs the named steps of
:mod:`tcod_fast.trainer.loss`.
"""

from __future__ import annotations

import math
import os
import shutil
import time
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from tcod_fast import objectives
from tcod_fast.algorithms import Algorithm, LossCoefficients, get_algorithm
from tcod_fast.curriculum import CurriculumSampler, EpisodePlan
from tcod_fast.errors import TcodFastWarning, UserError
from tcod_fast.trainer import build
from tcod_fast.trainer.checkpoint import (
    capture_rng_state,
    load_checkpoint,
    load_latest_checkpoint,
    restore_rng_state,
    save_checkpoint,
)
from tcod_fast.trainer.config import TrainConfig, config_to_dict, save_config
from tcod_fast.trainer.distributed import (
    DistContext,
    all_reduce_gradients,
    all_reduce_sum,
    broadcast_parameters,
    init_distributed,
)
from tcod_fast.trainer.logging import MetricsLogger, read_metrics
from tcod_fast.trainer.loss import (
    episode_turn_statistics,
    forward_models,
    opd_term,
    pack_micro_batch,
    ppo_term,
    trained_token_count,
    turn_kl_statistics,
    turn_weights,
)
from tcod_fast.trainer.run_folder import check_resume_compatible

__all__ = [
    "LossCoefficients",
    "StepBatch",
    "TrainingRun",
    "algorithm_coefficients",
    "compute_advantages",
    "compute_loss",
    "evaluate",
    "evaluate_model",
    "preflight",
    "rollout",
    "score",
    "setup_run",
    "train",
    "train_on_batch",
    "update",
]

# ======================================================================================
# the run's state
# ======================================================================================
@dataclass
class TrainingRun:
    """Everything a run holds between steps."""

    config: TrainConfig
    device: torch.device
    dist: DistContext
    tokenizer: Any
    prompter: Any
    student: torch.nn.Module
    teacher: torch.nn.Module | None
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    sampler: CurriculumSampler
    envs: Any
    tasks: dict[str, list[str]]
    logger: MetricsLogger
    output_dir: Path
    use_bf16: bool
    next_step: int = 0
    expert_lens: dict[str, int] = field(default_factory=dict)
    history: list[dict] = field(default_factory=list)
    last_eval: dict | None = None

    @property
    def max_turns(self) -> int:
        return self.config.curriculum.max_turns

    @property
    def algorithm(self) -> Algorithm:
        """The record of the run's algorithm (``config.curriculum.algorithm``)."""
        return self.sampler.algorithm


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
            refused (:func:`preflight`), or ``resume`` finds no checkpoint, or one made with
            another curriculum or student, or one past ``trainer.steps``.
    """
    preflight(config)
    resume_state = _checkpoint_to_resume(config)[1] if resume else None
    finished = resume_state is not None and int(resume_state["step"]) >= config.trainer.steps
    if not finished:
        _warn_if_random_teacher(config)
    run = _setup_run_folder(config, tokenizer=tokenizer, write_run_files=not finished)
    if resume_state is not None:
        _restore(run, resume_state)
        resume_state = None  # the checkpoint's tensors are in the run now: free the copy
    elif config.eval.at_start and config.eval.num_tasks > 0:
        log(run, 0, evaluate(run, 0), kind="eval")
    if finished:
        # Its final evaluation and checkpoint exist already: do not repeat them.
        warnings.warn(
            f"the run in {run.output_dir} finished at step {run.next_step} (trainer.steps={config.trainer.steps}): "
            "nothing to do; raise trainer.steps to train further",
            TcodFastWarning,
            stacklevel=2,
        )
        if not (run.output_dir / "final" / "config.json").is_file():
            export_student(run, run.output_dir / "final")  # killed between checkpoint and export
        run.logger.close()
        return run

    last = config.trainer.steps if stop_after_step is None else min(stop_after_step, config.trainer.steps)
    from tqdm.auto import tqdm

    steps = tqdm(
        range(run.next_step, last),
        desc=f"train {config.logging.run_name or config.algorithm}",
        disable=not (config.logging.progress and run.dist.is_main),
        initial=run.next_step,
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
        metrics["time/train_s"] = trained - rolled
        metrics["tokens_per_s"] = train_metrics["trained_tokens"] / max(trained - rolled, 1e-9)
        log(run, step, metrics)
        steps.set_postfix(loss=f"{metrics['loss']:.4f}", kl=f"{metrics.get('kl/trajectory_mean', 0.0):.3f}", refresh=False)
        run.next_step = step + 1
        cadence = config.trainer.eval_every
        if cadence and run.next_step % cadence == 0 and run.next_step < config.trainer.steps:
            log(run, run.next_step, evaluate(run, run.next_step), kind="eval")
        cadence = config.trainer.checkpoint_every
        # The last step's checkpoint is written after the final evaluation, below: a
        # checkpoint at trainer.steps always means "evaluated and finished".
        if cadence and run.next_step % cadence == 0 and run.next_step < config.trainer.steps:
            checkpoint(run)
    steps.close()

    if run.next_step >= config.trainer.steps:
        if config.eval.num_tasks > 0:
            log(run, run.next_step, evaluate(run, run.next_step), kind="eval")
        checkpoint(run)
        export_student(run, run.output_dir / "final")
    elif run.next_step % max(config.trainer.checkpoint_every, 1) != 0 or not config.trainer.checkpoint_every:
        checkpoint(run)  # stopped early: keep where it got to
    run.logger.close()
    return run


def preflight(config: TrainConfig) -> None:
    """Every check of a run that needs no model: the config's values
    (:meth:`TrainConfig.validate`), its model and tokenizer folders
    (:meth:`TrainConfig.check_paths`) and the devices it asks for. Raises
    :class:`~tcod_fast.errors.UserError`; writes nothing."""
    config.validate()
    config.check_paths()
    device = _pick_device(config.trainer.device)
    if config.trainer.bf16 == "always" and device.type != "cuda":
        raise UserError(
            f"trainer.bf16='always' needs a CUDA device (bf16 autocast is GPU-only here), got device {device.type!r}"
        )


def _checkpoint_to_resume(config: TrainConfig) -> tuple[Path, dict]:
    """The newest readable checkpoint of the run folder, checked against ``config``."""
    folder = Path(config.trainer.output_dir) / "checkpoints"
    found = load_latest_checkpoint(folder)
    if found is None:
        state = "does not exist" if not folder.parent.exists() else "has no checkpoint yet"
        raise UserError(f"resuming needs a run folder with a checkpoint, got {str(folder.parent)!r}, which {state}")
    path, state = found
    step = int(state["step"])
    if step > config.trainer.steps:
        raise UserError(
            f"resuming needs trainer.steps >= {step} (the checkpoint {path.name} is at step {step}), "
            f"got {config.trainer.steps}"
        )
    check_resume_compatible(state.get("config") or {}, config, f"checkpoint {path.name}")
    return path, state


def _warn_if_random_teacher(config: TrainConfig) -> None:
    if config.model.teacher_path is None and config.trainer.steps > 0 and _needs_teacher(config):
        warnings.warn(
            "model.teacher_path is not set, so the teacher is a random-init tiny model (model.teacher_tiny): "
            "its KL is noise, not a signal to learn from; set model.teacher_path to a trained teacher's folder",
            TcodFastWarning,
            stacklevel=3,
        )


def _setup_run_folder(config: TrainConfig, **kwargs) -> TrainingRun:
    """:func:`setup_run`, removing the run folder again if setting up fails before it held
    anything of a run (so a refused run leaves nothing behind)."""
    output_dir = Path(config.trainer.output_dir).absolute()
    created = next((folder for folder in [*reversed(output_dir.parents), output_dir] if not folder.exists()), None)
    try:
        return setup_run(config, **kwargs)
    except BaseException:
        if created is not None and os.environ.get("RANK", "0") == "0":
            shutil.rmtree(created, ignore_errors=True)
        raise


def evaluate_model(config: TrainConfig, *, tokenizer=None) -> TrainingRun:
    """Evaluate ``config.model.student_path`` as it is (no training step, nothing saved but
    the metrics): one evaluation record, also in ``run.last_eval``."""
    run = setup_run(config, tokenizer=tokenizer)
    if config.eval.num_tasks > 0:
        log(run, 0, evaluate(run, 0), kind="eval")
    run.logger.close()
    return run


# ======================================================================================
# setup
# ======================================================================================
def _pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise UserError(
            "trainer.device='cuda' needs a CUDA GPU, got none (torch.cuda.is_available() is False); "
            "use trainer.device=auto or cpu"
        )
    return torch.device(name)


def _lr_lambda(config: TrainConfig):
    warmup = config.trainer.warmup_steps
    total = max(config.trainer.steps, 1)
    shape = config.trainer.lr_schedule

    def factor(step: int) -> float:
        if warmup and step < warmup:
            return (step + 1) / warmup
        progress = min(max(step - warmup, 0) / max(total - warmup, 1), 1.0)
        if shape == "linear":
            return 1.0 - progress
        if shape == "cosine":
            return 0.5 * (1.0 + math.cos(math.pi * progress))
        return 1.0

    return factor


def _needs_teacher(config: TrainConfig) -> bool:
    # An algorithm without a teacher term (GRPO) still loads a configured teacher for the KL logs.
    trains_with_teacher = get_algorithm(config.algorithm).needs_teacher_model and config.trainer.steps > 0
    return trains_with_teacher or config.model.teacher_path is not None or config.eval.kl_by_turn


def setup_run(config: TrainConfig, *, tokenizer=None, write_run_files: bool = True) -> TrainingRun:
    """Build models, tokenizer, optimiser, scheduler, sampler, environments and logger.

    Checks everything :func:`preflight` checks first, so a refused config builds and writes
    nothing. ``write_run_files=False`` leaves the run folder's ``config.yaml`` and
    ``tokenizer/`` as they are (a finished run that is resumed changes nothing)."""
    preflight(config)
    trainer = config.trainer
    if trainer.num_threads:
        torch.set_num_threads(trainer.num_threads)
    device = _pick_device(trainer.device)
    context = init_distributed(device.type)
    if context.enabled and device.type == "cuda":
        device = torch.device("cuda", context.local_rank)
    output_dir = Path(trainer.output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    prompter = build.build_prompter(config.env)

    if tokenizer is None:
        tokenizer_dir = output_dir / "tokenizer"
        if config.model.tokenizer_path is not None:
            tokenizer = build.load_tokenizer(config.model.tokenizer_path)
        elif config.model.student_path is not None:
            tokenizer = build.load_tokenizer(config.model.student_path)
        elif tokenizer_dir.is_dir():
            tokenizer = build.load_tokenizer(tokenizer_dir)
        else:
            tokenizer = build.build_tokenizer(config, prompter)
    if context.is_main and write_run_files:
        tokenizer.save_pretrained(str(output_dir / "tokenizer"))
        save_config(config, output_dir / "config.yaml")

    student = build.build_model(config.model.student_path, config.model.student_tiny, tokenizer).to(device)
    student.train()
    if config.model.activation_checkpointing:
        student.gradient_checkpointing_enable()
    broadcast_parameters(student, context)
    teacher = None
    if _needs_teacher(config):
        teacher = build.build_model(
            config.model.teacher_path,
            config.model.teacher_tiny,
            tokenizer,
            dtype=build.torch_dtype(config.model.teacher_dtype),
        ).to(device)
        teacher.eval().requires_grad_(False)

    optimizer = torch.optim.AdamW(
        [p for p in student.parameters() if p.requires_grad],
        lr=trainer.lr,
        betas=tuple(trainer.betas),
        eps=trainer.eps,
        weight_decay=trainer.weight_decay,
    )
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, _lr_lambda(config))
    sampler = CurriculumSampler(config.curriculum)
    tasks = build.env_task_splits(config.env)
    per_rank = math.ceil(config.rollout.tasks_per_step / context.world_size) * config.curriculum.episodes_per_task
    envs = build.build_envs(config.env, max(per_rank, min(config.eval.num_tasks, 32), 1))
    use_bf16 = config.trainer.bf16 == "always" or (config.trainer.bf16 == "auto" and device.type == "cuda")
    if use_bf16 and device.type != "cuda":
        raise ValueError("trainer.bf16='always' needs a CUDA device (bf16 autocast is GPU-only here)")
    logger = MetricsLogger(
        output_dir,
        jsonl=config.logging.jsonl,
        tensorboard=config.logging.tensorboard,
        enabled=context.is_main,
    )
    return TrainingRun(
        config=config,
        device=device,
        dist=context,
        tokenizer=tokenizer,
        prompter=prompter,
        student=student,
        teacher=teacher,
        optimizer=optimizer,
        scheduler=scheduler,
        sampler=sampler,
        envs=envs,
        tasks=tasks,
        logger=logger,
        output_dir=output_dir,
        use_bf16=use_bf16,
    )


def _generators(run: TrainingRun, *, for_eval: bool = False):
    from tcod_fast.rollout import HFGenerator

    student = HFGenerator(run.student, run.tokenizer)
    teacher = None
    if not for_eval and run.teacher is not None:
        teacher = HFGenerator(run.teacher, run.tokenizer)
    return student, teacher


def _rollout_config(run: TrainingRun, *, temperature: float, seed: int, description: str):
    from tcod_fast.rollout import RolloutConfig, SamplingParams

    settings = run.config.rollout
    return RolloutConfig(
        context_mode=run.config.env.context_mode,
        student_sampling=SamplingParams(
            temperature=temperature,
            top_p=settings.top_p,
            max_new_tokens=settings.max_new_tokens,
            stop_strings=("</action>",),
        ),
        teacher_sampling=SamplingParams(
            temperature=settings.teacher_temperature,
            max_new_tokens=settings.max_new_tokens,
            stop_strings=("</action>",),
        ),
        seed=seed,
        show_progress=run.config.logging.progress and run.dist.is_main,
        progress_description=description,
    )


# ======================================================================================
# 1. rollout
# ======================================================================================
def _step_seed(run: TrainingRun, step: int, salt: int) -> int:
    # Every random draw of a step derives from (seed, step, rank): a resumed run replays
    # exactly what an uninterrupted one would have drawn.
    return int(np.random.default_rng([run.config.trainer.seed, step, run.dist.rank, salt]).integers(2**31 - 1))


def sample_step_tasks(run: TrainingRun, step: int) -> list[str]:
    """The step's training tasks (same on every process; without replacement within a step)."""
    train_tasks = run.tasks["train"]
    rng = np.random.default_rng([run.config.trainer.seed, step, 7])
    count = run.config.rollout.tasks_per_step
    replace = count > len(train_tasks)
    picks = rng.choice(len(train_tasks), size=count, replace=replace)
    return [train_tasks[int(i)] for i in picks]


def expert_length(run: TrainingRun, task: str) -> int:
    """Number of expert actions of ``task`` (TCOD-B2F's ``L``), cached."""
    if task not in run.expert_lens:
        env = build.make_one_env(run.config.env)
        try:
            env.reset(task)
            run.expert_lens[task] = len(env.expert_actions() or [])
        finally:
            env.close()
    return run.expert_lens[task]


def rollout(run: TrainingRun, step: int) -> StepBatch:
    """Plan the step's episodes with the curriculum and play this process's share."""
    from tcod_fast.rollout import run_episodes

    tasks = sample_step_tasks(run, step)
    expert_lens = [expert_length(run, t) for t in tasks] if run.algorithm.needs_expert_lens else None
    plans = run.sampler.plan_batch(step, tasks, expert_lens)
    # Whole GRPO groups per process: task i goes to process i % world_size.
    plans = [p for p in plans if p.task_index % run.dist.world_size == run.dist.rank]
    student, teacher = _generators(run)
    if not run.algorithm.needs_teacher_generator and not any("teacher" in p.players for p in plans):
        teacher = None
    trajectories = run_episodes(
        [tasks[p.task_index] for p in plans],
        plans,
        run.envs,
        tokenizer=run.tokenizer,
        prompter=run.prompter,
        student=student,
        teacher=teacher,
        config=_rollout_config(
            run, temperature=run.config.rollout.temperature, seed=_step_seed(run, step, 1), description="rollout"
        ),
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
    return Scores(
        rewards=torch.tensor(won, dtype=torch.float32),
        group_ids=torch.tensor([p.task_index for p in batch.plans], dtype=torch.int64),
        metrics=metrics,
    )


# ======================================================================================
# 3. advantages
# ======================================================================================
def algorithm_coefficients(config: TrainConfig, sampler: CurriculumSampler, step: int) -> LossCoefficients:
    """The training signal of ``config``'s algorithm at ``step`` (its record's ``coefficients``)."""
    return get_algorithm(config.algorithm).coefficients(config, sampler, step)


@dataclass
class Advantages:
    """Sequence-level GRPO advantages (one per episode) and the step's coefficients."""

    sequence: torch.Tensor  # (E,)
    coefficients: LossCoefficients


def compute_advantages(run: TrainingRun, batch: StepBatch, scores: Scores) -> Advantages:
    """GRPO's group-relative advantage per episode (0 for algorithms without a GRPO term).

    Token-level OPD advantages need the teacher's and student's log-probs, which the loss
    pass produces; they are combined in :func:`compute_loss`.
    """
    coefficients = algorithm_coefficients(run.config, run.sampler, batch.step)
    if coefficients.grpo_coef != 0.0 and len(batch.trajectories):
        sequence = objectives.grpo_advantages(scores.rewards, scores.group_ids, eps=run.config.loss.grpo_eps)
    else:
        sequence = torch.zeros(len(batch.trajectories))
    return Advantages(sequence=sequence, coefficients=coefficients)


# ======================================================================================
# 4. loss
# ======================================================================================
def _rows_cost(trajectory, mode: str) -> tuple[int, int]:
    """(rows, longest row) this trajectory adds to a padded micro-batch."""
    if mode == "append":
        return 1, len(trajectory.token_ids)
    lengths = [len(t.window_prompt_token_ids) + len(t.response_token_ids) for t in trajectory.turns if t.is_student]
    return len(lengths), max(lengths, default=0)


def micro_batches(trajectories: Sequence[Any], indices: Sequence[int], mode: str, budget: int) -> list[list[int]]:
    """Split episode ``indices`` into groups whose padded size (rows x longest row) fits
    ``budget`` tokens; whole episodes only (T-DUR/SOD weights are per episode)."""
    groups: list[list[int]] = []
    current: list[int] = []
    rows = longest = 0
    for index in indices:
        extra_rows, length = _rows_cost(trajectories[index], mode)
        new_rows, new_longest = rows + extra_rows, max(longest, length)
        if current and new_rows * new_longest > budget:
            groups.append(current)
            current, new_rows, new_longest = [], extra_rows, length
        current.append(index)
        rows, longest = new_rows, new_longest
    if current:
        groups.append(current)
    return groups


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


def _can_use_fused_linear(run: TrainingRun, coefficients: LossCoefficients) -> bool:
    setting = run.config.loss.fused_linear
    if setting == "never" or run.config.loss.estimator != "full_vocab":
        return False
    simple = coefficients.grpo_coef == 0.0 and coefficients.turn_weighting is None
    available = _fused_linear_op() is not None and all(
        isinstance(m.get_output_embeddings(), torch.nn.Linear) and m.get_output_embeddings().bias is None
        for m in (run.student, run.teacher)
    )
    if setting == "always":
        if not available:
            raise RuntimeError("loss.fused_linear='always' but fused_linear_turn_kl or a plain Linear LM head is missing")
        return simple
    return simple and available


def _fused_linear_op():
    try:
        from tcod_fast.ops.fused_linear_turn_kl import fused_linear_turn_kl
    except ImportError:
        return None
    return fused_linear_turn_kl


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
    """Loss of one micro-batch of whole episodes: the steps of :mod:`tcod_fast.trainer.loss`.

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
    """
    settings = run.config.loss
    sampled = settings.estimator == "sampled"
    needs_ppo = sampled or coefficients.grpo_coef != 0.0
    use_fused_linear = not needs_ppo and _can_use_fused_linear(run, coefficients)

    packed = pack_micro_batch(
        trajectories,
        plans,
        context_mode=run.config.env.context_mode,
        pad_token_id=run.tokenizer.pad_token_id,
        num_turns=run.max_turns,
        device=run.device,
    )
    with torch.enable_grad() if with_grad else torch.no_grad():
        outputs = forward_models(
            run.student, run.teacher, packed, hidden=use_fused_linear, bf16=run.use_bf16, device_type=run.device.type
        )
        stats = turn_kl_statistics(
            outputs,
            packed,
            divergence=divergence or settings.divergence,
            jsd_beta=settings.jsd_beta,
            vocab_size=min(run.student.config.vocab_size, run.teacher.config.vocab_size) if run.teacher is not None else None,
            backend=settings.backend,
            student_grad=with_grad and not sampled and coefficients.opd_coef != 0.0,
            lm_heads=(
                (run.student.get_output_embeddings().weight, run.teacher.get_output_embeddings().weight)
                if use_fused_linear
                else None
            ),
        )
        turn_stats = episode_turn_statistics(stats, packed)
        episode_weights = turn_weights(turn_stats, coefficients.turn_weighting, sod_delta=settings.sod_delta)
        row_turn_weights = episode_weights[packed.row_episode] if episode_weights is not None else None

        loss = torch.zeros((), device=run.device)
        kl_term = 0.0
        if not sampled and coefficients.opd_coef != 0.0 and stats is not None:
            opd_loss = opd_term(stats, packed, coefficients.opd_coef, normaliser, row_turn_weights=row_turn_weights)
            loss = loss + opd_loss
            kl_term = float(opd_loss.detach())

        ppo = None
        if needs_ppo:
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


# ======================================================================================
# 5. update
# ======================================================================================
def update(run: TrainingRun) -> dict[str, float]:
    """Sum gradients over processes, clip and step AdamW (the LR schedule moves once per
    training step, in :func:`train_on_batch`)."""
    all_reduce_gradients(run.student, run.dist)
    max_norm = run.config.trainer.max_grad_norm
    params = [p for p in run.student.parameters() if p.grad is not None]
    if max_norm:
        grad_norm = float(torch.nn.utils.clip_grad_norm_(params, max_norm))
    else:
        grad_norm = float(torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in params]))) if params else 0.0
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
    minis = [trainable[u::updates] for u in range(updates)] if updates > 1 else [trainable]
    coefficients = advantages.coefficients
    needs_ppo = config.loss.estimator == "sampled" or coefficients.grpo_coef != 0.0
    mode, budget = config.env.context_mode, config.trainer.micro_batch_tokens

    def parts(indices):
        return [
            ([trajectories[i] for i in group], [plans[i] for i in group], advantages.sequence[group], group)
            for group in micro_batches(trajectories, indices, mode, budget)
        ]

    # PPO with several updates: log-probs of the rollout policy, before any update.
    old_logprobs: dict[tuple[int, int], torch.Tensor] = {}
    if needs_ppo and updates > 1:
        for u, mini in enumerate(minis):
            for m, (trajs, micro_plans, seq_adv, _) in enumerate(parts(mini)):
                out = compute_loss(run, trajs, micro_plans, seq_adv, coefficients, 1.0, with_grad=False)
                old_logprobs[(u, m)] = out.old_logprobs

    episodes = len(trajectories)
    turn_kl_sum = torch.zeros(episodes, run.max_turns)
    turn_count = torch.zeros(episodes, run.max_turns)
    totals = {"loss": 0.0, "loss/kl_term": 0.0, "loss/ppo_term": 0.0}
    ppo_totals: dict[str, float] = {}
    update_metrics: dict[str, float] = {}
    trained_tokens = 0
    for u, mini in enumerate(minis):
        local_tokens = sum(trained_token_count(trajectories[i], plans[i]) for i in mini)
        normaliser = float(all_reduce_sum(torch.tensor([float(local_tokens)]), run.dist)[0])
        trained_tokens += local_tokens
        if normaliser == 0:
            continue
        for m, (trajs, micro_plans, seq_adv, group) in enumerate(parts(mini)):
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
    return metrics


def kl_metrics(turn_kl_sum: torch.Tensor, turn_count: torch.Tensor, context: DistContext | None = None) -> dict:
    """KL mean/std over episodes, per turn index (the escalation curve) and its slope.

    In a distributed run the per-episode sums are gathered first so every statistic is over
    all episodes of the step.
    """
    if context is not None and context.enabled:
        import torch.distributed as dist

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


# ======================================================================================
# 6. evaluate
# ======================================================================================
def evaluate(run: TrainingRun, step: int, *, splits: Sequence[str] = ("seen", "unseen")) -> dict[str, Any]:
    """Full-depth student episodes on held-out tasks at ``eval.temperature``.

    Returns per split: success rate, average turns and, with a teacher, the teacher-student
    KL by turn index on those episodes (the escalation curve of the final policy). Runs on
    the main process only (others wait).
    """
    from tcod_fast.rollout import run_episodes

    results: dict[str, Any] = {"step": step}
    if run.dist.is_main:
        student, _ = _generators(run, for_eval=True)
        for split in splits:
            tasks = run.tasks[split][: run.config.eval.num_tasks]
            if not tasks:
                continue
            plans = run.sampler.plan_eval_batch(tasks)
            trajectories = run_episodes(
                tasks,
                plans,
                run.envs,
                tokenizer=run.tokenizer,
                prompter=run.prompter,
                student=student,
                config=_rollout_config(
                    run, temperature=run.config.eval.temperature, seed=run.config.eval.seed, description=f"eval {split}"
                ),
            )
            results[f"success_{split}"] = float(np.mean([t.won for t in trajectories]))
            results[f"turns_{split}"] = float(np.mean([t.num_turns for t in trajectories]))
            settings = run.config.eval
            final = step >= run.config.trainer.steps
            if (
                run.teacher is not None
                and settings.kl_by_turn
                and split in settings.kl_by_turn_splits
                and (final or not settings.kl_by_turn_final_only)
            ):
                for key, value in measure_kl_by_turn(run, trajectories, plans).items():
                    results[f"{key}_{split}" if not key.startswith("kl/") else f"kl_{split}/{key[3:]}"] = value
    run.dist.barrier()
    run.last_eval = results
    return results


@torch.no_grad()
def measure_kl_by_turn(run: TrainingRun, trajectories: Sequence[Any], plans: Sequence[EpisodePlan]) -> dict:
    """Teacher-student reverse KL(student || teacher) per turn index on already played
    episodes (no update), whatever divergence the training loss uses."""
    indices = [i for i, (t, p) in enumerate(zip(trajectories, plans)) if trained_token_count(t, p) > 0]
    turn_kl_sum = torch.zeros(len(trajectories), run.max_turns)
    turn_count = torch.zeros(len(trajectories), run.max_turns)
    no_signal = LossCoefficients(run.config.loss.kl_coef, 0.0, None)
    for group in micro_batches(trajectories, indices, run.config.env.context_mode, run.config.trainer.micro_batch_tokens):
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
    return kl_metrics(turn_kl_sum, turn_count)


# ======================================================================================
# 7. log
# ======================================================================================
def log(run: TrainingRun, step: int, metrics: dict, *, kind: str = "train") -> None:
    record = {"step": step, "kind": kind, "algorithm": run.config.algorithm}
    if run.config.logging.run_name:
        record["run"] = run.config.logging.run_name
    record.update(run.config.logging.tags)
    record.update(metrics)
    run.history.append(record)
    run.logger.log(record)


# ======================================================================================
# 8. checkpoint
# ======================================================================================
def checkpoint(run: TrainingRun) -> Path | None:
    """Save everything needed to continue at ``run.next_step`` (main process; atomic)."""
    path = None
    if run.dist.is_main:
        state = {
            "step": run.next_step,
            "student": run.student.state_dict(),
            "optimizer": run.optimizer.state_dict(),
            "scheduler": run.scheduler.state_dict(),
            "sampler": run.sampler.state_dict(),
            "rng": capture_rng_state(),
            "config": config_to_dict(run.config),
            "expert_lens": dict(run.expert_lens),
        }
        path = save_checkpoint(
            run.output_dir / "checkpoints", run.next_step, state, keep=run.config.trainer.keep_checkpoints
        )
    run.dist.barrier()
    return path


def resume_from_checkpoint(run: TrainingRun, path: str | Path | None = None) -> None:
    """Restore the newest readable checkpoint of the run folder (or ``path``) into ``run``."""
    if path is not None:
        state = load_checkpoint(path)
    else:
        found = load_latest_checkpoint(run.output_dir / "checkpoints")
        if found is None:
            raise UserError(f"resuming needs a checkpoint, got none under {run.output_dir / 'checkpoints'}")
        state = found[1]
    _restore(run, state)


def _restore(run: TrainingRun, state: dict) -> None:
    run.student.load_state_dict(state["student"])
    run.optimizer.load_state_dict(state["optimizer"])
    run.scheduler.load_state_dict(state["scheduler"])
    run.sampler.load_state_dict(state["sampler"])
    restore_rng_state(state["rng"])
    run.expert_lens.update(state.get("expert_lens", {}))
    run.next_step = int(state["step"])
    # Records of steps after the checkpoint are redone: drop them (and a torn last line).
    run.logger.truncate_from(run.next_step)
    if run.logger.jsonl:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", TcodFastWarning)  # the cut already reported nothing new
            run.history = read_metrics(run.logger.path)
        evals = [record for record in run.history if record.get("kind") == "eval"]
        run.last_eval = evals[-1] if evals else None


def export_student(run: TrainingRun, folder: Path) -> None:
    """The trained student as a Hugging Face folder (weights + tokenizer) for ``tcod-fast eval``.

    Written beside ``folder`` and renamed onto it, so ``folder`` is either the previous
    export or the complete new one, never half of one."""
    if run.dist.is_main:
        folder = Path(folder)
        partial = folder.with_name(folder.name + ".partial")
        shutil.rmtree(partial, ignore_errors=True)
        run.student.save_pretrained(str(partial))
        run.tokenizer.save_pretrained(str(partial))
        shutil.rmtree(folder, ignore_errors=True)
        os.replace(partial, folder)
    run.dist.barrier()
