"""Distil a student that visibly gets better, on the pure-Python key-and-door game (CPU, a
few minutes, nothing downloaded).

    python examples/train_toy.py --out runs/toy                      # trains its own teacher first
    python examples/train_toy.py --out runs/toy --demo tcod-demo     # or reuses a demo's models

A distillation is only as good as its teacher, and a random student learns little in a few
minutes, so this script first makes what the built-in demo makes (``tcod-fast demo``): a
robust teacher (supervised on the expert's episodes, then DAgger rounds on its own noisy
ones) and a student warm-started on a few expert episodes. With ``--demo DIR`` it takes both
from a demo's output folder instead. Then it distils the student with ``--algorithm`` (OPD by
default) at the demo's settings, which every algorithm shares, and its tuned learning rate,
evaluates it before and after on held-out seen and unseen tasks, and prints the trainer's
summary and whether the student ended better than it started.
"""

import argparse
import shutil
import sys
import time
from pathlib import Path

from tcod_fast.demo import DemoSettings, base_config, demo_settings, run_config
from tcod_fast.demo.jobs import job_narrow_teacher, job_robust_teacher, job_student_init
from tcod_fast.trainer import build, loop
from tcod_fast.trainer.plots import plot_run
from tcod_fast.trainer.summary import train_summary


def make_models(settings: DemoSettings, out: Path, seed: int) -> Path:
    """The demo's tokenizer, robust teacher and warm-started student of ``seed``, in ``out``."""
    config = base_config(settings, out)
    print("building the tokenizer, the robust teacher (SFT + DAgger) and the student start ...", flush=True)
    tokenizer = build.build_tokenizer(config, build.build_prompter(config.env))
    tokenizer.save_pretrained(str(out / "tokenizer"))
    job_narrow_teacher(settings, out)
    rounds = job_robust_teacher(settings, out)["dagger_rounds"]
    print(f"  robust teacher: {len(rounds)} DAgger rounds, last collection success {rounds[-1]['success_while_collecting']:.2f}")
    job_student_init(settings, out, seed)
    return out


def copy_models(source: Path, out: Path, seed: int) -> Path:
    """The tokenizer, robust teacher and student start of ``seed`` of the demo folder ``source``."""
    for part in ("tokenizer", "models/teacher_robust", f"models/student_init_seed{seed}"):
        if not (source / part).is_dir():
            sys.exit(f"train_toy.py: --demo must be a tcod-fast demo output folder with {part}/, got {source}")
        shutil.copytree(source / part, out / part, dirs_exist_ok=True)
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--algorithm", default="opd", help="a demo run kind: opd, tcod_f2b, tcod_b2f@sampled, ... (default: opd)")
    parser.add_argument("--out", default="runs/toy", help="folder for the models and the run (default: %(default)s)")
    parser.add_argument("--demo", type=Path, help="take the teacher and student start from this tcod-fast demo folder")
    parser.add_argument("--seed", type=int, default=0, help="student seed (default: %(default)s)")
    parser.add_argument("--steps", type=int, help="training steps (default: the demo's)")
    args = parser.parse_args()
    settings = demo_settings("default")
    if args.steps is not None:
        settings.steps = args.steps
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    if args.demo:
        copy_models(args.demo.resolve(), out, args.seed)
    else:
        make_models(settings, out, args.seed)
    config = run_config(settings, out, "robust", args.algorithm, args.seed)
    config.trainer.output_dir = str(out / "run")
    config.eval.at_start = True  # the student's start, on the same tasks
    config.logging.progress = True
    shutil.rmtree(config.trainer.output_dir, ignore_errors=True)
    print(f"distilling with {args.algorithm}: {settings.steps} steps of {settings.episodes_per_step} episodes, "
          f"lr {config.trainer.lr:g} x {config.trainer.updates_per_step} updates per step", flush=True)  # fmt: skip
    run = loop.train(config)
    plot_run(config.trainer.output_dir)
    print(train_summary(run, time.perf_counter() - started))
    evals = [r for r in run.state.history if r.get("kind") == "eval"]
    before, after = evals[0], evals[-1]
    gains = {split: after[f"success_{split}"] - before[f"success_{split}"] for split in ("seen", "unseen")}
    verdict = "better than it started" if all(g > 0 for g in gains.values()) else "NOT better than it started"
    print(f"the student ended {verdict}: success "
          + ", ".join(f"{s} {before[f'success_{s}']:.2f} -> {after[f'success_{s}']:.2f} ({g:+.2f})" for s, g in gains.items()))  # fmt: skip
    return 0 if all(g > 0 for g in gains.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
