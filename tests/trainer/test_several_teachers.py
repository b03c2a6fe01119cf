"""One student, several environments and several teachers: tasks drawn across environments by
weight, each episode's loss computed with its own environment's teacher in every estimator,
metrics per environment, config mistakes refused in one line, and exact resumption."""

import dataclasses
import json

import numpy as np
import pytest
import torch

from tcod_fast.envs.mixture import EnvMixture, mixture_task, split_mixture_task
from tcod_fast.envs.registry import EnvSpec
from tcod_fast.errors import ConfigError, UserError
from tcod_fast.tiny_settings import TINY_TRAIN_OVERRIDES
from tcod_fast.trainer import loop
from tcod_fast.trainer.checkpoint import load_latest_checkpoint
from tcod_fast.trainer.config import load_config
from tcod_fast.trainer.loss import compute_loss
from tcod_fast.trainer.metrics_log import read_metrics
from tcod_fast.trainer.setup import Teacher, setup_run

# The two built-in pure-Python games, at their tiny sizes, one teacher each.
ENVS = (
    "envs=[{name: toy, kwargs: {max_rooms: 2, max_steps: 6}, num_train_tasks: 8, weight: 3},"
    " {name: alchemy, kwargs: {max_ingredients: 2, max_steps: 8}, num_train_tasks: 8, weight: 1}]"
)
TEACHERS = "teachers=[{name: keys, envs: [toy]}, {name: brews, envs: [alchemy]}]"


def overrides(output_dir, *extra):
    shared = [o for o in TINY_TRAIN_OVERRIDES if not o.startswith(("env.vocab_tasks_per_split=", "env.num_train_tasks="))]
    return [f"trainer.output_dir={output_dir}", *shared, "logging.progress=false", ENVS, TEACHERS, "rollout.tasks_per_step=4", *extra]


def config(output_dir, *extra):
    return load_config(None, overrides(output_dir, *extra))


@pytest.fixture(scope="module")
def mixed_tokenizer(tmp_path_factory):
    from tcod_fast.trainer import build

    cfg = config(tmp_path_factory.mktemp("tok"))
    return build.build_tokenizer(cfg, build.build_run_prompter(cfg), max_tasks_per_split=4)


# ------------------------------------------------------------------ the environment mixture
def test_a_mixture_routes_each_task_to_its_environment():
    mixture = EnvMixture({"toy": EnvSpec("toy", {"max_rooms": 2}), "alchemy": EnvSpec("alchemy")})
    try:
        tasks = mixture.list_tasks("train")
        assert {split_mixture_task(t)[0] for t in tasks} == {"toy", "alchemy"}
        toy_task = next(t for t in tasks if t.startswith("toy::"))
        observation = mixture.reset(toy_task)
        alone = EnvSpec("toy", {"max_rooms": 2})()
        assert observation.observation == alone.reset(split_mixture_task(toy_task)[1]).observation
        for action in mixture.expert_actions():
            step = mixture.step(action)
        assert step.won
        with pytest.raises(ValueError, match="this run's environments are toy, alchemy; got a task of 'alfworld'"):
            mixture.reset(mixture_task("alfworld", "x"))
    finally:
        mixture.close()


def test_step_tasks_follow_the_weights_and_depend_on_seed_and_step_alone(tmp_path, mixed_tokenizer):
    run = setup_run(config(tmp_path / "run", "trainer.steps=0", "rollout.tasks_per_step=8"), tokenizer=mixed_tokenizer)
    try:
        draws = [loop.sample_step_tasks(run, step) for step in range(60)]
        assert draws[7] == loop.sample_step_tasks(run, 7)  # a resumed run draws the same
        share = np.mean([run.env_of(t) == "toy" for tasks in draws for t in tasks])
        assert 0.68 < share < 0.82  # weight 3 : 1, 480 draws
        assert all(len(set(tasks)) == len(tasks) for tasks in draws)  # no repeat within a step
    finally:
        run.close()


# ------------------------------------------------------------------ routing
@pytest.mark.parametrize("estimator", ["full_vocab", "sampled", "topk"])
def test_each_episodes_loss_is_the_loss_with_its_own_teacher(tmp_path, mixed_tokenizer, estimator):
    """On a real rollout batch of both environments: each episode's statistics with the routed
    run equal those of a run whose one teacher is that episode's teacher, and differ from the
    other teacher's."""
    run = setup_run(config(tmp_path / "run", f"loss.estimator={estimator}", "eval.num_tasks=0"), tokenizer=mixed_tokenizer)
    try:
        batch = loop.rollout(run, 0)
        coefficients = loop.algorithm_coefficients(run, 0)
        assert {run.env_of(t.task) for t in batch.trajectories} == {"toy", "alchemy"}
        for trajectory, plan in zip(batch.trajectories, batch.plans):
            own = run.teacher_for(trajectory.task)
            other = next(t for t in run.teachers.values() if t.name != own.name)
            routed = compute_loss(run, [trajectory], [plan], torch.zeros(1), coefficients, 1.0, with_grad=False)
            values = {}
            for teacher in (own, other):
                single = dataclasses.replace(
                    run, teacher=teacher.model, served_teacher=None, teachers={"teacher": Teacher("teacher", teacher.model)},
                    teacher_routes={},
                )
                values[teacher.name] = compute_loss(single, [trajectory], [plan], torch.zeros(1), coefficients, 1.0, with_grad=False)
            assert torch.equal(routed.turn_kl_sum, values[own.name].turn_kl_sum)
            assert routed.kl_term == values[own.name].kl_term and routed.ppo_term == values[own.name].ppo_term
            assert not torch.equal(routed.turn_kl_sum, values[other.name].turn_kl_sum)
        with pytest.raises(ValueError, match="a micro-batch holds episodes of several teachers"):
            compute_loss(run, batch.trajectories, batch.plans, torch.zeros(len(batch.plans)), coefficients, 1.0, with_grad=False)
    finally:
        run.close()


def test_training_logs_metrics_per_environment_and_resumes_exactly(tmp_path, mixed_tokenizer):
    extra = ("trainer.steps=3", "trainer.checkpoint_every=1", "eval.num_tasks=1", "curriculum.algorithm=guided_opd")
    straight = loop.train(config(tmp_path / "straight", *extra), tokenizer=mixed_tokenizer)
    records = read_metrics(tmp_path / "straight" / "metrics.jsonl", kind="train")
    for name in ("toy", "alchemy"):
        assert all(f"env/{name}/success" in r and f"env/{name}/kl/trajectory_mean" in r for r in records)
    final_eval = read_metrics(tmp_path / "straight" / "metrics.jsonl", kind="eval")[-1]
    assert {"env/toy/success_seen", "env/alchemy/success_unseen"} <= set(final_eval)
    assert sum(r["env/toy/episodes"] for r in records) > sum(r["env/alchemy/episodes"] for r in records)  # weight 3 : 1

    loop.train(config(tmp_path / "cut", *extra), tokenizer=mixed_tokenizer, stop_after_step=2)
    assert load_latest_checkpoint(tmp_path / "cut" / "checkpoints") is not None
    torch.manual_seed(12)  # a new process starts from other RNG states
    resumed = loop.train(config(tmp_path / "cut", *extra), tokenizer=mixed_tokenizer, resume=True)
    cut = read_metrics(tmp_path / "cut" / "metrics.jsonl", kind="train")
    assert [r["loss"] for r in cut] == [r["loss"] for r in records]
    for (name, a), (_, b) in zip(straight.student.named_parameters(), resumed.student.named_parameters()):
        assert torch.equal(a, b), name


# ------------------------------------------------------------------ config mistakes: one line each
@pytest.mark.parametrize(
    "extra, message",
    [
        (("envs=[{name: toy, weight: 0}]",), r"envs\[0\]\.weight must be > 0 \(a sampling weight\), got 0"),
        (("envs=[{name: toy}, {name: toy}]",), r"envs\[1\]\.name 'toy' is listed twice"),
        (("teachers=[{name: keys, envs: [toy]}]",), r"environment 'alchemy' has no teacher"),
        (("teachers=[{name: keys, envs: [toy, scienceworld]}, {name: brews}]",), r"supervises 'scienceworld', which is not an environment of this run"),
        (("teachers=[{name: a, envs: [toy]}, {name: b, envs: [toy]}, {name: c}]",), r"environment 'toy' is claimed by teachers 'a' and 'b'"),
        (("env.name=scienceworld",), r"env\.name='scienceworld' is not used when envs lists the environments"),
        (("model.teacher_path=/somewhere",), r"teachers lists the run's teachers, so model\.teacher_path and teacher\.server_url must be unset"),
    ],
)
def test_config_mistakes_are_one_line_before_anything_is_built(tmp_path, extra, message):
    with pytest.raises(ConfigError, match=message) as caught:
        config(tmp_path / "run", *extra)
    assert "\n" not in str(caught.value)
    assert not (tmp_path / "run").exists()


def test_a_teacher_with_another_tokenizer_is_refused_before_any_model_loads(tmp_path, mixed_tokenizer, monkeypatch):
    from tcod_fast.tiny_models import TinyModelConfig, build_tiny_causal_lm, build_word_tokenizer
    from tcod_fast.trainer import build

    folder = tmp_path / "other_teacher"
    other = build_word_tokenizer(["a different vocabulary of other words entirely"])
    build_tiny_causal_lm(TinyModelConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=1), other).save_pretrained(str(folder))
    other.save_pretrained(str(folder))
    loaded = []
    monkeypatch.setattr(build, "build_model", lambda *a, **k: loaded.append(a) or pytest.fail("a model was built"))
    teachers = f"teachers=[{{name: keys, envs: [toy]}}, {{name: brews, path: {folder}}}]"
    with pytest.raises(UserError, match=r"teachers\[1\] \('brews'\): every teacher must use the student's tokenizer") as caught:
        setup_run(config(tmp_path / "run", teachers), tokenizer=mixed_tokenizer)
    assert "\n" not in str(caught.value) and not loaded


def test_the_run_config_round_trips_with_its_environments(tmp_path):
    from tcod_fast.trainer.config import config_from_dict, config_to_dict

    cfg = config(tmp_path / "run")
    again = config_from_dict(json.loads(json.dumps(config_to_dict(cfg))))
    assert again.envs == cfg.envs and again.teachers == cfg.teachers


def test_a_run_of_several_environments_killed_at_a_random_moment_resumes_exactly(tmp_path):
    """``kill -9`` during a run of two environments and two teachers, then ``--resume``: the
    same student, metrics and step sequence as the run that was never interrupted."""
    import os
    import random
    import signal
    import subprocess
    import sys
    import time
    from pathlib import Path

    from safetensors.torch import load_file

    repo = Path(__file__).resolve().parents[2]
    env = {**os.environ, "PYTHONPATH": str(repo), "OMP_NUM_THREADS": "1"}
    steps = 4

    def command(folder):
        args = [sys.executable, "-m", "tcod_fast.cli", "train"]
        for item in overrides(folder, f"trainer.steps={steps}", "trainer.checkpoint_every=1", "eval.num_tasks=1"):
            args += ["--set", item]
        return args

    straight = subprocess.run(command(tmp_path / "straight"), cwd=repo, env=env, capture_output=True, text=True, timeout=300)
    assert straight.returncode == 0, straight.stderr
    seed = int(os.environ.get("TCOD_FAST_KILL_SEED", random.randrange(10**6)))  # printed on failure
    rng = random.Random(seed)
    after_checkpoint, delay = rng.randint(1, steps - 1), rng.uniform(0.0, 0.4)
    killed = tmp_path / "killed"
    process = subprocess.Popen(command(killed), cwd=repo, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    marker = killed / "checkpoints" / f"step_{after_checkpoint:08d}.pt"
    deadline = time.monotonic() + 180
    while process.poll() is None and not marker.exists() and time.monotonic() < deadline:
        time.sleep(0.01)
    time.sleep(delay)
    process.send_signal(signal.SIGKILL)
    assert process.wait(timeout=60) == -signal.SIGKILL, seed
    resumed = subprocess.run(
        [sys.executable, "-m", "tcod_fast.cli", "train", "--output-dir", str(killed), "--resume"],
        cwd=repo, env=env, capture_output=True, text=True, timeout=300,
    )
    assert resumed.returncode == 0 and "Traceback" not in resumed.stderr, (seed, resumed.stderr)
    expected, got = load_file(str(tmp_path / "straight" / "final" / "model.safetensors")), load_file(str(killed / "final" / "model.safetensors"))
    assert expected.keys() == got.keys()
    for name in expected:
        assert torch.equal(expected[name], got[name]), (seed, name)
    train = read_metrics(killed / "metrics.jsonl", kind="train")
    assert [r["step"] for r in train] == list(range(steps)), seed
    assert [r["loss"] for r in train] == [r["loss"] for r in read_metrics(tmp_path / "straight" / "metrics.jsonl", kind="train")], seed
