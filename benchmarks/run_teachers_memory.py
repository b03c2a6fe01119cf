"""Peak CPU memory of a training step with one and with two in-process teachers.

One student trained on two environments (the key-and-door and alchemy games), with:

* **one teacher** supervising both environments;
* **two teachers**, one per environment (multi-teacher OPD): each micro-batch holds the
  episodes of one teacher and runs only that teacher.

Each layout runs in a fresh process (CPU tensors have no allocator statistics): it builds the
run, then measures the resident set once the models are loaded and the rise of its high-water
mark over one training step (rollout, loss, update; ``/proc/self/clear_refs``, see
benchmarks/memory_probe.py). Forward hooks count each teacher's forward passes in the step's
loss, against the micro-batches that hold its episodes.

Usage: python benchmarks/run_teachers_memory.py [--out benchmarks/results/teachers_memory_cpu.json]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from memory_probe import _status_bytes, reset_peak_rss  # noqa: E402
from run_report import report_header, tiny_defaults, write_report  # noqa: E402

MIB = 2**20
ENVS = (
    "envs=[{name: toy, kwargs: {max_rooms: 2, max_steps: 8}, num_train_tasks: 16},"
    " {name: alchemy, kwargs: {max_ingredients: 2, max_steps: 8}, num_train_tasks: 16}]"
)
LAYOUTS = {
    "one_teacher": "teachers=[{name: both}]",
    "two_teachers": "teachers=[{name: keys, envs: [toy]}, {name: brews, envs: [alchemy]}]",
}


def measure(layout: str, hidden: int, layers: int, tasks: int) -> dict:
    import torch

    from tcod_fast.trainer import loop
    from tcod_fast.trainer.config import load_config
    from tcod_fast.trainer.setup import setup_run

    torch.set_num_threads(2)
    teacher = f"{{hidden_size: {hidden}, intermediate_size: {hidden * 11 // 4}, num_hidden_layers: {layers}, seed: 2}}"
    with tempfile.TemporaryDirectory() as folder:
        config = load_config(None, [
            f"trainer.output_dir={folder}/run", "trainer.steps=1", "eval.num_tasks=0", "logging.progress=false",
            "env.vocab_tasks_per_split=8", f"rollout.tasks_per_step={tasks}", "rollout.max_new_tokens=8",
            "curriculum.max_turns=6", "trainer.micro_batch_tokens=4096",
            "model.student_tiny={hidden_size: 64, intermediate_size: 128, num_hidden_layers: 2, seed: 1}",
            f"model.teacher_tiny={teacher}", ENVS, LAYOUTS[layout],
        ])  # fmt: skip
        run = setup_run(config)
        try:
            forwards = {name: 0 for name in run.teachers}
            for name, entry in run.teachers.items():
                # the embedding runs in every forward of the model, whichever head follows
                embedding = entry.model.get_input_embeddings()
                embedding.register_forward_hook(lambda *_, name=name: forwards.__setitem__(name, forwards[name] + 1))
            batch = loop.rollout(run, 0)  # rollouts first: the step measured is loss + update
            scores = loop.score(run, batch)
            advantages = loop.compute_advantages(run, batch, scores)
            episodes = {name: sum(run.teacher_for(t.task).name == name for t in batch.trajectories) for name in run.teachers}
            resident = reset_peak_rss()
            loop.train_on_batch(run, batch, advantages)
            peak = _status_bytes("VmHWM")
            return {
                "layout": layout,
                "teachers": len(run.teachers),
                "teacher_parameters": {n: sum(p.numel() for p in t.model.parameters()) for n, t in run.teachers.items()},
                "episodes_by_teacher": episodes,
                "teacher_forwards_in_step": forwards,
                "resident_after_setup_and_rollout_mib": resident / MIB,
                "step_peak_rise_mib": (peak - resident) / MIB,
                "peak_resident_mib": peak / MIB,
            }
        finally:
            run.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--hidden", type=int, default=512, help="teacher hidden size (default: %(default)s)")
    parser.add_argument("--layers", type=int, default=8, help="teacher decoder layers (default: %(default)s)")
    parser.add_argument("--tasks", type=int, default=8, help="episodes of the measured step (default: %(default)s)")
    parser.add_argument("--out", type=Path, help="JSON report path")
    parser.add_argument("--layout", choices=sorted(LAYOUTS), help=argparse.SUPPRESS)  # a child process's one layout
    tiny_defaults(parser, hidden=32, layers=1, tasks=2)
    args = parser.parse_args()
    if args.layout is not None:
        print(json.dumps(measure(args.layout, args.hidden, args.layers, args.tasks)))
        return
    report = {**report_header("cpu"), "threads": 2, "runs": []}
    report["note"] = (
        "resident_after_setup_and_rollout_mib: the process once models are loaded and the step's episodes played; "
        "step_peak_rise_mib: rise of the resident-set high-water mark over the loss and update of one training step; "
        "each layout in a fresh process"
    )
    for layout in LAYOUTS:
        command = [sys.executable, __file__, "--layout", layout, "--hidden", str(args.hidden), "--layers", str(args.layers),
                   "--tasks", str(args.tasks)]  # fmt: skip
        out = subprocess.run(command, capture_output=True, text=True, check=True)
        row = json.loads(out.stdout.strip().splitlines()[-1])
        report["runs"].append(row)
        print(f"{layout}: resident {row['resident_after_setup_and_rollout_mib']:.0f} MiB, step peak rise "
              f"{row['step_peak_rise_mib']:.0f} MiB, teacher forwards {row['teacher_forwards_in_step']}")  # fmt: skip
    one, two = report["runs"]
    report["two_over_one_peak_resident"] = two["peak_resident_mib"] / one["peak_resident_mib"]
    write_report(report, args.out)


if __name__ == "__main__":
    main()
