"""fused_topk_turn_kl on every backend against the float64 reference (values, stats, gradients)."""

import math

import pytest
import torch
from op_inputs import assert_compiles_like_eager, fit_linear_head
from topk_helpers import DEVICE, compare, make_inputs, vocab_for

import tcod_fast
from tcod_fast import fused_topk_turn_kl, fused_turn_kl, topk_turn_kl_reference
from tcod_fast.ops.common import DIVERGENCES, REDUCTIONS
from tcod_fast.ops.topk import TAILS
from tcod_fast.ops.topk_turn_kl import triton_backend

# the Triton interpreter evaluates both sides of tl.where with numpy (log(0) in unselected lanes)
pytestmark = pytest.mark.filterwarnings("ignore:divide by zero encountered:RuntimeWarning")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("divergence", DIVERGENCES)
@pytest.mark.parametrize("tail", TAILS)
def test_matches_reference_across_dtypes(backend, dtype, divergence, tail, tolerances):
    student, ids, logprobs, turn_ids, target_ids = make_inputs(2, 5, vocab_for(backend), 5, dtype)
    compare(
        backend, student, ids, logprobs, turn_ids, tolerances(dtype),
        divergence=divergence, beta=0.3, tail=tail, temperature=1.7, target_ids=target_ids, num_turns=4,
    )


@pytest.mark.parametrize("k", [1, 5, 64])
@pytest.mark.parametrize("coverage", ["almost_all", "little"])
@pytest.mark.parametrize("tail", TAILS)
def test_top_k_sizes_and_mass_coverage(backend, k, coverage, tail, tolerances):
    """K from 1 to 64 with ragged padding; top-k that hold almost all of the teacher's mass (the
    ``tail_eps`` floor is active) and top-k that hold little of it."""
    teacher_scale = 30.0 if coverage == "almost_all" else 0.5
    student, ids, logprobs, turn_ids, target_ids = make_inputs(
        2, 4, vocab_for(backend), k, teacher_scale=teacher_scale
    )
    q_mass = torch.where(ids >= 0, logprobs.double().exp(), torch.zeros((), dtype=torch.float64, device=ids.device))
    if coverage == "almost_all":
        assert bool((1 - q_mass.sum(-1) < 1e-6).any())  # the floor is exercised
    for divergence in DIVERGENCES:
        compare(
            backend, student, ids, logprobs, turn_ids, tolerances(torch.float32),
            divergence=divergence, beta=0.6, tail=tail, target_ids=target_ids, num_turns=4,
        )


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("mask", ["none", "partial", "all"])
def test_reductions_and_masks(backend, reduction, mask, tolerances):
    student, ids, logprobs, turn_ids, target_ids = make_inputs(3, 4, vocab_for(backend, 517), 6, mask=mask)
    result, grad = compare(
        backend, student, ids, logprobs, turn_ids, tolerances(torch.float32),
        reduction=reduction, target_ids=target_ids, num_turns=4,
    )
    if mask == "all":
        assert float(result.loss.detach().abs().sum()) == 0.0
        assert float(grad.abs().sum()) == 0.0


@pytest.mark.parametrize("tail", TAILS)
def test_per_sequence_windows_and_turn_weights(backend, tail, tolerances):
    student, ids, logprobs, turn_ids, target_ids = make_inputs(3, 6, vocab_for(backend, 300), 7, n_turns=5)
    window = torch.tensor([[0, 2], [1, 5], [3, 3]], device=DEVICE)  # the last keeps nothing
    turn_weights = torch.rand(3, 5, device=DEVICE) + 0.1
    for reduction in ["mean", "turn_mean", "seq_mean_token_mean"]:
        compare(
            backend, student, ids, logprobs, turn_ids, tolerances(torch.float32), tail=tail,
            turn_window=window, turn_weights=turn_weights, reduction=reduction, target_ids=target_ids,
        )
    compare(backend, student, ids, logprobs, turn_ids, tolerances(torch.float32), tail=tail, turn_window=(1, 3))


@pytest.mark.parametrize("temperature", [0.5, 2.0])
def test_temperatures(backend, temperature, tolerances):
    student, ids, logprobs, turn_ids, target_ids = make_inputs(2, 3, vocab_for(backend, 257), 5)
    for tail in TAILS:
        compare(
            backend, student, ids, logprobs, turn_ids, tolerances(torch.float32),
            tail=tail, temperature=temperature, target_ids=target_ids,
        )


def test_flat_rows(backend, tolerances):
    student, ids, logprobs, turn_ids, target_ids = make_inputs(1, 7, vocab_for(backend, 611), 4, flat=True)
    result, _ = compare(
        backend, student, ids, logprobs, turn_ids, tolerances(torch.float32),
        target_ids=target_ids, reduction="turn_mean",
    )
    assert result.kl.shape == (7,)


def test_qwen_vocabulary_rows(backend, tolerances, monkeypatch):
    """The real Qwen2.5 vocabulary size (151936, not a multiple of any block) on a few bf16 rows,
    with K = 20 as servers return by default."""
    rows = 3 if backend != "triton" else 2
    if backend == "triton" and not torch.cuda.is_available():
        monkeypatch.setattr(triton_backend, "DEFAULT_BLOCK_V", 4096)  # keep the interpreter fast on wide rows
    student, ids, logprobs, turn_ids, target_ids = make_inputs(1, rows, 151936, 20, torch.bfloat16, mask="none")
    compare(backend, student, ids, logprobs, turn_ids, tolerances(torch.bfloat16), target_ids=target_ids)


@pytest.mark.parametrize("divergence", DIVERGENCES)
@pytest.mark.parametrize("tail", TAILS)
def test_top_k_covering_the_vocabulary_equals_the_full_divergence(backend, divergence, tail):
    """With K = V there is no tail, both modes are the exact full-vocabulary divergence, i.e.
    ``fused_turn_kl`` with the teacher's full logits (whose log-softmax the top-k hold)."""
    B, T, V = 2, 3, 131 if backend == "triton" else 300
    student = (torch.randn(B, T, V, device=DEVICE) * 3).requires_grad_(True)
    teacher = torch.randn(B, T, V, device=DEVICE) * 3
    logprobs, ids = torch.log_softmax(teacher, -1).topk(V, -1)
    turn_ids = torch.tensor([[0, -1, 1], [1, 0, 0]], device=DEVICE)
    kwargs = dict(divergence=divergence, beta=0.3, temperature=1.3, reduction="none")
    ours = fused_topk_turn_kl(student, ids, logprobs, turn_ids, tail=tail, backend=backend, **kwargs)
    (grad,) = torch.autograd.grad(ours.sum(), student)
    # the teacher's logits at temperature 1 are its log-probs; scaled so that fused_turn_kl's
    # division of both logits by the temperature leaves the teacher at temperature 1
    full = fused_turn_kl(student, teacher * 1.3, turn_ids, backend="torch", **kwargs)
    (full_grad,) = torch.autograd.grad(full.sum(), student)
    torch.testing.assert_close(ours, full, rtol=1e-4, atol=2e-5)
    torch.testing.assert_close(grad, full_grad, rtol=1e-4, atol=2e-6)


def test_tail_mass_is_not_computed_by_cancellation(backend):
    """The student holds all but ~1e-9 of its mass on the top-k: ``1 - sum`` would leave float32
    rounding noise (or a negative number) as the tail; the complement's own log-sum-exp keeps
    ``log p_tail`` exact, which forward KL's tail term ``q_tail log(q_tail / p_tail)`` exposes."""
    B, T, V, K = 1, 3, vocab_for(backend, 1037), 4
    student = torch.zeros(B, T, V, device=DEVICE)
    logprobs, ids = torch.log_softmax(torch.randn(B, T, V, device=DEVICE) * 2, -1).topk(K, -1)
    student.scatter_(-1, ids, 28.0)  # p_tail = (V - K) e^-28 / (K + ...) ~ 1e-10
    student.requires_grad_(True)
    for tail_eps in (1e-6, 0.5):
        compare(
            backend, student, ids, logprobs, None, dict(rtol=1e-4, atol=1e-6),
            divergence="forward_kl", tail_eps=tail_eps, reduction="none",
        )


@pytest.mark.parametrize("divergence", DIVERGENCES)
def test_inf_logits_and_garbage_in_dropped_rows_never_give_nan(backend, divergence, tolerances):
    B, T, V, K = 1, 4, vocab_for(backend, 300), 6
    student, ids, logprobs, turn_ids, _ = make_inputs(B, T, V, K, mask="none", ragged=False)
    s = student.detach().clone()
    banned = torch.zeros(V, dtype=torch.bool, device=DEVICE)
    banned[:150] = True  # whole leading blocks of -inf
    banned[200:210] = True
    banned[ids[0, :3].reshape(-1)] = False  # the top-k stay finite (a -inf there is a true inf forward KL)
    s[0, :3][:, banned] = -math.inf
    s[0, 3] = math.nan  # a dropped token with garbage logits, ids and log-probs
    ids[0, 3] = V + 5
    logprobs[0, 3] = math.nan
    turn_ids[0, 3] = -1
    s.requires_grad_(True)
    for tail in TAILS:
        result, grad = compare(
            backend, s, ids, logprobs, turn_ids, tolerances(torch.float32), divergence=divergence, beta=0.4,
            tail=tail,
        )
        assert torch.isfinite(result.loss) and torch.isfinite(result.kl).all()
        assert float(grad[0, 3].abs().sum()) == 0.0
        assert float(grad[0, :3][:, banned].abs().sum()) == 0.0


def test_infinite_divergences_are_reported(backend):
    V = 300
    student = torch.randn(2, V, device=DEVICE)
    ids = torch.tensor([[3, 7], [3, 7]], device=DEVICE)
    # reverse KL: the teacher gives -inf to an id where the student has mass
    logprobs = torch.tensor([[-0.1, -math.inf], [-0.1, -math.inf]], device=DEVICE)
    kl = fused_topk_turn_kl(student, ids, logprobs, backend=backend, reduction="none")
    assert math.isinf(float(kl[0]))
    # forward KL: the student puts no mass outside the top-k while the teacher's tail >= tail_eps
    student = torch.full((1, V), -math.inf, device=DEVICE)
    student[0, 3], student[0, 7] = 1.0, 2.0
    logprobs = torch.tensor([[-1.0, -1.0]], device=DEVICE)
    kl = fused_topk_turn_kl(student, ids[:1], logprobs, backend=backend, divergence="forward_kl", reduction="none")
    assert math.isinf(float(kl[0]))
    assert math.isfinite(float(fused_topk_turn_kl(student, ids[:1], logprobs, backend=backend, reduction="none")[0]))


def test_nan_logits_in_a_kept_row_are_reported(backend):
    student, ids, logprobs, _, _ = make_inputs(1, 3, vocab_for(backend, 700), 5, ragged=False, flat=True)
    student = student.detach().clone()
    student[1, 5] = math.nan
    kl = fused_topk_turn_kl(student, ids, logprobs, backend=backend, reduction="none")
    assert math.isnan(float(kl[1])) and torch.isfinite(kl[[0, 2]]).all()


@pytest.mark.parametrize("temperature", [0.3, 3.0])
def test_wide_logit_ranges_and_offsets(backend, temperature, tolerances):
    """Logits spread over hundreds of nats, far from 0 (as after a large bias), with the max late
    in the row: range reduction, rescaling and the entropy keep float32 accuracy. The teacher is
    the student plus noise, so its top-k sit where the student's mass is and the gradient is not
    negligible against the divergence."""
    B, T, V, K = 2, 3, vocab_for(backend, 900), 5
    student = torch.randn(B, T, V, device=DEVICE) * 25.0 + torch.linspace(0, 60, V, device=DEVICE) + 1000.0
    teacher = torch.log_softmax((student + torch.randn_like(student) * 20.0 - 1000.0) / temperature, -1)
    logprobs, ids = teacher.topk(K, -1)
    turn_ids = torch.tensor([[0, 1, -1], [1, 0, 0]], device=DEVICE)
    target_ids = ids[..., 1]
    student.requires_grad_(True)
    for tail in TAILS:
        compare(
            backend, student, ids, logprobs, turn_ids, tolerances(torch.float32),
            temperature=temperature, target_ids=target_ids, tail=tail,
        )


def test_strided_rows_without_copy(backend):
    """logits[:, :-1] (the usual shift) is consumed through its strides."""
    B, T, V = 2, 6, vocab_for(backend, 300)
    base = torch.randn(B, T + 1, V, device=DEVICE)
    _, ids, logprobs, _, _ = make_inputs(B, T, V, 5)
    student = base[:, :-1].clone().requires_grad_(True)
    loss_contiguous = fused_topk_turn_kl(student, ids, logprobs, backend=backend)
    view = base.clone().requires_grad_(True)
    loss_strided = fused_topk_turn_kl(view[:, :-1], ids, logprobs, backend=backend)
    torch.testing.assert_close(loss_strided, loss_contiguous)
    loss_strided.backward()
    loss_contiguous.backward()
    torch.testing.assert_close(view.grad[:, :-1], student.grad)
    assert float(view.grad[:, -1].abs().sum()) == 0.0


@pytest.mark.parametrize("reduction", ["mean", "turn_mean", "none"])
def test_gradient_when_upstream_differs_from_the_reduction(backend, reduction):
    """The gradient is written pre-multiplied by the reduction's coefficients; any other upstream
    gradient (a scaled loss, a second use of ``kl``, a zero turn weight) still gives the exact one."""
    B, T, V = 3, 5, vocab_for(backend, 301)
    student, ids, logprobs, turn_ids, _ = make_inputs(B, T, V, 5, n_turns=3)
    turn_weights = torch.rand(B, 3, device=DEVICE) + 0.5
    turn_weights[1, 0] = 0.0
    token_w = torch.randn(B, T, device=DEVICE)
    kwargs = dict(turn_weights=turn_weights, reduction=reduction, temperature=1.3, return_stats=True)

    def total(result):
        loss = result.loss.sum() if reduction == "none" else result.loss
        return 2.5 * loss + (result.kl * token_w).sum()

    (grad,) = torch.autograd.grad(
        total(fused_topk_turn_kl(student, ids, logprobs, turn_ids, backend=backend, **kwargs)), student
    )
    ref_student = student.detach().double().requires_grad_(True)
    (ref_grad,) = torch.autograd.grad(
        total(topk_turn_kl_reference(ref_student, ids, logprobs, turn_ids, **kwargs)), ref_student
    )
    scale = ref_grad.abs().max().item()
    torch.testing.assert_close(grad.double() / scale, ref_grad / scale, rtol=0, atol=2e-5)


def test_gradient_matches_finite_differences_float64():
    """The derived gradient (torch backend, float64) against central differences of the loss."""
    torch.manual_seed(0)
    student, ids, logprobs, _, _ = make_inputs(2, 3, 13, 4, dtype=torch.float64)
    student = student.detach().cpu()
    ids, logprobs = ids.cpu(), logprobs.cpu().double()
    turn_ids = torch.tensor([[0, -1, 1], [2, 2, 0]])
    eps = 1e-6
    for tail in TAILS:
        for divergence in DIVERGENCES:

            def loss_of(s, divergence=divergence, tail=tail):
                return fused_topk_turn_kl(
                    s, ids, logprobs, turn_ids, divergence=divergence, beta=0.35, temperature=1.3, tail=tail,
                    reduction="turn_mean", backend="torch",
                )

            s = student.clone().requires_grad_(True)
            (grad,) = torch.autograd.grad(loss_of(s), s)
            for _ in range(3):
                direction = torch.randn_like(student)
                numeric = (loss_of(student + eps * direction) - loss_of(student - eps * direction)) / (2 * eps)
                torch.testing.assert_close((grad * direction).sum(), numeric, rtol=1e-6, atol=1e-8)


def test_sampled_token_statistics():
    """``log p(a)`` is the student's full-vocabulary log-prob; ``log q(a)`` the server's when ``a``
    is among the top-k, else NaN (and the turn's ``|log p - log q|`` sum with it)."""
    student = torch.randn(1, 3, 50)
    ids = torch.tensor([[[4, 9, -1], [4, 9, 2], [1, 2, 3]]])
    logprobs = torch.tensor([[[-0.5, -1.5, 0.0], [-0.5, -1.5, -3.0], [-1.0, -2.0, -3.0]]])
    target = torch.tensor([[9, 7, 3]])
    turn_ids = torch.tensor([[0, 1, 2]])
    result = fused_topk_turn_kl(student, ids, logprobs, turn_ids, target_ids=target, return_stats=True)
    torch.testing.assert_close(result.student_logprob, torch.log_softmax(student, -1).gather(-1, target[..., None])[..., 0])
    assert float(result.teacher_logprob[0, 0]) == -1.5 and float(result.teacher_logprob[0, 2]) == -3.0
    assert math.isnan(float(result.teacher_logprob[0, 1]))
    assert math.isnan(float(result.turn_abs_logratio_sum[0, 1]))
    assert math.isfinite(float(result.turn_abs_logratio_sum[0, 0]))


def test_ids_and_logprobs_of_dropped_rows_are_not_read():
    student = torch.randn(2, 40)
    ids = torch.tensor([[1, 2], [99, 99]])  # out of range and repeated, in a dropped row
    logprobs = torch.tensor([[-0.5, -1.0], [3.0, math.nan]])
    loss = fused_topk_turn_kl(student, ids, logprobs, torch.tensor([0, -1]))
    expected = fused_topk_turn_kl(student[:1], ids[:1], logprobs[:1])
    torch.testing.assert_close(loss, expected)


def test_plain_loss_matches_the_stats_path():
    student, ids, logprobs, turn_ids, _ = (x.detach().cpu() for x in make_inputs(2, 4, 333, 5))
    student.requires_grad_(True)
    for backend in ["torch", "native"]:
        plain = fused_topk_turn_kl(student, ids, logprobs, turn_ids, backend=backend)
        (plain_grad,) = torch.autograd.grad(plain, student)
        stats = fused_topk_turn_kl(student, ids, logprobs, turn_ids, backend=backend, return_stats=True)
        (stats_grad,) = torch.autograd.grad(stats.loss, student)
        torch.testing.assert_close(plain, stats.loss, rtol=0, atol=0)
        torch.testing.assert_close(plain_grad, stats_grad, rtol=0, atol=0)


def test_backward_twice_is_refused():
    student = torch.randn(3, 20, requires_grad=True)
    ids = torch.tensor([[1, 2]] * 3)
    logprobs = torch.full((3, 2), -1.0)
    loss = fused_topk_turn_kl(student, ids, logprobs, backend="torch")
    loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="only once"):
        loss.backward()


def test_no_grad_skips_gradient_and_matches():
    student, ids, logprobs, turn_ids, _ = make_inputs(2, 3, 100, 5)
    with torch.no_grad():
        a = fused_topk_turn_kl(student, ids, logprobs, turn_ids)
    b = fused_topk_turn_kl(student, ids, logprobs, turn_ids)
    torch.testing.assert_close(a, b.detach())


def test_training_drives_the_sparse_kl_down():
    """A linear layer producing student logits learns to match a teacher known only by its top-k."""
    generator = torch.Generator().manual_seed(1)
    logprobs, ids = torch.log_softmax(torch.randn(64, 97, generator=generator) * 2, -1).topk(8, -1)
    losses = fit_linear_head(lambda logits: fused_topk_turn_kl(logits, ids, logprobs))
    assert losses[-1] < 0.5 * losses[0]


@pytest.mark.parametrize("packed", [False, True], ids=["padded", "packed"])
@pytest.mark.parametrize("compile_backend", ["aot_eager", "inductor"])
def test_torch_compile_fullgraph(compile_backend, packed):
    """A loss function calling the op compiles without graph breaks and gives the eager numbers,
    on a padded batch and on a packed one (``cu_seqlens``)."""
    student, ids, logprobs, _, _ = make_inputs(2, 5, 64, 4)
    student = student.detach().cpu().requires_grad_(True)
    ids, logprobs = ids.cpu(), logprobs.cpu()
    turn_ids = torch.tensor([[0, 0, 1, -1, 1], [0, 1, 1, 2, -1]])
    cu_seqlens = None
    if packed:  # sequences of 3, 0 and 7 tokens
        student = student.detach().reshape(10, 64).requires_grad_(True)
        ids, logprobs, turn_ids = ids.reshape(10, 4), logprobs.reshape(10, 4), turn_ids.reshape(10)
        cu_seqlens = torch.tensor([0, 3, 3, 10])

    def loss_fn(s, i, lp, t, cu_seqlens):
        return fused_topk_turn_kl(s * 1.0, i, lp, t, turn_window=(0, 2), reduction="turn_mean", num_turns=3,
                                  cu_seqlens=cu_seqlens)

    assert_compiles_like_eager(loss_fn, student, ids, logprobs, turn_ids, cu_seqlens, backend=compile_backend)


def test_public_exports():
    assert tcod_fast.fused_topk_turn_kl is fused_topk_turn_kl
    assert "Returns:" in fused_topk_turn_kl.__doc__
    assert "fused_linear_topk_turn_kl" in tcod_fast.__all__
