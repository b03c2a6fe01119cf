"""Environment families: one record each, looked up by env name; their settings checked in one line;
a new environment added as one record and trained on."""

import dataclasses
import json
import os
import pickle
import subprocess
import sys
from dataclasses import dataclass
from typing import Any

import pytest

from tcod_fast.envs.actions import ACTION_TAGS, ActionProtocol, ParsedAction, parse_action
from tcod_fast.envs.base import Env, EnvObservation, EnvStep
from tcod_fast.envs.family import EnvFamily, Expert, PromptPreset, PythonPackage
from tcod_fast.envs.registry import (
    ENV_NAMES,
    EnvSpec,
    check_env_settings,
    env_names,
    find_env_family,
    get_env_family,
    make_env,
    register_env_family,
    unregister_env_family,
)
from tcod_fast.envs.toy import KeyDoorConfig, KeyDoorEnv
from tcod_fast.rollout.prompts import prompt_config_for
from tcod_fast.tiny_settings import TINY_ENV_OVERRIDES, TINY_TRAIN_OVERRIDES, tiny_train_overrides

NO_SUCH_MODULE = "tcod_fast_no_such_engine"


@pytest.fixture
def replaced_family():
    """``replace(name, **changes)`` swaps a registered record for a changed copy until the test ends."""
    originals = {}

    def replace(name, **changes):
        original = get_env_family(name)
        originals.setdefault(original.name, original)
        return register_env_family(dataclasses.replace(original, **changes), replace=True)

    yield replace
    for original in originals.values():
        register_env_family(original, replace=True)


# ------------------------------------------------------------------ the built-in records


def test_built_in_families_are_listed_and_found_by_env_name():
    assert ENV_NAMES == ("toy", "twx-<game>", "scienceworld", "alfworld", "webshop", "search_qa", "alchemy")
    assert env_names()[:7] == ENV_NAMES
    assert get_env_family("twx-cookingworld").name == "twx"
    assert get_env_family("twx-coin").name_kwargs("twx-coin") == {"game": "coin"}
    assert get_env_family("toy").name_kwargs("toy") == {}
    for name in ("twx", "twx-", "nethack", "", None):
        assert find_env_family(name) is None
    with pytest.raises(ValueError, match=r"unknown env 'nethack'; expected one of \('toy', 'twx-<game>'"):
        get_env_family("nethack")
    assert get_env_family("webshop").name == "webshop" and get_env_family("search_qa").name == "search_qa"


def test_every_built_in_family_speaks_the_action_tag_protocol():
    for name in ("toy", "twx-coin", "scienceworld", "alfworld", "webshop", "search_qa", "alchemy"):
        family = get_env_family(name)
        assert family.action_protocol is ACTION_TAGS
        assert family.expert is not None
    assert ACTION_TAGS.stop_strings == ("</action>",)
    parsed = ACTION_TAGS.parse("<think>go</think><action>Open Drawer</action>", ["open drawer"], None)
    assert parsed == parse_action("<think>go</think><action>Open Drawer</action>", ["open drawer"])
    assert parsed.action == "open drawer" and parsed.format_error is None
    assert get_env_family("toy").expert.from_any_state and not get_env_family("twx-coin").expert.from_any_state


def test_prompt_presets_and_tiny_overrides_come_from_the_records():
    assert prompt_config_for("scienceworld").max_admissible_actions == 50
    assert prompt_config_for("twx-coin").max_admissible_actions is None
    assert prompt_config_for("toy").env_description == get_env_family("toy").prompt.description
    assert tiny_train_overrides("toy")[-1] == "env.kwargs={max_rooms: 2, max_steps: 6}"
    assert tiny_train_overrides("twx-coin") == list(TINY_TRAIN_OVERRIDES)
    assert tiny_train_overrides("no-such-env") == list(TINY_TRAIN_OVERRIDES)
    assert TINY_ENV_OVERRIDES == {
        "toy": ("env.kwargs={max_rooms: 2, max_steps: 6}",),
        "webshop": ("env.kwargs={products_per_kind: 4, num_tasks: {train: 8, valid_seen: 4, valid_unseen: 4}}",),
        "search_qa": ("env.kwargs={people: 8, num_tasks: {train: 8, valid_seen: 4, valid_unseen: 4}}",),
        "alchemy": ("env.kwargs={max_ingredients: 2, max_steps: 8}",),
    }


def test_an_env_spec_carries_its_family_through_pickling():
    spec = pickle.loads(pickle.dumps(EnvSpec("toy", {"max_rooms": 2})))
    assert spec == EnvSpec("toy", {"max_rooms": 2}) and spec.family == get_env_family("toy")
    env = spec()
    assert env.list_tasks("train")[0] == "keydoor/train/0"
    with pytest.raises(ValueError, match="unknown env"):
        EnvSpec("nethack")()


# ------------------------------------------------------------------ one-line checks


def test_unknown_env_names_are_one_line_listing_the_known_ones():
    with pytest.raises(ValueError) as raised:
        check_env_settings("nethack", {})
    assert str(raised.value) == (
        "env.name must be one of toy, twx-<game>, scienceworld, alfworld, webshop, search_qa, alchemy, got 'nethack'"
    )
    for name in ("twx", "twx-"):
        with pytest.raises(ValueError, match=f"got {name!r}"):
            check_env_settings(name, {})


def test_an_unknown_kwargs_key_names_the_config_field_it_resembles():
    with pytest.raises(ValueError) as raised:
        check_env_settings("toy", {"max_roms": 2})
    assert str(raised.value) == (
        "unknown key env.kwargs.max_roms (did you mean env.kwargs.max_rooms?): expected a field of KeyDoorConfig for env "
        "'toy' (num_tasks, min_rooms, max_rooms, unseen_extra_rooms, max_steps, max_idle_steps), got 'max_roms'"
    )
    # The game comes from the env name, not from env.kwargs.
    with pytest.raises(ValueError, match="unknown key env.kwargs.game: expected a field of TextWorldExpressConfig"):
        check_env_settings("twx-coin", {"game": "twc"})
    check_env_settings("toy", {"max_rooms": 2, "max_steps": 6})


@pytest.mark.parametrize(
    ("env_name", "module", "distribution"),
    [
        ("scienceworld", "scienceworld", "scienceworld==1.2.3"),
        ("twx-cookingworld", "textworld_express", "textworld-express==1.1.0"),
        ("alfworld", "alfworld", "alfworld==0.4.2"),
        ("webshop", "bm25s", "bm25s==0.3.16"),
        ("search_qa", "bm25s", "bm25s==0.3.16"),
    ],
)
def test_a_missing_engine_package_names_the_install_extra(env_name, module, distribution, monkeypatch):
    # A None entry in sys.modules makes find_spec (and import) see the package as absent.
    monkeypatch.setitem(sys.modules, module, None)
    with pytest.raises(ValueError) as raised:
        check_env_settings(env_name, {})
    assert str(raised.value) == (
        f"env.name {env_name!r} needs the Python package {distribution} (module {module!r}), which is not installed: "
        'pip install "tcod-fast[envs]"'
    )


def test_a_record_whose_package_does_not_exist_says_how_to_install_it(replaced_family):
    replaced_family("scienceworld", packages=(PythonPackage(NO_SUCH_MODULE, "tcod-fast-no-such-engine==1.0"),))
    with pytest.raises(ValueError) as raised:
        check_env_settings("scienceworld", {"env_step_limit": 10})
    assert str(raised.value) == (
        "env.name 'scienceworld' needs the Python package tcod-fast-no-such-engine==1.0 (module 'tcod_fast_no_such_engine'), "
        'which is not installed: pip install "tcod-fast[envs]"'
    )
    replaced_family("twx-coin", packages=(PythonPackage(NO_SUCH_MODULE, "tcod-fast-no-such-engine==1.0"),), pip_extra=None)
    with pytest.raises(ValueError, match=r"^env.name 'twx-coin' needs .*: pip install tcod-fast-no-such-engine==1.0$"):
        check_env_settings("twx-coin", {})


@pytest.fixture
def alfworld_without_package_check(replaced_family, monkeypatch):
    """The ALFWorld record with its data check only (the tests run where alfworld is not installed too)."""
    monkeypatch.delenv("ALFWORLD_DATA", raising=False)
    replaced_family("alfworld", packages=())


def test_alfworld_without_games_names_the_command_that_makes_them(alfworld_without_package_check, tmp_path, monkeypatch):
    with pytest.raises(ValueError) as raised:
        check_env_settings("alfworld", {})
    assert str(raised.value) == (
        "env.kwargs.data_path must name a folder of ALFWorld games, got neither it nor $ALFWORLD_DATA: make games with "
        "`tcod-fast envs make-alfworld-tasks --out DATA/train --n 50 --seed 0 --split seen` and set env.kwargs.data_path=DATA"
    )
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ValueError) as raised:
        check_env_settings("alfworld", {"data_path": str(empty)})
    assert str(raised.value) == (
        "env.kwargs.data_path must be a folder of ALFWorld games (train/, valid_seen/, valid_unseen/ or json_2.1.1/<split>/ "
        f"holding game.tw-pddl files), got {str(empty)!r}, which has none: make games with "
        f"`tcod-fast envs make-alfworld-tasks --out {empty / 'train'} --n 50 --seed 0 --split seen`"
    )
    with pytest.raises(ValueError, match=r"^env.kwargs.data_path must be a folder of ALFWorld games, got '.*/missing', which does not exist"):
        check_env_settings("alfworld", {"data_path": str(tmp_path / "missing")})
    monkeypatch.setenv("ALFWORLD_DATA", str(empty))
    with pytest.raises(ValueError, match=r"^env.kwargs.data_path \(unset: \$ALFWORLD_DATA\) must be a folder of ALFWorld games"):
        check_env_settings("alfworld", {})
    with pytest.raises(ValueError, match=r"^env.kwargs.split_paths must name folders of ALFWorld games"):
        check_env_settings("alfworld", {"data_path": str(empty), "split_paths": {"train": "elsewhere"}})


def test_alfworld_games_in_either_layout_pass(alfworld_without_package_check, tmp_path):
    for root, layout in ((tmp_path / "ours", "train/task-1/trial"), (tmp_path / "released", "json_2.1.1/valid_seen/task-1/trial")):
        game = root / layout / "game.tw-pddl"
        game.parent.mkdir(parents=True)
        game.write_text("{}")
        check_env_settings("alfworld", {"data_path": str(root)})
    check_env_settings("alfworld", {"data_path": str(tmp_path / "ours"), "split_paths": {"train": "train/task-1"}})


def test_checking_settings_imports_no_engine(tmp_path):
    (tmp_path / "train" / "game-1").mkdir(parents=True)
    (tmp_path / "train" / "game-1" / "game.tw-pddl").write_text("{}")
    code = (
        "import sys\n"
        "from tcod_fast.envs import check_env_settings\n"
        "for name, kwargs in [('toy', {}), ('twx-coin', {}), ('scienceworld', {}), ('alfworld', {'data_path': sys.argv[1]}),\n"
        "                     ('webshop', {}), ('search_qa', {})]:\n"
        "    try:\n"
        "        check_env_settings(name, kwargs)\n"
        "    except ValueError as error:\n"
        "        assert 'not installed' in str(error), error\n"
        "engines = ('textworld_express', 'scienceworld', 'alfworld', 'textworld', 'bm25s', 'numpy', 'torch', 'tcod_fast.rollout')\n"
        "print(sorted(m for m in sys.modules if m.split('.')[0] in engines or m.startswith('tcod_fast.rollout')))\n"
    )
    result = subprocess.run([sys.executable, "-c", code, str(tmp_path)], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"


def test_records_refuse_bad_fields():
    with pytest.raises(ValueError, match="parameter must be a field of KeyDoorConfig"):
        EnvFamily("x", "x", KeyDoorEnv, KeyDoorConfig, PromptPreset("X."), parameter="game")
    with pytest.raises(TypeError, match="config_class must be a dataclass"):
        EnvFamily("x", "x", KeyDoorEnv, dict, PromptPreset("X."))
    with pytest.raises(ValueError, match="already registered"):
        register_env_family(get_env_family("toy"))
    with pytest.raises(ValueError, match="must hold"):
        ActionProtocol("x", ("</a>",), parse_action, action_template="<a></a>")


# ------------------------------------------------------------------ adding an environment

#: The vault game: the key-and-door game under its own name, with its own settings and prompt.
VAULT_DESCRIPTION = "You are an expert agent opening a vault in a small text adventure."


@dataclass
class VaultConfig:
    """Settings of the vault game.

    Attributes:
        rooms: rooms in a row (the vault door is in the east-most one).
        max_steps: the episode is lost after this many steps without a win.
        tasks_per_split: tasks in each split.
    """

    rooms: int = 2
    max_steps: int = 8
    tasks_per_split: int = 6


class VaultEnv:
    """A tiny :class:`~tcod_fast.envs.base.Env`: the key-and-door game's tasks and expert."""

    name = "vault"

    def __init__(self, config: VaultConfig):
        splits = ("train", "valid_seen", "valid_unseen")
        self._game = KeyDoorEnv(
            KeyDoorConfig(
                num_tasks={split: config.tasks_per_split for split in splits},
                min_rooms=2,
                max_rooms=config.rooms,
                max_steps=config.max_steps,
            )
        )

    def list_tasks(self, split: str) -> list[str]:
        return self._game.list_tasks(split)

    def reset(self, task: str) -> EnvObservation:
        return self._game.reset(task)

    def step(self, action: str) -> EnvStep:
        return self._game.step(action)

    def expert_actions(self) -> list[str] | None:
        return self._game.expert_actions()

    def expert_action(self) -> str | None:
        return self._game.expert_action()

    def close(self) -> None:
        self._game.close()


def make_vault_env(**kwargs: Any) -> VaultEnv:
    return VaultEnv(VaultConfig(**kwargs))


VAULT = EnvFamily(
    name="vault",
    summary="The key-and-door game under another name.",
    factory=make_vault_env,
    config_class=VaultConfig,
    prompt=PromptPreset(VAULT_DESCRIPTION, {"max_admissible_actions": 12}),
    expert=Expert("the key-and-door expert", from_any_state=True),
    tiny_overrides=("env.kwargs={rooms: 2, max_steps: 6}",),
)


@pytest.fixture
def vault_family():
    register_env_family(VAULT)
    yield VAULT
    unregister_env_family("vault")
    assert find_env_family("vault") is None


def test_a_registered_family_is_built_prompted_and_checked_everywhere(vault_family):
    from tcod_fast.trainer import build
    from tcod_fast.trainer.config import EnvSettings

    assert "vault" in env_names() and "vault" not in ENV_NAMES
    env = make_env("vault", rooms=3)
    assert isinstance(env, Env) and len(env.list_tasks("train")) == 6
    prompter = build.build_prompter(EnvSettings(name="vault"))
    assert prompter.prompt_config.env_description == VAULT_DESCRIPTION
    assert prompter.prompt_config.max_admissible_actions == 12
    assert prompter.action_protocol is ACTION_TAGS
    assert isinstance(prompter.parse_action("<think></think><action>look</action>", ["look"]), ParsedAction)
    assert tiny_train_overrides("vault")[-1] == "env.kwargs={rooms: 2, max_steps: 6}"
    check_env_settings("vault", {"rooms": 2})
    with pytest.raises(ValueError, match=r"did you mean env.kwargs.rooms\?\): expected a field of VaultConfig for env 'vault'"):
        check_env_settings("vault", {"room": 2})
    # Worker processes build it from the record that travels with the spec.
    pool = build.build_envs(EnvSettings(name="vault", kwargs={"rooms": 2}, pool_workers=1), 1)
    try:
        (observation,) = pool.reset_many(["keydoor/train/0"])
        assert observation.task_text == "take the gem from the vault."
    finally:
        pool.close()


@pytest.mark.filterwarnings("ignore:model.teacher_path is not set")
def test_one_training_step_on_a_registered_family(vault_family, tmp_path):
    from tcod_fast.trainer import loop
    from tcod_fast.trainer.config import load_config

    overrides = [
        f"trainer.output_dir={tmp_path / 'run'}",
        *tiny_train_overrides("vault"),
        "env.name=vault",
        "trainer.steps=1",
        "eval.num_tasks=0",
    ]
    config = load_config(None, overrides)
    assert config.env.kwargs == {"rooms": 2, "max_steps": 6}
    run = loop.train(config)
    assert run.state.next_step == 1
    assert run.prompter.prompt_config.env_description == VAULT_DESCRIPTION
    assert os.path.isfile(tmp_path / "run" / "config.yaml")


# ------------------------------------------------------------------ the text benchmarks, trained on


@pytest.fixture
def tiny_cli(monkeypatch):
    """``tcod-fast`` in this process on the tiny settings (``TCOD_FAST_TINY=1``), torch's thread
    count restored afterwards."""
    import torch

    from tcod_fast.cli import main

    monkeypatch.setenv("TCOD_FAST_TINY", "1")
    threads = torch.get_num_threads()
    yield main
    torch.set_num_threads(threads)


@pytest.mark.filterwarnings("ignore:model.teacher_path is not set")
@pytest.mark.parametrize("env_name", ["webshop", "search_qa"])
def test_two_training_steps_from_the_command_line(env_name, tiny_cli, tmp_path):
    pytest.importorskip("bm25s", reason="bm25s is not installed (pip install 'tcod-fast[envs]')")
    run_dir = tmp_path / "run"
    assert tiny_cli(["train", "--set", f"env.name={env_name}", "--output-dir", str(run_dir)]) == 0
    steps = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [row["step"] for row in steps if "loss" in row] == [0, 1]
    assert f"name: {env_name}" in (run_dir / "config.yaml").read_text()


@pytest.mark.parametrize(
    ("env_name", "kwargs", "task"),
    [
        ("webshop", {"products_per_kind": 4, "num_tasks": {"train": 2}}, "webshop/train/1"),
        ("search_qa", {"people": 4, "num_tasks": {"train": 2}}, "search_qa/train/1"),
    ],
)
def test_the_text_benchmarks_play_their_experts_through_the_worker_pool(env_name, kwargs, task):
    pytest.importorskip("bm25s", reason="bm25s is not installed (pip install 'tcod-fast[envs]')")
    from tcod_fast.envs.pool import EnvPool, PoolConfig

    check_env_settings(env_name, kwargs)
    pool = EnvPool(EnvSpec(env_name, kwargs), 2, PoolConfig(num_workers=1))
    try:
        first, other = pool.reset_many([task, task])
        assert first.observation == other.observation and first.task_text
        (actions, _) = pool.expert_actions_many()
        for action in actions:
            step, invalid = pool.step_many([action, "not an action"])
            assert invalid.info["invalid_action"] and not invalid.done
        assert step.won and step.reward == 1.0 and step.info["score"] == 100.0
    finally:
        pool.close()
