"""Config dataclasses: files, --set overrides, round trips and errors that name the problem."""

import pytest

from tcod_fast.trainer.config import (
    TrainConfig,
    apply_overrides,
    config_from_dict,
    config_to_dict,
    load_config,
    save_config,
)


def test_defaults_validate_and_round_trip(tmp_path):
    config = TrainConfig()
    config.validate()
    again = config_from_dict(config_to_dict(config))
    assert again == config
    for name in ("run.yaml", "run.json"):
        save_config(config, tmp_path / name)
        assert load_config(tmp_path / name) == config


def test_yaml_and_toml_files_fill_nested_sections(tmp_path):
    (tmp_path / "run.yaml").write_text(
        "trainer:\n  lr: 3.0e-5\n  betas: [0.8, 0.95]\ncurriculum:\n  algorithm: tcod_b2f\n  eta: 3\n"
        "model:\n  student_tiny:\n    hidden_size: 48\n"
    )
    config = load_config(tmp_path / "run.yaml")
    assert config.trainer.lr == 3e-5 and config.trainer.betas == (0.8, 0.95)
    assert config.algorithm == "tcod_b2f" and config.curriculum.eta == 3
    assert config.model.student_tiny.hidden_size == 48
    (tmp_path / "run.toml").write_text('[trainer]\nsteps = 7\n[loss]\nestimator = "sampled"\n[env.kwargs]\nmax_rooms = 3\n')
    config = load_config(tmp_path / "run.toml")
    assert config.trainer.steps == 7 and config.loss.estimator == "sampled"
    assert config.env.kwargs == {"max_rooms": 3}


def test_set_overrides_parse_values_and_types():
    config = apply_overrides(
        TrainConfig(),
        [
            "trainer.lr=1e-5",  # YAML 1.1 reads this as a string; the float field converts it
            "trainer.max_grad_norm=null",
            "logging.tensorboard=true",
            "curriculum.algorithm=guided_opd",
            "model.student_tiny.num_hidden_layers=3",
            "env.kwargs.max_steps=20",
            "trainer.betas=[0.9, 0.95]",
        ],
    )
    assert config.trainer.lr == pytest.approx(1e-5) and isinstance(config.trainer.lr, float)
    assert config.trainer.max_grad_norm is None
    assert config.logging.tensorboard is True
    assert config.algorithm == "guided_opd"
    assert config.model.student_tiny.num_hidden_layers == 3
    assert config.env.kwargs == {"max_steps": 20}
    assert config.trainer.betas == (0.9, 0.95)


@pytest.mark.parametrize(
    "override, message",
    [
        ("trainer.lrr=1e-5", "trainer.lrr"),
        ("nosuch.lr=1", "nosuch"),
        ("trainer.steps=2.5", "expected an integer"),
        ("trainer.steps=many", "expected a number"),
        ("logging.progress=3", "expected true/false"),
        ("curriculum.algorithm=ppo", "algorithm must be one of"),
        ("loss.estimator=exact", "loss.estimator must be one of"),
        ("no_equals_sign", "section.key=value"),
    ],
)
def test_bad_overrides_say_what_was_expected(override, message):
    with pytest.raises((ValueError, TypeError), match=message):
        load_config(None, [override])


def test_unknown_file_keys_and_rl_algorithms_without_groups_are_rejected(tmp_path):
    (tmp_path / "bad.yaml").write_text("trainer:\n  learning_rate: 1\n")
    with pytest.raises(ValueError, match="trainer.learning_rate"):
        load_config(tmp_path / "bad.yaml")
    with pytest.raises(ValueError, match="episodes_per_task >= 2"):
        load_config(None, ["curriculum.algorithm=grpo"])
    assert load_config(None, ["curriculum.algorithm=grpo", "curriculum.episodes_per_task=4"]).algorithm == "grpo"
    with pytest.raises(ValueError, match=r"\.yaml, \.yml, \.toml or \.json"):
        (tmp_path / "run.ini").write_text("")
        load_config(tmp_path / "run.ini")
