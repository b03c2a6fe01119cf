"""Shared fixtures of the demo tests."""

import pytest
import torch


@pytest.fixture(autouse=True)
def _restore_torch_threads():
    # The demo sets torch's thread count to 1 (one per worker process); give the rest of the
    # test session back what it had.
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)
