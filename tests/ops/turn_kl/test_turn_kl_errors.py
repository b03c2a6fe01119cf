"""Bad input raises a clear error before any kernel runs, naming what was wrong."""

import pytest
import torch

from tcod_fast import fused_turn_kl, topk_turn_kl_reference, turn_kl_reference


@pytest.fixture
def logits():
    return torch.randn(2, 3, 10, requires_grad=True), torch.randn(2, 3, 10)


def test_vocab_mismatch_names_both_sizes():
    with pytest.raises(ValueError, match=r"vocab 32000 but teacher_logits has 32001"):
        fused_turn_kl(torch.randn(2, 32000), torch.randn(2, 32001))


def test_vocab_size_out_of_range():
    with pytest.raises(ValueError, match=r"vocab_size must be .* got 12"):
        fused_turn_kl(torch.randn(2, 10), torch.randn(2, 11), vocab_size=12)


def test_leading_shape_mismatch():
    with pytest.raises(ValueError, match=r"leading shape \(2, 3\) does not match .* \(2, 4\)"):
        fused_turn_kl(torch.randn(2, 3, 10), torch.randn(2, 4, 10))


def test_rank():
    with pytest.raises(ValueError, match=r"\(B, T, V\) or \(N, V\), got 1-D"):
        fused_turn_kl(torch.randn(10), torch.randn(10))


def test_dtype():
    with pytest.raises(TypeError, match=r"student_logits must be float.*got torch.int64"):
        fused_turn_kl(torch.ones(2, 10, dtype=torch.long), torch.randn(2, 10))


def test_non_tensor():
    with pytest.raises(TypeError, match=r"teacher_logits must be a torch.Tensor, got list"):
        fused_turn_kl(torch.randn(2, 10), [[0.0] * 10] * 2)


def test_turn_ids_shape(logits):
    with pytest.raises(ValueError, match=r"turn_ids must have the logits' leading shape \(2, 3\), got \(2, 4\)"):
        fused_turn_kl(*logits, torch.zeros(2, 4, dtype=torch.long))


def test_turn_ids_dtype(logits):
    with pytest.raises(TypeError, match=r"turn_ids must be an integer tensor, got dtype torch.float32"):
        fused_turn_kl(*logits, torch.zeros(2, 3))


def test_target_ids_out_of_vocab(logits):
    with pytest.raises(ValueError, match=r"target_ids must lie in \[0, vocab_size=10\)"):
        fused_turn_kl(*logits, target_ids=torch.full((2, 3), 10))


def test_window_lo_greater_than_hi(logits):
    with pytest.raises(ValueError, match=r"lo must be <= hi, got lo=3 > hi=1"):
        fused_turn_kl(*logits, torch.zeros(2, 3, dtype=torch.long), turn_window=(3, 1))


def test_window_tensor_row_lo_greater_than_hi(logits):
    with pytest.raises(ValueError, match=r"lo > hi"):
        fused_turn_kl(*logits, turn_window=torch.tensor([[0, 2], [4, 1]]))


def test_window_tensor_shape(logits):
    with pytest.raises(ValueError, match=r"\(B, 2\) = \(2, 2\).*got \(3, 2\)"):
        fused_turn_kl(*logits, turn_window=torch.zeros(3, 2, dtype=torch.long))


def test_window_not_pair(logits):
    with pytest.raises(TypeError, match=r"turn_window must be \(lo, hi\)"):
        fused_turn_kl(*logits, turn_window=(1, 2, 3))


def test_negative_temperature(logits):
    with pytest.raises(ValueError, match=r"temperature must be a finite number > 0, got -1.0"):
        fused_turn_kl(*logits, temperature=-1.0)


@pytest.mark.parametrize(
    "kwargs, pattern",
    [
        (dict(divergence="kl"), r"divergence must be one of .*got 'kl'"),
        (dict(reduction="avg"), r"reduction must be one of .*got 'avg'"),
        (dict(backend="cuda"), r"backend must be one of .*got 'cuda'"),
        (dict(beta=1.5), r"beta must be a number in \[0, 1\], got 1.5"),
        (dict(num_turns=0), r"num_turns must be a positive integer, got 0"),
    ],
)
def test_unknown_options(logits, kwargs, pattern):
    with pytest.raises(ValueError, match=pattern):
        fused_turn_kl(*logits, **kwargs)


def test_turn_weights_shape(logits):
    with pytest.raises(ValueError, match=r"turn_weights must be shaped \(B, num_turns\) with B=2, got \(3, 4\)"):
        fused_turn_kl(*logits, turn_weights=torch.ones(3, 4))


def test_turn_ids_beyond_turn_weights(logits):
    with pytest.raises(ValueError, match=r"turn_ids must be < num_turns=2"):
        fused_turn_kl(*logits, torch.full((2, 3), 5), turn_weights=torch.ones(2, 2))


def test_native_backend_rejects_float64():
    with pytest.raises(TypeError, match=r"native.*got torch.float64"):
        fused_turn_kl(torch.randn(2, 5, dtype=torch.float64), torch.randn(2, 5, dtype=torch.float64), backend="native")


def test_device_mismatch_is_named():
    # a meta tensor stands in for "another device": the check must fire before any compute
    with pytest.raises(ValueError, match=r"student_logits is on cpu but teacher_logits is on meta"):
        fused_turn_kl(torch.randn(2, 5), torch.randn(2, 5, device="meta"))


def test_turn_ids_device_mismatch(logits):
    with pytest.raises(ValueError, match=r"turn_ids is on meta but the logits are on cpu"):
        fused_turn_kl(*logits, torch.zeros(2, 3, dtype=torch.long, device="meta"))


def test_references_take_the_public_keywords_and_name_an_unknown_one():
    """A call of a public function replays unchanged on its float64 reference (backend-only
    keywords are ignored there); a keyword neither knows is a TypeError naming it."""
    student, teacher = torch.randn(2, 3, 10), torch.randn(2, 3, 10)
    plain = turn_kl_reference(student, teacher, reduction="sum", temperature=2.0)
    replayed = turn_kl_reference(student, teacher, reduction="sum", temperature=2.0, backend="native", inplace=True)
    assert torch.equal(replayed, plain)
    with pytest.raises(TypeError, match=r"turn_kl_reference got unexpected keyword argument\(s\) 'reduce'"):
        turn_kl_reference(student, teacher, reduce="sum")
    topk_ids, topk_logprobs = torch.arange(2).expand(2, 3, 2), torch.full((2, 3, 2), -1.0)
    with pytest.raises(TypeError, match=r"topk_turn_kl_reference got unexpected keyword argument\(s\) 'vocab_size'"):
        topk_turn_kl_reference(student, topk_ids, topk_logprobs, vocab_size=10)
