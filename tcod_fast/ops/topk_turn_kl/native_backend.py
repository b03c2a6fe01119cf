"""``native`` backend: the C++/OpenMP kernel in ``csrc/topk_turn_kl_cpu.cpp`` (CPU tensors).

Extra memory: one float32 row of V per thread (the cached exponentials), never N x V.

Built on first use with ninja like ``fused_turn_kl``'s kernel (``tcod_fast/ops/native_extension.py``)
and cached under ``TORCH_EXTENSIONS_DIR``: the same instruction-set copies (portable, avx2,
avx512, avx2x16), chosen at run time the same way (:func:`isa`, ``TCOD_FAST_NATIVE_ISA``).
:func:`is_available` never compiles; :func:`try_load` (what ``backend="auto"`` calls) builds on
first use, and if the build fails the op falls back to the ``torch`` backend and warns once. See
``torch_backend`` for the backend contract.
"""

from __future__ import annotations

import torch

from tcod_fast.ops.common import DIVERGENCE_CODES, NATIVE_DTYPE_CODES
from tcod_fast.ops.logit_transform import IDENTITY
from tcod_fast.ops.native_extension import NativeExtension, build_tag

_TAIL_CODES = {"bucket": 0, "renormalize": 1}
SUPPORTED_DTYPES = tuple(NATIVE_DTYPE_CODES)
SOURCE_NAME = "topk_turn_kl_cpu.cpp"


class _TopkExtension(NativeExtension):
    source_name = SOURCE_NAME
    label = "top-k "

    def build_name(self) -> str:
        return f"tcod_fast_topk_native_{build_tag()}"


_EXTENSION = _TopkExtension()


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
    student, topk_ids, topk_logprobs, keep, target_ids, divergence, beta, temperature, tail, tail_eps, grad,
    grad_scale=None, want_entropy=True, module=None, student_transform=IDENTITY,
):
    """See ``torch_backend`` for the contract. CPU tensors only; ``module``: a build to use instead
    of the default one. The logit map is applied in the kernel, as the logits are read."""
    module = module or load()
    B, T = keep.shape
    V = student.shape[-1]
    K = topk_ids.shape[-1]
    keep = keep.contiguous()
    topk_ids = topk_ids.to(torch.int32).contiguous()
    topk_logprobs = topk_logprobs.to(torch.float32).contiguous()
    outs = [torch.empty(B, T, dtype=torch.float32) for _ in range(4)]
    if not want_entropy:
        outs[1].zero_()
    target = None if target_ids is None else target_ids.to(torch.int64).contiguous()
    grad_ptr, g_sb, g_st = 0, 0, 0
    if grad is not None:
        grad_ptr, (g_sb, g_st, _) = grad.data_ptr(), grad.stride()
    scale = None if grad_scale is None or grad is None else grad_scale.to(torch.float32).contiguous()
    module.topk_turn_kl_forward(
        student.data_ptr(), NATIVE_DTYPE_CODES[student.dtype], grad_ptr, topk_ids.data_ptr(), topk_logprobs.data_ptr(),
        keep.data_ptr(), 0 if target is None else target.data_ptr(), 0 if scale is None else scale.data_ptr(),
        B, T, student.stride(0), student.stride(1), g_sb, g_st, V, K,
        DIVERGENCE_CODES[divergence], float(beta), _TAIL_CODES[tail], float(tail_eps), 1.0 / temperature,
        outs[0].data_ptr(), outs[1].data_ptr() if want_entropy else 0, outs[2].data_ptr(), outs[3].data_ptr(),
        bool(want_entropy or target_ids is not None), torch.get_num_threads(), *student_transform.as_floats(),
    )
    return tuple(outs)
