"""A training run's configuration: :mod:`.schema` (the ``*Settings`` sections and
:class:`TrainConfig`), :mod:`.rules` (:func:`validate`, :func:`check_paths`, and the records a
config's names resolve to) and :mod:`.loading` (files, ``--set`` overrides and plain data in
and out, OmegaConf's errors told as one line)."""

from tcod_fast.trainer.config.loading import apply_overrides, check_config, config_from_dict, config_to_dict, load_config, save_config
from tcod_fast.trainer.config.rules import RunRecords, check_paths, environment_names, resolve_records, teacher_routes, validate
from tcod_fast.trainer.config.schema import (
    EnvEntry,
    EnvSettings,
    EvalSettings,
    LoggingSettings,
    LossSettings,
    ModelSettings,
    RolloutSettings,
    TeacherEntry,
    TeacherSettings,
    TrainConfig,
    TrainerSettings,
)

__all__ = [  # fmt: skip
    "EnvEntry", "EnvSettings", "TeacherEntry", "environment_names", "teacher_routes", "EvalSettings", "LoggingSettings", "LossSettings", "ModelSettings", "RolloutSettings", "RunRecords",
    "TeacherSettings", "TrainConfig", "TrainerSettings", "apply_overrides", "check_config", "check_paths",
    "config_from_dict", "config_to_dict", "load_config", "resolve_records", "save_config", "validate",
]
