"""Generation backends: HF generate batched across episodes; vLLM when importable."""

import pytest
import torch

from tcod_fast.rollout.generation import (
    GenerationOutput,
    Generator,
    HFGenerator,
    SamplingParams,
    VLLMGenerator,
    truncate_at_stop,
    vllm_unavailable_reason,
)
from tcod_fast.tiny_models import TinyModelConfig, build_tiny_causal_lm, build_word_tokenizer

TEXTS = [
    "You are in the hall. Exits: kitchen, study. There is a box here (closed).",
    "<think>I should open the box</think><action>open box</action>",
    "go to kitchen take red key unlock vault door with red key",
]


@pytest.fixture(scope="module")
def tokenizer():
    return build_word_tokenizer(TEXTS)


@pytest.fixture(scope="module")
def generator(tokenizer):
    model = build_tiny_causal_lm(
        TinyModelConfig(hidden_size=32, intermediate_size=64, seed=0), tokenizer
    )
    return HFGenerator(model, tokenizer)


def encode(tokenizer, text):
    return tokenizer(text, add_special_tokens=False).input_ids


def test_hf_generator_follows_the_generator_protocol(generator):
    assert isinstance(generator, Generator)
    assert generator.max_context_tokens == 4096


def test_batched_sampling_outputs_are_well_formed_and_seeded(generator, tokenizer):
    prompts = [encode(tokenizer, t) for t in TEXTS]
    params = SamplingParams(temperature=1.0, top_p=0.9, max_new_tokens=6, seed=7)
    outputs = generator.generate(prompts, params)
    assert len(outputs) == 3
    for out in outputs:
        assert isinstance(out, GenerationOutput)
        assert 1 <= len(out.token_ids) <= 6
        assert out.text == tokenizer.decode(out.token_ids, skip_special_tokens=False)
        if out.finish_reason == "eos":
            assert out.token_ids[-1] == tokenizer.eos_token_id
        else:
            assert out.finish_reason == "length" and len(out.token_ids) == 6
    again = generator.generate(prompts, params)
    assert [o.token_ids for o in again] == [o.token_ids for o in outputs]
    other_seed = generator.generate(prompts, SamplingParams(max_new_tokens=6, seed=8))
    assert [o.token_ids for o in other_seed] != [o.token_ids for o in outputs]


def test_left_padding_does_not_change_greedy_outputs(generator, tokenizer):
    prompts = [encode(tokenizer, t) for t in TEXTS]
    assert len({len(p) for p in prompts}) == 3, "prompts of different lengths exercise padding"
    greedy = SamplingParams(temperature=0.0, max_new_tokens=5)
    batched = generator.generate(prompts, greedy)
    one_by_one = [generator.generate([p], greedy)[0] for p in prompts]
    assert [o.token_ids for o in batched] == [o.token_ids for o in one_by_one]
    chunked = HFGenerator(generator.model, tokenizer, max_batch_size=2).generate(prompts, greedy)
    assert [o.token_ids for o in chunked] == [o.token_ids for o in batched]


def test_stop_strings_and_extra_eos_cut_the_response(generator, tokenizer):
    prompt = encode(tokenizer, TEXTS[0])
    free = generator.generate([prompt], SamplingParams(temperature=0.0, max_new_tokens=8))[0]
    assert len(free.token_ids) >= 4, f"greedy output too short to test stops: {free}"
    # The text of tokens 1..2 as a stop string: generation must end at token 2.
    stop = tokenizer.decode(free.token_ids[1:3], skip_special_tokens=False)
    cut = generator.generate(
        [prompt], SamplingParams(temperature=0.0, max_new_tokens=8, stop_strings=(stop,))
    )[0]
    first_hit = next(
        n
        for n in range(1, 9)
        if stop in tokenizer.decode(free.token_ids[:n], skip_special_tokens=False)
    )
    assert cut.token_ids == free.token_ids[:first_hit]
    assert cut.finish_reason == "stop_string"
    # Any token can be declared an end of response: cut right after it, reason eos.
    as_eos = HFGenerator(
        generator.model, tokenizer, eos_token_ids=(tokenizer.eos_token_id, free.token_ids[2])
    )
    cut_eos = as_eos.generate([prompt], SamplingParams(temperature=0.0, max_new_tokens=8))[0]
    assert cut_eos.token_ids == free.token_ids[: free.token_ids.index(free.token_ids[2]) + 1]
    assert cut_eos.finish_reason == "eos"


def test_truncate_at_stop_rules(tokenizer):
    ids = encode(tokenizer, "<action>open box</action> go to kitchen")
    eos = tokenizer.eos_token_id
    kept, reason = truncate_at_stop(ids, tokenizer, [eos], ["</action>"])
    assert tokenizer.decode(kept) == "<action>open box</action>" and reason == "stop_string"
    kept, reason = truncate_at_stop(ids[:3] + [eos] + ids[3:], tokenizer, [eos], ["</action>"])
    assert kept == ids[:3] + [eos] and reason == "eos"
    kept, reason = truncate_at_stop(ids, tokenizer, [eos], [])
    assert kept == ids and reason == "length"


def test_sampling_params_are_checked():
    with pytest.raises(ValueError, match="temperature"):
        SamplingParams(temperature=-1)
    with pytest.raises(ValueError, match="top_p"):
        SamplingParams(top_p=0)
    with pytest.raises(ValueError, match="max_new_tokens"):
        SamplingParams(max_new_tokens=0)


def test_empty_prompt_is_rejected(generator):
    with pytest.raises(ValueError, match="prompt 1 is empty"):
        generator.generate([[3, 4], []], SamplingParams())


@pytest.mark.skipif(
    vllm_unavailable_reason() is None,
    reason="vllm is installed; the missing-vllm error cannot occur",
)
def test_vllm_generator_without_vllm_says_why(tokenizer):
    with pytest.raises(ImportError, match="vllm is not installed"):
        VLLMGenerator("/nonexistent/model", tokenizer)


@pytest.mark.skipif(
    vllm_unavailable_reason() is not None or not torch.cuda.is_available(),
    reason="vLLM backend needs vllm and a CUDA GPU here: "
    f"{vllm_unavailable_reason() or 'no CUDA device'}",
)
def test_vllm_generator_matches_hf_contract(tmp_path, tokenizer):
    model = build_tiny_causal_lm(
        TinyModelConfig(hidden_size=64, num_attention_heads=4, seed=0), tokenizer
    )
    model.save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    generator = VLLMGenerator(
        str(tmp_path), tokenizer, gpu_memory_utilization=0.3, enforce_eager=True
    )
    prompts = [encode(tokenizer, t) for t in TEXTS]
    outputs = generator.generate(
        prompts, SamplingParams(max_new_tokens=6, seed=1, stop_strings=("</action>",))
    )
    for out in outputs:
        assert 1 <= len(out.token_ids) <= 6
        assert out.text == tokenizer.decode(out.token_ids, skip_special_tokens=False)


def test_model_generation_defaults_do_not_leak_into_sampling(tokenizer):
    """Only SamplingParams shape the distribution: not the checkpoint's generation_config."""

    def fresh():
        return build_tiny_causal_lm(
            TinyModelConfig(hidden_size=32, intermediate_size=64, seed=0), tokenizer
        )

    prompts = [encode(tokenizer, t) for t in TEXTS]
    params = SamplingParams(max_new_tokens=8, seed=11)
    clean = HFGenerator(fresh(), tokenizer).generate(prompts, params)
    polluted_model = fresh()
    polluted_model.generation_config.top_k = 1
    polluted_model.generation_config.no_repeat_ngram_size = 1  # bans every repeated token
    polluted_model.train()
    polluted = HFGenerator(polluted_model, tokenizer).generate(prompts, params)
    assert [o.token_ids for o in polluted] == [o.token_ids for o in clean]
    assert polluted_model.training and polluted_model.generation_config.top_k == 1, "state restored"
