"""Packed (padding-free) batches: ``cu_seqlens`` gives, bit for bit, the padded batch's answers on
every backend; it is refused, naming what was expected, when malformed; the README example runs."""

import pytest
import torch
from op_inputs import RAGGED_LENGTHS, RAGGED_UNKEPT, PackedTwin, assert_packed_equals_padded, assert_same, device_for

import tcod_fast
from tcod_fast import cu_seqlens_from_position_ids, fused_turn_kl, turn_kl_reference
from tcod_fast.ops.common import REDUCTIONS
from tcod_fast.ops.turn_kl import api as turn_kl_api

NUM_TURNS = 3
VOCAB = 150  # several 64-column blocks and a ragged tail

# (input layout, turn window, turn weights, logits dtype)
VARIANTS = {
    "flat-windows-weights": ("flat", "per_sequence", True, torch.float32),
    "row-window": ("row", "shared", False, torch.float32),
    "flat-bf16-weights": ("flat", None, True, torch.bfloat16),
}


def _options(variant, twin, generator):
    _, window, weighted, _ = VARIANTS[variant]
    options = dict(num_turns=NUM_TURNS, return_stats=True)
    if window == "per_sequence":
        lo = torch.randint(0, 2, (twin.num_seqs, 1), generator=generator)
        options["turn_window"] = torch.cat([lo, lo + torch.randint(1, 3, (twin.num_seqs, 1), generator=generator)], 1)
    elif window == "shared":
        options["turn_window"] = (1, 3)
    if weighted:
        options["turn_weights"] = torch.randn(twin.num_seqs, NUM_TURNS, generator=generator)
    return options


def _total(result, token_weight):
    """A scalar to differentiate: the loss, or a weighted sum of the per-token losses."""
    return result.loss if result.loss.dim() == 0 else (result.loss * token_weight).sum()


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("variant", list(VARIANTS))
def test_packed_equals_padded_and_the_reference(backend, reduction, variant, tolerances):
    layout, _, _, dtype = VARIANTS[variant]
    generator = torch.Generator().manual_seed(7)
    twin = PackedTwin(RAGGED_LENGTHS)
    S, T = twin.num_seqs, twin.T
    device = device_for(backend)
    student = (torch.randn(S, T, VOCAB, generator=generator) * 3).to(dtype).to(device)
    teacher = (torch.randn(S, T, VOCAB, generator=generator) * 3).to(dtype).to(device)
    turn_ids = twin.turn_ids(NUM_TURNS, unkept=RAGGED_UNKEPT).to(device)
    target_ids = torch.randint(0, VOCAB, (S, T), generator=generator).to(device)
    token_weight = torch.randn(S, T, generator=generator).to(device)
    options = {name: value.to(device) if isinstance(value, torch.Tensor) else value
               for name, value in _options(variant, twin, generator).items()}
    options["reduction"] = reduction

    padded_student = student.clone().requires_grad_(True)
    padded = fused_turn_kl(padded_student, teacher, turn_ids, target_ids=target_ids, backend=backend, **options)
    _total(padded, token_weight).backward()

    row = layout == "row"
    packed_student = twin.pack(student, row).requires_grad_(True)
    packed_inputs = (twin.pack(teacher, row), twin.pack(turn_ids, row))
    cu_seqlens = twin.cu_seqlens.to(device)
    packed = fused_turn_kl(
        packed_student, *packed_inputs, target_ids=twin.pack(target_ids, row), cu_seqlens=cu_seqlens,
        backend=backend, **options,
    )
    assert packed.turn_kl_sum.shape == (S, NUM_TURNS)
    _total(packed, twin.pack(token_weight, row)).backward()

    assert_packed_equals_padded(packed, padded, twin, reduction)
    assert_same(packed_student.grad.reshape(twin.N, VOCAB), twin.pack(padded_student.grad))

    # and the float64 reference, given the same cu_seqlens
    reference_student = twin.pack(student, row).double().requires_grad_(True)
    reference = turn_kl_reference(
        reference_student, *packed_inputs, target_ids=twin.pack(target_ids, row), cu_seqlens=cu_seqlens, **options,
    )
    _total(reference, twin.pack(token_weight, row).double()).backward()
    close = tolerances(dtype)
    for name in ("loss", "kl", "turn_token_count", "turn_kl_sum", "turn_entropy_sum", "turn_abs_logratio_sum"):
        torch.testing.assert_close(getattr(packed, name).double().cpu(), getattr(reference, name).cpu(), **close)
    torch.testing.assert_close(packed_student.grad.double(), reference_student.grad, **close)


def test_int32_bounds_and_a_single_sequence(backend):
    """int32 ``cu_seqlens`` (FlashAttention's) work as int64 ones; one sequence is the plain flat call."""
    twin = PackedTwin((5, 2, 0, 4), cu_dtype=torch.int32)
    device = device_for(backend)
    student = torch.randn(twin.N, VOCAB, device=device)
    teacher = torch.randn(twin.N, VOCAB, device=device)
    turn_ids = twin.pack(twin.turn_ids()).to(device)
    cu_seqlens = twin.cu_seqlens.to(device)
    by_int32 = fused_turn_kl(student, teacher, turn_ids, cu_seqlens=cu_seqlens, reduction="seq_mean_token_mean",
                             backend=backend)
    by_int64 = fused_turn_kl(student, teacher, turn_ids, cu_seqlens=cu_seqlens.long(),
                             reduction="seq_mean_token_mean", backend=backend)
    assert_same(by_int32, by_int64)
    one = torch.tensor([0, twin.N], device=device)
    for reduction in ("mean", "seq_mean_token_mean", "turn_mean"):
        assert_same(fused_turn_kl(student, teacher, turn_ids, cu_seqlens=one, reduction=reduction, backend=backend),
                    fused_turn_kl(student, teacher, turn_ids, reduction=reduction, backend=backend))


def test_no_tokens(backend):
    """``N = 0`` with sequences that are all empty: loss 0, zero-size gradient, zero statistics."""
    device = device_for(backend)
    student = torch.randn(0, VOCAB, device=device, requires_grad=True)
    result = fused_turn_kl(student, torch.randn(0, VOCAB, device=device), torch.zeros(0, dtype=torch.long, device=device),
                           cu_seqlens=torch.tensor([0, 0, 0], device=device), reduction="seq_mean_token_mean",
                           num_turns=2, return_stats=True, backend=backend)
    result.loss.backward()
    assert float(result.loss.detach()) == 0.0 and student.grad.shape == (0, VOCAB)
    assert_same(result.turn_token_count, torch.zeros(2, 2, device=device))


def test_packed_batches_of_changing_size_compile():
    """The number of tokens and sequences of a packed batch changes every step: the compiled loss
    follows (automatic dynamic shapes) without graph breaks."""

    def loss_fn(student, teacher, turn_ids, cu_seqlens):
        return fused_turn_kl(student * 1.0, teacher, turn_ids, cu_seqlens=cu_seqlens, reduction="turn_mean",
                             num_turns=NUM_TURNS)

    compiled = torch.compile(loss_fn, fullgraph=True, backend="aot_eager")
    for lengths in ((3, 0, 5, 2), (4, 7, 1, 0, 2), (6, 6)):
        twin = PackedTwin(lengths)
        student = torch.randn(twin.N, VOCAB, requires_grad=True)
        rest = (torch.randn(twin.N, VOCAB), twin.pack(twin.turn_ids(NUM_TURNS)), twin.cu_seqlens)
        loss = compiled(student, *rest)
        torch.testing.assert_close(loss, loss_fn(student, *rest))


# --------------------------------------------------------------------------------------------
# cu_seqlens_from_position_ids
# --------------------------------------------------------------------------------------------
def test_cu_seqlens_from_position_ids():
    position_ids = torch.tensor([[0, 1, 2, 0, 0, 1, 2, 3]])
    expected = torch.tensor([0, 3, 4, 8], dtype=torch.int32)
    assert_same(cu_seqlens_from_position_ids(position_ids), expected)
    assert_same(cu_seqlens_from_position_ids(position_ids[0]), expected)
    assert_same(cu_seqlens_from_position_ids(torch.zeros(0, dtype=torch.long)), torch.tensor([0], dtype=torch.int32))
    assert tcod_fast.ops.cu_seqlens_from_position_ids is cu_seqlens_from_position_ids


@pytest.mark.parametrize("position_ids, error, message", [
    (torch.tensor([1, 2, 0, 1]), ValueError, r"position_ids must be 0 at the first token .*, got 1"),
    (torch.tensor([[0, 1], [0, 1]]), ValueError, r"position_ids must be shaped \(N,\) or \(1, N\), got \(2, 2\)"),
    (torch.tensor([0.0, 1.0]), TypeError, r"position_ids must be an integer tensor, got dtype torch.float32"),
])
def test_cu_seqlens_from_position_ids_refuses(position_ids, error, message):
    with pytest.raises(error, match=message):
        cu_seqlens_from_position_ids(position_ids)


# --------------------------------------------------------------------------------------------
# malformed cu_seqlens
# --------------------------------------------------------------------------------------------
BAD_CU_SEQLENS = {
    "float": (torch.tensor([0.0, 2.0, 6.0]), TypeError,
              r"cu_seqlens must be an int32 or int64 tensor, got dtype torch\.float32"),
    "list": ([0, 2, 6], TypeError, r"cu_seqlens must be an int32 or int64 tensor, got list"),
    "2-D": (torch.tensor([[0, 2, 6]]), ValueError,
            r"cu_seqlens must be 1-D, shaped \(S \+ 1,\) for S >= 0 packed sequences, got shape \(1, 3\)"),
    "empty": (torch.zeros(0, dtype=torch.long), ValueError, r"cu_seqlens must be 1-D, .* got shape \(0\)"),
    "first": (torch.tensor([1, 2, 6]), ValueError, r"cu_seqlens\[0\] must be 0, got 1"),
    "decreasing": (torch.tensor([0, 4, 2, 6]), ValueError,
                   r"cu_seqlens must be non-decreasing, got 4 then 2 at entries 1 and 2"),
    "last": (torch.tensor([0, 2, 5]), ValueError,
             r"cu_seqlens\[-1\] must equal the number of tokens N = 6 of the logits, got 5"),
    "device": (torch.tensor([0, 2, 6], device="meta"), ValueError,
               r"cu_seqlens is on meta but the logits are on cpu"),
}


@pytest.mark.parametrize("case", list(BAD_CU_SEQLENS))
def test_malformed_cu_seqlens_is_refused(case, monkeypatch):
    cu_seqlens, error, message = BAD_CU_SEQLENS[case]
    ran = []
    monkeypatch.setattr(turn_kl_api, "_run_backend", lambda *args, **kwargs: ran.append(args))
    with pytest.raises(error, match=f"^{message}$"):
        fused_turn_kl(torch.randn(6, 20), torch.randn(6, 20), torch.zeros(6, dtype=torch.long), cu_seqlens=cu_seqlens)
    assert not ran


def test_cu_seqlens_with_several_rows_is_refused():
    message = (r"cu_seqlens marks the sequences of one packed row, so the logits must have leading shape \(N,\) "
               r"or \(1, N\), got \(2, 3\)")
    with pytest.raises(ValueError, match=message):
        fused_turn_kl(torch.randn(2, 3, 20), torch.randn(2, 3, 20), cu_seqlens=torch.tensor([0, 6]))


@pytest.mark.parametrize("keyword, value, message", [
    ("turn_window", torch.tensor([[0, 1]] * 3), r"turn_window tensor must be shaped \(S, 2\) = \(2, 2\)"),
    ("turn_weights", torch.ones(3, 2), r"turn_weights must be shaped \(S, num_turns\) with S=2, got \(3, 2\)"),
    ("turn_weights", torch.ones(2), r"turn_weights must be shaped \(S, num_turns\) with S=2, got \(2\)"),
])
def test_per_sequence_keywords_follow_the_packed_sequences(keyword, value, message):
    with pytest.raises(ValueError, match=message):
        fused_turn_kl(torch.randn(6, 20), torch.randn(6, 20), cu_seqlens=torch.tensor([0, 2, 6]), **{keyword: value})


# --------------------------------------------------------------------------------------------
# README
# --------------------------------------------------------------------------------------------
def test_readme_packed_snippet_runs():
    """README's packed example in "Usage", run as written."""
    from integrations.readme_snippets import section_blocks

    (snippet,) = [block for block in section_blocks("Usage", "python") if "cu_seqlens" in block]
    namespace: dict = {}
    exec(compile(snippet, "README.md: Usage (packed)", "exec"), namespace)
    assert namespace["result"].turn_kl_sum.shape == (3, 2)


# --------------------------------------------------------------------------------------------
# no host synchronisation on a GPU
# --------------------------------------------------------------------------------------------
@pytest.mark.skipif(not torch.cuda.is_available(), reason="host synchronisation is a GPU matter; this machine has no CUDA GPU")
def test_packed_ops_never_synchronise_with_the_host_when_num_turns_is_given():
    """With ``num_turns`` given, the four ops check and use ``cu_seqlens`` on the device alone:
    under ``torch.cuda.set_sync_debug_mode("error")`` any host synchronisation raises."""
    from tcod_fast import fused_linear_topk_turn_kl, fused_linear_turn_kl, fused_topk_turn_kl

    twin = PackedTwin((5, 0, 9, 3))
    g = torch.Generator().manual_seed(4)
    turn_ids = twin.pack(twin.turn_ids(NUM_TURNS)).cuda()
    cu_seqlens = twin.cu_seqlens.cuda()
    hidden, width, k = 16, 24, 4
    student = torch.randn(twin.N, VOCAB, generator=g).cuda().requires_grad_(True)
    teacher = torch.randn(twin.N, VOCAB, generator=g).cuda()
    h_s = torch.randn(twin.N, hidden, generator=g).cuda().requires_grad_(True)
    w_s = torch.randn(VOCAB, hidden, generator=g).cuda().requires_grad_(True)
    h_t, w_t = torch.randn(twin.N, width, generator=g).cuda(), torch.randn(VOCAB, width, generator=g).cuda()
    top = torch.log_softmax(teacher, -1).topk(k, -1)
    options = dict(cu_seqlens=cu_seqlens, num_turns=NUM_TURNS, reduction="seq_mean_token_mean")
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        losses = [
            fused_turn_kl(student, teacher, turn_ids, **options),
            fused_linear_turn_kl(h_s, w_s, h_t, w_t, turn_ids, **options),
            fused_topk_turn_kl(student, top.indices, top.values, turn_ids, **options),
            fused_linear_topk_turn_kl(h_s, w_s, top.indices, top.values, turn_ids, **options),
        ]
        torch.stack([loss.float() for loss in losses]).sum().backward()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    torch.cuda.synchronize()
    assert student.grad is not None and h_s.grad is not None and w_s.grad is not None
