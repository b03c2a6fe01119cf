"""Runtime instruction-set dispatch of the native kernels: every copy this CPU can run (portable,
AVX2/FMA) against the float64 reference, the default choice, and TCOD_FAST_NATIVE_ISA."""

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from tcod_fast import fused_turn_kl, turn_kl_reference
from tcod_fast.ops.turn_kl import native_backend

pytestmark = pytest.mark.skipif(not native_backend.is_available(), reason="native kernel disabled or no C++ toolchain")


def _isas():
    return native_backend.available_isas() if native_backend.try_load() else []


@pytest.mark.parametrize("isa", _isas())
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_every_instruction_set_matches_float64(isa, dtype):
    B, T, V = 2, 4, 1037  # full 512-column blocks and a ragged tail
    tol = dict(rtol=1e-4, atol=2e-5) if dtype == torch.float32 else dict(rtol=2e-2, atol=2e-3)
    turn_ids = torch.tensor([[0, 1, -1, 1], [2, 0, 1, 1]])
    for divergence in ("reverse_kl", "forward_kl", "jsd"):
        student = (torch.randn(B, T, V, dtype=torch.float64) * 3).to(dtype).requires_grad_(True)
        teacher = (torch.randn(B, T, V, dtype=torch.float64) * 3).to(dtype)
        kwargs = dict(divergence=divergence, beta=0.3, temperature=1.3, reduction="turn_mean", return_stats=True)
        with native_backend.use_isa(isa):
            assert native_backend.isa() == isa
            result = fused_turn_kl(student, teacher, turn_ids, backend="native", **kwargs)
            (grad,) = torch.autograd.grad(result.loss, student)
        ref_student = student.detach().double().requires_grad_(True)
        ref = turn_kl_reference(ref_student, teacher.double(), turn_ids, **kwargs)
        (ref_grad,) = torch.autograd.grad(ref.loss, ref_student)
        torch.testing.assert_close(result.loss.double(), ref.loss, **tol)
        torch.testing.assert_close(result.kl.double(), ref.kl, **tol)
        torch.testing.assert_close(result.entropy.double(), ref.entropy, **tol)
        scale = ref_grad.abs().max()
        torch.testing.assert_close(grad.double() / scale, ref_grad / scale, rtol=0, atol=2 * tol["rtol"])


@pytest.mark.parametrize("isa", _isas())
def test_every_instruction_set_is_exact_at_extreme_ranges(isa):
    """Logits at 1e8 with temperature 1e-6 (one-hot softmaxes, KL ~1e14) and logits a few nats
    apart after scaling but sitting at +-1e8."""
    x, y = torch.randn(3, 1037, dtype=torch.float64), torch.randn(3, 1037, dtype=torch.float64)
    cases = [(x * 1e8, y * 1e8), (x * 3e-6 + 1e8, (x + 0.3 * y) * 3e-6 - 2e8)]
    for student, teacher in cases:
        student = student.float().requires_grad_(True)
        teacher = teacher.float()
        with native_backend.use_isa(isa):
            kl = fused_turn_kl(student, teacher, temperature=1e-6, reduction="none", backend="native")
            (grad,) = torch.autograd.grad(kl.sum(), student)
        ref_student = student.detach().double().requires_grad_(True)
        ref = turn_kl_reference(ref_student, teacher.double(), temperature=1e-6, reduction="none")
        (ref_grad,) = torch.autograd.grad(ref.sum(), ref_student)
        torch.testing.assert_close(kl.double(), ref.detach(), rtol=1e-4, atol=1e-5)
        assert torch.isfinite(grad).all()
        bound = 1e-4 * (ref_grad.abs().amax(-1) + 1e6)
        assert ((grad.double() - ref_grad).abs().amax(-1) <= bound).all()


def test_default_is_the_best_the_cpu_runs():
    assert native_backend.available_isas()[0] == "portable"
    assert native_backend.isa() == native_backend.available_isas()[-1]


def test_unknown_instruction_set_is_refused():
    with pytest.raises(ValueError, match=r"instruction set must be 'portable' or 'avx2', got 'sse9'"):
        with native_backend.use_isa("sse9"):
            pass


_SCRIPT = textwrap.dedent(
    """
    from tcod_fast.ops.turn_kl import native_backend
    try:
        print("isa", native_backend.isa())
    except RuntimeError as exc:
        print("error", exc)
    """
)


def _isa_in_subprocess(value):
    env = {**os.environ, native_backend.ISA_ENV: value}
    out = subprocess.run([sys.executable, "-c", _SCRIPT], capture_output=True, text=True, timeout=300, env=env,
                         cwd=Path(__file__).resolve().parents[3])
    assert out.returncode == 0, out.stderr[-2000:]
    return out.stdout.strip().splitlines()[-1]


def test_environment_variable_forces_the_instruction_set():
    # (each call starts a Python with torch: "auto" is the in-process default tested above)
    assert _isa_in_subprocess("portable") == "isa portable"
    expected = "error TCOD_FAST_NATIVE_ISA must be one of ('auto', 'portable', 'avx2'), got 'sse9'"
    assert _isa_in_subprocess("sse9").startswith(expected)
    if "avx2" not in native_backend.available_isas():
        assert "this CPU runs only ['portable']" in _isa_in_subprocess("avx2")
