"""The built-in demo: teacher by supervised learning, then OPD vs TCOD students, on CPU.

``tcod-fast demo [--out DIR] [--quick]`` runs, with nothing downloaded:

1. a word-level tokenizer learnt in code from the key-and-door game's texts
   (``tcod_fast.envs.toy``: pure Python, no Java);
2. a teacher (a small random-init Llama) fitted by supervised learning to the expert's
   trajectories on the training tasks;
3. a fresh, smaller student, warm-started by a short supervised pass on some expert
   episodes (the papers distil into pretrained students that can already play a little;
   a random-init student would only emit noise for most of a CPU budget). Every
   algorithm starts from these same weights;
4. one distillation run per algorithm (vanilla OPD, TCOD-F2B and TCOD-B2F by default; any
   of the trainer's algorithms with ``--algorithms``) with the full-vocabulary reverse KL
   through the fused op;
5. evaluation at full depth on held-out seen and unseen tasks (temperature 0.4): success
   rate, turns, and the teacher-student KL at each turn index of the student's own episodes;
6. ``results.json``, ``results.md`` (the table), PNG plots and the metrics JSONL files.

Every number in the outputs is measured by the run; nothing is filled in.

Scale, honestly: on 2 CPU cores the full demo takes about 8-9 minutes. Its teacher wins
about a third of the held-out *seen* tasks and none of the *unseen* ones (their container
and key words never occur in training, so a word-level model has untrained embeddings for
them); the students learn the teacher's token distribution (the KL falls by 2-3x) but not
yet its wins. See ``benchmarks/results/demo/`` for a full run's table.
"""

from __future__ import annotations

import copy
import json
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from tcod_fast.trainer.config import TrainConfig, TinyModelSpec, config_to_dict

__all__ = ["DemoSettings", "run_demo", "demo_settings"]


@dataclass
class DemoSettings:
    """Sizes of one demo run (``--quick`` shrinks every one of them)."""

    algorithms: tuple[str, ...] = ("opd", "tcod_f2b", "tcod_b2f")
    max_rooms: int = 3
    max_turns: int = 10
    train_tasks: int = 256
    eval_tasks: int = 16
    teacher: TinyModelSpec = field(
        default_factory=lambda: TinyModelSpec(hidden_size=128, intermediate_size=256, num_hidden_layers=2, seed=11)
    )
    student: TinyModelSpec = field(
        default_factory=lambda: TinyModelSpec(hidden_size=64, intermediate_size=128, num_hidden_layers=2, seed=22)
    )
    # Small supervised batches: copying a room or key name out of the prompt (an induction
    # head) only emerges after several hundred updates; big batches never got there on CPU.
    teacher_epochs: int = 4
    teacher_lr: float = 3e-3
    sft_batch_size: int = 2
    student_warmup_tasks: int = 64
    student_warmup_epochs: int = 3
    student_lr: float = 1e-3
    steps: int = 40
    tasks_per_step: int = 8
    eta: int = 3
    eval_every: int = 10
    max_new_tokens: int = 16
    history_length: int = 1
    num_threads: int = 1
    sft_threads: int = 1
    seed: int = 0


def demo_settings(quick: bool) -> DemoSettings:
    if not quick:
        return DemoSettings()
    return DemoSettings(
        algorithms=("opd", "tcod_f2b", "tcod_b2f"),
        max_rooms=2,
        max_turns=8,
        train_tasks=12,
        eval_tasks=3,
        teacher_epochs=1,
        student_warmup_tasks=4,
        student_warmup_epochs=1,
        steps=2,
        tasks_per_step=3,
        eta=1,
        eval_every=0,
    )


def _base_config(settings: DemoSettings, out: Path) -> TrainConfig:
    config = TrainConfig()
    config.env.name = "toy"
    config.env.kwargs = {
        "max_rooms": settings.max_rooms,
        "max_steps": settings.max_turns + 5,
        "num_tasks": {"train": settings.train_tasks, "valid_seen": settings.eval_tasks, "valid_unseen": settings.eval_tasks},
    }
    config.env.num_train_tasks = settings.train_tasks
    config.env.context_mode = "window"  # the papers' last-k history prompt; rows stay short on CPU
    config.env.think = False
    config.env.history_length = settings.history_length
    config.curriculum.max_turns = settings.max_turns
    config.curriculum.eta = settings.eta
    config.curriculum.seed = settings.seed
    config.curriculum.b2f_prefix_source = "expert"
    config.curriculum.guided_p_init = 0.5
    config.curriculum.guided_decay_steps = max(settings.steps * 3 // 4, 1)
    config.rollout.tasks_per_step = settings.tasks_per_step
    config.rollout.max_new_tokens = settings.max_new_tokens
    config.trainer.steps = settings.steps
    config.trainer.lr = settings.student_lr
    config.trainer.seed = settings.seed
    config.trainer.num_threads = settings.num_threads
    config.trainer.micro_batch_tokens = 16384
    config.trainer.eval_every = settings.eval_every
    config.trainer.checkpoint_every = 0
    config.trainer.keep_checkpoints = 1
    config.eval.num_tasks = settings.eval_tasks
    config.model.teacher_tiny = copy.deepcopy(settings.teacher)
    config.model.student_tiny = copy.deepcopy(settings.student)
    config.logging.progress = True
    config.trainer.output_dir = str(out)
    return config


def run_demo(out: str | Path = "tcod-demo", *, quick: bool = False, settings: DemoSettings | None = None, progress: bool = True) -> dict:
    """Run the demo into folder ``out``; returns the ``results.json`` content."""
    from tcod_fast.trainer import build, loop, plots, sft

    settings = settings or demo_settings(quick)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(settings.num_threads)
    started = time.perf_counter()
    timings: dict[str, float] = {}
    base = _base_config(settings, out)
    base.logging.progress = progress

    # 1. tokenizer built in code from the game's own texts
    prompter = build.build_prompter(base.env)
    tokenizer = build.build_tokenizer(base, prompter)
    tokenizer_dir = out / "tokenizer"
    tokenizer.save_pretrained(str(tokenizer_dir))
    base.model.tokenizer_path = str(tokenizer_dir)

    # 2. teacher: supervised learning on expert trajectories of the training tasks
    splits = build.env_task_splits(base.env)
    envs = build.build_envs(base.env, 16)
    demos = sft.expert_trajectories(
        splits["train"], envs, tokenizer=tokenizer, prompter=prompter, context_mode=base.env.context_mode, max_turns=settings.max_turns
    )
    teacher = build.build_model(None, settings.teacher, tokenizer)
    torch.set_num_threads(settings.sft_threads)
    teacher_losses = sft.supervised_finetune(
        teacher,
        demos,
        pad_token_id=tokenizer.pad_token_id,
        context_mode=base.env.context_mode,
        epochs=settings.teacher_epochs,
        lr=settings.teacher_lr,
        batch_size=settings.sft_batch_size,
        seed=settings.seed,
        progress=progress,
        description="teacher sft",
    )
    teacher_dir = out / "models" / "teacher"
    teacher.save_pretrained(str(teacher_dir))
    base.model.teacher_path = str(teacher_dir)
    timings["teacher_s"] = time.perf_counter() - started

    # 3. the fresh, smaller student, briefly warm-started; shared by every algorithm
    student = build.build_model(None, settings.student, tokenizer)
    warmup_losses = sft.supervised_finetune(
        student,
        demos[: settings.student_warmup_tasks],
        pad_token_id=tokenizer.pad_token_id,
        context_mode=base.env.context_mode,
        epochs=settings.student_warmup_epochs,
        lr=settings.teacher_lr,
        batch_size=settings.sft_batch_size,
        seed=settings.seed + 1,
        progress=progress,
        description="student warm-up",
    )
    torch.set_num_threads(settings.num_threads)
    student_dir = out / "models" / "student_init"
    student.save_pretrained(str(student_dir))
    base.model.student_path = str(student_dir)
    del teacher, student

    # reference points: the teacher itself, and the student before distillation
    reference = {}
    for name, student_path, kl in (("teacher", teacher_dir, False), ("student_init", student_dir, True)):
        config = copy.deepcopy(base)
        config.model.student_path = str(student_path)
        config.trainer.steps = 0
        config.eval.kl_by_turn = kl
        config.logging.run_name = name
        config.trainer.output_dir = str(out / "runs" / name)
        run = loop.train(config, tokenizer=tokenizer)
        reference[name] = _summarise(run.last_eval, [])
    timings["reference_eval_s"] = time.perf_counter() - started - timings["teacher_s"]

    # 4-5. one distillation run per algorithm, all from the same student and teacher
    algorithms = {}
    for algorithm in settings.algorithms:
        t0 = time.perf_counter()
        config = copy.deepcopy(base)
        config.curriculum.algorithm = algorithm
        if algorithm in ("grpo", "atod", "sod"):
            # GRPO groups: the same number of episodes per step, as groups of two per task
            config.curriculum.episodes_per_task = 2
            config.rollout.tasks_per_step = max(settings.tasks_per_step // 2, 1)
        config.logging.run_name = algorithm
        config.trainer.output_dir = str(out / "runs" / algorithm)
        run = loop.train(config, tokenizer=tokenizer)
        algorithms[algorithm] = _summarise(run.last_eval, run.history)
        algorithms[algorithm]["train_seconds"] = time.perf_counter() - t0
        timings[f"{algorithm}_s"] = algorithms[algorithm]["train_seconds"]

    # 6. outputs
    combined = out / "metrics.jsonl"
    with open(combined, "w") as handle:
        for name in list(reference) + list(settings.algorithms):
            path = out / "runs" / name / "metrics.jsonl"
            if path.exists():
                handle.write(path.read_text())
    timings["total_s"] = time.perf_counter() - started
    results = {
        "algorithms": algorithms,
        "reference": reference,
        "setup": {
            "quick": quick,
            "env": "toy (key and door)",
            "settings": config_to_dict(settings),
            "teacher_sft_loss_by_epoch": teacher_losses,
            "student_warmup_loss_by_epoch": warmup_losses,
            "expert_demonstrations": len(demos),
            "vocab_size": len(tokenizer),
            "teacher_parameters": _count_parameters(teacher_dir),
            "student_parameters": _count_parameters(student_dir),
            "torch_threads": torch.get_num_threads(),
        },
        "timings_s": timings,
    }
    (out / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    (out / "results.md").write_text(results_table(results))
    plots.plot_demo(out, results)
    if hasattr(envs, "close"):
        envs.close()
    shutil.rmtree(out / "runs" / "teacher" / "final", ignore_errors=True)  # a copy of models/teacher
    return results


def _count_parameters(folder: Path) -> int:
    from safetensors import safe_open

    total = 0
    for path in folder.glob("*.safetensors"):
        with safe_open(str(path), "pt") as handle:
            for key in handle.keys():
                total += _prod(handle.get_slice(key).get_shape())
    return total


def _prod(shape) -> int:
    out = 1
    for d in shape:
        out *= int(d)
    return out


def _summarise(final_eval: dict | None, history: list[dict]) -> dict:
    """One algorithm's entry of ``results.json``."""
    final_eval = final_eval or {}
    train = [r for r in history if r.get("kind") == "train"]
    evals = [r for r in history if r.get("kind") == "eval"]
    entry = {
        "success_seen": final_eval.get("success_seen"),
        "success_unseen": final_eval.get("success_unseen"),
        "turns_seen": final_eval.get("turns_seen"),
        "turns_unseen": final_eval.get("turns_unseen"),
        "kl_by_turn": final_eval.get("kl_by_turn_seen", []),
        "kl_by_turn_unseen": final_eval.get("kl_by_turn_unseen", []),
        "kl_by_turn_count": final_eval.get("kl_by_turn_count_seen", []),
        "kl_escalation_slope": final_eval.get("kl_seen/escalation_slope"),
        "kl_escalation_slope_unseen": final_eval.get("kl_unseen/escalation_slope"),
        "final_kl": final_eval.get("kl_seen/trajectory_mean"),
        "final_kl_unseen": final_eval.get("kl_unseen/trajectory_mean"),
        "steps": len(train),
    }
    if train:
        entry["train_kl_by_step"] = [r.get("kl/trajectory_mean") for r in train]
        entry["train_success_by_step"] = [r.get("success") for r in train]
        entry["train_loss_by_step"] = [r.get("loss") for r in train]
        entry["tokens_per_s_mean"] = sum(r.get("tokens_per_s", 0.0) for r in train) / len(train)
    if evals:
        entry["eval_steps"] = [r["step"] for r in evals]
        entry["eval_success_seen_by_step"] = [r.get("success_seen") for r in evals]
        entry["eval_kl_seen_by_step"] = [r.get("kl_seen/trajectory_mean") for r in evals]
    return entry


def _fmt(value, digits: int = 3) -> str:
    if value is None:
        return "n/a"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)


def results_table(results: dict) -> str:
    """The markdown table of ``results.md``: success seen/unseen, final KL, KL slope."""
    lines = [
        "| run | success seen | success unseen | final KL (seen) | KL escalation slope (seen) | KL by turn (seen) |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    rows = [(f"{name} (reference)", entry) for name, entry in results.get("reference", {}).items()]
    rows += list(results["algorithms"].items())
    for name, entry in rows:
        curve = ", ".join(f"{v:.3f}" for v in entry.get("kl_by_turn") or [])
        lines.append(
            f"| {name} | {_fmt(entry.get('success_seen'), 2)} | {_fmt(entry.get('success_unseen'), 2)} | "
            f"{_fmt(entry.get('final_kl'), 4)} | {_fmt(entry.get('kl_escalation_slope'), 5)} | {curve or 'n/a'} |"
        )
    setup = results.get("setup", {})
    lines += [
        "",
        f"Environment: {setup.get('env')}; teacher {setup.get('teacher_parameters')} parameters, "
        f"student {setup.get('student_parameters')}; vocabulary {setup.get('vocab_size')} tokens; "
        f"{'quick' if setup.get('quick') else 'full'} demo; total {results.get('timings_s', {}).get('total_s', 0):.0f} s.",
        "KL is the exact full-vocabulary reverse KL(student || teacher) per student token, measured on the "
        "student's own full-depth evaluation episodes (temperature 0.4); the slope is the least-squares "
        "slope of per-(episode, turn) KL against turn index.",
        "",
    ]
    return "\n".join(lines)
