"""The verl registrations, fetched through verl's own registries and called on CPU tensors,
against float64 references.

verl 0.9.1 caps transformers below the version the rest of the project uses, so it lives in
its own environment: ``.ci/run`` builds ``.venv-verl`` (README, "Use with verl") and runs this
file there. In the main environment it is skipped.
"""

from __future__ import annotations

import math

import pytest
import torch

pytest.importorskip(
    "verl",
    reason="verl is not installed here: it needs its own environment (transformers < 5.11); "
    ".ci/run builds .venv-verl and runs this file in it",
)

import tcod_fast.integrations.verl as tcod_verl  # noqa: E402  (registers the names)
from tensordict import TensorDict  # noqa: E402
from verl.trainer.distillation.losses import (  # noqa: E402
    compute_topk_loss,
    get_distillation_loss_fn,
    get_distillation_loss_settings,
)
from verl.trainer.ppo.core_algos import get_adv_estimator_fn, get_policy_loss_fn  # noqa: E402
from verl.workers.config import (  # noqa: E402
    DistillationConfig,
    DistillationLossConfig,
    FSDPActorConfig,
    PolicyLossConfig,
)

from tcod_fast import topk_turn_kl_reference  # noqa: E402


class _Strategy:
    """The one field verl's top-k dispatch reads from the actor config (``strategy``)."""

    strategy = "fsdp"


def _nested(rows):
    return torch.nested.as_nested_tensor(rows, layout=torch.jagged)


def _topk_case(seed=0, lengths=(5, 7), vocab=50, k=4):
    g = torch.Generator().manual_seed(seed)
    total = sum(lengths)
    logits = (torch.randn(1, total, vocab, generator=g) * 3).requires_grad_(True)
    teacher_logits = torch.randn(total, vocab, generator=g, dtype=torch.float64) * 3
    teacher_logprobs = torch.log_softmax(teacher_logits, -1)
    top = teacher_logprobs.topk(k, dim=-1)
    ids, logprobs = top.indices, top.values.float()
    split_ids = list(ids.split(list(lengths)))
    split_lp = list(logprobs.split(list(lengths)))
    return logits, ids, logprobs, _nested(split_ids), _nested(split_lp)


def test_fused_kl_loss_through_verl_matches_float64():
    settings = get_distillation_loss_settings("tcod_fused_kl")
    assert settings.use_topk and not settings.use_estimator
    distillation_config = DistillationConfig(distillation_loss=DistillationLossConfig(loss_mode="tcod_fused_kl", topk=4))
    logits, ids, logprobs, nested_ids, nested_lp = _topk_case()
    data = TensorDict({"teacher_logprobs": nested_lp, "teacher_ids": nested_ids}, batch_size=[2])

    # verl's own top-k step (the one its FSDP engine calls with the student logits)
    outputs = compute_topk_loss(_Strategy(), distillation_config, data, logits, "thd")
    losses = outputs["distillation_losses"]
    assert losses.shape == (1, ids.shape[0])

    ref_logits = logits.detach().double().requires_grad_(True)
    reference = topk_turn_kl_reference(
        ref_logits, ids.unsqueeze(0), logprobs.double().unsqueeze(0), divergence="forward_kl", tail="bucket",
        reduction="none",
    )
    torch.testing.assert_close(losses.double(), reference.detach(), rtol=1e-5, atol=1e-6)
    assert bool((losses > 0).all())
    upstream = torch.rand(losses.shape, dtype=torch.float64)
    (losses.double() * upstream).sum().backward()
    (reference * upstream).sum().backward()
    torch.testing.assert_close(logits.grad.double(), ref_logits.grad, rtol=1e-4, atol=1e-6)
    student_mass = torch.log_softmax(logits.detach().double(), -1)[0].gather(-1, ids).exp().sum(-1)
    torch.testing.assert_close(outputs["student_mass"][0].double(), student_mass, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(outputs["teacher_mass"][0].double(), logprobs.double().exp().sum(-1))

    # the registered loss reports the per-token losses over the responses
    prompts = _nested([torch.zeros(2, dtype=torch.long), torch.zeros(3, dtype=torch.long)])
    responses = _nested([torch.zeros(3, dtype=torch.long), torch.zeros(4, dtype=torch.long)])
    response_mask = torch.tensor([[1, 1, 1, 0], [1, 1, 1, 1]])
    batch = TensorDict({"prompts": prompts, "responses": responses, "response_mask": response_mask}, batch_size=[2])
    model_output = {key: value[0].detach() for key, value in outputs.items() if key != "overlap_count"}
    model_output.pop("overlap_token_advantage", None)
    per_token, metrics = get_distillation_loss_fn("tcod_fused_kl")(
        config=_Strategy(), distillation_config=distillation_config, model_output=model_output, data=batch
    )
    # response token t of a sequence is predicted at position (its offset - 1): the loss there
    flat = reference.detach()[0]
    expected = torch.zeros(2, 4, dtype=torch.float64)
    expected[0, :3] = flat[1:4]
    expected[1, :4] = flat[5 + 2 : 5 + 6]
    torch.testing.assert_close(per_token.double() * response_mask, expected, rtol=1e-5, atol=1e-6)
    assert "distillation/teacher_mass" in metrics


def test_fused_kl_receives_verls_packed_layout_as_cu_seqlens(monkeypatch):
    """verl packs its sequences end to end, their teacher tensors nested: the op receives the
    nested offsets as ``cu_seqlens``, and each sequence's losses equal those of the padded
    ``(B, T, V)`` call on the same sequences, bit for bit."""
    lengths = (5, 0, 7, 3)
    distillation_config = DistillationConfig(distillation_loss=DistillationLossConfig(loss_mode="tcod_fused_kl", topk=4))
    logits, ids, logprobs, nested_ids, nested_lp = _topk_case(seed=3, lengths=lengths)
    received = []
    real_op = tcod_verl.fused_topk_turn_kl

    def recording_op(*args, **kwargs):
        received.append(kwargs.get("cu_seqlens"))
        return real_op(*args, **kwargs)

    monkeypatch.setattr(tcod_verl, "fused_topk_turn_kl", recording_op)
    data = TensorDict({"teacher_logprobs": nested_lp, "teacher_ids": nested_ids}, batch_size=[len(lengths)])
    packed = compute_topk_loss(_Strategy(), distillation_config, data, logits, "thd")["distillation_losses"]
    assert received[-1].tolist() == [0, 5, 5, 12, 15] and received[-1].dtype == torch.int64

    longest = max(lengths)
    padded_logits = torch.zeros(len(lengths), longest, logits.shape[-1])
    padded_ids = torch.arange(ids.shape[-1]).expand(len(lengths), longest, -1).clone()  # padding: any distinct ids
    padded_lp = torch.zeros(len(lengths), longest, ids.shape[-1])
    for row, (start, length) in enumerate(zip(received[-1][:-1].tolist(), lengths)):
        padded_logits[row, :length] = logits.detach()[0, start:start + length]
        padded_ids[row, :length] = ids[start:start + length]
        padded_lp[row, :length] = logprobs[start:start + length]
    padded = tcod_verl.fused_topk_forward_kl(padded_logits, padded_lp, padded_ids)["distillation_losses"]
    assert received[-1] is None  # a padded batch: its rows are the sequences
    for row, (start, length) in enumerate(zip([0, 5, 5, 12], lengths)):
        assert torch.equal(packed.detach()[0, start:start + length], padded[row, :length])


def test_fused_kl_refuses_packed_bounds_that_miss_the_tokens():
    logits, ids, logprobs, _, _ = _topk_case(seed=4, lengths=(4, 6))
    with pytest.raises(ValueError, match=r"cu_seqlens\[-1\] must equal the number of tokens"):
        tcod_verl.fused_topk_forward_kl(logits, logprobs.unsqueeze(0), ids.unsqueeze(0), cu_seqlens=torch.tensor([0, 4, 9]))


def test_opd_advantage_through_verl():
    g = torch.Generator().manual_seed(1)
    rewards = torch.randn(3, 6, generator=g)
    mask = (torch.rand(3, 6, generator=g) > 0.3).float()
    advantages, returns = get_adv_estimator_fn("tcod_opd")(
        token_level_rewards=rewards, response_mask=mask, config=None, index=["a", "a", "b"]
    )
    torch.testing.assert_close(advantages.double(), rewards.double() * mask.double())
    torch.testing.assert_close(returns, advantages)


def _tdur_reference(student, teacher, mask):
    """T-DUR weights per token in float64, from ATOD eqs. 13-16, written out independently."""
    weights = torch.zeros_like(student)
    for row in range(student.shape[0]):
        runs, current = [], []
        for t in range(student.shape[1]):
            if mask[row, t]:
                current.append(t)
            elif current:
                runs.append(current)
                current = []
        if current:
            runs.append(current)
        d = [sum(abs(student[row, t] - teacher[row, t]) for t in run) / len(run) for run in runs]
        h = [sum(-student[row, t] for t in run) / len(run) for run in runs]

        def norm(values):
            lo, hi = min(values), max(values)
            return [0.5 if hi - lo < 1e-8 else (v - lo) / (hi - lo) for v in values]

        for run, dn, hn in zip(runs, norm(d), norm(h)):
            for t in run:
                weights[row, t] = 1 - (1 - dn) * (1 - hn)
    return weights


def _ppo_reference(old, new, advantages, mask, low=0.2, high=0.2, dual=3.0):
    ratio = torch.exp((new - old).clamp(-20, 20))
    clipped = torch.maximum(-advantages * ratio, -advantages * ratio.clamp(1 - low, 1 + high))
    losses = torch.where(advantages < 0, torch.minimum(-advantages * dual, clipped), clipped)
    return (losses * mask).sum() / mask.sum()


@pytest.mark.parametrize("name", ["tcod_opd", "tcod_opd_tdur"])
def test_opd_policy_losses_through_verl_match_float64(name):
    g = torch.Generator().manual_seed(2)
    old = -torch.rand(3, 10, generator=g, dtype=torch.float64) * 4
    new = old + torch.randn(3, 10, generator=g, dtype=torch.float64) * 0.3
    teacher = -torch.rand(3, 10, generator=g, dtype=torch.float64) * 4
    advantages = teacher - old  # the sampled-token OPD advantage: log q - log p
    mask = torch.ones(3, 10)
    mask[0, 3:5] = 0  # a tool result: two turns in row 0
    mask[1, 2:4] = 0
    mask[1, 7:8] = 0  # three turns in row 1
    mask[2, 8:] = 0  # one turn in row 2
    config = FSDPActorConfig(
        strategy="fsdp", ppo_mini_batch_size=1, ppo_micro_batch_size_per_gpu=1, rollout_n=1,
        policy_loss=PolicyLossConfig(loss_mode=name),
    )
    loss, metrics = get_policy_loss_fn(name)(
        old_log_prob=old.float(), log_prob=new.float().requires_grad_(True), advantages=advantages.float(),
        response_mask=mask, loss_agg_mode="token-mean", config=config,
    )
    weights = _tdur_reference(old, teacher, mask) if name == "tcod_opd_tdur" else mask.double()
    expected = _ppo_reference(old, new, advantages * weights, mask.double())
    assert math.isfinite(float(loss.detach()))
    torch.testing.assert_close(loss.double(), expected, rtol=1e-5, atol=1e-6)
    if name == "tcod_opd_tdur":
        assert weights[2, :8].eq(0.75).all()  # a single-turn trajectory gets 0.75
        torch.testing.assert_close(metrics["actor/tdur_weight_mean"], float(weights[mask.bool()].mean()))


def test_turn_ids_from_response_mask():
    mask = torch.tensor([[1, 1, 0, 1, 0, 0, 1]])
    assert tcod_verl.turn_ids_from_response_mask(mask).tolist() == [[0, 0, -1, 1, -1, -1, 2]]


def test_readme_snippet_runs(capsys):
    """README's "Use with verl" snippet, run as written, and its install line is the one CI runs."""
    from pathlib import Path

    from readme_snippets import section_blocks

    (snippet,) = section_blocks("Use with verl", "python")
    exec(compile(snippet, "README.md: Use with verl", "exec"), {})
    loss, weight = capsys.readouterr().out.split()
    assert math.isfinite(float(loss)) and 0.0 < float(weight) <= 1.0
    install = [block for block in section_blocks("Use with verl", "bash") if "venv" in block]
    assert install and install[0].strip() in (Path(__file__).resolve().parents[2] / ".ci" / "run").read_text()
