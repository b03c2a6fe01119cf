"""Peak extra CPU memory of one forward+backward, measured in a fresh process.

CPU tensors have no allocator statistics, so each probe runs in its own process: it creates
the inputs, touches them, records the resident-set high-water mark, runs one forward and
backward, and reports how far the high-water mark rose. Large tensors are mmap-ed by glibc and
returned on free, so the rise is the true peak of what the step allocated (the student
gradient included).

Usage: python benchmarks/memory_probe.py IMPL N V DTYPE   -> prints one JSON line
"""

from __future__ import annotations

import json
import resource
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from turn_kl_impls import forward_backward, implementations  # noqa: E402


def peak_rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


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
    before = peak_rss_bytes()
    forward_backward(impl, student, teacher)
    after = peak_rss_bytes()
    grad_bytes = student.numel() * student.element_size()
    return {
        "impl": impl_name, "N": n, "V": v, "dtype": dtype_name,
        "extra_peak_bytes": after - before, "gradient_bytes": grad_bytes,
        "extra_peak_over_gradient": (after - before) / grad_bytes,
    }


if __name__ == "__main__":
    print(json.dumps(main(sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4])))
