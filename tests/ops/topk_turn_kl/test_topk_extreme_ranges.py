"""fused_topk_turn_kl at extreme logit scales and temperatures, on every backend (and, for the
native kernel, every instruction-set copy this CPU runs) against the float64 reference: logits
around 1e4 at temperature 1e-6, and 1e6 to 1e8 at temperature 1e-3 (after scaling, the logits are
1e10 to 1e11 apart from 0 and a few to thousands of nats from each other)."""

import pytest
import torch
from topk_helpers import DEVICE, vocab_for

from tcod_fast import fused_topk_turn_kl, topk_turn_kl_reference
from tcod_fast.ops.topk_turn_kl import native_backend


def _cases(V, K):
    gen = torch.Generator().manual_seed(7)
    x = torch.randn(3, 2, V, dtype=torch.float64, generator=gen)
    teacher = torch.log_softmax(torch.randn(3, 2, V, dtype=torch.float64, generator=gen) * 3, -1)
    logprobs, ids = teacher.topk(K, -1)
    near_top = x.clone()
    near_top.scatter_(-1, ids, x.gather(-1, ids) + 2.0)  # the student agrees a little with the teacher
    return [
        ("1e4 at 1e-6", 1e4 + near_top * 3e-6, 1e-6, ids, logprobs.float()),
        ("1e4 spread at 1e-6", near_top * 1e4, 1e-6, ids, logprobs.float()),
        ("1e6 at 1e-3", 1e6 + near_top * 3e-3, 1e-3, ids, logprobs.float()),
        ("1e8 spread at 1e-3 (float32 spacing 8)", 1e8 + near_top * 8.0, 1e-3, ids, logprobs.float()),
        ("1e7 spread at 1e-3", near_top * 1e7, 1e-3, ids, logprobs.float()),
    ]


def _check(backend, name, student64, temperature, ids, logprobs, divergence):
    student = student64.float().to(DEVICE).requires_grad_(True)
    ids, logprobs = ids.to(DEVICE), logprobs.to(DEVICE)
    kwargs = dict(divergence=divergence, temperature=temperature, tail="bucket", reduction="none")
    loss = fused_topk_turn_kl(student, ids, logprobs, backend=backend, **kwargs)
    (grad,) = torch.autograd.grad(loss.sum(), student)
    ref_student = student.detach().double().requires_grad_(True)
    ref = topk_turn_kl_reference(ref_student, ids, logprobs, **kwargs)
    (ref_grad,) = torch.autograd.grad(ref.sum(), ref_student)
    torch.testing.assert_close(loss.double(), ref.detach(), rtol=1e-4, atol=1e-5,
                               msg=lambda m: f"{name}, {divergence}: divergence: {m}")
    assert torch.isfinite(grad).all(), f"{name}: non-finite gradient"
    # the gradient is (1 / temperature) times O(1) terms: compared at that scale
    bound = 1e-4 * (ref_grad.abs().amax(-1, keepdim=True) + 1 / temperature)
    assert ((grad.double() - ref_grad).abs() <= bound).all(), f"{name}, {divergence}: gradient"


def _isas(backend):
    if backend != "native":
        return [None]
    return native_backend.available_isas()


@pytest.mark.parametrize("divergence", ["reverse_kl", "forward_kl", "jsd"])
def test_exact_at_extreme_ranges(backend, divergence):
    V = vocab_for(backend)
    for name, student, temperature, ids, logprobs in _cases(V, 5):
        if divergence == "forward_kl" and "spread" in name:
            continue  # one-hot student: log p of a top-k id underflows float64 too (an infinite KL)
        for isa in _isas(backend):
            if isa is None:
                _check(backend, name, student, temperature, ids, logprobs, divergence)
            else:
                with native_backend.use_isa(isa):
                    _check(backend, f"{name} ({isa})", student, temperature, ids, logprobs, divergence)
