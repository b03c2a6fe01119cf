"""fused_turn_kl with soft-capped and scaled logits (``softcap=``, ``logit_scale=``) on every backend,
against float64 autograd of the same map (``turn_kl_reference``)."""

import math

import pytest
import torch
from op_inputs import assert_compiles_like_eager, random_turn_ids

from tcod_fast import fused_topk_turn_kl, fused_turn_kl, turn_kl_reference
from tcod_fast.ops.common import DIVERGENCES

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"

# (student, teacher) maps: both sides, one side each with different scales, a scale alone (negative),
# a student-only cap
MAPS = {
    "softcap_both": dict(softcap=3.0),
    "per_side": dict(softcap=(2.0, None), logit_scale=(1.5, 0.7)),
    "scale_only": dict(logit_scale=-0.8),
    "student_cap_only": dict(softcap=(4.0, None)),
    "teacher_cap_only": dict(softcap=(None, 2.5), logit_scale=(None, 1.3)),
}
STATS = ["loss", "kl", "entropy", "turn_kl_sum", "turn_entropy_sum", "student_logprob", "teacher_logprob"]


def _inputs(B, T, V, dtype, scale=3.0):
    student = (torch.randn(B, T, V, dtype=torch.float64) * scale).to(dtype).to(DEVICE)
    teacher = (torch.randn(B, T, V, dtype=torch.float64) * scale).to(dtype).to(DEVICE)
    return student, teacher, random_turn_ids((B, T)).to(DEVICE), torch.randint(0, V, (B, T)).to(DEVICE)


def _compare(backend, student, teacher, turn_ids, tol, grad_floor=0.0, **kwargs):
    """Every stat and the gradient against the reference; the gradient relative to its own scale
    (or ``grad_floor`` where that is larger: saturated maps leave gradients float32 cannot hold)."""
    x = student.detach().clone().requires_grad_(True)
    result = fused_turn_kl(x, teacher, turn_ids, backend=backend, return_stats=True, num_turns=4, **kwargs)
    (grad,) = torch.autograd.grad(result.loss, x)
    y = student.detach().clone().requires_grad_(True)
    ref = turn_kl_reference(y, teacher, turn_ids, return_stats=True, num_turns=4, **kwargs)
    (ref_grad,) = torch.autograd.grad(ref.loss, y)
    for name in STATS:
        if getattr(ref, name) is not None:
            torch.testing.assert_close(getattr(result, name).double().cpu(), getattr(ref, name).double().cpu(), **tol,
                                       msg=lambda m, n=name: f"{n}: {m}")
    scale = max(ref_grad.abs().max().item(), grad_floor) + 1e-30
    torch.testing.assert_close(grad.double().cpu() / scale, ref_grad.double().cpu() / scale, rtol=0,
                               atol=tol["rtol"] * 2, msg=lambda m: f"grad: {m}")
    assert torch.isfinite(grad).all()
    return result, grad


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("divergence", DIVERGENCES)
@pytest.mark.parametrize("maps", MAPS)
def test_matches_reference(backend, dtype, divergence, maps, tolerances):
    V = 203 if backend == "triton" else 1037  # odd: ragged blocks everywhere
    student, teacher, turn_ids, target_ids = _inputs(2, 5, V, dtype)
    _compare(backend, student, teacher, turn_ids, tolerances(dtype), divergence=divergence, beta=0.3,
             temperature=1.7, target_ids=target_ids, **MAPS[maps])


@pytest.mark.parametrize("divergence", DIVERGENCES)
def test_raw_logits_far_beyond_the_cap(backend, divergence, tolerances):
    """Raw logits of size 1e4 under softcap 30 (most of them saturate at +-30, ties included):
    exact values; gradients, which the saturated tanh makes tiny, match in absolute terms."""
    V = 203 if backend == "triton" else 1037
    student, teacher, turn_ids, target_ids = _inputs(2, 4, V, torch.float32, scale=1e4)
    result, grad = _compare(backend, student, teacher, turn_ids, tolerances(torch.float32), grad_floor=1e-6,
                            divergence=divergence, beta=0.4, target_ids=target_ids, softcap=30.0)
    assert torch.isfinite(result.kl).all() and float(result.loss.detach()) > 0.1


def test_temperature_applies_after_the_map(backend, tolerances):
    """softcap(x) / T, not softcap(x / T): the reference on logits mapped by hand agrees."""
    student, teacher, turn_ids, _ = _inputs(2, 3, 257, torch.float32)
    ours = fused_turn_kl(student, teacher, turn_ids, backend=backend, softcap=2.0, temperature=0.6, num_turns=4)
    by_hand = turn_kl_reference(2.0 * torch.tanh(student.double() / 2.0), 2.0 * torch.tanh(teacher.double() / 2.0),
                                turn_ids, temperature=0.6, num_turns=4)
    torch.testing.assert_close(ours.double().cpu(), by_hand.cpu(), **tolerances(torch.float32))


def test_inplace_and_padded_vocabulary(backend, tolerances):
    """The gradient written over the logits (the kernels read each block before overwriting it),
    with a padded teacher restricted by vocab_size."""
    N, V_s, V_t, V = 6, 311, 320, 300
    student = (torch.randn(N, V_s) * 3).to(DEVICE)
    teacher = (torch.randn(N, V_t) * 3).to(DEVICE)
    turn_ids = torch.tensor([0, 0, -1, 1, 1, 2], device=DEVICE)
    kwargs = dict(vocab_size=V, softcap=(2.5, 4.0), logit_scale=(1.2, None), divergence="forward_kl")
    _, expected = _compare(backend, student, teacher, turn_ids, tolerances(torch.float32), **kwargs)
    x = student.clone().requires_grad_(True)
    overwritten = x * 1.0  # a non-leaf the op may overwrite
    loss = fused_turn_kl(overwritten, teacher, turn_ids, backend=backend, inplace=True, num_turns=4, **kwargs)
    loss.backward()
    torch.testing.assert_close(x.grad, expected, rtol=0, atol=1e-6 * float(expected.abs().max()))
    assert float(x.grad[:, V:].abs().sum()) == 0.0


def test_neg_inf_logits_become_minus_softcap(backend, tolerances):
    """With a soft cap, a -inf logit is -softcap (what the model computes), never NaN."""
    student, teacher, turn_ids, _ = _inputs(1, 3, 300, torch.float32)
    student[..., :40] = -math.inf
    teacher[..., 20:60] = -math.inf
    result, grad = _compare(backend, student, teacher, turn_ids, tolerances(torch.float32), softcap=5.0)
    assert torch.isfinite(result.loss)
    assert float(grad[..., :40].abs().sum()) == 0.0  # the map's derivative at -inf is 0


@pytest.mark.parametrize("keywords", [dict(softcap=None, logit_scale=None), dict(logit_scale=1.0),
                                      dict(softcap=(None, None), logit_scale=(1.0, None))])
def test_identity_map_is_bit_identical(backend, keywords):
    """No map (or the identity one) runs exactly the op's usual code: bit-identical outputs."""
    student, teacher, turn_ids, target_ids = _inputs(2, 5, 203, torch.bfloat16)
    runs = []
    for extra in ({}, keywords):
        x = student.detach().clone().requires_grad_(True)
        result = fused_turn_kl(x, teacher, turn_ids, backend=backend, divergence="jsd", target_ids=target_ids,
                               return_stats=True, num_turns=4, **extra)
        result.loss.backward()
        runs.append((result.loss, result.kl, result.entropy, result.student_logprob, x.grad))
    for a, b in zip(*runs):
        assert torch.equal(a, b)


@pytest.mark.parametrize("keywords,error,match", [
    (dict(softcap=0.0), ValueError, r"softcap must be positive and finite \(or None\), got 0.0 for the student"),
    (dict(softcap=(30.0, -1)), ValueError, r"softcap must be positive and finite .* got -1.0 for the teacher"),
    (dict(softcap=math.inf), ValueError, r"softcap must be positive and finite .* got inf"),
    (dict(softcap=math.nan), ValueError, r"softcap must be positive and finite .* got nan"),
    (dict(logit_scale=0), ValueError, r"logit_scale must be finite and non-zero \(or None\), got 0.0"),
    (dict(logit_scale=(1.0, math.inf)), ValueError, r"logit_scale must be finite and non-zero .* got inf for the teacher"),
    (dict(softcap="30"), TypeError, r"softcap must be a number, a \(student, teacher\) pair of numbers or None, got '30'"),
    (dict(logit_scale=(1.0, 2.0, 3.0)), TypeError, r"logit_scale must be a number, a \(student, teacher\) pair"),
    (dict(softcap=True), TypeError, r"softcap must be a number"),
])
def test_bad_maps_are_refused_before_any_work(keywords, error, match):
    with pytest.raises(error, match=match):
        fused_turn_kl(torch.randn(2, 10, requires_grad=True), torch.randn(2, 10), **keywords)


def test_torch_compile_fullgraph_with_maps():
    """Loss functions calling the logits ops with maps compile without graph breaks and give the
    eager numbers (the maps are plain floats of the custom ops' schemas)."""
    student = torch.randn(2, 5, 64, requires_grad=True)
    teacher = torch.randn(2, 5, 64) * 3
    turn_ids = torch.tensor([[0, 0, 1, -1, 1], [0, 1, 1, 2, -1]])
    top = torch.log_softmax(teacher, -1).topk(5, -1)

    def loss_fn(s, t, ids):
        return fused_turn_kl(s * 1.0, t, ids, softcap=(3.0, None), logit_scale=(1.2, 0.8), num_turns=3)

    def topk_loss_fn(s, top_ids, top_logprobs):
        return fused_topk_turn_kl(s * 1.0, top_ids, top_logprobs, softcap=3.0, logit_scale=0.9)

    assert_compiles_like_eager(loss_fn, student, teacher, turn_ids, backend="aot_eager")
    student.grad = None
    assert_compiles_like_eager(topk_loss_fn, student, top.indices, top.values, backend="aot_eager")
