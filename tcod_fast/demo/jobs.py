"""The demo's jobs and their scheduling: training the two teachers, warm-starting the
students, evaluating a model as it is, one distillation run; each runs in a worker process
with one torch thread, and :func:`run_jobs` spreads them over a process pool in order of
priority once the jobs they need are done."""

from __future__ import annotations

import concurrent.futures
import multiprocessing
import os
import shutil
import signal
import statistics
import sys
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch

from tcod_fast.demo.configs import base_config, run_config, student_init_dir, teacher_dir
from tcod_fast.demo.settings import DemoSettings, parse_variant
from tcod_fast.rollout import HFGenerator
from tcod_fast.trainer import build, loop, sft
from tcod_fast.trainer.evaluation import evaluate_model

__all__ = [
    "Job",
    "job_narrow_teacher",
    "job_reference_eval",
    "job_robust_teacher",
    "job_student_init",
    "job_student_run",
    "run_jobs",
]


def _die_with_parent(parent_pid: int) -> None:
    """On Linux, ask the kernel to end this worker when the process that started it dies,
    however it dies (``kill -9`` too): a demo stopped by its user leaves no job running."""
    if not sys.platform.startswith("linux"):
        return
    import ctypes

    pr_set_pdeathsig = 1
    ctypes.CDLL(None, use_errno=True).prctl(pr_set_pdeathsig, signal.SIGTERM)
    if os.getppid() != parent_pid:  # the parent died before the request
        os._exit(1)


def _worker_init(parent_pid: int) -> None:
    import transformers

    _die_with_parent(parent_pid)
    torch.set_num_threads(1)
    transformers.utils.logging.disable_progress_bar()  # no bar per saved model; the demo has its own


def _game(settings: DemoSettings, out: Path, game: str = "toy"):
    config = base_config(settings, out, game)
    tokenizer = build.load_tokenizer(config.model.tokenizer_path)
    prompter = build.build_prompter(config.env)
    splits = build.env_task_splits(config.env)
    envs = build.build_envs(config.env, 64)
    return config, tokenizer, prompter, splits, envs


def _expert_pairs(settings: DemoSettings, tasks, envs, tokenizer, prompter) -> tuple[list, list]:
    """The expert's windowed episodes of ``tasks`` and their labelled (prompt, action) turns."""
    demos = sft.expert_trajectories(
        tasks, envs, tokenizer=tokenizer, prompter=prompter, context_mode="window", max_turns=settings.max_turns
    )
    return demos, sft.labelled_turns(demos, tokenizer=tokenizer, prompter=prompter)


def job_narrow_teacher(settings: DemoSettings, out: Path, game: str = "toy") -> dict:
    """Supervised learning on the expert's own episodes of the first training tasks of ``game``."""
    config, tokenizer, prompter, splits, envs = _game(settings, out, game)
    demos, pairs = _expert_pairs(settings, splits["train"][: settings.teacher_sft_tasks], envs, tokenizer, prompter)
    spec = replace(settings.teacher, seed=10_000 + settings.base_seed)
    teacher = build.build_model(None, spec, tokenizer)
    losses = sft.supervised_finetune(
        teacher, pairs, pad_token_id=tokenizer.pad_token_id, epochs=settings.teacher_epochs,
        lr=settings.teacher_lr, batch_size=settings.sft_batch_size, seed=settings.base_seed,
    )  # fmt: skip
    teacher.save_pretrained(str(teacher_dir(out, "narrow", game)))
    tokenizer.save_pretrained(str(teacher_dir(out, "narrow", game)))  # a model folder holds its tokenizer
    return {"expert_episodes": len(demos), "labelled_turns": len(pairs), "loss_by_epoch": losses}


def job_robust_teacher(settings: DemoSettings, out: Path, game: str = "toy") -> dict:
    """The narrow teacher, continued with DAgger rounds on its own noisy episodes of ``game``."""
    config, tokenizer, prompter, splits, envs = _game(settings, out, game)
    demos, pairs = _expert_pairs(settings, splits["train"][: settings.teacher_sft_tasks], envs, tokenizer, prompter)
    teacher = build.build_model(str(teacher_dir(out, "narrow", game)), settings.teacher, tokenizer)
    train = splits["train"]
    rounds = []
    for index in range(settings.dagger_rounds):
        start = (settings.teacher_sft_tasks + index * settings.dagger_tasks) % len(train)
        tasks = [train[(start + i) % len(train)] for i in range(settings.dagger_tasks)]
        episodes = sft.dagger_trajectories(
            tasks, envs, HFGenerator(teacher, tokenizer), tokenizer=tokenizer, prompter=prompter,
            max_turns=settings.max_turns, noise=settings.dagger_noise, temperature=settings.dagger_temperature,
            max_new_tokens=settings.max_new_tokens, seed=settings.base_seed * 1000 + index,
        )  # fmt: skip
        new_pairs = sft.labelled_turns(episodes, tokenizer=tokenizer, prompter=prompter)
        pairs += new_pairs
        losses = sft.supervised_finetune(
            teacher, pairs, pad_token_id=tokenizer.pad_token_id, epochs=1, lr=settings.dagger_lr,
            batch_size=settings.sft_batch_size, seed=settings.base_seed * 1000 + index,
            )  # fmt: skip
        rounds.append(
            {
                "episodes": len(episodes),
                "success_while_collecting": statistics.fmean(float(e.won) for e in episodes),
                "new_labelled_turns": len(new_pairs),
                "labelled_turns": len(pairs),
                "loss": losses[-1],
            }
        )
    teacher.save_pretrained(str(teacher_dir(out, "robust", game)))
    tokenizer.save_pretrained(str(teacher_dir(out, "robust", game)))  # a model folder holds its tokenizer
    return {"dagger_rounds": rounds}


def job_student_init(settings: DemoSettings, out: Path, seed: int, games: tuple[str, ...] = ("toy",)) -> dict:
    """A fresh student warm-started on a few expert episodes (a seeded choice of
    ``student_warmup_tasks`` tasks of each of ``games``)."""
    pairs = []
    for index, game in enumerate(games):
        config, tokenizer, prompter, splits, envs = _game(settings, out, game)
        train = splits["train"]
        rng = np.random.default_rng([seed, 2] if index == 0 else [seed, 2, index])
        count = min(settings.student_warmup_tasks, len(train))
        chosen = sorted(rng.choice(len(train), size=count, replace=False))
        pairs += _expert_pairs(settings, [train[int(i)] for i in chosen], envs, tokenizer, prompter)[1]
    student = build.build_model(None, replace(settings.student, seed=20_000 + seed), tokenizer)
    losses = sft.supervised_finetune(
        student, pairs, pad_token_id=tokenizer.pad_token_id, epochs=settings.student_warmup_epochs,
        lr=settings.student_warmup_lr, batch_size=settings.sft_batch_size, seed=seed,
    )  # fmt: skip
    folder = student_init_dir(out, seed)
    student.save_pretrained(str(folder))
    tokenizer.save_pretrained(str(folder))
    return {"seed": seed, "labelled_turns": len(pairs), "loss_by_epoch": losses}


def job_reference_eval(settings: DemoSettings, out: Path, name: str, model_dir: str, teacher: str | None) -> dict:
    """Evaluate a model as it is (no training): a teacher, or a student start."""
    config = base_config(settings, out)
    config.trainer.steps = 0
    config.model.student_path = model_dir
    config.model.teacher_path = str(teacher_dir(out, teacher)) if teacher else None
    config.eval.kl_by_turn = teacher is not None
    config.logging.run_name = name
    config.logging.tags = {"algorithm": None, "evaluates": name, "teacher": teacher}
    config.trainer.output_dir = str(out / "runs" / "reference" / name)
    run = evaluate_model(config)
    return {"name": name, "eval": run.state.last_eval, "history": run.state.history}


def job_student_run(
    settings: DemoSettings, out: Path, teacher: str, algorithm: str, seed: int, point: tuple[float, int] | None = None
) -> dict:
    """One distillation run; returns its summary with its full metrics history. With
    ``point`` (a tuning run): that ``(lr, updates_per_step)``, in ``runs/tuning/``, evaluated
    only at the end."""
    started = time.perf_counter()
    config = run_config(settings, out, teacher, algorithm, seed, point=point)
    if point is not None:
        lr, updates = point
        config.trainer.output_dir = str(out / "runs" / "tuning" / algorithm / f"lr{lr:g}_updates{updates}" / f"seed{seed}")
        config.logging.run_name = f"tuning/{algorithm}/lr{lr:g}_updates{updates}/seed{seed}"
        config.logging.tags["evaluates"] = "tuning"
        config.trainer.eval_every = 0
    shutil.rmtree(config.trainer.output_dir, ignore_errors=True)  # a rerun of the demo starts the job afresh
    run = loop.train(config)
    final = run.state.last_eval or {}
    return {
        "teacher": teacher,
        "algorithm": algorithm,
        "formulation": parse_variant(algorithm).formulation,
        "seed": seed,
        "lr": config.trainer.lr,
        "updates_per_step": config.trainer.updates_per_step,
        "success_seen": final.get("success_seen"),
        "success_unseen": final.get("success_unseen"),
        "turns_seen": final.get("turns_seen"),
        "final_kl": final.get("kl_seen/trajectory_mean"),
        "kl_by_turn": final.get("kl_by_turn_seen", []),
        "kl_by_turn_count": final.get("kl_by_turn_count_seen", []),
        "kl_escalation_slope": final.get("kl_seen/escalation_slope"),
        "kl_by_turn_unseen": final.get("kl_by_turn_unseen", []),
        "kl_escalation_slope_unseen": final.get("kl_unseen/escalation_slope"),
        "seconds": time.perf_counter() - started,
        "history": run.state.history,
    }


@dataclass
class Job:
    """One job: ``function(*args)`` in a worker, once the jobs keyed ``needs`` are done."""

    key: str
    function: Callable[..., dict]
    args: tuple
    needs: tuple[str, ...] = ()


def run_jobs(
    jobs: list[Job], workers: int, on_done: Callable[[Job, dict, float], None], done: Iterable[str] = ()
) -> dict[str, dict]:
    """Run ``jobs`` (in list order of priority, each once its ``needs`` are done, or listed in
    ``done``) on ``workers`` processes; at most ``workers`` are in flight, so the order is kept."""
    finished = set(done)
    results: dict[str, dict] = {}
    pending = list(jobs)
    context = multiprocessing.get_context("spawn")
    with concurrent.futures.ProcessPoolExecutor(
        workers, mp_context=context, initializer=_worker_init, initargs=(os.getpid(),)
    ) as pool:
        running: dict[concurrent.futures.Future, tuple[Job, float]] = {}
        while pending or running:
            while len(running) < workers:
                ready = next((job for job in pending if all(n in results or n in finished for n in job.needs)), None)
                if ready is None:
                    break
                pending.remove(ready)
                running[pool.submit(ready.function, *ready.args)] = (ready, time.perf_counter())
            if not running:
                missing = {job.key: [n for n in job.needs if n not in results and n not in finished] for job in pending}
                raise RuntimeError(f"demo jobs wait for jobs that never ran: {missing}")
            done, _ = concurrent.futures.wait(running, return_when=concurrent.futures.FIRST_COMPLETED)
            for future in done:
                job, started = running.pop(future)
                results[job.key] = future.result()
                on_done(job, results[job.key], time.perf_counter() - started)
    return results
