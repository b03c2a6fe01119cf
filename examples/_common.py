"""Shared command line of the per-environment example scripts."""

import argparse

from tcod_fast.algorithms import algorithm_names, get_algorithm
from tcod_fast.trainer.config import load_config
from tcod_fast.trainer.loop import train
from tcod_fast.trainer.plots import plot_run

#: The papers' settings for long text-game episodes (the windowed history prompt, 30 turns,
#: eta 5), at the examples' size (4 tasks a step, 4 evaluation tasks, 32-token replies).
PAPER_LONG_EPISODE_SETTINGS = [
    "env.context_mode=window",
    "curriculum.max_turns=30",
    "curriculum.eta=5",
    "rollout.tasks_per_step=4",
    "eval.num_tasks=4",
    "rollout.max_new_tokens=32",
]


def run_example(description: str, env_overrides: list[str], *, default_out: str, default_steps: int = 20) -> None:
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--algorithm", default="tcod_f2b", choices=algorithm_names())
    parser.add_argument("--steps", type=int, default=default_steps)
    parser.add_argument("--out", default=default_out)
    parser.add_argument("--teacher", help="local Hugging Face teacher folder (default: a random tiny model)")
    parser.add_argument("--student", help="local Hugging Face student folder (default: a random tiny model)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], help="extra config overrides")
    parser.add_argument("--resume", action="store_true")
    args = parser.parse_args()
    overrides = [
        f"curriculum.algorithm={args.algorithm}",
        f"trainer.steps={args.steps}",
        f"trainer.output_dir={args.out}",
        *env_overrides,
    ]
    min_group_size = get_algorithm(args.algorithm).min_group_size
    if min_group_size > 1:  # GRPO groups
        overrides.append(f"curriculum.episodes_per_task={max(4, min_group_size)}")
    if args.teacher:
        overrides.append(f"model.teacher_path={args.teacher}")
    if args.student:
        overrides.append(f"model.student_path={args.student}")
    config = load_config(None, overrides + args.overrides)
    run = train(config, resume=args.resume)
    plot_run(config.trainer.output_dir)
    print(run.state.last_eval)
