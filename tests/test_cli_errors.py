"""Every user mistake gets one line, ``tcod-fast <command>: ...``, exit code 2, no traceback,
and leaves no run folder behind; kill -9 mid-run then --resume gives the uninterrupted run."""

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from tcod_fast.cli import main

sys.path.insert(0, str(Path(__file__).parent / "trainer"))
from trainer_helpers import tiny_overrides  # noqa: E402

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True)
def _restore_torch_threads():
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


def tiny_args(output_dir, *extra):
    """``--set`` arguments of a tiny, fast run on the toy env (see trainer_helpers)."""
    args = []
    for item in tiny_overrides(output_dir, *extra):
        args += ["--set", item]
    return args


def run_cli(*args, env_extra=None, timeout=240):
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    env.pop("TCOD_FAST_DEBUG", None)
    env.update(env_extra or {})
    return subprocess.run(
        [sys.executable, "-m", "tcod_fast.cli", *args], capture_output=True, text=True, timeout=timeout, cwd=REPO, env=env
    )


def assert_one_line_refusal(code, stderr, command, *fragments):
    assert code == 2, stderr
    assert "Traceback" not in stderr, stderr
    errors = [line for line in stderr.splitlines() if line.startswith(f"tcod-fast {command}: ") and "warning:" not in line]
    assert len(errors) == 1, stderr
    for fragment in fragments:
        assert fragment in errors[0], (fragment, errors[0])
    return errors[0]


def _write(path, text):
    path.write_text(text)
    return str(path)


# ------------------------------------------------------------------ config mistakes
# (case id, extra argv, expected fragments); each is refused before anything is built.
CONFIG_MISTAKES = [
    ("typo-key-set", ["--set", "trainer.lrr=1e-5"], ["unknown config key trainer.lrr", "did you mean trainer.lr?", "got 'lrr'"]),
    ("typo-section-set", ["--set", "trainr.lr=1e-5"], ["unknown config key trainr", "did you mean trainer?"]),
    ("bad-value", ["--set", "trainer.lr=fast"], ["trainer.lr: expected a number, got 'fast'"]),
    ("bad-int", ["--set", "trainer.steps=2.5"], ["trainer.steps: expected an integer, got 2.5"]),
    ("no-equals", ["--set", "trainer.lr"], ["--set takes section.key=value, got 'trainer.lr'"]),
    ("unknown-divergence", ["--set", "loss.divergence=kl"], ["loss.divergence must be one of reverse_kl, forward_kl, jsd, got 'kl'"]),
    ("unknown-algorithm-set", ["--set", "curriculum.algorithm=ppo"], ["curriculum.algorithm must be one of", "got 'ppo'"]),
    ("unknown-env", ["--set", "env.name=nethack"], ["env.name must be one of toy, twx-<game>", "got 'nethack'"]),
    ("negative-grad-norm", ["--set", "trainer.max_grad_norm=-1"], ["trainer.max_grad_norm must be >= 0", "got -1.0"]),
    ("negative-kl-coef", ["--set", "loss.kl_coef=-0.5"], ["loss.kl_coef must be >= 0, got -0.5"]),
    ("negative-checkpoint-every", ["--set", "trainer.checkpoint_every=-1"], ["trainer.checkpoint_every must be >= 0", "got -1"]),
    ("negative-warmup", ["--set", "trainer.warmup_steps=-3"], ["trainer.warmup_steps must be >= 0, got -3"]),
    ("negative-history", ["--set", "env.history_length=-1"], ["env.history_length must be >= 0, got -1"]),
    ("negative-pool-workers", ["--set", "env.pool_workers=-2"], ["env.pool_workers must be >= 0", "got -2"]),
    ("nan-lr", ["--set", "trainer.lr=.nan"], ["trainer.lr must be a finite number, got nan"]),
    ("inf-lr", ["--set", "trainer.lr=inf"], ["trainer.lr must be a finite number, got inf"]),
    ("zero-lr", ["--set", "trainer.lr=0"], ["trainer.lr must be > 0, got 0.0"]),
    ("top-p", ["--set", "rollout.top_p=1.5"], ["rollout.top_p must be in (0, 1], got 1.5"]),
    ("removed-loss-agg", ["--set", "loss.loss_agg=seq_mean_token_sum"], ["unknown config key loss.loss_agg", "got 'loss_agg'"]),
    ("bad-choice", ["--set", "trainer.lr_schedule=step"], ["trainer.lr_schedule must be one of constant, linear, cosine, got 'step'"]),
    ("bad-bool", ["--set", "logging.progress=3"], ["logging.progress: expected true/false, got 3"]),
    ("bad-schedule", ["--set", "curriculum.guided.p_init=2"], ["curriculum.guided.p_init must be in [0, 1], got 2.0"]),
    ("bad-schedule-mapping", ["--set", "curriculum.guided={p_init: 0.5, decay_steps: 0}"], ["curriculum.guided.decay_steps must be >= 1, got 0"]),
    ("sampled-divergence", ["--set", "loss.estimator=sampled", "--set", "loss.divergence=jsd"], ["needs loss.estimator='full_vocab'"]),
    ("grpo-group-of-one", ["--set", "curriculum.algorithm=grpo", "--set", "curriculum.episodes_per_task=1"], ["episodes_per_task >= 2"]),
    ("bad-eta", ["--set", "curriculum.eta=0"], ["curriculum.eta must be >= 1, got 0"]),
    ("tiny-heads", ["--set", "model.student_tiny.num_attention_heads=3"], ["model.student_tiny.hidden_size must be a multiple"]),
    ("env-kwargs-typo", ["--set", "env.kwargs={max_roms: 2}"], ["unknown key env.kwargs.max_roms", "did you mean env.kwargs.max_rooms?"]),
    ("no-student-folder", ["--set", "model.student_path=/no/such/model"], ["model.student_path must be a local Hugging Face model folder", "'/no/such/model', which does not exist"]),
    ("no-teacher-folder", ["--set", "model.teacher_path=/no/such/teacher"], ["model.teacher_path must be", "does not exist"]),
    ("jsd-beta-unused", ["--set", "loss.jsd_beta=0.3"], ["loss.jsd_beta=0.3 acts only with loss.divergence='jsd'", "remove it"]),
    ("clip-unused", ["--set", "loss.clip_high=0.3"], ["loss.clip_high=0.3 acts only with a PPO term"]),
    ("fsdp-unused", ["--set", "trainer.fsdp_teacher=whole"], ["trainer.fsdp_teacher='whole' acts only with trainer.parallelism='fsdp2'"]),
    ("vllm-memory-unused", ["--set", "rollout.vllm_gpu_memory_utilization=0.5"], ["acts only with rollout.backend='vllm'"]),
]


@pytest.mark.parametrize("case", CONFIG_MISTAKES, ids=[c[0] for c in CONFIG_MISTAKES])
def test_a_config_mistake_is_one_line_and_leaves_no_folder(case, tmp_path, capsys):
    _, extra, fragments = case
    run_dir = tmp_path / "runs" / "refused"
    code = main(["train", *tiny_args(run_dir), *extra])
    captured = capsys.readouterr()
    assert_one_line_refusal(code, captured.err, "train", *fragments)
    assert not (tmp_path / "runs").exists()


@pytest.mark.parametrize(
    "env_name, module, distribution",
    [("scienceworld", "scienceworld", "scienceworld"), ("twx-cookingworld", "textworld_express", "textworld-express"), ("alfworld", "alfworld", "alfworld")],
)
def test_an_environment_whose_engine_is_missing_is_one_line_naming_the_extra(env_name, module, distribution, monkeypatch, tmp_path, capsys):
    from tcod_fast.envs import family

    installed = family._find_spec
    monkeypatch.setattr(family, "_find_spec", lambda name: None if name == module else installed(name))
    code = main(["train", "--output-dir", str(tmp_path / "runs" / "x"), "--set", f"env.name={env_name}"])
    fragments = [f"env.name '{env_name}' needs the Python package {distribution}", "which is not installed", 'pip install "tcod-fast[envs]"']
    assert_one_line_refusal(code, capsys.readouterr().err, "train", *fragments)
    assert not (tmp_path / "runs").exists()


def test_alfworld_without_games_is_one_line_naming_the_command(monkeypatch, tmp_path, capsys):
    monkeypatch.delenv("ALFWORLD_DATA", raising=False)
    code = main(["train", "--output-dir", str(tmp_path / "runs" / "x"), "--set", "env.name=alfworld"])
    assert_one_line_refusal(code, capsys.readouterr().err, "train", "env.kwargs.data_path must name a folder of ALFWorld games", "tcod-fast envs make-alfworld-tasks")
    (tmp_path / "empty").mkdir()
    code = main(["train", "--output-dir", str(tmp_path / "runs" / "x"), "--set", "env.name=alfworld", "--set", f"env.kwargs={{data_path: {tmp_path / 'empty'}}}"])
    assert_one_line_refusal(code, capsys.readouterr().err, "train", "which has none", "tcod-fast envs make-alfworld-tasks")
    assert not (tmp_path / "runs").exists()


def test_config_file_mistakes(tmp_path, capsys):
    cases = [
        (["--config", str(tmp_path / "missing.yaml")], ["config file must be an existing file", "missing.yaml', which does not exist"]),
        (["--config", _write(tmp_path / "typo.yaml", "trainer:\n  stepz: 3\n")], ["unknown config key trainer.stepz", "did you mean trainer.steps?"]),
        (["--config", _write(tmp_path / "choice.yaml", "loss:\n  estimator: exact\n")], ["loss.estimator must be one of full_vocab, sampled, topk, got 'exact'"]),
        (["--config", _write(tmp_path / "broken.yaml", "trainer:\n  steps: [3\n  lr: 1\n")], ["must be valid YAML, got a syntax error at line"]),
        (["--config", _write(tmp_path / "list.yaml", "- 1\n- 2\n")], ["must hold a mapping of sections", "got a list"]),
        (["--config", _write(tmp_path / "broken.json", '{"trainer": {')], ["must be valid JSON, got a syntax error at line 1"]),
        (["--config", _write(tmp_path / "config.txt", "x")], ["config file must end in .yaml, .yml, .toml or .json, got 'config.txt'"]),
    ]
    for extra, fragments in cases:
        code = main(["train", "--output-dir", str(tmp_path / "runs" / "x"), *extra])
        assert_one_line_refusal(code, capsys.readouterr().err, "train", *fragments)
    assert not (tmp_path / "runs").exists()


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without a GPU")
def test_cuda_without_a_gpu_is_refused(tmp_path, capsys):
    for extra, fragment in (
        (["--device", "cuda"], "trainer.device='cuda' needs a CUDA GPU, got none"),
        (["--set", "trainer.device=cuda"], "trainer.device='cuda' needs a CUDA GPU, got none"),
        (["--set", "trainer.bf16=always"], "trainer.bf16='always' needs a CUDA device"),
    ):
        code = main(["train", *tiny_args(tmp_path / "runs" / "gpu"), *extra])
        assert_one_line_refusal(code, capsys.readouterr().err, "train", fragment)
    assert not (tmp_path / "runs").exists()


def test_resume_and_eval_of_missing_runs(tmp_path, capsys):
    missing = tmp_path / "runs" / "never"
    code = main(["train", "--output-dir", str(missing), "--resume"])
    assert_one_line_refusal(code, capsys.readouterr().err, "train", "--resume needs a run folder", "which does not exist")
    code = main(["train", "--output-dir", str(missing), "--resume", "--config", "x.yaml"])
    assert_one_line_refusal(code, capsys.readouterr().err, "train", "got --config x.yaml too")
    code = main(["eval", "--run", str(missing)])
    assert_one_line_refusal(code, capsys.readouterr().err, "eval", "--run must be a training run folder", "which does not exist")
    code = main(["eval", "--config", _write(tmp_path / "c.yaml", "{}\n"), "--student", str(tmp_path / "nope")])
    assert_one_line_refusal(code, capsys.readouterr().err, "eval", "--student must be a local Hugging Face model folder")
    code = main(["demo", "--quick", "--robust", "opd,ppo", "--out", str(tmp_path / "runs" / "demo")])
    assert_one_line_refusal(code, capsys.readouterr().err, "demo", "--robust takes algorithms from opd", "got 'ppo'")
    assert not (tmp_path / "runs").exists()


def test_the_real_command_prints_one_line_and_debug_shows_the_traceback(tmp_path):
    run_dir = tmp_path / "run"
    out = run_cli("train", "--output-dir", str(run_dir), "--set", "trainer.lrr=1")
    line = assert_one_line_refusal(out.returncode, out.stderr, "train", "unknown config key trainer.lrr")
    assert out.stderr.strip() == line and out.stdout == ""
    out = run_cli("train", "--output-dir", str(run_dir), "--set", "model.teacher_path=/no/such/teacher")
    assert_one_line_refusal(out.returncode, out.stderr, "train", "model.teacher_path must be", "does not exist")
    assert not run_dir.exists()
    for args, env in ((["--debug", "train"], None), (["train", "--debug"], None), (["train"], {"TCOD_FAST_DEBUG": "1"})):
        out = run_cli(*args, "--output-dir", str(run_dir), "--set", "trainer.lrr=1", env_extra=env)
        assert out.returncode != 0 and "Traceback" in out.stderr and "ConfigError" in out.stderr, (args, out.stderr)


def test_a_torchrun_worker_exits_with_its_code_and_loses_no_output(tmp_path):
    """Under torchrun (TORCHELASTIC_RUN_ID set) the command ends with os._exit after
    flushing: the exit code and the printed lines are those of a normal exit."""
    run_dir = tmp_path / "run"
    worker = {"TORCHELASTIC_RUN_ID": "test"}
    out = run_cli("train", "--output-dir", str(run_dir), "--set", "trainer.lrr=1", env_extra=worker)
    assert_one_line_refusal(out.returncode, out.stderr, "train", "unknown config key trainer.lrr")
    out = run_cli("train", "--help", env_extra=worker)
    assert out.returncode == 0 and "--resume" in out.stdout


def test_train_help_says_how_to_choose_env_teacher_and_resume():
    out = run_cli("train", "--help")
    assert out.returncode == 0
    for fragment in ("--set env.name=", "--set model.teacher_path=DIR", "--resume", "random-init"):
        assert fragment in out.stdout, fragment


# ------------------------------------------------------------------ runs on disk
def _train_records(run_dir):
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    records = [json.loads(line) for line in lines]  # every line is whole JSON
    return records


def _final_weights(run_dir):
    from safetensors.torch import load_file

    return load_file(str(run_dir / "final" / "model.safetensors"))


def _snapshot(run_dir):
    return {p.relative_to(run_dir): (p.read_bytes(), p.stat().st_mtime_ns) for p in sorted(run_dir.rglob("*")) if p.is_file()}


STEPS = 4


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    """An uninterrupted tiny run through the real command, checkpointing every step."""
    run_dir = tmp_path_factory.mktemp("straight") / "run"
    out = run_cli("train", *tiny_args(run_dir, f"trainer.steps={STEPS}", "trainer.checkpoint_every=1"))
    assert out.returncode == 0, out.stderr
    assert "Traceback" not in out.stderr
    return run_dir, out


def test_train_ends_with_a_short_summary_and_warns_about_a_random_teacher(finished_run):
    run_dir, out = finished_run
    assert len(out.stdout.splitlines()) <= 10, out.stdout
    assert "success rate" in out.stdout and "final evaluation" in out.stdout and "{" not in out.stdout
    assert "warning: model.teacher_path is not set, so the teacher is a random-init" in out.stderr
    records = _train_records(run_dir)
    assert [r["step"] for r in records if r["kind"] == "train"] == list(range(STEPS))
    assert [r["step"] for r in records if r["kind"] == "eval"] == [STEPS]


def test_resuming_a_finished_run_changes_nothing(finished_run):
    run_dir, _ = finished_run
    before = _snapshot(run_dir)
    out = run_cli("train", "--output-dir", str(run_dir), "--resume")
    assert out.returncode == 0, out.stderr
    assert f"finished at step {STEPS}" in out.stdout and "nothing changed" in out.stdout
    assert _snapshot(run_dir) == before


def test_a_rerun_into_a_run_folder_is_refused(finished_run):
    run_dir, _ = finished_run
    before = _snapshot(run_dir)
    out = run_cli("train", *tiny_args(run_dir))
    assert_one_line_refusal(out.returncode, out.stderr, "train", "--output-dir must be a new run folder", "--resume", "metrics.jsonl")
    out = run_cli("train", "--output-dir", str(run_dir), "--resume", "--steps", str(STEPS + 2), "--algorithm", "tcod_f2b")
    assert_one_line_refusal(out.returncode, out.stderr, "train", "a resumed run keeps curriculum.algorithm='opd'", "got 'tcod_f2b'")
    out = run_cli("train", "--output-dir", str(run_dir), "--resume", "--steps", str(STEPS - 1))
    assert_one_line_refusal(out.returncode, out.stderr, "train", f"--steps must be >= {STEPS}", f"got {STEPS - 1}")
    assert _snapshot(run_dir) == before


def test_kill_at_a_random_moment_then_resume_gives_the_uninterrupted_run(finished_run, tmp_path):
    straight_dir, _ = finished_run
    run_dir = tmp_path / "killed"
    seed = int(os.environ.get("TCOD_FAST_KILL_SEED", random.randrange(10**6)))  # printed on failure
    rng = random.Random(seed)
    after_checkpoint, delay = rng.randint(1, STEPS - 1), rng.uniform(0.0, 0.4)
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    args = ["train", *tiny_args(run_dir, f"trainer.steps={STEPS}", "trainer.checkpoint_every=1")]
    process = subprocess.Popen([sys.executable, "-m", "tcod_fast.cli", *args], cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    marker = run_dir / "checkpoints" / f"step_{after_checkpoint:08d}.pt"
    deadline = time.monotonic() + 180
    while process.poll() is None and not marker.exists() and time.monotonic() < deadline:
        time.sleep(0.01)
    time.sleep(delay)  # somewhere in the steps after that checkpoint: rollout, update, a log line...
    process.send_signal(signal.SIGKILL)
    assert process.wait(timeout=60) == -signal.SIGKILL, seed  # it was cut short, not finished

    out = run_cli("train", "--output-dir", str(run_dir), "--resume")
    assert out.returncode == 0, (seed, out.stderr)
    assert "Traceback" not in out.stderr
    straight, resumed = _final_weights(straight_dir), _final_weights(run_dir)
    assert straight.keys() == resumed.keys()
    for name in straight:
        assert torch.equal(straight[name], resumed[name]), (seed, name)
    records = _train_records(run_dir)  # no torn line
    assert [r["step"] for r in records if r["kind"] == "train"] == list(range(STEPS)), seed
    assert [r["step"] for r in records if r["kind"] == "eval"] == [STEPS], seed
    losses = [r["loss"] for r in _train_records(straight_dir) if r["kind"] == "train"]
    assert [r["loss"] for r in records if r["kind"] == "train"] == losses, seed
