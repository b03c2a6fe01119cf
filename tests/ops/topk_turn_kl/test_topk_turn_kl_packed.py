"""Packed (padding-free) batches against a top-k teacher: ``cu_seqlens`` gives, bit for bit, the
padded batch's answers for ``fused_topk_turn_kl`` and ``fused_linear_topk_turn_kl`` on every row
kernel, and matches the float64 references."""

import math

import pytest
import torch
from op_inputs import (
    RAGGED_LENGTHS,
    RAGGED_UNKEPT,
    PackedTwin,
    assert_packed_equals_padded,
    assert_same,
    assert_same_sums,
    device_for,
)

from tcod_fast import (
    fused_linear_topk_turn_kl,
    fused_linear_topk_turn_kl_reference,
    fused_topk_turn_kl,
    topk_turn_kl_reference,
)
from tcod_fast.ops.common import REDUCTIONS

pytestmark = pytest.mark.filterwarnings("ignore:Converting a tensor with requires_grad=True to a scalar")

NUM_TURNS = 3
VOCAB, TOPK, HIDDEN = 150, 6, 16


def _teacher_topk(twin, generator):
    """A teacher's top-k ``(S, T, K)``, some entries padding (-1), in no particular order."""
    shape = (twin.num_seqs, twin.T)
    logprobs, ids = torch.log_softmax(torch.randn(*shape, VOCAB, generator=generator) * 3, -1).topk(TOPK, -1)
    ids = torch.where(torch.rand(*shape, TOPK, generator=generator) < 0.3, torch.full_like(ids, -1), ids)
    order = torch.rand(*shape, TOPK, generator=generator).argsort(-1)
    return ids.gather(-1, order), logprobs.gather(-1, order)


def _inputs(twin, generator, device):
    """Padded ``(ids, logprobs, turn_ids, target_ids, token_weight)`` and the options, on ``device``;
    half of the targets among the top-k."""
    S, T = twin.num_seqs, twin.T
    ids, logprobs = _teacher_topk(twin, generator)
    turn_ids = twin.turn_ids(NUM_TURNS, unkept=RAGGED_UNKEPT)
    target_ids = torch.where(torch.rand(S, T, generator=generator) < 0.5, ids[..., 0].clamp_min(0),
                             torch.randint(0, VOCAB, (S, T), generator=generator))
    token_weight = torch.randn(S, T, generator=generator)
    lo = torch.randint(0, 2, (S, 1), generator=generator)
    options = dict(num_turns=NUM_TURNS, return_stats=True, turn_window=torch.cat([lo, lo + 2], 1).to(device),
                   turn_weights=torch.randn(S, NUM_TURNS, generator=generator).to(device))
    tensors = (ids, logprobs, turn_ids, target_ids, token_weight)
    return tuple(x.to(device) for x in tensors), options


def _total(result, token_weight):
    return result.loss if result.loss.dim() == 0 else (result.loss * token_weight).sum()


def _pack_all(twin, tensors, row):
    return tuple(twin.pack(x, row) for x in tensors)


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("layout", ["flat", "row"])
def test_topk_packed_equals_padded_and_the_reference(backend, reduction, layout, tolerances):
    generator = torch.Generator().manual_seed(11)
    twin = PackedTwin(RAGGED_LENGTHS)
    device = device_for(backend)
    student = (torch.randn(twin.num_seqs, twin.T, VOCAB, generator=generator) * 3).to(device)
    padded_inputs, options = _inputs(twin, generator, device)
    options["reduction"] = reduction
    if layout == "row":
        options["turn_window"] = (0, 2)

    def run(op, logits, ids, logprobs, turn_ids, target_ids, token_weight, **kwargs):
        leaf = logits.clone().requires_grad_(True)
        result = op(leaf, ids, logprobs, turn_ids, target_ids=target_ids, **options, **kwargs)
        _total(result, token_weight).backward()
        return result, leaf.grad

    padded, padded_grad = run(fused_topk_turn_kl, student, *padded_inputs, backend=backend)
    row = layout == "row"
    cu_seqlens = twin.cu_seqlens.to(device)
    packed_inputs = _pack_all(twin, padded_inputs, row)
    packed, packed_grad = run(fused_topk_turn_kl, twin.pack(student, row), *packed_inputs, cu_seqlens=cu_seqlens,
                              backend=backend)

    assert packed.turn_kl_sum.shape == (twin.num_seqs, NUM_TURNS)
    assert_packed_equals_padded(packed, padded, twin, reduction)
    assert_same(packed_grad.reshape(twin.N, VOCAB), twin.pack(padded_grad))

    reference, reference_grad = run(topk_turn_kl_reference, twin.pack(student, row).double(), *packed_inputs,
                                    cu_seqlens=cu_seqlens)
    close = tolerances(torch.float32)
    for name in ("loss", "kl", "turn_token_count", "turn_kl_sum", "turn_entropy_sum", "turn_neg_logprob_sum"):
        torch.testing.assert_close(getattr(packed, name).double().cpu(), getattr(reference, name).cpu(), **close)
    torch.testing.assert_close(packed_grad.double(), reference_grad, **close)


@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_fused_linear_topk_packed_equals_padded_and_the_reference(backend, reduction):
    generator = torch.Generator().manual_seed(13)
    twin = PackedTwin(RAGGED_LENGTHS)
    device = device_for(backend)
    hidden = torch.randn(twin.num_seqs, twin.T, HIDDEN, generator=generator).to(device)
    weight = (torch.randn(VOCAB, HIDDEN, generator=generator) * 2.5 / math.sqrt(HIDDEN)).to(device)
    bias = torch.randn(VOCAB, generator=generator).to(device)
    padded_inputs, options = _inputs(twin, generator, device)
    options["reduction"] = reduction

    def run(op, h, ids, logprobs, turn_ids, target_ids, token_weight, dtype=torch.float32, **kwargs):
        leaves = [x.to(dtype).requires_grad_(True) for x in (h, weight, bias)]
        result = op(leaves[0], leaves[1], ids, logprobs, turn_ids, student_bias=leaves[2], target_ids=target_ids,
                    **options, **kwargs)
        return result, torch.autograd.grad(_total(result, token_weight.to(dtype)), leaves)

    padded, padded_grads = run(fused_linear_topk_turn_kl, hidden, *padded_inputs, backend=backend, chunk_size=4)
    cu_seqlens = twin.cu_seqlens.to(device)
    packed_inputs = _pack_all(twin, padded_inputs, row=False)
    packed, packed_grads = run(fused_linear_topk_turn_kl, twin.pack(hidden), *packed_inputs, cu_seqlens=cu_seqlens,
                               backend=backend, chunk_size=4)

    assert_packed_equals_padded(packed, padded, twin, reduction)
    (packed_dh, *packed_head), (padded_dh, *padded_head) = packed_grads, padded_grads
    assert_same(packed_dh, twin.pack(padded_dh))
    for ours, expected in zip(packed_head, padded_head):  # sums over the kept rows, in chunks
        assert_same_sums(ours, expected)

    reference, reference_grads = run(fused_linear_topk_turn_kl_reference, twin.pack(hidden), *packed_inputs,
                                     dtype=torch.float64, cu_seqlens=cu_seqlens)
    for name in ("loss", "kl", "turn_kl_sum", "turn_entropy_sum"):
        torch.testing.assert_close(getattr(packed, name).double().cpu(), getattr(reference, name).cpu(),
                                   rtol=1e-4, atol=1e-5)
    for ours, expected in zip(packed_grads, reference_grads):
        scale = expected.abs().max() + 1e-30
        torch.testing.assert_close(ours.double() / scale, expected / scale, rtol=0, atol=2e-5)


@pytest.mark.parametrize("op", ["logits", "hidden"])
def test_packed_batches_of_changing_size_compile(op):
    """The number of tokens and sequences of a packed batch changes every step: the compiled loss
    follows (automatic dynamic shapes) without graph breaks."""
    generator = torch.Generator().manual_seed(17)
    weight = torch.randn(VOCAB, HIDDEN, generator=generator) / math.sqrt(HIDDEN)

    def loss_fn(student, ids, logprobs, turn_ids, cu_seqlens):
        options = dict(cu_seqlens=cu_seqlens, reduction="turn_mean", num_turns=NUM_TURNS)
        if op == "hidden":
            return fused_linear_topk_turn_kl(student * 1.0, weight, ids, logprobs, turn_ids, **options)
        return fused_topk_turn_kl(student * 1.0, ids, logprobs, turn_ids, **options)

    compiled = torch.compile(loss_fn, fullgraph=True, backend="aot_eager")
    for lengths in ((3, 0, 5, 2), (4, 7, 1, 0, 2), (6, 6)):
        twin = PackedTwin(lengths)
        student = torch.randn(twin.N, HIDDEN if op == "hidden" else VOCAB, generator=generator, requires_grad=True)
        ids, logprobs = _teacher_topk(twin, generator)
        rest = (twin.pack(ids), twin.pack(logprobs), twin.pack(twin.turn_ids(NUM_TURNS)), twin.cu_seqlens)
        loss = compiled(student, *rest)
        torch.testing.assert_close(loss, loss_fn(student, *rest))


def test_malformed_cu_seqlens_is_refused_before_the_top_k_is_read():
    ids = torch.zeros(6, TOPK, dtype=torch.long)
    logprobs = torch.full((6, TOPK), -2.0)
    with pytest.raises(ValueError, match=r"cu_seqlens must be non-decreasing, got 4 then 2 at entries 1 and 2"):
        fused_topk_turn_kl(torch.randn(6, VOCAB), ids, logprobs, cu_seqlens=torch.tensor([0, 4, 2, 6]))
    with pytest.raises(ValueError, match=r"so the hidden states must have leading shape \(N,\) or \(1, N\), got \(2, 3\)"):
        fused_linear_topk_turn_kl(torch.randn(2, 3, HIDDEN), torch.randn(VOCAB, HIDDEN), ids.view(2, 3, TOPK),
                                  logprobs.view(2, 3, TOPK), cu_seqlens=torch.tensor([0, 6]))
