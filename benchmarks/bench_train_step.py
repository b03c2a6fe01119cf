"""CPU training throughput of one distillation step: fused full-vocabulary loss vs materialised.

One step = student forward + frozen-teacher forward + loss + backward + AdamW step, on a
batch of expert episodes of the demo's toy game packed as the demo packs them (windowed
history: one row per turn).
Losses compared, in one run and on the same batch:

* ``fused_turn_kl``: logits from the models, KL streamed by the fused op (the trainer's default
  when the fused-linear op is off);
* ``fused_linear_turn_kl``: hidden states + LM heads, no logits tensor at all (the trainer's
  default with ``loss.fused_linear=auto``);
* ``materialised``: ``log_softmax`` of both logits in float32, ``sum p (log p - log q)``, the
  way a plain PyTorch/TRL implementation computes it.

The demo's word vocabulary is tiny (~150 tokens), where the loss is a rounding error of the
step; ``--vocab`` pads both models' vocabulary (e.g. 32000) to show the regime where it is not.

    python benchmarks/bench_train_step.py                # demo shapes and a 32k-vocab variant
    python benchmarks/bench_train_step.py --vocab 0 --repeats 5

Writes ``benchmarks/results/train_step_cpu.json``.
"""

import argparse
import dataclasses
import json
import platform
import time
from pathlib import Path

import torch

from tcod_fast import fused_turn_kl
from tcod_fast.demo import base_config, demo_settings
from tcod_fast.rollout import PackingConfig, pack_trajectories
from tcod_fast.tiny_models import TinyModelConfig, build_tiny_causal_lm
from tcod_fast.trainer import build, sft


def _materialised_loss(student_logits, teacher_logits, turn_ids):
    logp = torch.log_softmax(student_logits.float(), dim=-1)
    logq = torch.log_softmax(teacher_logits.float(), dim=-1)
    kl = (logp.exp() * (logp - logq)).sum(-1)
    keep = (turn_ids >= 0).float()
    return (kl * keep).sum() / keep.sum().clamp_min(1)


def _step(kind, student, teacher, optimizer, batch):
    inputs = batch.model_inputs()
    turn_ids = batch.target_turn_ids
    if kind == "fused_linear_turn_kl":
        from tcod_fast.ops.fused_linear_turn_kl import fused_linear_turn_kl

        hidden = student.base_model(**inputs).last_hidden_state
        with torch.no_grad():
            teacher_hidden = teacher.base_model(**inputs).last_hidden_state
        loss = fused_linear_turn_kl(
            hidden, student.get_output_embeddings().weight, teacher_hidden, teacher.get_output_embeddings().weight, turn_ids
        )
    else:
        logits = student(**inputs).logits
        with torch.no_grad():
            teacher_logits = teacher(**inputs).logits
        if kind == "fused_turn_kl":
            loss = fused_turn_kl(logits, teacher_logits, turn_ids)
        else:
            loss = _materialised_loss(logits, teacher_logits, turn_ids)
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return float(loss.detach())


def measure(vocab_pad: int, repeats: int, episodes: int) -> dict:
    settings = demo_settings("default")
    config = base_config(settings, Path("/tmp/unused"))
    prompter = build.build_prompter(config.env)
    tokenizer = build.build_tokenizer(config, prompter)
    splits = build.env_task_splits(config.env)
    envs = build.build_envs(config.env, episodes)
    demos = sft.expert_trajectories(
        splits["train"][:episodes], envs, tokenizer=tokenizer, prompter=prompter, context_mode=config.env.context_mode, max_turns=settings.max_turns
    )
    # score the expert replies as if the student had played them (they are its tokens here)
    batch = pack_trajectories(demos, PackingConfig(mode=config.env.context_mode, pad_token_id=tokenizer.pad_token_id, trained_players=("expert",)))
    vocab = max(len(tokenizer), vocab_pad)

    def model(spec: TinyModelConfig):
        return build_tiny_causal_lm(dataclasses.replace(spec, vocab_size=vocab), tokenizer)

    rows = []
    tokens = int(batch.attention_mask.sum())
    trained = int((batch.target_turn_ids >= 0).sum())
    for kind in ("fused_turn_kl", "fused_linear_turn_kl", "materialised"):
        student, teacher = model(settings.student).train(), model(settings.teacher).eval().requires_grad_(False)
        optimizer = torch.optim.AdamW(student.parameters(), lr=1e-4)
        _step(kind, student, teacher, optimizer, batch)  # warm-up: native build, allocator
        times, losses = [], []
        for _ in range(repeats):
            start = time.perf_counter()
            losses.append(_step(kind, student, teacher, optimizer, batch))
            times.append(time.perf_counter() - start)
        median = sorted(times)[len(times) // 2]
        rows.append(
            {
                "loss": kind,
                "median_step_s": median,
                "tokens_per_s": tokens / median,
                "first_loss": losses[0],
                "all_step_s": times,
            }
        )
        print(f"  V={vocab:6d} {kind:>22}: {median * 1e3:8.1f} ms/step  {tokens / median:9.0f} tokens/s  loss {losses[0]:.5f}")
    return {"vocab": vocab, "rows": int(batch.input_ids.shape[0]), "row_length": int(batch.input_ids.shape[1]), "tokens": tokens, "trained_tokens": trained, "results": rows}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--vocab", type=int, default=32000, help="also run with the vocabulary padded to this size (0: skip)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--episodes", type=int, default=8)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--out", default=str(Path(__file__).parent / "results" / "train_step_cpu.json"))
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"one training step, demo student/teacher, {args.episodes} expert episodes, {torch.get_num_threads()} threads")
    runs = [measure(0, args.repeats, args.episodes)]
    if args.vocab:
        runs.append(measure(args.vocab, args.repeats, args.episodes))
    report = {
        "benchmark": "bench_train_step",
        "device": "cpu",
        "cpu": platform.processor() or platform.machine(),
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "note": "timings are wall clock on a shared machine; compare rows of the same run only",
        "runs": runs,
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
