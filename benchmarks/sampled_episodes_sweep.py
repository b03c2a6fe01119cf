"""Does the papers' sampled-token OPD learn when each update sees more episodes?

Runs the demo's ``opd@sampled`` (and, for comparison, ``opd``) from the robust teacher of a
demo output folder (``--demo DIR``) at its tuned learning rate and updates per step (or
``--point``), with the demo's steps, and ``--episodes`` episodes per step (the demo's 8, and
more), for each student seed; records the final success on the held-out seen and unseen tasks.
More episodes per step average more single-token draws into each update, which is what the
sampled estimator's noise needs (``benchmarks/opd_estimator_probe.py``); a less noisy update
may also bear a larger step. Writes one JSON file (``--out``).
"""

from __future__ import annotations

import argparse
import shutil
import sys
import time
from pathlib import Path

import torch
from run_report import lr_and_updates, report_header, write_report

from tcod_fast.demo import demo_settings, run_config
from tcod_fast.trainer import loop


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--demo", type=Path, required=True, help="output folder of tcod-fast demo (its models)")
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--episodes", default="8,32", help="episodes per step to try (default: %(default)s)")
    parser.add_argument("--runs", default="opd@sampled,opd", help="demo run kinds (default: %(default)s)")
    parser.add_argument("--point", type=lr_and_updates, help="LR,UPDATES for every run instead of each run kind's tuned point, e.g. 1e-3,8")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    started = time.perf_counter()
    rows = []
    for name in args.runs.split(","):
        for episodes in [int(e) for e in args.episodes.split(",")]:
            for seed in [int(s) for s in args.seeds.split(",")]:
                settings = demo_settings("default")
                settings.episodes_per_step = episodes
                config = run_config(settings, args.demo, "robust", name, seed, point=args.point)
                config.trainer.output_dir = str(args.out.parent / ".sweep" / f"{name}_{episodes}_{seed}")
                config.trainer.eval_every = 0
                shutil.rmtree(config.trainer.output_dir, ignore_errors=True)
                run_started = time.perf_counter()
                run = loop.train(config)
                final = run.state.last_eval or {}
                row = {
                    "run": name, "episodes_per_step": episodes, "seed": seed, "lr": config.trainer.lr,
                    "updates_per_step": config.trainer.updates_per_step, "steps": config.trainer.steps,
                    "success_seen": final.get("success_seen"), "success_unseen": final.get("success_unseen"),
                    "seconds": time.perf_counter() - run_started,
                }  # fmt: skip
                rows.append(row)
                print(row, flush=True)
    write_report({**report_header("cpu"), "seconds": time.perf_counter() - started, "rows": rows}, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
