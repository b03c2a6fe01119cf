"""Every backend of fused_turn_kl at extreme logit scales and temperatures, against the float64
reference, and one answer per edge input (tests/ops/fused_linear_turn_kl/ has the same for
fused_linear_turn_kl).

Scales go to 1e8 and temperatures down to 1e-6, i.e. scaled logits up to ~1e15 and gaps of
1e14 between them: softmaxes are one-hot there and the exact KL is a finite difference of
scaled logits, which every backend must return (relative error <= 1e-4) with a finite gradient.
"""

import math

import pytest
import torch

from tcod_fast import fused_turn_kl, turn_kl_reference
from tcod_fast.ops.common import DIVERGENCES, REDUCTIONS
from tcod_fast.ops.fused_linear_turn_kl import fused_linear_turn_kl

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


# --------------------------------------------------------------------------------------------
# extreme logit scales and temperatures
# --------------------------------------------------------------------------------------------
def _families(rows, vocab, scale, temperature):
    """Fresh random logit pairs of several shapes at one scale (float32)."""
    x = torch.randn(rows, vocab, dtype=torch.float64)
    y = torch.randn(rows, vocab, dtype=torch.float64)
    yield "independent", x * scale, y * scale
    yield "teacher_close", x * scale, x * scale + y  # the same argmax: the KL is the tiny remainder
    yield "teacher_shifted", x * scale, x * scale + 3 * scale  # KL exactly 0
    yield "far_offsets", x * scale + 7 * scale, y * scale - 5 * scale
    # a few nats apart after scaling, but sitting at +-scale: exact only if the offsets are
    # subtracted before the temperature divides
    yield "spread_at_offset", x * 3 * temperature + scale, (x + 0.3 * y) * 3 * temperature - 2 * scale


def _check_against_reference(backend, student, teacher, divergence, temperature, label):
    student = student.float().to(DEVICE).requires_grad_(True)
    teacher = teacher.float().to(DEVICE)
    kwargs = dict(divergence=divergence, beta=0.3, temperature=temperature, reduction="none")
    target_ids = torch.randint(0, student.shape[-1], student.shape[:-1], device=DEVICE)
    result = fused_turn_kl(student, teacher, backend=backend, return_stats=True, target_ids=target_ids, **kwargs)
    (grad,) = torch.autograd.grad(result.loss.sum(), student)
    student64 = student.detach().double().requires_grad_(True)
    ref = turn_kl_reference(student64, teacher.double(), return_stats=True, target_ids=target_ids, **kwargs)
    (ref_grad,) = torch.autograd.grad(ref.loss.sum(), student64)

    def close(name, ours, theirs):
        ours, theirs = ours.detach().double().cpu(), theirs.detach().double().cpu()
        assert torch.isfinite(ours).all(), f"{label} {name}: non-finite {ours}"
        err = (ours - theirs).abs()
        bound = 1e-4 * theirs.abs() + 1e-5
        assert (err <= bound).all(), f"{label} {name}: ours {ours.tolist()} vs float64 {theirs.tolist()}"

    close("kl", result.kl, ref.kl)
    close("entropy", result.entropy, ref.entropy)
    close("student_logprob", result.student_logprob, ref.student_logprob)
    close("teacher_logprob", result.teacher_logprob, ref.teacher_logprob)
    # gradient, per row, against its own scale: d/dx of softmax-based quantities are O(1/T)
    # (plus the reference's own float64 rounding of a cancellation at one-hot rows)
    assert torch.isfinite(grad).all(), f"{label}: non-finite gradient"
    grad, ref_grad = grad.double().cpu(), ref_grad.cpu()
    err = (grad - ref_grad).abs().amax(-1)
    bound = 1e-4 * (ref_grad.abs().amax(-1) + 1.0 / temperature)
    assert (err <= bound).all(), f"{label}: gradient error {err.tolist()} > {bound.tolist()}"


@pytest.mark.parametrize("divergence", DIVERGENCES)
def test_exact_at_extreme_scales_and_temperatures(backend, divergence):
    rows, vocab = (3, 1037) if backend != "triton" else (2, 150)  # several blocks, a ragged tail
    grid = [(scale, temperature) for scale in (1e2, 1e5, 1e8) for temperature in (1.0, 1e-3, 1e-6)]
    if backend == "triton" and DEVICE == "cpu":  # the interpreter is slow: the corners and the middle
        grid = [(1e2, 1.0), (1e8, 1.0), (1e2, 1e-6), (1e8, 1e-6), (1e5, 1e-3)]
    for scale, temperature in grid:
        for family, student, teacher in _families(rows, vocab, scale, temperature):
            label = f"{backend} {divergence} scale={scale:g} T={temperature:g} {family}"
            _check_against_reference(backend, student, teacher, divergence, temperature, label)


def test_one_hot_limit_is_the_finite_difference_of_scaled_logits(backend):
    """Scaled logits 1e14 apart: p and q are one-hot at different entries, KL(p||q) is exactly
    (max x_t - x_t[argmax x_s]) / T, and the gradient is exactly 0 (a one-hot softmax is flat)."""
    student = torch.zeros(2, 300, device=DEVICE)
    teacher = torch.zeros(2, 300, device=DEVICE)
    student[:, 17] = 1e8
    teacher[:, 250] = 1e8
    teacher[1, 17] = 25.0  # the teacher's logit at the student's argmax
    student.requires_grad_(True)
    kl = fused_turn_kl(student, teacher, temperature=1e-6, reduction="none", backend=backend)
    torch.testing.assert_close(kl.double().cpu(), torch.tensor([1e14, (1e8 - 25.0) * 1e6], dtype=torch.float64),
                               rtol=1e-6, atol=0)
    (grad,) = torch.autograd.grad(kl.sum(), student)
    assert float(grad.abs().max()) == 0.0


def test_temperature_outside_the_float32_range_is_an_error():
    for temperature in (1e-40, 1e40):
        with pytest.raises(ValueError, match=r"temperature must lie in \[1e-37, 1e\+37\].*got 1e"):
            fused_turn_kl(torch.randn(2, 5), torch.randn(2, 5), temperature=temperature)


# --------------------------------------------------------------------------------------------
# edge inputs: one answer on every backend
# --------------------------------------------------------------------------------------------
def test_empty_vocabulary_is_an_error(backend):
    with pytest.raises(ValueError, match=r"student_logits has an empty vocabulary \(0 columns\); expected at least 1"):
        fused_turn_kl(torch.randn(2, 0, device=DEVICE), torch.randn(2, 0, device=DEVICE), backend=backend)
    with pytest.raises(ValueError, match=r"teacher_logits has an empty vocabulary"):
        fused_turn_kl(torch.randn(2, 5, device=DEVICE), torch.randn(2, 0, device=DEVICE), vocab_size=5, backend=backend)


@pytest.mark.parametrize("lead", [(0,), (2, 0), (0, 3)], ids=["N=0", "T=0", "B=0"])
def test_empty_batch(backend, lead):
    student = torch.randn(*lead, 10, device=DEVICE, requires_grad=True)
    teacher = torch.randn(*lead, 10, device=DEVICE)
    for reduction in REDUCTIONS:
        result = fused_turn_kl(student, teacher, reduction=reduction, backend=backend, return_stats=True, num_turns=2)
        assert result.loss.shape == (lead if reduction == "none" else ())
        assert float(result.loss.sum()) == 0.0
        assert result.turn_kl_sum.shape == (1 if len(lead) == 1 else lead[0], 2)
        (grad,) = torch.autograd.grad(result.loss.sum(), student)
        assert grad.shape == student.shape


def test_inplace_on_shared_memory_is_an_error(backend):
    teacher = torch.randn(2, 3, 40, device=DEVICE)
    expanded = torch.randn(1, 1, 40, device=DEVICE, requires_grad=True).expand(2, 3, 40)
    with pytest.raises(ValueError, match=r"inplace=True writes the gradient over student_logits, but its rows share"):
        fused_turn_kl(expanded, teacher, inplace=True, backend=backend)
    overlapping = torch.randn(200, device=DEVICE, requires_grad=True) * 1.0
    with pytest.raises(ValueError, match=r"its rows share memory"):
        fused_turn_kl(overlapping.as_strided((4, 40), (20, 1)), torch.randn(4, 40, device=DEVICE), inplace=True,
                      backend=backend)
    logits = torch.randn(2, 3, 40, device=DEVICE, requires_grad=True) * 1.0
    with pytest.raises(ValueError, match=r"student_logits and teacher_logits share memory"):
        fused_turn_kl(logits, logits.detach(), inplace=True, backend=backend)
    # the usual shifted view is fine in place, and gives the out-of-place gradient
    base = torch.randn(2, 4, 40, device=DEVICE)
    leaf = base.clone().requires_grad_(True)
    view = (leaf * 1.0)[:, :-1]
    loss = fused_turn_kl(view, teacher, inplace=True, backend=backend)
    (grad,) = torch.autograd.grad(loss, leaf)
    ref_leaf = base.clone().requires_grad_(True)
    (ref_grad,) = torch.autograd.grad(fused_turn_kl(ref_leaf[:, :-1], teacher, backend=backend), ref_leaf)
    torch.testing.assert_close(grad, ref_grad)


@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
def test_non_finite_turn_weights_are_an_error(bad):
    turn_weights = torch.ones(2, 3)
    turn_weights[1, 2] = bad
    with pytest.raises(ValueError, match=r"turn_weights must be finite, got NaN or inf entries"):
        fused_turn_kl(torch.randn(2, 4, 10), torch.randn(2, 4, 10), torch.zeros(2, 4, dtype=torch.long),
                      turn_weights=turn_weights)
    with pytest.raises(ValueError, match=r"turn_weights must be finite"):
        fused_linear_turn_kl(torch.randn(2, 4, 8), torch.randn(10, 8), torch.randn(2, 4, 8), torch.randn(10, 8),
                             torch.zeros(2, 4, dtype=torch.long), turn_weights=turn_weights)


def test_negative_turn_weights_are_linear(backend):
    """Negative turn weights are allowed: the loss is linear in them, as in the reference."""
    student = torch.randn(2, 4, 70, device=DEVICE, requires_grad=True)
    teacher = torch.randn(2, 4, 70, device=DEVICE)
    turn_ids = torch.tensor([[0, 1, 1, 2], [2, 0, -1, 1]], device=DEVICE)
    turn_weights = torch.tensor([[1.0, -0.5, 2.0], [-1.5, 0.25, 1.0]], device=DEVICE)
    for reduction in ["mean", "turn_mean", "none"]:
        loss = fused_turn_kl(student, teacher, turn_ids, turn_weights=turn_weights, reduction=reduction,
                             backend=backend)
        (grad,) = torch.autograd.grad(loss.sum(), student)
        ref_student = student.detach().double().requires_grad_(True)
        ref = turn_kl_reference(ref_student, teacher.double(), turn_ids, turn_weights=turn_weights, reduction=reduction)
        (ref_grad,) = torch.autograd.grad(ref.sum(), ref_student)
        torch.testing.assert_close(loss.double(), ref.to(loss.device), rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(grad.double(), ref_grad.to(grad.device), rtol=1e-4, atol=1e-6)


def test_strided_target_ids_are_read_like_contiguous_ones(backend):
    """``target_ids=input_ids[:, 1:]``, a strided int64 view: the sampled tokens' log-probs are
    the reference's (a kernel reading the view as if contiguous takes the wrong tokens)."""
    student = torch.randn(3, 7, 41, device=DEVICE)
    teacher = torch.randn(3, 7, 41, device=DEVICE)
    input_ids = torch.randint(41, (3, 8), device=DEVICE)
    target_ids = input_ids[:, 1:]
    assert not target_ids.is_contiguous()
    turn_ids = torch.tensor([[0, 0, 1, 1, -1, 2, 2]] * 3, device=DEVICE)
    ours = fused_turn_kl(student, teacher, turn_ids, target_ids=target_ids, return_stats=True, backend=backend)
    ref = turn_kl_reference(student.double(), teacher.double(), turn_ids, target_ids=target_ids, return_stats=True)
    for name in ("student_logprob", "teacher_logprob", "turn_abs_logratio_sum", "turn_neg_logprob_sum"):
        torch.testing.assert_close(getattr(ours, name).double().cpu(), getattr(ref, name), rtol=1e-5, atol=1e-5, msg=name)


@pytest.mark.parametrize("divergence", DIVERGENCES)
def test_nan_row_gives_nan_loss_and_nan_gradient_row(backend, divergence):
    """A NaN logit in a kept row: that row's divergence and its whole gradient row are NaN (what
    autograd of the float64 reference gives); every other row is untouched."""
    student = torch.randn(3, 130, device=DEVICE)
    teacher = torch.randn(3, 130, device=DEVICE)
    student[1, 70] = math.nan
    teacher[2, 5] = math.nan  # a NaN teacher logit: the same for that row
    student.requires_grad_(True)
    for name, kl, grad in _nan_row_results(backend, student, teacher, divergence):
        assert torch.isnan(kl[1]) and torch.isnan(kl[2]) and torch.isfinite(kl[0]), name
        assert torch.isnan(grad[1:]).all(), name
        assert torch.isfinite(grad[0]).all(), name
    ours = fused_turn_kl(student, teacher, divergence=divergence, beta=0.3, backend=backend)
    assert torch.isnan(ours)


def _nan_row_results(backend, student, teacher, divergence):
    kwargs = dict(divergence=divergence, beta=0.3, reduction="none")
    kl = fused_turn_kl(student, teacher, backend=backend, **kwargs)
    (grad,) = torch.autograd.grad(kl.sum(), student)
    yield backend, kl, grad
    student64 = student.detach().double().requires_grad_(True)
    ref = turn_kl_reference(student64, teacher.double(), **kwargs)
    (ref_grad,) = torch.autograd.grad(ref.sum(), student64)
    yield "reference", ref, ref_grad


