"""The demo from start to end (:func:`run_demo`): the tokenizer, the jobs in order, with
``--tune`` the grid first (:func:`choose_points`), and the outputs: ``results.json``
assembled from the runs, ``results.md``, ``metrics.jsonl`` and the plots."""

from __future__ import annotations

import json
import math
import statistics
import time
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from tcod_fast import provenance
from tcod_fast.demo.configs import base_config, student_init_dir, teacher_dir
from tcod_fast.demo.figures import plot_demo
from tcod_fast.demo.jobs import (
    Job,
    job_narrow_teacher,
    job_reference_eval,
    job_robust_teacher,
    job_student_init,
    job_student_run,
    run_jobs,
)
from tcod_fast.demo.report import results_table, verdicts
from tcod_fast.demo.settings import TEACHERS, DemoSettings, demo_settings, parse_variant
from tcod_fast.demo.stats import aggregate, last_two_evals, mean_curve, paired_difference, std
from tcod_fast.trainer import build
from tcod_fast.trainer.config import config_to_dict

__all__ = ["choose_points", "run_demo", "tuned_variants", "write_metrics"]


def tuned_variants(settings: DemoSettings) -> list[str]:
    """The variants a tuning of ``settings`` covers: every run kind of either teacher."""
    return list(dict.fromkeys([*settings.robust_algorithms, *settings.narrow_algorithms]))


def choose_points(settings: DemoSettings, tuning_runs: list[dict]) -> dict:
    """The grid's results and each variant's chosen point: the highest mean final success on
    the seen split over the tuning seeds (a tie goes to the point listed first, the cheaper).
    Returns the content of ``grid.json`` (and of :data:`tcod_fast.demo.settings.TUNED_POINTS_FILE`)."""
    grid = [list(point) for point in settings.grid]
    seen: dict[str, list[list[float]]] = {}
    chosen: dict[str, dict] = {}
    for variant in dict.fromkeys(r["algorithm"] for r in tuning_runs):
        per_point = []
        for lr, updates in settings.grid:
            values = [
                r["success_seen"] for r in tuning_runs
                if r["algorithm"] == variant and r["lr"] == lr and r["updates_per_step"] == updates
            ]  # fmt: skip
            per_point.append(values)
        seen[variant] = per_point
        means = [statistics.fmean(v) if v else float("-inf") for v in per_point]
        best = max(range(len(means)), key=lambda i: (means[i], -i))
        chosen[variant] = {"lr": grid[best][0], "updates_per_step": grid[best][1], "seen_success": means[best]}
    return {
        "grid": grid,
        "tuning_seeds": list(settings.tuning_seeds),
        "teacher": "robust",
        "steps": settings.steps,
        "episodes_per_step": settings.episodes_per_step,
        "selection": "highest mean final success on the seen split over the tuning seeds; ties to the earlier grid point",
        "seen_success": seen,
        "chosen": chosen,
    }


def run_demo(
    out: str | Path = "tcod-demo",
    *,
    settings: DemoSettings | None = None,
    preset: str = "default",
    progress: bool = True,
    tune: bool = False,
) -> dict:
    """Run the demo into folder ``out``; returns the ``results.json`` content. With ``tune``,
    first run the learning rate x updates grid for every variant (:func:`choose_points`,
    written to ``out/grid.json``) and use its choices instead of the committed ones."""
    settings = settings or demo_settings(preset)
    out = Path(out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    commit = provenance.commit()  # the code the runs start with
    torch.set_num_threads(1)

    # 1. tokenizer, learnt from the texts of every split
    config = base_config(settings, out)
    prompter = build.build_prompter(config.env)
    tokenizer = build.build_tokenizer(config, prompter)
    tokenizer.save_pretrained(str(out / "tokenizer"))

    # 2-4. teachers, student starts and reference evaluations
    jobs = [
        Job("teacher/narrow", job_narrow_teacher, (settings, out)),
        Job("teacher/robust", job_robust_teacher, (settings, out), needs=("teacher/narrow",)),
    ]
    init_seeds = [*settings.seeds, *(s for s in settings.tuning_seeds if tune and s not in settings.seeds)]
    jobs += [Job(f"student_init/seed{s}", job_student_init, (settings, out, s)) for s in init_seeds]
    for teacher in ("narrow", "robust"):
        jobs.append(
            Job(
                f"eval/teacher_{teacher}", job_reference_eval,
                (settings, out, f"teacher_{teacher}", str(teacher_dir(out, teacher)), None),
                needs=(f"teacher/{teacher}",),
            )  # fmt: skip
        )
    jobs += [
        Job(
            f"eval/student_init/seed{s}", job_reference_eval,
            (settings, out, f"student_init_seed{s}", str(student_init_dir(out, s)), "robust"),
            needs=(f"student_init/seed{s}", "teacher/robust"),
        )  # fmt: skip
        for s in settings.seeds
    ]
    # 5. with --tune: every variant at every grid point, on the tuning seeds (robust teacher)
    if tune:
        jobs += [
            Job(
                f"tuning/{variant}/lr{lr:g}_updates{updates}/seed{s}", job_student_run,
                (settings, out, "robust", variant, s, (lr, updates)), needs=("teacher/robust", f"student_init/seed{s}"),
            )  # fmt: skip
            for variant in tuned_variants(settings)
            for lr, updates in settings.grid
            for s in settings.tuning_seeds
        ]
    runs = [
        (teacher, algorithm, s) for teacher in ("narrow", "robust") for algorithm in settings.algorithms(teacher) for s in settings.seeds
    ]
    bar = tqdm(total=len(jobs) + len(runs), desc="demo jobs", disable=not progress, unit="job")

    def on_done(job: Job, result: dict, seconds: float) -> None:
        bar.update(1)
        line = f"{job.key}: done in {seconds:.0f} s"
        if job.key.startswith(("run/", "tuning/")):
            line += f"; success seen {result['success_seen']:.2f}, unseen {result['success_unseen']:.2f}"
        elif job.key.startswith("eval/"):
            evaluation = result["eval"] or {}
            line += f"; success seen {evaluation.get('success_seen', 0):.2f}, unseen {evaluation.get('success_unseen', 0):.2f}"
        if progress:
            bar.write(line)

    def student_jobs():  # 6. student runs, each variant at its point
        return [
            Job(
                f"run/{teacher}/{algorithm}/seed{s}", job_student_run, (settings, out, teacher, algorithm, s),
                needs=(f"teacher/{teacher}", f"student_init/seed{s}"),
            )  # fmt: skip
            for teacher, algorithm, s in runs
        ]

    if tune:  # the runs need the grid's choices: they start once the grid is done
        results_by_job = run_jobs(jobs, settings.workers, on_done)
        grid_results = choose_points(settings, [r for key, r in results_by_job.items() if key.startswith("tuning/")])
        grid_results.update(base_seed=settings.base_seed, commit=commit, versions=provenance.versions(), machine=provenance.machine())
        (out / "grid.json").write_text(json.dumps(grid_results, indent=1) + "\n")
        settings.tuned = grid_results
        results_by_job.update(run_jobs(student_jobs(), settings.workers, on_done, done=results_by_job))
    else:
        results_by_job = run_jobs(jobs + student_jobs(), settings.workers, on_done)
    bar.close()

    # 7. results
    results = _assemble(settings, out, tokenizer, results_by_job, time.perf_counter() - started, commit)
    write_metrics(out, results_by_job)
    (out / "results.json").write_text(json.dumps(results, indent=1) + "\n")
    (out / "results.md").write_text(results_table(results))
    plot_demo(out, results)
    return results


def write_metrics(out: Path, results_by_job: dict[str, dict]) -> None:
    """Every record of every run, in one labelled JSONL file."""
    with open(out / "metrics.jsonl", "w") as handle:
        for key, result in results_by_job.items():
            for record in result.get("history", []):
                handle.write(json.dumps(record) + "\n")


def _assemble(
    settings: DemoSettings, out: Path, tokenizer, by_job: dict[str, dict], wall_seconds: float, commit: str
) -> dict:
    runs = [result for key, result in by_job.items() if key.startswith("run/")]
    runs.sort(key=lambda r: (TEACHERS.index(r["teacher"]), list(settings.algorithms(r["teacher"])).index(r["algorithm"]), r["seed"]))
    reference = {key[len("eval/") :]: result["eval"] for key, result in by_job.items() if key.startswith("eval/")}
    inits = [reference[f"student_init/seed{s}"] for s in settings.seeds]
    headline: dict[str, Any] = {
        "seeds": settings.num_seeds,
        "teacher": {
            teacher: {
                "success_seen": reference[f"teacher_{teacher}"]["success_seen"],
                "success_unseen": reference[f"teacher_{teacher}"]["success_unseen"],
            }
            for teacher in TEACHERS
        },
        "student_init": {
            "success_seen": statistics.fmean(e["success_seen"] for e in inits),
            "success_seen_std": std([e["success_seen"] for e in inits]),
            "success_unseen": statistics.fmean(e["success_unseen"] for e in inits),
            "success_unseen_std": std([e["success_unseen"] for e in inits]),
            "final_kl": statistics.fmean(e["kl_seen/trajectory_mean"] for e in inits),
            "kl_by_turn": mean_curve([e.get("kl_by_turn_seen", []) for e in inits]),
        },
    }
    for teacher in TEACHERS:
        of_teacher = [r for r in runs if r["teacher"] == teacher]
        headline[teacher] = {}
        for algorithm in settings.algorithms(teacher):
            variant = parse_variant(algorithm)
            mine = [r for r in of_teacher if r["algorithm"] == algorithm]
            entry = {"formulation": variant.formulation, **aggregate(mine)}
            baseline = [r for r in of_teacher if r["algorithm"] == variant.opd_baseline]
            if algorithm != variant.opd_baseline and baseline:
                entry["vs_opd"] = {"opd": variant.opd_baseline, **paired_difference(mine, baseline)}
            converged = {split: last_two_evals(mine, split) for split in ("seen", "unseen")}
            if all(converged.values()):
                entry["last_two_evals"] = converged
            headline[teacher][algorithm] = entry
    settings_record = config_to_dict(settings)
    settings_record.pop("tuned", None)
    settings_record["eta"] = settings.pacing
    settings_record["algorithms"] = {
        name: _algorithm_settings(settings, name) for name in dict.fromkeys([*settings.robust_algorithms, *settings.narrow_algorithms])
    }
    settings_record["grid"] = {
        "points": [list(point) for point in settings.grid],
        "source": settings.tuned.get("source", "grid.json of this run (--tune)"),
        **{key: settings.tuned.get(key) for key in ("tuning_seeds", "selection", "seen_success", "chosen")},
    }
    setup = {
        "seeds": settings.seeds,
        "base_seed": settings.base_seed,
        "commit": commit,
        "versions": provenance.versions(),
        **provenance.machine(),
        "threads": 1,
        "workers": settings.workers,
        "wall_seconds": wall_seconds,
        "settings": settings_record,
        "vocab_size": len(tokenizer),
        "parameters": {
            "teacher": _count_parameters(teacher_dir(out, "robust")),
            "student": _count_parameters(student_init_dir(out, settings.seeds[0])),
        },
        "teachers": {"narrow": by_job["teacher/narrow"], "robust": by_job["teacher/robust"]},
        "student_inits": [by_job[f"student_init/seed{s}"] for s in settings.seeds],
        "student_init_evals": {f"seed{s}": reference[f"student_init/seed{s}"] for s in settings.seeds},
    }
    return {"setup": setup, "headline": headline, "verdicts": verdicts(headline, runs), "runs": runs}


def _algorithm_settings(settings: DemoSettings, name: str) -> dict:
    """What one variant's runs were given: the shared budget and its tuned point."""
    variant = parse_variant(name)
    lr, updates = settings.point(name)
    return {
        "algorithm": variant.algorithm,
        "formulation": variant.formulation,
        "lr": lr,
        "updates_per_step": updates,
        "steps": settings.steps,
        "episodes_per_step": settings.episodes_per_step,
        "rollout_temperature": settings.rollout_temperature_of(variant),
    }


def _count_parameters(folder: Path) -> int:
    from safetensors import safe_open

    total = 0
    for path in folder.glob("*.safetensors"):
        with safe_open(str(path), "pt") as handle:
            for key in handle.keys():
                total += math.prod(int(d) for d in handle.get_slice(key).get_shape())
    return total
