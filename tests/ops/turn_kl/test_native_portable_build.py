"""The portable copy of the native kernels (baseline x86-64: SSE2 only) computes what every other
copy this CPU runs computes (avx2, avx2x16, avx512; csrc/cpu_isa.h). The extension is built for
baseline x86-64 and holds every copy, chosen at run time; CI machines and users' CPUs differ, so
each is checked on every machine that runs it, here against the portable copy (tight tolerances,
including extreme logit ranges) and in tests/ops/turn_kl/test_native_isa.py against float64."""

import platform

import pytest
import torch
from float32_tolerances import kernel_copies_tolerance

from tcod_fast.ops.common import NATIVE_DTYPE_CODES as _DTYPES
from tcod_fast.ops.turn_kl import native_backend

pytestmark = [
    pytest.mark.skipif(platform.machine() not in ("x86_64", "AMD64"), reason="the AVX2 copy is x86-64 only"),
    pytest.mark.skipif(not native_backend.is_available(), reason="native kernel disabled or no C++ toolchain"),
]


def _run(isa, student, teacher, keep, divergence, temperature, logit_maps=(1.0, 0.0, 1.0, 0.0)):
    """``logit_maps``: ``(scale_s, cap_s, scale_t, cap_t)``, the identity by default."""
    B, T, V = student.shape
    outs = [torch.zeros(B, T) for _ in range(4)]
    grad = torch.empty_like(student)
    with native_backend.use_isa(isa):
        native_backend.load().turn_kl_forward(
            student.data_ptr(), _DTYPES[student.dtype], teacher.data_ptr(), _DTYPES[teacher.dtype],
            grad.data_ptr(), keep.data_ptr(), 0, 0, B, T,
            student.stride(0), student.stride(1), teacher.stride(0), teacher.stride(1), grad.stride(0),
            grad.stride(1), V, V, divergence, 0.3, 1.0 / temperature, *(o.data_ptr() for o in outs), 2, *logit_maps,
        )
    return outs[0], outs[1], grad


def _vector_copies():
    if not native_backend.try_load():
        return []
    return [isa for isa in native_backend.available_isas() if isa != "portable"]


@pytest.mark.parametrize("copy", _vector_copies() or [pytest.param(
    "avx2", marks=pytest.mark.skip(reason="this CPU runs only the portable copy (test_native_isa.py still checks it)"))])
def test_portable_copy_matches_the_vector_copies(copy):
    B, T, V = 2, 9, 1037  # two full 512-column blocks (the vector loops) and a ragged tail
    keep = torch.ones(B, T, dtype=torch.bool)
    keep[1, 4] = False
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        student = (torch.randn(B, T, V) * 3).to(dtype)
        teacher = (torch.randn(B, T, V) * 3).to(dtype)
        student[0, 2, :700] = float("-inf")  # whole blocks of -inf, shared with the teacher
        teacher[0, 2, :700] = float("-inf")
        for divergence in (0, 1, 2):
            ours = _run("portable", student, teacher, keep, divergence, 1.7)
            theirs = _run(copy, student, teacher, keep, divergence, 1.7)
            for name, a, b in zip(["divergence", "entropy", "gradient"], ours, theirs):
                assert torch.isfinite(a.float()).all(), name
                torch.testing.assert_close(a.float(), b.float(), **kernel_copies_tolerance(name, V, dtype, b), msg=lambda m, n=name: f"{n}: {m}")
            # soft-capped and scaled logits (softcap 2.5 and a scale on the student, 4 on the teacher)
            ours = _run("portable", student, teacher, keep, divergence, 1.7, (1.3, 2.5, 1.0, 4.0))
            theirs = _run(copy, student, teacher, keep, divergence, 1.7, (1.3, 2.5, 1.0, 4.0))
            for name, a, b in zip(["divergence", "entropy", "gradient"], ours, theirs):
                assert torch.isfinite(a.float()).all(), name
                torch.testing.assert_close(a.float(), b.float(), **kernel_copies_tolerance(name, V, dtype, b),
                                           msg=lambda m, n=name: f"softcap {n}: {m}")
    # extreme ranges: logits at 1e8 (one-hot after scaling) and a few nats apart at an offset
    x, y = torch.randn(B, T, V), torch.randn(B, T, V)
    for student, teacher, temperature in [(x * 1e8, y * 1e8, 1e-6), (x * 3e-6 + 1e8, y * 3e-6 - 2e8, 1e-6)]:
        for divergence in (0, 1, 2):
            ours = _run("portable", student, teacher, keep, divergence, temperature)
            theirs = _run(copy, student, teacher, keep, divergence, temperature)
            for name, a, b in zip(["divergence", "entropy", "gradient"], ours, theirs):
                assert torch.isfinite(a).all(), name
                scale = b.abs().amax(-1, keepdim=True) + (1 / temperature if name == "gradient" else 1.0)
                torch.testing.assert_close(a / scale, b / scale, rtol=0, atol=1e-5, msg=lambda m, n=name: f"{n}: {m}")
