"""The native kernel built for a baseline x86-64 CPU (no AVX, so none of the AVX2/FMA code and
every loop in its portable form) computes what the ``-march=native`` build used everywhere
else computes. CI machines and users' CPUs differ; this keeps the portable path honest rather
than exercised only on block tails."""

import platform

import pytest
import torch

from tcod_fast.ops.turn_kl import native_backend

pytestmark = [
    pytest.mark.skipif(platform.machine() not in ("x86_64", "AMD64"), reason="the baseline flags are x86-64 ones"),
    pytest.mark.skipif(not native_backend.is_available(), reason="native C++ build failed"),
]

_DTYPES = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}


def _run(module, student, teacher, keep, divergence, temperature):
    B, T, V = student.shape
    outs = [torch.zeros(B, T) for _ in range(4)]
    grad = torch.empty_like(student)
    module.turn_kl_forward(
        student.data_ptr(), _DTYPES[student.dtype], teacher.data_ptr(), _DTYPES[teacher.dtype],
        grad.data_ptr(), keep.data_ptr(), 0, 0, B, T,
        student.stride(0), student.stride(1), teacher.stride(0), teacher.stride(1), grad.stride(0), grad.stride(1),
        V, V, divergence, 0.3, 1.0 / temperature, *(o.data_ptr() for o in outs), 2,
    )
    return outs[0], outs[1], grad


def test_baseline_x86_64_build_matches_the_native_build(tmp_path):
    from torch.utils import cpp_extension

    portable = cpp_extension.load(
        name="tcod_fast_native_portable_test",
        sources=[str(native_backend._source_dir() / "turn_kl_cpu.cpp")],
        extra_cflags=["-O3", "-std=c++17", "-fopenmp", "-fno-math-errno", "-fno-trapping-math", "-march=x86-64"],
        extra_ldflags=["-fopenmp"],
        build_directory=str(tmp_path),
    )
    native = native_backend.load()
    B, T, V = 2, 9, 1037  # two full 512-column blocks (the vector loops) and a ragged tail
    keep = torch.ones(B, T, dtype=torch.bool)
    keep[1, 4] = False
    for dtype in (torch.float32, torch.bfloat16):
        student = (torch.randn(B, T, V) * 3).to(dtype)
        teacher = (torch.randn(B, T, V) * 3).to(dtype)
        student[0, 2, :700] = float("-inf")  # whole blocks of -inf, shared with the teacher
        teacher[0, 2, :700] = float("-inf")
        for divergence in (0, 1, 2):
            ours = _run(portable, student, teacher, keep, divergence, 1.7)
            theirs = _run(native, student, teacher, keep, divergence, 1.7)
            for name, a, b in zip(["divergence", "entropy", "gradient"], ours, theirs):
                assert torch.isfinite(a.float()).all(), name
                # float32 results agree to rounding; a gradient stored in bfloat16 may round one
                # ulp apart when the float32 values differ in their last bits
                rtol = 2**-7 if name == "gradient" and dtype == torch.bfloat16 else 1e-5
                torch.testing.assert_close(
                    a.float(), b.float(), rtol=rtol, atol=2e-6, msg=lambda m, n=name: f"{n}: {m}"
                )
    # extreme ranges: logits at 1e8 (one-hot after scaling) and a few nats apart at an offset
    x, y = torch.randn(B, T, V), torch.randn(B, T, V)
    for student, teacher, temperature in [(x * 1e8, y * 1e8, 1e-6), (x * 3e-6 + 1e8, y * 3e-6 - 2e8, 1e-6)]:
        for divergence in (0, 1, 2):
            ours = _run(portable, student, teacher, keep, divergence, temperature)
            theirs = _run(native, student, teacher, keep, divergence, temperature)
            for name, a, b in zip(["divergence", "entropy", "gradient"], ours, theirs):
                assert torch.isfinite(a).all(), name
                scale = b.abs().amax(-1, keepdim=True) + (1 / temperature if name == "gradient" else 1.0)
                torch.testing.assert_close(a / scale, b / scale, rtol=0, atol=1e-5, msg=lambda m, n=name: f"{n}: {m}")
