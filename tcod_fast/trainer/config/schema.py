"""The schema of a training run: one dataclass per section, choices as ``Literal`` types.

One :class:`TrainConfig` holds every knob of a run, grouped in sections, each a
``*Settings`` dataclass::

    trainer:     steps, optimiser, micro-batching, device, output folder, cadences
    model:       student / teacher (local path or a tiny in-code config), precision
    env:         which environment, splits, prompt layout
    envs:        or several environments, each with its kwargs, splits and sampling weight
    rollout:     tasks per step, sampling, reply length, generation backend (hf or vllm)
    teacher:     a teacher served over HTTP (OpenAI-compatible, e.g. vLLM) instead of in process
    teachers:    or several teachers, each supervising the episodes of its environments
    loss:        estimator (full vocabulary, sampled-token k1/k3 + PPO, top-K), coefficients
                 (:class:`tcod_fast.loss_settings.LossSettings`)
    curriculum:  the algorithm and its schedules (:class:`tcod_fast.curriculum.CurriculumSettings`,
                 with ``curriculum.guided.*`` and ``curriculum.atod.*``)
    eval:        held-out tasks, temperature
    logging:     JSONL, TensorBoard, progress bars

The rules that bound values and span fields are in :mod:`~tcod_fast.trainer.config.rules`;
reading files and ``--set`` overrides in :mod:`~tcod_fast.trainer.config.loading`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

from tcod_fast.curriculum import CurriculumSettings
from tcod_fast.loss_settings import LossSettings
from tcod_fast.server_requests import ServerRequestSettings
from tcod_fast.tiny_models import TinyModelConfig

__all__ = [
    "EnvEntry",
    "EnvSettings",
    "EvalSettings",
    "LoggingSettings",
    "LossSettings",
    "ModelSettings",
    "RolloutSettings",
    "TeacherEntry",
    "TeacherSettings",
    "TrainConfig",
    "TrainerSettings",
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
        name: ``toy``, ``twx-<game>``, ``scienceworld``, ``alfworld`` or another registered
            family (:mod:`tcod_fast.envs.registry`).
        kwargs: fields of the family's config dataclass.
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
class EnvEntry:
    """One environment of a run that trains on several (``envs:``).

    Attributes:
        name: a registered env name (``toy``, ``twx-coin``, ``scienceworld``...); each entry's
            name is distinct.
        kwargs: fields of the family's config dataclass.
        weight: sampling weight (> 0): each training task of a step is drawn from this
            environment with probability ``weight / sum of weights``.
        train_split / seen_split / unseen_split / num_train_tasks: as in ``env``.

    The other ``env`` settings (prompt layout, context mode, worker pool) hold for every
    environment of the run.
    """

    name: str = ""
    kwargs: dict[str, Any] = field(default_factory=dict)
    weight: float = 1.0
    train_split: str = "train"
    seen_split: str = "valid_seen"
    unseen_split: str = "valid_unseen"
    num_train_tasks: int | None = None


@dataclass
class TeacherEntry:
    """One teacher of a run with several (``teachers:``), routed per episode by environment.

    Attributes:
        name: a distinct label (metrics and errors name it).
        path: a local model folder, run in the trainer's process.
        server_url: or an OpenAI-compatible server's base URL (requests as set in ``teacher``).
            With neither, the teacher is a random-init tiny model of ``model.teacher_tiny``
            (its seed moved by the entry's position), for tests.
        envs: the env names (of ``envs``) whose episodes it supervises; empty: every
            environment no other teacher names.

    Every teacher must use the student's tokenizer; their padded vocabulary sizes may differ.
    """

    name: str = ""
    path: str | None = None
    server_url: str | None = None
    envs: list[str] = field(default_factory=list)


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
    envs: list[EnvEntry] = field(default_factory=list)
    rollout: RolloutSettings = field(default_factory=RolloutSettings)
    loss: LossSettings = field(default_factory=LossSettings)
    teacher: TeacherSettings = field(default_factory=TeacherSettings)
    teachers: list[TeacherEntry] = field(default_factory=list)
    curriculum: CurriculumSettings = field(default_factory=lambda: CurriculumSettings(max_turns=12, eta=2))
    eval: EvalSettings = field(default_factory=EvalSettings)
    logging: LoggingSettings = field(default_factory=LoggingSettings)

    @property
    def algorithm(self) -> str:
        return self.curriculum.algorithm
