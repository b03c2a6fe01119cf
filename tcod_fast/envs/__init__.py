"""Text environments for multi-turn agents: the :class:`Env` protocol, its adapters, and one
:class:`EnvFamily` record per family of environments (:mod:`tcod_fast.envs.registry`).

Light to import: the engines (Java-backed TextWorld-Express and ScienceWorld, ALFWorld's
TextWorld) are imported only when an adapter is built, through :func:`make_env`.
"""

from tcod_fast.envs.base import SPLITS, Env, EnvError, EnvObservation, EnvStep

__all__ = [
    "SPLITS",
    "ActionProtocol",
    "Env",
    "EnvError",
    "EnvFamily",
    "EnvObservation",
    "EnvPool",
    "EnvSpec",
    "EnvStep",
    "PoolConfig",
    "check_env_settings",
    "env_names",
    "get_env_family",
    "make_env",
    "register_env_family",
    "unregister_env_family",
]

_LAZY = {
    "ActionProtocol": "tcod_fast.envs.actions",
    "EnvFamily": "tcod_fast.envs.family",
    "check_env_settings": "tcod_fast.envs.registry",
    "env_names": "tcod_fast.envs.registry",
    "get_env_family": "tcod_fast.envs.registry",
    "make_env": "tcod_fast.envs.registry",
    "register_env_family": "tcod_fast.envs.registry",
    "unregister_env_family": "tcod_fast.envs.registry",
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
