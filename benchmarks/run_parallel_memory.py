"""Peak CPU memory per process of one training step, ``trainer.parallelism`` ddp vs fsdp2.

Two processes (gloo, ``torch.multiprocessing``), a random-init Llama student of about 59M
parameters and a teacher of the same shape, built from configs. A step is the trainer's
fused-linear path: the student's and teacher's last hidden states (through
:func:`tcod_fast.trainer.loss._forward`, hence FSDP2's root forward when sharded), the
reverse KL of ``fused_linear_turn_kl`` against the two LM heads (under FSDP2 the student's is
the gathered one), backward, gradient synchronisation, clipping and AdamW.

Memory: CPU tensors have no allocator statistics, so after one warm-up step (AdamW's state
exists from then on) each process resets its resident-set high-water mark
(``/proc/self/clear_refs``, see benchmarks/memory_probe.py), runs one step and reports how
far ``VmHWM`` rose above the resident set before it (``step_peak_mib``), and the resident
set itself (``resident_before_step_mib``: weights, optimiser state and libraries). The
bytes of parameters, gradients and AdamW state this process holds are counted too. The
workers run with ``MALLOC_MMAP_THRESHOLD_=1048576`` so freed tensors leave the resident set.

Usage: python benchmarks/run_parallel_memory.py [--out benchmarks/results/parallel_memory_cpu.json]
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import torch
import torch.multiprocessing as mp

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from memory_probe import _status_bytes, reset_peak_rss  # noqa: E402
from run_report import report_header, write_report  # noqa: E402

MODEL = dict(vocab_size=32000, hidden_size=512, intermediate_size=1408, num_hidden_layers=8, num_attention_heads=8, num_key_value_heads=8)
ROWS, LENGTH, TURNS = 2, 256, 4
MIB = 2**20


def _build(seed: int):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    return LlamaForCausalLM(LlamaConfig(**MODEL, tie_word_embeddings=False, max_position_embeddings=LENGTH))


def _local_bytes(tensors) -> int:
    from torch.distributed.tensor import DTensor

    total = 0
    for tensor in tensors:
        local = tensor.to_local() if isinstance(tensor, DTensor) else tensor
        total += local.numel() * local.element_size()
    return total


def _worker(rank, world_size, port, mode, results):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world_size), LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    from tcod_fast.ops.fused_linear_turn_kl import fused_linear_turn_kl
    from tcod_fast.trainer import parallel
    from tcod_fast.trainer.distributed import init_distributed
    from tcod_fast.trainer.loss import _forward

    context = init_distributed("cpu")
    parallelism, teacher_mode = mode.split("/") if "/" in mode else (mode, "whole")
    student = parallel.prepare_student(_build(1), parallelism, context)
    teacher = parallel.prepare_teacher(_build(2).eval().requires_grad_(False), parallelism, context, mode=teacher_mode)
    optimizer = torch.optim.AdamW(student.parameters(), lr=1e-5)
    generator = torch.Generator().manual_seed(100 + rank)
    inputs = {"input_ids": torch.randint(0, MODEL["vocab_size"], (ROWS, LENGTH), generator=generator)}
    target_ids = torch.roll(inputs["input_ids"], -1, dims=1)
    turn_ids = (torch.arange(LENGTH) * TURNS // LENGTH).expand(ROWS, LENGTH).contiguous()

    def step():
        hidden = _forward(student, inputs, True)
        with torch.no_grad():
            teacher_hidden = _forward(teacher, inputs, True)
        result = fused_linear_turn_kl(
            hidden, student.get_output_embeddings().weight, teacher_hidden, teacher.get_output_embeddings().weight,
            turn_ids, target_ids=target_ids, divergence="reverse_kl", reduction="sum", return_stats=True, num_turns=TURNS,
        )
        loss = result.loss / (ROWS * LENGTH * world_size)
        loss.backward()
        parallel.synchronise_gradients(student, context)
        grads = [p.grad for p in student.parameters() if p.grad is not None]
        norm = parallel.to_float(torch.nn.utils.clip_grad_norm_(student.parameters(), 1.0))
        held = _local_bytes(grads)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return float(loss.detach()), norm, held

    step()  # warm-up: AdamW state, lazy FSDP init
    before = reset_peak_rss()
    loss, norm, grad_bytes = step()
    peak = _status_bytes("VmHWM")
    optimizer_bytes = _local_bytes(v for state in optimizer.state.values() for v in state.values() if torch.is_tensor(v))
    results[rank] = {
        "rank": rank,
        "resident_before_step_mib": round(before / MIB, 1),
        "step_peak_mib": round((peak - before) / MIB, 1),
        "student_params_held_mib": round(_local_bytes(student.parameters()) / MIB, 1),
        "student_grads_held_mib": round(grad_bytes / MIB, 1),
        "adamw_state_held_mib": round(optimizer_bytes / MIB, 1),
        "teacher_params_held_mib": round(_local_bytes(teacher.parameters()) / MIB, 1),
        "loss": loss,
        "grad_norm": norm,
    }
    torch.distributed.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--modes", default="ddp,fsdp2/whole,fsdp2/shard")
    args = parser.parse_args()
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    # glibc returns freed blocks above this size to the kernel at once (no dynamic threshold),
    # so the resident set follows the live tensors closely; the workers inherit it
    os.environ.setdefault("MALLOC_MMAP_THRESHOLD_", str(1 << 20))
    params = sum(p.numel() for p in _build(1).parameters())
    report = {
        "benchmark": "run_parallel_memory",
        **report_header("cpu"),
        "commit": subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True).stdout.strip(),
        "transformers": __import__("transformers").__version__,
        "python": sys.version.split()[0],
        "cpu_flags": sorted(
            {f for f in Path("/proc/cpuinfo").read_text().split("flags", 1)[1].split("\n", 1)[0].strip(": ").split()}
            & {"avx", "avx2", "avx512f", "avx512bw", "avx512_bf16", "amx_bf16", "fma", "f16c"}
        ),
        "processes": 2,
        "backend": "gloo",
        "threads_per_process": 1,
        "malloc_mmap_threshold": os.environ["MALLOC_MMAP_THRESHOLD_"],
        "student": {**MODEL, "parameters": params, "dtype": "float32"},
        "teacher": "same shape, another seed",
        "tokens_per_process": ROWS * LENGTH,
        "lm_head_gathered_mib": round(MODEL["vocab_size"] * MODEL["hidden_size"] * 4 / MIB, 1),
        "note": (
            "step_peak_mib: rise of the resident-set high-water mark during one step above the resident set "
            "before it (activations, gathered FSDP2 parameters, gradients, optimiser temporaries); "
            "*_held_mib: what this process keeps between steps. fsdp2/shard: teacher sharded for forward; "
            "fsdp2/whole: teacher replicated."
        ),
        "runs": [],
    }
    for mode in args.modes.split(","):
        manager = mp.Manager()
        results = manager.dict()
        mp.spawn(_worker, args=(2, _free_port(), mode, results), nprocs=2, join=True)
        row = {"mode": mode, "per_rank": [dict(results[r]) for r in sorted(results.keys())]}
        manager.shutdown()
        report["runs"].append(row)
        print(json.dumps(row), flush=True)
    report["summary_peak_per_process_mib"] = {
        run["mode"]: round(max(r["resident_before_step_mib"] + r["step_peak_mib"] for r in run["per_rank"]), 1)
        for run in report["runs"]
    }
    report["summary_resident_between_steps_mib"] = {
        run["mode"]: max(r["resident_before_step_mib"] for r in run["per_rank"]) for run in report["runs"]
    }
    write_report(report, args.out)


if __name__ == "__main__":
    main()
