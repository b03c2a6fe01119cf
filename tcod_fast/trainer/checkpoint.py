"""Checkpoints written atomically, and everything needed to resume a run exactly.

A checkpoint is one ``torch.save`` file ``checkpoints/step_00000012.pt`` holding the student's
weights, the optimiser, the LR scheduler, the curriculum sampler, every RNG state (Python,
NumPy, torch CPU and CUDA), the step to run next and the config. ``checkpoints/latest`` names
the newest one.

Atomicity: each file is written to a temporary name in the same folder, flushed and fsynced,
then ``os.replace``d onto its final name (atomic on POSIX and Windows), and ``latest`` is
updated the same way only after the checkpoint is in place. A crash at any moment leaves
either the old state or the new one, never a torn file under a final name; leftover
temporary files are ignored and cleaned on the next save. A checkpoint that still cannot be
read (a disk fault, a copy cut short) is skipped with a warning by
:func:`load_latest_checkpoint`, which falls back to the newest one that loads.
"""

from __future__ import annotations

import os
import random
import tempfile
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch

from tcod_fast.errors import TcodFastWarning, UserError
from tcod_fast.trainer.run_folder import CHECKPOINT_NAME as _NAME
from tcod_fast.trainer.run_folder import checkpoint_step, latest_checkpoint, list_checkpoints

__all__ = [
    "atomic_write_bytes",
    "atomic_torch_save",
    "capture_rng_state",
    "restore_rng_state",
    "checkpoint_step",
    "latest_checkpoint",
    "list_checkpoints",
    "load_checkpoint",
    "load_latest_checkpoint",
    "save_checkpoint",
]

_TMP_PREFIX = ".tmp-"


def _fsync_dir(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:  # pragma: no cover - platforms without directory fds
        return
    try:
        os.fsync(fd)
    except OSError:  # pragma: no cover
        pass
    finally:
        os.close(fd)


def _atomic_write(path: Path, write) -> None:
    """Run ``write(file_object)`` into a temp file beside ``path``, then rename it onto ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=_TMP_PREFIX + path.name + ".", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as handle:
            write(handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp_name, path)
    except BaseException:
        # The temp file is garbage now; the previous file under ``path`` is untouched.
        try:
            os.unlink(tmp_name)
        except FileNotFoundError:
            pass
        raise
    _fsync_dir(path.parent)


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    _atomic_write(Path(path), lambda handle: handle.write(data))


def atomic_torch_save(obj: Any, path: str | Path) -> None:
    _atomic_write(Path(path), lambda handle: torch.save(obj, handle))


def capture_rng_state() -> dict:
    state = {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_checkpoint(folder: str | Path, step: int, state: dict, *, keep: int = 2) -> Path:
    """Write ``state`` as ``folder/step_<step>.pt`` atomically, point ``latest`` at it, and
    delete all but the newest ``keep`` checkpoints (and stale temporary files)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"step_{step:08d}.pt"
    atomic_torch_save(state, path)
    atomic_write_bytes(folder / "latest", (path.name + "\n").encode())
    checkpoints = sorted(p for p in folder.iterdir() if _NAME.match(p.name))
    for old in checkpoints[: max(len(checkpoints) - max(keep, 1), 0)]:
        if old != path:
            old.unlink(missing_ok=True)
    for stale in folder.glob(_TMP_PREFIX + "*"):
        stale.unlink(missing_ok=True)
    return path


def load_checkpoint(path: str | Path) -> dict:
    """Load a checkpoint written by :func:`save_checkpoint` (on CPU)."""
    # The file holds optimiser state, RNG tuples and plain config data, not just tensors.
    return torch.load(Path(path), map_location="cpu", weights_only=False)


def load_latest_checkpoint(folder: str | Path) -> tuple[Path, dict] | None:
    """The newest checkpoint of ``folder`` that loads, as ``(path, state)``; ``None`` when
    there is no checkpoint file at all.

    A newer file that cannot be read is skipped with a :class:`TcodFastWarning` naming it
    and the one used instead; when none can be read a :class:`UserError` lists them.
    """
    failures = []
    for path in list_checkpoints(folder):
        try:
            state = load_checkpoint(path)
            if not isinstance(state, dict) or "step" not in state:
                raise ValueError("not a training checkpoint (no 'step' entry)")
        except Exception as exc:  # a torn or foreign file: any unpickling error means "unreadable"
            failures.append(f"{path.name} ({type(exc).__name__}: {' '.join(str(exc).split())[:120]})")
            continue
        if failures:
            warnings.warn(
                f"checkpoint {'; '.join(failures)} cannot be read; resuming from {path.name} instead",
                TcodFastWarning,
                stacklevel=2,
            )
        return path, state
    if failures:
        raise UserError(f"resuming needs a readable checkpoint in {folder}, got only unreadable files: {'; '.join(failures)}")
    return None
