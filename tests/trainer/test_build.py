"""Building a run's parts from its config (``tcod_fast.trainer.build``) on the toy environment:
task splits, the prompter's options, environment slots, the in-code tokenizer and its coverage,
and tiny or local-folder models."""

import pytest
import torch
from trainer_helpers import tiny_config

from tcod_fast.errors import UserError
from tcod_fast.rollout import expert_episode_texts
from tcod_fast.tiny_models import TinyModelConfig, build_word_tokenizer
from tcod_fast.trainer import build

SPEC = TinyModelConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1, seed=3)


def test_torch_dtype_names_and_error():
    assert build.torch_dtype("float32") is torch.float32
    assert build.torch_dtype("bfloat16") is torch.bfloat16
    assert build.torch_dtype("float16") is torch.float16
    with pytest.raises(ValueError, match=r"dtype must be one of \['bfloat16', 'float16', 'float32'\], got 'fp8'"):
        build.torch_dtype("fp8")


def test_task_splits_cap_train_and_name_an_empty_split(tmp_path):
    config = tiny_config(tmp_path)  # env.num_train_tasks=8
    env = build.make_one_env(config.env)
    splits = build.env_task_splits(config.env, env)
    assert set(splits) == {"train", "seen", "unseen"}
    assert splits["train"] == list(env.list_tasks("train"))[:8]
    assert splits["seen"] == list(env.list_tasks(config.env.seen_split))
    assert splits["unseen"] == list(env.list_tasks(config.env.unseen_split))
    assert splits["seen"] and splits["unseen"]
    config.env.num_train_tasks = 0
    with pytest.raises(ValueError, match=r"env 'toy' has no tasks in split 'train'"):
        build.env_task_splits(config.env, env)


def test_prompter_takes_the_env_settings(tmp_path):
    config = tiny_config(tmp_path, "env.history_length=5", "env.think=true", "env.max_admissible_actions=3")
    prompt = build.build_prompter(config.env).prompt_config
    assert (prompt.history_length, prompt.think, prompt.max_admissible_actions) == (5, True, 3)
    assert prompt.show_admissible_actions == config.env.show_admissible_actions


def test_env_slots_are_independent_environments(tmp_path):
    config = tiny_config(tmp_path)
    driver = build.build_envs(config.env, 3)
    assert driver.num_slots == 3 and len({id(env) for env in driver.envs}) == 3
    tasks = build.env_task_splits(config.env)["train"][:3]
    firsts = driver.reset_many(tasks)
    assert [first.task_text for first in firsts] == [env.reset(task).task_text for env, task in zip(driver.envs, tasks)]


def test_tokenizer_covers_every_expert_episode_text(tmp_path):
    config = tiny_config(tmp_path)
    prompter = build.build_prompter(config.env)
    tokenizer = build.build_tokenizer(config, prompter, max_tasks_per_split=3)
    env = build.make_one_env(config.env)
    texts = []
    for tasks in build.env_task_splits(config.env, env).values():
        texts += expert_episode_texts(env, tasks[:3], prompter)
    assert len(texts) > 20
    for text in texts:
        ids = tokenizer.encode(text, add_special_tokens=False)
        assert tokenizer.unk_token_id not in ids, text
        assert tokenizer.decode(ids) == text

    tokenizer.save_pretrained(tmp_path / "tokenizer")
    loaded = build.load_tokenizer(tmp_path / "tokenizer")
    assert loaded.get_vocab() == tokenizer.get_vocab()
    assert loaded.encode(texts[-1], add_special_tokens=False) == tokenizer.encode(texts[-1], add_special_tokens=False)


def test_tiny_model_follows_its_spec_and_seed(toy_tokenizer):
    model = build.build_model(None, SPEC, toy_tokenizer)
    assert model.config.vocab_size >= len(toy_tokenizer)
    assert model.config.hidden_size == 32 and model.config.num_hidden_layers == 1
    again = build.build_model(None, SPEC, toy_tokenizer)
    other_seed = build.build_model(None, TinyModelConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1, seed=4),
                                   toy_tokenizer)
    for (name, a), b, c in zip(model.state_dict().items(), again.state_dict().values(), other_seed.state_dict().values()):
        assert torch.equal(a, b), name
    assert not all(torch.equal(a, c) for a, c in zip(model.state_dict().values(), other_seed.state_dict().values()))
    half = build.build_model(None, SPEC, toy_tokenizer, dtype=torch.bfloat16)
    assert {p.dtype for p in half.parameters()} == {torch.bfloat16}


def test_model_from_a_local_folder_and_a_tokenizer_too_large_for_it(tmp_path, toy_tokenizer):
    model = build.build_model(None, SPEC, toy_tokenizer)
    model.save_pretrained(tmp_path / "student")
    loaded = build.build_model(str(tmp_path / "student"), SPEC, toy_tokenizer)
    for (name, a), b in zip(model.state_dict().items(), loaded.state_dict().values()):
        assert torch.equal(a, b), name

    words = [f" word{i}" for i in range(model.config.vocab_size + 10)]
    larger = build_word_tokenizer(["a b c"], extra_words=words)
    assert len(larger) > model.config.vocab_size
    with pytest.raises(UserError, match=rf"the model at .*student must cover the run's tokenizer \({len(larger)} tokens.*"
                                        rf"got vocab_size {model.config.vocab_size}:"):
        build.build_model(str(tmp_path / "student"), SPEC, larger)
