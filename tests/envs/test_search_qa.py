"""Search-QA: exact match and F1 by hand, the generated world (every hop retrievable, the expert
wins every question of every split, unseen entities disjoint), the user's JSONL files."""

import json
import re

import pytest

pytest.importorskip("bm25s", reason="bm25s is not installed (pip install 'tcod-fast[envs]')")

from tcod_fast.envs import SPLITS, Env, check_env_settings, make_env  # noqa: E402
from tcod_fast.envs.search_qa import (  # noqa: E402
    SearchQAConfig,
    SearchQAEnv,
    exact_match,
    f1_score,
    generate_world,
    load_qa_files,
    normalize_answer,
    parse_search_qa_action,
)


def test_normalisation_exact_match_and_f1_by_hand():
    assert normalize_answer("  The Eiffel-Tower!! ") == "eiffeltower"
    assert normalize_answer("An apple, a pear") == "apple pear"
    assert exact_match("the Belvaria.", ["Belvaria"]) == 1.0
    assert exact_match("Belvaria city", ["Belvaria"]) == 0.0
    assert exact_match("Tesmar", ["Belvaria", "tesmar"]) == 1.0  # any accepted answer
    # "new york city" against "new york": 2 shared words, precision 2/3, recall 1 -> F1 0.8
    assert f1_score("New York City", ["New York"]) == pytest.approx(0.8)
    # the best answer counts: "york" alone against "new york" is precision 1, recall 1/2 -> 2/3
    assert f1_score("York", ["Boston", "new york"]) == pytest.approx(2 / 3)
    assert f1_score("the", ["a"]) == 0.0 and f1_score("Paris", []) == 0.0
    assert f1_score("paris paris", ["paris"]) == pytest.approx(2 * 0.5 * 1 / 1.5)  # repeated words count once each


@pytest.fixture(scope="module")
def env():
    return make_env("search_qa")


def test_the_expert_wins_every_question_and_every_hop_retrieves_the_next(env):
    assert isinstance(env, Env)
    hops_seen = set()
    for split in SPLITS:
        tasks = env.list_tasks(split)
        assert len(tasks) == SearchQAConfig().num_tasks[split]
        for task in tasks:
            first = env.reset(task)
            question = env._question
            hops_seen.add(question.hops)
            actions = env.expert_actions()
            assert len(actions) == question.hops + 1 and actions[-1] == f"answer[{question.answers[0]}]"
            # Each search's passages name what the next search looks for, the last one the answer.
            needed = [*question.plan[1:], question.answers[0]]
            for action, name in zip(actions, needed):
                step = env.step(action)
                assert name in step.observation, (task, action, step.observation)
            step = env.step(actions[-1])
            assert step.done and step.won and step.reward == 1.0 and step.info["f1"] == 1.0, task
            assert first.observation == f"Question: {question.question}"
    assert hops_seen == {1, 2, 3}


def test_unseen_questions_ask_about_disjoint_entities():
    world = generate_world(seed=4, people=12, questions_per_split={"train": 30, "valid_seen": 6, "valid_unseen": 20})
    names = {split: {name for q in world.questions[split] for name in (*q.plan, *q.answers)} for split in SPLITS}
    assert names["valid_unseen"].isdisjoint(names["train"] | names["valid_seen"])
    seen_text = {q.question for q in world.questions["train"]}
    assert seen_text.isdisjoint(q.question for q in world.questions["valid_seen"])  # held out, same world
    # Both worlds are searchable.
    assert any(world.questions["valid_unseen"][0].plan[0] in passage for passage in world.passages)


def test_a_wrong_answer_scores_its_f1_and_malformed_actions_say_why(env):
    env.reset("search_qa/train/0")
    for action in ("look", "search[]", "answer[]"):
        step = env.step(action)
        assert step.info["invalid_action"] and not step.done and step.reward == 0.0
        assert step.observation.startswith(f"Invalid action: {action!r} is neither search[<query>] nor answer[<answer>]")
    answer = env._question.answers[0]
    wrong = env.step(f"answer[{answer} province]")
    assert wrong.done and not wrong.won and wrong.reward == 0.0 and wrong.info["em"] == 0.0
    assert wrong.info["f1"] == pytest.approx(2 / 3)  # precision 1/2, recall 1
    assert parse_search_qa_action(" Answer[ The  Belvaria ] ") == ("answer", "The Belvaria")


def test_episodes_are_the_same_under_a_seed_and_the_step_limit_ends_them():
    def play(seed):
        qa = SearchQAEnv(SearchQAConfig(seed=seed, people=6, num_tasks={"train": 4}))
        return [qa.reset("search_qa/train/3").observation] + [qa.step(a).observation for a in qa.expert_actions()]

    assert play(0) == play(0) and play(0) != play(1)
    qa = SearchQAEnv(SearchQAConfig(people=6, num_tasks={"train": 2}, max_steps=2))
    qa.reset("search_qa/train/0")
    steps = [qa.step("search[city]"), qa.step("search[country]")]
    assert [s.done for s in steps] == [False, True] and steps[-1].info["truncated"]
    with pytest.raises(ValueError, match="look like 'search_qa/<split>/<index>'"):
        qa.reset("train/0")


def _write_qa_files(tmp_path):
    corpus = tmp_path / "corpus.jsonl"
    corpus.write_text("\n".join(json.dumps(row) for row in [
        {"id": "0", "contents": "\"Marie Curie\"\nMarie Curie was born in Warsaw."},
        {"id": "1", "title": "Warsaw", "text": "Warsaw is the capital of Poland."},
        {"id": "2", "contents": "\"Paris\"\nParis is the capital of France."},
    ]) + "\n")
    qa = tmp_path / "qa.jsonl"
    qa.write_text("\n".join(json.dumps(row) for row in [
        {"question": "Where was Marie Curie born?", "golden_answers": ["Warsaw", "Warszawa"]},
        {"question": "What is the capital of France?", "answers": "Paris", "split": "valid_seen"},
        {"question": "Which country has Warsaw as its capital?", "answer": ["Poland"], "split": "valid_unseen"},
    ]) + "\n")
    return corpus, qa


def test_the_users_jsonl_files_are_loaded_and_played(tmp_path):
    corpus_path, qa_path = _write_qa_files(tmp_path)
    corpus = load_qa_files(str(corpus_path), str(qa_path))
    assert corpus.passages[1] == "Warsaw\nWarsaw is the capital of Poland."
    assert [len(corpus.questions[s]) for s in SPLITS] == [1, 1, 1]
    assert corpus.questions["train"][0].answers == ("Warsaw", "Warszawa")
    qa = make_env("search_qa", corpus_path=str(corpus_path), qa_path=str(qa_path))
    qa.reset("search_qa/valid_unseen/0")
    assert qa.expert_actions() == ["search[Which country has Warsaw as its capital?]", "answer[Poland]"]
    found = qa.step("search[Warsaw capital]")
    assert found.observation.startswith("Doc 1: Warsaw Warsaw is the capital of Poland.")
    assert qa.step("answer[poland]").won


def test_bad_files_and_settings_are_one_line(tmp_path):
    corpus_path, qa_path = _write_qa_files(tmp_path)
    with pytest.raises(ValueError, match=r"^env.kwargs.corpus_path is set but env.kwargs.qa_path is not"):
        check_env_settings("search_qa", {"corpus_path": str(corpus_path)})
    with pytest.raises(ValueError, match=r"^env.kwargs.qa_path must be a JSONL file, got '.*missing.jsonl', which does not exist$"):
        check_env_settings("search_qa", {"corpus_path": str(corpus_path), "qa_path": str(tmp_path / "missing.jsonl")})
    check_env_settings("search_qa", {"corpus_path": str(corpus_path), "qa_path": str(qa_path)})
    bad = tmp_path / "bad.jsonl"
    for text, message in [
        ('{"question": "q"}\n', "line 1: a question needs 'question' and 'golden_answers'"),
        ('{"question": "q", "answers": ["a"], "split": "test"}\n', "line 1: split must be one of"),
        ("not json\n", "line 1: not JSON"),
    ]:
        bad.write_text(text)
        with pytest.raises(ValueError, match=re.escape(message)):
            load_qa_files(str(corpus_path), str(bad))
    bad.write_text('{"body": "x"}\n')
    with pytest.raises(ValueError, match="a passage needs a 'contents' or 'text' string"):
        load_qa_files(str(bad), str(qa_path))
