"""Headline numbers for fused_topk_turn_kl, all peers timed in one process, written as JSON.

CPU (default):  python benchmarks/run_topk_turn_kl.py --out benchmarks/results/cpu_topk_turn_kl.json
                N=512, V=151936, fp32, K in {20, 64}: forward+backward of token-mean reverse KL
                with a tail bucket, fused native vs the same loss written the way TRL's
                server-backed distillation computes it (eager) vs torch.compile of that, and
                fused_turn_kl with the teacher's full logits; median times, ratios and peak extra
                memory (fresh process per implementation). Also the op's memory floor: the copy
                bandwidth measured in the same run with the same threads, and the fused time over
                the time it needs for the bytes the op must move (read the student, write the
                gradient: 2*N*V*e), with pages already touched and with the gradient in fresh
                pages. The JSON records the native kernel's instruction-set copy and the CPU's
                SIMD flags; --isa avx2 (or avx512, portable) holds the native kernels and
                Inductor's code to that instruction set (see run_turn_kl.py).
GPU:            python benchmarks/run_topk_turn_kl.py --device cuda --rows 8192 --dtype bfloat16 \
                    --out benchmarks/results/gpu_topk_turn_kl.json
                Triton backend, triton.testing.do_bench medians, the measured device-copy
                bandwidth, and achieved bytes/s against the 3*N*V*e-byte floor (the student read
                twice, the gradient written once).

Implementations: benchmarks/topk_turn_kl_impls.py.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from cpu_floor import add_isa_argument, apply_isa, cpu_flags, cpu_floor, gradient_memory_setup  # noqa: E402
from run_report import cuda_peak_extra_bytes, fused_speed_summary, report_header, tiny_defaults, write_report  # noqa: E402
from topk_turn_kl_impls import forward_backward, implementations, make_case  # noqa: E402


def time_cpu(impl, students, case, i):
    student = students[i % len(students)].clone().requires_grad_(True)
    start = time.perf_counter()
    forward_backward(impl, student, case)
    return time.perf_counter() - start


def time_cuda(impl, students, case):
    import triton.testing

    state = {"i": 0}

    def step():
        student = students[state["i"] % len(students)]
        state["i"] += 1
        student.grad = None
        forward_backward(impl, student, case)

    return triton.testing.do_bench(step, warmup=25, rep=200, return_mode="median") / 1e3


def _status_bytes(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"{field} not in /proc/self/status")


def probe_memory(name: str, rows: int, vocab: int, k: int, dtype) -> dict:
    """Peak extra resident memory of one forward+backward (run in a fresh process): the
    high-water mark (VmHWM, reset through /proc/self/clear_refs) above the resident set before
    the step, the student gradient included (see memory_probe.py)."""
    impl = implementations("cpu")[name]
    small = make_case(4, vocab, k, dtype, "cpu", seed=1)  # compile / build outside the measurement
    forward_backward(impl, torch.randn(4, vocab, dtype=dtype, requires_grad=True), small)
    case = make_case(rows, vocab, k, dtype, "cpu")
    student = torch.empty(rows, vocab, dtype=dtype).normal_(0.0, 2.0).requires_grad_(True)
    Path("/proc/self/clear_refs").write_text("5")
    before = _status_bytes("VmRSS")
    forward_backward(impl, student, case)
    extra = _status_bytes("VmHWM") - before
    grad_bytes = student.numel() * student.element_size()
    return {"extra_peak_bytes": extra, "extra_peak_over_gradient": extra / grad_bytes}


def memory_cpu(name, rows, vocab, k, dtype) -> dict:
    out = subprocess.run(
        [sys.executable, str(Path(__file__).resolve()), "--probe", name, "--rows", str(rows), "--vocab", str(vocab),
         "--k", str(k), "--dtype", str(dtype).removeprefix("torch.")],
        capture_output=True, text=True, check=True,
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


def memory_cuda(impl, student, case) -> int:
    student.grad = None
    peak = cuda_peak_extra_bytes(lambda: forward_backward(impl, student, case))
    student.grad = None
    return peak


def run_case(args, dtype, k: int) -> dict:
    impls = implementations(args.device)
    if args.impls:
        impls = {name: impl for name, impl in impls.items() if name in args.impls}
    case = make_case(args.rows, args.vocab, k, dtype, args.device)
    torch.manual_seed(k)
    students = [torch.empty(args.rows, args.vocab, dtype=dtype, device=args.device).normal_(0, 2) for _ in range(2)]
    if args.device == "cuda":
        students = [s.requires_grad_(True) for s in students]
    results = {}
    for name, impl in impls.items():  # compile / build / autotune outside the timing
        try:
            forward_backward(impl, students[0].detach().clone().requires_grad_(True), case)
            results[name] = {"times_s": []} if args.device == "cpu" else {}
        except Exception as exc:  # a peer that fails is recorded, not hidden
            results[name] = {"error": f"{type(exc).__name__}: {exc}"}
    working = {name: impl for name, impl in impls.items() if "error" not in results[name]}
    if args.device == "cpu":
        # round-robin: every implementation runs once per round, so background load on a shared
        # machine hits them alike; the ratios use per-implementation medians over the rounds
        for i in range(args.repeats):
            for name, impl in working.items():
                results[name]["times_s"].append(time_cpu(impl, students, case, i))
        for name in working:
            results[name]["median_s"] = statistics.median(results[name]["times_s"])
    else:
        for name, impl in working.items():
            results[name]["median_s"] = time_cuda(impl, students, case)
    if not args.no_memory:
        for name, impl in working.items():
            if args.device == "cpu":
                results[name].update(memory_cpu(name, args.rows, args.vocab, k, dtype))
            else:
                results[name]["extra_peak_bytes"] = memory_cuda(impl, students[0], case)
    for name, entry in results.items():
        print(f"K={k}", name, {key: v for key, v in entry.items() if key != "times_s"}, flush=True)

    elem = torch.finfo(dtype).bits // 8
    fused_name = "fused-native" if args.device == "cpu" else "fused-triton"
    floor_bytes = 3 * args.rows * args.vocab * elem
    floor = {}
    if args.device == "cpu":
        floor = cpu_floor(results.get(fused_name, {}).get("median_s"), 2 * args.rows * args.vocab * elem,
                          args.rows * args.vocab * elem, "2NVe")
    return {"K": k, "results": results, "floor_bytes_3NVe": floor_bytes,
            **fused_speed_summary(results, fused_name, floor_bytes, "3NVe", args.device), **floor}


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--rows", type=int, default=512)
    parser.add_argument("--vocab", type=int, default=151936)
    parser.add_argument("--k", type=int, nargs="+", default=[20, 64], help="teacher top-k sizes, one case each")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--repeats", type=int, default=9, help="timed rounds per case (CPU)")
    parser.add_argument("--impls", nargs="*", help="subset of implementations to run")
    parser.add_argument("--no-memory", action="store_true")
    parser.add_argument("--probe", help=argparse.SUPPRESS)  # internal: one memory probe, fresh process
    add_isa_argument(parser)
    parser.add_argument("--out", type=Path)
    tiny_defaults(parser, rows=8, vocab=1031, k=[4], repeats=2, no_memory=True)
    args = parser.parse_args(argv)
    inductor_simdlen = apply_isa(args.isa)
    dtype = getattr(torch, args.dtype)
    if args.probe:
        print(json.dumps(probe_memory(args.probe, args.rows, args.vocab, args.k[0], dtype)))
        return {}

    cases = [run_case(args, dtype, k) for k in args.k]
    report = {
        **report_header(args.device),
        "python": platform.python_version(),
        "cpu_threads": torch.get_num_threads(),
        "cpu_flags": cpu_flags() if args.device == "cpu" else None,
        "native_isa": _native_isa() if args.device == "cpu" else None,
        "inductor_simdlen": inductor_simdlen,
        **(gradient_memory_setup() if args.device == "cpu" else {}),
        "N": args.rows, "V": args.vocab, "dtype": args.dtype, "loss": "token-mean reverse KL, tail bucket",
        "gradient_bytes": args.rows * args.vocab * (torch.finfo(dtype).bits // 8),
        "malloc_environment": {k: v for k, v in os.environ.items() if k.startswith("MALLOC_")},
        "load_average_1_5_15_min_at_write": list(os.getloadavg()),
        "cases": cases,
    }
    print(json.dumps({k: v for k, v in report.items() if k != "cases"}, indent=2))
    for case in cases:
        print(f"K={case['K']}", json.dumps(case["speedup_of_fused"]), "fused/floor:", case.get("fused_over_floor"),
              "with a fresh gradient:", case.get("fused_over_floor_fresh_gradient"))
    write_report(report, args.out)
    return report


def _native_isa():
    """The compiled copy of the native top-k kernel that ran ("avx512", "avx2", "portable", ...), or None."""
    from tcod_fast.ops.topk_turn_kl import native_backend

    return native_backend.isa() if native_backend.is_available() else None


if __name__ == "__main__":
    main()
