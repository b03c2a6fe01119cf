"""Shared fixtures of the trainer tests (helpers live in trainer_helpers.py)."""

import pytest
import torch
from trainer_helpers import build_toy_tokenizer


@pytest.fixture(autouse=True)
def _restore_torch_threads():
    # The trainer sets torch's thread count from its config (1 here: tiny models on shared
    # cores); give the rest of the test session back what it had.
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def toy_tokenizer():
    return build_toy_tokenizer()
