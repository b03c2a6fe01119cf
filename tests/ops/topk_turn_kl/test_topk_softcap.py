"""The sparse-teacher ops with a soft-capped or scaled student (``softcap=``, ``logit_scale=``, student
side only) on every backend, against float64 autograd of the same map."""

import math

import pytest
import torch
from topk_helpers import DEVICE, compare, make_inputs, vocab_for

from tcod_fast import fused_linear_topk_turn_kl, fused_linear_topk_turn_kl_reference, fused_topk_turn_kl
from tcod_fast.ops.common import DIVERGENCES
from tcod_fast.ops.topk import TAILS

pytestmark = pytest.mark.filterwarnings("ignore:divide by zero encountered:RuntimeWarning")

MAPS = {
    "softcap": dict(softcap=3.0),
    "softcap_and_scale": dict(softcap=(2.0, None), logit_scale=1.5),
    "scale_only": dict(logit_scale=(-0.8, None)),
}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("divergence", DIVERGENCES)
@pytest.mark.parametrize("tail", TAILS)
@pytest.mark.parametrize("maps", MAPS)
def test_logits_op_matches_reference(backend, dtype, divergence, tail, maps, tolerances):
    student, ids, logprobs, turn_ids, target_ids = make_inputs(2, 5, vocab_for(backend), 7, dtype)
    compare(backend, student, ids, logprobs, turn_ids, tolerances(dtype), divergence=divergence, beta=0.3, tail=tail,
            temperature=1.3, target_ids=target_ids, num_turns=4, **MAPS[maps])


@pytest.mark.parametrize("divergence", DIVERGENCES)
def test_raw_logits_far_beyond_the_cap(backend, divergence, tolerances):
    """Raw student logits of size 1e4 under softcap 30: exact values and gradients (bucket tail)."""
    student, ids, logprobs, turn_ids, target_ids = make_inputs(2, 4, vocab_for(backend), 6, student_scale=1e4)
    result, _ = compare(backend, student, ids, logprobs, turn_ids, tolerances(torch.float32), divergence=divergence,
                        target_ids=target_ids, softcap=30.0, num_turns=4)
    assert torch.isfinite(result.kl).all()


def _linear(V, H=24, dtype=torch.float32, weight_scale=1.0):
    hidden = torch.randn(2, 5, H).to(dtype).to(DEVICE)
    weight = (torch.randn(V, H) * 2.5 / math.sqrt(H) * weight_scale).to(dtype).to(DEVICE)
    bias = torch.randn(V).to(dtype).to(DEVICE)
    logprobs, ids = torch.log_softmax(torch.randn(2, 5, V) * 3, -1).topk(6, -1)
    ids = torch.where(torch.rand(2, 5, 6) < 0.25, torch.full_like(ids, -1), ids)
    turn_ids = torch.tensor([[0, 0, -1, 1, 2], [0, 1, 1, -1, 2]])
    return hidden, weight, bias, ids.to(DEVICE), logprobs.to(DEVICE), turn_ids.to(DEVICE)


def _linear_grads(fn, hidden, weight, bias, *rest, **kwargs):
    leaves = [x.detach().clone().requires_grad_(True) for x in (hidden, weight, bias)]
    result = fn(leaves[0], leaves[1], *rest, student_bias=leaves[2], return_stats=True, **kwargs)
    return result, torch.autograd.grad(result.loss, leaves)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("divergence", DIVERGENCES)
@pytest.mark.parametrize("maps", MAPS)
def test_fused_linear_matches_reference(backend, dtype, divergence, maps):
    """dh, dW and db through the map, the chunk's slab mapped by the row kernel as it reads it."""
    V = 203 if backend == "triton" else 301
    inputs = _linear(V, dtype=dtype)
    kwargs = dict(divergence=divergence, beta=0.3, temperature=1.3, num_turns=3, **MAPS[maps])
    result, grads = _linear_grads(fused_linear_topk_turn_kl, *inputs, backend=backend, chunk_size=3, **kwargs)
    ref, ref_grads = _linear_grads(fused_linear_topk_turn_kl_reference, *inputs, **kwargs)
    for name in ("loss", "kl", "entropy"):
        torch.testing.assert_close(getattr(result, name).double(), getattr(ref, name).double(), rtol=1e-4, atol=2e-5,
                                   msg=lambda m, n=name: f"{n}: {m}")
    grad_tol = 8e-3 if dtype == torch.bfloat16 else 4e-5
    for name, ours, theirs in zip(["dh", "dW", "db"], grads, ref_grads):
        assert ours.dtype == theirs.dtype == dtype
        scale = theirs.abs().max().item() + 1e-12
        torch.testing.assert_close(ours.double() / scale, theirs.double() / scale, rtol=0, atol=grad_tol,
                                   msg=lambda m, n=name: f"{n}: {m}")


def test_identity_map_is_bit_identical(backend):
    student, ids, logprobs, turn_ids, target_ids = make_inputs(2, 4, vocab_for(backend), 5, torch.bfloat16)
    runs = []
    for extra in ({}, dict(softcap=None, logit_scale=1.0), dict(softcap=(None, None), logit_scale=(1.0, None))):
        x = student.detach().clone().requires_grad_(True)
        result = fused_topk_turn_kl(x, ids, logprobs, turn_ids, backend=backend, target_ids=target_ids,
                                    return_stats=True, divergence="jsd", **extra)
        result.loss.backward()
        runs.append((result.loss, result.kl, result.entropy, result.student_logprob, x.grad))
    for other in runs[1:]:
        for a, b in zip(runs[0], other):
            assert torch.equal(a, b)


@pytest.mark.parametrize("op", ["logits", "linear"])
def test_a_teacher_side_map_is_refused(op):
    """The teacher is given as normalised log-probs: a teacher-side value is an error naming the fix."""
    V = 10
    ids = torch.tensor([[1, 2]]).expand(3, 2)
    logprobs = torch.log(torch.tensor([[0.5, 0.3]])).expand(3, 2)
    if op == "logits":
        call = lambda **kw: fused_topk_turn_kl(torch.randn(3, V), ids, logprobs, **kw)  # noqa: E731
    else:
        call = lambda **kw: fused_linear_topk_turn_kl(torch.randn(3, 4), torch.randn(V, 4), ids, logprobs, **kw)  # noqa: E731
    with pytest.raises(ValueError, match=r"softcap: the teacher is given as top-k log-probs.*got \(30.0, 30.0\) "
                                         r"\(pass softcap=30.0 or \(30.0, None\)\)"):
        call(softcap=(30.0, 30.0))
    with pytest.raises(ValueError, match=r"logit_scale: the teacher is given as top-k log-probs"):
        call(logit_scale=(None, 2.0))
    with pytest.raises(ValueError, match=r"softcap must be positive and finite"):
        call(softcap=-3.0)
    call(softcap=30.0)  # a number is the student's
