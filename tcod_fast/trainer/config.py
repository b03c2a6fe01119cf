"""Training configuration: nested dataclasses, read through OmegaConf structured configs.

One :class:`TrainConfig` holds every knob of a run, grouped in sections::

    trainer:     steps, optimiser, micro-batching, device, output folder, cadences
    model:       student / teacher (local path or a tiny in-code config), precision
    env:         which environment, splits, prompt layout
    rollout:     tasks per step, sampling, reply length, generation backend (hf or vllm)
    teacher:     a teacher served over HTTP (OpenAI-compatible, e.g. vLLM) instead of in process
    loss:        estimator (full vocabulary or sampled-token k1/k3 + PPO), coefficients
    curriculum:  the algorithm and its schedules (``tcod_fast.curriculum.CurriculumConfig``,
                 with ``curriculum.guided.*`` and ``curriculum.atod.*``)
    eval:        held-out tasks, temperature
    logging:     JSONL, TensorBoard, progress bars

Files: ``load_config("run.yaml")`` (or ``.toml``/``.json``) merges the file into
``OmegaConf.structured(TrainConfig)``; ``--set trainer.lr=1e-5`` overrides are merged on top
as OmegaConf dotlist items (values parse as YAML: ``true``, ``null``, ``[1, 2]``, ``{a: 1}``).
OmegaConf checks every value against its field's type (choices are ``Literal`` types) and
refuses keys the dataclasses lack; its errors are told here as one line naming the key,
what was expected and what was given. :meth:`TrainConfig.validate` adds the range checks
and the rules that span several fields.

Configs written before the schedules were nested (flat ``curriculum.guided_p_init``,
``curriculum.atod_kappa_min``, ...) are read with those keys moved under ``guided`` /
``atod`` (a resumed run rewrites its ``config.yaml`` in the nested form); their
``loss.loss_agg: token_mean`` (the only value it ever accepted) is dropped.
"""

from __future__ import annotations

import difflib
import functools
import importlib
import json
import math
import sys
import types
import typing
from dataclasses import dataclass, field, fields, is_dataclass
from pathlib import Path
from typing import Any, Literal

import yaml
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import ConfigKeyError, OmegaConfBaseException

from tcod_fast.algorithms import ALGORITHMS, get_algorithm
from tcod_fast.curriculum import CurriculumConfig, CurriculumSampler, nest_schedule_settings
from tcod_fast.envs.registry import ENV_NAMES
from tcod_fast.errors import ConfigError
from tcod_fast.server_requests import ServerRequestSettings
from tcod_fast.tiny_models import TinyModelConfig

__all__ = [
    "ALGORITHMS",
    "EnvSettings",
    "EvalSettings",
    "LoggingSettings",
    "LossSettings",
    "ModelSettings",
    "RolloutSettings",
    "TeacherSettings",
    "TrainConfig",
    "TrainerSettings",
    "apply_overrides",
    "config_from_dict",
    "config_to_dict",
    "load_config",
    "save_config",
]

@dataclass
class ModelSettings:
    """Student and teacher.

    Attributes:
        student_path / teacher_path: a local Hugging Face model folder; ``None`` builds the
            tiny model of ``student_tiny`` / ``teacher_tiny``
            (:class:`tcod_fast.tiny_models.TinyModelConfig`) with random weights (tests),
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
    student_tiny: TinyModelConfig = field(default_factory=lambda: TinyModelConfig(hidden_size=64, seed=1))
    teacher_tiny: TinyModelConfig = field(
        default_factory=lambda: TinyModelConfig(hidden_size=96, intermediate_size=192, seed=2)
    )
    teacher_dtype: Literal["float32", "bfloat16", "float16"] = "float32"
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
    kwargs: dict[str, Any] = field(default_factory=dict)
    train_split: str = "train"
    seen_split: str = "valid_seen"
    unseen_split: str = "valid_unseen"
    num_train_tasks: int | None = None
    pool_workers: int = 0
    context_mode: Literal["append", "window"] = "append"
    history_length: int = 2
    think: bool = False
    show_admissible_actions: bool = True
    max_admissible_actions: int | None = None
    prompt_style: Literal["paper", "compact"] = "paper"
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
        backend: ``hf`` (Hugging Face models in this process) or ``vllm`` (a vLLM engine in
            this process holding the student's current weights, pushed before each rollout;
            needs vLLM installed). Teacher turns go to ``teacher.server_url`` when set, else
            to a vLLM engine of the in-process teacher.
        vllm_gpu_memory_utilization: fraction of the GPU's memory (on CPU: of host memory)
            each vLLM engine may take for weights and KV cache.
    """

    tasks_per_step: int = 8
    temperature: float = 1.0
    top_p: float = 1.0
    teacher_temperature: float = 0.4
    max_new_tokens: int = 24
    backend: Literal["hf", "vllm"] = "hf"
    vllm_gpu_memory_utilization: float = 0.1


@dataclass
class LossSettings:
    """The training signal.

    Attributes:
        estimator: ``full_vocab``: exact KL over the vocabulary with the teacher in process
            (``fused_linear_turn_kl`` on hidden states + LM heads when ``fused_linear``
            allows, else ``fused_turn_kl`` on logits); ``sampled``: the TCOD reference
            code's sampled-token estimator used as an advantage in a PPO clipped surrogate;
            ``topk``: the divergence to the teacher's top-``teacher.top_k`` log-probs plus a
            tail outcome (``fused_topk_turn_kl``), what a served teacher provides.
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
        sod_coef / sod_delta: SOD's ``c`` and ``delta``.
        grpo_eps: added to the group std.
    """

    estimator: Literal["full_vocab", "sampled", "topk"] = "full_vocab"
    sampled_kl: Literal["k1", "k3"] = "k1"
    divergence: Literal["reverse_kl", "forward_kl", "jsd"] = "reverse_kl"
    jsd_beta: float = 0.5
    fused_linear: Literal["auto", "always", "never"] = "auto"
    backend: Literal["auto", "native", "triton", "torch"] = "auto"
    kl_coef: float = 1.0
    clip_low: float = 0.2
    clip_high: float | None = None
    dual_clip: float | None = 3.0
    sod_coef: float = 1.0
    sod_delta: float = 0.2
    grpo_eps: float = 1e-6


@dataclass
class TeacherSettings(ServerRequestSettings):
    """A teacher served by an OpenAI-compatible completions server (vLLM's ``api_server``).

    Attributes:
        server_url: base URL of the server, e.g. ``http://127.0.0.1:8000``; ``None`` keeps
            the teacher in the trainer's process (``model.teacher_path``). With a URL the
            trainer asks the server for the teacher's log-probs and top-K maps of every
            trained token (``loss.estimator`` ``sampled`` or ``topk``) and for the
            teacher-played turns; the served model must use the trainer's tokenizer.
        model, top_k, max_concurrency, timeout_s, retries, backoff_s: how requests are made
            (:class:`~tcod_fast.server_requests.ServerRequestSettings`).
    """

    server_url: str | None = None


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
        parallelism: how processes launched by ``torchrun`` share the work: ``ddp``
            (replicated models, gradients summed across processes) or ``fsdp2`` (FSDP2
            shards the student per decoder layer; sharded DCP checkpoints). See
            :mod:`tcod_fast.trainer.parallel`.
        fsdp_param_dtype: ``fsdp2`` only: dtype the sharded student computes in,
            ``float32`` or ``bfloat16`` (mixed precision; gradients are reduced in float32).
        fsdp_teacher: ``fsdp2`` only: ``shard`` the teacher for forward only, or keep it
            ``whole`` on every process (faster, when it fits).
    """

    steps: int = 20
    lr: float = 1e-4
    weight_decay: float = 0.0
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    lr_schedule: Literal["constant", "linear", "cosine"] = "constant"
    warmup_steps: int = 0
    max_grad_norm: float | None = 1.0
    updates_per_step: int = 1
    micro_batch_tokens: int = 8192
    seed: int = 0
    device: Literal["auto", "cpu", "cuda"] = "auto"
    bf16: Literal["auto", "always", "never"] = "auto"
    output_dir: str = "runs/tcod"
    eval_every: int = 0
    checkpoint_every: int = 10
    keep_checkpoints: int = 2
    num_threads: int | None = None
    parallelism: Literal["ddp", "fsdp2"] = "ddp"
    fsdp_param_dtype: Literal["float32", "bfloat16"] = "float32"
    fsdp_teacher: Literal["shard", "whole"] = "shard"


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
        interim_num_tasks: tasks per split of the evaluations before the final one (the
            first ones of each split); ``None``: ``num_tasks``. Fewer makes frequent
            evaluations cheap while the final one keeps its precision.
    """

    num_tasks: int = 16
    temperature: float = 0.4
    seed: int = 12345
    kl_by_turn: bool = True
    kl_by_turn_splits: tuple[Literal["seen", "unseen"], ...] = ("seen", "unseen")
    kl_by_turn_final_only: bool = False
    at_start: bool = False
    interim_num_tasks: int | None = None


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
    tags: dict[str, Any] = field(default_factory=dict)


@dataclass
class TrainConfig:
    """Everything one training run needs. The algorithm is ``curriculum.algorithm``."""

    trainer: TrainerSettings = field(default_factory=TrainerSettings)
    model: ModelSettings = field(default_factory=ModelSettings)
    env: EnvSettings = field(default_factory=EnvSettings)
    rollout: RolloutSettings = field(default_factory=RolloutSettings)
    loss: LossSettings = field(default_factory=LossSettings)
    teacher: TeacherSettings = field(default_factory=TeacherSettings)
    curriculum: CurriculumConfig = field(default_factory=lambda: CurriculumConfig(max_turns=12, eta=2))
    eval: EvalSettings = field(default_factory=EvalSettings)
    logging: LoggingSettings = field(default_factory=LoggingSettings)

    @property
    def algorithm(self) -> str:
        return self.curriculum.algorithm

    def validate(self) -> None:
        """Raise :class:`~tcod_fast.errors.ConfigError` (a ``ValueError``) naming the field,
        what was expected and what was given.

        The types (choices included) are checked as OmegaConf reads the config, and again
        here for a config built in Python. Then every field the type alone does not bound:
        numbers are finite and in range, and settings the run would silently ignore in this
        combination are refused. Model and tokenizer folders are checked by
        :meth:`check_paths` (it needs the file system).
        """
        _structured(self)
        trainer, model, env, rollout, loss, evaluation = (
            self.trainer, self.model, self.env, self.rollout, self.loss, self.eval
        )
        checks = [
            (trainer.steps >= 0, f"trainer.steps must be >= 0, got {trainer.steps}"),
            (trainer.updates_per_step >= 1, f"trainer.updates_per_step must be >= 1, got {trainer.updates_per_step}"),
            (trainer.micro_batch_tokens >= 1, f"trainer.micro_batch_tokens must be >= 1, got {trainer.micro_batch_tokens}"),
            (rollout.tasks_per_step >= 1, f"rollout.tasks_per_step must be >= 1, got {rollout.tasks_per_step}"),
            (evaluation.num_tasks >= 0, f"eval.num_tasks must be >= 0, got {evaluation.num_tasks}"),
            (
                evaluation.interim_num_tasks is None or 0 <= evaluation.interim_num_tasks <= evaluation.num_tasks,
                f"eval.interim_num_tasks must be in [0, eval.num_tasks={evaluation.num_tasks}] (null: eval.num_tasks), "
                f"got {evaluation.interim_num_tasks}",
            ),
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
            (0 <= loss.jsd_beta <= 1, f"loss.jsd_beta must be in [0, 1], got {loss.jsd_beta}"),
            (loss.kl_coef >= 0, f"loss.kl_coef must be >= 0, got {loss.kl_coef}"),
            (0 <= loss.clip_low < 1, f"loss.clip_low must be in [0, 1), got {loss.clip_low}"),
            (loss.clip_high is None or loss.clip_high >= 0, f"loss.clip_high must be >= 0 (null: clip_low), got {loss.clip_high}"),
            (loss.dual_clip is None or loss.dual_clip > 1, f"loss.dual_clip must be > 1 (null: off), got {loss.dual_clip}"),
            (loss.sod_coef >= 0, f"loss.sod_coef must be >= 0, got {loss.sod_coef}"),
            (loss.sod_delta >= 0, f"loss.sod_delta must be >= 0, got {loss.sod_delta}"),
            (loss.grpo_eps > 0, f"loss.grpo_eps must be > 0, got {loss.grpo_eps}"),
            (
                loss.divergence == "reverse_kl" or loss.estimator != "sampled",
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
        ]
        checks += _teacher_checks(self)
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
        _check_pacing(self.curriculum)
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


def _teacher_checks(config: TrainConfig) -> list[tuple[bool, str]]:
    teacher, rollout, loss = config.teacher, config.rollout, config.loss
    served = teacher.server_url is not None
    return [
        (
            0 < rollout.vllm_gpu_memory_utilization <= 1,
            f"rollout.vllm_gpu_memory_utilization must be in (0, 1], got {rollout.vllm_gpu_memory_utilization}",
        ),
        (
            not served or str(teacher.server_url).startswith(("http://", "https://")),
            f"teacher.server_url must start with http:// or https://, got {teacher.server_url!r}",
        ),
        (
            not served or loss.estimator in ("sampled", "topk"),
            "a served teacher (teacher.server_url) needs loss.estimator 'sampled' or 'topk' (the server returns "
            f"top-K log-probs, not the full vocabulary), got loss.estimator={loss.estimator!r}",
        ),
        (
            not served or config.model.teacher_path is None,
            f"teacher.server_url and model.teacher_path both name a teacher; set one, got {teacher.server_url!r} "
            f"and {config.model.teacher_path!r}",
        ),
        (teacher.top_k >= 1, f"teacher.top_k must be >= 1, got {teacher.top_k}"),
        (teacher.max_concurrency >= 1, f"teacher.max_concurrency must be >= 1, got {teacher.max_concurrency}"),
        (teacher.timeout_s > 0, f"teacher.timeout_s must be > 0, got {teacher.timeout_s}"),
        (teacher.retries >= 0, f"teacher.retries must be >= 0, got {teacher.retries}"),
        (teacher.backoff_s >= 0, f"teacher.backoff_s must be >= 0, got {teacher.backoff_s}"),
    ]


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


def _tiny_model_checks(where: str, spec: TinyModelConfig) -> list[tuple[bool, str]]:
    sizes = ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads", "max_position_embeddings")
    checks = [(getattr(spec, name) >= 1, f"{where}.{name} must be >= 1, got {getattr(spec, name)}") for name in sizes]
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


def _check_pacing(curriculum: CurriculumConfig) -> None:
    """Build the curriculum's pacing once, so its range checks run now, not at the first
    training step (the Guided-OPD and ATOD schedules check themselves when built)."""
    try:
        CurriculumSampler(curriculum)
    except (TypeError, ValueError) as exc:
        message = str(exc)
        for name in ("LinearPacing.eta", "SmoothPacing.eta", "StagedPacing.stage_starts"):
            if message.startswith(name + " "):
                raise ConfigError(f"curriculum.{name.split('.')[1]}{message[len(name):]}") from None
        raise ConfigError(f"curriculum: {message}") from None


# --------------------------------------------------------------------------------------
# reading through OmegaConf
# --------------------------------------------------------------------------------------
def config_from_dict(data: dict) -> TrainConfig:
    """Build and validate a :class:`TrainConfig` from nested plain data; unknown keys are errors."""
    config = _to_object(_merge(OmegaConf.structured(TrainConfig), data or {}))
    config.validate()
    return config


def load_config(path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = ()) -> TrainConfig:
    """Read a YAML/TOML/JSON config (or start from defaults), merge the ``--set`` overrides
    on top, and validate."""
    merged = _merge(OmegaConf.structured(TrainConfig), _read_file(Path(path)) if path is not None else {})
    config = _to_object(_merge_overrides(merged, overrides))
    config.validate()
    return config


def apply_overrides(config: TrainConfig, overrides) -> TrainConfig:
    """A copy of ``config`` with ``["section.key=value", ...]`` merged in (OmegaConf dotlist:
    a dotted key reaches into nested sections, ``model.student_tiny.hidden_size=32``, and
    into dict fields, ``env.kwargs.max_steps=20``; a mapping value merges into a section)."""
    return _to_object(_merge_overrides(_structured(config), overrides))


def config_to_dict(config) -> dict:
    """Nested plain data of a dataclass (tuples become lists) that :func:`config_from_dict`
    reads back."""
    if is_dataclass(config):
        return {f.name: config_to_dict(getattr(config, f.name)) for f in fields(config)}
    if isinstance(config, (list, tuple)):
        return [config_to_dict(v) for v in config]
    if isinstance(config, dict):
        return {k: config_to_dict(v) for k, v in config.items()}
    return config


def save_config(config: TrainConfig, path: str | Path) -> None:
    """Write ``config`` as YAML (or JSON for a ``.json`` path)."""
    path = Path(path)
    data = config_to_dict(config)
    if path.suffix.lower() == ".json":
        path.write_text(json.dumps(data, indent=2) + "\n")
        return
    path.write_text(yaml.safe_dump(data, sort_keys=False))


def _structured(config: TrainConfig) -> DictConfig:
    """``config`` as an OmegaConf structured config: checks a config built in Python."""
    try:
        _check_strict_leaves(config_to_dict(config))
        return OmegaConf.structured(config)
    except OmegaConfBaseException as exc:
        raise _translate(exc, config_to_dict(config)) from None


def _merge_overrides(merged: DictConfig, overrides) -> DictConfig:
    """``merged`` with the ``--set`` items merged in, in order."""
    items = []
    for item in overrides or ():
        key, equals, _ = item.partition("=")
        if not equals or not key.strip(".").strip():
            raise ConfigError(f"--set takes section.key=value, got {item!r}")
        try:
            data = _upgrade_old_keys(OmegaConf.to_container(OmegaConf.from_dotlist([item])))
        except OmegaConfBaseException as exc:
            raise ConfigError(f"--set takes section.key=value with a YAML value, got {item!r}: {exc.msg.splitlines()[0]}") from None
        _check_strict_leaves(data, f" in --set {item!r}")
        items.append((item, data))
    try:
        return OmegaConf.merge(merged, *(data for _, data in items))
    except OmegaConfBaseException:  # merge them one by one to name the item at fault
        for item, data in items:
            merged = _merge(merged, data, f" in --set {item!r}")
        raise


def _merge(base: DictConfig, data: dict, context: str = "") -> DictConfig:
    """``base`` with plain ``data`` merged in; a wrong key or value is one ConfigError line."""
    data = _upgrade_old_keys(data)
    try:
        _check_strict_leaves(data, context)
        return OmegaConf.merge(base, data)
    except OmegaConfBaseException as exc:
        raise _translate(exc, data, context, base) from None


def _to_object(merged: DictConfig) -> TrainConfig:
    """The dataclasses of ``merged``; a section's own ``__post_init__`` check (say
    ``curriculum.atod``'s) is told with the section's key path."""
    try:
        return OmegaConf.to_object(merged)
    except (TypeError, ValueError) as exc:
        where, section_class = _failing_section(merged, "")
        message = str(exc)
        first_word = message.split(" ", 1)[0]
        if not where:
            raise ConfigError(message) from None
        if first_word in {f.name for f in fields(section_class)}:
            raise ConfigError(f"{where}.{message}") from None
        raise ConfigError(f"{where}: {message}") from None


def _failing_section(node: DictConfig, where: str):
    """``(key path, dataclass)`` of the deepest section of ``node`` that cannot be built."""
    for key in node:
        child = node[key]
        if isinstance(child, DictConfig) and is_dataclass(OmegaConf.get_type(child)):
            found = _failing_section(child, f"{where}.{key}" if where else str(key))
            if found[0] is not None:
                return found
    try:
        OmegaConf.to_object(node)
    except (TypeError, ValueError):
        return where, OmegaConf.get_type(node)
    return None, None


def _upgrade_old_keys(data: dict) -> dict:
    """Configs of older runs: flat ``curriculum.guided_*`` / ``atod_*`` keys move under
    ``guided`` / ``atod``; ``loss.loss_agg: token_mean`` (its only accepted value) goes."""
    if not isinstance(data, dict):
        return data
    data = dict(data)
    if isinstance(data.get("curriculum"), dict):
        try:
            data["curriculum"] = nest_schedule_settings(data["curriculum"])
        except ValueError as exc:
            raise ConfigError(str(exc)) from None
    if isinstance(data.get("loss"), dict) and data["loss"].get("loss_agg") == "token_mean":
        data["loss"] = {k: v for k, v in data["loss"].items() if k != "loss_agg"}
    return data


@functools.lru_cache(maxsize=None)
def _annotation_at(dotted: str) -> Any:
    """The type annotation of the field at ``dotted`` in :class:`TrainConfig` (``Any``
    inside a dict field, ``None`` for an unknown key)."""
    annotation: Any = TrainConfig
    for key in dotted.split("."):
        annotation = _without_none(annotation)
        if not is_dataclass(annotation):
            return Any if annotation in (dict, Any) or typing.get_origin(annotation) is dict else None
        hints = typing.get_type_hints(annotation)
        if key not in hints:
            return None
        annotation = hints[key]
    return annotation


def _without_none(annotation: Any) -> Any:
    """``X | None`` -> ``X``; any other annotation as is."""
    options = [a for a in typing.get_args(annotation) if a is not type(None)]
    is_optional = typing.get_origin(annotation) in (typing.Union, types.UnionType) and len(options) == 1
    return options[0] if is_optional else annotation


def _describe(annotation: Any) -> str:
    """``float | None`` -> "a number or null"; ``Literal["a", "b"]`` -> "one of a, b"."""
    if annotation is not _without_none(annotation):
        return _describe(_without_none(annotation)) + " or null"
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if origin is Literal:
        return "one of " + ", ".join(map(str, args))
    if origin is tuple:
        item = _describe(args[0]).replace("one of", "values among") if args else "values"
        item = item.split(" ", 1)[1] + "s" if item.startswith(("a ", "an ")) else item  # "an integer" -> "integers"
        return f"a list of {item}" if args[-1:] == (Ellipsis,) else f"a list of {len(args)} {item}"
    if is_dataclass(annotation):
        return f"a mapping with keys among {', '.join(f.name for f in fields(annotation))}"
    names = {bool: "true/false", int: "an integer", float: "a number", str: "a string", dict: "a mapping"}
    return names.get(annotation, names.get(origin, str(annotation)))


def _leaves(data: Any, where: str = ""):
    """``(dotted key, value)`` of every leaf of nested mappings."""
    if isinstance(data, dict) and data:
        for key, value in data.items():
            yield from _leaves(value, f"{where}.{key}" if where else str(key))
    elif where:
        yield where, data


def _check_strict_leaves(data: dict, context: str = "") -> None:
    """What OmegaConf converts but a config must not hold: a number or word for a
    true/false field (OmegaConf reads ``3`` and ``"on"`` as true), and a list of the wrong
    length for a fixed-length field (OmegaConf's message would not name the key)."""
    for dotted, value in _leaves(data):
        annotation = _without_none(_annotation_at(dotted) or Any)
        if value is None:
            continue
        if annotation is bool and not isinstance(value, bool):
            raise ConfigError(f"{dotted}: expected true/false, got {value!r}{context}")
        args = typing.get_args(annotation)
        fixed = typing.get_origin(annotation) is tuple and args and args[-1] is not Ellipsis
        if fixed and isinstance(value, (list, tuple)) and len(value) != len(args):
            raise ConfigError(f"{dotted}: expected {_describe(annotation)}, got {value!r}{context}")


def _translate(exc: OmegaConfBaseException, data: dict, context: str = "", base: DictConfig | None = None) -> ConfigError:
    """OmegaConf's error as one line: the key path, what was expected, what was given."""
    dotted = exc.full_key
    if not dotted and base is not None:  # a few OmegaConf errors lack the key: find the leaf
        for leaf, value in _leaves(data):
            try:
                OmegaConf.merge(base, _nested(leaf, value))
            except OmegaConfBaseException:
                dotted = leaf
                break
    if not dotted:
        return ConfigError(f"config{context}: {str(exc.msg or exc).splitlines()[0]}")
    if isinstance(exc, ConfigKeyError) or _annotation_at(dotted) is None:
        parent, _, key = dotted.rpartition(".")
        section = _without_none(_annotation_at(parent) if parent else TrainConfig)
        if not is_dataclass(section):
            return ConfigError(f"{parent}: expected {_describe(section)}, not a section with key {key!r}{context}")
        return ConfigError(_unknown_key_message(parent, key, [f.name for f in fields(section)], context))
    value = _lookup(data, dotted, exc.value)
    annotation = _annotation_at(dotted)
    if typing.get_origin(_without_none(annotation)) is Literal:
        choices = ", ".join(map(str, typing.get_args(_without_none(annotation))))
        return ConfigError(f"{dotted} must be one of {choices}, got {value!r}{context}")
    return ConfigError(f"{dotted}: expected {_describe(annotation)}, got {value!r}{context}")


def _nested(dotted: str, value: Any) -> dict:
    for key in reversed(dotted.split(".")):
        value = {key: value}
    return value


def _lookup(data: Any, dotted: str, default: Any) -> Any:
    for key in dotted.split("."):
        if not isinstance(data, dict) or key not in data:
            return default
        data = data[key]
    return data


def _unknown_key_message(where: str, key: str, options: list[str], context: str = "") -> str:
    """``trainer.lrr`` -> "unknown config key trainer.lrr (did you mean trainer.lr?): expected
    a key of trainer (steps, lr, ...), got 'lrr'"."""
    prefix = f"{where}." if where else ""
    close = difflib.get_close_matches(key, options, n=1)
    hint = f" (did you mean {prefix}{close[0]}?)" if close else ""
    section = f"a key of {where}" if where else "a section"
    return f"unknown config key {prefix}{key}{context}{hint}: expected {section} ({', '.join(options)}), got {key!r}"


# --------------------------------------------------------------------------------------
# files
# --------------------------------------------------------------------------------------
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
