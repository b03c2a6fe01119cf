"""Search-QA: answer questions by searching a corpus with BM25, as Search-R1 and ATOD do.

:class:`SearchQAEnv` (:mod:`.env`) plays it on a generated world of entities and facts or on a
user's JSONL files (:mod:`.corpus`); :mod:`.metrics` holds the exact match and F1.
"""

from tcod_fast.envs.search_qa.corpus import QACorpus, Question, generate_world, load_qa_files
from tcod_fast.envs.search_qa.env import SearchQAConfig, SearchQAEnv, make_search_qa_env, parse_search_qa_action
from tcod_fast.envs.search_qa.metrics import exact_match, f1_score, normalize_answer

__all__ = [
    "QACorpus",
    "Question",
    "SearchQAConfig",
    "SearchQAEnv",
    "exact_match",
    "f1_score",
    "generate_world",
    "load_qa_files",
    "make_search_qa_env",
    "normalize_answer",
    "parse_search_qa_action",
]
