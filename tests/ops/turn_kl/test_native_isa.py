"""Runtime instruction-set dispatch of the native kernels (csrc/cpu_isa.h): every copy this CPU can
run (portable, avx2, avx2x16 = the AVX-512 copy's 16-lane logic on AVX2, avx512) against the
float64 reference, for both native kernels; the choice of copy from (faked) CPU flags; the
default choice; TCOD_FAST_NATIVE_ISA; and that the AVX-512 copy really holds 512-bit code."""

import os
import platform
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from tcod_fast import fused_topk_turn_kl, fused_turn_kl, topk_turn_kl_reference, turn_kl_reference
from tcod_fast.ops.native_extension import COPIES
from tcod_fast.ops.topk_turn_kl import native_backend as topk_native
from tcod_fast.ops.turn_kl import native_backend

pytestmark = pytest.mark.skipif(not native_backend.is_available(), reason="native kernel disabled or no C++ toolchain")

_X86 = platform.machine() in ("x86_64", "AMD64")


def _copies():
    """Every copy on x86-64, those this CPU cannot run skipped with the reason (the portable copy elsewhere)."""
    if not _X86:
        return ["portable"]
    runnable = native_backend.available_isas() if native_backend.try_load() else []
    needs = {"avx2": "AVX2, FMA and F16C", "avx2x16": "AVX2, FMA and F16C", "avx512": "AVX-512 F/BW/VL/DQ"}
    return [isa if isa in runnable or isa == "portable" else
            pytest.param(isa, marks=pytest.mark.skip(reason=f"this CPU lacks {needs[isa]} for the {isa} copy"))
            for isa in COPIES]


@pytest.mark.parametrize("isa", _copies())
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


@pytest.mark.parametrize("isa", _copies())
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


@pytest.mark.parametrize("isa", _copies())
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_every_instruction_set_of_the_topk_kernel_matches_float64(isa, dtype):
    B, T, V, K = 2, 4, 1037, 6
    tol = dict(rtol=1e-4, atol=2e-5) if dtype == torch.float32 else dict(rtol=2e-2, atol=2e-3)
    turn_ids = torch.tensor([[0, 1, -1, 1], [2, 0, 1, 1]])
    logprobs, ids = torch.log_softmax(torch.randn(B, T, V, dtype=torch.float64) * 3, -1).topk(K, -1)
    logprobs = logprobs.float()
    for divergence in ("reverse_kl", "forward_kl", "jsd"):
        for tail in ("bucket", "renormalize"):
            student = (torch.randn(B, T, V, dtype=torch.float64) * 3).to(dtype).requires_grad_(True)
            kwargs = dict(divergence=divergence, beta=0.3, temperature=1.3, tail=tail, return_stats=True)
            with topk_native.use_isa(isa):
                assert topk_native.isa() == isa
                result = fused_topk_turn_kl(student, ids, logprobs, turn_ids, backend="native", **kwargs)
                (grad,) = torch.autograd.grad(result.loss, student)
            ref_student = student.detach().double().requires_grad_(True)
            ref = topk_turn_kl_reference(ref_student, ids, logprobs, turn_ids, **kwargs)
            (ref_grad,) = torch.autograd.grad(ref.loss, ref_student)
            torch.testing.assert_close(result.loss.double(), ref.loss, **tol)
            torch.testing.assert_close(result.entropy.double(), ref.entropy, **tol)
            scale = ref_grad.abs().max()
            torch.testing.assert_close(grad.double() / scale, ref_grad / scale, rtol=0, atol=2 * tol["rtol"])


# ---- the choice of copy ----

_AVX2 = ["sse4_2", "avx", "avx2", "fma", "f16c"]
_AVX512 = _AVX2 + ["avx512f", "avx512bw", "avx512vl", "avx512dq"]


@pytest.mark.parametrize("module", [native_backend, topk_native], ids=["turn_kl", "topk"])
@pytest.mark.parametrize("flags, expected", [
    ([], "portable"),
    (["sse4_2", "avx"], "portable"),
    (["avx2", "fma"], "portable"),  # no F16C: the 16-bit conversions need it
    (_AVX2, "avx2"),
    (_AVX512, "avx512"),
    (_AVX512 + ["avx512_bf16"], "avx512"),
    ([f for f in _AVX512 if f != "avx512dq"], "avx2"),  # AVX-512 without DQ: the AVX2 copy
    (["avx512f", "avx512bw", "avx512vl", "avx512dq"], "portable"),  # the copy also needs AVX2, FMA and F16C
])
def test_the_copy_is_chosen_from_the_cpu_flags(module, flags, expected):
    """The choice with faked CPU flags: what a CPU with them would run (only the portable copy
    exists off x86-64)."""
    assert module.load().isa_for_flags(flags) == (expected if _X86 else "portable")


def test_default_is_the_best_the_cpu_runs():
    for module in (native_backend, topk_native):
        assert module.available_isas()[0] == "portable"
        assert module.isa() == module.available_isas()[-1]
        assert module.isa() == module.load().isa_for_flags(module.load().cpu_flags())
        assert module.isa() != "avx2x16"  # the test copy is never the default


def test_unknown_instruction_set_is_refused():
    with pytest.raises(ValueError, match=r"instruction set must be 'portable', 'avx2', 'avx512' or 'avx2x16', got 'sse9'"):
        with native_backend.use_isa("sse9"):
            pass


def test_a_copy_the_cpu_cannot_run_is_refused():
    missing = [isa for isa in COPIES if isa not in native_backend.available_isas()]
    if not missing:
        pytest.skip("this CPU runs every copy")
    with pytest.raises(ValueError, match=rf"the {missing[-1]} kernels need a CPU with .*; this one runs only 'portable'"):
        with native_backend.use_isa(missing[-1]):
            pass


_SCRIPT = textwrap.dedent(
    """
    from tcod_fast.ops.topk_turn_kl import native_backend as topk_native
    from tcod_fast.ops.turn_kl import native_backend
    try:
        print("isa", native_backend.isa(), topk_native.isa())
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
    assert _isa_in_subprocess("portable") == "isa portable portable"
    expected = "error TCOD_FAST_NATIVE_ISA must be one of ('auto', 'portable', 'avx2', 'avx512', 'avx2x16'), got 'sse9'"
    assert _isa_in_subprocess("sse9").startswith(expected)
    if "avx512" in native_backend.available_isas():
        assert _isa_in_subprocess("avx512") == "isa avx512 avx512"
    else:
        assert "TCOD_FAST_NATIVE_ISA=avx512 but this CPU runs only" in _isa_in_subprocess("avx512")


# ---- what the build holds ----

@pytest.mark.skipif(not _X86, reason="the AVX-512 copy is x86-64 only")
@pytest.mark.skipif(shutil.which("objdump") is None, reason="objdump (binutils) is not installed")
@pytest.mark.parametrize("module", [native_backend, topk_native], ids=["turn_kl", "topk"])
def test_the_avx512_copy_holds_512_bit_instructions(module):
    """Disassembles the AVX-512 copy's object: it must use zmm registers (the 16-lane vectors really
    compiled to 512-bit instructions), and the AVX2 copies none."""
    build_dir = Path(module.load().__file__).parent
    stem = module.SOURCE_NAME.removesuffix(".cpp")

    def zmm_lines(copy):
        obj = build_dir / f"{stem}_{copy}.o"
        assert obj.is_file(), f"{obj} is not in the build folder"
        listing = subprocess.run(["objdump", "-d", "--no-show-raw-insn", str(obj)], capture_output=True, text=True,
                                 check=True).stdout
        return sum("%zmm" in line for line in listing.splitlines())

    assert zmm_lines("avx512") > 100
    assert zmm_lines("avx2") == 0
    assert zmm_lines("avx2x16") == 0
