"""Search-QA behind the :class:`~tcod_fast.envs.base.Env` protocol: answer a question by searching.

The agent sees the question and plays ``search[<query>]``, which returns the ``top_k``
passages BM25 ranks best (``Doc 1: ...``, one a line), or ``answer[<text>]``, which ends the
episode. The reward is the exact match of the answer after normalisation
(:func:`~tcod_fast.envs.search_qa.metrics.exact_match`); ``info`` also carries its F1 and
``score`` (100 times the exact match), and the episode is won on an exact match. Any other
action changes nothing and says why. An episode that reaches ``max_steps`` actions without an
answer ends with reward 0.

The expert (:meth:`SearchQAEnv.expert_actions`) searches each entity of the question's hidden
plan in turn and answers; for a user's questions, which have no plan, it searches the question
itself and answers.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

from tcod_fast.envs.base import SPLITS, EnvObservation, EnvStep
from tcod_fast.envs.search_qa.corpus import QACorpus, Question, generate_world, load_qa_files
from tcod_fast.envs.search_qa.metrics import exact_match, f1_score

__all__ = ["SearchQAConfig", "SearchQAEnv", "make_search_qa_env", "parse_search_qa_action"]

ADMISSIBLE = ["search[<query>]", "answer[<answer>]"]
_ACTION = re.compile(r"^\s*(search|answer)\s*\[(.*)\]\s*$", re.IGNORECASE | re.DOTALL)


@dataclass
class SearchQAConfig:
    """The corpus, the questions and the episodes.

    Attributes:
        corpus_path: a JSONL file of passages (with ``qa_path``); None generates the corpus.
        qa_path: a JSONL file of questions (with ``corpus_path``).
        seed: seeds the generated world and questions.
        people: people in each generated world (each gives a 1-, 2- and 3-hop question).
        num_tasks: questions per split (generated), or at most this many per split (a user's files).
        top_k: passages a search returns.
        max_steps: the episode ends unanswered after this many actions.
    """

    corpus_path: str | None = None
    qa_path: str | None = None
    seed: int = 0
    people: int = 120
    num_tasks: dict[str, int] = field(default_factory=lambda: {"train": 300, "valid_seen": 60, "valid_unseen": 60})
    top_k: int = 3
    max_steps: int = 6

    def __post_init__(self) -> None:
        if self.top_k < 1 or self.max_steps < 1:
            raise ValueError(f"top_k and max_steps must be >= 1, got {self.top_k} and {self.max_steps}")
        unknown = sorted(set(self.num_tasks) - set(SPLITS))
        if unknown:
            raise ValueError(f"num_tasks keys must be among {SPLITS}, got {unknown}")


def parse_search_qa_action(action: str) -> tuple[str, str] | None:
    """``("search", "x")`` for ``search[x]``, ``("answer", "y")`` for ``answer[y]``; None otherwise."""
    match = _ACTION.match(action if isinstance(action, str) else "")
    if match is None:
        return None
    return match.group(1).lower(), " ".join(match.group(2).split())


class SearchQAEnv:
    """Search-QA (see the module doc). Task ids are ``search_qa/<split>/<index>``."""

    name = "search_qa"

    def __init__(self, config: SearchQAConfig | None = None):
        from tcod_fast.envs.retrieval import BM25Index

        self.config = config or SearchQAConfig()
        if self.config.corpus_path or self.config.qa_path:
            self.corpus: QACorpus = load_qa_files(self.config.corpus_path, self.config.qa_path)
        else:
            self.corpus = generate_world(self.config.seed, self.config.people, self.config.num_tasks)
        self._index = BM25Index(self.corpus.passages)
        self._question: Question | None = None
        self._task = ""
        self._steps = 0
        self._over = False

    def list_tasks(self, split: str) -> list[str]:
        """Task ids of ``split``."""
        if split not in SPLITS:
            raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
        count = len(self.corpus.questions.get(split, []))
        count = min(count, self.config.num_tasks.get(split, count))
        return [f"search_qa/{split}/{i}" for i in range(count)]

    def reset(self, task: str) -> EnvObservation:
        """Start ``task``: the question, nothing searched yet."""
        parts = task.split("/") if isinstance(task, str) else []
        if len(parts) != 3 or parts[0] != "search_qa" or parts[1] not in SPLITS or not parts[2].isdigit():
            raise ValueError(f"Search-QA task ids look like 'search_qa/<split>/<index>' with split in {SPLITS}, got {task!r}")
        questions = self.corpus.questions.get(parts[1], [])
        if int(parts[2]) >= len(questions):
            raise ValueError(f"task {task!r}: split {parts[1]!r} has {len(questions)} questions")
        self._question = questions[int(parts[2])]
        self._task, self._steps, self._over = task, 0, False
        return EnvObservation(
            observation=f"Question: {self._question.question}",
            admissible_actions=list(ADMISSIBLE),
            task_text=f"answer the question: {self._question.question}",
            info={"task": task, "hops": self._question.hops},
        )

    def step(self, action: str) -> EnvStep:
        """Play ``search[...]`` or ``answer[...]``; anything else changes nothing but costs a step."""
        if self._question is None:
            raise RuntimeError("SearchQAEnv.step called before reset")
        if self._over:
            return EnvStep("The episode is over.", 0.0, True, False, [], {"task": self._task})
        self._steps += 1
        info: dict[str, Any] = {"task": self._task, "invalid_action": False, "score": 0.0}
        parsed = parse_search_qa_action(action)
        if parsed is not None and parsed[0] == "answer" and parsed[1]:
            em = exact_match(parsed[1], self._question.answers)
            info.update(em=em, f1=f1_score(parsed[1], self._question.answers), score=100.0 * em)
            self._over = True
            verdict = "correct" if em == 1.0 else "not correct"
            return EnvStep(f"Your answer {parsed[1]!r} is {verdict}.", em, True, em == 1.0, [], info)
        if parsed is None or not parsed[1]:
            info["invalid_action"] = True
            observation = f"Invalid action: {action!r} is neither search[<query>] nor answer[<answer>] with text inside."
        else:
            passages = [self.corpus.passages[i] for i in self._index.search(parsed[1], self.config.top_k)]
            lines = [f"Doc {n}: {' '.join(text.split())}" for n, text in enumerate(passages, 1)]
            observation = "\n".join(lines) if lines else "No passage matches the query."
        done = self._steps >= self.config.max_steps
        if done:
            self._over = True
            info["truncated"] = True
        return EnvStep(observation, 0.0, done, False, [] if done else list(ADMISSIBLE), info)

    def expert_actions(self) -> list[str] | None:
        """The plan's searches then the answer (see the module doc)."""
        if self._question is None:
            return None
        queries = self._question.plan or (self._question.question,)
        return [f"search[{query}]" for query in queries] + [f"answer[{self._question.answers[0]}]"]

    def close(self) -> None:
        """Nothing to release."""


def make_search_qa_env(**config_kwargs: Any) -> SearchQAEnv:
    """Build a :class:`SearchQAEnv`; keyword arguments go to :class:`SearchQAConfig`."""
    return SearchQAEnv(SearchQAConfig(**config_kwargs))
