"""The demo's settings: its run kinds (:class:`Variant`, ``algorithm[@how]``), the learning
rate x updates grid and the committed points it chose (``demo_grid.json``), the curriculum
pacing, and :class:`DemoSettings` with its presets (:func:`demo_settings`)."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from tcod_fast.algorithms import Algorithm, algorithm_names, get_algorithm
from tcod_fast.tiny_models import TinyModelConfig

__all__ = [
    "FORMULATIONS",
    "GRID",
    "TEACHERS",
    "TUNED_POINTS_FILE",
    "DemoSettings",
    "Variant",
    "demo_settings",
    "load_tuned_points",
    "pacing_eta",
    "parse_variant",
]

TEACHERS = ("robust", "narrow")


#: How the training signal of an algorithm with a teacher term becomes a gradient.
FORMULATIONS = ("full_vocab", "sampled")
#: The committed grid results and the learning rate x updates point they chose per variant
#: (``tcod-fast demo --tune`` writes them again; see :func:`tcod_fast.demo.experiment.choose_points`).
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
        record: the algorithm's record (:class:`tcod_fast.algorithms.Algorithm`).
    """

    name: str
    algorithm: str
    formulation: str | None
    divergence: str | None = None
    record: Algorithm | None = field(default=None, compare=False, repr=False)

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
        return Variant(name, algorithm, None, record=record)
    if how == "sampled":
        return Variant(name, algorithm, "sampled", record=record)
    return Variant(name, algorithm, "full_vocab", how or None, record=record)


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
    # the games: the key-and-door game's rooms; the alchemy game's (``--mopd``) ingredients
    # per recipe (one more in its unseen split) and decoy jars
    max_rooms: int = 3
    alchemy_ingredients: int = 2
    alchemy_decoys: int = 1
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
    # The --mopd student holds two games: as wide as the teachers (two heads of 64). At the
    # single-game width (96), students of either teacher learnt alchemy's tool choice
    # (use flame / use spoon, copied from the card) on some seeds only and played it at chance
    # on others, within the same budget (measured on development seeds).
    mopd_student: TinyModelConfig = field(
        default_factory=lambda: TinyModelConfig(
            hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=2
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
            mopd_student=tiny_model,
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
