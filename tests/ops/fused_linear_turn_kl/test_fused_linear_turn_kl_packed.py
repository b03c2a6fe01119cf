"""Packed (padding-free) hidden states: ``cu_seqlens`` gives, bit for bit, the padded batch's values,
statistics and gradients in every mode, and matches the float64 reference."""

import math

import pytest
import torch
from fused_linear_helpers import backend_keywords
from op_inputs import RAGGED_LENGTHS, RAGGED_UNKEPT, PackedTwin, assert_packed_equals_padded, assert_same

from tcod_fast import fused_linear_turn_kl, fused_linear_turn_kl_reference
from tcod_fast.ops.common import REDUCTIONS

pytestmark = pytest.mark.filterwarnings("ignore:Converting a tensor with requires_grad=True to a scalar")

NUM_TURNS = 3
H_S, H_T, VOCAB = 16, 24, 97


def _heads(twin, generator):
    S, T = twin.num_seqs, twin.T
    return dict(
        h_s=torch.randn(S, T, H_S, generator=generator),
        w_s=torch.randn(VOCAB, H_S, generator=generator) * 2.5 / math.sqrt(H_S),
        b_s=torch.randn(VOCAB, generator=generator),
        h_t=torch.randn(S, T, H_T, generator=generator),
        w_t=torch.randn(VOCAB, H_T, generator=generator) * 2.5 / math.sqrt(H_T),
        b_t=torch.randn(VOCAB, generator=generator),
    )


def _run(op, x, h_s, h_t, turn_ids, token_weight, **kwargs):
    """The op's result and the gradients of ``(h_s, w_s, b_s)`` (fresh leaves) of its loss (or of
    the weighted per-token losses for ``reduction="none"``)."""
    h_s = h_s.clone().requires_grad_(True)
    w_s, b_s = x["w_s"].clone().requires_grad_(True), x["b_s"].clone().requires_grad_(True)
    result = op(h_s, w_s, h_t, x["w_t"], turn_ids, student_bias=b_s, teacher_bias=x["b_t"], return_stats=True,
                **kwargs)
    total = result.loss if result.loss.dim() == 0 else (result.loss * token_weight).sum()
    return result, torch.autograd.grad(total, (h_s, w_s, b_s))


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("layout", ["flat", "row"])
def test_packed_equals_padded_and_the_reference(mode, reduction, layout):
    generator = torch.Generator().manual_seed(3)
    twin = PackedTwin(RAGGED_LENGTHS)
    S, T = twin.num_seqs, twin.T
    x = _heads(twin, generator)
    turn_ids = twin.turn_ids(NUM_TURNS, unkept=RAGGED_UNKEPT)
    target_ids = torch.randint(0, VOCAB, (S, T), generator=generator)
    token_weight = torch.randn(S, T, generator=generator)
    lo = torch.randint(0, 2, (S, 1), generator=generator)
    options = dict(
        reduction=reduction, num_turns=NUM_TURNS, turn_window=torch.cat([lo, lo + 2], 1),
        turn_weights=torch.randn(S, NUM_TURNS, generator=generator),
    )
    if layout == "row":
        options["turn_window"] = (0, 2)
    keywords = dict(backend_keywords(mode), chunk_size=4)

    padded, padded_grads = _run(fused_linear_turn_kl, x, x["h_s"], x["h_t"], turn_ids, token_weight,
                                target_ids=target_ids, **options, **keywords)
    row = layout == "row"
    packed_args = (twin.pack(x["h_s"], row), twin.pack(x["h_t"], row), twin.pack(turn_ids, row),
                   twin.pack(token_weight, row))
    packed_options = dict(options, target_ids=twin.pack(target_ids, row), cu_seqlens=twin.cu_seqlens)
    packed, packed_grads = _run(fused_linear_turn_kl, x, *packed_args, **packed_options, **keywords)

    assert packed.turn_kl_sum.shape == (S, NUM_TURNS)
    assert_packed_equals_padded(packed, padded, twin, reduction)
    (packed_dh, packed_dw, packed_db), (padded_dh, padded_dw, padded_db) = packed_grads, padded_grads
    assert_same(packed_dh.reshape(twin.N, H_S), twin.pack(padded_dh))
    assert_same(packed_dw, padded_dw)
    assert_same(packed_db, padded_db)

    x64 = {name: value.double() for name, value in x.items()}
    reference, reference_grads = _run(
        fused_linear_turn_kl_reference, x64, *(value.double() if value.is_floating_point() else value
                                               for value in packed_args),
        **packed_options,
    )
    for name in ("loss", "kl", "turn_token_count", "turn_kl_sum", "turn_entropy_sum", "turn_neg_logprob_sum"):
        torch.testing.assert_close(getattr(packed, name).double(), getattr(reference, name), rtol=1e-4, atol=1e-5)
    for ours, expected in zip(packed_grads, reference_grads):
        scale = expected.abs().max() + 1e-30
        torch.testing.assert_close(ours.double() / scale, expected / scale, rtol=0, atol=2e-5)


def test_malformed_cu_seqlens_names_the_hidden_states():
    h_s, w_s = torch.randn(6, H_S), torch.randn(VOCAB, H_S)
    h_t, w_t = torch.randn(6, H_T), torch.randn(VOCAB, H_T)
    with pytest.raises(ValueError, match=r"cu_seqlens\[-1\] must equal the number of tokens N = 6 of the hidden "
                                         r"states, got 5"):
        fused_linear_turn_kl(h_s, w_s, h_t, w_t, cu_seqlens=torch.tensor([0, 5]))
    with pytest.raises(ValueError, match=r"so the hidden states must have leading shape \(N,\) or \(1, N\), got \(2, 3\)"):
        fused_linear_turn_kl(h_s.view(2, 3, H_S), w_s, h_t.view(2, 3, H_T), w_t, cu_seqlens=torch.tensor([0, 6]))


@pytest.mark.parametrize("compile_backend", ["aot_eager", "inductor"])
def test_packed_torch_compile_fullgraph(compile_backend):
    """A loss function calling the op on packed batches compiles without graph breaks, also when
    the number of tokens and sequences changes from one batch to the next."""
    generator = torch.Generator().manual_seed(5)
    w_s = torch.randn(VOCAB, H_S, generator=generator) / math.sqrt(H_S)
    w_t = torch.randn(VOCAB, H_T, generator=generator) / math.sqrt(H_T)

    def loss_fn(h_s, h_t, ids, cu_seqlens):
        return fused_linear_turn_kl(h_s * 1.0, w_s, h_t, w_t, ids, cu_seqlens=cu_seqlens,
                                    reduction="seq_mean_token_mean", num_turns=NUM_TURNS)

    compiled = torch.compile(loss_fn, fullgraph=True, backend=compile_backend)
    for lengths in ((3, 0, 5, 2), (4, 7, 1, 0, 2)):
        twin = PackedTwin(lengths)
        h_s = torch.randn(twin.N, H_S, generator=generator, requires_grad=True)
        rest = (torch.randn(twin.N, H_T, generator=generator), twin.pack(twin.turn_ids(NUM_TURNS)), twin.cu_seqlens)
        loss = compiled(h_s, *rest)
        (grad,) = torch.autograd.grad(loss, (h_s,))
        expected = loss_fn(h_s, *rest)
        (expected_grad,) = torch.autograd.grad(expected, (h_s,))
        torch.testing.assert_close(loss, expected)
        torch.testing.assert_close(grad, expected_grad)
