"""Tiny TRL distillation setups built in code (no downloads), shared by the TRL tests and the
peak-memory subprocess."""

from __future__ import annotations

import torch

from tcod_fast.tiny_models import TinyModelConfig, build_char_tokenizer, build_tiny_causal_lm

PROMPTS = ["go north", "take the key", "open the door", "look around"]


def tiny_tokenizer():
    tokenizer = build_char_tokenizer()
    tokenizer.padding_side = "left"
    return tokenizer


def tiny_pair(tokenizer, vocab_size=None, initializer_range=0.4):
    """Student (seed 0) and teacher (seed 1) Qwen2 models; a wide initialisation makes their
    distributions differ enough for the divergence to be O(1)."""
    kwargs = dict(architecture="qwen2", vocab_size=vocab_size, initializer_range=initializer_range)
    student = build_tiny_causal_lm(TinyModelConfig(seed=0, **kwargs), tokenizer)
    teacher = build_tiny_causal_lm(TinyModelConfig(seed=1, **kwargs), tokenizer)
    return student, teacher


def tiny_gemma2_pair(tokenizer, softcaps=(5.0, 8.0), initializer_range=0.4):
    """Student (seed 0) and teacher (seed 1) Gemma-2-style models whose logits are soft-capped
    (``final_logit_softcapping``, one cap each) and tied to the embeddings; the wide
    initialisation puts raw logits well past the caps, so the cap changes the distributions."""
    from transformers import Gemma2Config, Gemma2ForCausalLM

    models = []
    for seed, softcap in zip((0, 1), softcaps):
        config = Gemma2Config(
            vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
            num_attention_heads=2, num_key_value_heads=1, head_dim=16, max_position_embeddings=64,
            initializer_range=initializer_range, final_logit_softcapping=softcap,
            pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id, bos_token_id=None,
        )
        config._attn_implementation = "eager"  # Gemma 2's attention soft cap runs in eager attention
        torch.manual_seed(seed)
        models.append(Gemma2ForCausalLM(config))
    return tuple(models)


def make_trainer(trainer_class, tokenizer, student, teacher, output_dir, *, beta=0.5, temperature=1.0,
                 max_steps=2, max_completion_length=8, **trainer_kwargs):
    from datasets import Dataset
    from trl import DistillationConfig

    args = DistillationConfig(
        output_dir=str(output_dir), per_device_train_batch_size=2, max_steps=max_steps,
        max_completion_length=max_completion_length, logging_steps=1, report_to=[], use_cpu=True, seed=0,
        save_strategy="no", beta=beta, temperature=temperature, learning_rate=1e-3,
    )
    return trainer_class(
        model=student, teacher_model=teacher, args=args, train_dataset=Dataset.from_dict({"prompt": PROMPTS}),
        processing_class=tokenizer, **trainer_kwargs,
    )


def random_batch(vocab_size, batch=3, prompt_len=5, completion_len=12, seed=0, tool_mask=False):
    """A batch in the layout TRL hands ``_compute_loss``: left-padded prompts, right-padded
    completions, optionally a tool mask with a tool result in the middle of each completion."""
    g = torch.Generator().manual_seed(seed)
    prompt_ids = torch.randint(5, vocab_size, (batch, prompt_len), generator=g)
    completion_ids = torch.randint(5, vocab_size, (batch, completion_len), generator=g)
    prompt_mask = torch.ones(batch, prompt_len, dtype=torch.long)
    prompt_mask[0, :2] = 0
    completion_mask = torch.ones(batch, completion_len, dtype=torch.long)
    completion_mask[1, completion_len - 4:] = 0
    inputs = {"prompt_ids": prompt_ids, "prompt_mask": prompt_mask, "completion_ids": completion_ids,
              "completion_mask": completion_mask}
    if tool_mask:
        mask = torch.ones(batch, completion_len, dtype=torch.long)
        mask[:, 3:6] = 0  # a tool result between the first and the second agent turn
        mask[2, 8:9] = 0  # and a second one in the last row
        inputs["tool_mask"] = mask
    return inputs
