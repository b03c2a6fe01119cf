"""Tiny in-code tokenizers and random-init causal LMs (no downloads)."""

import pytest
import torch

from tcod_fast.tiny_models import (
    SpecialTokens,
    TinyModelConfig,
    build_char_tokenizer,
    build_tiny_causal_lm,
    build_word_tokenizer,
)

TEXTS = [
    "You are in the kitchen. There is a drawer here (closed). Exits: hall, study.",
    "<think>the key is in the drawer</think><action>open drawer</action>",
    "go to hall\ntake red key",
]


def test_word_tokenizer_round_trips_and_keeps_tags_whole():
    tokenizer = build_word_tokenizer(TEXTS)
    text = (
        "<|im_start|>user\nYou are in the kitchen.<|im_end|>\n<|im_start|>assistant\n"
        "<think>the key</think><action>open drawer</action><|im_end|>"
    )
    ids = tokenizer(text, add_special_tokens=False).input_ids
    assert tokenizer.decode(ids, skip_special_tokens=False) == text
    assert tokenizer.unk_token_id not in ids
    tokens = tokenizer.convert_ids_to_tokens(ids)
    for tag in ("<think>", "</think>", "<action>", "</action>", "<|im_start|>", "<|im_end|>"):
        assert tag in tokens, f"{tag} should be one token, got {tokens}"
    assert tokenizer.pad_token_id == 0
    assert tokenizer.eos_token == SpecialTokens().eos
    # Concatenating segment encodings equals encoding the joined text at word
    # boundaries, which the rollout relies on.
    first, second = "You are in the", " kitchen. Exits: hall"
    assert tokenizer(first + second, add_special_tokens=False).input_ids == (
        tokenizer(first, add_special_tokens=False).input_ids
        + tokenizer(second, add_special_tokens=False).input_ids
    )


def test_word_tokenizer_unknown_words_become_unk():
    tokenizer = build_word_tokenizer(TEXTS)
    ids = tokenizer("go to zanzibar", add_special_tokens=False).input_ids
    assert ids[-1] == tokenizer.unk_token_id
    assert tokenizer.decode(ids[:2]) == "go to"


def test_word_tokenizer_extra_words_and_min_frequency():
    tokenizer = build_word_tokenizer(
        ["rare common common"], extra_words=[" vault"], min_frequency=2
    )
    vocab = tokenizer.get_vocab()
    assert " vault" in vocab and " common" in vocab
    assert "rare" not in vocab


def test_char_tokenizer_round_trips_any_printable_text():
    tokenizer = build_char_tokenizer()
    text = "<|im_start|>user\nTake 2 apples; (quickly)!\t<action>go</action><|im_end|>"
    ids = tokenizer(text, add_special_tokens=False).input_ids
    assert tokenizer.decode(ids, skip_special_tokens=False) == text
    assert tokenizer.unk_token_id not in ids
    # One id per plain character.
    assert len(tokenizer("hello", add_special_tokens=False).input_ids) == 5


@pytest.mark.parametrize("architecture", ["llama", "qwen2"])
def test_tiny_model_is_seeded_and_matches_tokenizer(architecture):
    tokenizer = build_word_tokenizer(TEXTS)
    config = TinyModelConfig(
        architecture=architecture, hidden_size=32, intermediate_size=64, seed=3
    )
    rng_before = torch.get_rng_state()
    model_a = build_tiny_causal_lm(config, tokenizer)
    assert torch.equal(rng_before, torch.get_rng_state()), (
        "building a model must not move the global RNG"
    )
    model_b = build_tiny_causal_lm(config, tokenizer)
    model_c = build_tiny_causal_lm(
        TinyModelConfig(architecture=architecture, hidden_size=32, intermediate_size=64, seed=4),
        tokenizer,
    )
    ids = torch.tensor([tokenizer("go to hall", add_special_tokens=False).input_ids])
    logits_a = model_a(input_ids=ids).logits
    assert logits_a.shape == (1, ids.shape[1], len(tokenizer))
    assert torch.equal(logits_a, model_b(input_ids=ids).logits)
    assert not torch.allclose(logits_a, model_c(input_ids=ids).logits)
    assert model_a.generation_config.eos_token_id == tokenizer.eos_token_id
    assert model_a.config.pad_token_id == tokenizer.pad_token_id


def test_tiny_model_rejects_bad_configs():
    tokenizer = build_word_tokenizer(TEXTS)
    with pytest.raises(ValueError, match="architecture"):
        build_tiny_causal_lm(TinyModelConfig(architecture="gpt5"), tokenizer)
    with pytest.raises(ValueError, match="smaller than the tokenizer"):
        build_tiny_causal_lm(TinyModelConfig(vocab_size=3), tokenizer)
    with pytest.raises(ValueError, match="no tokenizer"):
        build_tiny_causal_lm(TinyModelConfig())
