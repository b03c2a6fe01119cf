"""Config dataclasses: files, --set overrides, round trips and errors that name the problem."""

import pytest

from tcod_fast.trainer import config as cfg


def test_defaults_validate_and_round_trip(tmp_path):
    config = cfg.TrainConfig()
    cfg.check_config(config)
    again = cfg.config_from_dict(cfg.config_to_dict(config))
    assert again == config
    for name in ("run.yaml", "run.json"):
        cfg.save_config(config, tmp_path / name)
        assert cfg.load_config(tmp_path / name) == config


def test_yaml_and_toml_files_fill_nested_sections(tmp_path):
    (tmp_path / "run.yaml").write_text(
        "trainer:\n  lr: 3.0e-5\n  betas: [0.8, 0.95]\ncurriculum:\n  algorithm: tcod_b2f\n  eta: 3\n"
        "model:\n  student_tiny:\n    hidden_size: 48\n"
    )
    config = cfg.load_config(tmp_path / "run.yaml")
    assert config.trainer.lr == 3e-5 and config.trainer.betas == (0.8, 0.95)
    assert config.algorithm == "tcod_b2f" and config.curriculum.eta == 3
    assert config.model.student_tiny.hidden_size == 48
    (tmp_path / "run.toml").write_text('[trainer]\nsteps = 7\n[loss]\nestimator = "sampled"\n[env.kwargs]\nmax_rooms = 3\n')
    config = cfg.load_config(tmp_path / "run.toml")
    assert config.trainer.steps == 7 and config.loss.estimator == "sampled"
    assert config.env.kwargs == {"max_rooms": 3}


def test_set_overrides_parse_values_and_types():
    config = cfg.apply_overrides(
        cfg.TrainConfig(),
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
        ("trainer.steps=many", "trainer.steps: expected an integer, got 'many'"),
        ("trainer.lr=fast", "trainer.lr: expected a number, got 'fast'"),
        ("trainer.max_grad_norm=abc", "trainer.max_grad_norm: expected a number or null, got 'abc'"),
        ("logging.progress=3", "expected true/false"),
        ("curriculum.algorithm=ppo", "algorithm must be one of"),
        ("loss.estimator=exact", "loss.estimator must be one of full_vocab, sampled, topk, got 'exact'"),
        ("eval.kl_by_turn_splits=[seen, train]", "eval.kl_by_turn_splits: expected a list of values among seen, unseen"),
        ("trainer.betas=[0.9, 0.95, 0.99]", r"trainer.betas: expected a list of 2 numbers, got \[0.9, 0.95, 0.99\]"),
        ("trainer=3", "trainer: expected a mapping with keys among steps, lr"),
        ("curriculum.guided.shape=sine", "curriculum.guided.shape must be one of linear, cosine, exponential, constant"),
        ("curriculum.guided.p_init=1.5", r"curriculum.guided.p_init must be in \[0, 1\], got 1.5"),
        ("curriculum.atod.kappa_min=2", r"curriculum.atod.kappa_min \(2.0\) must be <= kappa_init"),
        ("curriculum.atod.kapa_min=0.2", r"unknown config key curriculum.atod.kapa_min .*did you mean curriculum.atod.kappa_min\?"),
        ("loss.loss_agg=seq_mean_token_sum", "unknown config key loss.loss_agg"),
        ("no_equals_sign", "section.key=value"),
    ],
)
def test_bad_overrides_say_what_was_expected(override, message):
    with pytest.raises((ValueError, TypeError), match=message):
        cfg.load_config(None, [override])


def test_unknown_file_keys_and_rl_algorithms_without_groups_are_rejected(tmp_path):
    (tmp_path / "bad.yaml").write_text("trainer:\n  learning_rate: 1\n")
    with pytest.raises(ValueError, match="trainer.learning_rate"):
        cfg.load_config(tmp_path / "bad.yaml")
    with pytest.raises(ValueError, match="episodes_per_task >= 2"):
        cfg.load_config(None, ["curriculum.algorithm=grpo"])
    assert cfg.load_config(None, ["curriculum.algorithm=grpo", "curriculum.episodes_per_task=4"]).algorithm == "grpo"
    with pytest.raises(ValueError, match=r"\.yaml, \.yml, \.toml or \.json"):
        (tmp_path / "run.ini").write_text("")
        cfg.load_config(tmp_path / "run.ini")


def test_schedules_nest_under_curriculum_and_flat_keys_are_unknown(tmp_path):
    config = cfg.load_config(None, ["curriculum.guided.p_init=0.3", "curriculum.atod={anneal_steps: 7, kappa_min: 0.2}"])
    assert config.curriculum.guided.p_init == 0.3 and config.curriculum.guided.decay_steps == 100
    assert config.curriculum.atod.anneal_steps == 7 and config.curriculum.atod.kappa_min == 0.2
    (tmp_path / "flat.yaml").write_text("curriculum:\n  guided_p_init: 0.25\n")
    with pytest.raises(ValueError, match="unknown config key curriculum.guided_p_init"):
        cfg.load_config(tmp_path / "flat.yaml")


def test_a_config_built_in_python_is_type_checked_by_validate():
    config = cfg.TrainConfig()
    config.loss.divergence = "kl"
    with pytest.raises(ValueError, match="loss.divergence must be one of reverse_kl, forward_kl, jsd, got 'kl'"):
        cfg.check_config(config)
    config = cfg.TrainConfig()
    config.logging.progress = "yes"
    with pytest.raises(ValueError, match="logging.progress: expected true/false, got 'yes'"):
        cfg.check_config(config)


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["trainer.fsdp_param_dtype=bfloat16"], "trainer.fsdp_param_dtype='bfloat16' acts only with trainer.parallelism='fsdp2'"),
        (["trainer.fsdp_teacher=whole"], "trainer.fsdp_teacher='whole' acts only with trainer.parallelism='fsdp2'"),
        (["rollout.vllm_gpu_memory_utilization=0.5"], "rollout.vllm_gpu_memory_utilization=0.5 acts only with rollout.backend='vllm'"),
        (["loss.jsd_beta=0.3"], "loss.jsd_beta=0.3 acts only with loss.divergence='jsd', got loss.divergence='reverse_kl'"),
        (["loss.clip_low=0.1"], "loss.clip_low=0.1 acts only with a PPO term"),
        (["loss.clip_high=0.3", "curriculum.algorithm=tcod_f2b"], "loss.clip_high=0.3 acts only with a PPO term"),
        (["loss.dual_clip=null", "loss.estimator=topk"], "loss.dual_clip=None acts only with a PPO term"),
    ],
)
def test_a_setting_that_would_do_nothing_is_refused_with_what_would_make_it_act(overrides, message):
    with pytest.raises(ValueError, match="^" + message.replace("(", r"\(").replace(")", r"\)")) as refused:
        cfg.load_config(None, overrides)
    assert "\n" not in str(refused.value) and str(refused.value).endswith("remove it or change that setting")


@pytest.mark.parametrize(
    "overrides",
    [
        ["trainer.parallelism=fsdp2", "trainer.fsdp_param_dtype=bfloat16", "trainer.fsdp_teacher=whole"],
        ["rollout.backend=vllm", "rollout.vllm_gpu_memory_utilization=0.5"],
        ["loss.divergence=jsd", "loss.jsd_beta=0.3"],
        ["loss.estimator=sampled", "loss.clip_low=0.1", "loss.clip_high=0.3", "loss.dual_clip=null"],
        ["curriculum.algorithm=grpo", "curriculum.episodes_per_task=2", "loss.clip_low=0.1"],
    ],
)
def test_the_same_settings_are_accepted_where_they_act(overrides):
    cfg.load_config(None, overrides)


def test_names_resolve_to_their_records_in_one_place():
    from tcod_fast.algorithms import get_algorithm
    from tcod_fast.loss_settings import get_estimator

    records = cfg.check_config(cfg.load_config(None, ["curriculum.algorithm=tcod_b2f", "loss.estimator=topk"]))
    assert records.algorithm is get_algorithm("tcod_b2f") and records.estimator is get_estimator("topk")
    assert records.estimator.sparse_teacher and not records.estimator.ppo_advantage and not records.estimator.needs_teacher_model
    with pytest.raises(ValueError, match="^curriculum.algorithm must be one of .*'opd'.*, got 'ppo'$"):
        cfg.load_config(None, ["curriculum.algorithm=ppo"])
