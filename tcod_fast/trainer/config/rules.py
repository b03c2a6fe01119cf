"""The rules a :class:`~tcod_fast.trainer.config.schema.TrainConfig` must follow beyond its types.

:func:`validate` bounds every number the type alone does not bound, checks the rules that
span several fields, refuses settings that would do nothing in the chosen setup, and
resolves the names a config holds to their records (:class:`RunRecords`: the algorithm,
the loss estimator) -- the one place where that happens. :func:`check_paths` checks the
model and tokenizer folders. Each broken rule is one
:class:`~tcod_fast.errors.ConfigError` line naming the field, what was expected and what
was given.
"""

from __future__ import annotations

import math
import operator
from dataclasses import dataclass, fields, is_dataclass
from pathlib import Path

from tcod_fast.algorithms import Algorithm, get_algorithm
from tcod_fast.curriculum import build_pacing
from tcod_fast.envs.registry import check_env_settings
from tcod_fast.errors import ConfigError
from tcod_fast.loss_settings import Estimator, get_estimator
from tcod_fast.tiny_models import TinyModelConfig
from tcod_fast.trainer.config.schema import EnvSettings, LossSettings, RolloutSettings, TrainConfig, TrainerSettings

__all__ = ["RunRecords", "check_paths", "environment_names", "resolve_records", "teacher_routes", "validate"]


@dataclass(frozen=True)
class RunRecords:
    """What the names of a config stand for: the algorithm's record and the estimator's."""

    algorithm: Algorithm
    estimator: Estimator


def resolve_records(config: TrainConfig) -> RunRecords:
    """The records of ``curriculum.algorithm`` and ``loss.estimator``; an unknown name is a
    :class:`~tcod_fast.errors.ConfigError` listing the known ones."""
    try:
        algorithm = get_algorithm(config.curriculum.algorithm)
    except ValueError as exc:
        raise ConfigError(f"curriculum.{exc}") from None
    try:
        estimator = get_estimator(config.loss.estimator)
    except ValueError as exc:
        raise ConfigError(str(exc)) from None
    return RunRecords(algorithm=algorithm, estimator=estimator)


#: ``(dotted key, comparison, bound, hint)``: the value must compare to the bound; ``None``
#: passes where the hint says what null means.
_BOUNDS = (
    ("trainer.steps", ">=", 0, ""),
    ("trainer.updates_per_step", ">=", 1, ""),
    ("trainer.micro_batch_tokens", ">=", 1, ""),
    ("rollout.tasks_per_step", ">=", 1, ""),
    ("eval.num_tasks", ">=", 0, ""),
    ("trainer.lr", ">", 0, ""),
    ("trainer.weight_decay", ">=", 0, ""),
    ("trainer.eps", ">", 0, ""),
    ("trainer.warmup_steps", ">=", 0, ""),
    ("trainer.max_grad_norm", ">=", 0, " (0 or null: no clipping)"),
    ("trainer.seed", ">=", 0, ""),
    ("trainer.eval_every", ">=", 0, " (0: only at the end)"),
    ("trainer.checkpoint_every", ">=", 0, " (0: only at the end)"),
    ("trainer.keep_checkpoints", ">=", 1, ""),
    ("trainer.num_threads", ">=", 1, " (null: torch's default)"),
    ("env.num_train_tasks", ">=", 1, " (null: all)"),
    ("env.pool_workers", ">=", 0, " (0: in this process)"),
    ("env.history_length", ">=", 0, ""),
    ("env.max_admissible_actions", ">=", 0, " (null: no cap)"),
    ("env.vocab_tasks_per_split", ">=", 1, ""),
    ("rollout.temperature", ">=", 0, " (0: greedy)"),
    ("rollout.teacher_temperature", ">=", 0, " (0: greedy)"),
    ("rollout.max_new_tokens", ">=", 1, ""),
    ("loss.kl_coef", ">=", 0, ""),
    ("loss.clip_high", ">=", 0, " (null: clip_low)"),
    ("loss.dual_clip", ">", 1, " (null: off)"),
    ("loss.sod_coef", ">=", 0, ""),
    ("loss.sod_delta", ">=", 0, ""),
    ("loss.grpo_eps", ">", 0, ""),
    ("teacher.top_k", ">=", 1, ""),
    ("teacher.max_concurrency", ">=", 1, ""),
    ("teacher.timeout_s", ">", 0, ""),
    ("teacher.retries", ">=", 0, ""),
    ("teacher.backoff_s", ">=", 0, ""),
    ("eval.temperature", ">=", 0, " (0: greedy)"),
)
_COMPARE = {">=": operator.ge, ">": operator.gt}


def validate(config: TrainConfig) -> RunRecords:
    """Check every rule of ``config`` beyond its types; returns the records its names
    resolve to. Raises :class:`~tcod_fast.errors.ConfigError` (a ``ValueError``) for the
    first rule broken. Types are checked as the config is read
    (:func:`~tcod_fast.trainer.config.loading.check_config` checks a config built in
    Python); folders by :func:`check_paths`."""
    for message in _non_finite_numbers(config):
        raise ConfigError(message)
    for dotted, comparison, bound, hint in _BOUNDS:
        value = _value_at(config, dotted)
        if value is not None and not _COMPARE[comparison](value, bound):
            raise ConfigError(f"{dotted} must be {comparison} {bound}{hint}, got {value}")
    records = resolve_records(config)
    for ok, message in _interval_checks(config) + _combination_checks(config, records):
        if not ok:
            raise ConfigError(message)
    for tiny_name, path in (("student_tiny", config.model.student_path), ("teacher_tiny", config.model.teacher_path)):
        if path is None:
            _check_tiny_model(f"model.{tiny_name}", getattr(config.model, tiny_name))
    _check_curriculum(config, records.algorithm)
    _check_env(config)
    return records


#: ``(dotted key, low, high, interval as written)``: the value must lie in the interval.
_INTERVALS = (
    ("rollout.top_p", 0, 1, "(0, 1]"),
    ("rollout.vllm_gpu_memory_utilization", 0, 1, "(0, 1]"),
    ("loss.jsd_beta", 0, 1, "[0, 1]"),
    ("loss.clip_low", 0, 1, "[0, 1)"),
)


def _in(value: float, low: float, high: float, interval: str) -> bool:
    above = value > low if interval[0] == "(" else value >= low
    return above and (value < high if interval[-1] == ")" else value <= high)


def _interval_checks(config: TrainConfig) -> list[tuple[bool, str]]:
    trainer, evaluation, url = config.trainer, config.eval, config.teacher.server_url
    checks = [
        (_in(_value_at(config, key), low, high, interval), f"{key} must be in {interval}, got {_value_at(config, key)}")
        for key, low, high, interval in _INTERVALS
    ]
    return checks + [
        (
            evaluation.interim_num_tasks is None or 0 <= evaluation.interim_num_tasks <= evaluation.num_tasks,
            f"eval.interim_num_tasks must be in [0, eval.num_tasks={evaluation.num_tasks}] (null: eval.num_tasks), "
            f"got {evaluation.interim_num_tasks}",
        ),
        (all(0 <= b < 1 for b in trainer.betas), f"trainer.betas must both be in [0, 1), got {list(trainer.betas)}"),
        (bool(str(trainer.output_dir).strip()), f"trainer.output_dir must name a folder, got {trainer.output_dir!r}"),
        (url is None or str(url).startswith(("http://", "https://")), f"teacher.server_url must start with http:// or https://, got {url!r}"),
    ]


def _combination_checks(config: TrainConfig, records: RunRecords) -> list[tuple[bool, str]]:
    """Rules across fields, and settings that would do nothing in this setup."""
    trainer, model, rollout, loss, teacher = config.trainer, config.model, config.rollout, config.loss, config.teacher
    estimator, served = records.estimator, teacher.server_url is not None
    has_ppo_term = estimator.ppo_advantage or records.algorithm.has_grpo_term
    defaults = {"trainer": TrainerSettings(), "rollout": RolloutSettings(), "loss": LossSettings()}
    changed = {
        f"{section}.{f.name}": getattr(getattr(config, section), f.name)
        for section, default in defaults.items()
        for f in fields(default)
        if getattr(getattr(config, section), f.name) != getattr(default, f.name)
    }
    fsdp2 = (trainer.parallelism == "fsdp2", f"trainer.parallelism='fsdp2' (under torchrun), got trainer.parallelism={trainer.parallelism!r}")
    ppo = (
        has_ppo_term,
        "a PPO term: loss.estimator='sampled' or an algorithm with a GRPO term (atod, sod, grpo), "
        f"got loss.estimator={loss.estimator!r} and algorithm {records.algorithm.name!r}",
    )
    acts_only_with = {  # setting: (whether this setup has what it acts with, what that is)
        "trainer.fsdp_param_dtype": fsdp2,
        "trainer.fsdp_teacher": fsdp2,
        "rollout.vllm_gpu_memory_utilization": (rollout.backend == "vllm", f"rollout.backend='vllm', got rollout.backend={rollout.backend!r}"),
        "loss.jsd_beta": (loss.divergence == "jsd", f"loss.divergence='jsd', got loss.divergence={loss.divergence!r}"),
        **dict.fromkeys(("loss.clip_low", "loss.clip_high", "loss.dual_clip"), ppo),
    }
    unused = [(key, needed) for key, (acts, needed) in acts_only_with.items() if key in changed and not acts]
    return [(False, f"{key}={changed[key]!r} acts only with {needed}; remove it or change that setting") for key, needed in unused] + [
        (
            loss.divergence in estimator.divergences,
            f"loss.divergence={loss.divergence!r} needs loss.estimator='full_vocab' (the {estimator.name} estimator is "
            f"{' or '.join(estimator.divergences)} only), got loss.estimator={loss.estimator!r}",
        ),
        (
            loss.sampled_kl == "k1" or estimator.ppo_advantage,
            f"loss.sampled_kl={loss.sampled_kl!r} needs loss.estimator='sampled' (the full-vocabulary estimator "
            f"is exact), got loss.estimator={loss.estimator!r}",
        ),
        (
            not served or not estimator.needs_teacher_model,
            "a served teacher (teacher.server_url) needs loss.estimator 'sampled' or 'topk' (the server returns "
            f"top-K log-probs, not the full vocabulary), got loss.estimator={loss.estimator!r}",
        ),
        (
            not served or model.teacher_path is None,
            f"teacher.server_url and model.teacher_path both name a teacher; set one, got {teacher.server_url!r} "
            f"and {model.teacher_path!r}",
        ),
    ]


def _check_curriculum(config: TrainConfig, algorithm: Algorithm) -> None:
    curriculum = config.curriculum
    if curriculum.episodes_per_task < algorithm.min_group_size:
        # A GRPO group of one has advantage 0: the RL term would silently vanish.
        raise ConfigError(
            f"{algorithm.name} needs curriculum.episodes_per_task >= {algorithm.min_group_size} (GRPO groups), "
            f"got {curriculum.episodes_per_task}"
        )
    try:  # the pacing's own range checks, now rather than at the first training step
        build_pacing(curriculum.pacing, eta=curriculum.eta, stage_starts=curriculum.stage_starts)
    except (TypeError, ValueError) as exc:
        message = str(exc)
        for name in ("LinearPacing.eta", "SmoothPacing.eta", "StagedPacing.stage_starts"):
            if message.startswith(name + " "):
                raise ConfigError(f"curriculum.{name.split('.')[1]}{message[len(name):]}") from None
        raise ConfigError(f"curriculum: {message}") from None


def _check_env(config: TrainConfig) -> None:
    """``env.name`` names a registered family, ``env.kwargs`` holds fields of its config, and
    what it needs (a package, data files) is there (:func:`~tcod_fast.envs.registry.check_env_settings`);
    the same for each of ``envs``, with their weights, and ``teachers``' routes."""
    if config.envs:
        _check_env_list(config)
    else:
        try:
            check_env_settings(config.env.name, config.env.kwargs)
        except ValueError as exc:
            raise ConfigError(str(exc)) from None
    teacher_routes(config)
    if len(config.teachers) > 1 and config.trainer.parallelism == "fsdp2" and config.trainer.fsdp_teacher != "whole":
        raise ConfigError(
            "several teachers run whole on every process under trainer.parallelism='fsdp2' (each micro-batch runs only "
            f"its own teacher): set trainer.fsdp_teacher=whole, got {config.trainer.fsdp_teacher!r}"
        )


def _check_env_list(config: TrainConfig) -> None:
    default = EnvSettings()
    for key in ("name", "kwargs", "train_split", "seen_split", "unseen_split", "num_train_tasks"):
        if getattr(config.env, key) != getattr(default, key):
            raise ConfigError(
                f"env.{key}={getattr(config.env, key)!r} is not used when envs lists the environments "
                f"(each entry of envs has its own {key}); remove it"
            )
    seen: set[str] = set()
    for index, entry in enumerate(config.envs):
        where = f"envs[{index}]"
        if not entry.name:
            raise ConfigError(f"{where}.name must name an environment (toy, twx-coin, scienceworld...), got {entry.name!r}")
        if entry.name in seen:
            raise ConfigError(f"{where}.name {entry.name!r} is listed twice; each environment of envs is listed once")
        seen.add(entry.name)
        if not (math.isfinite(entry.weight) and entry.weight > 0):
            raise ConfigError(f"{where}.weight must be > 0 (a sampling weight), got {entry.weight}")
        if entry.num_train_tasks is not None and entry.num_train_tasks < 1:
            raise ConfigError(f"{where}.num_train_tasks must be >= 1 (null: all), got {entry.num_train_tasks}")
        try:
            check_env_settings(entry.name, entry.kwargs)
        except ValueError as exc:
            raise ConfigError(f"{where}: {exc}") from None


def environment_names(config: TrainConfig) -> list[str]:
    """The run's environments: the names of ``envs``, else ``[env.name]``."""
    return [entry.name for entry in config.envs] if config.envs else [config.env.name]


def teacher_routes(config: TrainConfig) -> dict[str, str]:
    """env name -> the name of the teacher that supervises its episodes (``teachers``); ``{}``
    for a run with one teacher (``model.teacher_path`` / ``teacher.server_url``). A
    :class:`~tcod_fast.errors.ConfigError` line when a teacher names an environment the run
    does not have, two teachers claim one environment, or an environment has no teacher."""
    if not config.teachers:
        return {}
    if config.model.teacher_path is not None or config.teacher.server_url is not None:
        raise ConfigError(
            "teachers lists the run's teachers, so model.teacher_path and teacher.server_url must be unset, got "
            f"{config.model.teacher_path!r} and {config.teacher.server_url!r}"
        )
    names = environment_names(config)
    routes: dict[str, str] = {}
    labels: set[str] = set()
    catch_all = None
    for index, teacher in enumerate(config.teachers):
        where = f"teachers[{index}]"
        if not teacher.name or teacher.name in labels:
            raise ConfigError(f"{where}.name must be a distinct, non-empty label, got {teacher.name!r}")
        labels.add(teacher.name)
        if teacher.path is not None and teacher.server_url is not None:
            raise ConfigError(f"{where} names both a path and a server_url; set one, got {teacher.path!r} and {teacher.server_url!r}")
        if teacher.server_url is not None and not str(teacher.server_url).startswith(("http://", "https://")):
            raise ConfigError(f"{where}.server_url must start with http:// or https://, got {teacher.server_url!r}")
        if not teacher.envs:
            if catch_all is not None:
                raise ConfigError(
                    f"{where} ({teacher.name!r}) and teacher {catch_all!r} both leave envs empty (every environment); "
                    "at most one teacher may, the others name theirs"
                )
            catch_all = teacher.name
        for env_name in teacher.envs:
            if env_name not in names:
                raise ConfigError(f"{where} ({teacher.name!r}) supervises {env_name!r}, which is not an environment of this run ({', '.join(names)})")
            if env_name in routes:
                raise ConfigError(f"environment {env_name!r} is claimed by teachers {routes[env_name]!r} and {teacher.name!r}; give it one")
            routes[env_name] = teacher.name
    for env_name in names:
        if env_name not in routes:
            if catch_all is None:
                raise ConfigError(
                    f"environment {env_name!r} has no teacher: name it in one teacher's envs, or leave one teacher's envs empty"
                )
            routes[env_name] = catch_all
    return routes


def check_paths(config: TrainConfig) -> None:
    """Raise :class:`~tcod_fast.errors.ConfigError` unless every model and tokenizer path
    names a local folder that holds one (``config.json`` for a model, a tokenizer file for a
    tokenizer). Nothing is loaded."""
    model = config.model
    for name, path in (("model.student_path", model.student_path), ("model.teacher_path", model.teacher_path)):
        if path is not None:
            _check_folder(name, path, ("config.json",), "a local Hugging Face model folder with config.json")
    for index, teacher in enumerate(config.teachers):
        if teacher.path is not None:
            _check_folder(f"teachers[{index}].path", teacher.path, ("config.json",), "a local Hugging Face model folder with config.json")
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


def _value_at(config: TrainConfig, dotted: str):
    node = config
    for key in dotted.split("."):
        node = getattr(node, key)
    return node


def _non_finite_numbers(config: TrainConfig) -> list[str]:
    """One message per float field (at any depth, list items included) holding NaN or infinity."""

    def leaves(node, where):
        if is_dataclass(node):
            for f in fields(node):
                yield from leaves(getattr(node, f.name), f"{where}.{f.name}" if where else f.name)
        elif isinstance(node, tuple):
            for index, item in enumerate(node):
                yield from leaves(item, f"{where}[{index}]")
        else:
            yield where, node

    return [f"{where} must be a finite number, got {v}" for where, v in leaves(config, "") if isinstance(v, float) and not math.isfinite(v)]


def _check_tiny_model(where: str, spec: TinyModelConfig) -> None:
    for problem in spec.shape_problems():
        raise ConfigError(f"{where}.{problem}")
