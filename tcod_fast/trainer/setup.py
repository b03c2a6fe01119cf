"""How a run is built: the checks before anything is built (:func:`preflight`), then the
components a run holds from start to end (:func:`setup_run`), and the generators and rollout
settings each rollout uses.

A :class:`TrainingRun` is its components, built once (models, tokenizer, optimiser, scheduler,
curriculum sampler, environments, logger, config), and its :class:`RunState`, what changes
step by step and a checkpoint restores (the next step, cached expert lengths, the metrics
records and the last evaluation).
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import os
import shutil
import warnings
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from tcod_fast.algorithms import Algorithm
from tcod_fast.curriculum import CurriculumSampler
from tcod_fast.envs.mixture import split_mixture_task
from tcod_fast.errors import TcodFastWarning, UserError
from tcod_fast.loss_settings import Estimator
from tcod_fast.rollout import EpisodeConfig, SamplingParams, run_episodes
from tcod_fast.trainer import build, parallel
from tcod_fast.trainer.config import (
    RunRecords,
    TrainConfig,
    check_config,
    check_paths,
    environment_names,
    resolve_records,
    save_config,
    teacher_routes,
)
from tcod_fast.trainer.distributed import DistContext, broadcast_parameters, close_distributed, init_distributed
from tcod_fast.trainer.generators import build_generators, build_served_teacher, close_generators
from tcod_fast.trainer.metrics_log import MetricsLogger

__all__ = [
    "RunState",
    "Teacher",
    "TrainingRun",
    "generators",
    "preflight",
    "play_episodes",
    "setup_run",
    "setup_run_or_remove_folder",
    "warn_if_random_teacher",
]


@dataclass
class RunState:
    """What changes as a run trains; a checkpoint holds it (with the components' own states)."""

    next_step: int = 0
    expert_lens: dict[str, int] = field(default_factory=dict)  # task -> expert actions, cached
    history: list[dict] = field(default_factory=list)  # every metrics record, in order
    last_eval: dict | None = None


@dataclass(frozen=True)
class Teacher:
    """One teacher of a run: a model in this process, or a served one (or, for an algorithm
    without a teacher term, neither).

    Attributes:
        name: its label (``teacher`` for a run's one teacher; ``teachers[i].name`` otherwise).
        model: the in-process causal LM (frozen), or None.
        served: a :class:`~tcod_fast.rollout.served_teacher.ServedTeacher`, or None.
    """

    name: str
    model: torch.nn.Module | None = None
    served: Any = None

    @property
    def present(self) -> bool:
        return self.model is not None or self.served is not None


@dataclass(frozen=True)
class TrainingRun:
    """A run's components, built once by :func:`setup_run`, and its :class:`RunState`."""

    config: TrainConfig
    records: RunRecords  # what config's algorithm and estimator names stand for, resolved once
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
    state: RunState = field(default_factory=RunState)
    served_teacher: Any = None  # a ServedTeacher when teacher.server_url is set
    padding_free: bool = False  # loss.packing resolved for the run's models
    vllm_engines: dict = field(default_factory=dict)  # rollout.backend='vllm': name -> VLLMGenerator
    teachers: dict = field(default_factory=dict)  # name -> Teacher (several: config.teachers)
    teacher_routes: dict = field(default_factory=dict)  # env name -> teacher name (several teachers)

    def __post_init__(self) -> None:
        if not self.teachers:  # a run of one teacher: it, under its usual name
            object.__setattr__(self, "teachers", {"teacher": Teacher("teacher", self.teacher, self.served_teacher)})

    def teacher_for(self, task) -> Teacher:
        """The teacher of ``task``'s episodes: the run's one teacher, or the one its
        environment is routed to (``teachers[i].envs``)."""
        if not self.teacher_routes:
            return self.teachers["teacher"]
        env_name, _ = split_mixture_task(task)
        return self.teachers[self.teacher_routes[env_name]]

    @property
    def env_names(self) -> list[str]:
        """The run's environments, in config order (one, or ``envs``' names)."""
        return environment_names(self.config)

    def env_of(self, task) -> str:
        """The environment ``task`` belongs to."""
        return split_mixture_task(task)[0] if self.config.envs else self.config.env.name

    @property
    def has_teacher(self) -> bool:
        """Whether any teacher is there (in process or served)."""
        return any(t.present for t in self.teachers.values())  # the one teacher is among them too

    @property
    def max_turns(self) -> int:
        return self.config.curriculum.max_turns

    @property
    def algorithm(self) -> Algorithm:
        """The record of ``config.curriculum.algorithm``."""
        return self.records.algorithm

    @property
    def estimator(self) -> Estimator:
        """The record of ``config.loss.estimator``."""
        return self.records.estimator

    def log(self, step: int, metrics: dict, *, kind: str = "train") -> None:
        """Append one metrics record (labelled with the run's algorithm, name and tags) to
        ``state.history`` and the metrics file."""
        record = {"step": step, "kind": kind, "algorithm": self.config.algorithm}
        if self.config.logging.run_name:
            record["run"] = self.config.logging.run_name
        record.update(self.config.logging.tags)
        record.update(metrics)
        self.state.history.append(record)
        self.logger.log(record)

    def close(self, *, finished: bool = True) -> None:
        """Release what the run holds outside this process's memory: the metrics file, vLLM
        engines and the process group it created (``finished``: every process got here
        normally; see :func:`~tcod_fast.trainer.distributed.close_distributed`)."""
        try:
            self.logger.close()
            close_generators(self)
        finally:
            close_distributed(self.dist, finished=finished)

    @contextlib.contextmanager
    def closing(self) -> Iterator["TrainingRun"]:
        """``with run.closing():`` closes the run on every way out of the block: its end, an
        error, an interrupt."""
        try:
            yield self
        except BaseException:
            self.close(finished=False)
            raise
        self.close(finished=True)


def preflight(config: TrainConfig) -> RunRecords:
    """Every check of a run that needs no model: the config's values
    (:func:`~tcod_fast.trainer.config.check_config`), its model and tokenizer folders
    (:func:`~tcod_fast.trainer.config.check_paths`) and the devices it asks for. Returns the
    records the config's names resolve to. Raises :class:`~tcod_fast.errors.UserError`;
    writes nothing."""
    records = check_config(config)
    check_paths(config)
    device = _pick_device(config.trainer.device)
    if config.trainer.bf16 == "always" and device.type != "cuda":
        raise UserError(
            f"trainer.bf16='always' needs a CUDA device (bf16 autocast is GPU-only here), got device {device.type!r}"
        )
    return records


def warn_if_random_teacher(config: TrainConfig) -> None:
    """Warn (at the caller of ``train``) that a run without ``model.teacher_path`` trains
    against a random-init teacher."""
    served = config.teacher.server_url is not None
    needs_teacher = _needs_teacher(config, resolve_records(config).algorithm)
    random_teachers = [t.name for t in config.teachers if t.path is None and t.server_url is None]
    if config.teachers:
        if random_teachers and config.trainer.steps > 0 and needs_teacher:
            warnings.warn(
                f"teachers {', '.join(random_teachers)} have neither path nor server_url, so they are random-init tiny "
                "models (model.teacher_tiny): their KL is noise, not a signal to learn from",
                TcodFastWarning,
                stacklevel=3,
            )
        return
    if config.model.teacher_path is None and not served and config.trainer.steps > 0 and needs_teacher:
        warnings.warn(
            "model.teacher_path is not set, so the teacher is a random-init tiny model (model.teacher_tiny): "
            "its KL is noise, not a signal to learn from; set model.teacher_path to a trained teacher's folder",
            TcodFastWarning,
            stacklevel=3,
        )


def setup_run_or_remove_folder(config: TrainConfig, **kwargs) -> TrainingRun:
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


def _needs_teacher(config: TrainConfig, algorithm: Algorithm) -> bool:
    # An algorithm without a teacher term (GRPO) still loads a configured teacher for the KL logs.
    trains_with_teacher = algorithm.needs_teacher_model and config.trainer.steps > 0
    named = config.model.teacher_path is not None or any(t.path is not None for t in config.teachers)
    return trains_with_teacher or named or config.eval.kl_by_turn


def setup_run(config: TrainConfig, *, tokenizer=None, write_run_files: bool = True) -> TrainingRun:
    """Build models, tokenizer, optimiser, scheduler, sampler, environments and logger.

    Checks everything :func:`preflight` checks first, so a refused config builds and writes
    nothing. ``write_run_files=False`` leaves the run folder's ``config.yaml`` and
    ``tokenizer/`` as they are (a finished run that is resumed changes nothing)."""
    records = preflight(config)
    trainer = config.trainer
    if trainer.num_threads:
        torch.set_num_threads(trainer.num_threads)
    device = _pick_device(trainer.device)
    context = init_distributed(device.type)
    try:
        return _build_run(config, records, tokenizer, write_run_files, device, context)
    except BaseException:
        close_distributed(context, finished=False)
        raise


def _build_run(
    config: TrainConfig, records: RunRecords, tokenizer, write_run_files: bool, device: torch.device, context: DistContext
) -> TrainingRun:
    trainer = config.trainer
    if trainer.parallelism == "fsdp2" and not context.enabled:
        warnings.warn(
            "trainer.parallelism='fsdp2' acts only with several processes (torchrun --nproc-per-node N, N > 1); "
            "this run has one, so the student is not sharded",
            TcodFastWarning,
            stacklevel=4,
        )
    if context.enabled and device.type == "cuda":
        device = torch.device("cuda", context.local_rank)
    output_dir = Path(trainer.output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    prompter = build.build_run_prompter(config)

    if tokenizer is None:
        tokenizer_dir = output_dir / "tokenizer"
        if config.model.tokenizer_path is not None:
            tokenizer = build.load_tokenizer(config.model.tokenizer_path)
        elif config.model.student_path is not None:
            tokenizer = build.load_tokenizer(config.model.student_path)
        elif tokenizer_dir.is_dir():
            tokenizer = build.load_tokenizer(tokenizer_dir)
        else:
            tokenizer = build.build_tokenizer(config, prompter, progress=config.logging.progress and context.is_main)
    for index, entry in enumerate(config.teachers):  # before any model loads
        if entry.path is not None:
            _check_same_tokenizer(f"teachers[{index}] ({entry.name!r})", entry.path, tokenizer)
    if context.is_main and write_run_files:
        tokenizer.save_pretrained(str(output_dir / "tokenizer"))
        save_config(config, output_dir / "config.yaml")

    student = build.build_model(config.model.student_path, config.model.student_tiny, tokenizer).to(device)
    student.train()
    if config.model.activation_checkpointing:
        student.gradient_checkpointing_enable()
    broadcast_parameters(student, context)
    student = parallel.prepare_student(student, trainer.parallelism, context, param_dtype=trainer.fsdp_param_dtype)
    teacher = None
    served_teacher = None
    routes = teacher_routes(config)
    if config.teachers:
        teachers = _build_teachers(config, tokenizer, device, context)
    else:
        served_teacher = build_served_teacher(config, tokenizer)
        if _needs_teacher(config, records.algorithm) and served_teacher is None:
            teacher = _build_teacher_model(config, config.model.teacher_path, config.model.teacher_tiny, tokenizer, device, context)
        teachers = {"teacher": Teacher("teacher", teacher, served_teacher)}

    teacher_models = [t.model for t in teachers.values() if t.model is not None]
    use_padding_free = build.padding_free(config.loss.packing, student, *teacher_models)
    optimizer = torch.optim.AdamW(
        [p for p in student.parameters() if p.requires_grad],
        lr=trainer.lr,
        betas=tuple(trainer.betas),
        eps=trainer.eps,
        weight_decay=trainer.weight_decay,
    )
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, _lr_lambda(config))
    sampler = CurriculumSampler(config.curriculum, records.algorithm)
    tasks = build.run_task_splits(config)
    per_rank = math.ceil(config.rollout.tasks_per_step / context.world_size) * config.curriculum.episodes_per_task
    slots = max(per_rank, min(config.eval.num_tasks * len(environment_names(config)), 32), 1)
    envs = build.build_run_envs(config, slots, progress=config.logging.progress and context.is_main)
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
        records=records,
        device=device,
        dist=context,
        tokenizer=tokenizer,
        prompter=prompter,
        student=student,
        teacher=teacher,
        served_teacher=served_teacher,
        teachers=teachers,
        teacher_routes=routes,
        padding_free=use_padding_free,
        optimizer=optimizer,
        scheduler=scheduler,
        sampler=sampler,
        envs=envs,
        tasks=tasks,
        logger=logger,
        output_dir=output_dir,
        use_bf16=use_bf16,
    )


def _build_teacher_model(config: TrainConfig, path: str | None, tiny, tokenizer, device, context, *, mode: str | None = None):
    teacher = build.build_model(path, tiny, tokenizer, dtype=build.torch_dtype(config.model.teacher_dtype)).to(device)
    teacher.eval().requires_grad_(False)
    return parallel.prepare_teacher(teacher, config.trainer.parallelism, context, mode=mode or config.trainer.fsdp_teacher)


def _build_teachers(config: TrainConfig, tokenizer, device, context) -> dict[str, Teacher]:
    """The teachers of ``config.teachers`` (their tokenizers were checked before any model loaded)."""
    teachers = {}
    for index, entry in enumerate(config.teachers):
        if entry.server_url is not None:
            teachers[entry.name] = Teacher(entry.name, served=build_served_teacher(config, tokenizer, entry.server_url))
            continue
        tiny = dataclasses.replace(config.model.teacher_tiny, seed=config.model.teacher_tiny.seed + index)
        model = _build_teacher_model(config, entry.path, tiny, tokenizer, device, context, mode="whole")
        teachers[entry.name] = Teacher(entry.name, model=model)
    return teachers


def _check_same_tokenizer(where: str, folder: str, tokenizer) -> None:
    """A :class:`~tcod_fast.errors.UserError` line unless the model folder's tokenizer maps the
    same pieces to the same ids as the run's (its vocabulary size may differ by padding)."""
    try:
        own = build.load_tokenizer(folder)
    except (OSError, ValueError) as exc:
        raise UserError(f"{where}: the teacher's folder {folder!r} must hold the tokenizer it uses (the student's), got none: {exc}") from None
    mine, theirs = tokenizer.get_vocab(), own.get_vocab()
    if mine != theirs:
        differing = sorted(set(mine.items()) ^ set(theirs.items()), key=lambda item: item[1])[:3]
        raise UserError(
            f"{where}: every teacher must use the student's tokenizer, got one of {len(theirs)} pieces against the student's "
            f"{len(mine)} (first differences: {differing}) in {folder!r}"
        )


def generators(run: TrainingRun, *, for_eval: bool = False):
    """The student's generator and, for training rollouts of a run with a teacher, the teacher's
    (``rollout.backend`` hf or vllm, a served teacher: :mod:`tcod_fast.trainer.generators`)."""
    return build_generators(run, for_eval=for_eval)


def play_episodes(
    run: TrainingRun,
    tasks,
    plans,
    *,
    student,
    teacher=None,
    temperature: float,
    seed: int,
    description: str,
    gather_teacher: bool = False,
) -> list:
    """Play ``plans`` on ``tasks`` in the run's environments: the run's context mode and reply
    limits, the student sampled at ``temperature`` (the teacher at ``rollout.teacher_temperature``),
    seeded by ``seed`` and each plan's ``episode_index`` (an episode samples the same on any
    number of processes), with a progress bar ``description`` on the main process. Under FSDP2
    the student (and, with ``gather_teacher``, the in-process teacher) is gathered whole for
    the episodes; every process must pass the same ``gather_teacher`` (the gather is
    collective)."""
    settings = run.config.rollout
    config = EpisodeConfig(
        context_mode=run.config.env.context_mode,
        student_sampling=SamplingParams(
            temperature=temperature,
            top_p=settings.top_p,
            max_new_tokens=settings.max_new_tokens,
            stop_strings=run.prompter.action_protocol.stop_strings,
        ),
        teacher_sampling=SamplingParams(
            temperature=settings.teacher_temperature,
            max_new_tokens=settings.max_new_tokens,
            stop_strings=run.prompter.action_protocol.stop_strings,
        ),
        seed=seed,
        show_progress=run.config.logging.progress and run.dist.is_main,
        progress_description=description,
    )
    with parallel.gathered_for_generation(run.student, run.teacher if gather_teacher else None):
        return run_episodes(
            [tasks[p.task_index] for p in plans],
            plans,
            run.envs,
            tokenizer=run.tokenizer,
            prompter=run.prompter,
            student=student,
            teacher=teacher,
            config=config,
            episode_keys=[p.episode_index for p in plans],  # each episode's draws, however the plans are split
        )
