"""fused_linear_turn_kl against its peers on one device, all in one process, written as JSON.

GPU (the floors of docs/performance.md#floors):
    python benchmarks/run_fused_linear.py --device cuda --out benchmarks/results/h100_fused_linear.json
    N in {2048, 8192, 32768}, V=151936, bf16, (H_s, H_t) in {(4096, 4096), (1536, 4096)}:
    forward+backward time (``triton.testing.do_bench`` median, two input sets rotated) and peak
    extra memory of
      * ``fused-torch``   fused_linear_turn_kl, torch backend (row chunks, no N x V tensor)
      * ``fused-triton``  fused_linear_turn_kl, Triton backend (tiles, logits recomputed for G)
      * ``liger``         Liger-Kernel's LigerFusedLinearJSD at jsd_beta=1 (reverse KL)
      * ``eager``         h @ W.T -> log_softmax -> sum p (log p - log q), autograd
    against the GEMM floor 2 N V (3 H_s + H_t) FLOPs (student and teacher logits, dh, dW) at the
    bf16 matmul rate measured in the same run; plus each one's gradient error (dh and dW)
    against a float64 reference at ``--error-rows`` rows.
CPU smoke run (checks the script end to end on tiny shapes; Liger needs CUDA and is recorded
as an error):
    python benchmarks/run_fused_linear.py --device cpu --rows 64 --hidden 32/48 --vocab 1000 --dtype float32
A peer that fails (missing package, out of memory) is recorded with its error, never dropped.
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import torch
from run_report import report_header, write_report

from tcod_fast.ops.fused_linear_turn_kl import fused_linear_turn_kl
from tcod_fast.ops.fused_linear_turn_kl.reference import fused_linear_turn_kl_reference


def fused(backend):
    def run(h_s, w_s, h_t, w_t):
        return fused_linear_turn_kl(h_s, w_s, h_t, w_t, backend=backend)

    return run


def eager(h_s, w_s, h_t, w_t):
    with torch.no_grad():
        log_q = torch.log_softmax((h_t @ w_t.t()).float(), dim=-1)
    log_p = torch.log_softmax((h_s @ w_s.t()).float(), dim=-1)
    return (log_p.exp() * (log_p - log_q)).sum(-1).mean()


def liger():
    """Liger-Kernel's fused linear JSD at beta=1, i.e. KL(student || teacher), token mean."""
    from liger_kernel.transformers import LigerFusedLinearJSD

    loss = LigerFusedLinearJSD(jsd_beta=1.0)

    def run(h_s, w_s, h_t, w_t):
        return loss(h_s, w_s, h_t, w_t, None)

    return run


def implementations(device):
    impls = {"fused-torch": fused("torch"), "fused-triton": fused("triton"), "eager": eager}
    if device == "cuda":
        try:
            impls["liger"] = liger()
        except ImportError as exc:
            impls["liger"] = exc
    else:
        impls["liger"] = RuntimeError("Liger-Kernel's kernels need CUDA")
    return impls


def make_inputs(n, h_s, h_t, v, dtype, device, seed):
    gen = torch.Generator(device="cpu").manual_seed(seed)

    def randn(*shape, std=1.0):
        return (torch.randn(*shape, generator=gen) * std).to(device=device, dtype=dtype)

    student_hidden = randn(n, h_s).requires_grad_(True)
    student_weight = randn(v, h_s, std=2.0 / h_s**0.5).requires_grad_(True)
    return student_hidden, student_weight, randn(n, h_t), randn(v, h_t, std=2.0 / h_t**0.5)


def step(impl, inputs):
    h_s, w_s = inputs[0], inputs[1]
    h_s.grad = None
    w_s.grad = None
    impl(*inputs).backward()


def sync(device):
    if device == "cuda":
        torch.cuda.synchronize()


def time_impl(impl, input_sets, device, repeats):
    if device == "cuda":
        import triton.testing

        state = {"i": 0}

        def one():
            state["i"] += 1
            step(impl, input_sets[state["i"] % len(input_sets)])

        return triton.testing.do_bench(one, warmup=3, rep=max(repeats, 1) * 100, return_mode="median") / 1e3
    times = []
    for i in range(repeats):
        start = time.perf_counter()
        step(impl, input_sets[i % len(input_sets)])
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def peak_extra_bytes(impl, inputs, device):
    if device != "cuda":
        return None  # CPU peaks come from bench_fused_linear_turn_kl.py's fresh-process probe
    step(impl, inputs)  # gradients exist before the baseline, as in training
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    step(impl, inputs)
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated() - base


def gemm_rate(device, dtype, n, h, v):
    """Measured FLOP/s of one (n x h) @ (h x v) matmul in ``dtype``."""
    a = torch.randn(n, h, device=device).to(dtype)
    b = torch.randn(h, v, device=device).to(dtype)
    if device == "cuda":
        import triton.testing

        seconds = triton.testing.do_bench(lambda: a @ b, warmup=5, rep=200, return_mode="median") / 1e3
    else:
        a @ b
        start = time.perf_counter()
        a @ b
        seconds = time.perf_counter() - start
    return 2 * n * h * v / seconds


def gradient_errors(impl, n, h_s, h_t, v, dtype, device):
    """Relative L2 error of dh and dW against the float64 reference, on fresh inputs."""
    inputs = make_inputs(n, h_s, h_t, v, dtype, device, seed=7)
    step(impl, inputs)
    got = (inputs[0].grad.double(), inputs[1].grad.double())
    ref_inputs = [x.detach().double().requires_grad_(i < 2) for i, x in enumerate(inputs)]
    fused_linear_turn_kl_reference(*ref_inputs).backward()
    want = (ref_inputs[0].grad, ref_inputs[1].grad)
    return {
        name: float((g - w).norm() / w.norm())
        for name, g, w in (("dh", got[0], want[0]), ("dW", got[1], want[1]))
    }


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda", choices=["cpu", "cuda"])
    parser.add_argument("--rows", type=int, nargs="+", default=[2048, 8192, 32768])
    parser.add_argument("--hidden", nargs="+", default=["4096/4096", "1536/4096"], help="H_s/H_t pairs")
    parser.add_argument("--vocab", type=int, default=151936)
    parser.add_argument("--dtype", default="bfloat16", choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--error-rows", type=int, default=256, help="rows of the float64 gradient check")
    parser.add_argument("--impls", nargs="*", help="subset of implementations to run")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args(argv)

    dtype = getattr(torch, args.dtype)
    impls = implementations(args.device)
    if args.impls:
        impls = {k: v for k, v in impls.items() if k in args.impls}
    report = {
        **report_header(args.device),
        "V": args.vocab,
        "dtype": args.dtype,
        "cases": [],
    }
    for hidden in args.hidden:
        h_s, h_t = (int(x) for x in hidden.split("/"))
        rate = gemm_rate(args.device, dtype, max(args.rows), h_s, args.vocab)
        errors = {}
        for name, impl in impls.items():
            if isinstance(impl, Exception):
                errors[name] = {"error": f"{type(impl).__name__}: {impl}"}
                continue
            try:
                errors[name] = gradient_errors(impl, args.error_rows, h_s, h_t, args.vocab, dtype, args.device)
            except Exception as exc:  # recorded, not hidden
                errors[name] = {"error": f"{type(exc).__name__}: {exc}"}
        for n in args.rows:
            flops = 2 * n * args.vocab * (3 * h_s + h_t)
            case = {"N": n, "H_s": h_s, "H_t": h_t, "gemm_flops": flops, "measured_gemm_flop_per_s": rate,
                    "gemm_floor_s": flops / rate, "results": {}}
            input_sets = [make_inputs(n, h_s, h_t, args.vocab, dtype, args.device, seed=s) for s in (0, 1)]
            for name, impl in impls.items():
                entry = {"gradient_relative_error": errors[name]}
                if isinstance(impl, Exception):
                    entry["error"] = errors[name]["error"]
                else:
                    try:
                        step(impl, input_sets[0])  # compile / autotune / build outside the timing
                        sync(args.device)
                        entry["median_s"] = time_impl(impl, input_sets, args.device, args.repeats)
                        entry["extra_peak_bytes"] = peak_extra_bytes(impl, input_sets[0], args.device)
                        entry["fraction_of_gemm_floor"] = entry["median_s"] / case["gemm_floor_s"]
                    except Exception as exc:  # out of memory, unsupported shape: recorded
                        entry["error"] = f"{type(exc).__name__}: {exc}"
                        if args.device == "cuda":
                            torch.cuda.empty_cache()
                case["results"][name] = entry
                print(n, hidden, name, {k: v for k, v in entry.items() if k != "gradient_relative_error"},
                      entry["gradient_relative_error"], flush=True)
            del input_sets
            report["cases"].append(case)
    write_report(report, args.out)
    return report


if __name__ == "__main__":
    main()
