"""Tests of tcod_fast.objectives against hand-computed values, independent float64 /
pure-Python computations and the papers' stated properties."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

import tcod_fast
from tcod_fast.objectives import (
    aggregate_loss,
    broadcast_turn_weights,
    full_vocab_kl_loss,
    grpo_advantages,
    hybrid_advantages,
    k1_kl,
    k3_kl,
    opd_advantages,
    ppo_clipped_loss,
    sod_weights,
    student_token_mask,
    tdur_weights,
    token_advantages,
    turn_diagnostics,
    turn_sums,
)

# --------------------------------------------------------- independent helpers


def assert_values(actual: torch.Tensor, expected) -> None:
    torch.testing.assert_close(actual.double(), torch.tensor(expected, dtype=torch.float64), rtol=1e-6, atol=1e-7)


def python_turn_means(lp, lq, ids):
    """Per-turn (d_k, h_k) for one trajectory with plain Python loops."""
    groups: dict[int, list[tuple[float, float]]] = {}
    for p, q, k in zip(lp, lq, ids):
        if k >= 0:
            groups.setdefault(int(k), []).append((float(p), float(q)))
    d = {k: sum(abs(p - q) for p, q in v) / len(v) for k, v in groups.items()}
    h = {k: sum(-p for p, _ in v) / len(v) for k, v in groups.items()}
    return d, h


def python_tdur(lp, lq, ids, n_turns):
    d, h = python_turn_means(lp, lq, ids)

    def norm(x):
        lo, hi = min(x.values()), max(x.values())
        return {k: 0.5 if hi - lo < 1e-8 else (v - lo) / (hi - lo) for k, v in x.items()}

    dn, hn = norm(d), norm(h)
    return [1 - (1 - dn[k]) * (1 - hn[k]) if k in d else 0.0 for k in range(n_turns)]


def python_sod(lp, lq, ids, n_turns, eps, delta):
    d, _ = python_turn_means(lp, lq, ids)
    first = d[min(d)]
    return [min((first + eps) / (d[k] + eps), 1 + delta) if k in d else 0.0 for k in range(n_turns)]


def ragged_batch(seed=0, B=4, T=24, n_turns=5):
    """Log-probs and turn ids with ragged trajectories: a B2F-like row that starts at turn
    2, a single-turn row, a row with no trained token and a full row."""
    g = torch.Generator().manual_seed(seed)
    lp = -torch.rand(B, T, generator=g, dtype=torch.float64) * 3
    lq = -torch.rand(B, T, generator=g, dtype=torch.float64) * 3
    ids = torch.full((B, T), -1, dtype=torch.long)
    ids[0, 2:22] = torch.arange(20) // 4  # turns 0..4, 4 tokens each, prompt/padding around
    ids[0, 10:12] = -1  # an observation inside
    ids[1, 5:9] = 2  # single-turn trajectory (student starts at turn 2)
    ids[1, 12:16] = 3
    ids[1, 16:18] = -1
    ids[2, 0:3] = 1  # one turn only
    # row 3: no trained token at all
    return lp, lq, ids, n_turns


# ----------------------------------------------------------------- estimators


def test_k1_k3_hand_values_and_k3_properties():
    lp = torch.tensor([-1.0, -2.0, -0.5, -3.0], dtype=torch.float64)
    lq = torch.tensor([-1.5, -1.0, -0.5, -0.2], dtype=torch.float64)
    assert k1_kl(lp, lq).tolist() == pytest.approx([0.5, -1.0, 0.0, -2.8])
    r = [-0.5, 1.0, 0.0, 2.8]
    assert k3_kl(lp, lq).tolist() == pytest.approx([math.exp(x) - 1 - x for x in r])
    assert bool((k3_kl(lp, lq) >= 0).all())
    # Both are unbiased for KL(p||q) when a ~ p: check on a small categorical in float64.
    p = torch.tensor([0.5, 0.3, 0.2], dtype=torch.float64)
    q = torch.tensor([0.2, 0.5, 0.3], dtype=torch.float64)
    exact = float((p * (p.log() - q.log())).sum())
    assert float((p * k1_kl(p.log(), q.log())).sum()) == pytest.approx(exact)
    assert float((p * k3_kl(p.log(), q.log())).sum()) == pytest.approx(exact)
    with pytest.raises(ValueError, match="one shape"):
        k1_kl(lp, lq[:2])


def test_opd_advantages_and_token_mask():
    lp = torch.tensor([[-1.0, -2.0, -0.5]])
    lq = torch.tensor([[-1.5, -1.0, -0.1]])
    ids = torch.tensor([[-1, 0, 1]])
    assert_values(opd_advantages(lp, lq, ids, kl_coef=2.0), [[0.0, 2.0, 0.8]])
    ids2 = torch.tensor([[-1, 0, 1, 2, 3], [0, 1, 2, 3, -1]])
    assert student_token_mask(ids2, (1, 3)).tolist() == [[False, False, True, True, False], [False, True, True, False, False]]
    per_seq = torch.tensor([[0, 1], [2, 4]])
    assert student_token_mask(ids2, per_seq).tolist() == [[False, True, False, False, False], [False, False, True, True, False]]


def test_turn_sums_and_broadcast_round_trip():
    lp, _, ids, n = ragged_batch()
    sums, counts = turn_sums(lp, ids, n)
    assert sums.shape == (4, n) and counts.shape == (4, n)
    for b in range(4):
        for k in range(n):
            in_turn = ids[b] == k
            assert float(counts[b, k]) == int(in_turn.sum())
            assert float(sums[b, k]) == pytest.approx(float(lp[b][in_turn].sum()))
    weights = torch.arange(4 * n, dtype=torch.float64).reshape(4, n)
    tokens = broadcast_turn_weights(weights, ids, fill_value=-7.0)
    expected = [[float(weights[b, int(k)]) if k >= 0 else -7.0 for k in ids[b]] for b in range(4)]
    assert tokens.tolist() == expected
    one_d = broadcast_turn_weights(torch.tensor([0.25, 0.5]), torch.tensor([-1, 0, 1, 1]))
    assert one_d.tolist() == [0.0, 0.25, 0.5, 0.5]
    with pytest.raises(ValueError, match="num_turns is 2"):
        turn_sums(lp, ids, 2)
    with pytest.raises(ValueError, match="turn_weights has 2 turns"):
        broadcast_turn_weights(torch.ones(4, 2), ids)


# ----------------------------------------------------------------------- T-DUR


def test_tdur_hand_values():
    lp = torch.tensor([-1.0, -2.0, -0.5], dtype=torch.float64)
    lq = torch.tensor([-1.5, -1.0, -0.5], dtype=torch.float64)
    ids = torch.tensor([0, 1, 2])
    # d = [0.5, 1, 0] -> [0.5, 1, 0]; h = [1, 2, 0.5] -> [1/3, 1, 0]
    weights = tdur_weights(lp, lq, ids)
    assert weights.shape == (3,)
    assert weights.tolist() == pytest.approx([1 - 0.5 * (2 / 3), 1.0, 0.0])


def test_tdur_matches_python_loops_on_ragged_batch_and_soft_or_bounds():
    lp, lq, ids, n = ragged_batch(seed=3)
    weights = tdur_weights(lp, lq, ids, num_turns=n)
    assert weights.shape == (4, n) and not torch.isnan(weights).any()
    for b in range(3):
        assert weights[b].tolist() == pytest.approx(python_tdur(lp[b].tolist(), lq[b].tolist(), ids[b].tolist(), n))
    assert weights[3].tolist() == [0.0] * n  # no trained token: nothing, not NaN
    # soft-OR: w in [0, 1] and at least each normalised signal (checked via bounds on present turns)
    present = turn_sums(lp, ids, n)[1] > 0
    assert bool(((weights >= 0) & (weights <= 1)).all())
    assert bool((weights[~present] == 0).all())
    # the per-trajectory extremes: some turn of a multi-turn row reaches w = 1 (max d or max h)
    assert float(weights[0].max()) == pytest.approx(1.0)


def test_tdur_single_turn_and_constant_signals_use_the_half_fallback():
    # single turn: both normalised signals are 0.5, so w = 1 - 0.25
    single = tdur_weights(torch.tensor([-1.0, -2.0]), torch.tensor([-0.5, -0.5]), torch.tensor([3, 3]))
    assert single.tolist() == pytest.approx([0.0, 0.0, 0.0, 0.75])
    # constant d and h across turns (differences below 1e-8)
    lp = torch.tensor([-1.0, -1.0, -1.0 + 1e-10], dtype=torch.float64)
    lq = torch.tensor([-2.0, -2.0, -2.0 + 1e-10], dtype=torch.float64)
    assert tdur_weights(lp, lq, torch.tensor([0, 1, 2])).tolist() == pytest.approx([0.75] * 3)
    # only d constant: h~ in {0, 1}, d~ = 0.5 -> w in {0.5, 1}
    lp = torch.tensor([-1.0, -3.0], dtype=torch.float64)
    lq = lp - 0.7
    assert tdur_weights(lp, lq, torch.tensor([0, 1])).tolist() == pytest.approx([0.5, 1.0])


def test_tdur_soft_or_properties_on_random_turns():
    g = torch.Generator().manual_seed(11)
    lp = -torch.rand(64, 6, generator=g, dtype=torch.float64) * 4
    lq = -torch.rand(64, 6, generator=g, dtype=torch.float64) * 4
    ids = torch.arange(6).expand(64, 6)
    weights = tdur_weights(lp, lq, ids)
    d = (lp - lq).abs()
    h = -lp
    d_norm = (d - d.amin(1, keepdim=True)) / (d.amax(1, keepdim=True) - d.amin(1, keepdim=True))
    h_norm = (h - h.amin(1, keepdim=True)) / (h.amax(1, keepdim=True) - h.amin(1, keepdim=True))
    assert bool((weights >= torch.maximum(d_norm, h_norm) - 1e-12).all())
    assert bool((weights <= 1 + 1e-12).all())
    torch.testing.assert_close(weights, 1 - (1 - d_norm) * (1 - h_norm))


def test_tdur_and_sod_accept_the_kernels_per_turn_sums():
    g = torch.Generator().manual_seed(5)
    B, T, V, n = 3, 16, 11, 4
    student = torch.randn(B, T, V, generator=g, dtype=torch.float64)
    teacher = torch.randn(B, T, V, generator=g, dtype=torch.float64)
    targets = torch.randint(0, V, (B, T), generator=g)
    ids = torch.full((B, T), -1, dtype=torch.long)
    ids[0, 1:13] = torch.arange(12) // 3
    ids[1, 4:8] = 1
    ids[2, 0:16:2] = torch.arange(8) // 2
    stats = tcod_fast.turn_kl_reference(student, teacher, ids, target_ids=targets, return_stats=True, num_turns=n)
    lp = torch.log_softmax(student, -1).gather(-1, targets.unsqueeze(-1)).squeeze(-1)
    lq = torch.log_softmax(teacher, -1).gather(-1, targets.unsqueeze(-1)).squeeze(-1)
    from_sums = tdur_weights(
        turn_abs_logratio_sum=stats.turn_abs_logratio_sum,
        turn_neg_logprob_sum=stats.turn_neg_logprob_sum,
        turn_token_count=stats.turn_token_count,
    )
    torch.testing.assert_close(from_sums, tdur_weights(lp, lq, ids, num_turns=n))
    sod_from_sums = sod_weights(turn_abs_logratio_sum=stats.turn_abs_logratio_sum, turn_token_count=stats.turn_token_count)
    torch.testing.assert_close(sod_from_sums, sod_weights(lp, lq, ids, num_turns=n))
    with pytest.raises(ValueError, match="not both"):
        tdur_weights(lp, lq, ids, turn_token_count=stats.turn_token_count)
    with pytest.raises(ValueError, match="turn_neg_logprob_sum"):
        tdur_weights(turn_abs_logratio_sum=stats.turn_abs_logratio_sum, turn_token_count=stats.turn_token_count)


# ------------------------------------------------------------------------- SOD


def test_sod_hand_values_and_cap():
    lp = torch.tensor([-1.0, -2.0, -0.5], dtype=torch.float64)
    lq = torch.tensor([-1.5, -1.0, -0.5], dtype=torch.float64)
    eps = 1e-6
    weights = sod_weights(lp, lq, torch.tensor([0, 1, 2]), eps=eps, delta=0.2)
    # d = [0.5, 1.0, 0.0]
    assert weights.tolist() == pytest.approx([1.0, (0.5 + eps) / (1.0 + eps), 1.2])
    assert sod_weights(lp, lq, torch.tensor([0, 1, 2]), delta=0.5)[2] == pytest.approx(1.5)
    with pytest.raises(ValueError, match="delta"):
        sod_weights(lp, lq, torch.tensor([0, 1, 2]), delta=-0.1)


def test_sod_matches_python_loops_on_ragged_batch():
    lp, lq, ids, n = ragged_batch(seed=8)
    weights = sod_weights(lp, lq, ids, eps=1e-6, delta=0.3, num_turns=n)
    for b in range(3):
        expected = python_sod(lp[b].tolist(), lq[b].tolist(), ids[b].tolist(), n, 1e-6, 0.3)
        assert weights[b].tolist() == pytest.approx(expected)
    assert weights[3].tolist() == [0.0] * n
    assert bool((weights <= 1.3 + 1e-12).all()) and not torch.isnan(weights).any()
    # the first present turn of each trajectory has weight exactly 1
    assert float(weights[0, 0]) == 1.0 and float(weights[1, 2]) == 1.0 and float(weights[2, 1]) == 1.0


# ------------------------------------------------------------------------ GRPO


def test_grpo_hand_values_groups_of_one_and_empty():
    rewards = torch.tensor([1.0, 0.0, 1.0, 0.5, 0.0], dtype=torch.float64)
    groups = torch.tensor([7, 7, 3, 9, 3])
    advantages = grpo_advantages(rewards, groups, eps=0.0)
    s = 1 / math.sqrt(2)
    assert advantages.tolist() == pytest.approx([s, -s, s, 0.0, -s])
    population = grpo_advantages(rewards, groups, eps=0.0, unbiased_std=False)
    assert population.tolist() == pytest.approx([1.0, -1.0, 1.0, 0.0, -1.0])
    centred = grpo_advantages(rewards, groups, scale_by_std=False)
    assert centred.tolist() == pytest.approx([0.5, -0.5, 0.5, 0.0, -0.5])
    lonely = grpo_advantages(torch.tensor([3.0]), torch.tensor([0]))
    assert lonely.tolist() == [0.0]
    assert grpo_advantages(torch.zeros(0), torch.zeros(0, dtype=torch.long)).shape == (0,)
    same = grpo_advantages(torch.tensor([1.0, 1.0, 1.0]), torch.tensor([2, 2, 2]))
    assert same.tolist() == [0.0, 0.0, 0.0]  # all equal rewards: 0/(0+eps) = 0, no NaN


def test_grpo_matches_numpy_per_group():
    g = torch.Generator().manual_seed(2)
    rewards = torch.rand(40, generator=g, dtype=torch.float64)
    groups = torch.randint(0, 6, (40,), generator=g)
    advantages = grpo_advantages(rewards, groups, eps=1e-6)
    for gid in groups.unique():
        members = (groups == gid).numpy()
        r = rewards.numpy()[members]
        expected = np.zeros_like(r) if r.size < 2 else (r - r.mean()) / (r.std(ddof=1) + 1e-6)
        np.testing.assert_allclose(advantages.numpy()[members], expected, rtol=1e-12, atol=1e-12)
        assert abs(advantages.numpy()[members].sum()) < 1e-9  # zero-mean within a group


# ------------------------------------------------------------- hybrid advantage


def test_hybrid_advantage_hand_values_and_special_cases():
    lp = torch.tensor([[-1.0, -2.0, -0.5, -1.0], [-0.2, -0.4, -3.0, -1.0]], dtype=torch.float64)
    lq = torch.tensor([[-1.5, -1.0, -0.1, -1.0], [-0.2, -1.4, -1.0, -1.0]], dtype=torch.float64)
    ids = torch.tensor([[0, 0, 1, -1], [-1, 2, 2, -1]])
    weights = torch.tensor([[0.5, 1.0, 0.0], [0.0, 0.0, 0.25]], dtype=torch.float64)
    grpo = torch.tensor([0.4, -1.0], dtype=torch.float64)
    advantage = hybrid_advantages(lp, lq, ids, grpo, opd_coef=0.8, grpo_coef=0.5, turn_weights=weights)
    expected = [
        [0.8 * 0.5 * -0.5 + 0.2, 0.8 * 0.5 * 1.0 + 0.2, 0.8 * 1.0 * 0.4 + 0.2, 0.0],
        [0.0, 0.8 * 0.25 * -1.0 - 0.5, 0.8 * 0.25 * 2.0 - 0.5, 0.0],
    ]
    assert_values(advantage, expected)
    # without weights and GRPO it is TCOD's sampled-token OPD advantage
    torch.testing.assert_close(
        hybrid_advantages(lp, lq, ids, None, opd_coef=2.0, grpo_coef=0.0), opd_advantages(lp, lq, ids, kl_coef=2.0)
    )
    with pytest.raises(ValueError, match=r"sequence_advantages must be \(2,\)"):
        hybrid_advantages(lp, lq, ids, torch.zeros(3), opd_coef=1.0, grpo_coef=1.0)


def test_token_advantages_k1_k3_and_grpo_alone_hand_values():
    old = torch.tensor([[-1.0, -2.0, -0.5]], dtype=torch.float64)
    teacher = torch.tensor([[-1.5, -1.0, -0.5]], dtype=torch.float64)
    ids = torch.tensor([[0, 1, -1]])
    weights = torch.tensor([[0.5, 2.0]], dtype=torch.float64)
    sequence = torch.tensor([0.4], dtype=torch.float64)
    options = dict(opd_coef=2.0, grpo_coef=0.5, teacher_logprobs=teacher, turn_weights=weights)
    # log q - log p_old = [-0.5, 1.0]; k3 = exp(r) - 1 - r = [exp(-0.5) - 0.5, e - 2]
    k1 = token_advantages(old, ids, sequence, kl_estimator="k1", **options)
    assert_values(k1, [[2.0 * 0.5 * -0.5 + 0.2, 2.0 * 2.0 * 1.0 + 0.2, 0.0]])
    k3 = token_advantages(old, ids, sequence, kl_estimator="k3", **options)
    assert_values(k3, [[-2.0 * 0.5 * (math.exp(-0.5) - 0.5) + 0.2, -2.0 * 2.0 * (math.e - 2.0) + 0.2, 0.0]])
    assert bool(((k3 - 0.2)[ids >= 0] <= 0).all())  # the k3 OPD part is never positive
    # without teacher log-probs the surrogate carries the GRPO term alone
    alone = token_advantages(old, ids, sequence, opd_coef=2.0, grpo_coef=0.5)
    assert_values(alone, [[0.2, 0.2, 0.0]])
    with pytest.raises(ValueError, match="kl_estimator must be one of"):
        token_advantages(old, ids, sequence, kl_estimator="k2", **options)


# ---------------------------------------------------------------------- losses


def test_aggregation_modes_hand_values():
    losses = torch.tensor([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0], [7.0, 8.0, 9.0]])
    mask = torch.tensor([[True, True, False], [False, False, True], [False, False, False]])
    assert float(aggregate_loss(losses, mask, "token_mean")) == pytest.approx((1 + 2 + 6) / 3)
    assert float(aggregate_loss(losses, mask, "seq_mean_token_mean")) == pytest.approx((1.5 + 6) / 2)
    assert float(aggregate_loss(losses, mask, "seq_mean_token_sum")) == pytest.approx((3 + 6) / 2)
    empty = torch.zeros(2, 3, dtype=torch.bool)
    nan_losses = torch.full((2, 3), float("nan"), requires_grad=True)
    for mode in ("token_mean", "seq_mean_token_mean", "seq_mean_token_sum"):
        value = aggregate_loss(nan_losses, empty, mode)
        value.backward()
        assert float(value.detach()) == 0.0 and not torch.isnan(nan_losses.grad).any()
        nan_losses.grad = None
    with pytest.raises(ValueError, match="loss aggregation must be one of"):
        aggregate_loss(losses, mask, "mean")


def test_ppo_dual_clip_hand_values_and_gradients():
    ratios = torch.tensor([[1.5, 0.5, 5.0, 1.1, 1.5, 0.5]], dtype=torch.float64)
    advantages = torch.tensor([[2.0, 2.0, -1.0, -1.0, -1.0, -1.0]], dtype=torch.float64)
    old = torch.zeros_like(ratios)
    logprobs = ratios.log().requires_grad_(True)
    mask = torch.ones_like(ratios, dtype=torch.bool)
    loss, stats = ppo_clipped_loss(logprobs, old, advantages, mask, clip_low=0.2, dual_clip=3.0, loss_agg="token_mean")
    per_token = [
        -2.0 * 1.2,  # A>0, ratio above 1+eps: clipped, no gradient
        -2.0 * 0.5,  # A>0, ratio below 1-eps: unclipped (pessimistic) branch
        3.0,  # A<0, ratio 5: max(5, 1.2) = 5, dual clip bounds it to 3
        1.1,  # A<0, inside the trust region
        1.5,  # A<0, ratio 1.5 > 1.2: unclipped 1.5 wins, below the dual bound
        0.8,  # A<0, ratio 0.5: clipped at 0.8, no gradient
    ]
    assert float(loss.detach()) == pytest.approx(sum(per_token) / 6)
    loss.backward()
    # d loss / d logprob = -A * ratio / 6 where the unclipped branch is active, 0 where clipped
    expected_grad = [0.0, -2.0 * 0.5 / 6, 0.0, 1.1 / 6, 1.5 / 6, 0.0]
    assert logprobs.grad[0].tolist() == pytest.approx(expected_grad)
    assert float(stats["clip_fraction"]) == pytest.approx(2 / 6)
    assert float(stats["dual_clip_fraction"]) == pytest.approx(1 / 6)
    no_dual, _ = ppo_clipped_loss(ratios.log(), old, advantages, mask, dual_clip=None)
    assert float(no_dual) == pytest.approx((sum(per_token) - 3.0 + 5.0) / 6)


def test_ppo_masks_padding_and_matches_aggregation_modes():
    g = torch.Generator().manual_seed(4)
    logprobs = -torch.rand(3, 7, generator=g, dtype=torch.float64)
    old = logprobs + 0.05 * torch.randn(3, 7, generator=g, dtype=torch.float64)
    advantages = torch.randn(3, 7, generator=g, dtype=torch.float64)
    mask = torch.rand(3, 7, generator=g) > 0.4
    logprobs_padded = torch.where(mask, logprobs, torch.full_like(logprobs, -1e4))  # garbage at padding
    for mode in ("token_mean", "seq_mean_token_mean", "seq_mean_token_sum"):
        loss, _ = ppo_clipped_loss(logprobs_padded, old, advantages, mask, loss_agg=mode)
        ratio = (logprobs - old).exp()
        token = torch.maximum(-advantages * ratio, -advantages * ratio.clamp(0.8, 1.2))
        token = torch.where(advantages < 0, torch.minimum(token, -3.0 * advantages), token)
        assert float(loss) == pytest.approx(float(aggregate_loss(token, mask, mode)))
        assert math.isfinite(float(loss))


def test_ppo_rejects_bad_dual_clip():
    x = torch.zeros(1, 2)
    with pytest.raises(ValueError, match="dual_clip must be > 1"):
        ppo_clipped_loss(x, x, x, x > -1, dual_clip=0.5)


def _float64_reverse_kl(student, teacher):
    log_p = torch.log_softmax(student.double(), -1)
    log_q = torch.log_softmax(teacher.double(), -1)
    return (log_p.exp() * (log_p - log_q)).sum(-1)


@pytest.mark.skipif(
    getattr(tcod_fast, "fused_turn_kl", None) is None,
    reason="tcod_fast.fused_turn_kl (tcod_fast/ops/turn_kl/api.py) is not written yet",
)
def test_full_vocab_kl_loss_matches_float64_with_turn_weights():
    g = torch.Generator().manual_seed(9)
    B, T, V = 2, 10, 37
    student = torch.randn(B, T, V, generator=g, dtype=torch.float32, requires_grad=True)
    teacher = torch.randn(B, T, V, generator=g, dtype=torch.float32)
    ids = torch.tensor([[-1, 0, 0, 1, 1, -1, 2, 2, 2, -1], [-1, -1, 1, 1, 1, 2, -1, -1, -1, -1]])
    weights = torch.tensor([[0.5, 1.0, 0.25], [0.0, 2.0, 1.0]])
    loss = full_vocab_kl_loss(student, teacher, ids, turn_weights=weights, reduction="mean")
    kl = _float64_reverse_kl(student, teacher)
    token_weight = broadcast_turn_weights(weights.double(), ids)
    expected = (kl * token_weight).sum() / (ids >= 0).sum()
    torch.testing.assert_close(loss.double(), expected, rtol=1e-5, atol=1e-6)
    (grad,) = torch.autograd.grad(loss, student)
    (expected_grad,) = torch.autograd.grad(expected, student)
    torch.testing.assert_close(grad.double(), expected_grad.double(), rtol=1e-4, atol=1e-6)
    stats = full_vocab_kl_loss(student, teacher, ids, turn_window=(1, 3), return_stats=True)
    in_window = (ids >= 1) & (ids < 3)
    torch.testing.assert_close(stats.loss.double(), kl[in_window].mean(), rtol=1e-5, atol=1e-6)
    diagnostics = turn_diagnostics(stats.turn_kl_sum, stats.turn_token_count, stats.turn_entropy_sum)
    assert diagnostics.turn_count.tolist() == [0, 2, 2]


# ------------------------------------------------------------------ diagnostics


def test_turn_diagnostics_hand_values():
    kl_sum = torch.tensor([[1.0, 4.0, 0.0], [2.0, 0.0, 9.0]])
    counts = torch.tensor([[1.0, 2.0, 0.0], [2.0, 0.0, 3.0]])
    entropy_sum = torch.tensor([[3.0, 2.0, 0.0], [1.0, 0.0, 6.0]])
    diag = turn_diagnostics(kl_sum, counts, entropy_sum)
    # turn means: [[1, 2, -], [1, -, 3]]
    assert diag.kl_per_turn.tolist() == pytest.approx([1.0, 2.0, 3.0])
    assert diag.turn_count.tolist() == [2, 1, 1]
    assert diag.entropy_per_turn.tolist() == pytest.approx([(3.0 + 0.5) / 2, 1.0, 2.0])
    trajectory = [5 / 3, 11 / 5]
    assert diag.trajectory_kl_mean == pytest.approx(sum(trajectory) / 2)
    assert diag.trajectory_kl_std == pytest.approx(abs(trajectory[0] - trajectory[1]) / 2)
    # pooled points (0,1), (1,2), (0,1), (2,3) lie on y = 1 + x
    assert diag.kl_escalation_slope == pytest.approx(1.0)
    log = diag.to_log_dict()
    assert log["kl/turn_2"] == pytest.approx(3.0) and log["kl/turn_1_count"] == 1.0
    assert all(math.isfinite(v) for v in log.values())


def test_turn_diagnostics_slope_matches_numpy_polyfit_and_excludes_missing_turns():
    g = torch.Generator().manual_seed(6)
    B, n = 6, 8
    counts = torch.randint(0, 4, (B, n), generator=g).double()
    counts[0] = 0  # a trajectory with nothing trained
    kl_sum = torch.rand(B, n, generator=g, dtype=torch.float64) * counts * 2
    diag = turn_diagnostics(kl_sum, counts)
    present = counts > 0
    xs = torch.arange(n).expand(B, n)[present].numpy().astype(float)
    ys = (kl_sum / counts.clamp_min(1))[present].numpy()
    assert diag.kl_escalation_slope == pytest.approx(np.polyfit(xs, ys, 1)[0])
    assert diag.num_trajectories == int((counts.sum(1) > 0).sum())
    for k in range(n):
        column = present[:, k]
        expected = ys[xs == k].mean() if column.any() else 0.0
        assert float(diag.kl_per_turn[k]) == pytest.approx(expected)
    assert not torch.isnan(diag.kl_per_turn).any()


def test_turn_diagnostics_edge_cases_never_nan():
    empty = turn_diagnostics(torch.zeros(3, 4), torch.zeros(3, 4))
    assert empty.trajectory_kl_mean == 0.0 and empty.kl_escalation_slope == 0.0
    assert empty.to_log_dict() == {
        "kl/trajectory_mean": 0.0, "kl/trajectory_std": 0.0, "kl/escalation_slope": 0.0, "kl/num_trajectories": 0.0,
    }
    single = turn_diagnostics(torch.tensor([0.0, 3.0]), torch.tensor([0.0, 2.0]))  # one turn, one trajectory
    assert single.kl_per_turn.tolist() == [0.0, 1.5] and single.kl_escalation_slope == 0.0
    assert single.trajectory_kl_std == 0.0
