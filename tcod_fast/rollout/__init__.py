"""Multi-turn rollouts recorded as turn-segmented trajectories, and their packing.

* :mod:`~tcod_fast.rollout.trajectory`: :class:`Trajectory` / :class:`TurnRecord`.
* :mod:`~tcod_fast.rollout.generation`: :class:`Generator` interface, :class:`HFGenerator`,
  :class:`VLLMGenerator`, :class:`SamplingParams`.
* :mod:`~tcod_fast.rollout.runner`: :func:`run_episodes` (who plays each turn comes from
  the episode plan), :class:`EpisodeConfig`.
* :mod:`~tcod_fast.rollout.prompter`: the :class:`Prompter` interface, :class:`PaperPrompter`,
  :class:`ChatFormat`, :class:`PromptState`; :mod:`~tcod_fast.rollout.prompts`: the papers'
  prompt wording and the tolerant parsing of replies.
* :mod:`~tcod_fast.rollout.env_driver`: :class:`EnvListDriver`, a list of in-process
  environments behind the ``EnvPool`` batch API.
* :mod:`~tcod_fast.rollout.packing`: append-only and windowed-history packing into padded
  or packed tensors with ``target_ids``/``target_turn_ids`` aligned with the logits.
* :mod:`~tcod_fast.rollout.vocabulary`: :func:`expert_episode_texts`, the texts to learn
  an offline word-level tokenizer from.
"""

from tcod_fast.rollout.env_driver import EnvListDriver
from tcod_fast.rollout.generation import (
    GenerationOutput,
    Generator,
    GeneratorByEnv,
    HFGenerator,
    SamplingParams,
    VLLMGenerator,
    vllm_unavailable_reason,
)
from tcod_fast.rollout.packing import (
    PackedBatch,
    PackingConfig,
    apply_turn_windows,
    block_causal_mask,
    collate_sequences,
    pack_trajectories,
    sum_by_trajectory_turn,
    trained_tokens_by_turn,
    trajectory_sequences,
)
from tcod_fast.rollout.prompter import ChatFormat, PaperPrompter, Prompter, PrompterByEnv, PromptState
from tcod_fast.rollout.runner import EpisodeConfig, run_episodes
from tcod_fast.rollout.trajectory import (
    NOT_TRAINED,
    Trajectory,
    TurnRecord,
    summarize_trajectories,
)
from tcod_fast.rollout.vocabulary import expert_episode_texts

__all__ = [
    "NOT_TRAINED",
    "ChatFormat",
    "EnvListDriver",
    "GenerationOutput",
    "Generator",
    "GeneratorByEnv",
    "HFGenerator",
    "PackedBatch",
    "PackingConfig",
    "PaperPrompter",
    "PromptState",
    "Prompter",
    "PrompterByEnv",
    "EpisodeConfig",
    "SamplingParams",
    "Trajectory",
    "TurnRecord",
    "VLLMGenerator",
    "apply_turn_windows",
    "block_causal_mask",
    "collate_sequences",
    "expert_episode_texts",
    "pack_trajectories",
    "run_episodes",
    "sum_by_trajectory_turn",
    "summarize_trajectories",
    "trained_tokens_by_turn",
    "trajectory_sequences",
    "vllm_unavailable_reason",
]
