"""Padded vs padding-free micro-batches: time and peak CPU memory of one training step.

One step is what the trainer runs on a micro-batch with ``loss.packing=padded`` or
``padding_free``: the student's last hidden states (with grad) and the frozen teacher's, the
reverse KL of ``fused_linear_turn_kl`` against the two LM heads, and backward.

* **padded**: one sequence per row, right-padded to the longest, with an attention mask;
* **padding-free**: every sequence end to end in one row, ``position_ids`` restarting at 0
  (transformers keeps the sequences apart), the op's ``cu_seqlens`` marking the bounds.

Episodes of mixed length: each sequence's length is drawn uniformly from
``[longest / spread, longest]`` (seeded), a quarter of each sequence is the prompt (turn id
-1) and the rest four student turns. Two model shapes: the demo's student and teacher
(word vocabulary of the toy game), and a 59M-parameter Llama with a 32000-token
vocabulary (teacher of the same shape).

Memory: CPU tensors have no allocator statistics, so the resident-set high-water mark is reset
before each timed step (``/proc/self/clear_refs``, see benchmarks/memory_probe.py) and its rise
over the step is reported. Both layouts also report their loss, which must agree.

Usage: python benchmarks/run_padding_free.py [--out benchmarks/results/padding_free_cpu.json]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from memory_probe import _status_bytes, reset_peak_rss  # noqa: E402
from run_report import report_header, tiny_defaults, write_report  # noqa: E402

from tcod_fast.ops.fused_linear_turn_kl import fused_linear_turn_kl  # noqa: E402

MIB = 2**20
SHAPES = {
    "demo": {
        "student": dict(vocab_size=160, hidden_size=96, intermediate_size=192, num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=2),
        "teacher": dict(vocab_size=160, hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2),
    },
    "llama-59m": {
        "student": dict(vocab_size=32000, hidden_size=512, intermediate_size=1408, num_hidden_layers=8, num_attention_heads=8, num_key_value_heads=8),
        "teacher": dict(vocab_size=32000, hidden_size=512, intermediate_size=1408, num_hidden_layers=8, num_attention_heads=8, num_key_value_heads=8),
    },
}


def _model(shape: dict, seed: int, max_positions: int):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    return LlamaForCausalLM(LlamaConfig(**shape, tie_word_embeddings=False, max_position_embeddings=max_positions))


def _sequences(count: int, longest: int, spread: float, vocab: int, seed: int):
    """``count`` (token ids, turn ids) pairs of lengths in ``[longest / spread, longest]``."""
    generator = torch.Generator().manual_seed(seed)
    low = max(int(longest / spread), 8)
    out = []
    for _ in range(count):
        length = int(torch.randint(low, longest + 1, (1,), generator=generator))
        tokens = torch.randint(0, vocab, (length,), generator=generator)
        prompt = length // 4
        turns = torch.full((length,), -1, dtype=torch.int64)
        turns[prompt:] = torch.arange(length - prompt) * 4 // (length - prompt)
        out.append((tokens, turns))
    return out


def _padded(sequences):
    """Model inputs ``(B, T)``, turn ids aligned with the logits (``t`` predicts ``t + 1``)."""
    longest = max(len(tokens) for tokens, _ in sequences)
    rows = len(sequences)
    input_ids = torch.zeros(rows, longest, dtype=torch.int64)
    mask = torch.zeros(rows, longest, dtype=torch.int64)
    turn_ids = torch.full((rows, longest), -1, dtype=torch.int64)
    for row, (tokens, turns) in enumerate(sequences):
        input_ids[row, : len(tokens)] = tokens
        mask[row, : len(tokens)] = 1
        turn_ids[row, : len(tokens) - 1] = turns[1:]
    positions = torch.arange(longest).expand(rows, -1)
    return {"input_ids": input_ids, "attention_mask": mask, "position_ids": positions, "use_cache": False}, turn_ids, {}


def _padding_free(sequences):
    """One row ``(1, N)``, positions restarting at every sequence, and its ``cu_seqlens``."""
    input_ids = torch.cat([tokens for tokens, _ in sequences]).unsqueeze(0)
    positions = torch.cat([torch.arange(len(tokens)) for tokens, _ in sequences]).unsqueeze(0)
    turn_ids = torch.cat([torch.cat([turns[1:], turns.new_full((1,), -1)]) for _, turns in sequences]).unsqueeze(0)
    lengths = torch.tensor([len(tokens) for tokens, _ in sequences])
    cu_seqlens = torch.cat([lengths.new_zeros(1), lengths.cumsum(0)])
    return {"input_ids": input_ids, "position_ids": positions, "use_cache": False}, turn_ids, {"cu_seqlens": cu_seqlens}


def _step(student, teacher, inputs, turn_ids, op_options) -> float:
    student.zero_grad(set_to_none=True)
    hidden = student.base_model(**inputs).last_hidden_state
    with torch.no_grad():
        teacher_hidden = teacher.base_model(**inputs).last_hidden_state
    loss = fused_linear_turn_kl(
        hidden, student.get_output_embeddings().weight, teacher_hidden, teacher.get_output_embeddings().weight,
        turn_ids, reduction="mean", num_turns=4, **op_options,
    )  # fmt: skip
    loss.backward()
    return float(loss)


def measure(shape_name: str, episodes: int, longest: int, spread: float, repeats: int, seed: int) -> dict:
    shape = SHAPES[shape_name]
    student = _model(shape["student"], 1, longest)
    teacher = _model(shape["teacher"], 2, longest).requires_grad_(False)
    sequences = _sequences(episodes, longest, spread, shape["student"]["vocab_size"], seed)
    real_tokens = sum(len(tokens) for tokens, _ in sequences)
    result = {
        "shape": shape_name,
        "student": shape["student"],
        "student_parameters": sum(p.numel() for p in student.parameters()),
        "episodes": episodes,
        "lengths": [len(tokens) for tokens, _ in sequences],
        "real_tokens": real_tokens,
        "layouts": {},
    }
    for layout, build in (("padded", _padded), ("padding_free", _padding_free)):
        inputs, turn_ids, op_options = build(sequences)
        _step(student, teacher, inputs, turn_ids, op_options)  # warm-up
        seconds, peaks = [], []
        for _ in range(repeats):
            before = reset_peak_rss()
            start = time.perf_counter()
            loss = _step(student, teacher, inputs, turn_ids, op_options)
            seconds.append(time.perf_counter() - start)
            peaks.append((_status_bytes("VmHWM") - before) / MIB)
        median = statistics.median(seconds)
        result["layouts"][layout] = {
            "model_tokens": int(inputs["input_ids"].numel()),
            "median_s": median,
            "seconds": seconds,
            "real_tokens_per_s": real_tokens / median,
            "step_peak_mib": statistics.median(peaks),
            "loss": loss,
        }
        print(shape_name, layout, json.dumps({k: v for k, v in result["layouts"][layout].items() if k != "seconds"}), flush=True)
    padded, free = result["layouts"]["padded"], result["layouts"]["padding_free"]
    result["padding_free_speedup"] = padded["median_s"] / free["median_s"]
    result["padding_free_peak_ratio"] = free["step_peak_mib"] / max(padded["step_peak_mib"], 1e-9)
    result["loss_relative_difference"] = abs(free["loss"] - padded["loss"]) / max(abs(padded["loss"]), 1e-30)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--shapes", default="demo,llama-59m")
    parser.add_argument("--episodes", type=int, default=8)
    parser.add_argument("--longest", type=int, default=512, help="longest sequence; the shortest is longest / spread")
    parser.add_argument("--spread", type=float, default=4.0)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--seed", type=int, default=0)
    tiny_defaults(parser, shapes="demo", episodes=3, longest=32, repeats=1)
    args = parser.parse_args()
    if "MALLOC_MMAP_THRESHOLD_" not in os.environ:
        # glibc reads it at start: freed blocks above 1 MiB go back to the kernel at once, so
        # the resident set follows the live tensors
        os.environ["MALLOC_MMAP_THRESHOLD_"] = str(1 << 20)
        os.execv(sys.executable, [sys.executable, *sys.argv])
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "2")))
    report = {
        "benchmark": "run_padding_free",
        **report_header("cpu"),
        "threads": torch.get_num_threads(),
        "step": "student hidden states (grad) + teacher hidden states + fused_linear_turn_kl (reverse KL, mean) + backward",
        "note": "step_peak_mib: rise of the resident-set high-water mark during one step; medians over --repeats steps after a warm-up",
        "runs": [measure(name, args.episodes, args.longest, args.spread, args.repeats, args.seed) for name in args.shapes.split(",")],
    }
    write_report(report, args.out)


if __name__ == "__main__":
    main()
