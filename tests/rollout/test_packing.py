"""Packing trajectories into loss tensors: alignment, modes, layouts, masks."""

import dataclasses

import pytest
import torch

from tcod_fast.rollout.packing import (
    PackingConfig,
    apply_turn_windows,
    block_causal_mask,
    pack_trajectories,
    sum_by_trajectory_turn,
    trained_tokens_by_turn,
    trajectory_sequences,
)
from tcod_fast.rollout.trajectory import Trajectory, TurnRecord
from tcod_fast.tiny_models import TinyModelConfig, build_char_tokenizer, build_tiny_causal_lm


def make_trajectory(turns, first_prompt, context_mode="append"):
    """Build a trajectory by hand from ``[(player, response_ids, obs_ids, window_prompt_ids)]``."""
    token_ids = list(first_prompt)
    turn_ids = [-1] * len(first_prompt)
    records = []
    for k, (player, response, observation, window_prompt) in enumerate(turns):
        start = len(token_ids)
        token_ids += response
        turn_ids += [k if player == "student" else -1] * len(response)
        token_ids += observation
        turn_ids += [-1] * len(observation)
        records.append(
            TurnRecord(
                turn_index=k,
                player=player,
                response_token_ids=list(response),
                response_text="",
                action="a",
                format_error=None,
                observation="",
                reward=0.0,
                done=False,
                won=False,
                finish_reason="eos",
                response_start=start,
                window_prompt_token_ids=list(window_prompt),
            )
        )
    traj = Trajectory(
        task="t",
        task_text="",
        token_ids=token_ids,
        turn_ids=turn_ids,
        turns=records,
        context_mode=context_mode,
    )
    traj.validate()
    return traj


@pytest.fixture
def two_trajectories():
    # Token values are arbitrary ids; 50+ marks responses so mistakes are visible.
    first = make_trajectory(
        [
            ("student", [51, 52], [7, 8], [1, 2, 3]),
            ("teacher", [61], [9], [1, 2, 4, 4]),
            ("student", [53, 54, 55], [], [1, 5]),
        ],
        first_prompt=[1, 2, 3],
    )
    second = make_trajectory(
        [("expert", [71, 72], [6], [2, 2]), ("student", [56], [6, 6], [2, 3, 3])],
        first_prompt=[2, 2],
    )
    return [first, second]


def test_append_padded_alignment_is_exact(two_trajectories):
    batch = pack_trajectories(
        two_trajectories, PackingConfig(mode="append", layout="padded", pad_token_id=0)
    )
    first = two_trajectories[0]
    length = len(first.token_ids)
    assert batch.input_ids.shape == (2, length)
    assert batch.input_ids[0].tolist() == first.token_ids
    assert batch.turn_ids[0].tolist() == first.turn_ids
    # logits[t] predicts token t+1: targets and their turn ids are shifted by one.
    assert batch.target_ids[0, : length - 1].tolist() == first.token_ids[1:]
    assert batch.target_turn_ids[0, : length - 1].tolist() == first.turn_ids[1:]
    assert batch.target_turn_ids[0, length - 1] == -1
    second_len = len(two_trajectories[1].token_ids)
    assert batch.attention_mask[1].tolist() == [1] * second_len + [0] * (length - second_len)
    assert (batch.target_turn_ids[1, second_len - 1 :] == -1).all()
    assert (batch.input_ids[1, second_len:] == 0).all()
    assert batch.position_ids[0].tolist() == list(range(length))
    # Trained targets: exactly the student responses with their turn ids.
    assert trained_tokens_by_turn(batch) == {(0, 0): [51, 52], (0, 2): [53, 54, 55], (1, 1): [56]}


def test_window_rows_train_the_same_tokens_as_append(two_trajectories):
    append = pack_trajectories(two_trajectories, PackingConfig(mode="append"))
    window = pack_trajectories(two_trajectories, PackingConfig(mode="window"))
    # One row per student turn; teacher/expert turns are dropped (nothing to train).
    assert window.input_ids.shape[0] == 3
    assert window.sequence_turn_index.tolist() == [0, 2, 1]
    assert window.input_ids[0, :5].tolist() == [1, 2, 3, 51, 52]
    assert trained_tokens_by_turn(window) == trained_tokens_by_turn(append)
    assert window.num_trained_tokens == append.num_trained_tokens == 6
    with_untrained = pack_trajectories(
        two_trajectories, PackingConfig(mode="window", include_untrained_rows=True)
    )
    assert with_untrained.input_ids.shape[0] == 5
    assert trained_tokens_by_turn(with_untrained) == trained_tokens_by_turn(append)


def test_packed_layout_never_crosses_sequence_boundaries(two_trajectories):
    packed = pack_trajectories(
        two_trajectories, PackingConfig(mode="window", layout="packed", max_row_tokens=10)
    )
    assert packed.attention_mask is None
    # Sequences of 5, 5 and 4 tokens: first-fit fills row 0 with the first two (10).
    assert packed.input_ids.shape == (2, 10)
    assert packed.sequence_ids[0].tolist() == [0] * 5 + [1] * 5
    assert packed.sequence_ids[1].tolist() == [2] * 4 + [-1] * 6
    assert packed.position_ids[0].tolist() == list(range(5)) + list(range(5))
    # The last token of sequence 0 must not "predict" the first of sequence 1.
    assert packed.target_turn_ids[0, 4] == -1 and packed.target_ids[0, 4] == 0
    padded = pack_trajectories(two_trajectories, PackingConfig(mode="window"))
    assert trained_tokens_by_turn(packed) == trained_tokens_by_turn(padded)
    with pytest.raises(ValueError, match="max_row_tokens"):
        pack_trajectories(
            two_trajectories, PackingConfig(mode="window", layout="packed", max_row_tokens=4)
        )


def test_packed_and_padded_forward_give_the_same_logits(two_trajectories):
    """Restarting position ids must isolate packed sequences inside a real HF model."""
    tokenizer = build_char_tokenizer()
    model = build_tiny_causal_lm(
        TinyModelConfig(hidden_size=32, intermediate_size=64, seed=1), tokenizer
    )
    padded = pack_trajectories(two_trajectories, PackingConfig(mode="append", layout="padded"))
    packed = pack_trajectories(
        two_trajectories, PackingConfig(mode="append", layout="packed", max_row_tokens=64)
    )
    assert packed.input_ids.shape[0] == 1
    with torch.no_grad():
        padded_logits = model(**padded.model_inputs()).logits
        packed_logits = model(**packed.model_inputs()).logits
        explicit = model(
            input_ids=packed.input_ids,
            position_ids=packed.position_ids,
            attention_mask=block_causal_mask(packed),
            use_cache=False,
        ).logits
    for seq_index in range(2):
        padded_rows = padded_logits[padded.sequence_ids == seq_index]
        packed_rows = packed_logits[packed.sequence_ids == seq_index]
        explicit_rows = explicit[packed.sequence_ids == seq_index]
        torch.testing.assert_close(packed_rows, padded_rows, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(explicit_rows, padded_rows, atol=1e-5, rtol=1e-5)
    # Sanity: without the restart the second sequence would see the first one.
    with torch.no_grad():
        leaky = model(input_ids=packed.input_ids, use_cache=False).logits
    assert not torch.allclose(
        leaky[packed.sequence_ids == 1], padded_logits[padded.sequence_ids == 1], atol=1e-4
    )


def _attention_cases():
    """(device, attention) pairs: every CPU implementation, and on a CUDA machine the GPU ones too
    (FlashAttention 2 where ``flash_attn`` is installed). The CUDA cases are skipped elsewhere."""
    import importlib.util

    no_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU; this machine has none")
    no_flash = pytest.mark.skipif(
        importlib.util.find_spec("flash_attn") is None, reason="needs the flash_attn package (FlashAttention 2 kernels)"
    )
    cases = [pytest.param("cpu", attention, id=f"cpu-{attention}") for attention in ("eager", "sdpa", "flex_attention")]
    cases += [pytest.param("cuda", attention, id=f"cuda-{attention}", marks=no_cuda) for attention in ("eager", "sdpa", "flex_attention")]
    cases.append(pytest.param("cuda", "flash_attention_2", id="cuda-flash_attention_2", marks=[no_cuda, no_flash]))
    return cases


@pytest.mark.parametrize("architecture", ["llama", "qwen2"])
@pytest.mark.parametrize("device,attention", _attention_cases())
def test_no_token_attends_across_a_sequence_boundary_of_a_packed_row(architecture, device, attention):
    """With ``attention_mask=None`` and restarting ``position_ids``, every attention
    implementation of transformers keeps packed sequences apart, on CPU and on a CUDA GPU: a
    sequence's logits are those it has alone, and rewriting the tokens before it changes none
    of them. (FlashAttention 2 runs in bfloat16, so its packed logits are compared to the
    sequence alone within bfloat16 rounding; the rewrite check stays exact.)"""
    model = build_tiny_causal_lm(
        TinyModelConfig(architecture=architecture, vocab_size=50, hidden_size=32, intermediate_size=64, seed=1)
    )
    dtype = torch.bfloat16 if attention == "flash_attention_2" else torch.float32
    model = model.to(device=device, dtype=dtype)
    model.set_attn_implementation(attention)
    generator = torch.Generator().manual_seed(0)
    first, second = torch.randint(0, 50, (1, 7), generator=generator), torch.randint(0, 50, (1, 5), generator=generator)
    position_ids = torch.cat([torch.arange(7), torch.arange(5)]).unsqueeze(0)
    rewritten = torch.cat([torch.randint(0, 50, (1, 7), generator=generator), second], 1)
    first, second, position_ids, rewritten = (t.to(device) for t in (first, second, position_ids, rewritten))
    with torch.no_grad():
        packed = model(input_ids=torch.cat([first, second], 1), position_ids=position_ids, use_cache=False).logits
        alone = model(input_ids=second, use_cache=False).logits
        after_rewrite = model(input_ids=rewritten, position_ids=position_ids, use_cache=False).logits
    tolerance = 2e-2 if dtype == torch.bfloat16 else 1e-6 if device == "cpu" else 1e-5
    torch.testing.assert_close(packed[:, 7:].float(), alone.float(), atol=tolerance, rtol=tolerance)
    assert torch.equal(after_rewrite[:, 7:], packed[:, 7:])
    assert not torch.equal(after_rewrite[:, :7], packed[:, :7])


def test_apply_turn_windows_masks_per_trajectory(two_trajectories):
    for layout in ("padded", "packed"):
        batch = pack_trajectories(
            two_trajectories, PackingConfig(mode="append", layout=layout, max_row_tokens=64)
        )
        windowed = apply_turn_windows(batch, torch.tensor([[1, 3], [0, 1]]))
        kept = sorted(set(windowed[windowed >= 0].tolist()))
        # Trajectory 0 keeps turn 2 only ([1, 3) excludes turn 0); trajectory 1 keeps
        # nothing (its student turn 1 is outside [0, 1)).
        assert kept == [2], layout
        assert int((windowed >= 0).sum()) == 3
    with pytest.raises(ValueError, match="turn_windows"):
        apply_turn_windows(batch, torch.tensor([[0, 1]]))


def test_mixed_context_modes_need_an_explicit_mode(two_trajectories):
    two_trajectories[1].context_mode = "window"
    with pytest.raises(ValueError, match="mix context modes"):
        pack_trajectories(two_trajectories)
    assert len(trajectory_sequences(two_trajectories, "append")) == 2


def test_validate_catches_mislabelled_turn_ids(two_trajectories):
    traj = two_trajectories[0]
    traj.turn_ids[traj.turns[1].response_start] = 1  # a teacher token marked trained
    with pytest.raises(ValueError, match="turn_ids"):
        traj.validate()


def test_trained_players_switch_to_supervised_labels(two_trajectories):
    """SFT on demonstrations: expert/teacher replies become the trained tokens, in both modes."""
    players = ("expert", "teacher")
    append = pack_trajectories(
        two_trajectories, PackingConfig(mode="append", trained_players=players)
    )
    window = pack_trajectories(
        two_trajectories, PackingConfig(mode="window", trained_players=players)
    )
    assert trained_tokens_by_turn(append) == {(0, 1): [61], (1, 0): [71, 72]}
    assert trained_tokens_by_turn(window) == trained_tokens_by_turn(append)
    assert two_trajectories[0].turn_ids_for(("student",)) == two_trajectories[0].turn_ids


def test_layouts_give_the_same_turn_kl_through_the_kernel(two_trajectories):
    """End to end into fused_turn_kl: padded and packed batches give the same per-turn KL."""
    from tcod_fast import fused_turn_kl

    tokenizer = build_char_tokenizer()
    config = TinyModelConfig(hidden_size=32, intermediate_size=64)
    student = build_tiny_causal_lm(dataclasses.replace(config, seed=1), tokenizer)
    teacher = build_tiny_causal_lm(dataclasses.replace(config, seed=2), tokenizer)
    per_turn = {}
    for layout in ("padded", "packed"):
        batch = pack_trajectories(
            two_trajectories, PackingConfig(mode="append", layout=layout, max_row_tokens=64)
        )
        with torch.no_grad():
            student_logits = student(**batch.model_inputs()).logits
            teacher_logits = teacher(**batch.model_inputs()).logits
        token_kl = fused_turn_kl(
            student_logits,
            teacher_logits,
            batch.target_turn_ids,
            target_ids=batch.target_ids,
            reduction="none",
            backend="torch",
        )
        assert (token_kl[batch.target_turn_ids < 0] == 0).all()
        assert (token_kl[batch.target_turn_ids >= 0] > 0).all()
        per_turn[layout] = sum_by_trajectory_turn(token_kl, batch, num_turns=3)
    sums, counts = per_turn["padded"]
    assert counts.tolist() == [[2, 0, 3], [0, 1, 0]]
    torch.testing.assert_close(per_turn["packed"][0], sums, atol=1e-5, rtol=1e-5)
    assert torch.equal(per_turn["packed"][1], counts)
