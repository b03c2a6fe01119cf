"""Train a student on ScienceWorld (needs `pip install scienceworld==1.2.3` and Java).

    python examples/train_scienceworld.py --algorithm tcod_f2b --steps 10 --out runs/sciworld

ScienceWorld steps take ~0.1 s and its prompts list many admissible actions (capped at 50
here); the papers use eta=5-6 and 30 turns.
"""

from _common import PAPER_LONG_EPISODE_SETTINGS, run_example

if __name__ == "__main__":
    run_example(
        __doc__,
        [
            "env.name=scienceworld",
            "env.pool_workers=2",
            "env.vocab_tasks_per_split=4",  # each costs a whole expert episode on a slow engine
            "env.max_admissible_actions=50",
            *PAPER_LONG_EPISODE_SETTINGS,
        ],
        default_out="runs/sciworld",
        default_steps=10,
    )
