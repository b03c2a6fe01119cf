"""Training configuration: nested dataclasses, loadable from YAML/TOML, overridable by ``--set``.

One :class:`TrainConfig` holds every knob of a run, grouped in sections::

    trainer:     steps, optimiser, micro-batching, device, output folder, cadences
    model:       student / teacher (local path or a tiny in-code config), precision
    env:         which environment, splits, prompt layout
    rollout:     tasks per step, sampling, reply length
    loss:        estimator (full vocabulary or sampled-token k1/k3 + PPO), coefficients
    curriculum:  the algorithm and its schedule (``tcod_fast.curriculum.CurriculumConfig``)
    eval:        held-out tasks, temperature
    logging:     JSONL, TensorBoard, progress bars

Files: ``load_config("run.yaml")`` or ``.toml``; keys not in the dataclasses are errors
(a typo must not silently fall back to a default). Command line: ``--set trainer.lr=1e-5``;
the value is parsed as YAML (``true``, ``null``, ``[1, 2]``, numbers) and converted to the
field's type.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import math
import sys
import typing
from dataclasses import dataclass, field, fields, is_dataclass
from pathlib import Path
from typing import Any

from tcod_fast.algorithms import ALGORITHMS, get_algorithm
from tcod_fast.curriculum import CurriculumConfig
from tcod_fast.errors import ConfigError

__all__ = [
    "ALGORITHMS",
    "ESTIMATORS",
    "EnvSettings",
    "EvalSettings",
    "LoggingSettings",
    "LossSettings",
    "ModelSettings",
    "RolloutSettings",
    "TinyModelSpec",
    "TrainConfig",
    "TrainerSettings",
    "apply_overrides",
    "config_from_dict",
    "config_to_dict",
    "load_config",
    "save_config",
]

ESTIMATORS = ("full_vocab", "sampled")
DIVERGENCES = ("reverse_kl", "forward_kl", "jsd")
KERNEL_BACKENDS = ("auto", "native", "triton", "torch")
ENV_NAMES = ("toy", "twx-<game>", "scienceworld", "alfworld")


@dataclass
class TinyModelSpec:
    """A random-init Llama/Qwen2 built in code (``tcod_fast.tiny_models``); plain types only
    so it round-trips through YAML. ``vocab_size`` comes from the tokenizer."""

    architecture: str = "llama"
    hidden_size: int = 64
    intermediate_size: int = 128
    num_hidden_layers: int = 2
    num_attention_heads: int = 4
    num_key_value_heads: int = 2
    max_position_embeddings: int = 4096
    seed: int = 0


@dataclass
class ModelSettings:
    """Student and teacher.

    Attributes:
        student_path / teacher_path: a local Hugging Face model folder; ``None`` builds the
            tiny model of ``student_tiny`` / ``teacher_tiny`` with random weights (tests),
            or, for the teacher, loads nothing when the algorithm needs none (``grpo``).
        tokenizer_path: a local tokenizer folder; ``None`` uses the student path's tokenizer
            or, for tiny models, builds a word-level tokenizer from the environment's texts.
        teacher_dtype: ``float32``, ``bfloat16`` or ``float16``: the frozen teacher may run in
            lower precision.
        activation_checkpointing: recompute the student's activations in backward.
    """

    student_path: str | None = None
    teacher_path: str | None = None
    tokenizer_path: str | None = None
    student_tiny: TinyModelSpec = field(default_factory=lambda: TinyModelSpec(hidden_size=64, seed=1))
    teacher_tiny: TinyModelSpec = field(
        default_factory=lambda: TinyModelSpec(hidden_size=96, intermediate_size=192, seed=2)
    )
    teacher_dtype: str = "float32"
    activation_checkpointing: bool = False


@dataclass
class EnvSettings:
    """Which environment, and how the agent sees it.

    Attributes:
        name: ``toy``, ``twx-<game>``, ``scienceworld`` or ``alfworld`` (``make_env``).
        kwargs: passed to the environment's config dataclass.
        train_split / seen_split / unseen_split: task splits.
        num_train_tasks: use only the first N training tasks (``None``: all).
        pool_workers: 0 runs environments in this process; N > 0 runs them in N worker
            processes (:class:`tcod_fast.envs.EnvPool`; use it for Java engines).
        context_mode: ``append`` (the chat grows turn by turn, one row per episode) or
            ``window`` (the papers' last-k history prompt, one row per turn).
        history_length: k of the windowed prompt.
        think: ask for ``<think></think>`` before the action.
        show_admissible_actions: list admissible actions in the prompt.
        max_admissible_actions: cap on the listed actions.
        prompt_style: ``paper`` (the papers' prompt template) or ``compact`` (the same facts
            in four short lines; about half the tokens, for tiny CPU models).
        vocab_tasks_per_split: how many tasks per split the in-code tokenizer plays with the
            expert to learn its vocabulary (each costs a full expert episode: keep it small
            for slow engines such as ScienceWorld).
    """

    name: str = "toy"
    kwargs: dict = field(default_factory=dict)
    train_split: str = "train"
    seen_split: str = "valid_seen"
    unseen_split: str = "valid_unseen"
    num_train_tasks: int | None = None
    pool_workers: int = 0
    context_mode: str = "append"
    history_length: int = 2
    think: bool = False
    show_admissible_actions: bool = True
    max_admissible_actions: int | None = None
    prompt_style: str = "paper"
    vocab_tasks_per_split: int = 200


@dataclass
class RolloutSettings:
    """How training episodes are sampled.

    Attributes:
        tasks_per_step: distinct tasks per training step (each played
            ``curriculum.episodes_per_task`` times: the GRPO group size).
        temperature / top_p: student sampling (the papers roll out at temperature 1.0).
        teacher_temperature: sampling of teacher-played turns (Guided-OPD, B2F with the
            teacher playing the prefix).
        max_new_tokens: longest reply per turn.
    """

    tasks_per_step: int = 8
    temperature: float = 1.0
    top_p: float = 1.0
    teacher_temperature: float = 0.4
    max_new_tokens: int = 24


@dataclass
class LossSettings:
    """The training signal.

    Attributes:
        estimator: ``full_vocab``: exact KL over the vocabulary with the teacher in process
            (``fused_linear_turn_kl`` on hidden states + LM heads when ``fused_linear``
            allows, else ``fused_turn_kl`` on logits); ``sampled``: the TCOD reference
            code's sampled-token estimator used as an advantage in a PPO clipped surrogate.
        sampled_kl: ``k1`` (advantage ``kl_coef (log q - log p_old)``) or ``k3`` (advantage
            ``-kl_coef k3``, never positive); ``sampled`` estimator only.
        divergence: ``reverse_kl``, ``forward_kl`` or ``jsd`` (full vocabulary only).
        jsd_beta: beta of the generalised JSD.
        fused_linear: ``auto`` (use the fused-linear op when the op exists and the full
            vocabulary KL is the only term), ``always`` or ``never`` (not on/off: YAML 1.1
            reads those as booleans).
        backend: kernel backend of the fused ops (``auto``, ``native``, ``triton``, ``torch``).
        kl_coef: OPD coefficient of the opd/tcod/guided algorithms.
        clip_low / clip_high / dual_clip: PPO clipping (TCOD: 0.2, 0.2, 3.0).
        loss_agg: ``token_mean``, ``seq_mean_token_mean`` or ``seq_mean_token_sum`` (PPO).
        sod_coef / sod_delta: SOD's ``c`` and ``delta``.
        grpo_eps: added to the group std.
    """

    estimator: str = "full_vocab"
    sampled_kl: str = "k1"
    divergence: str = "reverse_kl"
    jsd_beta: float = 0.5
    fused_linear: str = "auto"
    backend: str = "auto"
    kl_coef: float = 1.0
    clip_low: float = 0.2
    clip_high: float | None = None
    dual_clip: float | None = 3.0
    loss_agg: str = "token_mean"
    sod_coef: float = 1.0
    sod_delta: float = 0.2
    grpo_eps: float = 1e-6


@dataclass
class TrainerSettings:
    """Optimisation, devices and cadences.

    Attributes:
        steps: training steps (one rollout batch each).
        lr / weight_decay / betas / eps: AdamW.
        lr_schedule: ``constant``, ``linear`` (decay to 0) or ``cosine``; after
            ``warmup_steps`` of linear warm-up.
        max_grad_norm: gradient clipping (``None``/0: off).
        updates_per_step: optimiser updates per rollout batch (the batch is split into this
            many mini-batches; with PPO, old log-probs come from the rollout policy).
        micro_batch_tokens: token budget of one forward/backward (padded rows x length);
            gradients are accumulated over micro-batches. A micro-batch holds whole
            trajectories, so a trajectory longer than the budget is a micro-batch of its own.
        seed: seeds task sampling, rollouts and model init of tiny models.
        device: ``auto`` (CUDA if available), ``cpu`` or ``cuda``.
        bf16: bfloat16 autocast for the model forwards: ``auto`` (CUDA only), ``always``, ``never``.
        output_dir: run folder (metrics, checkpoints, plots).
        eval_every: evaluate every N steps (0: only at the end).
        checkpoint_every: checkpoint every N steps (0: only at the end); a run killed
            between checkpoints loses at most this many steps when resumed.
        keep_checkpoints: newest checkpoints kept on disk (>= 1; with 2, a checkpoint that
            cannot be read falls back to the one before it).
        num_threads: torch CPU threads (``None``: torch's default).
    """

    steps: int = 20
    lr: float = 1e-4
    weight_decay: float = 0.0
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    lr_schedule: str = "constant"
    warmup_steps: int = 0
    max_grad_norm: float | None = 1.0
    updates_per_step: int = 1
    micro_batch_tokens: int = 8192
    seed: int = 0
    device: str = "auto"
    bf16: str = "auto"
    output_dir: str = "runs/tcod"
    eval_every: int = 0
    checkpoint_every: int = 10
    keep_checkpoints: int = 2
    num_threads: int | None = None


@dataclass
class EvalSettings:
    """Held-out evaluation at full depth (student plays every turn).

    Attributes:
        num_tasks: tasks per split (seen and unseen).
        temperature: sampling temperature (0.4 in the papers).
        seed: sampling seed, fixed so evaluations are comparable across steps and runs.
        kl_by_turn: also measure the teacher-student KL by turn on the eval episodes.
        kl_by_turn_splits: the splits (``seen``, ``unseen``) whose episodes the KL is
            measured on.
        kl_by_turn_final_only: measure the KL at the final evaluation only (evaluations
            along the way then report success and turns, at a fraction of the cost).
        at_start: evaluate before the first step too.
    """

    num_tasks: int = 16
    temperature: float = 0.4
    seed: int = 12345
    kl_by_turn: bool = True
    kl_by_turn_splits: tuple[str, ...] = ("seen", "unseen")
    kl_by_turn_final_only: bool = False
    at_start: bool = False


@dataclass
class LoggingSettings:
    """Where metrics go.

    Attributes:
        jsonl: write ``metrics.jsonl`` (one record per step, one per evaluation).
        tensorboard: also write TensorBoard events (needs the ``tensorboard`` package).
        progress: tqdm bars for rollouts, training and evaluation.
        run_name: label of the run in logs and plots (default: the algorithm).
        tags: extra keys written into every metrics record (they may override
            ``algorithm``, e.g. ``{"algorithm": None, "evaluates": "teacher"}`` for a run that
            only evaluates a teacher).
    """

    jsonl: bool = True
    tensorboard: bool = False
    progress: bool = True
    run_name: str | None = None
    tags: dict = field(default_factory=dict)


@dataclass
class TrainConfig:
    """Everything one training run needs. The algorithm is ``curriculum.algorithm``."""

    trainer: TrainerSettings = field(default_factory=TrainerSettings)
    model: ModelSettings = field(default_factory=ModelSettings)
    env: EnvSettings = field(default_factory=EnvSettings)
    rollout: RolloutSettings = field(default_factory=RolloutSettings)
    loss: LossSettings = field(default_factory=LossSettings)
    curriculum: CurriculumConfig = field(default_factory=lambda: CurriculumConfig(max_turns=12, eta=2))
    eval: EvalSettings = field(default_factory=EvalSettings)
    logging: LoggingSettings = field(default_factory=LoggingSettings)

    @property
    def algorithm(self) -> str:
        return self.curriculum.algorithm

    def validate(self) -> None:
        """Raise :class:`~tcod_fast.errors.ConfigError` (a ``ValueError``) naming the field,
        what was expected and what was given.

        Every field the type alone does not bound is checked: numbers are finite and in
        range, choices are known, and settings the run would silently ignore in this
        combination are refused. Model and tokenizer folders are checked by
        :meth:`check_paths` (it needs the file system).
        """
        trainer, model, env, rollout, loss, evaluation = (
            self.trainer, self.model, self.env, self.rollout, self.loss, self.eval
        )
        checks = [
            (self.loss.estimator in ESTIMATORS, f"loss.estimator must be one of {ESTIMATORS}, got {self.loss.estimator!r}"),
            (self.loss.sampled_kl in ("k1", "k3"), f"loss.sampled_kl must be 'k1' or 'k3', got {self.loss.sampled_kl!r}"),
            (self.loss.fused_linear in ("auto", "always", "never"), f"loss.fused_linear must be auto/always/never, got {self.loss.fused_linear!r}"),
            (self.trainer.lr_schedule in ("constant", "linear", "cosine"), f"trainer.lr_schedule must be constant/linear/cosine, got {self.trainer.lr_schedule!r}"),
            (self.trainer.device in ("auto", "cpu", "cuda"), f"trainer.device must be auto/cpu/cuda, got {self.trainer.device!r}"),
            (self.trainer.bf16 in ("auto", "always", "never"), f"trainer.bf16 must be auto/always/never, got {self.trainer.bf16!r}"),
            (self.model.teacher_dtype in ("float32", "bfloat16", "float16"), f"model.teacher_dtype must be float32/bfloat16/float16, got {self.model.teacher_dtype!r}"),
            (self.env.context_mode in ("append", "window"), f"env.context_mode must be 'append' or 'window', got {self.env.context_mode!r}"),
            (self.env.prompt_style in ("paper", "compact"), f"env.prompt_style must be 'paper' or 'compact', got {self.env.prompt_style!r}"),
            (self.trainer.steps >= 0, f"trainer.steps must be >= 0, got {self.trainer.steps}"),
            (self.trainer.updates_per_step >= 1, f"trainer.updates_per_step must be >= 1, got {self.trainer.updates_per_step}"),
            (self.trainer.micro_batch_tokens >= 1, f"trainer.micro_batch_tokens must be >= 1, got {self.trainer.micro_batch_tokens}"),
            (self.rollout.tasks_per_step >= 1, f"rollout.tasks_per_step must be >= 1, got {self.rollout.tasks_per_step}"),
            (self.eval.num_tasks >= 0, f"eval.num_tasks must be >= 0, got {self.eval.num_tasks}"),
            # -- trainer
            (trainer.lr > 0, f"trainer.lr must be > 0, got {trainer.lr}"),
            (trainer.weight_decay >= 0, f"trainer.weight_decay must be >= 0, got {trainer.weight_decay}"),
            (all(0 <= b < 1 for b in trainer.betas), f"trainer.betas must both be in [0, 1), got {list(trainer.betas)}"),
            (trainer.eps > 0, f"trainer.eps must be > 0, got {trainer.eps}"),
            (trainer.warmup_steps >= 0, f"trainer.warmup_steps must be >= 0, got {trainer.warmup_steps}"),
            (
                trainer.max_grad_norm is None or trainer.max_grad_norm >= 0,
                f"trainer.max_grad_norm must be >= 0 (0 or null: no clipping), got {trainer.max_grad_norm}",
            ),
            (trainer.seed >= 0, f"trainer.seed must be >= 0, got {trainer.seed}"),
            (bool(str(trainer.output_dir).strip()), f"trainer.output_dir must name a folder, got {trainer.output_dir!r}"),
            (trainer.eval_every >= 0, f"trainer.eval_every must be >= 0 (0: only at the end), got {trainer.eval_every}"),
            (
                trainer.checkpoint_every >= 0,
                f"trainer.checkpoint_every must be >= 0 (0: only at the end), got {trainer.checkpoint_every}",
            ),
            (trainer.keep_checkpoints >= 1, f"trainer.keep_checkpoints must be >= 1, got {trainer.keep_checkpoints}"),
            (
                trainer.num_threads is None or trainer.num_threads >= 1,
                f"trainer.num_threads must be >= 1 (null: torch's default), got {trainer.num_threads}",
            ),
            # -- env
            (_is_known_env(env.name), f"env.name must be one of {', '.join(ENV_NAMES)}, got {env.name!r}"),
            (
                env.num_train_tasks is None or env.num_train_tasks >= 1,
                f"env.num_train_tasks must be >= 1 (null: all), got {env.num_train_tasks}",
            ),
            (env.pool_workers >= 0, f"env.pool_workers must be >= 0 (0: in this process), got {env.pool_workers}"),
            (env.history_length >= 0, f"env.history_length must be >= 0, got {env.history_length}"),
            (
                env.max_admissible_actions is None or env.max_admissible_actions >= 0,
                f"env.max_admissible_actions must be >= 0 (null: no cap), got {env.max_admissible_actions}",
            ),
            (env.vocab_tasks_per_split >= 1, f"env.vocab_tasks_per_split must be >= 1, got {env.vocab_tasks_per_split}"),
            # -- rollout
            (rollout.temperature >= 0, f"rollout.temperature must be >= 0 (0: greedy), got {rollout.temperature}"),
            (0 < rollout.top_p <= 1, f"rollout.top_p must be in (0, 1], got {rollout.top_p}"),
            (
                rollout.teacher_temperature >= 0,
                f"rollout.teacher_temperature must be >= 0 (0: greedy), got {rollout.teacher_temperature}",
            ),
            (rollout.max_new_tokens >= 1, f"rollout.max_new_tokens must be >= 1, got {rollout.max_new_tokens}"),
            # -- loss
            (loss.divergence in DIVERGENCES, f"loss.divergence must be one of {', '.join(DIVERGENCES)}, got {loss.divergence!r}"),
            (loss.backend in KERNEL_BACKENDS, f"loss.backend must be one of {', '.join(KERNEL_BACKENDS)}, got {loss.backend!r}"),
            (0 <= loss.jsd_beta <= 1, f"loss.jsd_beta must be in [0, 1], got {loss.jsd_beta}"),
            (loss.kl_coef >= 0, f"loss.kl_coef must be >= 0, got {loss.kl_coef}"),
            (0 <= loss.clip_low < 1, f"loss.clip_low must be in [0, 1), got {loss.clip_low}"),
            (loss.clip_high is None or loss.clip_high >= 0, f"loss.clip_high must be >= 0 (null: clip_low), got {loss.clip_high}"),
            (loss.dual_clip is None or loss.dual_clip > 1, f"loss.dual_clip must be > 1 (null: off), got {loss.dual_clip}"),
            (
                loss.loss_agg == "token_mean",
                f"loss.loss_agg must be 'token_mean' (the trainer's PPO terms aggregate by token mean), got {loss.loss_agg!r}",
            ),
            (loss.sod_coef >= 0, f"loss.sod_coef must be >= 0, got {loss.sod_coef}"),
            (loss.sod_delta >= 0, f"loss.sod_delta must be >= 0, got {loss.sod_delta}"),
            (loss.grpo_eps > 0, f"loss.grpo_eps must be > 0, got {loss.grpo_eps}"),
            (
                loss.divergence == "reverse_kl" or loss.estimator == "full_vocab",
                f"loss.divergence={loss.divergence!r} needs loss.estimator='full_vocab' (the sampled estimator is "
                f"reverse KL only), got loss.estimator={loss.estimator!r}",
            ),
            (
                loss.sampled_kl == "k1" or loss.estimator == "sampled",
                f"loss.sampled_kl={loss.sampled_kl!r} needs loss.estimator='sampled' (the full-vocabulary estimator "
                f"is exact), got loss.estimator={loss.estimator!r}",
            ),
            # -- eval
            (evaluation.temperature >= 0, f"eval.temperature must be >= 0 (0: greedy), got {evaluation.temperature}"),
            (
                set(evaluation.kl_by_turn_splits) <= {"seen", "unseen"},
                f"eval.kl_by_turn_splits must list 'seen' and/or 'unseen', got {list(evaluation.kl_by_turn_splits)}",
            ),
        ]
        checks[:0] = [(False, message) for message in _non_finite_numbers(self)]
        for tiny_name, path in (("student_tiny", model.student_path), ("teacher_tiny", model.teacher_path)):
            if path is None:
                checks += _tiny_model_checks(f"model.{tiny_name}", getattr(model, tiny_name))
        for ok, message in checks:
            if not ok:
                raise ConfigError(message)
        min_group_size = get_algorithm(self.curriculum.algorithm).min_group_size
        if self.curriculum.episodes_per_task < min_group_size:
            # A GRPO group of one has advantage 0: the RL term would silently vanish.
            raise ConfigError(
                f"{self.curriculum.algorithm} needs curriculum.episodes_per_task >= {min_group_size} (GRPO groups), "
                f"got {self.curriculum.episodes_per_task}"
            )
        _check_curriculum_schedules(self.curriculum)
        _check_env_kwargs(self.env)

    def check_paths(self) -> None:
        """Raise :class:`~tcod_fast.errors.ConfigError` unless every model and tokenizer
        path names a local folder that holds one (``config.json`` for a model, a tokenizer
        file for a tokenizer). Nothing is loaded."""
        model = self.model
        for name, path in (("model.student_path", model.student_path), ("model.teacher_path", model.teacher_path)):
            if path is not None:
                _check_folder(name, path, ("config.json",), "a local Hugging Face model folder with config.json")
        if model.tokenizer_path is not None:
            _check_folder(
                "model.tokenizer_path",
                model.tokenizer_path,
                ("tokenizer.json", "tokenizer_config.json", "vocab.json", "tokenizer.model"),
                "a local tokenizer folder (tokenizer.json or tokenizer_config.json)",
            )


def _check_folder(name: str, path: str, marker_files: tuple[str, ...], expected: str) -> None:
    folder = Path(path).expanduser()
    if not folder.exists():
        raise ConfigError(f"{name} must be {expected}, got {str(path)!r}, which does not exist")
    if not folder.is_dir():
        raise ConfigError(f"{name} must be {expected}, got {str(path)!r}, which is a file, not a folder")
    if not any((folder / marker).is_file() for marker in marker_files):
        raise ConfigError(f"{name} must be {expected}, got {str(path)!r}, which has no {marker_files[0]}")


#: The config dataclass ``env.kwargs`` goes to, per env family (``make_env``).
_ENV_CONFIG_CLASSES = {
    "toy": ("tcod_fast.envs.toy", "KeyDoorConfig"),
    "twx": ("tcod_fast.envs.textworld_express", "TextWorldExpressConfig"),
    "scienceworld": ("tcod_fast.envs.scienceworld", "ScienceWorldConfig"),
    "alfworld": ("tcod_fast.envs.alfworld.adapter", "AlfWorldConfig"),
}


def _check_env_kwargs(env: EnvSettings) -> None:
    """``env.kwargs`` keys must be fields of the env's config (a typo would otherwise fail
    deep inside the environment, after the run folder exists)."""
    family = "twx" if env.name.startswith("twx-") else env.name
    if family not in _ENV_CONFIG_CLASSES or not env.kwargs:
        return
    import importlib

    module_name, class_name = _ENV_CONFIG_CLASSES[family]
    try:
        config_class = getattr(importlib.import_module(module_name), class_name)
    except ImportError:  # the env's optional dependencies are missing: make_env will say so
        return
    allowed = [f.name for f in fields(config_class) if not (family == "twx" and f.name == "game")]
    for key in env.kwargs:
        if key not in allowed:
            close = difflib.get_close_matches(str(key), allowed, n=1)
            hint = f" (did you mean env.kwargs.{close[0]}?)" if close else ""
            raise ConfigError(
                f"unknown key env.kwargs.{key}{hint}: expected a field of {class_name} for env {env.name!r} "
                f"({', '.join(allowed)}), got {key!r}"
            )


def _is_known_env(name: str) -> bool:
    return name in ("toy", "scienceworld", "alfworld") or (name.startswith("twx-") and len(name) > len("twx-"))


def _non_finite_numbers(config) -> list[str]:
    """One message per float field (at any depth) holding NaN or infinity."""
    messages = []

    def visit(node, where):
        if is_dataclass(node):
            for f in fields(node):
                visit(getattr(node, f.name), f"{where}.{f.name}" if where else f.name)
        elif isinstance(node, tuple):
            for index, item in enumerate(node):
                visit(item, f"{where}[{index}]")
        elif isinstance(node, float) and not math.isfinite(node):
            messages.append(f"{where} must be a finite number, got {node}")

    visit(config, "")
    return messages


def _tiny_model_checks(where: str, spec: TinyModelSpec) -> list[tuple[bool, str]]:
    sizes = ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads", "max_position_embeddings")
    checks = [(spec.architecture in ("llama", "qwen2"), f"{where}.architecture must be 'llama' or 'qwen2', got {spec.architecture!r}")]
    checks += [(getattr(spec, name) >= 1, f"{where}.{name} must be >= 1, got {getattr(spec, name)}") for name in sizes]
    if spec.num_attention_heads >= 1 and spec.num_key_value_heads >= 1:
        checks += [
            (
                spec.hidden_size % spec.num_attention_heads == 0,
                f"{where}.hidden_size must be a multiple of num_attention_heads ({spec.num_attention_heads}), got {spec.hidden_size}",
            ),
            (
                spec.num_attention_heads % spec.num_key_value_heads == 0,
                f"{where}.num_attention_heads must be a multiple of num_key_value_heads ({spec.num_key_value_heads}), "
                f"got {spec.num_attention_heads}",
            ),
        ]
    return checks


def _check_curriculum_schedules(curriculum: CurriculumConfig) -> None:
    """Build the curriculum's schedules (pacing, Guided-OPD, ATOD) once so their range
    checks run now, not at the first training step."""
    from tcod_fast.curriculum import CurriculumSampler

    try:
        CurriculumSampler(curriculum)
    except (TypeError, ValueError) as exc:
        message = str(exc)
        for name, field_name in _CURRICULUM_SCHEDULE_FIELDS:
            if message.startswith(name + " "):
                raise ConfigError(f"curriculum.{field_name}{message[len(name):]}") from None
        raise ConfigError(f"curriculum: {message}") from None


#: (name in the schedule's own error message, the curriculum field it comes from)
_CURRICULUM_SCHEDULE_FIELDS = (
    ("LinearPacing.eta", "eta"),
    ("SmoothPacing.eta", "eta"),
    ("StagedPacing.stage_starts", "stage_starts"),
    ("pacing", "pacing"),
    ("shape", "guided_shape"),
    ("p_init", "guided_p_init"),
    ("p_final", "guided_p_final"),
    ("decay_steps", "guided_decay_steps"),
    ("warmup_steps", "guided_warmup_steps"),
    ("exp_rate", "guided_exp_rate"),
    ("anneal_steps", "atod_anneal_steps"),
    ("kappa_min", "atod_kappa_min"),
)


# --------------------------------------------------------------------------------------
# dict <-> dataclass
# --------------------------------------------------------------------------------------
def _field_types(cls) -> dict[str, Any]:
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in fields(cls)}


def _convert(value: Any, annotation: Any, where: str) -> Any:
    """Convert plain data (from YAML/TOML/JSON/--set) to ``annotation``; errors name ``where``."""
    origin = typing.get_origin(annotation)
    args = typing.get_args(annotation)
    if annotation is Any:
        return value
    if origin in (typing.Union, getattr(__import__("types"), "UnionType", typing.Union)):
        if value is None and type(None) in args:
            return None
        options = [option for option in args if option is not type(None)]
        errors = []
        for option in options:
            try:
                return _convert(value, option, where)
            except (TypeError, ValueError) as exc:
                errors.append(str(exc))
        if len(options) == 1 and ", got" in errors[0]:
            # "x: expected a number, got 'abc'" -> "x: expected a number or null, got 'abc'"
            raise ConfigError(errors[0].replace(", got", " or null, got", 1) if type(None) in args else errors[0])
        raise ConfigError(f"{where}: expected {annotation}, got {value!r}")
    if is_dataclass(annotation):
        if isinstance(value, annotation):
            return value
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping for {annotation.__name__}, got {value!r}")
        return _dataclass_from_dict(annotation, value, where)
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where}: expected a list, got {value!r}")
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(_convert(v, args[0], f"{where}[{i}]") for i, v in enumerate(value))
        if args and len(args) != len(value):
            raise ConfigError(f"{where}: expected {len(args)} values, got {len(value)}: {value!r}")
        return tuple(_convert(v, a, f"{where}[{i}]") for i, (v, a) in enumerate(zip(value, args or [Any] * len(value))))
    if origin is list:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where}: expected a list, got {value!r}")
        return [_convert(v, args[0] if args else Any, f"{where}[{i}]") for i, v in enumerate(value)]
    if origin is dict or annotation is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping, got {value!r}")
        return dict(value)
    if annotation is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{where}: expected true/false, got {value!r}")
    if annotation in (int, float) and isinstance(value, str):
        # PyYAML follows YAML 1.1, where "1e-5" (no dot) is a string, not a number.
        try:
            value = float(value) if annotation is float else int(value)
        except ValueError:
            raise ConfigError(f"{where}: expected a number, got {value!r}") from None
    if annotation is int:
        if isinstance(value, bool) or not isinstance(value, (int, float)) or int(value) != value:
            raise ConfigError(f"{where}: expected an integer, got {value!r}")
        return int(value)
    if annotation is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{where}: expected a number, got {value!r}")
        return float(value)
    if annotation is str:
        if not isinstance(value, str):
            raise ConfigError(f"{where}: expected a string, got {value!r}")
        return value
    return value


def _dataclass_from_dict(cls, data: dict, where: str = ""):
    types = _field_types(cls)
    unknown = sorted(set(data) - set(types))
    if unknown:
        raise ConfigError(_unknown_key_message(where, str(unknown[0]), list(types)))
    kwargs = {name: _convert(value, types[name], f"{where}.{name}" if where else name) for name, value in data.items()}
    try:
        return cls(**kwargs)
    except (TypeError, ValueError) as exc:
        # A section's own checks (e.g. CurriculumConfig's) name the field without its section.
        message = str(exc)
        field_name = message.split(" ", 1)[0]
        prefix = f"{where}." if where and field_name in types else f"{where}: " if where else ""
        raise ConfigError(prefix + message) from None


def _unknown_key_message(where: str, key: str, options: list[str], context: str = "") -> str:
    """``trainer.lrr`` -> "unknown config key trainer.lrr (did you mean trainer.lr?): expected
    a key of trainer (steps, lr, ...), got 'lrr'"."""
    prefix = f"{where}." if where else ""
    close = difflib.get_close_matches(key, options, n=1)
    hint = f" (did you mean {prefix}{close[0]}?)" if close else ""
    section = f"a key of {where}" if where else "a section"
    return f"unknown config key {prefix}{key}{context}{hint}: expected {section} ({', '.join(options)}), got {key!r}"


def config_from_dict(data: dict) -> TrainConfig:
    """Build a :class:`TrainConfig` from nested plain data; unknown keys are errors."""
    config = _dataclass_from_dict(TrainConfig, data or {})
    config.validate()
    return config


def config_to_dict(config) -> dict:
    """Nested plain data (tuples become lists) that :func:`config_from_dict` reads back."""
    def plain(value):
        if is_dataclass(value):
            return {f.name: plain(getattr(value, f.name)) for f in fields(value)}
        if isinstance(value, (list, tuple)):
            return [plain(v) for v in value]
        if isinstance(value, dict):
            return {k: plain(v) for k, v in value.items()}
        return value

    return plain(config)


def _read_file(path: Path) -> dict:
    suffix = path.suffix.lower()
    if suffix not in (".yaml", ".yml", ".toml", ".json"):
        raise ConfigError(f"config file must end in .yaml, .yml, .toml or .json, got {path.name!r}")
    if not path.exists():
        raise ConfigError(f"config file must be an existing file, got {str(path)!r}, which does not exist")
    try:
        text = path.read_text()
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"config file must be a readable text file, got {str(path)!r}: {exc}") from None
    data = _parse_config_text(text, suffix, path)
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(
            f"config file {path} must hold a mapping of sections (trainer:, model:, ...), got a {type(data).__name__}"
        )
    return data


def _parse_config_text(text: str, suffix: str, path: Path) -> Any:
    """Parse a config file's text; a syntax error becomes one :class:`ConfigError` line
    that names the file, the line and the column."""
    if suffix in (".yaml", ".yml"):
        import yaml

        try:
            return yaml.safe_load(text)
        except yaml.YAMLError as exc:
            mark = getattr(exc, "problem_mark", None)
            where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
            problem = getattr(exc, "problem", None) or " ".join(str(exc).split())
            raise ConfigError(f"config file {path} must be valid YAML, got a syntax error{where}: {problem}") from None
    if suffix == ".toml":
        if sys.version_info >= (3, 11):
            import tomllib
        else:  # pragma: no cover - Python 3.10
            try:
                import tomli as tomllib
            except ImportError as exc:
                raise ImportError("reading TOML on Python 3.10 needs the tomli package: pip install tomli") from exc
        try:
            return tomllib.loads(text)
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"config file {path} must be valid TOML, got a syntax error: {exc}") from None
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise ConfigError(
            f"config file {path} must be valid JSON, got a syntax error at line {exc.lineno}, column {exc.colno}: {exc.msg}"
        ) from None


def load_config(path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = ()) -> TrainConfig:
    """Read a YAML/TOML/JSON config (or start from defaults) and apply ``--set`` overrides."""
    data = _read_file(Path(path)) if path is not None else {}
    config = _dataclass_from_dict(TrainConfig, data)
    config = apply_overrides(config, overrides)
    config.validate()
    return config


def save_config(config: TrainConfig, path: str | Path) -> None:
    """Write ``config`` as YAML (or JSON for a ``.json`` path)."""
    path = Path(path)
    data = config_to_dict(config)
    if path.suffix.lower() == ".json":
        path.write_text(json.dumps(data, indent=2) + "\n")
        return
    import yaml

    path.write_text(yaml.safe_dump(data, sort_keys=False))


def apply_overrides(config: TrainConfig, overrides) -> TrainConfig:
    """Apply ``["section.key=value", ...]`` to a copy of ``config``.

    The value is parsed as YAML (so ``1e-5``, ``true``, ``null``, ``[0.9, 0.95]`` work) and
    converted to the field's type; a dotted path may reach into nested sections
    (``model.student_tiny.hidden_size=32``) and into dict fields (``env.kwargs.max_steps=20``).
    """
    import yaml

    data = config_to_dict(config)
    for item in overrides or ():
        if "=" not in item:
            raise ConfigError(f"--set takes section.key=value, got {item!r}")
        dotted, raw = item.split("=", 1)
        keys = [k for k in dotted.strip().split(".") if k]
        if not keys:
            raise ConfigError(f"--set takes section.key=value, got {item!r} (no key)")
        try:
            value = yaml.safe_load(raw) if raw.strip() else ""
        except yaml.YAMLError:
            value = raw
        node = data
        for depth, key in enumerate(keys[:-1]):
            if not isinstance(node, dict):
                raise ConfigError(f"--set {item!r}: {'.'.join(keys[:depth])} is a value, not a section")
            if key not in node:
                raise ConfigError(_unknown_key_message(".".join(keys[:depth]), key, list(node), f" in --set {item!r}"))
            node = node[key]
        last = keys[-1]
        if not isinstance(node, dict):
            raise ConfigError(f"--set {item!r}: {'.'.join(keys[:-1])} is a value, not a section")
        if last not in node and not _is_free_dict(config, keys[:-1]):
            raise ConfigError(_unknown_key_message(".".join(keys[:-1]), last, list(node), f" in --set {item!r}"))
        node[last] = value
        # Back through the dataclasses: a section given as a mapping gets its other keys
        # (so a later --set may name them), and a bad value is told at its own --set.
        data = config_to_dict(_dataclass_from_dict(TrainConfig, data))
    result = _dataclass_from_dict(TrainConfig, data)
    return result


def _is_free_dict(config, keys: list[str]) -> bool:
    """True when ``keys`` points at a ``dict`` field (e.g. ``env.kwargs``): any key may be added."""
    node = config
    for key in keys:
        if not is_dataclass(node) or not hasattr(node, key):
            return False
        node = getattr(node, key)
    return isinstance(node, dict)


def replace(config, **changes):
    """``dataclasses.replace`` re-exported for callers building variants of a config."""
    return dataclasses.replace(config, **changes)
