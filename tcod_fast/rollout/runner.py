"""Run a batch of multi-turn episodes and record them as :class:`Trajectory` objects.

Every episode of the batch advances one turn at a time, in lock step, so each turn is
one batched ``generate`` call per model. For turn ``k`` of an episode the runner asks
its plan ``plan.player(k)``:

* ``"student"``: the student generator samples a reply; its tokens get turn id ``k``;
* ``"teacher"``: the teacher generator samples a reply; turn id ``-1``;
* ``"expert"``: the ``k``-th expert action (``env.expert_actions()[k]``) is written as a
  reply by the prompter and tokenized; turn id ``-1``;
* ``"random"``: a uniformly random admissible action, written and tokenized like an
  expert reply (seeded); turn id ``-1``. DAgger-style data collection uses it as noise;
* ``"stop"``: the episode ends before turn ``k`` (TCOD-F2B truncation);

and an episode also ends when the environment says done, after ``plan.max_turns``
turns, on an environment failure (``env_error``), or when the next prompt would not fit
the generator's context.

The prompter (:mod:`tcod_fast.rollout.prompter`) writes the messages and parses replies; an
``EnvPool`` or a list of in-process envs (:mod:`tcod_fast.rollout.env_driver`) plays the actions.
The reply (decoded without special tokens) is parsed into an action. A reply with no
usable action is a wasted turn: the format error is recorded, the environment is not
stepped, and the agent is shown the prompter's feedback instead of an observation. A
reply with an action but a format flaw (say, no ``<think>`` block) is played and its
format error recorded.

With ``EpisodeConfig.record_expert_labels`` every turn also records what the environment's
current-state expert (``env.expert_action()``, where the env has one) would have played in
that turn's state, whoever played it: the labels of DAgger-style supervised data.

Tokenization is done segment by segment (each chat marker, message and reply is
encoded on its own and the ids concatenated), generated replies are stored exactly as
the token ids the model sampled, and the generator is always fed those same ids. The
context the model conditions on during training is therefore byte-identical to the one
it sampled from.
"""

from __future__ import annotations

import dataclasses
import random
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from tqdm.auto import tqdm

from tcod_fast.envs.actions import ACTION_TAGS
from tcod_fast.rollout.env_driver import EnvListDriver
from tcod_fast.rollout.generation import GenerationOutput, Generator, SamplingParams
from tcod_fast.rollout.prompter import ChatFormat, PaperPrompter, Prompter, PromptState, prompter_for_task
from tcod_fast.rollout.trajectory import (
    NOT_TRAINED,
    PLAYER_EXPERT,
    PLAYER_RANDOM,
    PLAYER_STOP,
    PLAYER_STUDENT,
    PLAYER_TEACHER,
    Trajectory,
    TurnRecord,
)

__all__ = ["CONTEXT_MODES", "EpisodeConfig", "run_episodes"]

CONTEXT_MODES = ("append", "window")


@dataclass
class EpisodeConfig:
    """How episodes are played.

    Attributes:
        context_mode: ``"append"`` (the chat grows turn by turn) or ``"window"`` (each
            turn sees a fresh windowed-history prompt); both views are recorded.
        student_sampling: sampling parameters of the student's replies (default: stop at
            the ``<action></action>`` protocol's stop strings; the trainer passes its env
            family's, ``PaperPrompter.action_protocol``).
        teacher_sampling: sampling of the teacher's replies (default: the student's).
        chat_format: chat markers.
        seed: base seed. Each episode draws from generators of its own, seeded from it, the
            episode's key (``run_episodes(episode_keys=...)``), the turn and the player: an
            episode's samples do not depend on which episodes share its generation batches,
            so a rollout is reproducible however it is split. The same seed replays the same
            random draws, so a trainer should vary it per rollout (e.g. ``base_seed + step``).
            ``None`` samples from the global RNG.
        show_progress: show a tqdm bar of finished episodes.
        progress_description: the bar's label.
        record_expert_labels: ask the environment's current-state expert for its action in
            every turn's state (``TurnRecord.expert_label``; ``None`` where the env has none).
    """

    context_mode: str = "append"
    student_sampling: SamplingParams = field(
        default_factory=lambda: SamplingParams(stop_strings=ACTION_TAGS.stop_strings)
    )
    teacher_sampling: SamplingParams | None = None
    chat_format: ChatFormat = field(default_factory=ChatFormat)
    seed: int | None = 0
    show_progress: bool = True
    progress_description: str = "rollout"
    record_expert_labels: bool = False

    def __post_init__(self) -> None:
        if self.context_mode not in CONTEXT_MODES:
            raise ValueError(
                f"context_mode must be one of {CONTEXT_MODES}, got {self.context_mode!r}"
            )


def _is_env_error(result: Any) -> bool:
    return bool(getattr(result, "env_error", False))


def _env_error_text(result: Any) -> str:
    return f"{getattr(result, 'kind', 'error')}: {getattr(result, 'message', result)}"


@dataclass
class _Episode:
    """Mutable state of one episode while it runs."""

    slot: int
    task: Any
    plan: Any
    episode_index: int
    sampling_key: int = 0
    task_text: str = ""
    observation: str = ""
    admissible_actions: list[str] = field(default_factory=list)
    history: list[tuple[str, str | None]] = field(default_factory=list)
    token_ids: list[int] = field(default_factory=list)
    turn_ids: list[int] = field(default_factory=list)
    turns: list[TurnRecord] = field(default_factory=list)
    expert_actions: list[str] | None = None
    won: bool = False
    # The latest observation is not yet in token_ids: it is appended when the next turn
    # is actually played, so a trajectory never ends in an unused observation message.
    observation_pending: bool = False
    finished: bool = False
    stop_reason: str = "max_turns"
    env_error: str | None = None

    def state(self) -> PromptState:
        return PromptState(
            task_text=self.task_text,
            observation=self.observation,
            admissible_actions=list(self.admissible_actions),
            step_count=len(self.turns),
            history=list(self.history),
        )

    def extend(self, token_ids: Sequence[int], turn_id: int) -> None:
        self.token_ids.extend(token_ids)
        self.turn_ids.extend([turn_id] * len(token_ids))

    def finish(self, reason: str) -> None:
        if not self.finished:
            self.finished = True
            self.stop_reason = reason

    def to_trajectory(self, context_mode: str) -> Trajectory:
        return Trajectory(
            task=self.task,
            task_text=self.task_text,
            token_ids=self.token_ids,
            turn_ids=self.turn_ids,
            turns=self.turns,
            context_mode=context_mode,
            won=self.won,
            stop_reason=self.stop_reason,
            env_error=self.env_error,
            plan=self.plan,
            episode_index=self.episode_index,
        )


class _Encoder:
    """Segment-wise tokenization with a small cache (chat markers repeat every turn)."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self._cache: dict[str, list[int]] = {}

    def __call__(self, *segments: str) -> list[int]:
        ids: list[int] = []
        for segment in segments:
            if not segment:
                continue
            cached = self._cache.get(segment)
            if cached is None:
                cached = list(self.tokenizer(segment, add_special_tokens=False)["input_ids"])
                if len(segment) < 64:
                    self._cache[segment] = cached
            ids.extend(cached)
        return ids


def _turn_seed(base_seed: int | None, sampling_key: int, turn_index: int, player: str) -> int | None:
    """The seed of one episode's draws in one turn for one player: distinct and deterministic
    per (base seed, episode key, turn, player), independent of anything else in the batch."""
    if base_seed is None:
        return None
    player_code = {PLAYER_STUDENT: 1, PLAYER_TEACHER: 2, PLAYER_RANDOM: 4}.get(player, 3)
    words = np.random.SeedSequence([int(base_seed) % 2**63, int(sampling_key), int(turn_index), player_code]).generate_state(2)
    return int((int(words[0]) << 32 | int(words[1])) % (2**63 - 1))


def run_episodes(
    tasks: Sequence[Any],
    plans: Sequence[Any],
    envs: Any,
    *,
    tokenizer,
    prompter: Prompter | None = None,
    student: Generator | None,
    teacher: Generator | None = None,
    config: EpisodeConfig | None = None,
    episode_keys: Sequence[int] | None = None,
) -> list[Trajectory]:
    """Play one episode per ``(task, plan)`` and return their trajectories, in order.

    Args:
        tasks: task ids passed to ``env.reset``.
        plans: one plan per task; only ``plan.max_turns`` and ``plan.player(k)`` are used
            (``tcod_fast.curriculum.EpisodePlan`` or any object with both).
        envs: an ``EnvPool`` (anything with ``reset_many``/``step_many``/
            ``expert_actions_many`` and ``num_slots``) or a list of in-process envs.
            With more tasks than slots, episodes run in successive waves.
        tokenizer: HF tokenizer shared by student, teacher and prompts.
        prompter: builds messages and parses replies (:class:`Prompter`); default
            :class:`PaperPrompter` with the ALFWorld wording.
        student: generator of student turns (may be ``None`` if no plan uses it).
        teacher: generator of teacher turns (required if a plan says ``"teacher"``).
        config: :class:`EpisodeConfig`.
        episode_keys: one int per episode, distinct, naming its random draws (with
            ``config.seed``): the same key plays the same episode whichever episodes share the
            call. A trainer that splits a step's episodes over processes passes each
            episode's index in the step. Default: the episode's position in ``tasks``.

    Returns:
        one validated :class:`Trajectory` per task.
    """
    config = config or EpisodeConfig()
    prompter = prompter if prompter is not None else PaperPrompter()
    if len(tasks) != len(plans):
        raise ValueError(f"got {len(tasks)} tasks but {len(plans)} plans")
    keys = list(range(len(tasks))) if episode_keys is None else [int(k) for k in episode_keys]
    if len(keys) != len(tasks) or len(set(keys)) != len(keys):
        raise ValueError(f"episode_keys must hold {len(tasks)} distinct ints, one per episode, got {list(episode_keys or [])}")
    driver = envs if hasattr(envs, "step_many") else EnvListDriver(envs)
    num_slots = int(getattr(driver, "num_slots", len(tasks)))
    if num_slots < 1:
        raise ValueError("envs has no slot to run an episode in")
    trajectories: list[Trajectory] = []
    with tqdm(
        total=len(tasks),
        desc=config.progress_description,
        disable=not config.show_progress,
        leave=False,
    ) as progress:
        for wave, start in enumerate(range(0, len(tasks), num_slots)):
            wave_tasks = list(tasks[start : start + num_slots])
            wave_plans = list(plans[start : start + num_slots])
            runner = _WaveRunner(
                driver, tokenizer, prompter, student, teacher, config, wave, progress
            )
            trajectories.extend(runner.run(wave_tasks, wave_plans, first_index=start, sampling_keys=keys[start : start + num_slots]))
    return trajectories


class _WaveRunner:
    """Plays up to ``num_slots`` episodes in lock step."""

    def __init__(self, driver, tokenizer, prompter, student, teacher, config, wave, progress):
        self.driver = driver
        self.tokenizer = tokenizer
        self.encode = _Encoder(tokenizer)
        self.prompter = prompter
        self.generators = {PLAYER_STUDENT: student, PLAYER_TEACHER: teacher}
        self.config = config
        self.wave = wave
        self.progress = progress
        self.chat = config.chat_format
        self.end_of_reply_ids = self.encode(self.chat.end_of_reply)
        # A reply that already ends with the end-of-reply token needs no closing marker.
        self.eos_token_id = self.end_of_reply_ids[0] if len(self.end_of_reply_ids) == 1 else None

    # -- prompts -----------------------------------------------------------------------
    def _prompter(self, episode: _Episode):
        """The prompter of ``episode``'s environment (a run with several routes by task)."""
        return prompter_for_task(self.prompter, episode.task)

    def _system_ids(self, episode: _Episode) -> list[int]:
        system = self._prompter(episode).system_prompt
        if not system:
            return []
        return self.encode(self.chat.system_start, system, self.chat.message_end)

    def _user_turn_ids(self, message: str) -> list[int]:
        return self.encode(
            self.chat.user_start, message, self.chat.message_end, self.chat.assistant_start
        )

    def _window_prompt_ids(self, episode: _Episode) -> list[int]:
        return self._system_ids(episode) + self._user_turn_ids(
            self._prompter(episode).window_message(episode.state())
        )

    # -- episode lifecycle ---------------------------------------------------------------
    def run(self, tasks: list, plans: list, first_index: int, sampling_keys: list[int]) -> list[Trajectory]:
        episodes = [
            _Episode(slot=slot, task=task, plan=plan, episode_index=first_index + slot, sampling_key=key)
            for slot, (task, plan, key) in enumerate(zip(tasks, plans, sampling_keys))
        ]
        for episode, result in zip(episodes, self.driver.reset_many(tasks)):
            if _is_env_error(result):
                episode.env_error = _env_error_text(result)
                episode.finish("env_error")
                self.progress.update(1)
                continue
            episode.task_text = result.task_text
            episode.observation = result.observation
            episode.admissible_actions = list(result.admissible_actions)
            episode.extend(
                self._system_ids(episode)
                + self._user_turn_ids(self._prompter(episode).first_message(episode.state())),
                NOT_TRAINED,
            )
        turn_index = 0
        while True:
            live = [e for e in episodes if not e.finished]
            if not live:
                break
            self.progress.set_postfix(
                wave=self.wave, turn=turn_index, live=len(live), refresh=False
            )
            self._play_turn(live, turn_index)
            turn_index += 1
        trajectories = [e.to_trajectory(self.config.context_mode) for e in episodes]
        for trajectory in trajectories:
            trajectory.validate()
        return trajectories

    def _finish(self, episode: _Episode, reason: str) -> None:
        if not episode.finished:
            episode.finish(reason)
            self.progress.update(1)

    def _play_turn(self, live: list[_Episode], turn_index: int) -> None:
        # Who plays: decided before anything runs, so "stop" and max_turns end episodes
        # without a generate call.
        by_player: dict[str, list[_Episode]] = {
            PLAYER_STUDENT: [],
            PLAYER_TEACHER: [],
            PLAYER_EXPERT: [],
            PLAYER_RANDOM: [],
        }
        for episode in live:
            if turn_index >= episode.plan.max_turns:
                self._finish(episode, "max_turns")
                continue
            player = episode.plan.player(turn_index)
            if player == PLAYER_STOP:
                self._finish(episode, "plan_stop")
                continue
            if player not in by_player:
                raise ValueError(
                    f"plan.player({turn_index}) returned {player!r}; expected one of "
                    f"{(PLAYER_STUDENT, PLAYER_TEACHER, PLAYER_EXPERT, PLAYER_RANDOM, PLAYER_STOP)}"
                )
            by_player[player].append(episode)

        for group in by_player.values():
            for episode in group:
                if episode.observation_pending:
                    episode.extend(
                        self.encode(self.chat.after_reply)
                        + self._user_turn_ids(self._prompter(episode).observation_message(episode.state())),
                        NOT_TRAINED,
                    )
                    episode.observation_pending = False
        window_prompts = {
            id(e): self._window_prompt_ids(e) for group in by_player.values() for e in group
        }
        labels = self._expert_labels([e for group in by_player.values() for e in group])
        replies: dict[int, tuple[str, GenerationOutput]] = {}
        for player in (PLAYER_STUDENT, PLAYER_TEACHER):
            group = by_player[player]
            if group:
                for episode, output in zip(
                    group, self._generate(player, group, window_prompts, turn_index)
                ):
                    if output is not None:
                        replies[id(episode)] = (player, output)
        if by_player[PLAYER_EXPERT]:
            for episode, output in zip(
                by_player[PLAYER_EXPERT], self._expert_replies(by_player[PLAYER_EXPERT], turn_index)
            ):
                if output is not None:
                    replies[id(episode)] = (PLAYER_EXPERT, output)
        for episode in by_player[PLAYER_RANDOM]:
            replies[id(episode)] = (PLAYER_RANDOM, self._random_reply(episode, turn_index))

        playing = [e for e in live if id(e) in replies]
        actions: list[str | None] = [None] * self.driver.num_slots
        parsed: dict[int, Any] = {}
        for episode in playing:
            _, output = replies[id(episode)]
            # Special tokens (the eos) are not part of what the agent "said".
            reply_text = self.tokenizer.decode(output.token_ids, skip_special_tokens=True)
            parsed[id(episode)] = self._prompter(episode).parse_action(reply_text, episode.admissible_actions)
            actions[episode.slot] = parsed[id(episode)].action
        step_results = self.driver.step_many(actions) if any(a is not None for a in actions) else []

        for episode in playing:
            player, output = replies[id(episode)]
            parse = parsed[id(episode)]
            self._record_turn(
                episode,
                turn_index,
                player,
                output,
                parse,
                step_results[episode.slot] if parse.action is not None else None,
                window_prompts[id(episode)],
                labels.get(id(episode)),
            )

    def _expert_labels(self, episodes: list[_Episode]) -> dict[int, str | None]:
        if not self.config.record_expert_labels or not episodes:
            return {}
        results = self.driver.expert_action_many([e.slot for e in episodes])
        return {id(e): (None if _is_env_error(r) else r) for e, r in zip(episodes, results)}

    def _random_reply(self, episode: _Episode, turn_index: int) -> GenerationOutput:
        seed = _turn_seed(self.config.seed, episode.sampling_key, turn_index, PLAYER_RANDOM)
        rng = random.Random(seed) if seed is not None else random
        action = rng.choice(episode.admissible_actions) if episode.admissible_actions else "look"
        ids = self.encode(self._prompter(episode).expert_reply(action)) + self.end_of_reply_ids
        return GenerationOutput(
            token_ids=ids, text=self.tokenizer.decode(ids, skip_special_tokens=False), finish_reason="random"
        )

    def _generate(self, player: str, group: list[_Episode], window_prompts: dict, turn_index: int):
        """One reply per episode of ``group`` (None where the episode ended instead), each from
        the player's generator for that episode's task (several teachers route by task)."""
        generator = self.generators[player]
        if generator is None:
            raise ValueError(
                f"a plan asked the {player} to play turn {turn_index} "
                f"but no {player} generator was given"
            )
        route = getattr(generator, "for_task", None)
        if route is None:
            return self._generate_with(generator, player, group, window_prompts, turn_index)
        by_generator: dict[int, tuple[Any, list[_Episode]]] = {}
        for episode in group:
            routed = route(episode.task)
            by_generator.setdefault(id(routed), (routed, []))[1].append(episode)
        replies: dict[int, GenerationOutput | None] = {}
        for routed, episodes in by_generator.values():
            for episode, reply in zip(episodes, self._generate_with(routed, player, episodes, window_prompts, turn_index)):
                replies[id(episode)] = reply
        return [replies[id(e)] for e in group]

    def _generate_with(self, generator, player: str, group: list[_Episode], window_prompts: dict, turn_index: int):
        params = self.config.student_sampling
        if player == PLAYER_TEACHER and self.config.teacher_sampling is not None:
            params = self.config.teacher_sampling
        limit = getattr(generator, "max_context_tokens", None)
        prompts, seeds = [], []
        for episode in group:
            prompt = (
                episode.token_ids
                if self.config.context_mode == "append"
                else window_prompts[id(episode)]
            )
            if limit is not None and len(prompt) + params.max_new_tokens > limit:
                self._finish(episode, "context_limit")
                continue
            prompts.append(prompt)
            seeds.append(_turn_seed(self.config.seed, episode.sampling_key, turn_index, player))
        if self.config.seed is not None:
            params = dataclasses.replace(params, seed=None, prompt_seeds=tuple(seeds))
        outputs = iter(generator.generate(prompts, params) if prompts else [])
        return [next(outputs) if not e.finished else None for e in group]

    def _expert_replies(
        self, group: list[_Episode], turn_index: int
    ) -> list[GenerationOutput | None]:
        missing = [e for e in group if e.expert_actions is None]
        if missing:
            for episode, result in zip(
                missing, self.driver.expert_actions_many([e.slot for e in missing])
            ):
                if _is_env_error(result):
                    episode.env_error = _env_error_text(result)
                    self._finish(episode, "env_error")
                else:
                    episode.expert_actions = list(result) if result is not None else []
        outputs: list[GenerationOutput | None] = []
        for episode in group:
            if episode.finished:
                outputs.append(None)
                continue
            if turn_index >= len(episode.expert_actions):
                self._finish(episode, "expert_exhausted")
                outputs.append(None)
                continue
            reply_text = self._prompter(episode).expert_reply(episode.expert_actions[turn_index])
            ids = self.encode(reply_text) + self.end_of_reply_ids
            outputs.append(
                GenerationOutput(
                    token_ids=ids,
                    text=self.tokenizer.decode(ids, skip_special_tokens=False),
                    finish_reason="expert",
                )
            )
        return outputs

    def _record_turn(
        self,
        episode: _Episode,
        turn_index: int,
        player: str,
        output: GenerationOutput,
        parse: Any,
        step_result: Any,
        window_prompt: list[int],
        expert_label: str | None = None,
    ) -> None:
        action, format_error = parse.action, parse.format_error
        response_start = len(episode.token_ids)
        episode.extend(output.token_ids, turn_index if player == PLAYER_STUDENT else NOT_TRAINED)
        reward, done, won, env_error, info = 0.0, False, False, None, {}
        seen_observation = episode.observation
        if action is None:
            observation = self._prompter(episode).format_error_feedback(parse)
        elif _is_env_error(step_result):
            env_error = _env_error_text(step_result)
            observation = ""
            done = True
        else:
            observation = step_result.observation
            reward = float(step_result.reward)
            done = bool(step_result.done)
            won = bool(step_result.won)
            info = dict(step_result.info)
            episode.admissible_actions = list(step_result.admissible_actions)
        episode.turns.append(
            TurnRecord(
                turn_index=turn_index,
                player=player,
                response_token_ids=list(output.token_ids),
                response_text=output.text,
                action=action,
                format_error=format_error,
                observation=observation,
                reward=reward,
                done=done,
                won=won,
                finish_reason=output.finish_reason,
                response_start=response_start,
                window_prompt_token_ids=window_prompt,
                env_error=env_error,
                info=info,
                expert_label=expert_label,
            )
        )
        episode.history.append((seen_observation, action))
        episode.observation = observation
        ended_with_eos = bool(output.token_ids) and output.token_ids[-1] == self.eos_token_id
        closing = [] if ended_with_eos else list(self.end_of_reply_ids)
        if env_error is not None:
            episode.env_error = env_error
            episode.extend(closing, NOT_TRAINED)
            self._finish(episode, "env_error")
            return
        if won:
            episode.won = True
        if done:
            episode.extend(closing, NOT_TRAINED)
            self._finish(episode, "env_done")
            return
        episode.extend(closing, NOT_TRAINED)
        episode.observation_pending = True
