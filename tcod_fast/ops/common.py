"""What every op under ``tcod_fast/ops/`` shares: option names and the integer codes the kernels
take for them, the dtypes each backend accepts, argument checks, and how ``backend="auto"`` is
resolved.

The codes are a contract with the kernels: ``DIVERGENCE_CODES`` is ``enum Divergence`` of
``csrc/cpu_kernel_common.h`` and the ``DIVERGENCE`` constexpr of every Triton kernel;
``NATIVE_DTYPE_CODES`` is ``enum DType`` there. This module imports no op package, so every module
of ``tcod_fast.ops`` can import it.
"""

from __future__ import annotations

import torch

DIVERGENCE_CODES = {"reverse_kl": 0, "forward_kl": 1, "jsd": 2}
DIVERGENCES = tuple(DIVERGENCE_CODES)
REDUCTIONS = ("mean", "sum", "none", "seq_mean_token_mean", "turn_mean")

# The native kernels read float32, bfloat16 and float16 logits (dtype code per tensor).
NATIVE_DTYPE_CODES = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}
# What the entry points accept; float64 runs on the torch backend only (gradcheck, references).
FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)

BACKENDS = ("auto", "triton", "native", "torch")


def shape_str(shape) -> str:
    """``(2, 3, 5)``: a shape as error messages print it."""
    return "(" + ", ".join(str(int(d)) for d in shape) + ")"


def compute_dtype(*tensors: torch.Tensor | None) -> torch.dtype:
    """float32 accumulation always; float64 when any given tensor is float64 (gradcheck)."""
    for x in tensors:
        if x is not None and x.dtype == torch.float64:
            return torch.float64
    return torch.float32


def check_float_tensor(name: str, x, dims: tuple[int, ...]) -> None:
    """``x`` is a tensor of one of ``FLOAT_DTYPES`` with one of the ranks ``dims``."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if x.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{name} must be float32/bfloat16/float16/float64, got {x.dtype}")
    if x.dim() not in dims:
        expected = " or ".join(f"{d}-D" for d in dims)
        raise ValueError(f"{name} must be {expected}, got {x.dim()}-D shape {shape_str(x.shape)}")


def resolve_backend(backend: str, device: torch.device, dtype: torch.dtype, native, triton, native_ready) -> str:
    """The backend a row-kernel op runs with.

    ``"auto"``: torch for float64, Triton on CUDA, the native kernel on CPU when it loads, else
    torch. An explicit choice is checked against the device and dtype and raises, naming what
    was expected, when it cannot run.

    Args:
        native, triton: the op's ``native_backend`` and ``triton_backend`` modules.
        native_ready: a callable that loads the native extension (building it on first use) and
            returns whether it works; ops mark it constant for ``torch.compile``.
    """
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if backend == "auto":
        if dtype == torch.float64:
            return "torch"
        if device.type == "cuda" and triton.is_available(device):
            return "triton"
        if device.type == "cpu" and native_ready():
            return "native"
        return "torch"
    if backend == "native":
        if device.type != "cpu":
            raise ValueError(f"backend='native' runs on CPU tensors, got tensors on {device}")
        if dtype not in native.SUPPORTED_DTYPES:
            raise TypeError(f"backend='native' supports float32/bfloat16/float16 logits, got {dtype}")
        if not native_ready():
            native.load()  # raises with the build error
    if backend == "triton":
        if not triton.HAS_TRITON:
            raise RuntimeError("backend='triton' needs the triton package: pip install 'tcod-fast[triton]'")
        if not triton.is_available(device):
            raise ValueError(
                f"backend='triton' runs on CUDA tensors (or CPU tensors with TRITON_INTERPRET=1), got {device}"
            )
        if dtype == torch.float64:
            raise TypeError("backend='triton' supports float32/bfloat16/float16 logits, got torch.float64")
    return backend
