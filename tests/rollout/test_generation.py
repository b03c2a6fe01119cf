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


def test_a_prompt_with_its_own_seed_samples_the_same_whatever_shares_the_call(generator, tokenizer):
    prompts = [encode(tokenizer, t) for t in TEXTS]
    params = SamplingParams(temperature=1.0, max_new_tokens=8, prompt_seeds=(11, 12, 13))
    together = generator.generate(prompts, params)
    for index, prompt in enumerate(prompts):
        alone = generator.generate([prompt], SamplingParams(temperature=1.0, max_new_tokens=8, prompt_seeds=(11 + index,)))
        assert alone[0].token_ids == together[index].token_ids
    reversed_order = generator.generate(prompts[::-1], SamplingParams(temperature=1.0, max_new_tokens=8, prompt_seeds=(13, 12, 11)))
    assert [o.token_ids for o in reversed_order[::-1]] == [o.token_ids for o in together]
    in_chunks = HFGenerator(generator.model, tokenizer, max_batch_size=2).generate(prompts, params)
    assert [o.token_ids for o in in_chunks] == [o.token_ids for o in together]
    other = generator.generate(prompts, SamplingParams(temperature=1.0, max_new_tokens=8, prompt_seeds=(21, 22, 23)))
    assert [o.token_ids for o in other] != [o.token_ids for o in together]
    with pytest.raises(ValueError, match=r"prompt_seeds must hold one seed per prompt \(3\), got 2"):
        generator.generate(prompts, SamplingParams(prompt_seeds=(1, 2)))


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


def test_greedy_equals_model_generate(generator, tokenizer):
    """The hand-written KV-cache loop decodes greedily exactly as ``model.generate`` does,
    left padding included."""
    prompts = [encode(tokenizer, t) for t in TEXTS]
    ours = generator.generate(prompts, SamplingParams(temperature=0.0, max_new_tokens=8))
    model = generator.model
    for prompt, output in zip(prompts, ours):
        reference = model.generate(
            torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt), dtype=torch.long), do_sample=False,
            max_new_tokens=8, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
        )[0, len(prompt) :].tolist()  # fmt: skip
        if tokenizer.eos_token_id in reference:
            reference = reference[: reference.index(tokenizer.eos_token_id) + 1]
        assert output.token_ids == reference


def test_first_token_is_drawn_from_the_stated_distribution(generator, tokenizer):
    """Temperature, top-k and top-p shape the draw exactly: the empirical distribution of
    the first token over many seeds matches the truncated, renormalised softmax."""
    prompt = encode(tokenizer, TEXTS[0])
    params = SamplingParams(temperature=0.7, top_k=8, top_p=0.8, max_new_tokens=1)
    with torch.no_grad():
        logits = generator.model(torch.tensor([prompt])).logits[0, -1].double() / params.temperature
    probs = logits.softmax(-1)
    order = probs.argsort(descending=True)[: params.top_k]
    top_k_probs = probs[order] / probs[order].sum()  # top-p acts on the renormalised top-k
    kept, mass = [], 0.0
    for token, p in zip(order.tolist(), top_k_probs.tolist()):
        if mass >= params.top_p:
            break
        kept.append(token)
        mass += p
    expected = torch.zeros_like(probs)
    expected[kept] = probs[kept] / probs[kept].sum()

    draws = 3000
    batch = [prompt] * 100
    counts = torch.zeros_like(probs)
    for seed in range(draws // len(batch)):
        outputs = generator.generate(batch, SamplingParams(**{**params.__dict__, "seed": seed}))
        for output in outputs:
            counts[output.token_ids[0]] += 1
    empirical = counts / draws
    assert len(kept) < params.top_k  # top-p did cut something here
    assert set(counts.nonzero().flatten().tolist()) <= set(kept)  # nothing outside top-k / top-p
    assert (empirical - expected).abs().max() < 0.04  # ~4 standard errors at n = 3000
