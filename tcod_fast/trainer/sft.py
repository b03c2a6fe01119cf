"""Supervised fine-tuning on demonstrations: how the demo makes its teacher (and warm-starts
its students) from the environment's expert trajectories.

Expert episodes are played by replaying the environment's expert actions through the same
rollout runner the students use (so prompts and token layout are identical), then packed
with the expert's replies as the trained tokens and fitted with cross-entropy.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from tcod_fast.curriculum import EpisodePlan

__all__ = ["expert_trajectories", "supervised_finetune"]


def expert_trajectories(tasks: Sequence[str], envs, *, tokenizer, prompter, context_mode: str, max_turns: int) -> list:
    """One expert episode per task (every turn replays the stored expert action)."""
    from tcod_fast.rollout import RolloutConfig, run_episodes

    plans = [
        EpisodePlan(max_turns=max_turns, players=("expert",) * max_turns, turn_window=(0, max_turns), task_index=i, episode_index=i)
        for i in range(len(tasks))
    ]
    trajectories = run_episodes(
        list(tasks),
        plans,
        envs,
        tokenizer=tokenizer,
        prompter=prompter,
        student=None,
        config=RolloutConfig(context_mode=context_mode, show_progress=False),
    )
    return [t for t in trajectories if t.num_expert_turns > 0]


def supervised_finetune(
    model: torch.nn.Module,
    trajectories: Sequence[Any],
    *,
    pad_token_id: int,
    context_mode: str,
    epochs: int,
    lr: float = 1e-3,
    batch_size: int = 8,
    seed: int = 0,
    max_grad_norm: float = 1.0,
    progress: bool = False,
    description: str = "sft",
) -> list[float]:
    """Fit ``model`` to the expert replies of ``trajectories`` (token-mean cross-entropy).

    Returns the mean loss of each epoch. Batches are shuffled with ``seed``; AdamW with a
    cosine decay over all updates.
    """
    from tqdm.auto import tqdm

    from tcod_fast.rollout import PackingConfig, pack_trajectories

    packing = PackingConfig(mode=context_mode, layout="padded", pad_token_id=pad_token_id, trained_players=("expert",))
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    batches_per_epoch = math.ceil(len(trajectories) / batch_size)
    total = max(epochs * batches_per_epoch, 1)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda i: 0.5 * (1 + math.cos(math.pi * min(i / total, 1.0))))
    rng = np.random.default_rng(seed)
    device = next(model.parameters()).device
    model.train()
    losses = []
    bar = tqdm(range(epochs), desc=description, disable=not progress, leave=False)
    for _ in bar:
        order = rng.permutation(len(trajectories))
        epoch_losses = []
        for start in range(0, len(order), batch_size):
            chosen = [trajectories[int(i)] for i in order[start : start + batch_size]]
            batch = pack_trajectories(chosen, packing).to(device)
            logits = model(**batch.model_inputs()).logits
            trained = batch.target_turn_ids >= 0
            loss = torch.nn.functional.cross_entropy(logits[trained].float(), batch.target_ids[trained])
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), max_grad_norm)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            epoch_losses.append(float(loss.detach()))
        losses.append(float(np.mean(epoch_losses)))
        bar.set_postfix(loss=f"{losses[-1]:.3f}", refresh=False)
    model.eval()
    return losses
