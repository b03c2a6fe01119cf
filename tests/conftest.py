"""Shared test setup: the Triton interpreter switch, and for the op tests under ``tests/ops/<op>/``
the backends each op runs on, the tolerances against the float64 reference and the kernel tiles.

Without a GPU the Triton kernels run under the Triton interpreter on CPU tensors, so CI checks
the very kernel code a GPU runs. The variable must be set before triton is first imported, which
is why it is set here, in the conftest pytest loads before any test module.
"""

import os
from pathlib import Path

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


# --------------------------------------------------------------------------------------------
# op tests: backends, tolerances, kernel tiles
# --------------------------------------------------------------------------------------------
_OPS_DIR = Path(__file__).parent / "ops"


def _op_of(path) -> str | None:
    """``turn_kl``, ``topk_turn_kl`` or ``fused_linear_turn_kl`` for a test under ``tests/ops/<op>/``."""
    path = Path(path)
    return path.parent.name if path.parent.parent == _OPS_DIR else None


def _row_kernel_backends(op: str) -> list:
    """``torch``, ``native`` and ``triton`` for a logits op, each skipped (with the reason) where
    it cannot run. The inputs live on CUDA where there is one; the top-k native kernel reads only
    CPU tensors, so it is skipped there."""
    import torch

    from tcod_fast.ops.topk_turn_kl import native_backend as topk_native
    from tcod_fast.ops.turn_kl import native_backend as logits_native
    from tcod_fast.ops.turn_kl import triton_backend

    cuda = torch.cuda.is_available()
    if op == "topk_turn_kl":
        native_ok, native_reason = not cuda and topk_native.is_available(), "CPU-only kernel, or no C++ toolchain to build it"
    else:
        native_ok, native_reason = logits_native.is_available(), "native kernel disabled or no C++ toolchain"
    triton_ok = triton_backend.HAS_TRITON and (cuda or triton_backend.interpreter_enabled())
    return [
        "torch",
        pytest.param("native", marks=pytest.mark.skipif(not native_ok, reason=native_reason)),
        pytest.param("triton", marks=pytest.mark.skipif(
            not triton_ok, reason="triton not installed, or no CUDA and TRITON_INTERPRET unset")),
    ]


def _fused_linear_modes() -> list:
    """The torch backend's two chunk modes and the Triton backend (CPU tensors: the interpreter)."""
    import torch

    from tcod_fast.ops.fused_linear_turn_kl import api

    triton_ok = api.triton_backend is not None and api.triton_backend.is_available(torch.device("cpu"))
    return ["slab", "stream", pytest.param("triton", marks=pytest.mark.skipif(
        not triton_ok, reason="triton not installed, or TRITON_INTERPRET unset"))]


@pytest.hookimpl(trylast=True)
def pytest_generate_tests(metafunc):
    """An op test that takes ``backend`` (``turn_kl``, ``topk_turn_kl``) or ``mode``
    (``fused_linear_turn_kl``: ``slab``, ``stream``, ``triton``) without parametrizing it itself
    runs on every one of them. ``trylast``: the backend is the last part of the test's id."""
    op = _op_of(metafunc.definition.path)
    if op is None:
        return
    explicit = {name.strip() for mark in metafunc.definition.iter_markers("parametrize")
                for name in (mark.args[0].split(",") if isinstance(mark.args[0], str) else mark.args[0])}
    if "backend" in metafunc.fixturenames and "backend" not in explicit and op != "fused_linear_turn_kl":
        metafunc.parametrize("backend", _row_kernel_backends(op))
    if "mode" in metafunc.fixturenames and "mode" not in explicit and op == "fused_linear_turn_kl":
        metafunc.parametrize("mode", _fused_linear_modes())


@pytest.fixture
def tolerances():
    """``tolerances(dtype)``: ``assert_close`` tolerances of a logits op against the float64
    reference. Low-precision logits are upcast exactly; only the float32 accumulation and the
    rounding of the gradient to the logits' dtype differ from the reference."""
    import torch

    def for_dtype(dtype):
        if dtype == torch.float32:
            return dict(rtol=1e-4, atol=2e-5)
        return dict(rtol=2e-2, atol=2e-3)

    return for_dtype


@pytest.fixture
def fused_linear_tolerances():
    """Per weight dtype: the largest error of values and of gradients (relative to the gradient's
    own scale) of a fused-linear op against the float64 reference. bfloat16 gradients carry about
    three significant digits."""
    import torch

    return {torch.float32: dict(value_tol=2e-5, grad_tol=2e-5), torch.bfloat16: dict(value_tol=2e-5, grad_tol=8e-3)}


@pytest.fixture(autouse=True)
def _small_kernel_tiles(request, monkeypatch):
    """Op tests run with small vocabulary blocks and tiles, so their small vocabularies span
    several blocks and a ragged tail in every dimension (the defaults are tuned for 32k-150k
    vocabularies). On a GPU the logits kernels keep their own block size."""
    if _op_of(request.node.path) is None:
        return
    import torch

    from tcod_fast.ops.fused_linear_topk_turn_kl import chunked as topk_chunked
    from tcod_fast.ops.fused_linear_turn_kl import api as fused_linear_api
    from tcod_fast.ops.fused_linear_turn_kl import chunked
    from tcod_fast.ops.topk_turn_kl import triton_backend as topk_triton
    from tcod_fast.ops.turn_kl import triton_backend as logits_triton

    if not torch.cuda.is_available():
        monkeypatch.setattr(logits_triton, "DEFAULT_BLOCK_V", 64)
        monkeypatch.setattr(topk_triton, "DEFAULT_BLOCK_V", 64)
    monkeypatch.setattr(chunked, "DEFAULT_VOCAB_BLOCK", 64)
    monkeypatch.setattr(topk_chunked, "VOCAB_BLOCK", 64)
    if fused_linear_api.triton_backend is not None:
        # tiles of 16 rows x 32 columns x 16 hidden
        monkeypatch.setattr(fused_linear_api.triton_backend, "DEFAULT_BLOCK_M", 16)
        monkeypatch.setattr(fused_linear_api.triton_backend, "DEFAULT_BLOCK_V", 32)
        monkeypatch.setattr(fused_linear_api.triton_backend, "DEFAULT_BLOCK_K", 16)
