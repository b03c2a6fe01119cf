"""Building what a run needs from its config: prompter, tokenizer, models, environments.

Nothing here downloads: models and tokenizers come from local folders, or are built in code
(a word-level tokenizer learnt from the environment's own texts and random-init tiny LMs).
"""

from __future__ import annotations

import dataclasses
import sys
from pathlib import Path

import torch
from tqdm.auto import tqdm
from transformers import masking_utils

from tcod_fast.envs.mixture import MixtureSpec, mixture_task
from tcod_fast.envs.pool import EnvPool, PoolConfig
from tcod_fast.envs.registry import EnvSpec, get_env_family
from tcod_fast.errors import UserError
from tcod_fast.rollout import EnvListDriver, PaperPrompter, PrompterByEnv, expert_episode_texts
from tcod_fast.rollout.prompts import prompt_config_for
from tcod_fast.rollout.vocabulary import format_error_feedback_texts
from tcod_fast.tiny_models import TinyModelConfig, build_tiny_causal_lm, build_word_tokenizer
from tcod_fast.trainer.config import EnvSettings, TrainConfig
from tcod_fast.trainer.safe_loading import check_model_folder

__all__ = [
    "build_envs",
    "build_model",
    "build_prompter",
    "build_run_envs",
    "build_run_prompter",
    "build_tokenizer",
    "env_task_splits",
    "env_weights",
    "make_run_env",
    "run_environments",
    "run_task_splits",
    "load_tokenizer",
    "torch_dtype",
]

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def torch_dtype(name: str) -> torch.dtype:
    if name not in _DTYPES:
        raise ValueError(f"dtype must be one of {sorted(_DTYPES)}, got {name!r}")
    return _DTYPES[name]


def build_prompter(env: EnvSettings):
    """The papers' prompt for ``env.name`` with the run's layout options, reading replies with
    the env family's action protocol."""
    overrides = dict(
        history_length=env.history_length,
        think=env.think,
        show_admissible_actions=env.show_admissible_actions,
        style=env.prompt_style,
    )
    if env.max_admissible_actions is not None:
        overrides["max_admissible_actions"] = env.max_admissible_actions
    return PaperPrompter(prompt_config_for(env.name, **overrides), action_protocol=get_env_family(env.name).action_protocol)


# ---------------------------------------------------------------- the run's environments
def run_environments(config: TrainConfig) -> dict[str, EnvSettings]:
    """env name -> the full ``env`` settings of each environment of the run: ``envs``' entries
    (each ``env`` with the entry's name, kwargs and splits), else ``{env.name: env}``."""
    if not config.envs:
        return {config.env.name: config.env}
    return {
        entry.name: dataclasses.replace(
            config.env,
            name=entry.name,
            kwargs=dict(entry.kwargs),
            train_split=entry.train_split,
            seen_split=entry.seen_split,
            unseen_split=entry.unseen_split,
            num_train_tasks=entry.num_train_tasks,
        )
        for entry in config.envs
    }


def env_weights(config: TrainConfig) -> dict[str, float]:
    """env name -> sampling weight of a run with several environments (``envs``)."""
    return {entry.name: float(entry.weight) for entry in config.envs}


def build_run_prompter(config: TrainConfig):
    """The run's prompter: :func:`build_prompter` of its one environment, or one per
    environment, routed by each episode's task (:class:`~tcod_fast.rollout.PrompterByEnv`)."""
    if not config.envs:
        return build_prompter(config.env)
    return PrompterByEnv({name: build_prompter(settings) for name, settings in run_environments(config).items()})


def _mixture_spec(config: TrainConfig) -> MixtureSpec:
    environments = run_environments(config)
    return MixtureSpec(tuple((name, EnvSpec(name, dict(settings.kwargs))) for name, settings in environments.items()))


def make_run_env(config: TrainConfig):
    """One environment of the run: of its one env, or an :class:`~tcod_fast.envs.mixture.EnvMixture`
    of its several, whose task ids name their environment."""
    if not config.envs:
        return make_one_env(config.env)
    return _mixture_spec(config)()


def build_run_envs(config: TrainConfig, num_slots: int, *, progress: bool = False):
    """:func:`build_envs` for the run: each slot holds an environment mixture when the run has
    several (members start when a slot first plays their tasks)."""
    if not config.envs:
        return build_envs(config.env, num_slots, progress=progress)
    spec = _mixture_spec(config)
    if config.env.pool_workers > 0:
        pool = EnvPool(spec, num_slots, PoolConfig(num_workers=config.env.pool_workers))
        pool.start_envs(progress=progress, description="starting environment mixtures")
        return pool
    return EnvListDriver([spec() for _ in range(num_slots)])


def run_task_splits(config: TrainConfig, env=None) -> dict[str, list[str]]:
    """:func:`env_task_splits` of the run: with several environments, each one's splits (its
    own split names and ``num_train_tasks``) as mixture task ids, environment by environment."""
    if not config.envs:
        return env_task_splits(config.env, env)
    mixture = env if env is not None else make_run_env(config)
    try:
        splits: dict[str, list[str]] = {"train": [], "seen": [], "unseen": []}
        for name, settings in run_environments(config).items():
            own = env_task_splits(settings, mixture.member(name))
            for split, tasks in own.items():
                splits[split] += [mixture_task(name, task) for task in tasks]
        return splits
    finally:
        if env is None:
            mixture.close()


def make_one_env(env: EnvSettings):
    """One environment of ``env.name`` built from ``env.kwargs``, by its family's factory."""
    return get_env_family(env.name).make(env.name, **env.kwargs)


def build_envs(env: EnvSettings, num_slots: int, *, progress: bool = False):
    """``num_slots`` episode slots: in-process environments, or an ``EnvPool`` of workers.

    Every slot's environment is started here (engines such as ScienceWorld's JVM take
    seconds each); ``progress`` shows a bar of the started ones on stderr."""
    if env.pool_workers > 0:
        pool = EnvPool(EnvSpec(env.name, dict(env.kwargs)), num_slots, PoolConfig(num_workers=env.pool_workers))
        pool.start_envs(progress=progress, description=f"starting {env.name} envs")
        return pool
    slots = tqdm(range(num_slots), desc=f"starting {env.name} envs", unit="env", disable=not progress)
    return EnvListDriver([make_one_env(env) for _ in slots])


def env_task_splits(env_settings: EnvSettings, env=None) -> dict[str, list[str]]:
    """Task ids of the train, seen and unseen splits (train capped at ``num_train_tasks``)."""
    env = env if env is not None else make_one_env(env_settings)
    train = list(env.list_tasks(env_settings.train_split))
    if env_settings.num_train_tasks is not None:
        train = train[: env_settings.num_train_tasks]
    if not train:
        raise ValueError(f"env {env_settings.name!r} has no tasks in split {env_settings.train_split!r}")
    return {
        "train": train,
        "seen": list(env.list_tasks(env_settings.seen_split)),
        "unseen": list(env.list_tasks(env_settings.unseen_split)),
    }


def build_tokenizer(
    config: TrainConfig, prompter, *, max_tasks_per_split: int | None = None, progress: bool | None = None
):
    """A word-level tokenizer learnt from the environment's expert episodes (all splits;
    ``env.vocab_tasks_per_split`` tasks of each unless ``max_tasks_per_split`` says otherwise).

    Playing those episodes takes minutes in the slower engines (ScienceWorld), so a bar on
    stderr counts them (``progress``, default ``config.logging.progress``)."""
    if max_tasks_per_split is None:
        max_tasks_per_split = config.env.vocab_tasks_per_split
    if progress is None:
        progress = config.logging.progress
    texts = []
    for name, settings in run_environments(config).items():  # one environment, or each of several
        env = make_one_env(settings)
        own_prompter = prompter.prompters[name] if isinstance(prompter, PrompterByEnv) else prompter
        try:
            splits = env_task_splits(settings, env)
            chosen = [list(tasks)[: max_tasks_per_split or None] for tasks in splits.values()]
            bar = tqdm(
                total=sum(map(len, chosen)),
                desc=f"vocabulary from {name} expert episodes",
                unit="episode",
                disable=not progress,
            )
            with bar:
                for tasks in chosen:  # the same texts, in the same order, as one call per split
                    for task in tasks:
                        texts += expert_episode_texts(env, [task], own_prompter, include_feedback=False)
                        bar.update(1)
                    texts += format_error_feedback_texts(own_prompter)
        finally:
            env.close()
    return build_word_tokenizer(texts)


def load_tokenizer(path: str | Path):
    """A tokenizer from a local folder (never the hub)."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(path), local_files_only=True)


#: Attention implementations of transformers that keep the sequences of a padding-free row
#: apart when the model is called with ``attention_mask=None`` and ``position_ids`` restarting
#: at 0: the masks of ``eager``, ``sdpa`` and ``flex_attention`` are built by
#: ``masking_utils.create_causal_mask``, which finds the packed sequences from the positions;
#: flash attention derives its ``cu_seqlens`` from them.
PADDING_FREE_ATTENTION = ("eager", "sdpa", "flex_attention", "flash_attention_2", "flash_attention_3")


def keeps_packed_sequences_apart(model: torch.nn.Module) -> bool:
    """Whether ``model`` keeps the sequences of a padding-free row apart: its attention
    implementation is one of :data:`PADDING_FREE_ATTENTION` and its decoder builds its mask
    with transformers' ``create_causal_mask`` (or uses flash attention)."""
    attention = getattr(getattr(model, "config", None), "_attn_implementation", None)
    if attention not in PADDING_FREE_ATTENTION or not hasattr(masking_utils, "find_packed_sequence_indices"):
        return False
    decoder_module = sys.modules.get(type(getattr(model, "base_model", model)).__module__)
    return attention.startswith("flash_attention") or hasattr(decoder_module, "create_causal_mask")


#: Attention implementations whose cost on a padding-free row stays per sequence (flash
#: attention's varlen kernels) or per block of the block-diagonal mask (flex attention).
#: ``eager`` and ``sdpa`` keep packed sequences apart too, but through a dense ``N x N`` mask
#: over the whole row: on the demo's model a step took 1.4x the padded one's time
#: (benchmarks/results/padding_free_cpu.json), so ``auto`` keeps them padded.
PER_SEQUENCE_ATTENTION = ("flex_attention", "flash_attention_2", "flash_attention_3")


def padding_free(packing: str, *models: torch.nn.Module | None) -> bool:
    """``loss.packing`` for these models: ``auto`` is padding-free when every model keeps
    packed sequences apart at a per-sequence cost (:data:`PER_SEQUENCE_ATTENTION`);
    ``padding_free`` for a model that does not keep them apart is a
    :class:`~tcod_fast.errors.UserError`."""
    present = [m for m in models if m is not None]
    unable = [m for m in present if not keeps_packed_sequences_apart(m)]
    if packing == "auto":
        return not unable and all(getattr(m.config, "_attn_implementation", None) in PER_SEQUENCE_ATTENTION for m in present)
    if packing == "padding_free" and unable:
        names = ", ".join(f"{type(m).__name__} (attention {getattr(m.config, '_attn_implementation', None)!r})" for m in unable)
        raise UserError(
            f"loss.packing='padding_free' needs models whose attention keeps packed sequences apart "
            f"({', '.join(PADDING_FREE_ATTENTION)} with transformers' causal masks), got {names}; use loss.packing=padded"
        )
    return packing == "padding_free"


def build_model(path: str | None, tiny: TinyModelConfig, tokenizer, *, dtype: torch.dtype = torch.float32):
    """A causal LM from a local folder, or the tiny random-init model of ``tiny``.

    Raises:
        UserError: before any weight is read, when the folder's model has fewer embedding
            rows (``vocab_size``) than ``tokenizer`` has tokens, or a pickle-based weights
            file in it names anything but tensors (:func:`~tcod_fast.trainer.safe_loading.check_model_folder`;
            ``*.safetensors`` hold no code, and remote code is never trusted)."""
    if path is not None:
        from transformers import AutoConfig, AutoModelForCausalLM

        check_model_folder(path)

        vocab_size = getattr(AutoConfig.from_pretrained(str(path), local_files_only=True), "vocab_size", None)
        if vocab_size is not None and len(tokenizer) > vocab_size:
            source = getattr(tokenizer, "name_or_path", "") or "the run's"
            raise UserError(
                f"the model at {path} must cover the run's tokenizer ({len(tokenizer)} tokens, from {source}), "
                f"got vocab_size {vocab_size}: teacher and student must share a vocabulary "
                "(model.tokenizer_path names the tokenizer to use)"
            )
        return AutoModelForCausalLM.from_pretrained(str(path), dtype=dtype, local_files_only=True)
    return build_tiny_causal_lm(tiny, tokenizer, dtype=dtype)
