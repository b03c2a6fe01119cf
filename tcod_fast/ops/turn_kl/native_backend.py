"""``native`` backend: the C++/OpenMP kernel in ``csrc/turn_kl_cpu.cpp`` (CPU tensors).

Extra memory: two float32 rows of V per thread (the cached pass-1 exponentials), never N x V.

The extension is compiled on first use with ninja through ``torch.utils.cpp_extension`` and
cached (``TORCH_EXTENSIONS_DIR``, default ``~/.cache/torch_extensions``); later imports load the
cached build in milliseconds. It includes no torch headers (only pybind11), so a cold build
takes about 60 s on two cores.
If the build fails the op falls back to the ``torch`` backend and warns once.

Instruction sets: on x86-64 the build targets baseline x86-64 and holds two copies of the
kernels, a portable one and an AVX2/FMA one; the best the CPU runs is chosen when the extension
loads (:func:`isa` says which). ``TCOD_FAST_NATIVE_ISA=portable`` (or ``avx2``, or ``auto``, the
default) forces one; a value the CPU cannot run is an error. One cached build serves every
x86-64 machine.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import platform
import threading
import warnings
from pathlib import Path

import torch

_DTYPE_CODES = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}
_DIVERGENCE_CODES = {"reverse_kl": 0, "forward_kl": 1, "jsd": 2}
SUPPORTED_DTYPES = tuple(_DTYPE_CODES)

_lock = threading.Lock()
_module = None
_error: str | None = None
_warned = False


def _source_dir() -> Path:
    installed = Path(__file__).resolve().parents[2] / "_csrc"
    if installed.is_dir():
        return installed
    return Path(__file__).resolve().parents[3] / "csrc"


ISA_ENV = "TCOD_FAST_NATIVE_ISA"
ISA_CHOICES = ("auto", "portable", "avx2")


def _build_tag() -> str:
    """The build targets the architecture's baseline, so one cache serves every CPU of it."""
    return hashlib.sha1(platform.machine().encode()).hexdigest()[:10]


def _apply_isa_env(module) -> None:
    requested = os.environ.get(ISA_ENV, "auto").strip().lower() or "auto"
    if requested not in ISA_CHOICES:
        raise RuntimeError(f"{ISA_ENV} must be one of {ISA_CHOICES}, got {requested!r}")
    if requested == "auto":
        return
    supported = list(module.supported_isas())
    if requested not in supported:
        raise RuntimeError(f"{ISA_ENV}={requested} but this CPU runs only {supported}")
    module.set_isa(requested)


def load(verbose: bool = False):
    """Build (first time) and import the extension. Raises on failure."""
    global _module, _error
    with _lock:
        if _module is not None:
            return _module
        if _error is not None:
            raise RuntimeError(_error)
        from torch.utils import cpp_extension

        source = _source_dir() / "turn_kl_cpu.cpp"
        if not source.is_file():
            _error = f"native kernel source not found at {source}"
            raise RuntimeError(_error)
        flags = ["-O3", "-std=c++17", "-fopenmp", "-fno-math-errno", "-fno-trapping-math"]
        if platform.machine() in ("x86_64", "AMD64"):
            # baseline x86-64: the AVX2 copy of the kernels is compiled with a target pragma and
            # chosen at run time (csrc/turn_kl_cpu.cpp)
            flags += ["-march=x86-64", "-mtune=generic"]
        try:
            module = cpp_extension.load(
                name=f"tcod_fast_native_{_build_tag()}",
                sources=[str(source)],
                extra_cflags=flags,
                extra_ldflags=["-fopenmp"],
                verbose=verbose,
            )
        except Exception as exc:  # compiler missing, headers missing, ...
            _error = f"building the native CPU kernel failed: {type(exc).__name__}: {exc}"
            raise RuntimeError(_error) from exc
        try:
            _apply_isa_env(module)
        except RuntimeError as exc:
            _error = str(exc)
            raise
        _module = module
        return _module


def isa() -> str:
    """The instruction set the native kernels run with: ``"avx2"`` or ``"portable"``."""
    return load().isa()


def available_isas() -> list[str]:
    """The instruction sets this CPU can run the native kernels with (best last)."""
    return list(load().supported_isas())


@contextlib.contextmanager
def use_isa(name: str):
    """Run the native kernels with instruction set ``name`` inside the block (tests, benchmarks)."""
    module = load()
    previous = module.isa()
    module.set_isa(name)
    try:
        yield
    finally:
        module.set_isa(previous)


def is_available() -> bool:
    """True when the native kernel is built (building it now if needed); warns once if not."""
    global _warned
    if os.environ.get("TCOD_FAST_DISABLE_NATIVE") == "1":
        return False
    try:
        load()
        return True
    except RuntimeError as exc:
        if not _warned:
            warnings.warn(f"tcod_fast: {exc}; using the torch backend on CPU instead", RuntimeWarning, stacklevel=3)
            _warned = True
        return False


def forward(
    student, teacher, keep, target_ids, divergence, beta, temperature, vocab_size, grad, grad_scale=None,
    want_entropy=True,
):
    """See ``torch_backend`` for the contract. CPU tensors only.

    ``want_entropy=False`` skips the entropy sum (about 9% of the kernel) and returns zeros for it.
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
        student.data_ptr(), _DTYPE_CODES[student.dtype],
        teacher.data_ptr(), _DTYPE_CODES[teacher.dtype],
        grad_ptr, keep.data_ptr(), 0 if target is None else target.data_ptr(),
        0 if scale is None else scale.data_ptr(),
        B, T,
        student.stride(0), student.stride(1), teacher.stride(0), teacher.stride(1), g_sb, g_st,
        vocab_size, grad_cols, _DIVERGENCE_CODES[divergence], float(beta), 1.0 / temperature,
        outs[0].data_ptr(), outs[1].data_ptr() if want_entropy else 0, outs[2].data_ptr(), outs[3].data_ptr(),
        torch.get_num_threads(),
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
        grad.data_ptr(), _DTYPE_CODES[grad.dtype], factor.data_ptr(), B, T, grad.stride(0), grad.stride(1), V,
        torch.get_num_threads(),
    )
