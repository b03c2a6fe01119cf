"""The tcod-fast command: every subcommand explains itself, and the quick demo runs end to end."""

import json
import re
import subprocess
import sys

import pytest
from float32_tolerances import kl_tolerance

from tcod_fast.cli import main


@pytest.fixture(autouse=True)
def _restore_torch_threads():
    # demo and train set torch's thread count from their settings; do not leak it
    import torch

    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


SUBCOMMANDS = [["demo"], ["train"], ["eval"], ["bench"], ["kernel-demo"], ["envs"]]


@pytest.mark.parametrize("command", SUBCOMMANDS, ids=lambda c: " ".join(c))
def test_every_subcommand_has_help(command, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main([*command, "--help"])
    assert exit_info.value.code == 0
    text = capsys.readouterr().out
    assert f"tcod-fast {' '.join(command)}" in text
    assert len(text.splitlines()) > 3


def test_top_level_help_lists_the_subcommands(capsys):
    with pytest.raises(SystemExit):
        main(["--help"])
    text = capsys.readouterr().out
    for name in ("demo", "train", "eval", "bench", "kernel-demo", "envs"):
        assert name in text


def test_make_alfworld_tasks_delegates_its_help():
    pytest.importorskip("tcod_fast.envs.alfworld")
    out = subprocess.run(
        [sys.executable, "-m", "tcod_fast.cli", "envs", "make-alfworld-tasks", "--help"], capture_output=True, text=True, timeout=120
    )
    assert out.returncode == 0, out.stderr
    assert "--out" in out.stdout


def test_train_print_config_applies_overrides(capsys):
    assert main(["train", "--algorithm", "tcod_b2f", "--steps", "3", "--set", "trainer.lr=2e-5", "--print-config"]) == 0
    text = capsys.readouterr().out
    assert "algorithm: tcod_b2f" in text and "steps: 3" in text and "lr: 2.0e-05" in text


def test_demo_rejects_unknown_algorithms_before_any_work(tmp_path, capsys):
    for flag, value in (("--robust", "opd,tcod_x"), ("--narrow", "opd@kl")):
        assert main(["demo", "--quick", flag, value, "--out", str(tmp_path / "demo")]) == 2
        error = capsys.readouterr().err
        assert re.fullmatch(f"tcod-fast demo: {flag} takes algorithms from opd, .*got '{value.split(',')[-1]}'\n", error)
    assert main(["demo", "--quick", "--robust", "grpo@sampled", "--out", str(tmp_path / "demo")]) == 2
    assert capsys.readouterr().err == "tcod-fast demo: --robust takes grpo without @sampled (grpo has no teacher term); got 'grpo@sampled'\n"
    assert not (tmp_path / "demo").exists()


def test_train_rejects_unknown_keys(capsys):
    assert main(["train", "--set", "trainer.lrr=1", "--print-config"]) == 2
    assert capsys.readouterr().err.startswith("tcod-fast train: unknown config key trainer.lrr in --set 'trainer.lrr=1' (did you mean trainer.lr?)")


def test_kernel_demo_reports_every_backend(capsys, tmp_path):
    assert main(["kernel-demo", "--json", str(tmp_path / "k.json")]) == 0
    report = json.loads((tmp_path / "k.json").read_text())
    losses = [row["loss"] for row in report["rows"]]
    assert len(losses) >= 2  # at least the torch backend and the materialised reference
    batch, seq, vocab_size = report["shape"]
    tolerance = kl_tolerance(vocab_size, batch * seq)  # the same sums in each backend's order
    assert all(l == pytest.approx(losses[-1], **tolerance) for l in losses)  # all backends agree
    assert "KL by turn" in capsys.readouterr().out


def test_train_then_eval_from_the_command_line(tmp_path, capsys):
    run_dir = tmp_path / "run"
    tiny = [
        "--set", "trainer.num_threads=1", "--set", "env.kwargs={max_rooms: 2}", "--set", "curriculum.max_turns=3",
        "--set", "rollout.tasks_per_step=2", "--set", "rollout.max_new_tokens=6", "--set", "eval.num_tasks=2",
        "--set", "logging.progress=false",
        "--set", "model.student_tiny={hidden_size: 32, intermediate_size: 64, num_hidden_layers: 1}",
        "--set", "model.teacher_tiny={hidden_size: 32, intermediate_size: 64, num_hidden_layers: 1}",
    ]
    assert main(["train", "--algorithm", "tcod_f2b", "--steps", "1", "--output-dir", str(run_dir), *tiny]) == 0
    for name in ("config.yaml", "metrics.jsonl", "training_curves.png", "final/config.json", "checkpoints/latest"):
        assert (run_dir / name).exists(), name
    capsys.readouterr()
    assert main(["eval", "--run", str(run_dir), "--out", str(tmp_path / "eval.json"), "--set", "eval.num_tasks=2"]) == 0
    results = json.loads((tmp_path / "eval.json").read_text())
    assert 0.0 <= results["success_seen"] <= 1.0 and results["kl_by_turn_seen"]
