"""The served-teacher client's retries and errors, against a local HTTP server that fails on
purpose, and the top-K teacher maps the loss uses. No vLLM needed."""

from __future__ import annotations

import json
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "trainer"))
from trainer_helpers import tiny_config  # noqa: E402

from tcod_fast.errors import ConfigError
from tcod_fast.rollout.served_teacher import ServedTeacher, TeacherServerError
from tcod_fast.trainer.config import check_config


class _Tokenizer:
    eos_token_id = 0


def _answer(sequence):
    positions = [None] + [{str(t): -0.5, str(t + 1): -1.5} for t in sequence[1:]]
    return {"choices": [{"prompt_logprobs": positions}]}


class _FailingServer:
    """Answers ``/v1/completions`` with each of ``plan`` in turn (then the last): ``"ok"``,
    ``"500"``, ``"garbage"`` or ``"slow"``; counts requests."""

    def __init__(self, plan):
        self.plan, self.requests = list(plan), 0
        owner = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                kind = owner.plan[min(owner.requests, len(owner.plan) - 1)]
                owner.requests += 1
                if kind == "slow":
                    time.sleep(1.0)
                if kind == "500":
                    self.send_response(500)
                    self.end_headers()
                    self.wfile.write(b"engine error")
                    return
                payload = b"{not json" if kind == "garbage" else json.dumps(_answer(body["prompt"])).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.end_headers()
                self.wfile.write(payload)

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()
        self.thread.join(10)


@pytest.fixture
def failing_server(request):
    server = _FailingServer(request.param)
    yield server
    server.close()


def _client(url, **kwargs):
    return ServedTeacher(url, _Tokenizer(), model="teacher", top_k=1, backoff_s=0.01, **kwargs)


@pytest.mark.parametrize("failing_server", [["500", "garbage", "ok"]], indirect=True)
def test_failures_are_retried_until_an_answer(failing_server):
    scores = _client(failing_server.url, retries=3).score([[5, 7, 9]])
    assert failing_server.requests == 3
    assert scores[0].token_logprobs.tolist() == [0.0, -0.5, -0.5]
    assert scores[0].topk_ids[1:, 0].tolist() == [7, 9]


@pytest.mark.parametrize(
    ("failing_server", "expected"),
    [(["garbage"], "malformed JSON"), (["500"], "HTTP 500: engine error"), (["slow"], "timed out")],
    indirect=["failing_server"],
)
def test_persistent_failure_is_one_line_naming_url_and_request(failing_server, expected):
    with pytest.raises(TeacherServerError) as error:
        _client(failing_server.url, retries=1, timeout_s=0.3).score([[5, 7, 9]])
    message = str(error.value)
    assert failing_server.requests == 2
    assert "\n" not in message
    assert failing_server.url in message and "POST /v1/completions (score 1/1, 3 prompt tokens)" in message
    assert "after 2 attempt(s)" in message and expected in message


def test_served_teacher_needs_a_sparse_estimator(tmp_path):
    with pytest.raises(ConfigError, match=r"loss.estimator 'sampled' or 'topk'.*got loss.estimator='full_vocab'"):
        check_config(tiny_config(tmp_path, "teacher.server_url=http://127.0.0.1:1"))
    with pytest.raises(ConfigError, match="teacher.server_url must start with http"):
        check_config(tiny_config(tmp_path, "teacher.server_url=127.0.0.1:1", "loss.estimator=topk"))


def test_full_top_k_equals_the_full_vocabulary_kl():
    """With K = V the top-K map is the whole teacher distribution: the sparse statistics
    equal ``fused_turn_kl``'s, float64 reference on fresh random inputs."""
    from types import SimpleNamespace

    from tcod_fast import fused_turn_kl
    from tcod_fast.trainer.loss import ModelOutputs, turn_kl_statistics
    from tcod_fast.trainer.sparse_teacher import in_process_sparse_teacher

    rows, positions, vocab = 3, 11, 37
    student = torch.randn(rows, positions, vocab, dtype=torch.float64, requires_grad=True)
    teacher = torch.randn(rows, positions, vocab, dtype=torch.float64)
    target_ids = torch.randint(vocab, (rows, positions))
    turn_ids = torch.randint(-1, 3, (rows, positions))
    packed = SimpleNamespace(target_ids=target_ids, turn_ids=turn_ids, trained=turn_ids >= 0, num_turns=3, cu_seqlens=None)
    sparse = in_process_sparse_teacher(teacher, packed, top_k=vocab)
    outputs = ModelOutputs(student=student, teacher=None, hidden=False)
    ours = turn_kl_statistics(outputs, packed, divergence="reverse_kl", backend="torch", sparse_teacher=sparse)
    exact = fused_turn_kl(
        student, teacher, turn_ids, target_ids=target_ids, reduction="sum", return_stats=True, num_turns=3, backend="torch"
    )
    torch.testing.assert_close(ours.turn_kl_sum.double(), exact.turn_kl_sum.double(), atol=1e-5, rtol=1e-5)
    kept = turn_ids >= 0
    torch.testing.assert_close(ours.teacher_logprob[kept].double(), exact.teacher_logprob[kept].double(), atol=1e-5, rtol=0)


def test_topk_estimator_with_whole_vocabulary_equals_full_vocab_loss(tmp_path):
    """The trainer's ``loss.estimator=topk`` with ``teacher.top_k >= V`` is the exact loss."""
    from trainer_helpers import build_toy_tokenizer

    from tcod_fast.trainer import loop
    from tcod_fast.trainer.loss import compute_loss, trained_token_count
    from tcod_fast.trainer.setup import setup_run

    config = tiny_config(tmp_path / "run", "curriculum.algorithm=opd", "loss.fused_linear=never", "loss.backend=torch")
    run = setup_run(config, tokenizer=build_toy_tokenizer())
    try:
        batch = loop.rollout(run, 0)
        advantages = loop.compute_advantages(run, batch, loop.score(run, batch))
        indices = [i for i, (t, p) in enumerate(zip(batch.trajectories, batch.plans)) if trained_token_count(t, p)]
        trajectories = [batch.trajectories[i] for i in indices]
        plans = [batch.plans[i] for i in indices]
        sequence = advantages.sequence[indices]

        def loss():
            return compute_loss(run, trajectories, plans, sequence, advantages.coefficients, 10.0, with_grad=False)

        exact = loss()
        run.config.loss.estimator, run.config.teacher.top_k = "topk", 100_000
        sparse = loss()
    finally:
        run.logger.close()
    assert exact.kl_term > 0
    torch.testing.assert_close(sparse.kl_term, exact.kl_term, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(sparse.turn_kl_sum, exact.turn_kl_sum, atol=1e-5, rtol=1e-5)
