"""Train a student on TextWorld-Express (needs `pip install textworld-express==1.1.0` and Java).

    python examples/train_textworld_express.py --algorithm tcod_b2f --steps 20 --out runs/twx

The coin game with small maps; environments run in 2 worker processes (one JVM each).
"""

from _common import run_example

if __name__ == "__main__":
    run_example(
        __doc__,
        [
            "env.name=twx-coin",
            "env.kwargs={max_tasks_per_split: 64, env_step_limit: 20}",
            "env.pool_workers=2",
            "curriculum.max_turns=12",
            "curriculum.eta=3",
            "rollout.tasks_per_step=8",
            "eval.num_tasks=8",
        ],
        default_out="runs/twx",
    )
