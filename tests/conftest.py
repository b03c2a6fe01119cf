"""Shared test setup.

Without a GPU the Triton kernels run under the Triton interpreter on CPU tensors, so CI checks
the very kernel code a GPU runs. The variable must be set before triton is first imported.
"""

import os

import pytest


def _cuda_available() -> bool:
    try:
        import torch

        return torch.cuda.is_available()
    except Exception:
        return False


if not _cuda_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


def pytest_configure(config):
    # The interpreter evaluates both sides of tl.where with numpy; masked lanes (-inf - -inf)
    # warn there although the selected values are finite.
    config.addinivalue_line("filterwarnings", "ignore:invalid value encountered:RuntimeWarning")
    config.addinivalue_line("filterwarnings", "ignore:overflow encountered:RuntimeWarning")


@pytest.fixture(autouse=True)
def _seed():
    import torch

    torch.manual_seed(1234)
