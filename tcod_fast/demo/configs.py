"""The run configs of the demo's jobs: the config every job starts from
(:func:`base_config`), the config of one student run (:func:`run_config`), and where the
teachers and student starts are saved."""

from __future__ import annotations

import copy
from dataclasses import replace
from pathlib import Path

from tcod_fast.demo.settings import DemoSettings, parse_variant
from tcod_fast.trainer.config import TrainConfig

__all__ = ["GAMES", "base_config", "game_kwargs", "run_config", "student_init_dir", "teacher_dir"]


#: The demo's games: the key-and-door game, and (``--mopd``) the alchemy game beside it.
GAMES = ("toy", "alchemy")


def game_kwargs(settings: DemoSettings, game: str) -> dict:
    """``env.kwargs`` of one of the demo's games (:data:`GAMES`) at the settings' sizes."""
    kwargs = {
        "max_steps": settings.max_turns,
        "num_tasks": {"train": settings.train_tasks, "valid_seen": settings.eval_tasks, "valid_unseen": settings.eval_tasks},
    }
    if game == "toy":
        kwargs["max_rooms"] = settings.max_rooms
    else:
        kwargs.update(max_ingredients=settings.alchemy_ingredients, num_decoys=settings.alchemy_decoys)
    return kwargs


def base_config(settings: DemoSettings, out: Path, game: str = "toy") -> TrainConfig:
    """The run config every job starts from (the game, prompt, tokenizer, sizes and the
    budget every algorithm shares: steps, episodes per step, schedule, evaluations)."""
    config = TrainConfig()
    config.env.name = game
    config.env.kwargs = game_kwargs(settings, game)
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


def teacher_dir(out: Path, teacher: str, game: str = "toy") -> Path:
    """The folder of the ``narrow`` or ``robust`` teacher's model (of ``game``, for the
    games beside the key-and-door one)."""
    return out / "models" / (f"teacher_{teacher}" if game == "toy" else f"teacher_{game}_{teacher}")


def student_init_dir(out: Path, seed: int) -> Path:
    """The folder of the warm-started student of ``seed``."""
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
    if variant.record.min_group_size > 1:
        # GRPO groups: the same number of episodes per step, as groups per task
        config.curriculum.episodes_per_task = settings.grpo_group_size
        config.rollout.tasks_per_step = max(settings.episodes_per_step // settings.grpo_group_size, 1)
    config.model.teacher_path = str(teacher_dir(out, teacher))
    config.model.student_path = str(student_init_dir(out, seed))
    name = f"{teacher}/{algorithm}/seed{seed}"
    config.logging.run_name = name
    config.logging.tags = {"teacher": teacher, "seed": seed, "evaluates": "student", "demo_run": algorithm}
    if variant.formulation is not None:
        config.logging.tags["formulation"] = variant.formulation
    if variant.formulation == "full_vocab":  # the divergence is the teacher term's
        config.logging.tags["divergence"] = config.loss.divergence
    config.trainer.output_dir = str(out / "runs" / teacher / algorithm / f"seed{seed}")
    return config
