"""pytest-benchmark suite for fused_turn_kl: forward+backward time and peak extra memory.

    pytest benchmarks/bench_turn_kl.py --benchmark-json=benchmarks/results/cpu_turn_kl_suite.json

CPU: fused (native C++) vs the eager loss people write today vs ``torch.compile`` of it, at
N in {256, 1024}, V in {32000, 151936}, fp32 and bf16. On a CUDA machine the same cases run
with the Triton backend (and Liger-Kernel's JSD when installed). Peak extra memory is measured
in a fresh process per case (CPU) or with the CUDA allocator's peak counter, and stored in each
benchmark's ``extra_info`` so it lands in the JSON next to the timings.
"""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from run_report import cuda_peak_extra_bytes
from turn_kl_impls import forward_backward, implementations

from tcod_fast.tiny_settings import tiny_requested

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
IMPLS = implementations(DEVICE)
# TCOD_FAST_TINY=1 (tcod_fast/tiny_settings.py): one tiny shape, to check that the suite runs.
ROWS, VOCABS = ([8], [1031]) if tiny_requested() else ([256, 1024], [32000, 151936])


def _extra_peak_memory(impl_name, impl, n, v, dtype):
    if DEVICE == "cuda":
        student = torch.empty(n, v, dtype=dtype, device="cuda").normal_(0, 2).requires_grad_(True)
        teacher = torch.empty(n, v, dtype=dtype, device="cuda").normal_(0, 2)
        forward_backward(impl, student, teacher)
        student.grad = None
        return cuda_peak_extra_bytes(lambda: forward_backward(impl, student, teacher))
    probe = Path(__file__).resolve().parent / "memory_probe.py"
    out = subprocess.run(
        [sys.executable, str(probe), impl_name, str(n), str(v), str(dtype).removeprefix("torch.")],
        capture_output=True, text=True, check=True,
    )
    return json.loads(out.stdout.strip().splitlines()[-1])["extra_peak_bytes"]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("vocab", VOCABS)
@pytest.mark.parametrize("rows", ROWS)
@pytest.mark.parametrize("impl_name", list(IMPLS))
def test_forward_backward(benchmark, impl_name, rows, vocab, dtype):
    impl = IMPLS[impl_name]
    torch.manual_seed(0)
    # two input pairs, alternated, so a repeated run never finds its inputs already in cache
    pairs = [
        (
            torch.empty(rows, vocab, dtype=dtype, device=DEVICE).normal_(0, 2),
            torch.empty(rows, vocab, dtype=dtype, device=DEVICE).normal_(0, 2),
        )
        for _ in range(2)
    ]
    forward_backward(impl, pairs[0][0].clone().requires_grad_(True), pairs[0][1])  # warm-up / compile
    counter = {"i": 0}

    def setup():
        student, teacher = pairs[counter["i"] % 2]
        counter["i"] += 1
        return (impl, student.clone().requires_grad_(True), teacher), {}

    def run(impl, student, teacher):
        loss = forward_backward(impl, student, teacher)
        if DEVICE == "cuda":
            torch.cuda.synchronize()
        return loss

    benchmark.pedantic(run, setup=setup, rounds=3 if DEVICE == "cpu" else 20, iterations=1)
    elem = torch.finfo(dtype).bits // 8
    benchmark.extra_info.update(
        {
            "device": DEVICE,
            "N": rows,
            "V": vocab,
            "dtype": str(dtype),
            "extra_peak_bytes": _extra_peak_memory(impl_name, impl, rows, vocab, dtype),
            "gradient_bytes": rows * vocab * elem,
        }
    )
