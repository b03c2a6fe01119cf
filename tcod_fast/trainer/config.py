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
import json
import sys
import typing
from dataclasses import dataclass, field, fields, is_dataclass
from pathlib import Path
from typing import Any

from tcod_fast.algorithms import ALGORITHMS, get_algorithm
from tcod_fast.curriculum import CurriculumConfig

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
        eval_every / checkpoint_every / log_every: cadences in steps (0: only at the end).
        keep_checkpoints: newest checkpoints kept on disk.
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
    checkpoint_every: int = 0
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
        """Raise ``ValueError`` naming the field, what was expected and what was given."""
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
        ]
        for ok, message in checks:
            if not ok:
                raise ValueError(message)
        min_group_size = get_algorithm(self.curriculum.algorithm).min_group_size
        if self.curriculum.episodes_per_task < min_group_size:
            # A GRPO group of one has advantage 0: the RL term would silently vanish.
            raise ValueError(
                f"{self.curriculum.algorithm} needs curriculum.episodes_per_task >= {min_group_size} (GRPO groups), "
                f"got {self.curriculum.episodes_per_task}"
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
        errors = []
        for option in args:
            if option is type(None):
                continue
            try:
                return _convert(value, option, where)
            except (TypeError, ValueError) as exc:
                errors.append(str(exc))
        raise ValueError(f"{where}: expected {annotation}, got {value!r}")
    if is_dataclass(annotation):
        if isinstance(value, annotation):
            return value
        if not isinstance(value, dict):
            raise TypeError(f"{where}: expected a mapping for {annotation.__name__}, got {value!r}")
        return _dataclass_from_dict(annotation, value, where)
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            raise TypeError(f"{where}: expected a list, got {value!r}")
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(_convert(v, args[0], f"{where}[{i}]") for i, v in enumerate(value))
        if args and len(args) != len(value):
            raise ValueError(f"{where}: expected {len(args)} values, got {len(value)}: {value!r}")
        return tuple(_convert(v, a, f"{where}[{i}]") for i, (v, a) in enumerate(zip(value, args or [Any] * len(value))))
    if origin is list:
        if not isinstance(value, (list, tuple)):
            raise TypeError(f"{where}: expected a list, got {value!r}")
        return [_convert(v, args[0] if args else Any, f"{where}[{i}]") for i, v in enumerate(value)]
    if origin is dict or annotation is dict:
        if not isinstance(value, dict):
            raise TypeError(f"{where}: expected a mapping, got {value!r}")
        return dict(value)
    if annotation is bool:
        if isinstance(value, bool):
            return value
        raise TypeError(f"{where}: expected true/false, got {value!r}")
    if annotation in (int, float) and isinstance(value, str):
        # PyYAML follows YAML 1.1, where "1e-5" (no dot) is a string, not a number.
        try:
            value = float(value) if annotation is float else int(value)
        except ValueError:
            raise TypeError(f"{where}: expected a number, got {value!r}") from None
    if annotation is int:
        if isinstance(value, bool) or not isinstance(value, (int, float)) or int(value) != value:
            raise TypeError(f"{where}: expected an integer, got {value!r}")
        return int(value)
    if annotation is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise TypeError(f"{where}: expected a number, got {value!r}")
        return float(value)
    if annotation is str:
        if not isinstance(value, str):
            raise TypeError(f"{where}: expected a string, got {value!r}")
        return value
    return value


def _dataclass_from_dict(cls, data: dict, where: str = ""):
    types = _field_types(cls)
    unknown = sorted(set(data) - set(types))
    if unknown:
        prefix = f"{where}." if where else ""
        raise ValueError(
            f"unknown config key(s) {', '.join(prefix + k for k in unknown)}; "
            f"{where or 'the top level'} has: {', '.join(types)}"
        )
    kwargs = {name: _convert(value, types[name], f"{where}.{name}" if where else name) for name, value in data.items()}
    return cls(**kwargs)


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
    text = path.read_text()
    suffix = path.suffix.lower()
    if suffix in (".yaml", ".yml"):
        import yaml

        return yaml.safe_load(text) or {}
    if suffix == ".toml":
        if sys.version_info >= (3, 11):
            import tomllib
        else:  # pragma: no cover - Python 3.10
            try:
                import tomli as tomllib
            except ImportError as exc:
                raise ImportError("reading TOML on Python 3.10 needs the tomli package: pip install tomli") from exc
        return tomllib.loads(text)
    if suffix == ".json":
        return json.loads(text)
    raise ValueError(f"config file must end in .yaml, .yml, .toml or .json, got {path.name!r}")


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
            raise ValueError(f"override must look like section.key=value, got {item!r}")
        dotted, raw = item.split("=", 1)
        keys = [k for k in dotted.strip().split(".") if k]
        if not keys:
            raise ValueError(f"override has an empty key: {item!r}")
        try:
            value = yaml.safe_load(raw) if raw.strip() else ""
        except yaml.YAMLError:
            value = raw
        node = data
        for depth, key in enumerate(keys[:-1]):
            if not isinstance(node, dict) or key not in node:
                where = ".".join(keys[:depth]) or "the top level"
                options = ", ".join(node) if isinstance(node, dict) else "nothing (not a section)"
                raise ValueError(f"unknown config key {'.'.join(keys[: depth + 1])!r} in --set {item!r}; {where} has: {options}")
            node = node[key]
        last = keys[-1]
        if isinstance(node, dict) and last not in node and not _is_free_dict(config, keys[:-1]):
            where = ".".join(keys[:-1]) or "the top level"
            raise ValueError(f"unknown config key {dotted!r} in --set {item!r}; {where} has: {', '.join(node)}")
        if not isinstance(node, dict):
            raise ValueError(f"cannot set {dotted!r}: {'.'.join(keys[:-1])} is not a section")
        node[last] = value
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
