"""Metrics: one JSON line per training step (and per evaluation), optional TensorBoard.

Records are flat ``{"step": s, "kind": "train" | "eval", name: value, ...}`` dicts; lists
(e.g. ``kl_by_turn``) stay lists in JSON and are expanded to ``name/<i>`` scalars for
TensorBoard. On resume both are cut back to the records before the resumed step, so a
crash between a log line and its checkpoint never leaves duplicated steps. A line cut short
by a kill mid-write is skipped with a warning when read, and dropped by that cut.
"""

from __future__ import annotations

import json
import math
import warnings
from pathlib import Path
from typing import Any

from tcod_fast.errors import TcodFastWarning
from tcod_fast.trainer.atomic_files import atomic_write_bytes

__all__ = ["MetricsLogger", "read_metrics"]


def _clean(value: Any):
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)  # JSON has no NaN/inf; keep them visible instead of crashing
    if isinstance(value, (list, tuple)):
        return [_clean(v) for v in value]
    if isinstance(value, dict):
        return {k: _clean(v) for k, v in value.items()}
    if hasattr(value, "item") and callable(value.item):
        return _clean(value.item())
    return value


class MetricsLogger:
    """Appends records to ``metrics.jsonl`` (and TensorBoard when asked).

    Args:
        folder: run folder.
        jsonl: write the JSONL file.
        tensorboard: write TensorBoard events under ``folder/tensorboard`` (needs the
            ``tensorboard`` package; without it a warning is printed once and it is skipped).
        enabled: False on non-zero ranks of a distributed run.
    """

    def __init__(self, folder: str | Path, *, jsonl: bool = True, tensorboard: bool = False, enabled: bool = True):
        self.folder = Path(folder)
        self.path = self.folder / "metrics.jsonl"
        self.jsonl = jsonl and enabled
        self.enabled = enabled
        self._writer = None
        self.tensorboard = False
        # Made at the first record, so that a resumed run's writer starts with its purge.
        self._purge_step: int | None = None
        self._replay: list[dict] = []
        if tensorboard and enabled:
            try:
                from torch.utils.tensorboard import SummaryWriter  # noqa: F401

                self.tensorboard = True
            except ImportError as exc:
                print(f"[tcod-fast] TensorBoard logging is off: {exc} (pip install tensorboard)")
        if self.jsonl:
            self.folder.mkdir(parents=True, exist_ok=True)

    def truncate_from(self, step: int) -> None:
        """Drop what a run resumed at ``step`` will write again: training records of ``step``
        and later, and evaluation records after ``step`` (the evaluation *at* ``step`` ran
        before the checkpoint was written, so it is kept).

        Both logs are cut: ``metrics.jsonl`` is rewritten without those records, and the
        next TensorBoard event file starts with a purge at ``step`` (TensorBoard then drops
        every older event of ``step`` and later) followed by the kept records of ``step``
        again, written with the next record (a resumed run that logs nothing adds nothing)."""
        kept = self._truncate_jsonl(step)
        if self.tensorboard:
            self.close()
            self._purge_step = step
            self._replay = [record for record in kept if int(record.get("step", 0)) >= step]

    def _truncate_jsonl(self, step: int) -> list[dict]:
        """Cut ``metrics.jsonl`` as :meth:`truncate_from` says; returns the kept records."""
        if not self.jsonl or not self.path.exists():
            return []

        def keep(record):
            recorded = int(record.get("step", 0))
            return recorded <= step if record.get("kind") == "eval" else recorded < step

        records = read_metrics(self.path)
        kept = [r for r in records if keep(r)]
        lines = sum(1 for line in self.path.read_text(errors="replace").splitlines() if line.strip())
        if len(kept) == lines:
            return kept  # nothing to drop, no torn line: leave the file as it is
        # Rewritten atomically: a kill now leaves the old file or the cut one, never half.
        atomic_write_bytes(self.path, "".join(json.dumps(record) + "\n" for record in kept).encode())
        return kept

    def log(self, record: dict) -> None:
        if not self.enabled:
            return
        record = _clean(record)
        if self.jsonl:
            with open(self.path, "a") as handle:
                handle.write(json.dumps(record) + "\n")
        if self.tensorboard:
            if self._writer is None:
                from torch.utils.tensorboard import SummaryWriter

                self._writer = SummaryWriter(str(self.folder / "tensorboard"), purge_step=self._purge_step)
                self._purge_step = None
                for kept in self._replay:
                    self._log_tensorboard(kept)
                self._replay = []
            self._log_tensorboard(record)

    def _log_tensorboard(self, record: dict) -> None:
        step = int(record.get("step", 0))
        prefix = record.get("kind", "train")
        for name, value in record.items():
            if name in ("step", "kind"):
                continue
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                self._writer.add_scalar(f"{prefix}/{name}", value, step)
            elif isinstance(value, list):
                for index, item in enumerate(value):
                    if isinstance(item, (int, float)):
                        self._writer.add_scalar(f"{prefix}/{name}/{index}", item, step)

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
            self._writer = None


def read_metrics(path: str | Path, kind: str | None = None) -> list[dict]:
    """Records of a ``metrics.jsonl`` file (only those of ``kind`` when given).

    A line that is not a JSON record (the torn last line of a killed run) is skipped with a
    :class:`~tcod_fast.errors.TcodFastWarning` naming it.
    """
    path = Path(path)
    if not path.exists():
        return []
    records = []
    for number, line in enumerate(path.read_text(errors="replace").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            record = None
        if not isinstance(record, dict):
            shown = line if len(line) <= 60 else line[:57] + "..."
            warnings.warn(f"{path} line {number} is not a JSON record (cut short?), skipped: {shown!r}", TcodFastWarning, stacklevel=2)
            continue
        if kind is None or record.get("kind") == kind:
            records.append(record)
    return records
