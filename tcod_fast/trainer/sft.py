"""Supervised fine-tuning on expert-labelled turns: how the demo makes its teachers (and
warm-starts its students), including DAgger-style rounds on the teacher's own states.

A *labelled turn* is one windowed-history prompt (exactly the prompt the agent saw in that
state) followed by the expert's reply for that state. Two sources give them:

* :func:`expert_trajectories` replays the expert from the reset state through the same
  rollout runner the students use, so prompts and token layout are identical;
* :func:`dagger_trajectories` lets a model play (with a ``noise`` share of turns played by
  a uniformly random admissible action), and asks the environment's current-state expert
  what it would have done in every visited state (``env.expert_action()``), on or off the
  expert's path.

:func:`labelled_turns` turns either into ``(prompt_ids, reply_ids)`` pairs and
:func:`supervised_finetune` fits a model to the replies with cross-entropy.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from tcod_fast.curriculum import EpisodePlan
from tcod_fast.rollout import ChatFormat, EpisodeConfig, SamplingParams, run_episodes
from tcod_fast.rollout.prompter import action_protocol_of

__all__ = ["dagger_trajectories", "expert_trajectories", "labelled_turns", "supervised_finetune"]


def expert_trajectories(tasks: Sequence[str], envs, *, tokenizer, prompter, context_mode: str, max_turns: int) -> list:
    """One expert episode per task (every turn replays the stored expert action)."""
    plans = [
        EpisodePlan(max_turns=max_turns, players=("expert",) * max_turns, turn_window=(0, max_turns), task_index=i, episode_index=i)
        for i in range(len(tasks))
    ]
    config = EpisodeConfig(context_mode=context_mode, show_progress=False)
    trajectories = run_episodes(list(tasks), plans, envs, tokenizer=tokenizer, prompter=prompter, student=None, config=config)
    return [t for t in trajectories if t.num_expert_turns > 0]


def dagger_trajectories(
    tasks: Sequence[str],
    envs,
    policy,
    *,
    tokenizer,
    prompter,
    max_turns: int,
    noise: float,
    temperature: float,
    max_new_tokens: int,
    seed: int,
    progress: bool = False,
) -> list:
    """Episodes played by ``policy`` (a generator) with every turn labelled by the expert.

    Each turn is played by a uniformly random admissible action with probability ``noise``
    (a seeded coin per turn), else by ``policy`` sampled at ``temperature``; the episode
    runs to the end or to ``max_turns``. ``TurnRecord.expert_label`` holds the expert's
    action in each visited state.
    """
    rng = np.random.default_rng(seed)
    plans = [
        EpisodePlan(
            max_turns=max_turns,
            players=tuple("random" if coin < noise else "teacher" for coin in rng.random(max_turns)),
            turn_window=(0, 0),
            task_index=i,
            episode_index=i,
        )
        for i in range(len(tasks))
    ]
    stop_strings = action_protocol_of(prompter).stop_strings
    sampling = SamplingParams(temperature=temperature, max_new_tokens=max_new_tokens, stop_strings=stop_strings)
    return run_episodes(
        list(tasks),
        plans,
        envs,
        tokenizer=tokenizer,
        prompter=prompter,
        student=None,
        teacher=policy,
        config=EpisodeConfig(
            context_mode="window",
            teacher_sampling=sampling,
            student_sampling=sampling,
            seed=seed,
            show_progress=progress,
            progress_description="dagger rollouts",
            record_expert_labels=True,
        ),
    )


def labelled_turns(trajectories: Sequence[Any], *, tokenizer, prompter) -> list[tuple[list[int], list[int]]]:
    """``(window prompt ids, expert reply ids)`` for every turn that has an expert label
    (``TurnRecord.expert_label``) or was played by the expert itself.

    The reply is tokenized exactly as the rollout writes an expert turn (the prompter's
    expert reply, then the end-of-reply marker), so a model fitted to these pairs is fitted
    to what an expert turn of a rollout looks like.
    """
    end_of_reply = list(tokenizer(ChatFormat().end_of_reply, add_special_tokens=False)["input_ids"])
    cache: dict[str, list[int]] = {}
    pairs = []
    for trajectory in trajectories:
        for turn in trajectory.turns:
            if turn.expert_label is not None:
                label = turn.expert_label
                if label not in cache:
                    reply = prompter.expert_reply(label)
                    cache[label] = list(tokenizer(reply, add_special_tokens=False)["input_ids"]) + end_of_reply
                reply_ids = cache[label]
            elif turn.player == "expert":
                reply_ids = list(turn.response_token_ids)
            else:
                continue
            pairs.append((list(turn.window_prompt_token_ids), reply_ids))
    return pairs


def _collate(pairs: Sequence[tuple[list[int], list[int]]], pad_token_id: int):
    """Right-padded ``input_ids``, ``attention_mask`` and next-token ``labels`` (-100 except
    where the next token belongs to the reply)."""
    longest = max(len(p) + len(r) for p, r in pairs)
    input_ids = torch.full((len(pairs), longest), pad_token_id, dtype=torch.int64)
    attention_mask = torch.zeros((len(pairs), longest), dtype=torch.int64)
    labels = torch.full((len(pairs), longest), -100, dtype=torch.int64)
    for row, (prompt, reply) in enumerate(pairs):
        ids = prompt + reply
        input_ids[row, : len(ids)] = torch.tensor(ids)
        attention_mask[row, : len(ids)] = 1
        # logits at position t predict token t + 1: the reply's tokens are predicted from
        # the position before each of them.
        labels[row, len(prompt) - 1 : len(ids) - 1] = torch.tensor(reply)
    return input_ids, attention_mask, labels


def supervised_finetune(
    model: torch.nn.Module,
    pairs: Sequence[tuple[list[int], list[int]]],
    *,
    pad_token_id: int,
    epochs: int,
    lr: float = 1e-3,
    batch_size: int = 16,
    seed: int = 0,
    max_grad_norm: float = 1.0,
    progress: bool = False,
    description: str = "sft",
) -> list[float]:
    """Fit ``model`` to the replies of ``(prompt_ids, reply_ids)`` pairs (token-mean
    cross-entropy over reply tokens).

    Returns the mean loss of each epoch. Batches of ``batch_size`` pairs are shuffled with
    ``seed``; AdamW with a cosine decay over all updates.
    """
    if not pairs:
        raise ValueError("supervised_finetune needs at least one (prompt, reply) pair, got none")
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    batches_per_epoch = math.ceil(len(pairs) / batch_size)
    total = max(epochs * batches_per_epoch, 1)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda i: 0.5 * (1 + math.cos(math.pi * min(i / total, 1.0))))
    rng = np.random.default_rng(seed)
    device = next(model.parameters()).device
    model.train()
    losses = []
    bar = tqdm(total=total, desc=description, disable=not progress, leave=False)
    for _ in range(epochs):
        order = rng.permutation(len(pairs))
        epoch_losses = []
        for start in range(0, len(order), batch_size):
            input_ids, attention_mask, labels = _collate([pairs[int(i)] for i in order[start : start + batch_size]], pad_token_id)
            logits = model(input_ids=input_ids.to(device), attention_mask=attention_mask.to(device)).logits
            loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1).float(), labels.to(device).flatten(), ignore_index=-100)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), max_grad_norm)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            epoch_losses.append(float(loss.detach()))
            bar.update(1)
        losses.append(float(np.mean(epoch_losses)))
        bar.set_postfix(loss=f"{losses[-1]:.3f}", refresh=False)
    bar.close()
    model.eval()
    return losses
