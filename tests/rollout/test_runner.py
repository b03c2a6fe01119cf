"""Multi-turn rollouts on the toy env with a tiny random-init LM and an in-code tokenizer."""

import pytest

from tcod_fast.curriculum import EpisodePlan
from tcod_fast.envs.base import EnvError
from tcod_fast.rollout.prompts import PromptConfig
from tcod_fast.envs.toy import FaultInjectingEnv, KeyDoorConfig, KeyDoorEnv, make_key_door_env
from tcod_fast.rollout import (
    GenerationOutput,
    HFGenerator,
    PackingConfig,
    PaperPrompter,
    EpisodeConfig,
    SamplingParams,
    pack_trajectories,
    run_episodes,
    summarize_trajectories,
    trained_tokens_by_turn,
)
from tcod_fast.rollout.vocabulary import expert_episode_texts
from tcod_fast.tiny_models import TinyModelConfig, build_tiny_causal_lm, build_word_tokenizer

PROMPTER = PaperPrompter(
    PromptConfig(
        env_description="You are an expert agent exploring a small house in a text adventure."
    )
)
TASKS = [f"keydoor/train/{i}" for i in range(4)]


@pytest.fixture(scope="module")
def tokenizer():
    tasks = TASKS + [f"keydoor/train/{i}" for i in range(4, 12)]
    texts = expert_episode_texts(KeyDoorEnv(), tasks, PROMPTER)
    # Scripted replies put words in new places: learn every piece with a leading space too.
    return build_word_tokenizer([*texts, " ".join(texts)])


@pytest.fixture(scope="module")
def student(tokenizer):
    model = build_tiny_causal_lm(
        TinyModelConfig(hidden_size=32, intermediate_size=64, seed=0), tokenizer
    )
    return RecordingGenerator(HFGenerator(model, tokenizer))


@pytest.fixture(scope="module")
def teacher(tokenizer):
    model = build_tiny_causal_lm(
        TinyModelConfig(hidden_size=48, intermediate_size=96, seed=1), tokenizer
    )
    return RecordingGenerator(HFGenerator(model, tokenizer))


class RecordingGenerator:
    """Wraps a generator and remembers every prompt it was fed and what it returned."""

    def __init__(self, inner):
        self.inner = inner
        self.tokenizer = inner.tokenizer
        self.max_context_tokens = inner.max_context_tokens
        self.calls = []

    def generate(self, prompts, params):
        outputs = self.inner.generate(prompts, params)
        self.calls.append(([list(p) for p in prompts], outputs))
        return outputs

    def find(self, output_ids):
        """The prompt that produced ``output_ids`` (unique in practice for sampled text)."""
        matches = [
            p
            for prompts, outs in self.calls
            for p, o in zip(prompts, outs)
            if o.token_ids == output_ids
        ]
        assert matches, "the recorded response was never produced by this generator"
        return matches


class ScriptedGenerator:
    """A Generator that replies with fixed texts, one list of replies per prompt position."""

    def __init__(self, tokenizer, replies):
        self.tokenizer = tokenizer
        self.max_context_tokens = None
        self.replies = list(replies)

    def generate(self, prompts, params):
        outputs = []
        for _ in prompts:
            text = self.replies.pop(0)
            ids = self.tokenizer(text, add_special_tokens=False).input_ids + [
                self.tokenizer.eos_token_id
            ]
            outputs.append(
                GenerationOutput(ids, self.tokenizer.decode(ids, skip_special_tokens=False), "eos")
            )
        return outputs


def plan(players, max_turns=None):
    players = tuple(players)
    return EpisodePlan(
        max_turns=max_turns or max(len(players), 1), players=players, turn_window=(0, 64)
    )


def config(mode="append", **kwargs):
    return EpisodeConfig(
        context_mode=mode,
        student_sampling=SamplingParams(max_new_tokens=6, stop_strings=("</action>",)),
        show_progress=False,
        **kwargs,
    )


def play(tasks, plans, envs, tokenizer, *, student=None, teacher=None, rollout=None, episode_keys=None):
    """``run_episodes`` with the tests' prompter and (unless ``rollout``) rollout settings."""
    return run_episodes(
        tasks,
        plans,
        envs,
        tokenizer=tokenizer,
        prompter=PROMPTER,
        student=student,
        teacher=teacher,
        config=rollout if rollout is not None else config(),
        episode_keys=episode_keys,
    )


MIXED_PLANS = [
    plan(["student", "student", "stop"], max_turns=6),  # F2B: cut after 2 student turns
    plan(["expert", "expert", "student", "student"]),  # B2F: expert prefix of 2
    plan(["student", "teacher", "student", "teacher"]),  # Guided-OPD coin outcomes
    plan(["student", "student", "teacher", "teacher"]),  # F2B with teacher completion
]


def check_trajectory(traj, tokenizer, episode_plan):
    traj.validate()
    assert traj.players == tuple(episode_plan.players[: traj.num_turns])
    for turn in traj.turns:
        span = traj.token_ids[
            turn.response_start : turn.response_start + len(turn.response_token_ids)
        ]
        assert span == turn.response_token_ids
        assert (
            tokenizer.decode(turn.response_token_ids, skip_special_tokens=False)
            == turn.response_text
        )
        if turn.player == "student":
            # Decoding the tokens carrying turn id k gives exactly turn k's generated text.
            assert (
                tokenizer.decode(traj.student_token_ids(turn.turn_index), skip_special_tokens=False)
                == turn.response_text
            )
            assert traj.turn_ids[turn.response_start : turn.response_start + len(span)] == [
                turn.turn_index
            ] * len(span)
        else:
            assert traj.student_token_ids(turn.turn_index) == []
            assert set(traj.turn_ids[turn.response_start : turn.response_start + len(span)]) <= {-1}
    trained_positions = {i for i, tid in enumerate(traj.turn_ids) if tid >= 0}
    student_positions = {
        i
        for turn in traj.turns
        if turn.player == "student"
        for i in range(turn.response_start, turn.response_start + len(turn.response_token_ids))
    }
    # Everything else (prompt, observations, markers, other players) carries -1.
    assert trained_positions == student_positions


@pytest.mark.parametrize("mode", ["append", "window"])
def test_mixed_players_give_well_formed_trajectories(mode, tokenizer, student, teacher):
    envs = [KeyDoorEnv() for _ in TASKS]
    trajs = play(TASKS, MIXED_PLANS, envs, tokenizer, student=student, teacher=teacher, rollout=config(mode))
    assert [t.task for t in trajs] == TASKS
    for traj, episode_plan in zip(trajs, MIXED_PLANS):
        assert traj.context_mode == mode
        check_trajectory(traj, tokenizer, episode_plan)
        # The generator was fed exactly the context recorded for training.
        for turn in traj.turns:
            if turn.player == "expert":
                continue
            generator = student if turn.player == "student" else teacher
            expected = (
                traj.token_ids[: turn.response_start]
                if mode == "append"
                else turn.window_prompt_token_ids
            )
            assert expected in generator.find(turn.response_token_ids)
    f2b, b2f, guided, f2b_teacher = trajs
    assert f2b.stop_reason == "plan_stop" and f2b.players == ("student", "student")
    assert f2b.num_student_turns == 2 and f2b.num_teacher_turns == 0
    assert b2f.players[:2] == ("expert", "expert") and b2f.num_expert_turns == 2
    expert_env = KeyDoorEnv()
    expert_env.reset(TASKS[1])
    assert [t.action for t in b2f.turns[:2]] == expert_env.expert_actions()[:2]
    assert min(tid for tid in b2f.turn_ids if tid >= 0) == 2, (
        "B2F student turn ids start at the prefix length"
    )
    assert guided.players == ("student", "teacher", "student", "teacher")
    assert guided.num_teacher_turns == 2
    assert f2b_teacher.num_student_turns == 2 and f2b_teacher.num_teacher_turns == 2
    summary = summarize_trajectories(trajs)
    assert summary["mean_student_turns"] == (2 + 2 + 2 + 2) / 4
    assert summary["mean_teacher_turns"] == (0 + 0 + 2 + 2) / 4
    assert summary["mean_expert_turns"] == 2 / 4
    assert summary["stop_plan_stop"] == 0.25
    assert summary["trained_tokens"] == sum(t.num_trained_tokens for t in trajs) > 0
    append_batch = pack_trajectories(trajs, PackingConfig(mode="append"))
    window_batch = pack_trajectories(
        trajs, PackingConfig(mode="window", layout="packed", max_row_tokens=4096)
    )
    assert trained_tokens_by_turn(append_batch) == trained_tokens_by_turn(window_batch)
    expected = {
        (i, t.turn_index): t.response_token_ids
        for i, tr in enumerate(trajs)
        for t in tr.turns
        if t.player == "student"
    }
    assert trained_tokens_by_turn(append_batch) == expected


def test_window_prompt_shows_the_history(tokenizer):
    replies = ["<think>a</think><action>look</action>"] * 4
    env = KeyDoorEnv(KeyDoorConfig(max_idle_steps=0))  # four looks in a row must not lose
    scripted = ScriptedGenerator(tokenizer, replies)
    traj = play(TASKS[:1], [plan(["student"] * 4)], [env], tokenizer, student=scripted, rollout=config("window"))[0]
    last_prompt = tokenizer.decode(traj.turns[3].window_prompt_token_ids)
    assert "you have already taken 3 step(s)" in last_prompt
    assert "[Action 3: look]" in last_prompt and "[Action 1: look]" not in last_prompt  # k = 2
    assert "<|im_start|>user\n" in last_prompt and last_prompt.endswith("<|im_start|>assistant\n")


def test_expert_replay_wins_and_rewards_are_recorded(tokenizer):
    env = KeyDoorEnv()
    env.reset(TASKS[2])
    num_expert = len(env.expert_actions())
    traj = play(TASKS[2:3], [plan(["expert"] * 30)], [KeyDoorEnv()], tokenizer, student=None)[0]
    assert traj.won and traj.stop_reason == "env_done"
    assert traj.num_turns == num_expert and traj.num_expert_turns == num_expert
    assert traj.rewards[-1] == 1.0 and traj.total_reward == 1.0
    assert traj.num_trained_tokens == 0 and traj.errors == []
    # The tokenizer learnt from expert_episode_texts covers every rendered text.
    assert tokenizer.unk_token_id not in traj.token_ids
    window_ids = [i for turn in traj.turns for i in turn.window_prompt_token_ids]
    assert tokenizer.unk_token_id not in window_ids
    assert traj.turns[-1].done and traj.turns[-1].won


def test_malformed_replies_are_wasted_turns_not_crashes(tokenizer):
    env = KeyDoorEnv()
    first = env.reset(TASKS[0])
    good_action = first.admissible_actions[0]
    replies = [
        "I refuse to use tags",  # no action at all: wasted turn
        f"<action>{good_action}</action>",  # action without <think>: played, error recorded
        f"<think>ok</think><action>{good_action}</action>",  # clean
    ]
    scripted = ScriptedGenerator(tokenizer, replies)
    traj = play(TASKS[:1], [plan(["student"] * 3)], [KeyDoorEnv()], tokenizer, student=scripted)[0]
    wasted, no_think, clean = traj.turns
    assert wasted.action is None and "no <action></action> block" in wasted.format_error
    assert wasted.observation.startswith("Your reply could not be used") and wasted.reward == 0.0
    assert no_think.action == good_action and "missing <think>" in no_think.format_error
    assert no_think.info.get("steps") == 1, "the wasted turn must not have stepped the env"
    assert clean.format_error is None and clean.info.get("steps") == 2
    assert traj.num_format_errors == 2 and len(traj.errors) == 2
    check_trajectory(traj, tokenizer, plan(["student"] * 3))


def test_env_failures_end_only_their_episode(tokenizer, student):
    faulty = [
        FaultInjectingEnv(make_key_door_env, {TASKS[1]: "raise"}, fault_at_step=2),
        FaultInjectingEnv(make_key_door_env, {TASKS[2]: "raise"}, fault_at_step=0),
    ]
    envs = [KeyDoorEnv(), faulty[0], faulty[1]]
    trajs = play(TASKS[:3], [plan(["expert"] * 4)] * 3, envs, tokenizer, student=student)
    healthy, mid, at_reset = trajs
    assert (
        healthy.stop_reason == "max_turns" and healthy.num_turns == 4 and healthy.env_error is None
    )
    assert mid.stop_reason == "env_error" and mid.num_turns == 2
    assert "injected failure" in mid.turns[1].env_error and "injected failure" in mid.env_error
    assert (
        at_reset.stop_reason == "env_error" and at_reset.num_turns == 0 and at_reset.token_ids == []
    )
    assert any("env error" in line for line in mid.errors) and any(
        "reset" in line for line in at_reset.errors
    )
    mid.validate()


def test_runs_through_the_worker_pool_in_waves(tokenizer, student):
    from tcod_fast.envs.pool import EnvPool, PoolConfig

    with EnvPool(make_key_door_env, num_slots=2, config=PoolConfig(num_workers=0)) as pool:
        plans = [plan(["expert", "student"]), plan(["student"]), plan(["student", "student"])]
        trajs = play(TASKS[:3], plans, pool, tokenizer, student=student)
    assert [t.task for t in trajs] == TASKS[:3]
    assert [t.episode_index for t in trajs] == [0, 1, 2]
    for traj, episode_plan in zip(trajs, plans):
        check_trajectory(traj, tokenizer, episode_plan)


def test_pool_env_error_is_recorded(tokenizer, student):
    class OneShotPool:
        """A pool whose slot 1 fails on its first step, as EnvPool reports it."""

        num_slots = 2

        def __init__(self):
            self.envs = [KeyDoorEnv(), KeyDoorEnv()]

        def reset_many(self, tasks):
            return [env.reset(task) for env, task in zip(self.envs, tasks)]

        def step_many(self, actions):
            return [
                None
                if a is None
                else (
                    EnvError("timeout", "step took longer than 1 s")
                    if slot == 1
                    else self.envs[slot].step(a)
                )
                for slot, a in enumerate(actions)
            ]

        def expert_actions_many(self, slots):
            return [self.envs[s].expert_actions() for s in slots]

    trajs = play(TASKS[:2], [plan(["expert"] * 3)] * 2, OneShotPool(), tokenizer, student=student)
    assert trajs[0].num_turns == 3 and trajs[0].env_error is None
    assert (
        trajs[1].stop_reason == "env_error"
        and trajs[1].env_error == "timeout: step took longer than 1 s"
    )


class StepReturnsNoneEnv(KeyDoorEnv):
    """The toy game, except that step 2 of ``broken_task`` returns None (a malformed result)."""

    def __init__(self, broken_task):
        super().__init__()
        self.broken_task = broken_task
        self.task, self.steps = None, 0

    def reset(self, task):
        self.task, self.steps = task, 0
        return super().reset(task)

    def step(self, action):
        self.steps += 1
        return None if self.task == self.broken_task and self.steps == 2 else super().step(action)


def test_a_malformed_env_result_ends_only_its_episode(tokenizer, student):
    """The pool's EnvError for a step that returned None ends that episode alone (in
    process here: a worker would import this module, and torch with it; the pool's tests
    cover the same error from worker processes)."""
    import functools

    from tcod_fast.envs.pool import EnvPool, PoolConfig

    factory = functools.partial(StepReturnsNoneEnv, TASKS[1])
    with EnvPool(factory, num_slots=2, config=PoolConfig(num_workers=0)) as pool:
        trajs = play(TASKS[:2], [plan(["expert"] * 3)] * 2, pool, tokenizer, student=student)
        assert pool.restarts == 0
    assert [t.stop_reason for t in trajs] == ["max_turns", "env_error"]
    assert trajs[1].num_turns == 2 and trajs[1].turns[1].env_error == trajs[1].env_error
    assert trajs[1].env_error.startswith(
        f"invalid_result: slot 1 ({TASKS[1]}) step: env 'toy' returned a malformed result: "
        "expected an EnvStep, received None"
    )
    expert_env = KeyDoorEnv()
    expert_env.reset(TASKS[0])
    assert [t.action for t in trajs[0].turns] == expert_env.expert_actions()[:3]
    assert all(t.env_error is None and t.observation for t in trajs[0].turns)


def test_rollouts_are_reproducible_from_the_seed(tokenizer, student, teacher):
    def run(seed):
        # Student and teacher both sample, in two episodes.
        plans = [plan(["student", "teacher"]), plan(["teacher", "student"])]
        envs = [KeyDoorEnv(), KeyDoorEnv()]
        return play(TASKS[:2], plans, envs, tokenizer, student=student, teacher=teacher, rollout=config(seed=seed))

    first, again, other = run(3), run(3), run(4)
    assert [t.token_ids for t in first] == [t.token_ids for t in again]
    assert [t.token_ids for t in first] != [t.token_ids for t in other]


def test_an_episode_plays_the_same_whichever_episodes_share_its_batches(tokenizer, student, teacher):
    """Each episode draws from generators seeded by the rollout seed and its key: played with
    others, alone, or in other waves, its trajectory is the same."""
    plans = [plan(["student", "teacher", "student"]), plan(["teacher", "student"]), plan(["student", "student"])]
    together = play(TASKS[:3], plans, [KeyDoorEnv() for _ in range(3)], tokenizer, student=student, teacher=teacher,
                    rollout=config(seed=5), episode_keys=[4, 9, 2])
    for index, key in enumerate([4, 9, 2]):
        alone = play([TASKS[index]], [plans[index]], [KeyDoorEnv()], tokenizer, student=student, teacher=teacher,
                     rollout=config(seed=5), episode_keys=[key])
        assert alone[0].token_ids == together[index].token_ids
    with pytest.raises(ValueError, match="episode_keys must hold 2 distinct ints"):
        play(TASKS[:2], plans[:2], [KeyDoorEnv(), KeyDoorEnv()], tokenizer, student=student, rollout=config(seed=5),
             episode_keys=[1, 1])


def test_context_limit_and_missing_teacher(tokenizer, student):
    small = RecordingGenerator(HFGenerator(student.inner.model, tokenizer, max_context_tokens=64))
    traj = play(TASKS[:1], [plan(["student"])], [KeyDoorEnv()], tokenizer, student=small)[0]
    assert traj.stop_reason == "context_limit" and traj.num_turns == 0 and small.calls == []
    with pytest.raises(ValueError, match="no teacher generator"):
        play(TASKS[:1], [plan(["teacher"])], [KeyDoorEnv()], tokenizer, student=student)
    with pytest.raises(ValueError, match="2 tasks but 1 plans"):
        play(TASKS[:2], [plan(["student"])], [KeyDoorEnv()] * 2, tokenizer, student=student)


def test_a_worker_process_dying_ends_only_its_episode(tokenizer, student):
    """End to end with real worker processes: the env of one episode kills its process."""
    import functools

    from tcod_fast.envs.pool import EnvPool, PoolConfig

    factory = functools.partial(FaultInjectingEnv, make_key_door_env, {TASKS[2]: "die"}, 2)
    with EnvPool(factory, num_slots=3, config=PoolConfig(num_workers=2)) as pool:
        trajs = play(TASKS[:3], [plan(["expert"] * 4)] * 3, pool, tokenizer, student=student)
        assert pool.restarts >= 1
    assert [t.stop_reason for t in trajs] == ["max_turns", "max_turns", "env_error"]
    assert trajs[2].num_turns == 2 and trajs[2].env_error.startswith("worker_died")
    # Slot 0 lived in the same worker as slot 2 (slot % num_workers) and was replayed
    # into its replacement: its episode went on with the expert's actions.
    expert_env = KeyDoorEnv()
    expert_env.reset(TASKS[0])
    assert [t.action for t in trajs[0].turns] == expert_env.expert_actions()[:4]
    assert all(t.env_error is None and t.observation for t in trajs[0].turns)


@pytest.mark.parametrize("through_pool", [False, True])
def test_random_player_and_expert_labels(tokenizer, through_pool):
    """Random turns play seeded admissible actions written as expert replies; with
    record_expert_labels every turn records the current-state expert's action, off the
    expert's path too, and following those labels from there wins."""
    from tcod_fast.envs.pool import EnvPool, PoolConfig

    def run(seed):
        plans = [plan(["random"] * 3)] * 2
        rollout = config(seed=seed, record_expert_labels=True)
        if through_pool:
            with EnvPool(make_key_door_env, num_slots=2, config=PoolConfig(num_workers=1)) as pool:
                return play(TASKS[:2], plans, pool, tokenizer, rollout=rollout)
        return play(TASKS[:2], plans, [KeyDoorEnv(), KeyDoorEnv()], tokenizer, rollout=rollout)

    trajs = run(5)
    assert [[t.action for t in traj.turns] for traj in trajs] == [[t.action for t in traj.turns] for traj in run(5)]
    assert any(
        [[t.action for t in traj.turns] for traj in trajs] != [[t.action for t in traj.turns] for traj in run(s)]
        for s in (6, 7)
    )
    for task, traj in zip(TASKS[:2], trajs):
        env = KeyDoorEnv()
        observation = env.reset(task)
        admissible = observation.admissible_actions
        for turn in traj.turns:
            assert turn.player == "random" and turn.action in admissible
            assert turn.expert_label == env.expert_action()  # the label of the state it was played in
            assert f"<action>{turn.action}</action>" in turn.response_text
            step = env.step(turn.action)
            admissible = step.admissible_actions
            if step.done:
                break
        assert traj.num_trained_tokens == 0


def test_expert_labels_are_none_when_not_asked(tokenizer):
    traj = play(TASKS[:1], [plan(["expert"] * 2)], [KeyDoorEnv()], tokenizer)[0]
    assert [t.expert_label for t in traj.turns] == [None, None]
