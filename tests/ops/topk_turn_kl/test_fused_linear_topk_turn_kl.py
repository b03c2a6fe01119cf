"""fused_linear_topk_turn_kl against the float64 reference (materialised logits) on every backend."""

import math

import pytest
import torch
from topk_helpers import DEVICE

from tcod_fast import fused_linear_topk_turn_kl, fused_linear_topk_turn_kl_reference, fused_topk_turn_kl
from tcod_fast.ops.common import DIVERGENCES
from tcod_fast.ops.fused_linear_topk_turn_kl import chunked
from tcod_fast.ops.topk import TAILS

pytestmark = [
    pytest.mark.filterwarnings("ignore:divide by zero encountered:RuntimeWarning"),
    pytest.mark.filterwarnings("ignore:Converting a tensor with requires_grad=True to a scalar"),
]


def _make(B, T, H, V, K, dtype=torch.float32, *, bias=True, mask="partial", flat=False, device=DEVICE):
    lead = (B * T,) if flat else (B, T)
    hidden = torch.randn(*lead, H).to(dtype).to(device).requires_grad_(True)
    weight = (torch.randn(V, H) * 2.5 / math.sqrt(H)).to(dtype).to(device).requires_grad_(True)
    b = torch.randn(V).to(dtype).to(device).requires_grad_(True) if bias else None
    logprobs, ids = torch.log_softmax(torch.randn(*lead, V) * 3, -1).topk(K, -1)
    ids = torch.where(torch.rand(*lead, K) < 0.25, torch.full_like(ids, -1), ids)
    if mask == "all":
        turn_ids = torch.full(lead, -1)
    else:
        turn_ids = torch.randint(-1, 3, lead)
        turn_ids.view(-1)[0] = 0
    target_ids = torch.randint(0, V, lead)
    return (hidden, weight, b, *(x.to(device) for x in (ids, logprobs, turn_ids, target_ids)))


def _compare(backend, hidden, weight, bias, ids, logprobs, turn_ids, tol, **kwargs):
    leaves = [x for x in (hidden, weight, bias) if x is not None]
    result = fused_linear_topk_turn_kl(
        hidden, weight, ids, logprobs, turn_ids, student_bias=bias, backend=backend, return_stats=True, **kwargs
    )
    loss = result.loss.sum() if kwargs.get("reduction") == "none" else result.loss
    grads = torch.autograd.grad(loss, leaves)

    ref_leaves = [x.detach().clone().requires_grad_(True) for x in leaves]
    ref_bias = ref_leaves[2] if bias is not None else None
    ref = fused_linear_topk_turn_kl_reference(
        ref_leaves[0], ref_leaves[1], ids, logprobs, turn_ids, student_bias=ref_bias, return_stats=True, **kwargs
    )
    ref_loss = ref.loss.sum() if kwargs.get("reduction") == "none" else ref.loss
    ref_grads = torch.autograd.grad(ref_loss, ref_leaves)
    for name in ("loss", "kl", "entropy", "turn_kl_sum", "turn_entropy_sum"):
        torch.testing.assert_close(
            getattr(result, name).double(), getattr(ref, name).double(), **tol, msg=lambda m, n=name: f"{n}: {m}"
        )
    for name, ours, theirs in zip(["dh", "dW", "db"], grads, ref_grads):
        scale = theirs.abs().max().item() + 1e-12
        torch.testing.assert_close(
            ours.double() / scale, theirs.double() / scale, rtol=0, atol=tol["rtol"] * 4,
            msg=lambda m, n=name: f"{n}: {m}",
        )
    return result, grads


@pytest.mark.parametrize("tail", TAILS)
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_matches_reference(backend, tail, reduction):
    V = 203 if backend == "triton" else 301
    inputs = _make(2, 5, 24, V, 6)
    for divergence in DIVERGENCES:
        _compare(
            backend, *inputs[:6], dict(rtol=1e-4, atol=2e-5), divergence=divergence, beta=0.3, tail=tail,
            reduction=reduction, temperature=1.3, target_ids=inputs[6], num_turns=3, chunk_size=3,
        )


def test_low_precision_weights_and_no_bias(backend):
    """bf16 hidden states and weight: the logits are still formed in float32 (the weight upcast a
    block at a time), so only the inputs' own rounding differs from float64."""
    V = 203 if backend == "triton" else 301
    hidden, weight, _, ids, logprobs, turn_ids, _ = _make(2, 4, 16, V, 5, torch.bfloat16, bias=False)
    _compare(backend, hidden, weight, None, ids, logprobs, turn_ids, dict(rtol=2e-2, atol=2e-3), reduction="turn_mean")


def test_all_tokens_masked_gives_zero(backend):
    hidden, weight, bias, ids, logprobs, turn_ids, _ = _make(2, 3, 8, 101, 4, mask="all")
    result, grads = _compare(backend, hidden, weight, bias, ids, logprobs, turn_ids, dict(rtol=1e-4, atol=2e-5))
    assert float(result.loss.detach()) == 0.0
    assert all(float(g.abs().sum()) == 0.0 for g in grads)


def test_equals_the_logits_op_on_materialised_logits():
    hidden, weight, bias, ids, logprobs, turn_ids, target_ids = _make(3, 4, 32, 500, 8, flat=True, device="cpu")
    kwargs = dict(tail="bucket", divergence="jsd", beta=0.7, target_ids=target_ids, return_stats=True)
    ours = fused_linear_topk_turn_kl(hidden, weight, ids, logprobs, turn_ids, student_bias=bias, **kwargs)
    logits = (hidden @ weight.t() + bias).detach().requires_grad_(True)
    theirs = fused_topk_turn_kl(logits, ids, logprobs, turn_ids, **kwargs)
    for name in ("loss", "kl", "entropy", "student_logprob"):
        torch.testing.assert_close(getattr(ours, name), getattr(theirs, name), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(ours.teacher_logprob, theirs.teacher_logprob, equal_nan=True)


def test_strided_hidden_states_and_a_second_use_of_kl():
    """hidden[:, :-1] is read through its strides; a gradient through ``result.kl`` triggers the
    backward recompute and still matches the reference."""
    base = torch.randn(2, 6, 16)
    weight = (torch.randn(301, 16) * 0.6).requires_grad_(True)
    logprobs, ids = torch.log_softmax(torch.randn(2, 5, 301) * 3, -1).topk(5, -1)
    turn_ids = torch.tensor([[0, 1, -1, 1, 0], [0, 0, 1, -1, 1]])
    token_w = torch.randn(2, 5)

    def total(result):
        return 1.7 * result.loss + (result.kl * token_w).sum()

    hidden = base.clone().requires_grad_(True)
    ours = fused_linear_topk_turn_kl(hidden[:, :-1], weight, ids, logprobs, turn_ids, return_stats=True, chunk_size=4)
    g_h, g_w = torch.autograd.grad(total(ours), (hidden, weight))
    ref_h = base.clone().double().requires_grad_(True)
    ref_w = weight.detach().double().requires_grad_(True)
    ref = fused_linear_topk_turn_kl_reference(ref_h[:, :-1], ref_w, ids, logprobs, turn_ids, return_stats=True)
    r_h, r_w = torch.autograd.grad(total(ref), (ref_h, ref_w))
    torch.testing.assert_close(g_h.double(), r_h, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(g_w.double(), r_w, rtol=1e-4, atol=1e-6)
    assert float(g_h[:, -1].abs().sum()) == 0.0


@pytest.mark.parametrize("packed", [False, True], ids=["padded", "packed"])
@pytest.mark.parametrize("compile_backend", ["aot_eager", "inductor"])
def test_torch_compile_fullgraph(compile_backend, packed):
    hidden, weight, bias, ids, logprobs, turn_ids, _ = _make(2, 5, 8, 64, 4, device="cpu", flat=packed)
    cu_seqlens = torch.tensor([0, 3, 3, 10]) if packed else None  # sequences of 3, 0 and 7 tokens

    def loss_fn(h, w, b, i, lp, t):
        return fused_linear_topk_turn_kl(h * 1.0, w, i, lp, t, student_bias=b, reduction="turn_mean", num_turns=3,
                                         cu_seqlens=cu_seqlens)

    compiled = torch.compile(loss_fn, fullgraph=True, backend=compile_backend)
    loss = compiled(hidden, weight, bias, ids, logprobs, turn_ids)
    grads = torch.autograd.grad(loss, (hidden, weight, bias))
    expected = loss_fn(hidden, weight, bias, ids, logprobs, turn_ids)
    expected_grads = torch.autograd.grad(expected, (hidden, weight, bias))
    torch.testing.assert_close(loss, expected)
    for a, b in zip(grads, expected_grads):
        torch.testing.assert_close(a, b)


def test_no_tokens_by_vocab_tensor_is_allocated(monkeypatch):
    """The only vocabulary-wide float buffer is the chunk's slab (chunk x V), never N x V."""
    N, H, V, chunk = 64, 8, 97, 8
    hidden = torch.randn(N, H, requires_grad=True)
    weight = torch.randn(V, H, requires_grad=True)
    logprobs, ids = torch.log_softmax(torch.randn(N, V), -1).topk(4, -1)
    largest = []
    original_empty = torch.empty

    def spy_empty(*size, **kwargs):
        out = original_empty(*size, **kwargs)
        if out.dim() == 2 and out.shape[-1] == V:
            largest.append(out.shape[0])
        return out

    monkeypatch.setattr(chunked.torch, "empty", spy_empty)
    loss = fused_linear_topk_turn_kl(hidden, weight, ids, logprobs, chunk_size=chunk, backend="native")
    loss.backward()
    assert largest and max(largest) <= chunk
