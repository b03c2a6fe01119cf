"""Headline numbers for fused_turn_kl, all peers timed in one process, written as JSON.

CPU (default):  python benchmarks/run_turn_kl.py --out benchmarks/results/cpu_turn_kl.json
                N=512, V=151936, fp32: fused native vs torch eager vs torch.compile of eager,
                forward+backward median time, ratios, and peak extra memory (fresh process
                per implementation, see memory_probe.py). Also the op's memory floor: the
                machine's copy bandwidth, measured in the same run with the same threads, and
                the fused time over the time that bandwidth needs for the bytes the op must
                move (read both logits, write the gradient: 3*N*V*e), with pages already touched
                and with the gradient in fresh pages (benchmarks/cpu_floor.py). The JSON records
                the native kernel's instruction-set copy and the CPU's SIMD flags.
                --isa avx2 (or avx512, portable) holds the native kernels and Inductor's code
                for the torch.compile peer to that instruction set: on an AVX-512 CPU,
                --isa avx2 compares what an AVX2-only CPU would run.
                With MALLOC_MMAP_MAX_=0 MALLOC_TRIM_THRESHOLD_=68719476736 in the environment,
                glibc keeps freed memory, so no implementation pays first-touch page faults for
                its N x V tensors (what a caching allocator gives; it favours eager, which
                allocates five of them).
GPU:            python benchmarks/run_turn_kl.py --device cuda --rows 8192 --dtype bfloat16 \
                    --out benchmarks/results/h100_turn_kl.json
                adds Liger-Kernel's JSD (beta=1) as a peer, the measured device-copy bandwidth
                and achieved bytes/s against the 5*N*V*e-byte floor (docs/performance.md#floors).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from cpu_floor import add_isa_argument, apply_isa, cpu_flags, cpu_floor, gradient_memory_setup  # noqa: E402
from run_report import cuda_peak_extra_bytes, fused_speed_summary, report_header, tiny_defaults, write_report  # noqa: E402
from turn_kl_impls import forward_backward, implementations  # noqa: E402


def time_cpu(impl, pairs, repeats):
    times = []
    for i in range(repeats):
        student, teacher = pairs[i % len(pairs)]
        student = student.clone().requires_grad_(True)
        start = time.perf_counter()
        forward_backward(impl, student, teacher)
        times.append(time.perf_counter() - start)
    return times


def time_cuda(impl, pairs):
    import triton.testing

    state = {"i": 0}

    def step():
        student, teacher = pairs[state["i"] % len(pairs)]
        state["i"] += 1
        student.grad = None
        forward_backward(impl, student, teacher)

    return triton.testing.do_bench(step, warmup=25, rep=200, return_mode="median") / 1e3


def memory_cpu(name, rows, vocab, dtype):
    probe = Path(__file__).resolve().parent / "memory_probe.py"
    out = subprocess.run(
        [sys.executable, str(probe), name, str(rows), str(vocab), str(dtype).removeprefix("torch.")],
        capture_output=True, text=True, check=True,
    )
    return json.loads(out.stdout.strip().splitlines()[-1])["extra_peak_bytes"]


def memory_cuda(impl, pairs):
    student, teacher = pairs[0]
    student.grad = None
    peak = cuda_peak_extra_bytes(lambda: forward_backward(impl, student, teacher))
    student.grad = None
    return peak


def _native_isa():
    """The compiled copy of the native kernels that ran ("avx512", "avx2", "portable", ...), or None."""
    from tcod_fast.ops.turn_kl import native_backend

    return native_backend.isa() if native_backend.is_available() else None


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--rows", type=int, default=512)
    parser.add_argument("--vocab", type=int, default=151936)
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--repeats", type=int, default=5, help="timed runs per implementation (CPU)")
    parser.add_argument("--impls", nargs="*", help="subset of implementations to run")
    parser.add_argument("--no-memory", action="store_true")
    add_isa_argument(parser)
    parser.add_argument("--out", type=Path)
    tiny_defaults(parser, rows=8, vocab=1031, repeats=2, no_memory=True)
    args = parser.parse_args(argv)
    inductor_simdlen = apply_isa(args.isa)

    dtype = getattr(torch, args.dtype)
    torch.manual_seed(0)
    impls = implementations(args.device)
    if args.impls:
        impls = {k: v for k, v in impls.items() if k in args.impls}
    pairs = [
        (
            torch.empty(args.rows, args.vocab, dtype=dtype, device=args.device).normal_(0, 2),
            torch.empty(args.rows, args.vocab, dtype=dtype, device=args.device).normal_(0, 2),
        )
        for _ in range(2)
    ]
    if args.device == "cuda":
        pairs = [(s.requires_grad_(True), t) for s, t in pairs]
    results = {}
    for name, impl in impls.items():  # compile / build / autotune outside the timing
        try:
            warm_s = pairs[0][0].detach().clone().requires_grad_(True)
            forward_backward(impl, warm_s, pairs[0][1])
            results[name] = {"times_s": []} if args.device == "cpu" else {}
        except Exception as exc:  # a peer that fails is recorded, not hidden
            results[name] = {"error": f"{type(exc).__name__}: {exc}"}
        del warm_s
    working = {name: impl for name, impl in impls.items() if "error" not in results[name]}
    if args.device == "cpu":
        # round-robin: every implementation runs once per round, so background load on a shared
        # machine hits them alike; the ratios use per-implementation medians over the rounds
        for i in range(args.repeats):
            for name, impl in working.items():
                results[name]["times_s"] += time_cpu(impl, pairs[i % 2 :] + pairs[: i % 2], 1)
        for name in working:
            results[name]["median_s"] = statistics.median(results[name]["times_s"])
    else:
        for name, impl in working.items():
            results[name]["median_s"] = time_cuda(impl, pairs)
    if not args.no_memory:
        for name, impl in working.items():
            results[name]["extra_peak_bytes"] = (
                memory_cpu(name, args.rows, args.vocab, dtype) if args.device == "cpu" else memory_cuda(impl, pairs)
            )
    for name, entry in results.items():
        print(name, {k: v for k, v in entry.items() if k != "times_s"}, flush=True)

    elem = torch.finfo(dtype).bits // 8
    fused_name = "fused-native" if args.device == "cpu" else "fused-triton"
    floor = {}
    if args.device == "cpu":
        floor = cpu_floor(results.get(fused_name, {}).get("median_s"), 3 * args.rows * args.vocab * elem,
                          args.rows * args.vocab * elem, "3NVe")
    report = {
        **report_header(args.device),
        "cpu_threads": torch.get_num_threads(),
        "N": args.rows, "V": args.vocab, "dtype": args.dtype,
        "gradient_bytes": args.rows * args.vocab * elem,
        # glibc's allocator settings change what a fresh N x V tensor costs (first-touch page
        # faults); recorded so runs with and without MALLOC_MMAP_MAX_=0 are never mixed up
        "malloc_environment": {k: v for k, v in os.environ.items() if k.startswith("MALLOC_")},
        "load_average_1_5_15_min_at_write": list(os.getloadavg()),
        "native_isa": _native_isa() if args.device == "cpu" else None,
        "cpu_flags": cpu_flags() if args.device == "cpu" else None,
        "inductor_simdlen": inductor_simdlen,
        **(gradient_memory_setup() if args.device == "cpu" else {}),
        "results": results,
        **fused_speed_summary(results, fused_name, 5 * args.rows * args.vocab * elem, "5NVe", args.device),
        **floor,
    }
    print(json.dumps({k: v for k, v in report.items() if k != "results"}, indent=2))
    if floor:
        print("fused/floor:", floor["fused_over_floor"], "fused/floor with a fresh gradient:",
              floor["fused_over_floor_fresh_gradient"], json.dumps(report["speedup_of_fused"]))
    write_report(report, args.out)
    return report


if __name__ == "__main__":
    main()
