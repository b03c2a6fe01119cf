"""ALFWorld on its real TextWorld engine: a generator of ALFWorld-format tasks
(:func:`generate_tasks`, the ``tcod-fast envs make-alfworld-tasks`` command) and the
:class:`AlfWorldEnv` adapter of the :class:`~tcod_fast.envs.base.Env` protocol.

Importing this package does not import ``alfworld`` (an optional extra,
``pip install alfworld==0.4.2``); the engine is imported when a task is generated or an
environment is built.
"""

from tcod_fast.envs.alfworld.adapter import AlfWorldConfig, AlfWorldEnv, split_task_text
from tcod_fast.envs.alfworld.generator import (
    TASK_TYPES,
    GeneratedTask,
    TaskGenConfig,
    cli_make_tasks,
    generate_tasks,
)

__all__ = [
    "TASK_TYPES",
    "AlfWorldConfig",
    "AlfWorldEnv",
    "GeneratedTask",
    "TaskGenConfig",
    "cli_make_tasks",
    "generate_tasks",
    "split_task_text",
]
