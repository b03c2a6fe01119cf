"""Supervised fine-tuning on expert-labelled turns: expert episodes, DAgger episodes with
current-state labels, and a fit that makes a tiny model play the expert's action."""

import pytest
import torch

from tcod_fast.demo import DemoSettings, base_config
from tcod_fast.envs.toy import KeyDoorConfig, KeyDoorEnv
from tcod_fast.rollout import HFGenerator
from tcod_fast.tiny_models import TinyModelConfig
from tcod_fast.trainer import build, sft

MAX_TURNS = 12


@pytest.fixture(scope="module")
def game(tmp_path_factory):
    settings = DemoSettings(train_tasks=16, eval_tasks=2)
    config = base_config(settings, tmp_path_factory.mktemp("sft"))
    prompter = build.build_prompter(config.env)
    tokenizer = build.build_tokenizer(config, prompter)
    splits = build.env_task_splits(config.env)
    return config, prompter, tokenizer, splits["train"]


def tiny_model(tokenizer, seed=0):
    return build.build_model(None, TinyModelConfig(hidden_size=48, intermediate_size=96, num_hidden_layers=1, seed=seed), tokenizer)


def toy_env(config):
    return KeyDoorEnv(KeyDoorConfig(**config.env.kwargs))


def test_expert_pairs_are_window_prompts_and_action_replies(game):
    config, prompter, tokenizer, tasks = game
    envs = build.build_envs(config.env, 4)
    demos = sft.expert_trajectories(tasks[:4], envs, tokenizer=tokenizer, prompter=prompter, context_mode="window", max_turns=MAX_TURNS)
    pairs = sft.labelled_turns(demos, tokenizer=tokenizer, prompter=prompter)
    assert len(pairs) == sum(len(d.turns) for d in demos)
    env = toy_env(config)
    turns = [turn for demo in demos for turn in demo.turns]
    actions = []
    for task in tasks[:4]:
        env.reset(task)
        actions += env.expert_actions()
    assert len(turns) == len(actions)
    for (prompt, reply), turn, action in zip(pairs, turns, actions):
        assert prompt == turn.window_prompt_token_ids
        assert tokenizer.decode(reply).startswith(f"<action>{action}</action>")


def test_dagger_turns_carry_the_current_state_expert_label(game):
    config, prompter, tokenizer, tasks = game
    policy = HFGenerator(tiny_model(tokenizer), tokenizer)  # random init: plays badly, off the expert's path
    envs = build.build_envs(config.env, 6)
    episodes = sft.dagger_trajectories(
        tasks[:6], envs, policy, tokenizer=tokenizer, prompter=prompter, max_turns=MAX_TURNS, noise=0.5,
        temperature=1.0, max_new_tokens=8, seed=3,
    )  # fmt: skip
    players = {t.player for e in episodes for t in e.turns}
    assert players == {"random", "teacher"}
    env = toy_env(config)
    off_path = 0
    for task, episode in zip(tasks[:6], episodes):
        env.reset(task)
        expert_path = env.expert_actions()
        for turn in episode.turns:
            assert turn.expert_label == env.expert_action()
            off_path += turn.turn_index >= len(expert_path) or turn.expert_label != expert_path[turn.turn_index]
            if turn.action is not None and env.step(turn.action).done:  # a wasted turn is not stepped
                break
    assert off_path > 0
    pairs = sft.labelled_turns(episodes, tokenizer=tokenizer, prompter=prompter)
    assert len(pairs) == sum(len(e.turns) for e in episodes)


def test_supervised_finetune_fits_the_expert(game):
    config, prompter, tokenizer, tasks = game
    envs = build.build_envs(config.env, 8)
    demos = sft.expert_trajectories(tasks[:8], envs, tokenizer=tokenizer, prompter=prompter, context_mode="window", max_turns=MAX_TURNS)
    pairs = sft.labelled_turns(demos, tokenizer=tokenizer, prompter=prompter)
    torch.manual_seed(0)
    model = tiny_model(tokenizer, seed=4)
    losses = sft.supervised_finetune(model, pairs, pad_token_id=tokenizer.pad_token_id, epochs=12, lr=3e-3, batch_size=8, seed=0)
    assert losses[-1] < 0.1 * losses[0]
    # the fitted model replies with the expert's action on the prompts it was fitted to
    model.eval()
    generator = HFGenerator(model, tokenizer)
    from tcod_fast.rollout import SamplingParams

    params = SamplingParams(temperature=0.0, max_new_tokens=12, stop_strings=("</action>",))
    outputs = generator.generate([p for p, _ in pairs], params)
    assert all(o.text.startswith("<action>") and o.text.endswith("</action>") for o in outputs)
    correct = sum(tokenizer.decode(r).startswith(o.text) for o, (_, r) in zip(outputs, pairs))
    # a one-layer model of 48 dimensions after 12 epochs: most actions, not every colour
    assert correct >= 0.5 * len(pairs), (correct, len(pairs))
    with pytest.raises(ValueError, match="at least one"):
        sft.supervised_finetune(model, [], pad_token_id=0, epochs=1)


def test_sft_loss_is_the_token_mean_cross_entropy_of_the_replies(game):
    """One full batch at lr 0: the reported loss is the cross-entropy of each reply token given
    everything before it, averaged over the reply tokens of all pairs (prompt tokens and
    padding excluded), here recomputed in float64 one unpadded pair at a time."""
    config, prompter, tokenizer, tasks = game
    envs = build.build_envs(config.env, 3)
    demos = sft.expert_trajectories(tasks[:3], envs, tokenizer=tokenizer, prompter=prompter, context_mode="window", max_turns=MAX_TURNS)
    pairs = sft.labelled_turns(demos, tokenizer=tokenizer, prompter=prompter)
    assert len({len(p) + len(r) for p, r in pairs}) > 1  # ragged: the batch is padded
    model = tiny_model(tokenizer, seed=5)
    nll, count = 0.0, 0
    with torch.no_grad():
        for prompt, reply in pairs:
            logits = model(input_ids=torch.tensor([prompt + reply])).logits[0].double()
            logp = torch.log_softmax(logits, -1)
            for j, token in enumerate(reply):
                nll -= float(logp[len(prompt) - 1 + j, token])
                count += 1
    (loss,) = sft.supervised_finetune(model, pairs, pad_token_id=tokenizer.pad_token_id, epochs=1, lr=0.0, batch_size=len(pairs))
    assert loss == pytest.approx(nll / count, rel=1e-5)
