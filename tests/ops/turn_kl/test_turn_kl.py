"""fused_turn_kl on every backend against the float64 reference."""

import math

import pytest
import torch
from op_inputs import assert_compiles_like_eager, fit_linear_head, random_turn_ids

import tcod_fast
from tcod_fast import fused_turn_kl, turn_kl_reference
from tcod_fast.ops.common import DIVERGENCES, REDUCTIONS
from tcod_fast.ops.turn_kl import native_backend, triton_backend

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def _make_inputs(B, T, V, dtype, *, v_teacher=None, scale=3.0, mask="partial", n_turns=4):
    student = (torch.randn(B, T, V, dtype=torch.float64) * scale).to(dtype).to(DEVICE)
    teacher = (torch.randn(B, T, v_teacher or V, dtype=torch.float64) * scale).to(dtype).to(DEVICE)
    turn_ids = random_turn_ids((B, T), mask, n_turns)
    target_ids = torch.randint(0, min(V, v_teacher or V), (B, T))
    return student.requires_grad_(True), teacher, turn_ids.to(DEVICE), target_ids.to(DEVICE)


def _compare(backend, student, teacher, turn_ids, tol, **kwargs):
    result = fused_turn_kl(student, teacher, turn_ids, backend=backend, return_stats=True, **kwargs)
    loss = result.loss.sum() if kwargs.get("reduction") == "none" else result.loss
    (grad,) = torch.autograd.grad(loss, student)

    ref_student = student.detach().clone().requires_grad_(True)
    ref = turn_kl_reference(ref_student, teacher, turn_ids, return_stats=True, **kwargs)
    ref_loss = ref.loss.sum() if kwargs.get("reduction") == "none" else ref.loss
    (ref_grad,) = torch.autograd.grad(ref_loss, ref_student)

    def close(name, ours, theirs, **tol_override):
        t = {**tol, **tol_override}
        torch.testing.assert_close(ours.double().cpu(), theirs.double().cpu(), **t, msg=lambda m: f"{name}: {m}")

    close("loss", result.loss, ref.loss)
    close("kl", result.kl, ref.kl)
    close("entropy", result.entropy, ref.entropy)
    assert torch.equal(result.token_kept.cpu(), ref.token_kept.cpu())
    close("turn_token_count", result.turn_token_count, ref.turn_token_count)
    close("turn_kl_sum", result.turn_kl_sum, ref.turn_kl_sum)
    close("turn_entropy_sum", result.turn_entropy_sum, ref.turn_entropy_sum)
    if kwargs.get("target_ids") is not None:
        close("student_logprob", result.student_logprob, ref.student_logprob)
        close("teacher_logprob", result.teacher_logprob, ref.teacher_logprob)
        close("turn_abs_logratio_sum", result.turn_abs_logratio_sum, ref.turn_abs_logratio_sum)
        close("turn_neg_logprob_sum", result.turn_neg_logprob_sum, ref.turn_neg_logprob_sum)
    # gradient: compare relative to its own scale (bf16 gradients carry ~3 significant digits)
    scale = ref_grad.abs().max().item() + 1e-12
    close("grad", grad / scale, ref_grad / scale, rtol=0, atol=tol["rtol"] * 2)
    assert torch.isfinite(grad).all()
    return result, grad


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("divergence", DIVERGENCES)
def test_matches_reference_across_dtypes(backend, dtype, divergence, tolerances):
    B, T, V = 2, 5, 1037 if backend != "triton" else 203
    student, teacher, turn_ids, target_ids = _make_inputs(B, T, V, dtype)
    _compare(
        backend, student, teacher, turn_ids, tolerances(dtype),
        divergence=divergence, beta=0.3, temperature=1.7, target_ids=target_ids, num_turns=4,
    )


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("mask", ["none", "partial", "all"])
def test_reductions_and_masks(backend, reduction, mask, tolerances):
    B, T, V = 3, 4, 517 if backend != "triton" else 131
    student, teacher, turn_ids, target_ids = _make_inputs(B, T, V, torch.float32, mask=mask)
    result, grad = _compare(
        backend, student, teacher, turn_ids, tolerances(torch.float32),
        reduction=reduction, target_ids=target_ids, num_turns=4,
    )
    if mask == "all":
        assert float(result.loss.abs().sum()) == 0.0
        assert float(grad.abs().sum()) == 0.0


def test_per_sequence_windows_and_turn_weights(backend, tolerances):
    B, T, V = 3, 6, 300
    student, teacher, turn_ids, target_ids = _make_inputs(B, T, V, torch.float32, n_turns=5)
    window = torch.tensor([[0, 2], [1, 5], [3, 3]], device=DEVICE)  # the last keeps nothing
    turn_weights = torch.rand(B, 5, device=DEVICE) + 0.1
    for reduction in ["mean", "turn_mean", "seq_mean_token_mean"]:
        _compare(
            backend, student, teacher, turn_ids, tolerances(torch.float32),
            turn_window=window, turn_weights=turn_weights, reduction=reduction, target_ids=target_ids,
        )
    _compare(backend, student, teacher, turn_ids, tolerances(torch.float32), turn_window=(1, 3))


@pytest.mark.parametrize("temperature", [0.5, 1.0, 2.0])
def test_temperatures(backend, temperature, tolerances):
    student, teacher, turn_ids, _ = _make_inputs(2, 3, 257, torch.float32)
    _compare(backend, student, teacher, turn_ids, tolerances(torch.float32), temperature=temperature)


def test_flat_rows_and_padded_vocabularies(backend, tolerances):
    """(N, V) input; teacher with a larger padded vocabulary restricted by vocab_size."""
    N, V_s, V_t, V = 7, 611, 640, 600
    student = (torch.randn(N, V_s) * 2).to(DEVICE).requires_grad_(True)
    teacher = (torch.randn(N, V_t) * 2).to(DEVICE)
    turn_ids = torch.tensor([0, 0, -1, 1, 1, 2, -1], device=DEVICE)
    result, grad = _compare(
        backend, student, teacher, turn_ids, tolerances(torch.float32),
        vocab_size=V, target_ids=torch.randint(0, V, (N,), device=DEVICE), reduction="turn_mean",
    )
    assert result.kl.shape == (N,)
    assert float(grad[:, V:].abs().sum()) == 0.0


def test_qwen_vocabulary_rows(backend, tolerances, monkeypatch):
    """The real Qwen2.5 vocabulary size (151936, not a multiple of any block) on a few rows."""
    rows = 3 if backend != "triton" else 2
    student, teacher, turn_ids, target_ids = _make_inputs(1, rows, 151936, torch.bfloat16, mask="none")
    if backend == "triton" and not torch.cuda.is_available():
        monkeypatch.setattr(triton_backend, "DEFAULT_BLOCK_V", 4096)  # keep the interpreter fast on wide rows
    _compare(backend, student, teacher, turn_ids, tolerances(torch.bfloat16), target_ids=target_ids)


@pytest.mark.parametrize("divergence", DIVERGENCES)
def test_inf_logits_never_give_nan(backend, divergence, tolerances):
    B, T, V = 1, 4, 300
    student, teacher, turn_ids, _ = _make_inputs(B, T, V, torch.float32, mask="none")
    s, t = student.detach().clone(), teacher.clone()
    banned = torch.zeros(V, dtype=torch.bool)
    banned[:150] = True  # the whole first block(s) of the row is -inf
    banned[200:210] = True
    s[..., banned.to(DEVICE)] = -math.inf
    t[..., banned.to(DEVICE)] = -math.inf
    # a dropped token with garbage logits must not leak NaN anywhere
    s[0, 3] = math.nan
    turn_ids[0, 3] = -1
    s.requires_grad_(True)
    result, grad = _compare(backend, s, t, turn_ids, tolerances(torch.float32), divergence=divergence, beta=0.4)
    assert torch.isfinite(result.loss) and torch.isfinite(result.kl).all()
    assert float(grad[0, 3].abs().sum()) == 0.0
    assert float(grad[..., banned.to(DEVICE)].abs().sum()) == 0.0


def test_teacher_inf_under_student_mass_is_infinite_kl(backend):
    student = torch.zeros(1, 700, device=DEVICE)
    teacher = torch.zeros(1, 700, device=DEVICE)
    teacher[0, 3] = -math.inf
    assert math.isinf(float(fused_turn_kl(student, teacher, backend=backend)))


def test_nan_logits_in_a_kept_row_are_reported(backend):
    """A NaN in a kept row gives a NaN divergence for that row (never a silently finite one)."""
    student = torch.randn(3, 700, device=DEVICE)
    teacher = torch.randn(3, 700, device=DEVICE)
    student[1, 5] = math.nan
    kl = fused_turn_kl(student, teacher, backend=backend, reduction="none")
    assert math.isnan(float(kl[1])) and torch.isfinite(kl[[0, 2]]).all()


@pytest.mark.parametrize("temperature", [0.3, 3.0])
def test_wide_logit_ranges_and_offsets(backend, temperature, tolerances):
    """Logits spread over hundreds of nats, far from 0 (as after a large bias), with the max late
    in the row (so the running max moves many times): range reduction, rescaling and the
    entropy keep float32 accuracy. (Student and teacher sit near the same offset: a log-ratio
    of thousands of nats cannot be resolved below its own float32 ulp by any float32 kernel.)"""
    B, T, V = 2, 3, 900 if backend != "triton" else 203
    student, teacher, turn_ids, target_ids = _make_inputs(B, T, V, torch.float32, scale=25.0)
    ramp = torch.linspace(0, 60, V, device=DEVICE)  # later columns larger: the max keeps moving
    student = (student.detach() + ramp + 1000.0).requires_grad_(True)
    teacher = teacher + ramp + 990.0
    _compare(
        backend, student, teacher, turn_ids, tolerances(torch.float32),
        temperature=temperature, target_ids=target_ids, num_turns=4,
    )


def test_strided_rows_without_copy(backend):
    """logits[:, :-1] (the usual shift) is consumed through its strides."""
    B, T, V = 2, 6, 300
    base_s = torch.randn(B, T + 1, V, device=DEVICE)
    base_t = torch.randn(B, T + 1, V, device=DEVICE)
    student = base_s[:, :-1].clone().requires_grad_(True)
    assert not base_s[:, :-1].is_contiguous()
    loss_contig = fused_turn_kl(student, base_t[:, :-1].contiguous(), backend=backend)
    view = base_s.clone().requires_grad_(True)
    loss_strided = fused_turn_kl(view[:, :-1], base_t[:, :-1], backend=backend)
    torch.testing.assert_close(loss_strided, loss_contig)
    loss_strided.backward()
    loss_contig.backward()
    torch.testing.assert_close(view.grad[:, :-1], student.grad)
    assert float(view.grad[:, -1].abs().sum()) == 0.0


def test_mixed_precision_teacher(backend, tolerances):
    student, _, turn_ids, _ = _make_inputs(2, 3, 400, torch.float32)
    teacher = (torch.randn(2, 3, 400) * 3).to(torch.bfloat16).to(DEVICE)
    _compare(backend, student, teacher, turn_ids, tolerances(torch.float32))


def test_plain_loss_matches_the_stats_path(backend):
    """Without ``return_stats`` a backend may skip the entropy; the loss and gradient are the same."""
    student, teacher, turn_ids, _ = _make_inputs(2, 4, 333, torch.float32)
    plain = fused_turn_kl(student, teacher, turn_ids, backend=backend)
    (plain_grad,) = torch.autograd.grad(plain, student)
    stats = fused_turn_kl(student, teacher, turn_ids, backend=backend, return_stats=True)
    (stats_grad,) = torch.autograd.grad(stats.loss, student)
    torch.testing.assert_close(plain, stats.loss, rtol=0, atol=0)
    torch.testing.assert_close(plain_grad, stats_grad, rtol=0, atol=0)
    assert float(stats.entropy.abs().sum()) > 0


def test_inplace_gradient_matches(backend):
    student, teacher, turn_ids, _ = _make_inputs(2, 4, 300, torch.float32)
    expected_loss = fused_turn_kl(student, teacher, turn_ids, backend=backend)
    (expected_grad,) = torch.autograd.grad(expected_loss, student)

    leaf = student.detach().clone().requires_grad_(True)
    logits = leaf * 1.0  # a non-leaf, like an LM head's output
    storage = logits.data_ptr()
    loss = fused_turn_kl(logits, teacher, turn_ids, backend=backend, inplace=True)
    torch.testing.assert_close(loss, expected_loss)
    loss.backward()
    torch.testing.assert_close(leaf.grad, expected_grad)
    assert logits.data_ptr() == storage  # the logits buffer now holds the gradient
    torch.testing.assert_close(logits.detach(), expected_grad)


@pytest.mark.parametrize("reduction", ["mean", "turn_mean", "none"])
def test_gradient_when_upstream_differs_from_the_reduction(backend, reduction):
    """The op writes its gradient pre-multiplied by the reduction's coefficients; any other
    upstream gradient (a scaled loss, a second use of the per-token ``kl``, a zero turn weight)
    must still give the exact gradient."""
    B, T, V = 3, 5, 301 if backend != "triton" else 131
    student, teacher, turn_ids, _ = _make_inputs(B, T, V, torch.float32, n_turns=3)
    turn_weights = torch.rand(B, 3, device=DEVICE) + 0.5
    turn_weights[1, 0] = 0.0  # kept tokens whose coefficient in the loss is exactly 0
    token_w = torch.randn(B, T, device=DEVICE)
    kwargs = dict(turn_weights=turn_weights, reduction=reduction, temperature=1.3, return_stats=True)

    def total(result):
        loss = result.loss.sum() if reduction == "none" else result.loss
        return 2.5 * loss + (result.kl * token_w).sum()

    (grad,) = torch.autograd.grad(total(fused_turn_kl(student, teacher, turn_ids, backend=backend, **kwargs)), student)
    ref_student = student.detach().double().requires_grad_(True)
    ref = turn_kl_reference(ref_student, teacher.double(), turn_ids, **kwargs)
    (ref_grad,) = torch.autograd.grad(total(ref), ref_student)
    scale = ref_grad.abs().max().item()
    torch.testing.assert_close(grad.double() / scale, ref_grad / scale, rtol=0, atol=2e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_scale_grad_rows_matches_multiplication(backend, dtype):
    """``scale_grad_rows_`` (backward's rescale) on strided rows, with some factors exactly 1."""
    from tcod_fast.ops.turn_kl.api import _scale_grad_rows_

    B, T, V = 2, 6, 1037 if backend != "triton" else 203
    storage = torch.randn(B, T + 3, V + 5, device=DEVICE).to(dtype)
    grad = storage[:, 1 : T + 1, :V]  # row strides of a bigger buffer, contiguous last dim
    factor = torch.randn(B, T, device=DEVICE)
    factor[0, 1] = factor[1, 4] = 1.0
    factor[1, 0] = 0.0
    expected = (grad.float() * factor[..., None]).to(dtype)
    untouched = storage.clone()
    _scale_grad_rows_(grad, factor, backend)
    # one rounding of the float32 product: exact, except that the Triton interpreter's cast to
    # bfloat16 may round the other way (1 ulp)
    exact = not (backend == "triton" and dtype == torch.bfloat16 and DEVICE == "cpu")
    torch.testing.assert_close(grad, expected, rtol=0 if exact else 2**-7, atol=0)
    torch.testing.assert_close(storage[:, 0], untouched[:, 0], rtol=0, atol=0)
    torch.testing.assert_close(storage[..., V:], untouched[..., V:], rtol=0, atol=0)


def test_gradient_matches_finite_differences_float64():
    """Directional derivatives of the loss in float64 (torch backend) against central differences.

    ``torch.autograd.gradcheck`` itself does not apply: it runs backward several times on one
    graph, while this op's backward scales its stored gradient in place and runs once.
    """
    student = torch.randn(2, 3, 11, dtype=torch.float64)
    teacher = torch.randn(2, 3, 11, dtype=torch.float64)
    turn_ids = torch.tensor([[0, -1, 1], [2, 2, 0]])
    eps = 1e-6
    for divergence in DIVERGENCES:
        for reduction in ["mean", "turn_mean", "seq_mean_token_mean", "sum"]:

            def loss_of(s, divergence=divergence, reduction=reduction):
                return fused_turn_kl(
                    s, teacher, turn_ids, divergence=divergence, beta=0.35, temperature=1.3,
                    reduction=reduction, backend="torch",
                )

            s = student.clone().requires_grad_(True)
            (grad,) = torch.autograd.grad(loss_of(s), s)
            for _ in range(3):
                direction = torch.randn_like(student)
                numeric = (loss_of(student + eps * direction) - loss_of(student - eps * direction)) / (2 * eps)
                analytic = (grad * direction).sum()
                torch.testing.assert_close(analytic, numeric.detach(), rtol=1e-6, atol=1e-8)


@pytest.mark.parametrize("beta", [0.0, 0.25, 0.5, 1.0])
def test_jsd_matches_trl_convention(beta):
    """Same numbers as TRL's generalized JSD: beta=0 forward KL, beta=1 reverse KL."""
    student = torch.randn(6, 50, dtype=torch.float64)
    teacher = torch.randn(6, 50, dtype=torch.float64)
    log_p = torch.log_softmax(student, -1)
    log_q = torch.log_softmax(teacher, -1)
    kl = torch.nn.functional.kl_div  # kl_div(input, target, log_target=True) = KL(target || input)
    if beta == 0.0:
        expected = kl(log_p, log_q, reduction="none", log_target=True).sum(-1)
    elif beta == 1.0:
        expected = kl(log_q, log_p, reduction="none", log_target=True).sum(-1)
    else:
        log_m = torch.logsumexp(torch.stack([log_p + math.log(1 - beta), log_q + math.log(beta)]), 0)
        expected = beta * kl(log_m, log_q, reduction="none", log_target=True).sum(-1) + (1 - beta) * kl(
            log_m, log_p, reduction="none", log_target=True
        ).sum(-1)
    for backend in ["torch", "native"]:
        if backend == "native" and not native_backend.is_available():
            continue
        ours = fused_turn_kl(student.float(), teacher.float(), divergence="jsd", beta=beta, reduction="none", backend=backend)
        torch.testing.assert_close(ours.double(), expected, rtol=1e-4, atol=1e-5)


def test_backward_twice_is_refused():
    student = torch.randn(3, 20, requires_grad=True)
    loss = fused_turn_kl(student, torch.randn(3, 20), backend="torch")
    loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="only once"):
        loss.backward()


def test_no_grad_skips_gradient_and_matches():
    student = torch.randn(4, 5, 100)
    teacher = torch.randn(4, 5, 100)
    with torch.no_grad():
        a = fused_turn_kl(student, teacher)
    b = fused_turn_kl(student.requires_grad_(True), teacher)
    torch.testing.assert_close(a, b.detach())


def test_training_loop_drives_kl_down():
    """A linear layer producing student logits learns to match fixed teacher logits."""
    generator = torch.Generator().manual_seed(1)
    teacher = torch.randn(64, 97, generator=generator) * 2
    turn_ids = torch.randint(-1, 3, (64,), generator=generator)
    losses = fit_linear_head(lambda logits: fused_turn_kl(logits, teacher, turn_ids))
    assert losses[-1] < 0.5 * losses[0]


@pytest.mark.parametrize("packed", [False, True], ids=["padded", "packed"])
@pytest.mark.parametrize("compile_backend", ["aot_eager", "inductor"])
def test_torch_compile_fullgraph(compile_backend, packed):
    """A loss function calling the op compiles without graph breaks and gives the eager numbers,
    on a padded batch and on a packed one (``cu_seqlens``; its checks are asynchronous asserts)."""
    student = torch.randn(2, 5, 64, requires_grad=True)
    teacher = torch.randn(2, 5, 64)
    turn_ids = torch.tensor([[0, 0, 1, -1, 1], [0, 1, 1, 2, -1]])
    cu_seqlens = None
    if packed:  # sequences of 3, 0 and 7 tokens
        student = student.detach().reshape(10, 64).requires_grad_(True)
        teacher, turn_ids, cu_seqlens = teacher.reshape(10, 64), turn_ids.reshape(10), torch.tensor([0, 3, 3, 10])

    def loss_fn(s, t, ids, cu_seqlens):
        return fused_turn_kl(s * 1.0, t, ids, turn_window=(0, 2), reduction="turn_mean", num_turns=3,
                             cu_seqlens=cu_seqlens)

    assert_compiles_like_eager(loss_fn, student, teacher, turn_ids, cu_seqlens, backend=compile_backend)


def test_public_exports():
    assert tcod_fast.fused_turn_kl is fused_turn_kl
    assert "Returns:" in fused_turn_kl.__doc__
