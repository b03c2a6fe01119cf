"""``native`` backend: the C++/OpenMP kernel in ``csrc/turn_kl_cpu.cpp`` (CPU tensors).

Extra memory: two float32 rows of V per thread (the cached pass-1 exponentials), never N x V.

The extension is compiled on first use with ninja (``tcod_fast/ops/native_extension.py``), saying
so on stderr when the build starts and ends, and cached; later processes load the cached build in
milliseconds. It includes no torch headers (only pybind11). :func:`is_available` never compiles;
:func:`try_load` (what ``backend="auto"`` calls) builds on first use, and if the build fails the
op falls back to the ``torch`` backend and warns once.

Instruction sets: on x86-64 the build targets baseline x86-64 and holds four copies of the
kernels (``csrc/cpu_isa.h``): ``portable``, ``avx2`` (AVX2 + FMA + F16C, 8 lanes), ``avx512``
(AVX-512 F/BW/VL/DQ, 16 lanes) and ``avx2x16`` (the 16-lane logic on AVX2, so that it is tested on
any AVX2 machine). The best the CPU runs is chosen when the extension loads (:func:`isa` says
which); ``TCOD_FAST_NATIVE_ISA=portable|avx2|avx512`` (or ``avx2x16``, or ``auto``, the default)
forces one, and a value the CPU cannot run is an error. One cached build serves every x86-64
machine.
"""

from __future__ import annotations

import torch

from tcod_fast.ops import native_extension
from tcod_fast.ops.common import DIVERGENCE_CODES, NATIVE_DTYPE_CODES
from tcod_fast.ops.logit_transform import IDENTITY
from tcod_fast.ops.native_extension import NativeExtension, build_tag

SUPPORTED_DTYPES = tuple(NATIVE_DTYPE_CODES)
SOURCE_NAME = "turn_kl_cpu.cpp"
ISA_ENV, ISA_CHOICES = native_extension.ISA_ENV, native_extension.ISA_CHOICES


class _TurnKLExtension(NativeExtension):
    source_name = SOURCE_NAME

    def build_name(self) -> str:
        return f"tcod_fast_native_{build_tag()}"


_EXTENSION = _TurnKLExtension()


# The module's loading API (see NativeExtension): load() builds on first call and raises on
# failure; is_available() never compiles; try_load() is what backend="auto" calls.
source_path = _EXTENSION.source
load = _EXTENSION.load
is_available = _EXTENSION.is_available
try_load = _EXTENSION.try_load

isa = _EXTENSION.isa
available_isas = _EXTENSION.available_isas
use_isa = _EXTENSION.use_isa


def forward(
    student, teacher, keep, target_ids, divergence, beta, temperature, vocab_size, grad, grad_scale=None,
    want_entropy=True, student_transform=IDENTITY, teacher_transform=IDENTITY,
):
    """See ``torch_backend`` for the contract. CPU tensors only.

    ``want_entropy=False`` skips the entropy sum (about 9% of the kernel) and returns zeros for it.
    The logit maps are applied in the kernel, to each block as it is read.
    """
    module = load()
    B, T = keep.shape
    keep = keep.contiguous()
    outs = [torch.empty(B, T, dtype=torch.float32) for _ in range(4)]
    if not want_entropy:
        outs[1].zero_()
    target = None if target_ids is None else target_ids.to(torch.int64).contiguous()
    grad_ptr, g_sb, g_st, grad_cols = 0, 0, 0, 0
    if grad is not None:
        grad_ptr, (g_sb, g_st, _), grad_cols = grad.data_ptr(), grad.stride(), grad.shape[-1]
    scale = None if grad_scale is None or grad is None else grad_scale.to(torch.float32).contiguous()
    module.turn_kl_forward(
        student.data_ptr(), NATIVE_DTYPE_CODES[student.dtype],
        teacher.data_ptr(), NATIVE_DTYPE_CODES[teacher.dtype],
        grad_ptr, keep.data_ptr(), 0 if target is None else target.data_ptr(),
        0 if scale is None else scale.data_ptr(),
        B, T,
        student.stride(0), student.stride(1), teacher.stride(0), teacher.stride(1), g_sb, g_st,
        vocab_size, grad_cols, DIVERGENCE_CODES[divergence], float(beta), 1.0 / temperature,
        outs[0].data_ptr(), outs[1].data_ptr() if want_entropy else 0, outs[2].data_ptr(), outs[3].data_ptr(),
        torch.get_num_threads(), *student_transform.as_floats(), *teacher_transform.as_floats(),
    )
    return tuple(outs)


def scale_rows_(grad: torch.Tensor, factor: torch.Tensor) -> None:
    """``grad[b, t, :] *= factor[b, t]`` in place, skipping rows whose factor is exactly 1.

    grad ``(B, T, V)`` float32/bfloat16/float16 with a contiguous last dim; factor ``(B, T)``.
    """
    module = load()
    B, T, V = grad.shape
    factor = factor.to(torch.float32).contiguous()
    module.scale_rows(
        grad.data_ptr(), NATIVE_DTYPE_CODES[grad.dtype], factor.data_ptr(), B, T, grad.stride(0), grad.stride(1), V,
        torch.get_num_threads(),
    )
