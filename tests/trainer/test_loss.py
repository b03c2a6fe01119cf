"""The loss steps one at a time, and how the ATOD and SOD losses are assembled from them,
against float64 hand computations written out with plain log-softmax and loops."""

import math

import pytest
import torch

from tcod_fast.algorithms import LossCoefficients
from tcod_fast.curriculum import EpisodePlan
from tcod_fast.rollout.trajectory import Trajectory
from tcod_fast.trainer.loss import (
    ModelOutputs,
    PackedMicroBatch,
    episode_turn_statistics,
    opd_term,
    pack_micro_batch,
    ppo_term,
    trained_token_count,
    turn_kl_statistics,
    turn_weights,
)

NUM_TURNS = 3
# Two episodes in window mode: episode 0 has two rows (turns 0-1, then turn 2), episode 1 one.
TURN_IDS = torch.tensor(
    [
        [-1, 0, 0, 1, 1, 1, -1, -1],
        [-1, -1, 2, 2, 2, -1, -1, -1],
        [-1, -1, 0, 0, 0, 1, 1, -1],
    ]
)
ROW_EPISODE = torch.tensor([0, 0, 1])


def _micro_batch(seed=0, vocab=7):
    generator = torch.Generator().manual_seed(seed)
    rows, length = TURN_IDS.shape
    packed = PackedMicroBatch(
        model_inputs={},
        target_ids=torch.randint(0, vocab, (rows, length), generator=generator),
        turn_ids=TURN_IDS.clone(),
        trained=TURN_IDS >= 0,
        sequence_episode=ROW_EPISODE.clone(),
        num_episodes=2,
        num_turns=NUM_TURNS,
    )
    student = (torch.randn(rows, length, vocab, generator=generator) * 2).requires_grad_(True)
    teacher = torch.randn(rows, length, vocab, generator=generator) * 2
    return packed, student, teacher


def _by_hand(packed, student, teacher):
    """Per trained token (row, t): turn, episode, reverse KL, log p(a), log q(a), in float64."""
    logp = torch.log_softmax(student.detach().double(), -1)
    logq = torch.log_softmax(teacher.double(), -1)
    tokens = []
    for r in range(packed.turn_ids.shape[0]):
        for t in range(packed.turn_ids.shape[1]):
            k = int(packed.turn_ids[r, t])
            if k < 0:
                continue
            a = int(packed.target_ids[r, t])
            kl = float((logp[r, t].exp() * (logp[r, t] - logq[r, t])).sum())
            tokens.append(dict(row=r, position=t, turn=k, episode=int(packed.sequence_episode[r]), kl=kl, lp=float(logp[r, t, a]), lq=float(logq[r, t, a])))
    return tokens


def _turn_means(tokens, episode):
    d, h = {}, {}
    for k in sorted({tok["turn"] for tok in tokens if tok["episode"] == episode}):
        mine = [tok for tok in tokens if tok["episode"] == episode and tok["turn"] == k]
        d[k] = sum(abs(tok["lp"] - tok["lq"]) for tok in mine) / len(mine)
        h[k] = sum(-tok["lp"] for tok in mine) / len(mine)
    return d, h


def _tdur_by_hand(tokens, episode):
    d, h = _turn_means(tokens, episode)

    def minmax(x):
        lo, hi = min(x.values()), max(x.values())
        return {k: 0.5 if hi - lo < 1e-8 else (v - lo) / (hi - lo) for k, v in x.items()}

    dn, hn = minmax(d), minmax(h)
    return {k: 1 - (1 - dn[k]) * (1 - hn[k]) for k in d}


def _sod_by_hand(tokens, episode, delta, eps=1e-6):
    d, _ = _turn_means(tokens, episode)
    first = d[min(d)]
    return {k: min((first + eps) / (v + eps), 1 + delta) for k, v in d.items()}


def _steps(packed, student, teacher, coefficients, normaliser, *, sod_delta=0.2, **ppo_options):
    outputs = ModelOutputs(student=student, teacher=teacher, hidden=False)
    stats = turn_kl_statistics(outputs, packed, divergence="reverse_kl", backend="torch")
    episode_stats = episode_turn_statistics(stats, packed)
    weights = turn_weights(episode_stats, coefficients.turn_weighting, sod_delta=sod_delta)
    row_weights = weights[packed.sequence_episode] if weights is not None else None
    opd = opd_term(stats, packed, coefficients.opd_coef, normaliser, row_turn_weights=row_weights)
    sampled = ppo_options.pop("sampled", False)
    ppo = ppo_term(
        student, packed, ppo_options.pop("sequence_advantages"), coefficients, normaliser,
        teacher_logprobs=stats.teacher_logprob if sampled else None, row_turn_weights=row_weights, **ppo_options,
    )
    return stats, episode_stats, weights, opd, ppo


def test_pack_micro_batch_masks_the_window_once():
    # append mode: tokens 0..9 of episode 0, student turns 0, 1, 2; a B2F-like plan trains from turn 1
    first = Trajectory(task="a", task_text="", token_ids=list(range(10)), turn_ids=[-1, -1, 0, 0, -1, 1, 1, -1, 2, 2], turns=[], context_mode="append")
    second = Trajectory(task="b", task_text="", token_ids=list(range(20, 27)), turn_ids=[-1, 0, 0, -1, 1, 3, 3], turns=[], context_mode="append")
    plans = [
        EpisodePlan(max_turns=3, players=("expert", "student", "student"), turn_window=(1, 3)),
        EpisodePlan(max_turns=4, players=("student",) * 4, turn_window=(0, 4)),
    ]
    packed = pack_micro_batch([first, second], plans, context_mode="append", pad_token_id=0, num_turns=3)
    assert packed.num_episodes == 2 and packed.sequence_episode.tolist() == [0, 1]
    kept = [sorted(set(row[row >= 0].tolist())) for row in packed.turn_ids]
    assert kept == [[1, 2], [0, 1]]  # outside the window (turn 0) and past num_turns (turn 3) dropped
    assert torch.equal(packed.trained, packed.turn_ids >= 0)
    assert int(packed.trained[0].sum()) == trained_token_count(first, plans[0]) == 4
    assert int(packed.trained[1].sum()) == 3  # turn 3 of the second episode is past num_turns


def test_episode_turn_statistics_add_rows_of_one_episode():
    packed, student, teacher = _micro_batch()
    tokens = _by_hand(packed, student, teacher)
    stats = turn_kl_statistics(ModelOutputs(student, teacher, False), packed, divergence="reverse_kl", backend="torch")
    episode_stats = episode_turn_statistics(stats, packed)
    for e in range(2):
        for k in range(NUM_TURNS):
            mine = [tok for tok in tokens if tok["episode"] == e and tok["turn"] == k]
            assert float(episode_stats.token_count[e, k]) == len(mine)
            assert float(episode_stats.kl_sum[e, k]) == pytest.approx(sum(tok["kl"] for tok in mine), rel=1e-5, abs=1e-6)
            assert float(episode_stats.abs_logratio_sum[e, k]) == pytest.approx(sum(abs(tok["lp"] - tok["lq"]) for tok in mine), rel=1e-5, abs=1e-6)
            assert float(episode_stats.neg_logprob_sum[e, k]) == pytest.approx(sum(-tok["lp"] for tok in mine), rel=1e-5, abs=1e-6)
    # without a teacher: zeros of the same shape, no weighting signals
    empty = episode_turn_statistics(None, packed)
    assert empty.kl_sum.shape == (2, NUM_TURNS) and not empty.kl_sum.any() and empty.abs_logratio_sum is None
    with pytest.raises(ValueError, match="turn weighting 'tdur' needs the teacher's per-turn statistics"):
        turn_weights(empty, "tdur")


@pytest.mark.parametrize("step_coefficients", [(1.0, 0.0), (0.55, 0.5), (0.1, 1.0)])
def test_atod_loss_is_tdur_weighted_kl_plus_grpo_surrogate(step_coefficients):
    kappa, rho = step_coefficients
    packed, student, teacher = _micro_batch(seed=1)
    tokens = _by_hand(packed, student, teacher)
    sequence_advantages = torch.tensor([0.8, -0.8])
    normaliser = 40.0  # the update's trained tokens across processes (more than this micro-batch's)
    _, _, weights, opd, ppo = _steps(
        packed, student, teacher, LossCoefficients(kappa, rho, "tdur"), normaliser, sequence_advantages=sequence_advantages
    )

    tdur = [_tdur_by_hand(tokens, e) for e in range(2)]
    for e in range(2):
        for k in range(NUM_TURNS):
            assert float(weights[e, k]) == pytest.approx(tdur[e].get(k, 0.0), rel=1e-5, abs=1e-6)
    expected_opd = kappa * sum(tdur[tok["episode"]][tok["turn"]] * tok["kl"] for tok in tokens) / normaliser
    assert float(opd.detach()) == pytest.approx(expected_opd, rel=1e-5)
    # on-policy (ratio 1): each token's surrogate is -A, token mean rescaled to the global count
    expected_ppo = -rho * sum(float(sequence_advantages[tok["episode"]]) for tok in tokens) / normaliser
    assert float(ppo.loss.detach()) == pytest.approx(expected_ppo, rel=1e-5, abs=1e-9)
    assert ppo.stats["ppo/ratio_mean"] == pytest.approx(len(tokens))  # 1 per token, times the tokens


@pytest.mark.parametrize("delta", [0.2, 0.5])
def test_sod_loss_is_grpo_surrogate_plus_c_times_sod_weighted_kl(delta):
    c = 0.3
    packed, student, teacher = _micro_batch(seed=2)
    tokens = _by_hand(packed, student, teacher)
    sequence_advantages = torch.tensor([-0.5, 1.5])
    normaliser = float(len(tokens))
    _, _, weights, opd, ppo = _steps(
        packed, student, teacher, LossCoefficients(c, 1.0, "sod"), normaliser, sod_delta=delta, sequence_advantages=sequence_advantages
    )
    sod = [_sod_by_hand(tokens, e, delta) for e in range(2)]
    for e in range(2):
        for k in range(NUM_TURNS):
            assert float(weights[e, k]) == pytest.approx(sod[e].get(k, 0.0), rel=1e-5, abs=1e-6)
    assert float(weights.max()) <= 1 + delta + 1e-6
    expected_opd = c * sum(sod[tok["episode"]][tok["turn"]] * tok["kl"] for tok in tokens) / normaliser
    assert float(opd.detach()) == pytest.approx(expected_opd, rel=1e-5)
    expected_ppo = -sum(float(sequence_advantages[tok["episode"]]) for tok in tokens) / normaliser
    assert float(ppo.loss.detach()) == pytest.approx(expected_ppo, rel=1e-5, abs=1e-9)


@pytest.mark.parametrize("estimator", ["k1", "k3"])
def test_sampled_atod_advantage_is_assembled_from_kappa_weights_and_rho(estimator):
    """Sampled estimator: the OPD term moves into the surrogate's advantage,
    ``kappa w_k (log q - log p_old)`` (k1) or ``-kappa w_k k3`` (k3), plus ``rho A``."""
    kappa, rho = 0.55, 0.5
    packed, student, teacher = _micro_batch(seed=3)
    tokens = _by_hand(packed, student, teacher)
    sequence_advantages = torch.tensor([1.0, -1.0])
    normaliser = float(len(tokens))
    _, _, _, _, ppo = _steps(
        packed, student, teacher, LossCoefficients(kappa, rho, "tdur"), normaliser,
        sequence_advantages=sequence_advantages, sampled=True, sampled_kl=estimator,
    )
    tdur = [_tdur_by_hand(tokens, e) for e in range(2)]

    def opd_advantage(tok):
        log_ratio = tok["lq"] - tok["lp"]
        return log_ratio if estimator == "k1" else -(math.exp(log_ratio) - 1 - log_ratio)

    advantages = [
        kappa * tdur[tok["episode"]][tok["turn"]] * opd_advantage(tok) + rho * float(sequence_advantages[tok["episode"]])
        for tok in tokens
    ]
    # ratio 1: the surrogate of a token is -A whatever the clip (the dual clip only bounds ratios > 1)
    assert float(ppo.loss.detach()) == pytest.approx(-sum(advantages) / normaliser, rel=1e-5, abs=1e-8)

    # its gradient: d/dlogits of -A_t log p(a_t) / N, i.e. -A_t (onehot - p) / N per token
    ppo.loss.backward()
    expected = torch.zeros_like(student, dtype=torch.float64)
    probabilities = torch.softmax(student.detach().double(), -1)
    for tok, advantage in zip(tokens, advantages):
        r, t = tok["row"], tok["position"]
        onehot = torch.zeros(student.shape[-1], dtype=torch.float64)
        onehot[packed.target_ids[r, t]] = 1.0
        expected[r, t] = -advantage * (onehot - probabilities[r, t]) / normaliser
    torch.testing.assert_close(student.grad.double(), expected, rtol=1e-4, atol=1e-7)


def test_opd_term_without_weights_is_the_fused_sum():
    packed, student, teacher = _micro_batch(seed=4)
    tokens = _by_hand(packed, student, teacher)
    stats = turn_kl_statistics(ModelOutputs(student, teacher, False), packed, divergence="reverse_kl", backend="torch")
    loss = opd_term(stats, packed, 0.7, 10.0)
    assert float(loss.detach()) == pytest.approx(0.7 * sum(tok["kl"] for tok in tokens) / 10.0, rel=1e-5)
    loss.backward()
    assert student.grad is not None and student.grad[~packed.trained].abs().max() == 0
