"""Compiled forms of the sparse-teacher kernels that the other tests do not compare directly.

* Every instruction-set copy of the native kernel this CPU runs (csrc/cpu_isa.h) computes what the
  portable copy (baseline x86-64: SSE2 only) computes, with the tolerances of two summation orders.
* The Triton kernel lowers through Triton's real compiler to an sm_90 cubin (the interpreter
  never compiles it). A subprocess, because this test process imports triton in interpreter mode.
"""

import os
import platform
import subprocess
import sys

import pytest
import torch
from float32_tolerances import kernel_copies_tolerance

from tcod_fast.ops.logit_transform import IDENTITY, LogitTransform
from tcod_fast.ops.topk import prepare_topk
from tcod_fast.ops.topk_turn_kl import native_backend


@pytest.mark.skipif(platform.machine() not in ("x86_64", "AMD64"), reason="the vector copies are x86-64 only")
@pytest.mark.skipif(not native_backend.is_available(), reason="native kernel disabled or no C++ toolchain")
def test_every_copy_matches_the_portable_copy():
    others = [isa for isa in native_backend.available_isas() if isa != "portable"]
    if not others:
        pytest.skip("this CPU runs only the portable copy (tests/ops/turn_kl/test_native_isa.py still checks it)")
    B, T, V, K = 2, 9, 1037, 6  # two full 512-column blocks (the vector loops) and a ragged tail
    keep = torch.ones(B, T, dtype=torch.bool)
    keep[1, 4] = False
    logprobs, ids = torch.log_softmax(torch.randn(B, T, V) * 3, -1).topk(K, -1)
    ids[0, 3, 2] = -1
    sorted_ids, sorted_logprobs = prepare_topk(ids, logprobs, keep, V, torch.float32)
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        student = (torch.randn(B, T, V) * 3).to(dtype)
        top = student[0, 2, ids[0, 2]].clone()
        student[0, 2, :700] = float("-inf")  # whole blocks of -inf
        student[0, 2, ids[0, 2]] = top  # the top-k stay finite (else forward KL is a true inf)
        # without a logit map, and with a soft-capped and scaled student
        for divergence, student_map in [(d, m) for d in ("reverse_kl", "forward_kl", "jsd")
                                        for m in (IDENTITY, LogitTransform(1.3, 2.5))]:
            for tail in ("bucket", "renormalize"):
                results = {}
                for isa in ("portable", *others):
                    grad = torch.empty_like(student)
                    with native_backend.use_isa(isa):
                        outs = native_backend.forward(
                            student, sorted_ids, sorted_logprobs, keep, None, divergence, 0.3, 1.7, tail, 1e-6, grad,
                            student_transform=student_map,
                        )
                    results[isa] = (*outs[:2], grad)
                for isa in others:
                    for name, a, b in zip(["divergence", "entropy", "gradient"], results["portable"], results[isa]):
                        assert torch.isfinite(a.float()).all(), name
                        tolerance = kernel_copies_tolerance(name, V, dtype, b)
                        torch.testing.assert_close(a.float(), b.float(), **tolerance,
                                                   msg=lambda m, n=name, i=isa: f"{i} {n}: {m}")


_COMPILE = r"""
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from tcod_fast.ops.topk_turn_kl import triton_backend as tb

scalars = dict.fromkeys(["rows_t", "s_sb", "s_st", "g_sb", "g_st", "vocab", "K"], "i64")
scalars |= dict.fromkeys(["inv_temp", "beta", "log_1m_beta", "log_beta", "tail_eps", "s_scale", "s_cap"], "fp32")
# the student's logit map (LogitTransform.code: 0 none, 1 a scale, 2 a soft cap) varies too
for student, divergence, bucket, tf_s in [("bf16", 0, True, 0), ("fp32", 1, True, 2), ("fp16", 2, True, 1),
                                          ("bf16", 0, False, 2)]:
    signature = {
        "s_ptr": "*" + student, "g_ptr": "*" + student, "ids_ptr": "*i32", "lq_ptr": "*fp32", "keep_ptr": "*i1",
        "target_ptr": "*i64", "scale_ptr": "*fp32", "div_ptr": "*fp32", "ent_ptr": "*fp32", "logp_ptr": "*fp32",
        "logq_ptr": "*fp32", **scalars,
    }
    constexprs = dict(DIVERGENCE=divergence, BUCKET=bucket, NEED_NORMALISER=True, HAS_TARGET=True, WRITE_GRAD=True,
                      HAS_SCALE=True, BLOCK_V=tb.DEFAULT_BLOCK_V, BLOCK_K=64, PAD=tb.PAD_ID, TF_S=tf_s)
    signature |= dict.fromkeys(constexprs, "constexpr")
    compiled = triton.compile(ASTSource(fn=tb._topk_row_kernel, signature=signature, constexprs=constexprs),
                              target=GPUTarget("cuda", 90, 32), options={"num_warps": 8})
    assert ".target sm_90" in compiled.asm["ptx"], "PTX not for sm_90"
    assert len(compiled.asm["cubin"]) > 0, "empty cubin"
    print("compiled", student, divergence, bucket, flush=True)
"""


def test_triton_kernel_compiles_to_sm90_cubin():
    pytest.importorskip("triton", reason="triton is not installed (pip install 'tcod-fast[triton]')")
    env = {**os.environ, "TRITON_INTERPRET": "0", "TRITON_DEFAULT_FP_FUSION": "1"}
    proc = subprocess.run([sys.executable, "-c", _COMPILE], env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, f"Triton compile for sm_90 failed:\n{proc.stdout}\n{proc.stderr[-4000:]}"
    assert proc.stdout.count("compiled") == 4
