"""Why does TCOD-B2F's training success collapse when the student first plays the door turn?

Trains the demo's TCOD-B2F student (``--demo DIR``: the output folder of ``tcod-fast demo``,
its robust teacher and student starts) for the first ``--steps`` steps with a checkpoint after
every step, then measures every checkpoint on the expert's own episodes of held-out seen tasks,
turn by turn, counted from the end of the episode (turn 1 is the last, the gem; B2F hands the
student the last ``1 + step // eta`` turns):

* ``accuracy``: the share of turns whose greedy reply (teacher-forced on the expert's
  observation) is exactly the expert's reply;
* ``kl``: the exact reverse KL(student || teacher) per reply token;
* the student's wrong replies on each turn, counted by text.

And, from the run's own metrics: training success, the number of student and expert turns,
and the KL by turn index at each step. Writes one JSON file (``--out``).
"""

from __future__ import annotations

import argparse
import collections
import shutil
import sys
import time
from pathlib import Path

import torch
from run_report import lr_and_updates, report_header, write_report

from tcod_fast.demo import demo_settings, run_config
from tcod_fast.trainer import build, loop, sft
from tcod_fast.trainer.checkpoint import load_checkpoint
from tcod_fast.trainer.metrics_log import read_metrics


def _turn_records(trajectories, tokenizer, prompter):
    """(turns from the end, window prompt ids, expert reply ids) of every expert turn."""
    records = []
    for trajectory in trajectories:
        pairs = sft.labelled_turns([trajectory], tokenizer=tokenizer, prompter=prompter)
        for index, (prompt, reply) in enumerate(pairs):
            records.append((len(pairs) - index, prompt, reply))
    return records


@torch.no_grad()
def measure(student, teacher, records, tokenizer) -> dict:
    by_turn: dict[int, dict] = collections.defaultdict(lambda: {"n": 0, "correct": 0, "kl": 0.0, "tokens": 0, "wrong": collections.Counter()})
    for from_end, prompt, reply in records:
        ids = torch.tensor([prompt + reply])
        logits_s = student(input_ids=ids).logits[0, len(prompt) - 1 : len(prompt) + len(reply) - 1].double()
        logits_t = teacher(input_ids=ids).logits[0, len(prompt) - 1 : len(prompt) + len(reply) - 1].double()
        logp, logq = torch.log_softmax(logits_s, -1), torch.log_softmax(logits_t, -1)
        greedy = logits_s.argmax(-1).tolist()
        entry = by_turn[from_end]
        entry["n"] += 1
        entry["correct"] += int(greedy == reply)
        entry["kl"] += float((logp.exp() * (logp - logq)).sum())
        entry["tokens"] += len(reply)
        if greedy != reply:
            entry["wrong"][tokenizer.decode(greedy).strip()] += 1
    return {
        str(k): {
            "turns": v["n"],
            "accuracy": v["correct"] / v["n"],
            "kl": v["kl"] / v["tokens"],
            "wrong_replies": dict(v["wrong"].most_common(3)),
        }
        for k, v in sorted(by_turn.items())
    }


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--demo", type=Path, required=True)
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--steps", type=int, default=16, help="steps to train and measure (default: %(default)s)")
    parser.add_argument("--tasks", type=int, default=32, help="held-out seen tasks measured (default: %(default)s)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="a demo setting for the run, e.g. lr=3e-4 (repeatable)")  # fmt: skip
    parser.add_argument("--point", type=lr_and_updates, help="LR,UPDATES instead of the tuned point, e.g. 1e-3,8")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    settings = demo_settings("default")
    for item in args.overrides:
        key, _, value = item.partition("=")
        current = getattr(settings, key)
        setattr(settings, key, (int if current is None else type(current))(value))  # eta is None: paced
    started = time.perf_counter()
    runs = []
    for seed in [int(s) for s in args.seeds.split(",")]:
        config = run_config(settings, args.demo, "robust", "tcod_b2f", seed, point=args.point)
        folder = args.out.parent / f".b2f_probe_seed{seed}"
        config.trainer.output_dir = str(folder)
        config.trainer.checkpoint_every = 1
        config.trainer.keep_checkpoints = args.steps + 1
        config.trainer.eval_every = 0
        shutil.rmtree(folder, ignore_errors=True)
        run = loop.train(config, stop_after_step=args.steps)
        tokenizer, prompter = run.tokenizer, run.prompter
        splits = build.env_task_splits(config.env)
        envs = build.build_envs(config.env, 16)
        expert = sft.expert_trajectories(
            splits["seen"][: args.tasks], envs, tokenizer=tokenizer, prompter=prompter, context_mode="window",
            max_turns=config.curriculum.max_turns,
        )  # fmt: skip
        records = _turn_records(expert, tokenizer, prompter)
        start = build.build_model(config.model.student_path, config.model.student_tiny, tokenizer).eval()
        by_step = {"0": measure(start, run.teacher, records, tokenizer)}
        for step in range(1, args.steps + 1):
            state = load_checkpoint(folder / "checkpoints" / f"step_{step:08d}.pt")
            start.load_state_dict(state["student"])
            by_step[str(step)] = measure(start, run.teacher, records, tokenizer)
        history = [
            {key: record.get(key) for key in ("step", "success", "turns/student_mean", "turns/expert_mean", "kl_by_turn", "lr")}
            for record in read_metrics(folder / "metrics.jsonl", kind="train")
        ]
        runs.append({
            "seed": seed, "eta": config.curriculum.eta, "lr": config.trainer.lr, "updates_per_step": config.trainer.updates_per_step,
            "expert_turns_on_path": by_step, "training": history,
        })  # fmt: skip
        print(f"seed {seed}: done", flush=True)
    write_report({**report_header("cpu"), "seconds": time.perf_counter() - started, "runs": runs}, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
