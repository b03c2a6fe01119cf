"""Bad input raises one clear error before any kernel runs, naming what was expected and received."""

import math

import pytest
import torch

from tcod_fast import fused_linear_topk_turn_kl, fused_topk_turn_kl
from tcod_fast.ops.topk_turn_kl import api


@pytest.fixture
def inputs():
    student = torch.randn(2, 3, 10, requires_grad=True)
    ids = torch.tensor([[[1, 2], [3, -1], [0, 9]], [[4, 5], [6, 7], [8, -1]]])
    logprobs = torch.full((2, 3, 2), -1.5)
    return student, ids, logprobs


@pytest.fixture
def no_kernel(monkeypatch):
    """Fails the test if a backend is reached: every check must come first."""

    def reached(*args, **kwargs):
        raise AssertionError("a kernel ran before the input was rejected")

    monkeypatch.setattr(api, "run_backend", reached)


def test_id_out_of_range(inputs, no_kernel):
    student, ids, logprobs = inputs
    ids[1, 2, 0] = 10
    with pytest.raises(ValueError, match=r"teacher_topk_ids must be -1 \(padding\) or lie in \[0, V=10\); got 10 at \(1, 2, 0\)"):
        fused_topk_turn_kl(student, ids, logprobs)
    ids[1, 2, 0] = -2
    with pytest.raises(ValueError, match=r"got -2 at \(1, 2, 0\)"):
        fused_topk_turn_kl(student, ids, logprobs)


def test_duplicate_ids_in_a_row(inputs, no_kernel):
    student, ids, logprobs = inputs
    ids[0, 1] = torch.tensor([3, 3])
    with pytest.raises(ValueError, match=r"must not repeat an id within a row; id 3 appears twice in row \(0, 1\)"):
        fused_topk_turn_kl(student, ids, logprobs)


def test_repeated_padding_is_fine(inputs):
    student, ids, logprobs = inputs
    ids[0, 1] = torch.tensor([-1, -1])
    assert torch.isfinite(fused_topk_turn_kl(student, ids, logprobs))


def test_shape_mismatch(inputs, no_kernel):
    student, ids, logprobs = inputs
    with pytest.raises(ValueError, match=r"teacher_topk_ids must be shaped \(2, 3, K\) to match student_logits leading shape \(2, 3\), got \(2, 4, 2\)"):
        fused_topk_turn_kl(student, torch.zeros(2, 4, 2, dtype=torch.long), logprobs)
    with pytest.raises(ValueError, match=r"teacher_topk_logprobs must have teacher_topk_ids' shape \(2, 3, 2\), got \(2, 3, 3\)"):
        fused_topk_turn_kl(student, ids, torch.full((2, 3, 3), -1.0))
    with pytest.raises(ValueError, match=r"at least one id per row \(K >= 1\), got \(2, 3, 0\)"):
        fused_topk_turn_kl(student, ids[..., :0], logprobs[..., :0])


def test_non_integer_ids(inputs, no_kernel):
    student, ids, logprobs = inputs
    with pytest.raises(TypeError, match=r"teacher_topk_ids must be an integer tensor \(-1 = padding\), got dtype torch.float32"):
        fused_topk_turn_kl(student, ids.float(), logprobs)
    with pytest.raises(TypeError, match=r"teacher_topk_ids must be a torch.Tensor, got list"):
        fused_topk_turn_kl(student, ids.tolist(), logprobs)


def test_integer_logprobs(inputs, no_kernel):
    student, ids, _ = inputs
    with pytest.raises(TypeError, match=r"teacher_topk_logprobs must be a float tensor \(float32\), got dtype torch.int64"):
        fused_topk_turn_kl(student, ids, torch.zeros(2, 3, 2, dtype=torch.long))


def test_logprobs_above_zero_or_nan(inputs, no_kernel):
    student, ids, logprobs = inputs
    logprobs[0, 2, 1] = 0.25
    with pytest.raises(ValueError, match=r"log-probabilities \(<= 0, not NaN\) at every non-padding id; got 0.25 at \(0, 2, 1\)"):
        fused_topk_turn_kl(student, ids, logprobs)
    logprobs[0, 2, 1] = math.nan
    with pytest.raises(ValueError, match=r"got nan at \(0, 2, 1\)"):
        fused_topk_turn_kl(student, ids, logprobs)


def test_logprobs_at_padding_are_ignored(inputs):
    student, ids, logprobs = inputs
    logprobs[0, 1, 1] = 7.0  # ids[0, 1, 1] is -1
    assert torch.isfinite(fused_topk_turn_kl(student, ids, logprobs))


def test_unknown_tail_mode_and_bad_tail_eps(inputs, no_kernel):
    student, ids, logprobs = inputs
    with pytest.raises(ValueError, match=r"tail must be one of \('bucket', 'renormalize'\), got 'other'"):
        fused_topk_turn_kl(student, ids, logprobs, tail="other")
    with pytest.raises(ValueError, match=r"tail_eps must be a number in \(0, 1\), got 0"):
        fused_topk_turn_kl(student, ids, logprobs, tail_eps=0)


def test_the_shared_keywords_are_checked_like_fused_turn_kl(inputs, no_kernel):
    student, ids, logprobs = inputs
    with pytest.raises(ValueError, match=r"divergence must be one of"):
        fused_topk_turn_kl(student, ids, logprobs, divergence="kl")
    with pytest.raises(ValueError, match=r"reduction must be one of"):
        fused_topk_turn_kl(student, ids, logprobs, reduction="avg")
    with pytest.raises(ValueError, match=r"temperature must be a finite number > 0, got 0"):
        fused_topk_turn_kl(student, ids, logprobs, temperature=0)
    with pytest.raises(ValueError, match=r"turn_ids must have the logits' leading shape \(2, 3\), got \(2, 4\)"):
        fused_topk_turn_kl(student, ids, logprobs, torch.zeros(2, 4, dtype=torch.long))
    with pytest.raises(ValueError, match=r"lo must be <= hi, got lo=3 > hi=1"):
        fused_topk_turn_kl(student, ids, logprobs, turn_window=(3, 1))
    with pytest.raises(ValueError, match=r"target_ids must lie in \[0, vocab_size=10\)"):
        fused_topk_turn_kl(student, ids, logprobs, target_ids=torch.full((2, 3), 10))
    with pytest.raises(ValueError, match=r"backend must be one of"):
        fused_topk_turn_kl(student, ids, logprobs, backend="cuda")


def test_student_logits(inputs, no_kernel):
    _, ids, logprobs = inputs
    with pytest.raises(TypeError, match=r"student_logits must be float32/bfloat16/float16/float64, got torch.int64"):
        fused_topk_turn_kl(torch.ones(2, 3, 10, dtype=torch.long), ids, logprobs)
    with pytest.raises(ValueError, match=r"student_logits must be \(B, T, V\) or \(N, V\), got 1-D shape \(10\)"):
        fused_topk_turn_kl(torch.randn(10), ids[0, 0], logprobs[0, 0])


def test_fused_linear_checks_its_inputs(inputs, monkeypatch):
    _, ids, logprobs = inputs
    from tcod_fast.ops.fused_linear_topk_turn_kl import chunked

    monkeypatch.setattr(chunked, "run_backend", lambda *a, **k: (_ for _ in ()).throw(AssertionError("ran")))
    hidden = torch.randn(2, 3, 4)
    weight = torch.randn(10, 4)
    with pytest.raises(ValueError, match=r"hidden size 5, but student_hidden has hidden size 4"):
        fused_linear_topk_turn_kl(hidden, torch.randn(10, 5), ids, logprobs)
    with pytest.raises(ValueError, match=r"to match the hidden states leading shape \(2, 3\), got \(2, 2, 2\)"):
        fused_linear_topk_turn_kl(hidden, weight, ids[:, :2], logprobs[:, :2])
    bad = ids.clone()
    bad[0, 0, 0] = 10
    with pytest.raises(ValueError, match=r"lie in \[0, V=10\); got 10 at \(0, 0, 0\)"):
        fused_linear_topk_turn_kl(hidden, weight, bad, logprobs)
    with pytest.raises(ValueError, match=r"chunk_size must be a positive integer"):
        fused_linear_topk_turn_kl(hidden, weight, ids, logprobs, chunk_size=0)
    with pytest.raises(ValueError, match=r"tail must be one of"):
        fused_linear_topk_turn_kl(hidden, weight, ids, logprobs, tail="none")
