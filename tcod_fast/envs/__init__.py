"""Text environments for multi-turn agents: the :class:`Env` protocol and its adapters.

Light to import: the engines (Java-backed TextWorld-Express and ScienceWorld, ALFWorld's
TextWorld) are imported only when an adapter is built, through :func:`make_env`.
"""

from tcod_fast.envs.base import SPLITS, Env, EnvError, EnvObservation, EnvStep

__all__ = ["SPLITS", "Env", "EnvError", "EnvObservation", "EnvStep", "EnvSpec", "EnvPool", "PoolConfig", "make_env"]

_LAZY = {
    "make_env": "tcod_fast.envs.registry",
    "EnvSpec": "tcod_fast.envs.registry",
    "EnvPool": "tcod_fast.envs.pool",
    "PoolConfig": "tcod_fast.envs.pool",
}


def __getattr__(name: str):
    # Imported on first use so `import tcod_fast.envs` stays cheap (no multiprocessing,
    # no engines) for code that only needs the protocol types.
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'tcod_fast.envs' has no attribute {name!r}")
