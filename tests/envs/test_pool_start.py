"""EnvPool.start_envs: every slot's env is constructed up front (with a progress bar), the
episodes then reuse those envs, and an env that cannot start is reported per slot."""

import functools
import os
from pathlib import Path

import pytest

from tcod_fast.envs import EnvError, EnvObservation, EnvPool, PoolConfig
from tcod_fast.envs.toy import make_key_door_env


def counting_env(folder: str):
    """A toy env that leaves one file per construction in ``folder``."""
    Path(folder, f"{os.getpid()}-{len(os.listdir(folder))}-{id(object())}").touch()
    return make_key_door_env()


def broken_env():
    raise RuntimeError("the engine is not installed")


@pytest.mark.parametrize("num_workers", [0, 2])
def test_start_envs_builds_every_slot_once_and_shows_progress(num_workers, tmp_path, capsys):
    factory = functools.partial(counting_env, str(tmp_path))
    with EnvPool(factory, num_slots=4, config=PoolConfig(num_workers=num_workers)) as pool:
        assert os.listdir(tmp_path) == []  # nothing is built before it is asked for
        assert pool.start_envs(progress=True, description="starting toy envs") == [None] * 4
        assert len(os.listdir(tmp_path)) == 4
        bar = capsys.readouterr().err
        assert "starting toy envs" in bar and "4/4" in bar, bar
        tasks = [f"keydoor/train/{i}" for i in range(4)]
        assert all(isinstance(o, EnvObservation) for o in pool.reset_many(tasks))
        assert len(os.listdir(tmp_path)) == 4  # the episodes run in the envs started above


@pytest.mark.parametrize("num_workers", [0, 2])
def test_an_env_that_cannot_start_is_an_error_per_slot(num_workers, capsys):
    with EnvPool(broken_env, num_slots=3, config=PoolConfig(num_workers=num_workers)) as pool:
        errors = pool.start_envs()
        assert capsys.readouterr().err == ""  # no bar unless asked
        assert [type(e) for e in errors] == [EnvError] * 3
        assert all(e.kind == "exception" and "the engine is not installed" in e.message for e in errors), errors
        # The pool is still usable: the next reset tries a fresh env (and reports it the same way).
        again = pool.reset_many(["keydoor/train/0"])
        assert isinstance(again[0], EnvError) and "the engine is not installed" in again[0].message
