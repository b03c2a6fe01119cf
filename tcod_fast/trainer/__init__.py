"""The compact trainer: config, run setup, the loop (rollout -> score -> advantages -> loss ->
update -> evaluate -> log -> checkpoint), the loss's named steps, evaluation, checkpoints,
metrics logging, plots, and data-parallel runs under ``torchrun``.

Start at :func:`tcod_fast.trainer.loop.train`; the algorithms are tabled in :mod:`tcod_fast.algorithms`.
"""

import importlib

from tcod_fast.algorithms import ALGORITHMS
from tcod_fast.trainer.config import (
    TrainConfig,
    apply_overrides,
    config_from_dict,
    config_to_dict,
    load_config,
    save_config,
)

#: Loaded on first use: the loop imports transformers-backed pieces, and
#: ``import tcod_fast.trainer`` (the config) stays light.
_LAZY = {
    "train": "tcod_fast.trainer.loop",
    "evaluate": "tcod_fast.trainer.evaluation",
    "setup_run": "tcod_fast.trainer.setup",
}

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
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'tcod_fast.trainer' has no attribute {name!r}")
