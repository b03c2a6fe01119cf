"""Files written atomically: to a temporary name beside the target, flushed and fsynced, then
``os.replace``d onto it, so a crash leaves the old file or the new one, never a torn one.
Leftover temporary files start with :data:`TMP_PREFIX`."""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch

__all__ = ["TMP_PREFIX", "atomic_torch_save", "atomic_write_bytes"]

#: Name prefix of the temporary files (ignored by readers, removed on the next checkpoint).
TMP_PREFIX = ".tmp-"


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
    fd, tmp_name = tempfile.mkstemp(prefix=TMP_PREFIX + path.name + ".", dir=path.parent)
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


def publish_newest(folder: Path, newest: Path, name_pattern, *, keep: int) -> None:
    """Point ``folder/latest`` at ``newest`` (atomically), then delete all but the newest
    ``keep`` entries whose names match ``name_pattern`` (files or folders, sorted by name)
    and any temporary leftovers of torn writes."""
    atomic_write_bytes(folder / "latest", (newest.name + "\n").encode())
    entries = sorted(p for p in folder.iterdir() if name_pattern.match(p.name))
    for old in entries[: max(len(entries) - max(keep, 1), 0)]:
        if old != newest:
            shutil.rmtree(old) if old.is_dir() else old.unlink(missing_ok=True)
    for stale in folder.glob(TMP_PREFIX + "*"):
        shutil.rmtree(stale, ignore_errors=True) if stale.is_dir() else stale.unlink(missing_ok=True)
