#!/usr/bin/env bash
# Everything a machine with a CUDA GPU should measure, in one command, from the repository root.
# No GPU figure in this project has been measured yet; this is the run that fills them in
# (the GPU floors of docs/performance.md#floors).
#
#   bash benchmarks/gpu_session.sh [OUT_DIR]      (default: $OUT, else benchmarks/results/gpu)
#
# What it writes into OUT_DIR:
#   gpu.txt                  nvidia-smi's name/memory/driver line and torch/triton versions
#   tests.log                the op tests on CUDA (Triton backends on the GPU, not the interpreter), packed
#                            (cu_seqlens) included, and the check that no token of a packed row attends
#                            across a sequence boundary under each CUDA attention implementation
#   turn_kl_8192_bf16.json   headline: N=8192, V=151936, bf16 -- fused Triton vs Liger-Kernel's JSD
#                            (beta=1) vs torch.compile vs eager, bytes/s against 5*N*V*e and the
#                            measured device-copy bandwidth
#   turn_kl_suite.json       pytest-benchmark suite (N in {256, 1024}, V in {32000, 151936}, fp32/bf16)
#   fused_linear.json        fused_linear_turn_kl (torch and Triton backends) vs Liger-Kernel's
#                            LigerFusedLinearJSD (beta=1) vs eager, N in {2048, 8192, 32768},
#                            V=151936, bf16, (H_s, H_t) in {(4096, 4096), (1536, 4096)}: time
#                            against the GEMM floor, peak memory, gradient error vs float64
#   max_trajectory.json      longest trajectory one training step fits, fused-linear vs
#                            materialised-logits loss, Qwen2.5-1.5B/7B-shaped random models
#   topk_turn_kl_8192_bf16.json  fused_topk_turn_kl (Triton) vs the TRL-style sparse loss (eager and
#                            torch.compile) vs fused_turn_kl with full teacher logits, K in {20, 64},
#                            bytes/s against 3*N*V*e and the device-copy bandwidth
#   bench.log                everything the benchmarks printed
#
# Needs: torch with CUDA, triton, pytest, pytest-benchmark, ninja and g++ (the native CPU kernel
# is built too, for the CPU peers in the tests). The package is used from the source tree
# (PYTHONPATH), not installed, so nothing is fetched. Liger-Kernel is optional: without it the
# Liger peer is recorded as an error in the JSON. On a machine with no internet, bring its wheel:
#   python3 -m pip download --no-deps --only-binary=:all: -d .whl liger-kernel
# (pure Python; it needs only torch and triton), keep .whl out of git (.git/info/exclude), and
# this script installs every wheel in .whl into a private folder first.
set -uo pipefail

out="${1:-${OUT:-benchmarks/results/gpu}}"
mkdir -p "$out"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
if compgen -G ".whl/*.whl" >/dev/null; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/tcod_fast_site .whl/*.whl \
        && export PYTHONPATH="$PYTHONPATH:/tmp/tcod_fast_site"
fi

{
    nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm,clocks.max.mem --format=csv
    python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__, 'cuda', torch.version.cuda)"
    python3 -c "import liger_kernel, importlib.metadata as m; print('liger-kernel', m.version('liger-kernel'))" 2>&1 | tail -1
} >"$out/gpu.txt" 2>&1
cat "$out/gpu.txt"

status=0
python3 -m pytest -q tests/ops/turn_kl/test_turn_kl.py tests/ops/turn_kl/test_turn_kl_errors.py \
    tests/ops/fused_linear_turn_kl/test_fused_linear_turn_kl.py tests/ops/turn_kl/test_triton_compile.py \
    tests/ops/topk_turn_kl tests/ops/turn_kl/test_turn_kl_packed.py \
    tests/ops/fused_linear_turn_kl/test_fused_linear_turn_kl_packed.py \
    "tests/rollout/test_packing.py::test_no_token_attends_across_a_sequence_boundary_of_a_packed_row" \
    2>&1 | tee "$out/tests.log" | tail -5 || status=1

{
    python3 benchmarks/run_turn_kl.py --device cuda --rows 8192 --dtype bfloat16 --out "$out/turn_kl_8192_bf16.json"
    python3 -m pytest -q benchmarks/bench_turn_kl.py --benchmark-json="$out/turn_kl_suite.json"
    python3 benchmarks/run_fused_linear.py --device cuda --out "$out/fused_linear.json"
    python3 benchmarks/run_max_trajectory.py --device cuda --out "$out/max_trajectory.json"
    python3 benchmarks/run_topk_turn_kl.py --device cuda --rows 8192 --dtype bfloat16 --out "$out/topk_turn_kl_8192_bf16.json"
} >"$out/bench.log" 2>&1 || status=1
tail -40 "$out/bench.log"
exit $status
