"""Checkpoints written atomically, and everything needed to resume a run exactly.

A run's side, at the end of this module: :func:`checkpoint` saves a
:class:`~tcod_fast.trainer.setup.TrainingRun`, :func:`checkpoint_to_resume` finds and checks the
checkpoint a resumed run continues from, :func:`restore` puts it back into a run, and
:func:`export_student` writes the trained student. The file side:

A checkpoint is one ``torch.save`` file ``checkpoints/step_00000012.pt`` holding the student's
weights, the optimiser, the LR scheduler, the curriculum sampler, every RNG state (Python,
NumPy, torch CPU and CUDA), the step to run next and the config. ``checkpoints/latest`` names
the newest one. Under ``trainer.parallelism=fsdp2`` a checkpoint is a sharded DCP folder
``checkpoints/step_00000012.dcp/`` instead (:mod:`tcod_fast.trainer.sharded_checkpoint`).

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
import shutil
import warnings
from pathlib import Path

from tcod_fast.errors import TcodFastWarning, UserError
from tcod_fast.trainer import parallel, sharded_checkpoint
from tcod_fast.trainer.atomic_files import atomic_torch_save, publish_newest
from tcod_fast.trainer.config import TrainConfig, config_to_dict
from tcod_fast.trainer.metrics_log import read_metrics
from tcod_fast.trainer.rng_state import capture_rng_state, restore_rng_state
from tcod_fast.trainer.run_folder import CHECKPOINT_NAME as _NAME
from tcod_fast.trainer.run_folder import check_resume_compatible, checkpoint_step, latest_checkpoint, list_checkpoints
from tcod_fast.trainer.safe_loading import UnsafeFileError, load_torch_file
from tcod_fast.trainer.setup import TrainingRun

__all__ = [
    "checkpoint",
    "checkpoint_step",
    "checkpoint_to_resume",
    "export_student",
    "latest_checkpoint",
    "list_checkpoints",
    "load_checkpoint",
    "load_latest_checkpoint",
    "restore",
    "save_checkpoint",
]


def save_checkpoint(folder: str | Path, step: int, state: dict, *, keep: int = 2) -> Path:
    """Write ``state`` as ``folder/step_<step>.pt`` atomically, point ``latest`` at it, and
    delete all but the newest ``keep`` checkpoints (and stale temporary files)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"step_{step:08d}.pt"
    atomic_torch_save(state, path)
    publish_newest(folder, path, _NAME, keep=keep)
    return path


def load_checkpoint(path: str | Path) -> dict:
    """Load a checkpoint written by :func:`save_checkpoint` (on CPU); for a sharded
    checkpoint's folder, its non-tensor state (:func:`~tcod_fast.trainer.sharded_checkpoint.load_meta`)."""
    if Path(path).is_dir():
        return sharded_checkpoint.load_meta(path)
    # Tensors, plain containers and numbers only (tcod_fast.trainer.safe_loading): a file
    # naming anything else is refused unread.
    return load_torch_file(path)


def load_latest_checkpoint(folder: str | Path) -> tuple[Path, dict] | None:
    """The newest checkpoint of ``folder`` that loads, as ``(path, state)``; ``None`` when
    there is no checkpoint file at all.

    A newer file that cannot be read (a torn write) is skipped with a :class:`TcodFastWarning`
    naming it and the one used instead; when none can be read a :class:`UserError` lists them.
    A file that names an object a checkpoint never holds is not a torn write: it raises
    :class:`~tcod_fast.trainer.safe_loading.UnsafeFileError` at once, unread. A sharded
    checkpoint moved aside by an interrupted save of its step counts under ``latest``.
    """
    failures = []
    resaved = sharded_checkpoint.interrupted_resave(folder)
    for path in ([resaved] if resaved is not None else []) + list_checkpoints(folder):
        try:
            state = load_checkpoint(path)
            if not isinstance(state, dict) or "step" not in state:
                raise ValueError("not a training checkpoint (no 'step' entry)")
        except UnsafeFileError:
            raise
        except Exception as exc:  # a torn file: any other reading error means "unreadable"
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


# ======================================================================================
# a run's checkpoints
# ======================================================================================
def checkpoint_to_resume(config: TrainConfig) -> tuple[Path, dict]:
    """The newest readable checkpoint of the run folder, checked against ``config``."""
    folder = Path(config.trainer.output_dir) / "checkpoints"
    found = load_latest_checkpoint(folder)
    if found is None:
        state = "does not exist" if not folder.parent.exists() else "has no checkpoint yet"
        raise UserError(f"resuming needs a run folder with a checkpoint, got {str(folder.parent)!r}, which {state}")
    path, state = found
    step = int(state["step"])
    if step > config.trainer.steps:
        raise UserError(
            f"resuming needs trainer.steps >= {step} (the checkpoint {path.name} is at step {step}), "
            f"got {config.trainer.steps}"
        )
    check_resume_compatible(state.get("config") or {}, config, f"checkpoint {path.name}")
    return path, state


def checkpoint(run: TrainingRun) -> Path | None:
    """Save everything needed to continue at ``run.state.next_step`` (main process; atomic; a
    sharded DCP checkpoint written by every process under ``trainer.parallelism=fsdp2``)."""
    if run.config.trainer.parallelism == "fsdp2":
        meta = {
            "step": run.state.next_step,
            "scheduler": run.scheduler.state_dict(),
            "sampler": run.sampler.state_dict(),
            "config": config_to_dict(run.config),
            "expert_lens": dict(run.state.expert_lens),
        }
        return sharded_checkpoint.save_sharded(
            run.output_dir / "checkpoints", run.state.next_step, run.student, run.optimizer, meta, run.dist,
            keep=run.config.trainer.keep_checkpoints,
        )
    path = None
    if run.dist.is_main:
        state = {
            "step": run.state.next_step,
            "student": run.student.state_dict(),
            "optimizer": run.optimizer.state_dict(),
            "scheduler": run.scheduler.state_dict(),
            "sampler": run.sampler.state_dict(),
            "rng": capture_rng_state(),
            "config": config_to_dict(run.config),
            "expert_lens": dict(run.state.expert_lens),
        }
        path = save_checkpoint(
            run.output_dir / "checkpoints", run.state.next_step, state, keep=run.config.trainer.keep_checkpoints
        )
    run.dist.barrier()
    return path


def restore(run: TrainingRun, state: dict) -> None:
    """Put a checkpoint's ``state`` into ``run``: weights, optimiser, scheduler, sampler,
    RNG states, and the run state (the metrics file cut back to the checkpoint's step)."""
    if sharded_checkpoint.is_sharded_state(state):  # DCP: reshards onto this run's processes
        sharded_checkpoint.load_sharded(state, run.student, run.optimizer, run.dist)
    elif parallel.is_sharded(run.student):
        raise UserError(
            "trainer.parallelism=fsdp2 on several processes resumes from a sharded (.dcp) checkpoint, "
            "got a single-file one; resume it with trainer.parallelism=ddp"
        )
    else:
        run.student.load_state_dict(state["student"])
        run.optimizer.load_state_dict(state["optimizer"])
    run.scheduler.load_state_dict(state["scheduler"])
    run.sampler.load_state_dict(state["sampler"])
    restore_rng_state(sharded_checkpoint.rank_rng_state(state, run.dist.rank))
    run.state.expert_lens.update(state.get("expert_lens", {}))
    run.state.next_step = int(state["step"])
    # Records of steps after the checkpoint are redone: drop them (and a torn last line).
    run.logger.truncate_from(run.state.next_step)
    if run.logger.jsonl:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", TcodFastWarning)  # the cut already reported nothing new
            run.state.history = read_metrics(run.logger.path)
        evals = [record for record in run.state.history if record.get("kind") == "eval"]
        run.state.last_eval = evals[-1] if evals else None


def export_student(run: TrainingRun, folder: Path) -> None:
    """The trained student as a Hugging Face folder (weights + tokenizer) for ``tcod-fast eval``.

    Written beside ``folder`` and renamed onto it, so ``folder`` is either the previous
    export or the complete new one, never half of one. A sharded student is gathered to
    rank 0 first and saved as a plain model."""
    gathered = parallel.export_state_dict(run.student)
    if run.dist.is_main:
        folder = Path(folder)
        partial = folder.with_name(folder.name + ".partial")
        shutil.rmtree(partial, ignore_errors=True)
        student = run.student if gathered is None else parallel.plain_copy(run.student, gathered)
        student.save_pretrained(str(partial))
        run.tokenizer.save_pretrained(str(partial))
        shutil.rmtree(folder, ignore_errors=True)
        os.replace(partial, folder)
    run.dist.barrier()
