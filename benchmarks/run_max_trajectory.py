"""Longest trajectory one distillation training step fits in memory, fused-linear vs materialised.

GPU (target: >= 4x longer trajectories and faster steps with the fused-linear loss):
    python benchmarks/run_max_trajectory.py --device cuda --out benchmarks/results/h100_max_trajectory.json
    Random-init models with real shapes, bf16: a Qwen2.5-1.5B-shaped student (V=151936, tied
    embeddings) trained with AdamW and activation checkpointing, and a frozen Qwen2.5-7B-shaped
    teacher (V=152064; only the first 151936 columns take part, ``vocab_size=``). One step = student
    forward + teacher forward + loss + backward + optimizer step on one sequence of L tokens, every
    position trained. Losses:
      * ``fused_linear``  ``fused_linear_turn_kl`` on the final hidden states and LM heads;
      * ``materialised``  both logits tensors, ``log_softmax`` in float32, ``sum p (log p - log q)``
        (what TRL's GKD trainer computes).
    L doubles from ``--start-tokens`` until a step runs out of memory (or ``--max-tokens``), then
    is bisected to ``--resolution`` tokens; then both losses are timed at the longest L both fit.
CPU smoke run (tiny models, no out-of-memory search, checks the script end to end):
    python benchmarks/run_max_trajectory.py --device cpu --tiny --start-tokens 64 --max-tokens 256
"""

from __future__ import annotations

import argparse
import gc
import json
import statistics
import time
from pathlib import Path

import torch
from run_report import report_header, write_report

from tcod_fast.ops.fused_linear_turn_kl import fused_linear_turn_kl

# Published model shapes (config.json of Qwen2.5-1.5B-Instruct and Qwen2.5-7B-Instruct).
SHAPES = {
    "student": dict(hidden_size=1536, intermediate_size=8960, num_hidden_layers=28, num_attention_heads=12,
                    num_key_value_heads=2, vocab_size=151936, tie_word_embeddings=True),
    "teacher": dict(hidden_size=3584, intermediate_size=18944, num_hidden_layers=28, num_attention_heads=28,
                    num_key_value_heads=4, vocab_size=152064, tie_word_embeddings=False),
}
TINY = {
    "student": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                    num_key_value_heads=2, vocab_size=1000, tie_word_embeddings=True),
    "teacher": dict(hidden_size=96, intermediate_size=192, num_hidden_layers=2, num_attention_heads=4,
                    num_key_value_heads=2, vocab_size=1064, tie_word_embeddings=False),
}
LOSSES = ("fused_linear", "materialised")


def build_model(shape: dict, dtype, device, seed: int):
    from transformers import Qwen2Config, Qwen2ForCausalLM

    config = Qwen2Config(max_position_embeddings=1 << 20, rope_theta=1e6, **shape)
    config._attn_implementation = "sdpa"
    torch.manual_seed(seed)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            model = Qwen2ForCausalLM(config)
    finally:
        torch.set_default_dtype(previous)
    return model


def train_step(loss_kind, student, teacher, optimizer, input_ids, vocab):
    if loss_kind == "fused_linear":
        hidden = student.model(input_ids=input_ids).last_hidden_state
        with torch.no_grad():
            teacher_hidden = teacher.model(input_ids=input_ids).last_hidden_state
        loss = fused_linear_turn_kl(hidden, student.get_output_embeddings().weight, teacher_hidden,
                                    teacher.get_output_embeddings().weight, vocab_size=vocab)
    else:
        logits = student(input_ids=input_ids).logits[..., :vocab]
        with torch.no_grad():
            teacher_logits = teacher(input_ids=input_ids).logits[..., :vocab]
        log_p = torch.log_softmax(logits.float(), dim=-1)
        log_q = torch.log_softmax(teacher_logits.float(), dim=-1)
        loss = (log_p.exp() * (log_p - log_q)).sum(-1).mean()
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return float(loss.detach())


def release(device):
    gc.collect()
    if device == "cuda":
        torch.cuda.empty_cache()


def try_step(loss_kind, student, teacher, optimizer, tokens, vocab, device):
    """(fits, seconds, peak bytes) of one step at ``tokens`` tokens."""
    input_ids = torch.randint(0, vocab, (1, tokens), device=device)
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    try:
        train_step(loss_kind, student, teacher, optimizer, input_ids, vocab)
        if device == "cuda":
            torch.cuda.synchronize()
    except torch.OutOfMemoryError:
        optimizer.zero_grad(set_to_none=True)
        release(device)
        return False, None, None
    seconds = time.perf_counter() - start
    peak = torch.cuda.max_memory_allocated() if device == "cuda" else None
    release(device)
    return True, seconds, peak


def longest(loss_kind, student, teacher, optimizer, vocab, device, start, cap, resolution, trials, *, step=try_step):
    """The longest trajectory (in tokens, a multiple of ``resolution``) one training step fits
    in: doubling from ``start`` up to ``cap``, then bisecting. Each attempt runs ``step`` (with
    ``try_step``'s arguments and ``(fits, seconds, peak_bytes)`` result) and is appended to
    ``trials``. Returns ``(tokens, reached_cap)``."""

    def fits(tokens):
        ok, seconds, peak = step(loss_kind, student, teacher, optimizer, tokens, vocab, device)
        trials.append({"loss": loss_kind, "tokens": tokens, "fits": ok, "step_s": seconds, "peak_bytes": peak})
        print(trials[-1], flush=True)
        return ok

    ok, fail = 0, None
    tokens = start
    while tokens <= cap:
        if not fits(tokens):
            fail = tokens
            break
        ok = tokens
        tokens *= 2
    if fail is None:
        return ok, True  # reached the cap
    while fail - ok > resolution:
        mid = (ok + fail) // 2 // resolution * resolution or resolution
        if mid <= ok:
            break
        ok, fail = (mid, fail) if fits(mid) else (ok, mid)
    return ok, False


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda", choices=["cpu", "cuda"])
    parser.add_argument("--tiny", action="store_true", help="tiny model shapes (smoke run)")
    parser.add_argument("--dtype", default="bfloat16", choices=["float32", "bfloat16"])
    parser.add_argument("--start-tokens", type=int, default=2048)
    parser.add_argument("--max-tokens", type=int, default=131072)
    parser.add_argument("--resolution", type=int, default=1024)
    parser.add_argument("--repeats", type=int, default=3, help="timed steps at the common length")
    parser.add_argument("--no-checkpointing", action="store_true")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args(argv)

    dtype = getattr(torch, args.dtype)
    shapes = TINY if args.tiny else SHAPES
    vocab = shapes["student"]["vocab_size"]
    teacher = build_model(shapes["teacher"], dtype, args.device, seed=1).eval().requires_grad_(False)
    student = build_model(shapes["student"], dtype, args.device, seed=0).train()
    if not args.no_checkpointing:
        student.gradient_checkpointing_enable()
    optimizer = torch.optim.AdamW(student.parameters(), lr=1e-6)
    # optimizer state exists before any measurement, as it does in training
    train_step("fused_linear", student, teacher, optimizer, torch.randint(0, vocab, (1, 16), device=args.device), vocab)
    release(args.device)

    trials: list[dict] = []
    maxima = {}
    for loss_kind in LOSSES:
        tokens, capped = longest(loss_kind, student, teacher, optimizer, vocab, args.device, args.start_tokens,
                                 args.max_tokens, args.resolution, trials)
        maxima[loss_kind] = {"tokens": tokens, "reached_cap": capped}
    common = min(m["tokens"] for m in maxima.values())
    step_s = {}
    if common > 0:
        for loss_kind in LOSSES:
            times = []
            for _ in range(args.repeats):
                fits, seconds, _ = try_step(loss_kind, student, teacher, optimizer, common, vocab, args.device)
                if fits:
                    times.append(seconds)
            step_s[loss_kind] = statistics.median(times) if times else None
    report = {
        **report_header(args.device),
        "dtype": args.dtype,
        "shapes": shapes,
        "activation_checkpointing": not args.no_checkpointing,
        "longest_tokens": maxima,
        "length_ratio_fused_over_materialised": (
            maxima["fused_linear"]["tokens"] / maxima["materialised"]["tokens"] if maxima["materialised"]["tokens"] else None
        ),
        "common_tokens": common,
        "median_step_s_at_common_tokens": step_s,
        "trials": trials,
    }
    print(json.dumps({k: v for k, v in report.items() if k not in ("trials", "shapes")}, indent=2))
    write_report(report, args.out)
    return report


if __name__ == "__main__":
    main()
