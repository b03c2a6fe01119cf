"""Every algorithm runs end to end on the toy env with tiny models; the loss is what it says."""

import math

import pytest
import torch
from float32_tolerances import gradient_tolerance, kl_tolerance
from trainer_helpers import tiny_config

from tcod_fast.algorithms import ALGORITHMS, get_algorithm
from tcod_fast.trainer import loop
from tcod_fast.trainer.config import check_config
from tcod_fast.trainer.loss import compute_loss, trained_token_count
from tcod_fast.trainer.metrics_log import read_metrics
from tcod_fast.trainer.setup import setup_run


@pytest.mark.parametrize("algorithm", ALGORITHMS)
def test_each_algorithm_trains_two_steps_and_logs_kl_by_turn(algorithm, tmp_path, toy_tokenizer):
    extra = [f"curriculum.algorithm={algorithm}"]
    if get_algorithm(algorithm).min_group_size > 1:
        extra.append(f"curriculum.episodes_per_task={get_algorithm(algorithm).min_group_size}")
    if algorithm == "guided_opd":
        extra.append("curriculum.guided.p_init=0.5")
    config = tiny_config(tmp_path / algorithm, *extra)
    run = loop.train(config, tokenizer=toy_tokenizer)

    records = read_metrics(tmp_path / algorithm / "metrics.jsonl", kind="train")
    assert [r["step"] for r in records] == [0, 1]
    for record in records:
        assert math.isfinite(record["loss"]), record
        assert record["algorithm"] == algorithm
        for key in ("kl/trajectory_mean", "kl/trajectory_std", "success", "turns/student_mean", "turns/teacher_mean", "tokens_per_s"):
            assert key in record, key
        # the escalation curve: one mean KL per turn index reached by some episode
        assert isinstance(record["kl_by_turn"], list) and record["kl_by_turn"], record
        assert all(math.isfinite(v) and v >= 0 for v in record["kl_by_turn"])
        assert record["trained_tokens"] > 0
    if algorithm != "grpo":
        # a random-init student and teacher disagree: the OPD term cannot be zero
        assert records[0]["loss/kl_term"] > 0
    if algorithm == "tcod_f2b":
        assert [r["curriculum/f2b_depth"] for r in records] == [1.0, 2.0]
        assert max(len(r["kl_by_turn"]) for r in records) <= 2  # trained only up to the depth
    if algorithm == "tcod_b2f":
        assert records[0]["turns/expert_mean"] > 0
    if algorithm == "atod":
        assert "curriculum/atod_kappa" in records[0]
    evals = read_metrics(tmp_path / algorithm / "metrics.jsonl", kind="eval")
    assert evals and {"success_seen", "success_unseen", "turns_seen", "turns_unseen"} <= set(evals[-1])
    assert (tmp_path / algorithm / "final" / "config.json").exists()
    assert run.state.next_step == 2


def _one_step_gradient(tmp_path, tokenizer, *extra):
    config = tiny_config(tmp_path, "trainer.steps=1", "eval.num_tasks=0", *extra)
    run = setup_run(config, tokenizer=tokenizer)
    batch = loop.rollout(run, 0)
    scores = loop.score(run, batch)
    advantages = loop.compute_advantages(run, batch, scores)
    captured = {}
    original_update = loop.update

    def capture(run_):
        captured["grads"] = {n: p.grad.clone() for n, p in run_.student.named_parameters() if p.grad is not None}
        return original_update(run_)

    loop.update = capture
    try:
        metrics = loop.train_on_batch(run, batch, advantages)
    finally:
        loop.update = original_update
    return metrics, captured["grads"]


def test_micro_batching_accumulates_the_same_gradient(tmp_path, toy_tokenizer):
    """One big micro-batch vs one episode per micro-batch: same token-mean loss and gradient."""
    whole, grads_whole = _one_step_gradient(tmp_path / "a", toy_tokenizer, "trainer.micro_batch_tokens=100000", "rollout.tasks_per_step=3")
    split, grads_split = _one_step_gradient(tmp_path / "b", toy_tokenizer, "trainer.micro_batch_tokens=1", "rollout.tasks_per_step=3")
    assert whole["trained_tokens"] == split["trained_tokens"]
    tokens, vocab_size = int(whole["trained_tokens"]), len(toy_tokenizer)
    assert split["loss"] == pytest.approx(whole["loss"], **kl_tolerance(vocab_size, tokens))
    for name, grad in grads_whole.items():
        torch.testing.assert_close(grads_split[name], grad, **gradient_tolerance(tokens + vocab_size, float(grad.abs().max())))


def test_fused_linear_path_matches_logits_path(tmp_path, toy_tokenizer):
    pytest.importorskip("tcod_fast.ops.fused_linear_turn_kl")
    linear, grads_linear = _one_step_gradient(tmp_path / "a", toy_tokenizer, "loss.fused_linear=always")
    logits, grads_logits = _one_step_gradient(tmp_path / "b", toy_tokenizer, "loss.fused_linear=never")
    tokens, vocab_size = int(logits["trained_tokens"]), len(toy_tokenizer)
    assert linear["loss"] == pytest.approx(logits["loss"], **kl_tolerance(vocab_size, tokens))
    for name, grad in grads_logits.items():
        torch.testing.assert_close(grads_linear[name], grad, **gradient_tolerance(tokens + vocab_size, float(grad.abs().max())))


def test_full_vocab_loss_equals_materialised_reverse_kl(tmp_path, toy_tokenizer):
    """The trainer's loss is the token mean of exact reverse KL(student || teacher) over the
    student's tokens, recomputed here with plain log-softmax."""
    from tcod_fast.curriculum import turn_windows_tensor
    from tcod_fast.rollout import PackingConfig, apply_turn_windows, pack_trajectories

    config = tiny_config(tmp_path, "trainer.steps=1", "eval.num_tasks=0", "loss.fused_linear=never")
    run = setup_run(config, tokenizer=toy_tokenizer)
    batch = loop.rollout(run, 0)
    advantages = loop.compute_advantages(run, batch, loop.score(run, batch))
    trained = [i for i, (t, p) in enumerate(zip(batch.trajectories, batch.plans)) if trained_token_count(t, p)]
    trajectories = [batch.trajectories[i] for i in trained]
    plans = [batch.plans[i] for i in trained]
    count = sum(trained_token_count(t, p) for t, p in zip(trajectories, plans))
    out = compute_loss(run, trajectories, plans, advantages.sequence[trained], advantages.coefficients, float(count), with_grad=False)

    packed = pack_trajectories(trajectories, PackingConfig(mode="append", pad_token_id=toy_tokenizer.pad_token_id))
    turn_ids = apply_turn_windows(packed, turn_windows_tensor(plans))
    with torch.no_grad():
        logp = torch.log_softmax(run.student(**packed.model_inputs()).logits.double(), -1)
        logq = torch.log_softmax(run.teacher(**packed.model_inputs()).logits.double(), -1)
    kl = (logp.exp() * (logp - logq)).sum(-1)
    expected = kl[turn_ids >= 0].sum() / count
    assert float(out.loss) == pytest.approx(float(expected), **kl_tolerance(len(toy_tokenizer), count))
    assert int((turn_ids >= 0).sum()) == count


def test_sampled_estimator_runs_with_k1_and_k3(tmp_path, toy_tokenizer):
    for estimator in ("k1", "k3"):
        config = tiny_config(tmp_path / estimator, "loss.estimator=sampled", f"loss.sampled_kl={estimator}", "trainer.steps=1", "eval.num_tasks=0", "trainer.updates_per_step=2")
        loop.train(config, tokenizer=toy_tokenizer)
        record = read_metrics(tmp_path / estimator / "metrics.jsonl", kind="train")[0]
        assert math.isfinite(record["loss"]) and record["loss/kl_term"] == 0.0
        assert "ppo/clip_fraction" in record and record["kl_by_turn"]


@pytest.mark.parametrize("algorithm", ["tcod_b2f", "sod"])
def test_window_packing_mode_trains(algorithm, tmp_path, toy_tokenizer):
    """Windowed-history prompts: one row per student turn, weights still per episode."""
    extra = [f"curriculum.algorithm={algorithm}", "env.context_mode=window", "trainer.steps=1", "trainer.micro_batch_tokens=600"]
    if algorithm == "sod":
        extra.append("curriculum.episodes_per_task=2")
    loop.train(tiny_config(tmp_path, *extra), tokenizer=toy_tokenizer)
    record = read_metrics(tmp_path / "metrics.jsonl", kind="train")[0]
    assert math.isfinite(record["loss"]) and record["kl_by_turn"] and record["trained_tokens"] > 0


def test_interim_evaluations_use_fewer_tasks_and_the_final_one_all(tmp_path, toy_tokenizer):
    config = tiny_config(
        tmp_path, "trainer.steps=2", "trainer.eval_every=1", "eval.num_tasks=4", "eval.interim_num_tasks=2", "eval.at_start=true"
    )
    run = loop.train(config, tokenizer=toy_tokenizer)
    evals = [r for r in run.state.history if r["kind"] == "eval"]
    assert [(r["step"], r["tasks_seen"], r["tasks_unseen"]) for r in evals] == [(0, 2, 2), (1, 2, 2), (2, 4, 4)]
    with pytest.raises(ValueError, match=r"eval.interim_num_tasks must be in \[0, eval.num_tasks=4\]"):
        check_config(tiny_config(tmp_path / "bad", "eval.num_tasks=4", "eval.interim_num_tasks=5"))


PACKING_CASES = {
    "opd-fused-linear": ("loss.fused_linear=always",),
    "opd-logits-window": ("loss.fused_linear=never", "env.context_mode=window"),
    "sampled-k3-two-updates": ("loss.estimator=sampled", "loss.sampled_kl=k3", "trainer.updates_per_step=2"),
    "topk-jsd": ("loss.estimator=topk", "loss.divergence=jsd"),
    "atod-tdur": ("curriculum.algorithm=atod", "curriculum.episodes_per_task=2"),
    "sod-window": ("curriculum.algorithm=sod", "curriculum.episodes_per_task=2", "env.context_mode=window"),
}


@pytest.mark.parametrize("case", list(PACKING_CASES), ids=list(PACKING_CASES))
def test_padding_free_micro_batches_train_as_padded_ones(tmp_path, toy_tokenizer, case):
    """The same step with every sequence end to end in one row (``cu_seqlens``) and with
    padded rows: the same trained tokens, loss, KL by turn and gradient, up to the float32
    rounding of the models' differently shaped forwards."""
    extra = (*PACKING_CASES[case], "rollout.tasks_per_step=3")
    padded, grads_padded = _one_step_gradient(tmp_path / "padded", toy_tokenizer, "loss.packing=padded", *extra)
    packed, grads_packed = _one_step_gradient(tmp_path / "packed", toy_tokenizer, "loss.packing=padding_free", *extra)
    tokens, vocab_size = int(padded["trained_tokens"]), len(toy_tokenizer)
    assert packed["trained_tokens"] == tokens > 0
    assert packed["loss"] == pytest.approx(padded["loss"], **kl_tolerance(vocab_size, tokens))
    assert packed["kl_by_turn"] == pytest.approx(padded["kl_by_turn"], **kl_tolerance(vocab_size, tokens))
    for name, grad in grads_padded.items():
        torch.testing.assert_close(grads_packed[name], grad, **gradient_tolerance(tokens + vocab_size, float(grad.abs().max())))


def test_padding_free_micro_batches_hold_tokens_not_padded_rows(toy_tokenizer, tmp_path):
    from types import SimpleNamespace

    from tcod_fast.trainer.loss import micro_batches

    episodes = [SimpleNamespace(token_ids=[0] * length) for length in (10, 2, 2, 2)]
    assert micro_batches(episodes, range(4), "append", 15) == [[0], [1, 2, 3]]  # padded: 2 rows x 10 > 15
    assert micro_batches(episodes, range(4), "append", 15, padding_free=True) == [[0, 1, 2], [3]]  # 16 tokens > 15


def test_padding_free_is_refused_for_a_model_whose_attention_could_mix_sequences():
    from types import SimpleNamespace

    from tcod_fast.errors import UserError
    from tcod_fast.trainer.build import padding_free

    model = SimpleNamespace(config=SimpleNamespace(_attn_implementation="paged|custom"))
    assert padding_free("auto", model) is False and padding_free("padded", model) is False
    with pytest.raises(UserError, match="loss.packing='padding_free' needs models whose attention keeps packed sequences apart"):
        padding_free("padding_free", model)


def test_auto_packing_is_padding_free_where_packed_attention_costs_per_sequence():
    from tcod_fast.tiny_models import TinyModelConfig, build_tiny_causal_lm
    from tcod_fast.trainer.build import padding_free

    model = build_tiny_causal_lm(TinyModelConfig(vocab_size=50, hidden_size=32, intermediate_size=64))
    model.set_attn_implementation("sdpa")  # keeps sequences apart, through a dense mask over the row
    assert padding_free("auto", model) is False and padding_free("padding_free", model) is True
    model.set_attn_implementation("flex_attention")
    assert padding_free("auto", model, None) is True
