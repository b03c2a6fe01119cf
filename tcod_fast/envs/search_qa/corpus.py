"""Search-QA's passages and questions: a seeded offline world, or a user's JSONL files.

**Generated** (:func:`generate_world`): people, companies, cities and countries with made-up
names, one passage per entity stating its facts (``"Orla Vennick was born in Tesmar. Orla
Vennick works for Quorvane Labs."``, ``"Tesmar is a city in Belvaria."``, ``"Quorvane Labs is
based in Druvik."``). Questions follow chains of facts and need one to three searches:

* 1 hop: ``In which city was Orla Vennick born?`` (the person's passage);
* 2 hops: ``In which country was Orla Vennick born?`` (person, then city);
* 3 hops: ``In which country is the company that Orla Vennick works for based?`` (person,
  company, city).

Each question keeps its plan: the entity to search at each hop, and the answer. ``train`` and
``valid_seen`` ask about one world; ``valid_unseen`` about a second world whose entities (and
names) are disjoint from it. Both worlds' passages are in the corpus that is searched.

**A user's files** (:func:`load_qa_files`): a corpus JSONL, one passage a line (``contents``,
as Search-R1's corpus, or ``text`` with an optional ``title``), and a QA JSONL, one question a
line (``question`` and ``golden_answers``, or ``answers`` / ``answer``, and an optional
``split``: ``train``, ``valid_seen`` or ``valid_unseen``; ``train`` when absent).
"""

from __future__ import annotations

import json
import os
import random
from dataclasses import dataclass, field

from tcod_fast.envs.base import SPLITS

__all__ = ["Question", "QACorpus", "generate_world", "load_qa_files", "missing_qa_files"]


@dataclass(frozen=True)
class Question:
    """One question.

    Attributes:
        question: the text shown.
        answers: accepted answers.
        plan: what to search at each hop, in order (empty for a user's questions).
        hops: searches it needs (0 when unknown).
    """

    question: str
    answers: tuple[str, ...]
    plan: tuple[str, ...] = ()
    hops: int = 0


@dataclass
class QACorpus:
    """The searchable passages and the questions of each split."""

    passages: list[str]
    questions: dict[str, list[Question]] = field(default_factory=dict)


_SYLLABLES = ("ar", "bel", "cor", "dan", "el", "fen", "gar", "hal", "ir", "jun", "kel", "lor", "mar", "nev", "or",
              "pel", "quin", "ros", "sel", "tam", "ul", "var", "wen", "yor", "zel", "bri", "cal", "dro", "esk", "fal")
_COMPANY_WORDS = ("Labs", "Systems", "Works", "Foods", "Motors", "Textiles", "Press", "Energy")


def _word(rng: random.Random, used: set[str], syllables: int) -> str:
    while True:
        word = "".join(rng.choice(_SYLLABLES) for _ in range(syllables)).capitalize()
        if word not in used:
            used.add(word)
            return word


def _world(rng: random.Random, used: set[str], people: int) -> tuple[list[str], list[Question]]:
    countries = [_word(rng, used, 3) + "ia" for _ in range(max(2, people // 8))]
    cities = [(_word(rng, used, 2), rng.choice(countries)) for _ in range(max(3, people // 3))]
    companies = [(f"{_word(rng, used, 3)} {rng.choice(_COMPANY_WORDS)}", rng.choice(cities)[0])
                 for _ in range(max(2, people // 4))]
    country_of = dict(cities)
    passages = [f"{city} is a city in {country}. {city} lies in the region of {country}." for city, country in cities]
    passages += [f"{country} is a country. Its cities include "
                 + ", ".join(c for c, k in cities if k == country) + "." for country in countries]
    passages += [f"{company} is a company based in {city}." for company, city in companies]
    questions: list[Question] = []
    for _ in range(people):
        person = f"{_word(rng, used, 2)} {_word(rng, used, 3)}"
        city = rng.choice(cities)[0]
        company, company_city = rng.choice(companies)
        passages.append(f"{person} was born in {city}. {person} works for {company}.")
        questions += [
            Question(f"In which city was {person} born?", (city,), (person,), 1),
            Question(f"In which country was {person} born?", (country_of[city],), (person, city), 2),
            Question(f"In which country is the company that {person} works for based?", (country_of[company_city],),
                     (person, company, company_city), 3),
        ]
    return passages, questions


def generate_world(seed: int, people: int, questions_per_split: dict[str, int]) -> QACorpus:
    """A seeded corpus and questions (see the module doc).

    Args:
        seed: the same seed makes the same corpus and questions on every machine.
        people: people in each of the two worlds (each gives a 1-, a 2- and a 3-hop question).
        questions_per_split: split name -> number of questions, drawn without repeats while the
            world has enough, cycling through the hop counts.
    """
    if people < 1:
        raise ValueError(f"people must be >= 1, got {people}")
    rng = random.Random(f"tcod-search-qa/{seed}")
    used: set[str] = set()
    seen_passages, seen_questions = _world(rng, used, people)
    unseen_passages, unseen_questions = _world(rng, used, people)
    passages = seen_passages + unseen_passages
    random.Random(f"tcod-search-qa/{seed}/order").shuffle(passages)
    # train and valid_seen share the seen world's questions without sharing a question.
    order = list(range(len(seen_questions)))
    random.Random(f"tcod-search-qa/{seed}/seen").shuffle(order)
    n_valid = questions_per_split.get("valid_seen", 0)
    pools = {
        "valid_seen": [seen_questions[i] for i in order[:n_valid]],
        "train": [seen_questions[i] for i in order[n_valid:]] or [seen_questions[i] for i in order],
        "valid_unseen": unseen_questions,
    }
    questions: dict[str, list[Question]] = {}
    for split, count in questions_per_split.items():
        if split not in SPLITS:
            raise ValueError(f"question splits must be among {SPLITS}, got {split!r}")
        pool = pools[split]
        questions[split] = [pool[i % len(pool)] for i in range(count)] if pool else []
    return QACorpus(passages, questions)


def missing_qa_files(corpus_path: str | None, qa_path: str | None) -> str | None:
    """One line saying what is wrong with the user's file settings, or None."""
    if (corpus_path is None) != (qa_path is None):
        given, other = ("corpus_path", "qa_path") if corpus_path is not None else ("qa_path", "corpus_path")
        return f"env.kwargs.{given} is set but env.kwargs.{other} is not: give both JSONL files, or neither for the generated corpus"
    for key, path in (("corpus_path", corpus_path), ("qa_path", qa_path)):
        if path is not None and not os.path.isfile(path):
            return f"env.kwargs.{key} must be a JSONL file, got {path!r}, which does not exist"
    return None


def _jsonl(path: str):
    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, 1):
            if line.strip():
                try:
                    yield number, json.loads(line)
                except json.JSONDecodeError as error:
                    raise ValueError(f"{path}, line {number}: not JSON ({error.msg})") from None


def load_qa_files(corpus_path: str, qa_path: str) -> QACorpus:
    """Passages and questions from the user's JSONL files (see the module doc)."""
    problem = missing_qa_files(corpus_path, qa_path)
    if problem:
        raise ValueError(problem)
    passages = []
    for number, row in _jsonl(corpus_path):
        if isinstance(row, dict) and isinstance(row.get("contents"), str):
            passages.append(row["contents"])
        elif isinstance(row, dict) and isinstance(row.get("text"), str):
            passages.append(f"{row['title']}\n{row['text']}" if row.get("title") else row["text"])
        else:
            raise ValueError(f"{corpus_path}, line {number}: a passage needs a 'contents' or 'text' string")
    if not passages:
        raise ValueError(f"{corpus_path} holds no passages")
    questions: dict[str, list[Question]] = {split: [] for split in SPLITS}
    for number, row in _jsonl(qa_path):
        answers = (row.get("golden_answers") or row.get("answers") or row.get("answer")) if isinstance(row, dict) else None
        if isinstance(answers, str):
            answers = [answers]
        if not isinstance(row, dict) or not isinstance(row.get("question"), str) or not answers:
            raise ValueError(f"{qa_path}, line {number}: a question needs 'question' and 'golden_answers' (or 'answers')")
        split = row.get("split", "train")
        if split not in SPLITS:
            raise ValueError(f"{qa_path}, line {number}: split must be one of {SPLITS}, got {split!r}")
        questions[split].append(Question(row["question"], tuple(str(a) for a in answers)))
    return QACorpus(passages, questions)
