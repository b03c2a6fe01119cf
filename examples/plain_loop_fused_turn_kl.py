"""On-policy distillation in a plain PyTorch loop with ``fused_turn_kl`` -- no trainer.

Two Hugging Face causal LMs (tiny, random-init, built in code: nothing is downloaded)
play the roles of teacher and student. Each iteration the student samples a three-turn
"conversation" (prompt, reply, observation, reply, ...), the tokens of each reply get their
turn id, and the exact full-vocabulary reverse KL to the teacher is minimised on the
student's tokens only. The per-turn statistics show the KL of each turn.

Swap in real models with ``AutoModelForCausalLM.from_pretrained(local_path)``: the loss
call stays the same.

    python examples/plain_loop_fused_turn_kl.py --steps 20
"""

import argparse
import string

import torch

from tcod_fast import fused_turn_kl
from tcod_fast.tiny_models import TinyModelConfig, build_char_tokenizer, build_tiny_causal_lm


def sample_episode(student, tokenizer, turns: int, reply_tokens: int, generator: torch.Generator):
    """Token ids and turn ids of one sampled multi-turn episode (batch of one)."""
    ids = tokenizer("<|im_start|>user\ncount with me: 1 2 3<|im_end|>\n", add_special_tokens=False)["input_ids"]
    turn_ids = [-1] * len(ids)
    for turn in range(turns):
        header = tokenizer("<|im_start|>assistant\n", add_special_tokens=False)["input_ids"]
        ids += header
        turn_ids += [-1] * len(header)
        with torch.no_grad():
            out = student.generate(
                torch.tensor([ids]),
                attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                do_sample=True,
                max_new_tokens=reply_tokens,
                min_new_tokens=reply_tokens,
                top_k=0,
                pad_token_id=tokenizer.pad_token_id,
            )
        reply = out[0, len(ids) :].tolist()
        ids += reply
        turn_ids += [turn] * len(reply)  # the student's tokens of this turn
        observation = tokenizer(f"<|im_end|>\n<|im_start|>user\nok {turn}<|im_end|>\n", add_special_tokens=False)["input_ids"]
        ids += observation
        turn_ids += [-1] * len(observation)
    return torch.tensor([ids]), torch.tensor([turn_ids])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--turns", type=int, default=3)
    parser.add_argument("--reply-tokens", type=int, default=12)
    parser.add_argument("--lr", type=float, default=3e-3)
    args = parser.parse_args()
    torch.manual_seed(0)

    tokenizer = build_char_tokenizer(string.digits + string.ascii_lowercase + " :\n")
    teacher = build_tiny_causal_lm(TinyModelConfig(hidden_size=96, intermediate_size=192, seed=1), tokenizer)
    student = build_tiny_causal_lm(TinyModelConfig(hidden_size=48, intermediate_size=96, seed=2), tokenizer)
    teacher.eval().requires_grad_(False)
    optimizer = torch.optim.AdamW(student.parameters(), lr=args.lr)
    generator = torch.Generator().manual_seed(0)

    for step in range(args.steps):
        input_ids, turn_ids = sample_episode(student, tokenizer, args.turns, args.reply_tokens, generator)
        student.train()
        student_logits = student(input_ids).logits
        with torch.no_grad():
            teacher_logits = teacher(input_ids).logits
        # logits at position t predict token t+1: shift, and take the turn id of the predicted token
        result = fused_turn_kl(
            student_logits[:, :-1],
            teacher_logits[:, :-1],
            turn_ids[:, 1:],
            target_ids=input_ids[:, 1:],
            return_stats=True,
            num_turns=args.turns,
        )
        optimizer.zero_grad()
        result.loss.backward()
        optimizer.step()
        per_turn = (result.turn_kl_sum / result.turn_token_count.clamp_min(1))[0]
        print(f"step {step:3d}  reverse KL {result.loss.item():.4f}  by turn " + " ".join(f"{v:.4f}" for v in per_turn.tolist()))


if __name__ == "__main__":
    main()
