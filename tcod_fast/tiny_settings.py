"""``TCOD_FAST_TINY=1``: every ``tcod-fast`` command on tiny settings, to check an install.

With this environment variable set, a command runs exactly as typed but on the smallest
settings that still exercise all of it, in seconds instead of minutes:

* ``train`` starts a new run with :func:`tiny_train_overrides` (2 steps, few tasks, tiny
  random-init models; the toy game's smallest layout) over its ``--config`` and below its ``--set`` values; ``--resume``
  reads the run's own ``config.yaml`` as always;
* ``demo`` uses the ``tiny`` preset whatever ``--quick``/``--full`` say;
* ``bench`` uses ``kernel-demo``'s tiny batch unless sizes are given;
* the benchmark scripts under ``benchmarks/`` take tiny shapes as their defaults.

The numbers such runs print mean nothing; the test of the README's commands runs every
command this way.
"""

from __future__ import annotations

import os

__all__ = ["TINY_ENV_VAR", "TINY_TRAIN_OVERRIDES", "tiny_requested", "tiny_train_overrides"]

TINY_ENV_VAR = "TCOD_FAST_TINY"

#: ``--set`` values a new ``train`` run starts from under ``TCOD_FAST_TINY=1``.
TINY_TRAIN_OVERRIDES = (
    "trainer.steps=2",
    "trainer.num_threads=1",
    "trainer.micro_batch_tokens=4096",
    "trainer.lr=1e-3",
    "env.num_train_tasks=8",
    "env.vocab_tasks_per_split=8",
    "rollout.tasks_per_step=2",
    "rollout.max_new_tokens=6",
    "curriculum.max_turns=4",
    "curriculum.eta=1",
    "curriculum.b2f_default_expert_len=6",
    "eval.num_tasks=2",
    "logging.progress=false",
    "model.student_tiny={hidden_size: 32, intermediate_size: 64, num_hidden_layers: 1, seed: 1}",
    "model.teacher_tiny={hidden_size: 48, intermediate_size: 96, num_hidden_layers: 1, seed: 2}",
)


def tiny_train_overrides(env_name: str) -> list[str]:
    """The tiny ``--set`` values for a new run in environment ``env_name``: the shared ones,
    then its family's (``EnvFamily.tiny_overrides``; the toy game's smallest layout).

    Args:
        env_name: ``env.name`` of the run (an unknown name adds nothing).
    """
    from tcod_fast.envs.registry import find_env_family

    family = find_env_family(env_name)
    return [*TINY_TRAIN_OVERRIDES, *(family.tiny_overrides if family is not None else ())]


def __getattr__(name: str):
    # TINY_ENV_OVERRIDES, the extra --set values per env family, is read from the registry
    # on first use so importing this module imports no environment code.
    if name == "TINY_ENV_OVERRIDES":
        from tcod_fast.envs.registry import env_families

        return {family.name: family.tiny_overrides for family in env_families() if family.tiny_overrides}
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def tiny_requested() -> bool:
    """Whether ``TCOD_FAST_TINY`` is set to something other than empty or ``0``."""
    return os.environ.get(TINY_ENV_VAR, "").strip() not in ("", "0")
