"""Measure how often ALFWorld's own handcoded expert wins the generated tasks, by task type.

For each seed, generate one task of every type (each validated on the engine as usual), then
play ALFWorld's handcoded expert afresh on every kept task with another tie-breaking seed than
generation used: once with its placement tracking corrected (what generation validates with,
``tcod_fast.envs.alfworld.engine.track_moves_as_puts``) and once exactly as ALFWorld 0.4.2 ships
it. Writes the counts as JSON; the numbers quoted in docs/environments.md come from it.

    python tests/envs/alfworld_expert_sweep.py --seeds 100-119 --split seen --out sweep.json
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from collections import defaultdict

WAYS = {"tracked": True, "as_shipped": False}


def _seed_list(text: str) -> list[int]:
    seeds: list[int] = []
    for part in text.split(","):
        first, _, last = part.partition("-")
        seeds.extend(range(int(first), int(last or first) + 1))
    return seeds


def _new_counts() -> dict:
    counts: dict = {"tasks": 0, "kept_by_planner": 0}
    for way in WAYS:
        counts.update({f"wins_{way}": 0, f"longest_win_{way}": 0})
    return counts


def sweep(seeds: list[int], split: str, max_steps: int, replay_seed: int) -> dict:
    from tcod_fast.envs.alfworld import TASK_TYPES, TaskGenConfig, generate_tasks
    from tcod_fast.envs.alfworld.engine import EnginePool, run_handcoded_expert

    by_type: dict[str, dict] = defaultdict(_new_counts)
    lost: dict[str, list[str]] = {way: [] for way in WAYS}
    pool = EnginePool()
    start = time.time()
    try:
        with tempfile.TemporaryDirectory(prefix="alfworld-sweep-") as root:
            for seed in seeds:
                config = TaskGenConfig(n_tasks=len(TASK_TYPES), seed=seed, split=split)
                for task in generate_tasks(os.path.join(root, str(seed)), config, progress=False):
                    counts = by_type[task.task_type]
                    counts["tasks"] += 1
                    counts["kept_by_planner"] += task.expert_type == "planner"
                    game_file = os.path.join(task.task_dir, "game.tw-pddl")
                    for way, track_moves in WAYS.items():
                        actions = run_handcoded_expert(pool, game_file, max_steps, replay_seed, track_moves=track_moves)
                        if actions is None:
                            lost[way].append(f"{seed}/{os.path.basename(task.task_dir)}")
                        else:
                            counts[f"wins_{way}"] += 1
                            counts[f"longest_win_{way}"] = max(counts[f"longest_win_{way}"], len(actions))
                done = sum(c["tasks"] for c in by_type.values())
                won = {way: sum(c[f"wins_{way}"] for c in by_type.values()) for way in WAYS}
                print(f"seed {seed}: {done} tasks, won {won}", file=sys.stderr, flush=True)
    finally:
        pool.close()
    return {
        "split": split,
        "seeds": seeds,
        "expert_max_steps": max_steps,
        "replay_seed": replay_seed,
        "by_task_type": dict(sorted(by_type.items())),
        "lost": lost,
        "seconds": round(time.time() - start, 1),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", default="100-109", help="seeds, e.g. 100-119 or 3,7,100-104")
    parser.add_argument("--split", default="seen", choices=("seen", "unseen"))
    parser.add_argument("--max-steps", type=int, default=150, help="the expert gives up after this many steps")
    parser.add_argument("--replay-seed", type=int, default=12345, help="seeds the expert's tie-breaking when replayed")
    parser.add_argument("--out", required=True, help="JSON file to write")
    args = parser.parse_args(argv)
    result = sweep(_seed_list(args.seeds), args.split, args.max_steps, args.replay_seed)
    with open(args.out, "w") as f:
        json.dump(result, f, indent=1)
    print(json.dumps(result["by_task_type"]))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
