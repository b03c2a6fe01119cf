"""Train a student on the pure-Python key-and-door game (no Java, seconds per step on CPU).

    python examples/train_toy.py --algorithm tcod_f2b --steps 20 --out runs/toy

Without --teacher the teacher is a random tiny model, which shows the mechanics only; the
built-in demo (`tcod-fast demo`) first trains a real teacher by supervised learning.
"""

from _common import run_example

if __name__ == "__main__":
    run_example(
        __doc__,
        ["env.name=toy", "env.kwargs={max_rooms: 3}", "curriculum.max_turns=10", "curriculum.eta=2", "rollout.tasks_per_step=8", "eval.num_tasks=8"],
        default_out="runs/toy",
    )
