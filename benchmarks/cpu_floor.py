"""What the CPU benchmarks of the logits ops share: the CPU's SIMD flags, the instruction set the
native kernels and Inductor's code are held to, and the op's memory floor measured in the same run.

The floor is the time the machine's own copy takes for the bytes an op must move. It is given twice:

* ``floor_s``: into pages already touched;
* ``floor_fresh_gradient_s``: with the gradient written into a tensor allocated just before, the
  way the ops allocate a new one (``tcod_fast.ops.gradient_memory.new_gradient``, huge pages
  asked for). Under glibc's defaults an ``N x V`` tensor gets new pages from the kernel, and each
  first touch costs a page fault and the zeroing of the page; with ``MALLOC_MMAP_MAX_=0`` (or a
  caching allocator) freed memory is reused and the two floors agree.

The ops keep their gradient buffer between calls (``gradient_memory``), so from the second call
of a loop that drops its gradients they write into touched pages: ``floor_s`` is their floor.
"""

from __future__ import annotations

import os
import statistics
import time
from pathlib import Path

import torch

from tcod_fast.ops.gradient_memory import new_gradient, reuse_enabled, transparent_huge_page_mode

# What ``--isa`` holds each party to: the native kernels' copy, and the vector width (bits) of the
# code Inductor generates for the ``torch.compile`` peer, so that ``--isa avx2`` on an AVX-512 CPU
# compares what an AVX2-only CPU would run on both sides. ``portable`` leaves Inductor's choice.
INDUCTOR_SIMDLEN = {"avx512": 512, "avx2": 256, "portable": None}


def add_isa_argument(parser) -> None:
    parser.add_argument(
        "--isa", choices=["auto", *INDUCTOR_SIMDLEN],
        default="auto",
        help="instruction set for the native kernels (TCOD_FAST_NATIVE_ISA) and for Inductor's vectors "
             "(torch._inductor.config.cpp.simdlen): avx2 on an AVX-512 CPU runs what an AVX2-only CPU would; "
             "auto: the best the CPU has, for both",
    )


def apply_isa(isa: str) -> int | None:
    """Hold the native kernels and Inductor to ``isa`` (before either is first used); returns the
    Inductor vector width set (None: Inductor's own choice)."""
    if isa == "auto":
        return None
    os.environ["TCOD_FAST_NATIVE_ISA"] = isa
    simdlen = INDUCTOR_SIMDLEN[isa]
    if simdlen is not None:
        import torch._inductor.config as inductor_config

        inductor_config.cpp.simdlen = simdlen
    return simdlen


def gradient_memory_setup() -> dict:
    """How the ops' gradient memory was set up in this run: buffer reuse (``TCOD_FAST_REUSE_GRADIENT``)
    and the kernel's transparent huge page mode."""
    return {"gradient_buffer_reuse": reuse_enabled(), "transparent_huge_pages": transparent_huge_page_mode()}


def cpu_flags() -> list[str]:
    """The CPU's SIMD flags (/proc/cpuinfo), which decide the native kernels' copy."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                flags = set(line.split(":", 1)[1].split())
                return sorted(f for f in flags if f.startswith(("avx", "fma", "sse4", "f16c", "amx")))
    except OSError:
        pass
    return []


def _median_seconds(step, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def cpu_copy_bandwidth(nbytes: int, repeats: int = 7) -> float:
    """Read+write bytes per second of ``dst.copy_(src)`` of ``nbytes`` into pages already touched
    (median of ``repeats``), with torch's intra-op threads, i.e. the threads the native kernels run with."""
    src = torch.empty(nbytes // 4, dtype=torch.float32).normal_()
    dst = torch.empty_like(src)
    dst.copy_(src)  # first touch outside the timing
    return 2 * nbytes / _median_seconds(lambda: dst.copy_(src), repeats)


def cpu_fresh_copy_seconds(nbytes: int, repeats: int = 7) -> float:
    """Seconds to copy ``nbytes`` into a tensor allocated just before, as the ops allocate a new
    gradient (``new_gradient``: huge pages asked for where Linux offers them). With glibc's
    defaults every page is new and faults on first touch."""
    src = torch.empty(nbytes // 4, dtype=torch.float32).normal_()
    return _median_seconds(lambda: new_gradient(src).copy_(src), repeats)


def cpu_floor(fused_s: float | None, floor_bytes: int, gradient_bytes: int, label: str) -> dict:
    """The op's memory floor for ``floor_bytes`` (of which the last ``gradient_bytes`` are the gradient
    it writes), measured now, and the fused time over it: into touched pages, and with a fresh gradient."""
    bandwidth = cpu_copy_bandwidth(gradient_bytes)
    floor_s = floor_bytes / bandwidth
    # the gradient copied into new pages (reads one N x V input, writes the gradient), plus the
    # other reads at the touched-page bandwidth
    fresh_floor_s = cpu_fresh_copy_seconds(gradient_bytes) + (floor_bytes - 2 * gradient_bytes) / bandwidth
    return {
        "copy_bandwidth_bytes_per_s": bandwidth,
        f"floor_bytes_{label}": floor_bytes,
        "floor_s": floor_s,
        "fused_over_floor": fused_s / floor_s if fused_s else None,
        "floor_fresh_gradient_s": fresh_floor_s,
        "fused_over_floor_fresh_gradient": fused_s / fresh_floor_s if fused_s else None,
    }
