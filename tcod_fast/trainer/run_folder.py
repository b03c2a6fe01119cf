"""What a training run keeps in its folder, read without loading torch.

A run folder (``trainer.output_dir``) holds::

    config.yaml          the run's config (rewritten when a resume changes it)
    tokenizer/           the tokenizer the run trains with
    metrics.jsonl        one JSON record per training step and per evaluation
    checkpoints/         step_00000012.pt ... (step_00000012.dcp/ folders under
                         trainer.parallelism=fsdp2) and ``latest``, naming the newest
    final/               the trained student, a Hugging Face folder
    *.png                plots

The command line reads these names to refuse mixing two runs in one folder and to tell a
finished run from one to continue, before it imports the trainer.
"""

from __future__ import annotations

import re
from pathlib import Path

from tcod_fast.errors import UserError
from tcod_fast.trainer.config import config_to_dict

__all__ = [
    "FROZEN_ON_RESUME",
    "RUN_FILES",
    "check_new_run_folder",
    "check_resume_compatible",
    "checkpoint_step",
    "existing_run_files",
    "latest_checkpoint",
    "list_checkpoints",
]

#: ``step_<8 digits>.pt`` (a file) or ``.dcp`` (a sharded checkpoint's folder): the step a
#: checkpoint continues at.
CHECKPOINT_NAME = re.compile(r"^step_(\d{8})\.(?:pt|dcp)$")

#: What a training run writes into its folder; any of them means the folder holds a run.
RUN_FILES = ("config.yaml", "metrics.jsonl", "checkpoints", "final")

#: Settings a resumed run must share with the run it continues: the curriculum decides
#: what every step trains, and the student's weights only load into the same model.
FROZEN_ON_RESUME = ("curriculum", "model.student_path", "model.student_tiny")


def existing_run_files(output_dir: str | Path) -> list[str]:
    """The :data:`RUN_FILES` already in ``output_dir`` (folders with a trailing ``/``)."""
    folder = Path(output_dir)
    return [name + ("/" if (folder / name).is_dir() else "") for name in RUN_FILES if (folder / name).exists()]


def check_new_run_folder(
    output_dir: str | Path, *, setting: str = "trainer.output_dir", hint: str = "train(..., resume=True) continues the run in it"
) -> None:
    """Raise :class:`~tcod_fast.errors.UserError` when ``output_dir`` already holds a run
    (:data:`RUN_FILES`): a new run there would mix its steps, metrics and checkpoints with
    the old one's. ``setting`` and ``hint`` word the message for the caller (the CLI
    speaks of ``--output-dir`` and ``--resume``)."""
    existing = existing_run_files(output_dir)
    if existing:
        raise UserError(
            f"{setting} must be a new run folder ({hint}), got {str(output_dir)!r}, which holds {', '.join(existing)}"
        )


def checkpoint_step(path: str | Path) -> int:
    """The step a checkpoint file continues at, from its name (``step_00000012.pt`` -> 12)."""
    match = CHECKPOINT_NAME.match(Path(path).name)
    if match is None:
        raise ValueError(f"a checkpoint is named step_<8 digits>.pt or .dcp, got {Path(path).name!r}")
    return int(match.group(1))


def _checkpoint_files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if CHECKPOINT_NAME.match(p.name))


def latest_checkpoint(folder: str | Path) -> Path | None:
    """The checkpoint ``latest`` names, else the highest-step one present, else ``None``."""
    folder = Path(folder)
    if not folder.is_dir():
        return None
    pointer = folder / "latest"
    if pointer.is_file():
        candidate = folder / pointer.read_text().strip()
        if candidate.exists():
            return candidate
    checkpoints = _checkpoint_files(folder)
    return checkpoints[-1] if checkpoints else None


def list_checkpoints(folder: str | Path) -> list[Path]:
    """Checkpoint files of ``folder``, newest first: the one ``latest`` names, then the rest
    by decreasing step."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    by_step = _checkpoint_files(folder)[::-1]
    latest = latest_checkpoint(folder)
    if latest is not None and latest in by_step:
        by_step.remove(latest)
        by_step.insert(0, latest)
    return by_step


def check_resume_compatible(saved: dict, config, source: str) -> None:
    """Raise :class:`~tcod_fast.errors.UserError` when ``config`` (a ``TrainConfig``)
    changes a setting of :data:`FROZEN_ON_RESUME` from ``saved``, the plain config data of
    the run being resumed, read from ``source`` (named in the message)."""
    current = config_to_dict(config)
    for dotted in FROZEN_ON_RESUME:
        if dotted == "model.student_tiny" and config.model.student_path is not None:
            continue  # a student folder: the tiny spec is not used
        before, after = _lookup(saved, dotted), _lookup(current, dotted)
        if before is _MISSING:
            continue
        changed = _first_difference(before, after, dotted)
        if changed is not None:
            key, was, now = changed
            raise UserError(
                f"a resumed run keeps {key}={was!r} (as in its {source}), got {now!r}; "
                "start a new run in another output folder to change it"
            )


_MISSING = object()


def _lookup(data: dict, dotted: str):
    for key in dotted.split("."):
        if not isinstance(data, dict) or key not in data:
            return _MISSING
        data = data[key]
    return data


def _first_difference(before, after, where: str):
    """``(dotted key, before, after)`` of the first leaf where two plain-data trees differ."""
    if isinstance(before, dict) and isinstance(after, dict):
        for key in before:
            if key in after:
                found = _first_difference(before[key], after[key], f"{where}.{key}")
                if found is not None:
                    return found
        return None
    if isinstance(before, (list, tuple)) and isinstance(after, (list, tuple)):
        before, after = list(before), list(after)
    return None if before == after else (where, before, after)
