"""The compact trainer: config, the loop (rollout -> score -> advantages -> loss -> update ->
evaluate -> log -> checkpoint), checkpoints, logging, plots, the built-in demo, and
data-parallel runs under ``torchrun``.

Start at :func:`tcod_fast.trainer.loop.train`; the algorithms are tabled in :mod:`tcod_fast.algorithms`.
"""

from tcod_fast.trainer.config import (
    ALGORITHMS,
    TrainConfig,
    apply_overrides,
    config_from_dict,
    config_to_dict,
    load_config,
    save_config,
)

__all__ = [
    "ALGORITHMS",
    "TrainConfig",
    "apply_overrides",
    "config_from_dict",
    "config_to_dict",
    "load_config",
    "save_config",
    "train",
    "evaluate",
]


def __getattr__(name):
    # The loop imports transformers-backed pieces; keep `import tcod_fast.trainer` light.
    if name in ("train", "evaluate", "setup_run"):
        from tcod_fast.trainer import loop

        return getattr(loop, name)
    raise AttributeError(f"module 'tcod_fast.trainer' has no attribute {name!r}")
