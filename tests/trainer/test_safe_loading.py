"""Files a run reads back are data, never code: a planted pickle payload in a checkpoint, a
DCP checkpoint or a model folder is refused with one line (exit code 2) through the CLI, and
the payload never runs; checkpoints holding NumPy RNG arrays still load."""

import os
import pickle
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from tcod_fast.trainer.checkpoint import load_checkpoint, load_latest_checkpoint
from tcod_fast.trainer.rng_state import capture_rng_state, restore_rng_state
from tcod_fast.trainer.safe_loading import UnsafeFileError, read_dcp_metadata

REPO = Path(__file__).resolve().parents[2]


class Payload:
    """Unpickling this runs ``touch <marker>``."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def _cli(*args, cwd):
    env = {**os.environ, "TCOD_FAST_TINY": "1", "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
    env.pop("TCOD_FAST_DEBUG", None)
    return subprocess.run([sys.executable, "-m", "tcod_fast.cli", *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=900)


def _assert_refused(out, pattern):
    assert out.returncode == 2, out.stdout[-2000:] + out.stderr[-3000:]
    lines = [line for line in out.stderr.splitlines() if not line.startswith("tcod-fast train: warning:")]
    assert len(lines) == 1 and re.fullmatch(pattern, lines[0]), out.stderr[-3000:]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Two finished tiny runs with a checkpoint every step: single-file and sharded (DCP)."""
    root = tmp_path_factory.mktemp("runs")
    for name, extra in (("run", []), ("sharded", ["--set", "trainer.parallelism=fsdp2"])):
        out = _cli("train", "--steps", "2", "--set", "trainer.checkpoint_every=1", "--output-dir", name, *extra, cwd=root)
        assert out.returncode == 0, out.stderr[-3000:]
    return root


def _copy_run(runs, name, tmp_path):
    import shutil

    shutil.copytree(runs / name, tmp_path / name)
    return tmp_path / name


@pytest.mark.slow
def test_a_payload_in_a_checkpoint_is_refused_and_never_runs(runs, tmp_path):
    run = _copy_run(runs, "run", tmp_path)
    path = run / "checkpoints" / "step_00000002.pt"
    state = load_checkpoint(path)
    torch.save({**state, "note": Payload(tmp_path / "PWNED")}, path)
    out = _cli("train", "--output-dir", "run", "--resume", "--steps", "3", cwd=tmp_path)
    _assert_refused(out, r"tcod-fast train: checkpoint run/checkpoints/step_00000002\.pt holds an object of type posix\.system, "
                         r"which a checkpoint never contains; nothing of it was run")  # fmt: skip
    assert not (tmp_path / "PWNED").exists()
    # not mistaken for a torn write: the older checkpoint is not used instead
    with pytest.raises(UnsafeFileError):
        load_latest_checkpoint(run / "checkpoints")
    assert not (tmp_path / "PWNED").exists()


@pytest.mark.slow
def test_a_payload_in_a_sharded_checkpoint_is_refused_and_never_runs(runs, tmp_path):
    run = _copy_run(runs, "sharded", tmp_path)
    folder = run / "checkpoints" / "step_00000002.dcp"
    marker = tmp_path / "PWNED"
    # meta.pt (torch.save)
    meta = torch.load(folder / "meta.pt", weights_only=True)
    torch.save({**meta, "note": Payload(marker)}, folder / "meta.pt")
    out = _cli("train", "--output-dir", "sharded", "--resume", "--steps", "3", cwd=tmp_path)
    _assert_refused(out, r"tcod-fast train: checkpoint sharded/checkpoints/step_00000002\.dcp/meta\.pt holds an object of type "
                         r"posix\.system, which a checkpoint never contains; nothing of it was run")  # fmt: skip
    assert not marker.exists()
    # DCP's own .metadata (plain pickle, which DCP itself would load unrestricted)
    torch.save(meta, folder / "meta.pt")
    metadata = read_dcp_metadata(folder)
    metadata.planner_data = Payload(marker)
    with open(folder / ".metadata", "wb") as handle:
        pickle.dump(metadata, handle)
    out = _cli("train", "--output-dir", "sharded", "--resume", "--steps", "3", cwd=tmp_path)
    _assert_refused(out, r"tcod-fast train: checkpoint .*step_00000002\.dcp/\.metadata holds an object of type posix\.system, "
                         r"which a checkpoint never contains; nothing of it was run")  # fmt: skip
    assert not marker.exists()


@pytest.mark.slow
def test_a_payload_in_a_model_folder_is_refused_and_never_runs(runs, tmp_path):
    """A saved model folder (as the demo writes teachers and students) whose weights were
    replaced by a pickle naming code."""
    student = tmp_path / "student"
    import shutil

    shutil.copytree(runs / "run" / "final", student)
    weights = {k: v for path in student.glob("*.safetensors") for k, v in _safetensors(path).items()}
    for path in student.glob("*.safetensors"):
        path.unlink()
    torch.save({**weights, "note": Payload(tmp_path / "PWNED")}, student / "pytorch_model.bin")
    out = _cli("eval", "--run", str(runs / "run"), "--student", "student", "--set", "eval.num_tasks=1", cwd=tmp_path)
    assert out.returncode == 2 and not (tmp_path / "PWNED").exists(), out.stderr[-3000:]
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and re.fullmatch(
        r"tcod-fast eval: weights file student/pytorch_model\.bin holds an object of type posix\.system, which a weights file "
        r"never contains; nothing of it was run", lines[0]
    ), out.stderr  # fmt: skip


def _safetensors(path):
    from safetensors.torch import load_file

    return load_file(str(path))


def test_checkpoints_holding_numpy_rng_arrays_still_load_and_resume_the_same_draws(tmp_path):
    """The RNG state is stored as plain data now; a checkpoint that holds NumPy's state as an
    array (its legacy tuple) loads with weights_only and restores the same NumPy draws."""
    np.random.seed(5)
    legacy = {"step": 1, "rng": {**capture_rng_state(), "numpy": np.random.get_state()}}
    torch.save(legacy, tmp_path / "step_00000001.pt")
    expected = np.random.rand(3)
    state = load_checkpoint(tmp_path / "step_00000001.pt")
    np.random.seed(6)
    restore_rng_state(state["rng"])
    np.testing.assert_array_equal(np.random.rand(3), expected)
    # the current plain form round-trips too
    np.random.seed(7)
    torch.save({"step": 1, "rng": capture_rng_state()}, tmp_path / "plain.pt")
    expected = np.random.rand(3)
    restore_rng_state(load_checkpoint(tmp_path / "plain.pt")["rng"])
    np.testing.assert_array_equal(np.random.rand(3), expected)
