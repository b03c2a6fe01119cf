"""Peak extra CPU memory of one forward+backward, measured in a fresh process.

CPU tensors have no allocator statistics, so each probe runs in its own process: it creates
the inputs, touches them, resets the kernel's resident-set high-water mark
(``/proc/self/clear_refs``), runs one forward and backward, and reports how far the high-water
mark (``VmHWM``) rose above the resident set before the step. Large tensors are mmap-ed by
glibc and returned on free, so the rise is the true peak of what the step allocated (the
student gradient included). ``getrusage``'s ``ru_maxrss`` is not used: Linux carries it over
from the parent across fork+exec, so a big parent would hide the child's peak.

Usage: python benchmarks/memory_probe.py IMPL N V DTYPE   -> prints one JSON line
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from turn_kl_impls import forward_backward, implementations  # noqa: E402


def _status_bytes(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"{field} not in /proc/self/status")


def reset_peak_rss() -> int:
    """Reset VmHWM to the current resident set and return that resident set in bytes."""
    Path("/proc/self/clear_refs").write_text("5")
    return _status_bytes("VmRSS")


def main(impl_name: str, n: int, v: int, dtype_name: str) -> dict:
    dtype = getattr(torch, dtype_name)
    impls = implementations("cpu")
    impl = impls[impl_name]
    torch.manual_seed(0)
    # warm up on a small problem so compilation/extension loading is not counted
    forward_backward(impl, torch.randn(4, v, dtype=dtype, requires_grad=True), torch.randn(4, v, dtype=dtype))
    # filled in place: no temporaries may raise the high-water mark before the measurement
    student = torch.empty(n, v, dtype=dtype).normal_(0.0, 2.0).requires_grad_(True)
    teacher = torch.empty(n, v, dtype=dtype).normal_(0.0, 2.0)
    before = reset_peak_rss()
    forward_backward(impl, student, teacher)
    after = _status_bytes("VmHWM")
    grad_bytes = student.numel() * student.element_size()
    return {
        "impl": impl_name, "N": n, "V": v, "dtype": dtype_name,
        "extra_peak_bytes": after - before, "gradient_bytes": grad_bytes,
        "extra_peak_over_gradient": (after - before) / grad_bytes,
    }


if __name__ == "__main__":
    print(json.dumps(main(sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4])))
