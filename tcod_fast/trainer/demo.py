"""The built-in demo: on-policy distillation that makes students win, over several seeds,
and the papers' KL-escalation claim tested on the runs.

``tcod-fast demo [--out DIR] [--quick | --full] [--seed N]`` runs on CPU with nothing
downloaded:

1. **game and tokenizer**: the key-and-door game (:mod:`tcod_fast.envs.toy`), whose
   observations state everything the right next action depends on, and a word-level
   tokenizer learnt in code from the texts of every split;
2. **two teachers**, both small Llama models trained here:

   * *narrow*: supervised on the expert's own episodes only -- good on the expert's path,
     never shown a state off it;
   * *robust*: the narrow teacher continued with DAgger-style rounds: it plays training
     tasks itself, with a share of turns played by a random admissible action, every
     visited state is labelled with the environment's current-state expert, and it is
     fitted to everything collected so far;

3. **student starts**: one smaller model per seed, warm-started by a brief supervised pass
   on a few expert episodes (the papers distil into pretrained students that can already
   act a little); every algorithm of that seed starts from it;
4. **student runs**: each algorithm x teacher x seed distils for the same number of steps
   (the full-vocabulary forward KL(teacher || student) through the fused op for the OPD
   family; GRPO is the teacher-free baseline), with evaluations along the way;
5. **evaluation** at full depth on held-out seen and unseen tasks (temperature 0.4):
   success, and the exact reverse KL(student || teacher) per student token at each turn
   index of the student's own episodes, with its least-squares slope (the escalation
   slope);
6. **outputs** in ``--out``: ``results.json``, ``results.md`` (table and verdicts computed
   from the numbers), ``metrics.jsonl`` (every record labelled with what it evaluates),
   PNG plots, the models, and one folder per run.

Runs are spread over ``workers`` processes (one torch thread each). Every random draw is
seeded from ``--seed`` (the base seed; the student seeds are ``seed, seed + 1, ...``), so
the same command on the same machine gives the same numbers whatever the scheduling.
"""

from __future__ import annotations

import concurrent.futures
import copy
import json
import math
import multiprocessing
import os
import shutil
import signal
import statistics
import sys
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from tcod_fast import provenance
from tcod_fast.algorithms import get_algorithm
from tcod_fast.rollout import HFGenerator
from tcod_fast.tiny_models import TinyModelConfig
from tcod_fast.trainer import build, loop, plots, sft
from tcod_fast.trainer.config import TrainConfig, config_to_dict
from tcod_fast.trainer.evaluation import evaluate_model

__all__ = ["DemoSettings", "demo_settings", "run_demo", "results_table", "verdicts"]

TEACHERS = ("robust", "narrow")


#: How the training signal of an algorithm with a teacher term becomes a gradient.
FORMULATIONS = ("full_vocab", "sampled")
#: The committed grid results and the learning rate x updates point they chose per variant
#: (``tcod-fast demo --tune`` writes them again; see :func:`tune_points`).
TUNED_POINTS_FILE = Path(__file__).with_name("demo_grid.json")


@dataclass(frozen=True)
class Variant:
    """One demo run kind, named ``algorithm[@how]`` (``opd``, ``opd@sampled``,
    ``opd@reverse_kl``): an algorithm of :mod:`tcod_fast.algorithms` and how its teacher term
    is trained.

    Attributes:
        name: the name as given.
        algorithm: the algorithm's name.
        formulation: ``full_vocab`` (the exact divergence over the vocabulary through the
            fused op), ``sampled`` (the papers': the k1 advantage ``log q(a) - log p(a)`` of
            each sampled token in a PPO clipped surrogate) or ``None`` (no teacher term: GRPO,
            which is a PPO policy gradient and is run with the sampled formulation's settings).
        divergence: the full-vocabulary divergence (``None``: the demo's).
    """

    name: str
    algorithm: str
    formulation: str | None
    divergence: str | None = None

    @property
    def policy_gradient(self) -> bool:
        """Trained through PPO on sampled tokens only (the sampled formulation, or GRPO)."""
        return self.formulation != "full_vocab"

    @property
    def opd_baseline(self) -> str:
        """The OPD run it is compared with: OPD in the same formulation."""
        return "opd@sampled" if self.policy_gradient else "opd"


def parse_variant(name: str) -> Variant:
    """``algorithm[@sampled | @reverse_kl | @forward_kl | @jsd]`` -> :class:`Variant`; a
    ``ValueError`` names what is accepted."""
    from tcod_fast.algorithms import algorithm_names

    algorithm, _, how = name.partition("@")
    divergences = ("reverse_kl", "forward_kl", "jsd")
    if algorithm not in algorithm_names() or (how and how not in ("sampled", *divergences)):
        raise ValueError(
            f"takes algorithms from {', '.join(algorithm_names())}, each optionally @sampled or "
            f"@{'/'.join(divergences)}; got {name!r}"
        )
    record = get_algorithm(algorithm)
    if not record.needs_teacher_model:
        if how:
            raise ValueError(f"takes {algorithm} without @{how} ({algorithm} has no teacher term); got {name!r}")
        return Variant(name, algorithm, None)
    if how == "sampled":
        return Variant(name, algorithm, "sampled")
    return Variant(name, algorithm, "full_vocab", how or None)


#: The learning rate x updates-per-step grid every algorithm is tuned on (the same for all).
GRID: tuple[tuple[float, int], ...] = ((1e-4, 2), (3e-4, 2), (1e-3, 2), (1e-4, 8), (3e-4, 8), (1e-3, 8))


def pacing_eta(steps: int, max_turns: int) -> int:
    """The curriculum period that brings every curriculum to full depth by half the steps.

    TCOD-F2B plays ``1 + step // eta`` turns (full depth, ``max_turns``, from step
    ``eta (max_turns - 1)``) and TCOD-B2F hands the student ``1 + step // eta`` turns from the
    end (all of an episode of ``L <= max_turns`` turns from ``eta (L - 1)``), so
    ``eta = max(1, floor(steps / (2 (max_turns - 1))))`` reaches both by ``steps / 2``.
    """
    return max(1, steps // (2 * max(max_turns - 1, 1)))


def load_tuned_points(path: Path = TUNED_POINTS_FILE) -> dict:
    """The committed grid results (:func:`choose_points`' record: ``grid``, ``seen_success``
    per variant and point, ``chosen`` point per variant); ``{}`` when there are none."""
    path = Path(path)
    return json.loads(path.read_text()) if path.is_file() else {}


@dataclass
class DemoSettings:
    """Everything one demo run does; :func:`demo_settings` gives the presets."""

    robust_algorithms: tuple[str, ...] = (
        "opd", "opd@sampled", "tcod_f2b", "tcod_f2b@sampled", "tcod_b2f", "tcod_b2f@sampled",
    )  # fmt: skip
    # The narrow teacher's runs (its students, its KL escalation) are in --full; the default
    # still trains it (DAgger continues it into the robust one) and evaluates it.
    narrow_algorithms: tuple[str, ...] = ()
    num_seeds: int = 3
    base_seed: int = 0
    workers: int = 2
    # the game
    max_rooms: int = 3
    max_turns: int = 14
    train_tasks: int = 256
    eval_tasks: int = 32
    # teachers
    teacher: TinyModelConfig = field(
        default_factory=lambda: TinyModelConfig(hidden_size=128, intermediate_size=256, num_hidden_layers=2)
    )
    teacher_sft_tasks: int = 128
    teacher_epochs: int = 4
    teacher_lr: float = 3e-3
    sft_batch_size: int = 16
    dagger_rounds: int = 3
    dagger_tasks: int = 64
    dagger_noise: float = 0.3
    dagger_temperature: float = 0.7
    dagger_lr: float = 1e-3
    # students
    # Two heads of 48 dimensions: copying a container or colour word out of the observation
    # is learnt much faster than with four heads of 24 (measured on this game).
    student: TinyModelConfig = field(
        default_factory=lambda: TinyModelConfig(
            hidden_size=96, intermediate_size=192, num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=2
        )
    )
    student_warmup_tasks: int = 64
    student_warmup_epochs: int = 4
    student_warmup_lr: float = 3e-3
    # distillation: the same budget for every algorithm
    steps: int = 60
    episodes_per_step: int = 8
    lr_schedule: str = "cosine"
    warmup_steps: int = 5
    # Rollout temperatures by formulation: the exact divergence does not depend on how the
    # states were sampled; a policy gradient (the sampled estimator, GRPO) is unbiased only
    # for tokens drawn from the policy whose log-probs it takes, as in the papers' configs.
    rollout_temperature: float = 0.6
    policy_gradient_rollout_temperature: float = 1.0
    # Forward KL(teacher || student) for the full-vocabulary formulation: measured on this
    # game, reverse KL let some seeds collapse (a confidently wrong student gets almost no
    # gradient through its saturated softmax); see the README. Evaluation always measures
    # reverse KL.
    divergence: str = "forward_kl"
    eta: int | None = None  # None: pacing_eta(steps, max_turns); the papers use 3-6
    grpo_group_size: int = 4  # algorithms with GRPO groups: the same episodes, as groups per task
    # learning rate x updates per step: one grid for every algorithm, each run at the point
    # its tuning chose (seen split, tuning seeds); ``tuned`` is the committed table
    grid: tuple[tuple[float, int], ...] = GRID
    tuned: dict = field(default_factory=load_tuned_points)
    tuning_seeds: tuple[int, ...] = (1000, 1001)
    eval_every: int = 5
    interim_eval_tasks: int = 16
    max_new_tokens: int = 12

    @property
    def seeds(self) -> list[int]:
        return [self.base_seed + k for k in range(self.num_seeds)]

    @property
    def pacing(self) -> int:
        """The curriculum period ``eta`` (:func:`pacing_eta` unless set)."""
        return self.eta if self.eta is not None else pacing_eta(self.steps, self.max_turns)

    def algorithms(self, teacher: str) -> tuple[str, ...]:
        return self.robust_algorithms if teacher == "robust" else self.narrow_algorithms

    def rollout_temperature_of(self, variant: Variant) -> float:
        """The rollout temperature of ``variant``'s training episodes: a policy gradient's
        (sampled formulation, GRPO) is sampled where its log-probs are taken, at 1.0."""
        return self.policy_gradient_rollout_temperature if variant.policy_gradient else self.rollout_temperature

    def point(self, variant: str) -> tuple[float, int]:
        """``(lr, updates_per_step)`` of ``variant``: its tuned point, or for a variant the
        table does not hold, the point of OPD in the same formulation."""
        chosen = self.tuned.get("chosen", {})
        entry = chosen.get(variant) or chosen.get(parse_variant(variant).opd_baseline)
        if entry is None:
            raise ValueError(f"no tuned learning rate for demo run {variant!r}; run tcod-fast demo --tune")
        return float(entry["lr"]), int(entry["updates_per_step"])


def demo_settings(preset: str = "default", *, seed: int = 0, workers: int | None = None) -> DemoSettings:
    """``default`` (about 7 minutes on 2 cores), ``quick`` (a few minutes, for CI),
    ``full`` (every algorithm under both formulations, 5 seeds) or ``tiny`` (seconds, to
    check that every stage runs; ``TCOD_FAST_TINY=1``)."""
    if preset == "default":
        settings = DemoSettings()
    elif preset == "quick":
        settings = DemoSettings(
            robust_algorithms=("opd", "opd@sampled", "tcod_f2b", "tcod_b2f", "grpo"),
            narrow_algorithms=("opd",),
            num_seeds=2,
            train_tasks=128,
            eval_tasks=16,
            teacher_sft_tasks=96,
            teacher_epochs=4,
            dagger_rounds=2,
            dagger_tasks=48,
            student_warmup_tasks=64,
            steps=16,
            eval_every=8,
            interim_eval_tasks=8,
        )
    elif preset == "tiny":  # checks that everything runs (TCOD_FAST_TINY=1); its numbers mean nothing
        tiny_model = TinyModelConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=2)
        settings = DemoSettings(
            robust_algorithms=("opd", "opd@sampled", "grpo"),
            narrow_algorithms=("opd",),
            num_seeds=2,
            max_turns=8,
            train_tasks=16,
            eval_tasks=4,
            teacher=tiny_model,
            teacher_sft_tasks=8,
            teacher_epochs=1,
            dagger_rounds=1,
            dagger_tasks=4,
            student=tiny_model,
            student_warmup_tasks=4,
            student_warmup_epochs=1,
            steps=2,
            episodes_per_step=4,
            warmup_steps=0,
            eval_every=0,
            interim_eval_tasks=4,
            grid=((1e-3, 1), (1e-3, 2)),
            tuning_seeds=(1000,),
        )
    elif preset == "full":
        both = ("opd", "tcod_f2b", "tcod_b2f", "guided_opd", "atod", "sod")
        settings = DemoSettings(
            robust_algorithms=(*(n for a in both for n in (a, f"{a}@sampled")), "grpo", "opd@reverse_kl"),
            narrow_algorithms=("opd", "opd@sampled", "tcod_f2b", "tcod_b2f", "guided_opd"),
            num_seeds=5,
            eval_tasks=48,
        )
    else:
        raise ValueError(f"demo preset must be 'default', 'quick' or 'full' (or 'tiny', which only checks that it runs), got {preset!r}")
    settings.base_seed = seed
    if workers is not None:
        settings.workers = workers
    return settings


# ======================================================================================
# configs
# ======================================================================================
def base_config(settings: DemoSettings, out: Path) -> TrainConfig:
    """The run config every job starts from (the game, prompt, tokenizer, sizes and the
    budget every algorithm shares: steps, episodes per step, schedule, evaluations)."""
    config = TrainConfig()
    config.env.name = "toy"
    config.env.kwargs = {
        "max_rooms": settings.max_rooms,
        "max_steps": settings.max_turns,
        "num_tasks": {"train": settings.train_tasks, "valid_seen": settings.eval_tasks, "valid_unseen": settings.eval_tasks},
    }
    config.env.context_mode = "window"
    config.env.think = False
    config.env.history_length = 0  # the observation says everything; see tcod_fast.envs.toy
    config.env.prompt_style = "compact"
    config.curriculum.max_turns = settings.max_turns
    config.curriculum.eta = settings.pacing
    config.curriculum.b2f_prefix_source = "expert"
    # Every schedule ends by half the steps, as the pacing does: Guided-OPD's teacher
    # withdraws and ATOD's annealing completes.
    half = max(settings.steps // 2, 1)
    config.curriculum.guided = replace(config.curriculum.guided, p_init=0.5, warmup_steps=0, decay_steps=half)
    config.curriculum.atod = replace(config.curriculum.atod, anneal_steps=half)
    config.rollout.tasks_per_step = settings.episodes_per_step
    config.rollout.temperature = settings.rollout_temperature
    config.loss.divergence = settings.divergence
    config.rollout.max_new_tokens = settings.max_new_tokens
    config.trainer.steps = settings.steps
    config.trainer.warmup_steps = settings.warmup_steps
    config.trainer.lr_schedule = settings.lr_schedule
    config.trainer.num_threads = 1
    config.trainer.micro_batch_tokens = 16384
    config.trainer.eval_every = settings.eval_every
    config.trainer.checkpoint_every = 0
    config.trainer.keep_checkpoints = 1
    config.eval.num_tasks = settings.eval_tasks
    config.eval.interim_num_tasks = min(settings.interim_eval_tasks, settings.eval_tasks)
    config.eval.kl_by_turn_splits = ("seen",)
    config.eval.kl_by_turn_final_only = True
    config.model.teacher_tiny = copy.deepcopy(settings.teacher)
    config.model.student_tiny = copy.deepcopy(settings.student)
    config.model.tokenizer_path = str(out / "tokenizer")
    config.logging.progress = False
    config.trainer.output_dir = str(out)
    return config


def _teacher_dir(out: Path, teacher: str) -> Path:
    return out / "models" / f"teacher_{teacher}"


def _student_init_dir(out: Path, seed: int) -> Path:
    return out / "models" / f"student_init_seed{seed}"


def run_config(
    settings: DemoSettings, out: Path, teacher: str, algorithm: str, seed: int, *, point: tuple[float, int] | None = None
) -> TrainConfig:
    """The config of one student run: the variant ``algorithm`` (:func:`parse_variant`) from
    ``teacher`` with seed ``seed``, at its tuned ``(lr, updates_per_step)`` or ``point``."""
    variant = parse_variant(algorithm)
    config = base_config(settings, out)
    lr, updates = point if point is not None else settings.point(algorithm)
    config.trainer.lr = lr
    config.trainer.updates_per_step = updates
    config.curriculum.algorithm = variant.algorithm
    config.curriculum.seed = seed
    config.trainer.seed = seed
    if variant.divergence:
        config.loss.divergence = variant.divergence
    if variant.formulation == "sampled":  # k1 of the sampled token: reverse KL, as in the papers
        config.loss.estimator = "sampled"
        config.loss.sampled_kl = "k1"
        config.loss.divergence = "reverse_kl"
    config.rollout.temperature = settings.rollout_temperature_of(variant)
    record = get_algorithm(variant.algorithm)
    if record.min_group_size > 1:
        # GRPO groups: the same number of episodes per step, as groups per task
        config.curriculum.episodes_per_task = settings.grpo_group_size
        config.rollout.tasks_per_step = max(settings.episodes_per_step // settings.grpo_group_size, 1)
    config.model.teacher_path = str(_teacher_dir(out, teacher))
    config.model.student_path = str(_student_init_dir(out, seed))
    name = f"{teacher}/{algorithm}/seed{seed}"
    config.logging.run_name = name
    config.logging.tags = {"teacher": teacher, "seed": seed, "evaluates": "student", "demo_run": algorithm}
    if variant.formulation is not None:
        config.logging.tags["formulation"] = variant.formulation
    if variant.formulation == "full_vocab":  # the divergence is the teacher term's
        config.logging.tags["divergence"] = config.loss.divergence
    config.trainer.output_dir = str(out / "runs" / teacher / algorithm / f"seed{seed}")
    return config


# ======================================================================================
# jobs (each runs in a worker process, one torch thread)
# ======================================================================================
def _die_with_parent(parent_pid: int) -> None:
    """On Linux, ask the kernel to end this worker when the process that started it dies,
    however it dies (``kill -9`` too): a demo stopped by its user leaves no job running."""
    if not sys.platform.startswith("linux"):
        return
    import ctypes

    pr_set_pdeathsig = 1
    ctypes.CDLL(None, use_errno=True).prctl(pr_set_pdeathsig, signal.SIGTERM)
    if os.getppid() != parent_pid:  # the parent died before the request
        os._exit(1)


def _worker_init(parent_pid: int) -> None:
    import transformers

    _die_with_parent(parent_pid)
    torch.set_num_threads(1)
    transformers.utils.logging.disable_progress_bar()  # no bar per saved model; the demo has its own


def _game(settings: DemoSettings, out: Path):
    config = base_config(settings, out)
    tokenizer = build.load_tokenizer(config.model.tokenizer_path)
    prompter = build.build_prompter(config.env)
    splits = build.env_task_splits(config.env)
    envs = build.build_envs(config.env, 64)
    return config, tokenizer, prompter, splits, envs


def _expert_pairs(settings: DemoSettings, tasks, envs, tokenizer, prompter) -> tuple[list, list]:
    """The expert's windowed episodes of ``tasks`` and their labelled (prompt, action) turns."""
    demos = sft.expert_trajectories(
        tasks, envs, tokenizer=tokenizer, prompter=prompter, context_mode="window", max_turns=settings.max_turns
    )
    return demos, sft.labelled_turns(demos, tokenizer=tokenizer, prompter=prompter)


def job_narrow_teacher(settings: DemoSettings, out: Path) -> dict:
    """Supervised learning on the expert's own episodes of the first training tasks."""
    config, tokenizer, prompter, splits, envs = _game(settings, out)
    demos, pairs = _expert_pairs(settings, splits["train"][: settings.teacher_sft_tasks], envs, tokenizer, prompter)
    spec = replace(settings.teacher, seed=10_000 + settings.base_seed)
    teacher = build.build_model(None, spec, tokenizer)
    losses = sft.supervised_finetune(
        teacher, pairs, pad_token_id=tokenizer.pad_token_id, epochs=settings.teacher_epochs,
        lr=settings.teacher_lr, batch_size=settings.sft_batch_size, seed=settings.base_seed,
    )  # fmt: skip
    teacher.save_pretrained(str(_teacher_dir(out, "narrow")))
    return {"expert_episodes": len(demos), "labelled_turns": len(pairs), "loss_by_epoch": losses}


def job_robust_teacher(settings: DemoSettings, out: Path) -> dict:
    """The narrow teacher, continued with DAgger rounds on its own noisy episodes."""
    config, tokenizer, prompter, splits, envs = _game(settings, out)
    demos, pairs = _expert_pairs(settings, splits["train"][: settings.teacher_sft_tasks], envs, tokenizer, prompter)
    teacher = build.build_model(str(_teacher_dir(out, "narrow")), settings.teacher, tokenizer)
    train = splits["train"]
    rounds = []
    for index in range(settings.dagger_rounds):
        start = (settings.teacher_sft_tasks + index * settings.dagger_tasks) % len(train)
        tasks = [train[(start + i) % len(train)] for i in range(settings.dagger_tasks)]
        episodes = sft.dagger_trajectories(
            tasks, envs, HFGenerator(teacher, tokenizer), tokenizer=tokenizer, prompter=prompter,
            max_turns=settings.max_turns, noise=settings.dagger_noise, temperature=settings.dagger_temperature,
            max_new_tokens=settings.max_new_tokens, seed=settings.base_seed * 1000 + index,
        )  # fmt: skip
        new_pairs = sft.labelled_turns(episodes, tokenizer=tokenizer, prompter=prompter)
        pairs += new_pairs
        losses = sft.supervised_finetune(
            teacher, pairs, pad_token_id=tokenizer.pad_token_id, epochs=1, lr=settings.dagger_lr,
            batch_size=settings.sft_batch_size, seed=settings.base_seed * 1000 + index,
            )  # fmt: skip
        rounds.append(
            {
                "episodes": len(episodes),
                "success_while_collecting": statistics.fmean(float(e.won) for e in episodes),
                "new_labelled_turns": len(new_pairs),
                "labelled_turns": len(pairs),
                "loss": losses[-1],
            }
        )
    teacher.save_pretrained(str(_teacher_dir(out, "robust")))
    return {"dagger_rounds": rounds}


def job_student_init(settings: DemoSettings, out: Path, seed: int) -> dict:
    """A fresh student warm-started on a few expert episodes (seeded choice of tasks)."""
    config, tokenizer, prompter, splits, envs = _game(settings, out)
    train = splits["train"]
    rng = np.random.default_rng([seed, 2])
    chosen = sorted(rng.choice(len(train), size=min(settings.student_warmup_tasks, len(train)), replace=False))
    _, pairs = _expert_pairs(settings, [train[int(i)] for i in chosen], envs, tokenizer, prompter)
    student = build.build_model(None, replace(settings.student, seed=20_000 + seed), tokenizer)
    losses = sft.supervised_finetune(
        student, pairs, pad_token_id=tokenizer.pad_token_id, epochs=settings.student_warmup_epochs,
        lr=settings.student_warmup_lr, batch_size=settings.sft_batch_size, seed=seed,
    )  # fmt: skip
    folder = _student_init_dir(out, seed)
    student.save_pretrained(str(folder))
    tokenizer.save_pretrained(str(folder))
    return {"seed": seed, "labelled_turns": len(pairs), "loss_by_epoch": losses}


def job_reference_eval(settings: DemoSettings, out: Path, name: str, model_dir: str, teacher: str | None) -> dict:
    """Evaluate a model as it is (no training): a teacher, or a student start."""
    config = base_config(settings, out)
    config.trainer.steps = 0
    config.model.student_path = model_dir
    config.model.teacher_path = str(_teacher_dir(out, teacher)) if teacher else None
    config.eval.kl_by_turn = teacher is not None
    config.logging.run_name = name
    config.logging.tags = {"algorithm": None, "evaluates": name, "teacher": teacher}
    config.trainer.output_dir = str(out / "runs" / "reference" / name)
    run = evaluate_model(config)
    return {"name": name, "eval": run.state.last_eval, "history": run.state.history}


def job_student_run(
    settings: DemoSettings, out: Path, teacher: str, algorithm: str, seed: int, point: tuple[float, int] | None = None
) -> dict:
    """One distillation run; returns its summary with its full metrics history. With
    ``point`` (a tuning run): that ``(lr, updates_per_step)``, in ``runs/tuning/``, evaluated
    only at the end."""
    started = time.perf_counter()
    config = run_config(settings, out, teacher, algorithm, seed, point=point)
    if point is not None:
        lr, updates = point
        config.trainer.output_dir = str(out / "runs" / "tuning" / algorithm / f"lr{lr:g}_updates{updates}" / f"seed{seed}")
        config.logging.run_name = f"tuning/{algorithm}/lr{lr:g}_updates{updates}/seed{seed}"
        config.logging.tags["evaluates"] = "tuning"
        config.trainer.eval_every = 0
    shutil.rmtree(config.trainer.output_dir, ignore_errors=True)  # a rerun of the demo starts the job afresh
    run = loop.train(config)
    final = run.state.last_eval or {}
    return {
        "teacher": teacher,
        "algorithm": algorithm,
        "formulation": parse_variant(algorithm).formulation,
        "seed": seed,
        "lr": config.trainer.lr,
        "updates_per_step": config.trainer.updates_per_step,
        "success_seen": final.get("success_seen"),
        "success_unseen": final.get("success_unseen"),
        "turns_seen": final.get("turns_seen"),
        "final_kl": final.get("kl_seen/trajectory_mean"),
        "kl_by_turn": final.get("kl_by_turn_seen", []),
        "kl_by_turn_count": final.get("kl_by_turn_count_seen", []),
        "kl_escalation_slope": final.get("kl_seen/escalation_slope"),
        "kl_by_turn_unseen": final.get("kl_by_turn_unseen", []),
        "kl_escalation_slope_unseen": final.get("kl_unseen/escalation_slope"),
        "seconds": time.perf_counter() - started,
        "history": run.state.history,
    }


def tuned_variants(settings: DemoSettings) -> list[str]:
    """The variants a tuning of ``settings`` covers: every run kind of either teacher."""
    return list(dict.fromkeys([*settings.robust_algorithms, *settings.narrow_algorithms]))


def choose_points(settings: DemoSettings, tuning_runs: list[dict]) -> dict:
    """The grid's results and each variant's chosen point: the highest mean final success on
    the seen split over the tuning seeds (a tie goes to the point listed first, the cheaper).
    Returns the content of ``grid.json`` (and of :data:`TUNED_POINTS_FILE`)."""
    grid = [list(point) for point in settings.grid]
    seen: dict[str, list[list[float]]] = {}
    chosen: dict[str, dict] = {}
    for variant in dict.fromkeys(r["algorithm"] for r in tuning_runs):
        per_point = []
        for lr, updates in settings.grid:
            values = [
                r["success_seen"] for r in tuning_runs
                if r["algorithm"] == variant and r["lr"] == lr and r["updates_per_step"] == updates
            ]  # fmt: skip
            per_point.append(values)
        seen[variant] = per_point
        means = [statistics.fmean(v) if v else float("-inf") for v in per_point]
        best = max(range(len(means)), key=lambda i: (means[i], -i))
        chosen[variant] = {"lr": grid[best][0], "updates_per_step": grid[best][1], "seen_success": means[best]}
    return {
        "grid": grid,
        "tuning_seeds": list(settings.tuning_seeds),
        "teacher": "robust",
        "steps": settings.steps,
        "episodes_per_step": settings.episodes_per_step,
        "selection": "highest mean final success on the seen split over the tuning seeds; ties to the earlier grid point",
        "seen_success": seen,
        "chosen": chosen,
    }


# ======================================================================================
# scheduling
# ======================================================================================
@dataclass
class _Job:
    key: str
    function: Callable[..., dict]
    args: tuple
    needs: tuple[str, ...] = ()


def _run_jobs(
    jobs: list[_Job], workers: int, on_done: Callable[[_Job, dict, float], None], done: Iterable[str] = ()
) -> dict[str, dict]:
    """Run ``jobs`` (in list order of priority, each once its ``needs`` are done, or listed in
    ``done``) on ``workers`` processes; at most ``workers`` are in flight, so the order is kept."""
    finished = set(done)
    results: dict[str, dict] = {}
    pending = list(jobs)
    context = multiprocessing.get_context("spawn")
    with concurrent.futures.ProcessPoolExecutor(
        workers, mp_context=context, initializer=_worker_init, initargs=(os.getpid(),)
    ) as pool:
        running: dict[concurrent.futures.Future, tuple[_Job, float]] = {}
        while pending or running:
            while len(running) < workers:
                ready = next((job for job in pending if all(n in results or n in finished for n in job.needs)), None)
                if ready is None:
                    break
                pending.remove(ready)
                running[pool.submit(ready.function, *ready.args)] = (ready, time.perf_counter())
            if not running:
                missing = {job.key: [n for n in job.needs if n not in results and n not in finished] for job in pending}
                raise RuntimeError(f"demo jobs wait for jobs that never ran: {missing}")
            done, _ = concurrent.futures.wait(running, return_when=concurrent.futures.FIRST_COMPLETED)
            for future in done:
                job, started = running.pop(future)
                results[job.key] = future.result()
                on_done(job, results[job.key], time.perf_counter() - started)
    return results


# ======================================================================================
# the demo
# ======================================================================================
def run_demo(
    out: str | Path = "tcod-demo",
    *,
    settings: DemoSettings | None = None,
    preset: str = "default",
    progress: bool = True,
    tune: bool = False,
) -> dict:
    """Run the demo into folder ``out``; returns the ``results.json`` content. With ``tune``,
    first run the learning rate x updates grid for every variant (:func:`choose_points`,
    written to ``out/grid.json``) and use its choices instead of the committed ones."""
    settings = settings or demo_settings(preset)
    out = Path(out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    commit = provenance.commit()  # the code the runs start with
    torch.set_num_threads(1)

    # 1. tokenizer, learnt from the texts of every split
    config = base_config(settings, out)
    prompter = build.build_prompter(config.env)
    tokenizer = build.build_tokenizer(config, prompter)
    tokenizer.save_pretrained(str(out / "tokenizer"))

    # 2-4. teachers, student starts and reference evaluations
    jobs = [
        _Job("teacher/narrow", job_narrow_teacher, (settings, out)),
        _Job("teacher/robust", job_robust_teacher, (settings, out), needs=("teacher/narrow",)),
    ]
    init_seeds = [*settings.seeds, *(s for s in settings.tuning_seeds if tune and s not in settings.seeds)]
    jobs += [_Job(f"student_init/seed{s}", job_student_init, (settings, out, s)) for s in init_seeds]
    for teacher in ("narrow", "robust"):
        jobs.append(
            _Job(
                f"eval/teacher_{teacher}", job_reference_eval,
                (settings, out, f"teacher_{teacher}", str(_teacher_dir(out, teacher)), None),
                needs=(f"teacher/{teacher}",),
            )  # fmt: skip
        )
    jobs += [
        _Job(
            f"eval/student_init/seed{s}", job_reference_eval,
            (settings, out, f"student_init_seed{s}", str(_student_init_dir(out, s)), "robust"),
            needs=(f"student_init/seed{s}", "teacher/robust"),
        )  # fmt: skip
        for s in settings.seeds
    ]
    # 5. with --tune: every variant at every grid point, on the tuning seeds (robust teacher)
    if tune:
        jobs += [
            _Job(
                f"tuning/{variant}/lr{lr:g}_updates{updates}/seed{s}", job_student_run,
                (settings, out, "robust", variant, s, (lr, updates)), needs=("teacher/robust", f"student_init/seed{s}"),
            )  # fmt: skip
            for variant in tuned_variants(settings)
            for lr, updates in settings.grid
            for s in settings.tuning_seeds
        ]
    runs = [
        (teacher, algorithm, s) for teacher in ("narrow", "robust") for algorithm in settings.algorithms(teacher) for s in settings.seeds
    ]
    bar = tqdm(total=len(jobs) + len(runs), desc="demo jobs", disable=not progress, unit="job")

    def on_done(job: _Job, result: dict, seconds: float) -> None:
        bar.update(1)
        line = f"{job.key}: done in {seconds:.0f} s"
        if job.key.startswith(("run/", "tuning/")):
            line += f"; success seen {result['success_seen']:.2f}, unseen {result['success_unseen']:.2f}"
        elif job.key.startswith("eval/"):
            evaluation = result["eval"] or {}
            line += f"; success seen {evaluation.get('success_seen', 0):.2f}, unseen {evaluation.get('success_unseen', 0):.2f}"
        if progress:
            bar.write(line)

    def run_jobs():  # 6. student runs, each variant at its point
        return [
            _Job(
                f"run/{teacher}/{algorithm}/seed{s}", job_student_run, (settings, out, teacher, algorithm, s),
                needs=(f"teacher/{teacher}", f"student_init/seed{s}"),
            )  # fmt: skip
            for teacher, algorithm, s in runs
        ]

    if tune:  # the runs need the grid's choices: they start once the grid is done
        results_by_job = _run_jobs(jobs, settings.workers, on_done)
        grid_results = choose_points(settings, [r for key, r in results_by_job.items() if key.startswith("tuning/")])
        grid_results.update(base_seed=settings.base_seed, commit=commit, versions=provenance.versions(), machine=provenance.machine())
        (out / "grid.json").write_text(json.dumps(grid_results, indent=1) + "\n")
        settings.tuned = grid_results
        results_by_job.update(_run_jobs(run_jobs(), settings.workers, on_done, done=results_by_job))
    else:
        results_by_job = _run_jobs(jobs + run_jobs(), settings.workers, on_done)
    bar.close()

    # 7. results
    results = _assemble(settings, out, tokenizer, results_by_job, time.perf_counter() - started, commit)
    _write_metrics(out, results_by_job)
    (out / "results.json").write_text(json.dumps(results, indent=1) + "\n")
    (out / "results.md").write_text(results_table(results))
    plots.plot_demo(out, results)
    return results


def _write_metrics(out: Path, results_by_job: dict[str, dict]) -> None:
    """Every record of every run, in one labelled JSONL file."""
    with open(out / "metrics.jsonl", "w") as handle:
        for key, result in results_by_job.items():
            for record in result.get("history", []):
                handle.write(json.dumps(record) + "\n")


# ======================================================================================
# statistics
# ======================================================================================
# Two-sided 95% quantiles of Student's t by degrees of freedom (beyond 30: the normal's).
_T95 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262, 10: 2.228,
        11: 2.201, 12: 2.179, 13: 2.160, 14: 2.145, 15: 2.131, 16: 2.120, 17: 2.110, 18: 2.101, 19: 2.093,
        20: 2.086, 21: 2.080, 22: 2.074, 23: 2.069, 24: 2.064, 25: 2.060, 26: 2.056, 27: 2.052, 28: 2.048,
        29: 2.045, 30: 2.042}  # fmt: skip


def mean_ci95(values: list[float]) -> tuple[float, float, float]:
    """Mean and its two-sided 95% t-interval over seeds (the interval is the mean alone
    for a single value)."""
    mean = statistics.fmean(values)
    if len(values) < 2:
        return mean, mean, mean
    half = _T95.get(len(values) - 1, 1.960) * statistics.stdev(values) / math.sqrt(len(values))
    return mean, mean - half, mean + half


def _std(values: list[float]) -> float:
    return statistics.stdev(values) if len(values) > 1 else 0.0


def _aggregate(runs: list[dict]) -> dict:
    seen = [r["success_seen"] for r in runs]
    unseen = [r["success_unseen"] for r in runs]
    slopes = [r["kl_escalation_slope"] for r in runs]
    slope_mean, lo, hi = mean_ci95(slopes)
    return {
        "success_seen": statistics.fmean(seen),
        "success_seen_std": _std(seen),
        "success_unseen": statistics.fmean(unseen),
        "success_unseen_std": _std(unseen),
        "final_kl": statistics.fmean(r["final_kl"] for r in runs),
        "kl_escalation_slope": slope_mean,
        "kl_escalation_slope_ci95": [lo, hi],
        "kl_by_turn": _mean_curve([r["kl_by_turn"] for r in runs]),
        "seeds": len(runs),
    }


def _mean_curve(curves: list[list[float]]) -> list[float]:
    """Per-turn mean over the curves that reach that turn."""
    length = max((len(c) for c in curves), default=0)
    return [statistics.fmean(c[k] for c in curves if len(c) > k) for k in range(length)]


def _paired_difference(runs: list[dict], baseline_runs: list[dict]) -> dict | None:
    """Success difference against the baseline, paired by seed (the same student start):
    mean and 95% t-interval over the seeds both have, per split."""
    by_seed = {r["seed"]: r for r in baseline_runs}
    pairs = [(r, by_seed[r["seed"]]) for r in runs if r["seed"] in by_seed]
    if not pairs:
        return None
    entry: dict[str, Any] = {"seeds": len(pairs)}
    for split in ("seen", "unseen"):
        mean, lo, hi = mean_ci95([a[f"success_{split}"] - b[f"success_{split}"] for a, b in pairs])
        entry[f"success_{split}_diff"] = mean
        entry[f"success_{split}_diff_ci95"] = [lo, hi]
    return entry


def _last_two_evals(runs: list[dict], split: str) -> dict | None:
    """Mean and spread over seeds of the last two evaluations' success. They agree when
    their means differ by no more than the larger of the seed spread and one task of the
    smaller evaluation (``1 / tasks``, the finest step an evaluation can take: at the
    ceiling every seed scores 1.0 and the spread alone is 0)."""
    curves = [[r2 for r2 in run["history"] if r2["kind"] == "eval" and f"success_{split}" in r2] for run in runs]
    if not curves or any(len(c) < 2 for c in curves):
        return None
    previous = [c[-2][f"success_{split}"] for c in curves]
    last = [c[-1][f"success_{split}"] for c in curves]
    spread = max(_std(previous), _std(last))
    tasks = min((c[i].get(f"tasks_{split}") or 0 for c in curves for i in (-2, -1)), default=0)
    resolution = 1.0 / tasks if tasks else 0.0
    return {
        "steps": [curves[0][-2]["step"], curves[0][-1]["step"]],
        "previous": statistics.fmean(previous),
        "last": statistics.fmean(last),
        "seed_std": spread,
        "one_task": resolution,
        "agree": abs(statistics.fmean(last) - statistics.fmean(previous)) <= max(spread, resolution),
    }


def _assemble(
    settings: DemoSettings, out: Path, tokenizer, by_job: dict[str, dict], wall_seconds: float, commit: str
) -> dict:
    runs = [result for key, result in by_job.items() if key.startswith("run/")]
    runs.sort(key=lambda r: (TEACHERS.index(r["teacher"]), list(settings.algorithms(r["teacher"])).index(r["algorithm"]), r["seed"]))
    reference = {key[len("eval/") :]: result["eval"] for key, result in by_job.items() if key.startswith("eval/")}
    inits = [reference[f"student_init/seed{s}"] for s in settings.seeds]
    headline: dict[str, Any] = {
        "seeds": settings.num_seeds,
        "teacher": {
            teacher: {
                "success_seen": reference[f"teacher_{teacher}"]["success_seen"],
                "success_unseen": reference[f"teacher_{teacher}"]["success_unseen"],
            }
            for teacher in TEACHERS
        },
        "student_init": {
            "success_seen": statistics.fmean(e["success_seen"] for e in inits),
            "success_seen_std": _std([e["success_seen"] for e in inits]),
            "success_unseen": statistics.fmean(e["success_unseen"] for e in inits),
            "success_unseen_std": _std([e["success_unseen"] for e in inits]),
            "final_kl": statistics.fmean(e["kl_seen/trajectory_mean"] for e in inits),
            "kl_by_turn": _mean_curve([e.get("kl_by_turn_seen", []) for e in inits]),
        },
    }
    for teacher in TEACHERS:
        of_teacher = [r for r in runs if r["teacher"] == teacher]
        headline[teacher] = {}
        for algorithm in settings.algorithms(teacher):
            variant = parse_variant(algorithm)
            mine = [r for r in of_teacher if r["algorithm"] == algorithm]
            entry = {"formulation": variant.formulation, **_aggregate(mine)}
            baseline = [r for r in of_teacher if r["algorithm"] == variant.opd_baseline]
            if algorithm != variant.opd_baseline and baseline:
                entry["vs_opd"] = {"opd": variant.opd_baseline, **_paired_difference(mine, baseline)}
            converged = {split: _last_two_evals(mine, split) for split in ("seen", "unseen")}
            if all(converged.values()):
                entry["last_two_evals"] = converged
            headline[teacher][algorithm] = entry
    settings_record = config_to_dict(settings)
    settings_record.pop("tuned", None)
    settings_record["eta"] = settings.pacing
    settings_record["algorithms"] = {
        name: _algorithm_settings(settings, name) for name in dict.fromkeys([*settings.robust_algorithms, *settings.narrow_algorithms])
    }
    settings_record["grid"] = {
        "points": [list(point) for point in settings.grid],
        "source": settings.tuned.get("source", "grid.json of this run (--tune)"),
        **{key: settings.tuned.get(key) for key in ("tuning_seeds", "selection", "seen_success", "chosen")},
    }
    setup = {
        "seeds": settings.seeds,
        "base_seed": settings.base_seed,
        "commit": commit,
        "versions": provenance.versions(),
        **provenance.machine(),
        "threads": 1,
        "workers": settings.workers,
        "wall_seconds": wall_seconds,
        "settings": settings_record,
        "vocab_size": len(tokenizer),
        "parameters": {
            "teacher": _count_parameters(_teacher_dir(out, "robust")),
            "student": _count_parameters(_student_init_dir(out, settings.seeds[0])),
        },
        "teachers": {"narrow": by_job["teacher/narrow"], "robust": by_job["teacher/robust"]},
        "student_inits": [by_job[f"student_init/seed{s}"] for s in settings.seeds],
        "student_init_evals": {f"seed{s}": reference[f"student_init/seed{s}"] for s in settings.seeds},
    }
    return {"setup": setup, "headline": headline, "verdicts": verdicts(headline, runs), "runs": runs}


def _algorithm_settings(settings: DemoSettings, name: str) -> dict:
    """What one variant's runs were given: the shared budget and its tuned point."""
    variant = parse_variant(name)
    lr, updates = settings.point(name)
    return {
        "algorithm": variant.algorithm,
        "formulation": variant.formulation,
        "lr": lr,
        "updates_per_step": updates,
        "steps": settings.steps,
        "episodes_per_step": settings.episodes_per_step,
        "rollout_temperature": settings.rollout_temperature_of(variant),
    }


def _count_parameters(folder: Path) -> int:
    from safetensors import safe_open

    total = 0
    for path in folder.glob("*.safetensors"):
        with safe_open(str(path), "pt") as handle:
            for key in handle.keys():
                total += math.prod(int(d) for d in handle.get_slice(key).get_shape())
    return total


# ======================================================================================
# verdicts and the table
# ======================================================================================
def _interval(entry: dict) -> str:
    lo, hi = entry["kl_escalation_slope_ci95"]
    return f"{entry['kl_escalation_slope']:+.4f} [{lo:+.4f}, {hi:+.4f}]"


def _display_name(variant: str) -> str:
    """``tcod_f2b@sampled`` -> ``TCOD-F2B (sampled)``."""
    algorithm, _, how = variant.partition("@")
    names = {"opd": "OPD", "guided_opd": "Guided-OPD", "grpo": "GRPO", "atod": "ATOD", "sod": "SOD"}
    name = names.get(algorithm, algorithm.upper().replace("_", "-"))
    return f"{name} ({how.replace('_', ' ')})" if how else name


def _diff_text(entry: dict) -> str:
    parts = []
    for split in ("seen", "unseen"):
        lo, hi = entry[f"success_{split}_diff_ci95"]
        parts.append(f"{split} {entry[f'success_{split}_diff']:+.2f} [{lo:+.2f}, {hi:+.2f}]")
    return ", ".join(parts)


def compare(entry: dict) -> str:
    """``beats``, ``loses to``, ``ties with`` or ``is mixed against`` the baseline of a
    paired difference: on each split the 95% interval lies above 0, below 0, or contains it."""
    signs = []
    for split in ("seen", "unseen"):
        lo, hi = entry[f"success_{split}_diff_ci95"]
        signs.append(1 if lo > 0 else -1 if hi < 0 else 0)
    if 1 in signs and -1 in signs:
        return "is mixed against"
    if 1 in signs:
        return "beats"
    if -1 in signs:
        return "loses to"
    return "ties with"


def verdicts(headline: dict, runs: list[dict] | None = None) -> list[str]:
    """The demo's claims in words, each computed from the headline numbers (and, given the
    runs, the paired comparisons of formulations)."""
    lines = []
    robust, narrow = headline.get("robust", {}), headline.get("narrow", {})
    init = headline["student_init"]
    teacher = headline["teacher"]["robust"]
    if "opd" in robust:
        opd = robust["opd"]
        for split in ("seen", "unseen"):
            gain = opd[f"success_{split}"] - init[f"success_{split}"]
            share = opd[f"success_{split}"] / teacher[f"success_{split}"] if teacher[f"success_{split}"] else float("nan")
            lines.append(
                f"OPD from the robust teacher, {split} tasks: success {init[f'success_{split}']:.2f} before -> "
                f"{opd[f'success_{split}']:.2f} after (gain {gain:+.2f}; {share:.0%} of the teacher's "
                f"{teacher[f'success_{split}']:.2f})."
            )
        last_two = opd.get("last_two_evals")
        if last_two:
            agree = all(v["agree"] for v in last_two.values())
            detail = "; ".join(
                f"{split} {v['previous']:.2f} at step {v['steps'][0]} and {v['last']:.2f} at step {v['steps'][1]} "
                f"(seed std {v['seed_std']:.2f}, one task {v.get('one_task', 0.0):.2f})"
                for split, v in last_two.items()
            )
            state = "agree within their seed spread or one task (converged)" if agree else "differ by more than their seed spread and one task (still moving)"
            lines.append(f"OPD from the robust teacher: its last two evaluations {state}: {detail}.")
    for teacher_name, entries in (("robust", robust), ("narrow", narrow)):
        for algorithm, entry in entries.items():
            if "vs_opd" not in entry:
                continue
            versus = entry["vs_opd"]
            lines.append(
                f"{_display_name(algorithm)} {compare(versus)} {_display_name(versus['opd'])} under the {teacher_name} "
                f"teacher (success difference paired by seed, 95% interval: {_diff_text(versus)})."
            )
    if runs:
        for teacher_name, entries in (("robust", robust), ("narrow", narrow)):
            for algorithm in entries:
                if "@" in algorithm or f"{algorithm}@sampled" not in entries:
                    continue
                mine = [r for r in runs if r["teacher"] == teacher_name and r["algorithm"] == f"{algorithm}@sampled"]
                theirs = [r for r in runs if r["teacher"] == teacher_name and r["algorithm"] == algorithm]
                difference = _paired_difference(mine, theirs)
                if difference:
                    lines.append(
                        f"{_display_name(algorithm)} in the papers' sampled-token formulation {compare(difference)} the "
                        f"full-vocabulary one under the {teacher_name} teacher ({_diff_text(difference)})."
                    )
    if "opd" in narrow:
        opd = narrow["opd"]
        lo, hi = opd["kl_escalation_slope_ci95"]
        if lo > 0:
            state = "shows KL escalation: the slope's 95% interval lies above 0"
        elif hi < 0:
            state = "shows KL falling with the turn index: the slope's 95% interval lies below 0"
        else:
            state = "shows no significant KL escalation: the slope's 95% interval contains 0"
        lines.append(f"OPD under the narrow teacher {state} (slope per turn {_interval(opd)}).")
    for teacher_name, entries in (("robust", robust), ("narrow", narrow)):
        for algorithm, entry in entries.items():
            baseline = entries.get(parse_variant(algorithm).opd_baseline)
            if not algorithm.startswith(("tcod_f2b", "tcod_b2f")) or baseline is None:
                continue
            opd_lo, opd_hi = baseline["kl_escalation_slope_ci95"]
            lo, hi = entry["kl_escalation_slope_ci95"]
            if hi < opd_lo:
                state = "flatter than OPD (its slope interval lies below OPD's)"
            elif lo > opd_hi:
                state = "steeper than OPD (its slope interval lies above OPD's)"
            else:
                state = "not distinguishable from OPD (the slope intervals overlap)"
            lines.append(
                f"{_display_name(algorithm)}'s KL escalation under the {teacher_name} teacher is {state}: "
                f"{_interval(entry)} vs OPD {_interval(baseline)}."
            )
    return lines


_DIVERGENCE_NAMES = {
    "reverse_kl": "reverse KL(student || teacher)",
    "forward_kl": "forward KL(teacher || student)",
    "jsd": "generalised Jensen-Shannon divergence",
}


def _fmt(value: float | None, digits: int = 2) -> str:
    return "n/a" if value is None else f"{value:.{digits}f}"


def results_table(results: dict) -> str:
    """``results.md``: the table of means over seeds, then the verdicts."""
    headline, setup = results["headline"], results["setup"]
    settings = setup["settings"]
    algorithms = settings.get("algorithms", {})
    lines = [
        "# Built-in demo: distillation in the key-and-door game",
        "",
        f"Means over {headline['seeds']} seeds ({', '.join(map(str, setup['seeds']))}), +- the standard deviation "
        "over seeds. vs OPD: the success difference to OPD in the same formulation under the same teacher, paired by "
        "seed (the same student start), with its 95% t-interval; the slope's interval is the 95% t-interval over seeds.",
        "",
        "| teacher | run | formulation | lr x updates | success seen | success unseen | vs OPD, seen | vs OPD, unseen "
        "| final KL (seen) | KL escalation slope per turn [95% CI] |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for teacher in TEACHERS:
        lines.append(
            f"| {teacher} | the teacher itself | | | {_fmt(headline['teacher'][teacher]['success_seen'])} | "
            f"{_fmt(headline['teacher'][teacher]['success_unseen'])} | | | | |"
        )
    init = headline["student_init"]
    lines.append(
        f"| - | student before distillation | | | {_fmt(init['success_seen'])} +- {_fmt(init['success_seen_std'])} | "
        f"{_fmt(init['success_unseen'])} +- {_fmt(init['success_unseen_std'])} | | | {_fmt(init['final_kl'], 3)} (vs robust) | |"
    )
    for teacher in TEACHERS:
        for algorithm, entry in headline.get(teacher, {}).items():
            point = algorithms.get(algorithm, {})
            budget = f"{point['lr']:g} x {point['updates_per_step']}" if point else ""
            versus = entry.get("vs_opd")
            diffs = [
                f"{versus[f'success_{s}_diff']:+.2f} [{versus[f'success_{s}_diff_ci95'][0]:+.2f}, {versus[f'success_{s}_diff_ci95'][1]:+.2f}]"
                if versus else ""
                for s in ("seen", "unseen")
            ]  # fmt: skip
            lines.append(
                f"| {teacher} | {algorithm} | {entry.get('formulation') or '-'} | {budget} | "
                f"{_fmt(entry['success_seen'])} +- {_fmt(entry['success_seen_std'])} | "
                f"{_fmt(entry['success_unseen'])} +- {_fmt(entry['success_unseen_std'])} | {diffs[0]} | {diffs[1]} | "
                f"{_fmt(entry['final_kl'], 3)} | {_interval(entry)} |"
            )
    lines += ["", "## Verdicts", ""] + [f"- {line}" for line in results["verdicts"]]
    grid = settings.get("grid", {})
    lines += [
        "",
        "## How it was measured",
        "",
        f"Training: every run has the same budget, {settings['steps']} steps of {settings['episodes_per_step']} episodes "
        f"(GRPO groups of {settings['grpo_group_size']} for the algorithms that have them), AdamW with a "
        f"{settings['lr_schedule']} schedule after {settings['warmup_steps']} warm-up steps; the learning rate and the "
        f"updates per step are each variant's best point of one grid shared by all, "
        f"{', '.join(f'{lr:g} x {u}' for lr, u in grid.get('points', []))} (chosen by final success on the seen split "
        f"with student seeds {grid.get('tuning_seeds')}, which are not the seeds reported here; {grid.get('source')}). "
        f"Curricula reach full depth by step {settings['eta'] * (settings['max_turns'] - 1)} (eta = {settings['eta']}). "
        f"Full-vocabulary formulation: the exact {_DIVERGENCE_NAMES[settings['divergence']]} on the student's tokens "
        f"through the fused op, rollouts at temperature {settings['rollout_temperature']}. Sampled formulation (the "
        "papers'): the advantage log q(a) - log p(a) of each sampled token in a PPO clipped surrogate, rollouts at "
        f"temperature {settings['policy_gradient_rollout_temperature']} (as GRPO's), so that the policy gradient is "
        "taken for the policy that sampled.",
        "",
        "Success: the share of held-out tasks won by the student playing every turn at temperature 0.4 "
        f"({settings['eval_tasks']} seen and {settings['eval_tasks']} unseen tasks per run at the end; evaluations "
        f"every {settings['eval_every']} steps on the first {settings['interim_eval_tasks']} of each). "
        "KL: the exact full-vocabulary reverse KL(student || teacher) per student token on the student's own "
        "evaluation episodes (seen tasks), against the run's own teacher; the slope is the least-squares slope of "
        "the per-(episode, turn) mean KL against the turn index. Later turns exist only in longer episodes, so "
        "the slope mixes the turn index with the kind of episode that lasts that long.",
        "",
        f"Teacher {setup['parameters']['teacher']} parameters, student {setup['parameters']['student']}, "
        f"vocabulary {setup['vocab_size']} tokens. {setup['cpu']}, {setup['workers']} worker processes of "
        f"{setup['threads']} thread; {setup['wall_seconds']:.0f} s in all. Commit {setup['commit']}; "
        f"torch {setup['versions']['torch']}, transformers {setup['versions']['transformers']}.",
        "",
    ]
    return "\n".join(lines)
