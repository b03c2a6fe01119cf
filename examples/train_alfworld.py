"""Train a student on ALFWorld with tasks generated offline (needs the [envs] extra).

    tcod-fast envs make-alfworld-tasks --out data/alfworld/train --n 32 --split seen
    tcod-fast envs make-alfworld-tasks --out data/alfworld/valid_seen --n 8 --split seen --seed 1
    tcod-fast envs make-alfworld-tasks --out data/alfworld/valid_unseen --n 8 --split unseen --seed 2
    python examples/train_alfworld.py --data data/alfworld --algorithm tcod_b2f --steps 10

The papers' settings are 30 turns, eta=5-6, and the windowed history prompt.
"""

import sys

from _common import PAPER_LONG_EPISODE_SETTINGS, run_example

if __name__ == "__main__":
    data = "data/alfworld"
    if "--data" in sys.argv:
        index = sys.argv.index("--data")
        data = sys.argv[index + 1]
        del sys.argv[index : index + 2]
    run_example(
        __doc__,
        [
            "env.name=alfworld",
            f"env.kwargs={{data_path: {data}, max_episode_steps: 30}}",
            "env.pool_workers=2",
            "env.vocab_tasks_per_split=8",  # each costs a whole expert episode on a slow engine
            *PAPER_LONG_EPISODE_SETTINGS,
        ],
        default_out="runs/alfworld",
        default_steps=10,
    )
