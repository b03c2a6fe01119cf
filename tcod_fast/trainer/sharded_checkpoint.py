"""Sharded checkpoints with PyTorch Distributed Checkpoint (DCP), for ``trainer.parallelism = "fsdp2"``.

A sharded checkpoint is a folder ``checkpoints/step_00000012.dcp/`` holding:

* DCP's files (``.metadata`` and one ``__<rank>_0.distcp`` per writing process): the
  student's weights and the AdamW state, each process writing its own shards, through
  ``get_model_state_dict`` / ``get_optimizer_state_dict`` (keys are parameter names, so the
  checkpoint does not depend on how the model was sharded);
* ``meta.pt``: the step to run next, the LR scheduler, the curriculum sampler, the config,
  the expert lengths, and the RNG states of every process (written by rank 0).

It loads onto any number of processes, sharded or not: ``dcp.load`` reshards the saved
tensors into whatever this process's model and optimiser hold (a plain model on one process,
FSDP2 shards on N). RNG states are per process: process ``r`` takes saved process ``r``'s,
or rank 0's when the saving run had fewer processes.

Atomicity: everything is written into ``checkpoints/.tmp-step_00000012.dcp/``; after every
process has finished (DCP's own commit writes ``.metadata`` last, then a barrier), rank 0
renames the folder onto its final name (an atomic ``rename`` on POSIX) and only then points
``latest`` at it. A process killed at any moment leaves either no folder under the final
name or a complete one; the previous checkpoint stays valid and the temporary folder is
removed on the next save. Saving a step that already has a checkpoint (a resumed run) first
moves the old folder aside; a crash before the new one takes its name leaves ``latest``
naming the moved-aside folder, which resuming reads (:func:`interrupted_resave`) and the
next save puts back.
"""

from __future__ import annotations

import os
import shutil
import warnings
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.state_dict import (
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)

from tcod_fast.errors import UserError
from tcod_fast.trainer.atomic_files import TMP_PREFIX, atomic_torch_save, publish_newest
from tcod_fast.trainer.distributed import DistContext
from tcod_fast.trainer.rng_state import capture_rng_state
from tcod_fast.trainer.run_folder import CHECKPOINT_NAME
from tcod_fast.trainer.safe_loading import SafeFileSystemReader, SafeLoadPlanner, load_torch_file, read_dcp_metadata

__all__ = [
    "META_NAME",
    "SUFFIX",
    "interrupted_resave",
    "is_sharded_state",
    "load_meta",
    "load_sharded",
    "rank_rng_state",
    "save_sharded",
]

SUFFIX = ".dcp"
META_NAME = "meta.pt"


@contextmanager
def _single_process_quietly():
    """DCP warns that it assumes one process whenever no process group exists; on one
    process that is what is meant."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r"torch\.distributed is disabled, unavailable or uninitialized")
        yield


def _all_rng_states(context: DistContext) -> list[dict]:
    mine = capture_rng_state()
    if not context.enabled:
        return [mine]
    gathered: list[Any] = [None] * context.world_size
    dist.all_gather_object(gathered, mine)
    return gathered


def _moved_aside(final: Path) -> Path:
    """Where the checkpoint ``final`` waits while the same step is saved again."""
    return final.with_name(f"{TMP_PREFIX}{final.name}.replaced")


def _missing_latest(folder: Path) -> Path | None:
    """The checkpoint ``folder/latest`` names when a save of the same step stopped after moving
    it aside and before the new folder took its name (it waits at :func:`_moved_aside`)."""
    pointer = folder / "latest"
    if not pointer.is_file():
        return None
    final = folder / pointer.read_text().strip()
    return final if not final.exists() and (_moved_aside(final) / ".metadata").is_file() else None


def interrupted_resave(folder: str | Path) -> Path | None:
    """Where the checkpoint ``folder/latest`` names waits, moved aside by a save of the same
    step that did not finish; ``None`` when there is no such leftover."""
    final = _missing_latest(Path(folder))
    return None if final is None else _moved_aside(final)


def save_sharded(folder: str | Path, step: int, model: torch.nn.Module, optimizer, meta: dict, context: DistContext, *, keep: int = 2) -> Path:
    """Write ``folder/step_<step>.dcp`` (collective: every process calls it) and point
    ``folder/latest`` at it; keep the newest ``keep`` checkpoints. ``meta``: the picklable
    non-tensor state (its ``"rng"`` entry is replaced by every process's RNG states)."""
    folder = Path(folder)
    final = folder / f"step_{step:08d}{SUFFIX}"
    partial = folder / f"{TMP_PREFIX}{final.name}"
    if context.is_main:
        folder.mkdir(parents=True, exist_ok=True)
        missing = _missing_latest(folder)
        if missing is not None:  # put it back under its name before publish_newest sweeps .tmp-*
            os.replace(_moved_aside(missing), missing)
        shutil.rmtree(partial, ignore_errors=True)
        partial.mkdir()
    context.barrier()
    rng_states = _all_rng_states(context)
    state = {"student": get_model_state_dict(model), "optimizer": get_optimizer_state_dict(model, optimizer)}
    with _single_process_quietly():
        dcp.save(state, checkpoint_id=str(partial), no_dist=not context.enabled)
    if context.is_main:
        atomic_torch_save({**meta, "rng": rng_states, "world_size": context.world_size}, partial / META_NAME)
        if final.exists():
            # The same step saved again (a resumed run): move the old folder aside with one
            # rename (publish_newest removes it) instead of deleting it before the new one is
            # in place; a crash between the two renames is undone by _missing_latest.
            replaced = _moved_aside(final)
            shutil.rmtree(replaced, ignore_errors=True)
            os.replace(final, replaced)
        os.replace(partial, final)
        publish_newest(folder, final, CHECKPOINT_NAME, keep=keep)
    context.barrier()
    return final


def load_meta(path: str | Path) -> dict:
    """The non-tensor state of the sharded checkpoint ``path`` (a ``.dcp`` folder), with
    ``"sharded_path"`` naming the folder for :func:`load_sharded`."""
    path = Path(path)
    if not (path / ".metadata").is_file():
        raise ValueError("not a complete DCP checkpoint (no .metadata)")
    read_dcp_metadata(path)  # data only: refused here, before any model is built, if it names code
    state = load_torch_file(path / META_NAME)
    state["sharded_path"] = str(path)
    return state


def is_sharded_state(state: dict) -> bool:
    return "sharded_path" in state


def load_sharded(state: dict, model: torch.nn.Module, optimizer, context: DistContext) -> None:
    """Load the student's weights and the optimiser state of the checkpoint whose meta is
    ``state`` into ``model`` / ``optimizer`` (collective under a process group), resharding
    from however many processes saved it."""
    target = {"student": get_model_state_dict(model), "optimizer": get_optimizer_state_dict(model, optimizer)}
    folder = state["sharded_path"]
    try:
        with _single_process_quietly():
            # DCP's own reader and planner unpickle without restriction: these two do not
            dcp.load(target, storage_reader=SafeFileSystemReader(folder), planner=SafeLoadPlanner(), no_dist=not context.enabled)
    except CheckpointException as exc:  # DCP wraps each process's error: a refusal stays one line
        refusals = [error for error, _ in exc.failures.values() if isinstance(error, UserError)]
        if refusals:
            raise refusals[0] from None
        raise
    set_model_state_dict(model, target["student"])
    set_optimizer_state_dict(model, optimizer, target["optimizer"])


def rank_rng_state(state: dict, rank: int) -> dict:
    """This process's RNG state from a checkpoint's ``"rng"`` entry (a list per process for
    sharded checkpoints, one dict for single-file ones)."""
    rng = state["rng"]
    if isinstance(rng, list):
        return rng[rank] if rank < len(rng) else rng[0]
    return rng
