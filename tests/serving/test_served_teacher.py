"""A real vLLM OpenAI-compatible server serving a tiny teacher: log-probs, training, faults.

One server for the module (start-up is the slow part); the fault test kills it and so runs
last. Every server a test starts is stopped by the fixture, whatever happens.
"""

from __future__ import annotations

import sys
import threading
import time
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "trainer"))
from trainer_helpers import build_toy_tokenizer, tiny_overrides  # noqa: E402
from vllm_helpers import VLLM_SKIP_REASON, VLLMServer, save_tiny_model  # noqa: E402

from tcod_fast.rollout.generation import SamplingParams
from tcod_fast.rollout.served_teacher import ServedTeacher

pytestmark = [
    pytest.mark.skipif(VLLM_SKIP_REASON is not None, reason=f"needs vLLM: {VLLM_SKIP_REASON}"),
    pytest.mark.slow,
]


@pytest.fixture(scope="module")
def tokenizer():
    return build_toy_tokenizer()


@pytest.fixture(scope="module")
def teacher_dir(tmp_path_factory, tokenizer):
    return save_tiny_model(tmp_path_factory.mktemp("teacher"), tokenizer, seed=2)


@pytest.fixture(scope="module")
def server(teacher_dir, tmp_path_factory):
    server = VLLMServer(teacher_dir, tmp_path_factory.mktemp("logs") / "server.log")
    try:
        yield server
    finally:
        server.stop()
        assert server.process.poll() is not None


def _train_overrides(out, server, teacher_dir, *extra):
    return tiny_overrides(
        out,
        f"teacher.server_url={server.url}",
        f"model.tokenizer_path={teacher_dir}",
        "teacher.top_k=8",
        "teacher.timeout_s=120",
        *extra,
    )


def test_served_logprobs_equal_in_process_teacher(server, teacher_dir, tokenizer):
    from transformers import AutoModelForCausalLM

    teacher = AutoModelForCausalLM.from_pretrained(str(teacher_dir), dtype=torch.float32).eval()
    client = ServedTeacher(server.url, tokenizer, top_k=8)
    generator = torch.Generator().manual_seed(0)
    sequences = [torch.randint(3, len(tokenizer), (n,), generator=generator).tolist() for n in (5, 17, 40)]
    scores = client.score(sequences)
    for sequence, score in zip(sequences, scores):
        with torch.no_grad():
            logprobs = torch.log_softmax(teacher(torch.tensor([sequence])).logits[0].double(), -1)
        expected = logprobs[:-1].gather(-1, torch.tensor(sequence[1:]).unsqueeze(-1)).squeeze(-1)
        torch.testing.assert_close(score.token_logprobs[1:].double(), expected, atol=1e-4, rtol=0)
        top_values, top_ids = logprobs[:-1].topk(8, dim=-1)
        torch.testing.assert_close(score.topk_logprobs[1:].double(), top_values, atol=1e-4, rtol=0)
        # ids agree wherever the teacher's values are not tied within the tolerance
        gaps = (top_values[:, :-1] - top_values[:, 1:]).abs() > 1e-4
        assert bool((score.topk_ids[1:, 0] == top_ids[:, 0])[gaps[:, 0]].all())


def test_served_generation_keeps_sampled_ids(server, tokenizer):
    client = ServedTeacher(server.url, tokenizer)
    prompt = tokenizer("You are in the kitchen.", add_special_tokens=False)["input_ids"]
    params = SamplingParams(temperature=1.0, max_new_tokens=6, seed=5)
    first = client.generate([prompt, prompt], params)
    again = client.generate([prompt, prompt], params)
    assert [o.token_ids for o in first] == [o.token_ids for o in again]  # seeded
    for output in first:
        assert 1 <= len(output.token_ids) <= 6
        assert output.text == tokenizer.decode(output.token_ids, skip_special_tokens=False)


@pytest.mark.parametrize(
    "extra",
    [
        ("loss.estimator=sampled", "curriculum.algorithm=opd"),
        ("loss.estimator=topk", "curriculum.algorithm=opd"),
        ("loss.estimator=topk", "curriculum.algorithm=tcod_b2f", "curriculum.b2f_prefix_source=teacher"),
    ],
    ids=["sampled", "topk", "topk-b2f-teacher-prefix"],
)
def test_cli_train_against_served_teacher(server, teacher_dir, tmp_path, extra):
    import json

    from tcod_fast.cli import main

    out = tmp_path / "run"
    overrides = _train_overrides(out, server, teacher_dir, "trainer.steps=2", *extra)
    code = main(["train", *[arg for item in overrides for arg in ("--set", item)]])
    assert code == 0
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in records if r["kind"] == "train"]
    assert [r["step"] for r in train] == [0, 1]
    assert all(torch.isfinite(torch.tensor(r["loss"])) for r in train)
    assert any(r["kl/trajectory_mean"] > 0 for r in train)
    if "curriculum.b2f_prefix_source=teacher" in extra:
        assert any(r["turns/teacher_mean"] > 0 for r in train), "the served teacher played no B2F prefix turn"
    assert (out / "final" / "config.json").is_file()


def test_server_killed_mid_run_keeps_last_checkpoint(server, teacher_dir, tmp_path, capsys):
    """Runs last in the module: it kills the shared server."""
    from tcod_fast.cli import main
    from tcod_fast.trainer.checkpoint import load_latest_checkpoint

    out = tmp_path / "run"
    overrides = _train_overrides(
        out, server, teacher_dir, "trainer.steps=6", "trainer.checkpoint_every=1", "loss.estimator=topk",
        "curriculum.algorithm=opd", "teacher.retries=2", "teacher.backoff_s=0.2", "teacher.timeout_s=10",
    )

    def kill_after_first_checkpoint():
        while not list((out / "checkpoints").glob("*")):
            time.sleep(0.05)
        server.kill()

    killer = threading.Thread(target=kill_after_first_checkpoint, daemon=True)
    killer.start()
    code = main(["train", *[arg for item in overrides for arg in ("--set", item)]])
    killer.join(30)
    assert code == 2  # a UserError: one line, no traceback
    error_lines = [line for line in capsys.readouterr().err.splitlines() if "teacher server" in line]
    assert len(error_lines) == 1 and server.url in error_lines[0] and "/v1/completions" in error_lines[0]
    found = load_latest_checkpoint(out / "checkpoints")
    assert found is not None
    path, state = found
    assert 1 <= int(state["step"]) < 6
    assert {"student", "optimizer", "step"} <= set(state)
