"""``tcod-fast demo --mopd``: one student distilled from two specialist teachers at once
(multi-teacher OPD), against students distilled from one teacher alone.

The two games (:data:`~tcod_fast.demo.configs.GAMES`) share nothing but the reply format:
the key-and-door game (rooms, containers, keys, a vault) and the alchemy game (shelves of
ingredient jars, a recipe card, a cauldron), with their own objects, rules and action words.

1. **tokenizer**, learnt from both games' texts, shared by every model;
2. **one robust specialist teacher per game**, trained on that game alone (supervised on
   expert episodes, then DAgger rounds), as in the single-game demo;
3. **one student start per seed**, warm-started on a few expert episodes of each game (as
   many per game as the single-game demo's start), as wide as the teachers
   (``DemoSettings.mopd_student``: one student holds two games);
4. **three runs per seed**, each with the same budget on both games: the single-game demo's
   budget for each game (its steps, and its episodes per step of each game, drawn by equal
   weights), at OPD's committed learning rate:

   * ``mopd``: each episode distilled from its own game's teacher;
   * ``single_toy`` / ``single_alchemy``: every episode from that one teacher;

5. **evaluation** of every teacher and student on both games' held-out seen and unseen
   tasks, and the verdicts computed from the numbers: whether the MOPD student reaches 0.8
   of each specialist on its own game, and whether it beats each single-teacher student on
   the game that student's teacher does not know (differences paired by seed, 95% intervals).

Outputs in ``--out`` (``results.json`` with ``setup`` / ``headline`` / ``runs``,
``results.md``, ``metrics.jsonl``, ``mopd.png``) and one folder per run.
"""

from __future__ import annotations

import json
import statistics
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from tcod_fast import provenance
from tcod_fast.demo.configs import GAMES, base_config, game_kwargs, run_config, student_init_dir, teacher_dir
from tcod_fast.demo.experiment import write_metrics
from tcod_fast.demo.jobs import Job, job_narrow_teacher, job_robust_teacher, job_student_init, run_jobs
from tcod_fast.demo.settings import DemoSettings
from tcod_fast.demo.stats import paired_difference, std
from tcod_fast.trainer import build, loop
from tcod_fast.trainer.config import EnvEntry, EnvSettings, TeacherEntry, TrainConfig, config_to_dict
from tcod_fast.trainer.evaluation import evaluate_model

__all__ = ["MOPD_RUNS", "mopd_config", "mopd_verdicts", "run_mopd_demo"]

#: The student runs of each seed: distilled from both teachers, or from one of them alone.
MOPD_RUNS = ("mopd", *(f"single_{game}" for game in GAMES))

#: The MOPD student must reach this share of each specialist's success on the specialist's game.
SPECIALIST_SHARE = 0.8


def _both_games(config: TrainConfig, settings: DemoSettings) -> TrainConfig:
    """``config`` on both games at once: ``envs`` lists them (equal weights), ``env`` keeps
    only the shared prompt layout."""
    default = EnvSettings()
    config.env.name, config.env.kwargs = default.name, dict(default.kwargs)
    config.envs = [EnvEntry(name=game, kwargs=game_kwargs(settings, game)) for game in GAMES]
    config.model.teacher_path = None
    return config


def mopd_config(settings: DemoSettings, out: Path, kind: str, seed: int) -> TrainConfig:
    """The config of one student run of the MOPD demo (``kind`` in :data:`MOPD_RUNS`): OPD
    at its committed point, on both games, from the seed's student start."""
    config = _both_games(run_config(settings, out, "robust", "opd", seed), settings)
    config.rollout.tasks_per_step = settings.episodes_per_step * len(GAMES)  # each game: the single-game budget
    if kind == "mopd":
        config.teachers = [TeacherEntry(name=game, path=str(teacher_dir(out, "robust", game)), envs=[game]) for game in GAMES]
    else:
        game = kind.removeprefix("single_")
        config.teachers = [TeacherEntry(name=game, path=str(teacher_dir(out, "robust", game)))]
    config.logging.run_name = f"{kind}/seed{seed}"
    config.logging.tags = {"seed": seed, "evaluates": "student", "demo_run": kind}
    config.trainer.output_dir = str(out / "runs" / kind / f"seed{seed}")
    return config


def _success_by_game(evaluation: dict) -> dict[str, dict[str, float]]:
    return {
        game: {split: float(evaluation[f"env/{game}/success_{split}"]) for split in ("seen", "unseen")}
        for game in GAMES
    }


def job_mopd_run(settings: DemoSettings, out: Path, kind: str, seed: int) -> dict:
    """One student run of the MOPD demo; its final success on each game, and its metrics."""
    import shutil

    started = time.perf_counter()
    config = mopd_config(settings, out, kind, seed)
    shutil.rmtree(config.trainer.output_dir, ignore_errors=True)
    run = loop.train(config)
    return {
        "kind": kind,
        "seed": seed,
        "success": _success_by_game(run.state.last_eval or {}),
        "seconds": time.perf_counter() - started,
        "history": run.state.history,
    }


def job_mopd_eval(settings: DemoSettings, out: Path, name: str, model_dir: str) -> dict:
    """A model as it is (a teacher, or a student start), on both games' held-out tasks."""
    config = _both_games(base_config(settings, out), settings)
    config.trainer.steps = 0
    config.model.student_path = model_dir
    config.eval.kl_by_turn = False
    config.logging.run_name = name
    config.logging.tags = {"algorithm": None, "evaluates": name}
    config.trainer.output_dir = str(out / "runs" / "reference" / name)
    run = evaluate_model(config)
    return {"name": name, "success": _success_by_game(run.state.last_eval or {}), "history": run.state.history}


def run_mopd_demo(out: str | Path = "tcod-demo-mopd", *, settings: DemoSettings, progress: bool = True) -> dict:
    """Run the MOPD demo into ``out``; returns the ``results.json`` content."""
    out = Path(out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    settings = replace(settings, student=settings.mopd_student)  # every student run, the single-teacher ones too
    commit = provenance.commit()
    torch.set_num_threads(1)

    # 1. one tokenizer from both games' texts
    config = _both_games(base_config(settings, out), settings)
    tokenizer = build.build_tokenizer(config, build.build_run_prompter(config))
    tokenizer.save_pretrained(str(out / "tokenizer"))

    # 2-3. a specialist teacher per game, a student start per seed, reference evaluations
    jobs = []
    for game in GAMES:
        jobs.append(Job(f"teacher/{game}/narrow", job_narrow_teacher, (settings, out, game)))
        jobs.append(Job(f"teacher/{game}", job_robust_teacher, (settings, out, game), needs=(f"teacher/{game}/narrow",)))
    jobs += [Job(f"student_init/seed{s}", job_student_init, (settings, out, s, GAMES)) for s in settings.seeds]
    jobs += [
        Job(f"eval/teacher_{game}", job_mopd_eval, (settings, out, f"teacher_{game}", str(teacher_dir(out, "robust", game))),
            needs=(f"teacher/{game}",))
        for game in GAMES
    ]  # fmt: skip
    jobs += [
        Job(f"eval/student_init/seed{s}", job_mopd_eval, (settings, out, f"student_init_seed{s}", str(student_init_dir(out, s))),
            needs=(f"student_init/seed{s}",))
        for s in settings.seeds
    ]  # fmt: skip
    # 4. the student runs
    jobs += [
        Job(f"run/{kind}/seed{s}", job_mopd_run, (settings, out, kind, s),
            needs=(*(f"teacher/{game}" for game in GAMES), f"student_init/seed{s}"))
        for s in settings.seeds
        for kind in MOPD_RUNS
    ]  # fmt: skip
    bar = tqdm(total=len(jobs), desc="demo --mopd jobs", disable=not progress, unit="job")

    def on_done(job: Job, result: dict, seconds: float) -> None:
        bar.update(1)
        line = f"{job.key}: done in {seconds:.0f} s"
        if "success" in result:
            line += "; " + ", ".join(f"{g} seen {v['seen']:.2f} unseen {v['unseen']:.2f}" for g, v in result["success"].items())
        if progress:
            bar.write(line)

    by_job = run_jobs(jobs, settings.workers, on_done)
    bar.close()

    results = _assemble(settings, out, tokenizer, by_job, time.perf_counter() - started, commit)
    write_metrics(out, by_job)
    (out / "results.json").write_text(json.dumps(results, indent=1) + "\n")
    (out / "results.md").write_text(mopd_table(results))
    plot_mopd(out, results)
    return results


def _entry(values: dict[str, list[float]]) -> dict[str, float]:
    """Mean and standard deviation over seeds of each split's success."""
    entry: dict[str, float] = {}
    for split in ("seen", "unseen"):
        entry[f"success_{split}"] = statistics.fmean(values[split])
        entry[f"success_{split}_std"] = std(values[split])
    return entry


def _assemble(settings: DemoSettings, out: Path, tokenizer, by_job: dict, wall_seconds: float, commit: str) -> dict:
    runs = []
    for kind in MOPD_RUNS:
        for seed in settings.seeds:
            result = by_job[f"run/{kind}/seed{seed}"]
            for game in GAMES:
                runs.append({
                    "kind": kind, "seed": seed, "family": game, "seconds": result["seconds"],
                    "success_seen": result["success"][game]["seen"], "success_unseen": result["success"][game]["unseen"],
                })  # fmt: skip
    for game in GAMES:
        teacher = by_job[f"eval/teacher_{game}"]["success"]
        for family in GAMES:
            runs.append({
                "kind": f"teacher_{game}", "seed": None, "family": family,
                "success_seen": teacher[family]["seen"], "success_unseen": teacher[family]["unseen"],
            })  # fmt: skip
    for seed in settings.seeds:
        start = by_job[f"eval/student_init/seed{seed}"]["success"]
        for family in GAMES:
            runs.append({
                "kind": "student_init", "seed": seed, "family": family,
                "success_seen": start[family]["seen"], "success_unseen": start[family]["unseen"],
            })  # fmt: skip

    def values(kind: str, family: str) -> dict[str, list[float]]:
        rows = [r for r in runs if r["kind"] == kind and r["family"] == family]
        return {split: [r[f"success_{split}"] for r in rows] for split in ("seen", "unseen")}

    headline: dict[str, Any] = {
        "seeds": len(settings.seeds),
        "teacher": {game: _entry(values(f"teacher_{game}", game)) for game in GAMES},
        "teacher_on_other_game": {game: {f: _entry(values(f"teacher_{game}", f)) for f in GAMES if f != game} for game in GAMES},
        "student_init": {family: _entry(values("student_init", family)) for family in GAMES},
        "mopd": {family: _entry(values("mopd", family)) for family in GAMES},
        "single": {game: {family: _entry(values(f"single_{game}", family)) for family in GAMES} for game in GAMES},
    }
    headline["mopd_vs_single"] = {}
    for game in GAMES:
        for family in GAMES:
            mine = [r for r in runs if r["kind"] == "mopd" and r["family"] == family]
            theirs = [r for r in runs if r["kind"] == f"single_{game}" and r["family"] == family]
            headline["mopd_vs_single"].setdefault(game, {})[family] = paired_difference(mine, theirs)
    lr, updates = settings.point("opd")
    settings_record = config_to_dict(settings)
    settings_record.pop("tuned", None)
    setup = {
        "games": list(GAMES),
        "runs": list(MOPD_RUNS),
        "seeds": settings.seeds,
        "base_seed": settings.base_seed,
        "commit": commit,
        "versions": provenance.versions(),
        **provenance.machine(),
        "threads": 1,
        "workers": settings.workers,
        "wall_seconds": wall_seconds,
        "budget": {"algorithm": "opd", "lr": lr, "updates_per_step": updates, "steps": settings.steps,
                   "episodes_per_step": settings.episodes_per_step * len(GAMES), "env_weights": {game: 1.0 for game in GAMES}},
        "specialist_share": SPECIALIST_SHARE,
        "settings": settings_record,
        "vocab_size": len(tokenizer),
        "teachers": {game: by_job[f"teacher/{game}"] for game in GAMES},
    }  # fmt: skip
    return {"setup": setup, "headline": headline, "verdicts": mopd_verdicts(headline), "runs": runs}


def _interval(entry: dict | None, split: str) -> str:
    if not entry:
        return "n/a"
    lo, hi = entry[f"success_{split}_diff_ci95"]
    return f"{entry[f'success_{split}_diff']:+.2f} [{lo:+.2f}, {hi:+.2f}]"


def mopd_verdicts(headline: dict) -> list[str]:
    """The demo's claims, each stated from the numbers of ``headline``."""
    lines = []
    for game in GAMES:
        for split in ("seen", "unseen"):
            teacher = headline["teacher"][game][f"success_{split}"]
            student = headline["mopd"][game][f"success_{split}"]
            needed = SPECIALIST_SHARE * teacher
            outcome = "reaches" if student >= needed else "falls short of"
            lines.append(
                f"{game}, {split}: the MOPD student ({student:.2f}) {outcome} {SPECIALIST_SHARE} x its specialist teacher "
                f"({teacher:.2f} -> {needed:.2f})"
            )
    for game in GAMES:
        for family in GAMES:
            if family == game:
                continue
            entry = headline["mopd_vs_single"][game][family]
            for split in ("seen", "unseen"):
                if entry is None:
                    continue
                lo, hi = entry[f"success_{split}_diff_ci95"]
                outcome = "beats" if lo > 0 else "is beaten by" if hi < 0 else "is not told apart from"
                lines.append(
                    f"{family}, {split}: the MOPD student {outcome} the student of the {game} teacher alone "
                    f"(paired difference {_interval(entry, split)}, {entry['seeds']} seeds)"
                )
    return lines


def mopd_table(results: dict) -> str:
    """``results.md``: success per game and split, mean +- std over seeds, then the verdicts."""
    headline = results["headline"]
    rows = [("specialist teacher (its own game)", {g: headline["teacher"][g] for g in GAMES})]
    rows.append(("student start", headline["student_init"]))
    rows.append(("MOPD student (both teachers)", headline["mopd"]))
    rows += [(f"student of the {g} teacher alone", headline["single"][g]) for g in GAMES]
    header = "| run | " + " | ".join(f"{g} seen | {g} unseen" for g in GAMES) + " |"
    lines = [
        f"# Multi-teacher OPD: {len(results['setup']['seeds'])} seeds, {results['setup']['budget']['steps']} steps each",
        "",
        header,
        "|" + "---|" * (1 + 2 * len(GAMES)),
    ]
    for name, by_game in rows:
        cells = []
        for game in GAMES:
            entry = by_game[game]
            for split in ("seen", "unseen"):
                cells.append(f"{entry[f'success_{split}']:.2f} +- {entry[f'success_{split}_std']:.2f}")
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    lines += ["", "## Verdicts", "", *[f"- {line}" for line in results["verdicts"]], ""]
    return "\n".join(lines)


def plot_mopd(out: Path, results: dict) -> Path:
    """``mopd.png``: success on each game and split, per run kind (mean over seeds, std bars)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    headline = results["headline"]
    kinds = [("specialist teacher", {g: headline["teacher"][g] for g in GAMES}), ("MOPD student", headline["mopd"])]
    kinds += [(f"{g} teacher alone", headline["single"][g]) for g in GAMES]
    kinds.append(("student start", headline["student_init"]))
    groups = [(game, split) for game in GAMES for split in ("seen", "unseen")]
    width = 0.8 / len(kinds)
    figure, axis = plt.subplots(figsize=(9, 4))
    for index, (label, by_game) in enumerate(kinds):
        xs = [g + (index - (len(kinds) - 1) / 2) * width for g in range(len(groups))]
        means = [by_game[game][f"success_{split}"] for game, split in groups]
        stds = [by_game[game][f"success_{split}_std"] for game, split in groups]
        axis.bar(xs, means, width, yerr=stds, capsize=2, label=label)
    axis.set_xticks(range(len(groups)), [f"{game}\n{split}" for game, split in groups])
    axis.set_ylim(0, 1.05)
    axis.set_ylabel("success rate")
    axis.set_title(f"Multi-teacher OPD ({len(results['setup']['seeds'])} seeds, mean +- std)")
    axis.legend(fontsize=8, loc="upper right", ncols=2)
    figure.tight_layout()
    path = Path(out) / "mopd.png"
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return path
