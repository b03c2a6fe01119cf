"""The ``tcod-fast`` command.

Subcommands::

    tcod-fast demo [--out DIR] [--quick]          the built-in CPU demo (nothing downloaded)
    tcod-fast train [--config FILE] [--set k=v]   train a student (opd, tcod_f2b, tcod_b2f, ...)
    tcod-fast eval --run DIR                      evaluate a trained student on held-out tasks
    tcod-fast bench                               time fused_turn_kl on every available backend
    tcod-fast kernel-demo                         the same on a tiny batch, printing the numbers
    tcod-fast envs make-alfworld-tasks ...        generate ALFWorld task folders offline

``TCOD_FAST_TINY=1`` runs any command on tiny settings (:mod:`tcod_fast.tiny_settings`).

A mistake in what was asked (an unknown config key, a value out of range, a missing folder)
is printed as one line, ``tcod-fast <command>: <what was expected>, got <what was given>``,
with exit code 2, before any model is built or any run folder is made. ``--debug`` (or
``TCOD_FAST_DEBUG=1``) shows the traceback instead.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import textwrap
import time
import warnings
from pathlib import Path

from tcod_fast.algorithms import algorithm_names
from tcod_fast.errors import TcodFastWarning, UserError
from tcod_fast.tiny_settings import TINY_ENV_VAR, tiny_requested, tiny_train_overrides
from tcod_fast.trainer.config import TrainerSettings, apply_overrides, check_paths, config_to_dict, load_config
from tcod_fast.trainer.run_folder import check_new_run_folder, check_resume_compatible, checkpoint_step, list_checkpoints

# The torch-backed modules (trainer, kernels, demo) are imported inside the commands that use
# them, so `--help` and a mistake in the config are answered before torch loads.

__all__ = ["main", "build_parser"]


def _add_config_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", metavar="FILE", help="YAML/TOML/JSON config (default: built-in defaults)")
    parser.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="SECTION.KEY=VALUE",
        help="override one config value, e.g. --set trainer.lr=1e-5 --set curriculum.eta=3 (repeatable; "
        "values are parsed as YAML)",
    )


def _add_debug_argument(parser: argparse.ArgumentParser, *, top_level: bool = False) -> None:
    # SUPPRESS: a subcommand's default must not overwrite a --debug given before it.
    parser.add_argument(
        "--debug",
        action="store_true",
        default=False if top_level else argparse.SUPPRESS,
        help="show the full traceback of an error (also: environment variable TCOD_FAST_DEBUG=1)",
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="tcod-fast",
        description="Fused teacher-student KL kernels and a multi-turn on-policy distillation trainer "
        "(OPD, TCOD-F2B/B2F, Guided-OPD, ATOD, SOD, GRPO).",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="Run 'tcod-fast demo --quick' for a few-minute end-to-end run on CPU.",
    )
    _add_debug_argument(parser, top_level=True)
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")
    commands.required = True

    demo = commands.add_parser(
        "demo",
        help="built-in CPU demo: two teachers, students distilled by the papers' algorithms over seeds; results and plots",
        description="Train two small teachers in the key-and-door game (robust: supervised on expert episodes, then "
        "DAgger rounds; narrow: the expert's own episodes only), warm-start one smaller student per seed, distil it "
        "with OPD, TCOD-F2B and TCOD-B2F from the robust teacher, each in the full-vocabulary and in the papers' "
        "sampled-token formulation, all with the same budget and each at its tuned learning rate; evaluate on "
        "held-out seen and unseen tasks, compare every algorithm with OPD by paired differences over seeds, test the "
        "KL-escalation claim (--full: also under the narrow teacher), and write results.json, results.md, metrics.jsonl and "
        "PNG plots into --out. Needs nothing downloaded; about 7 minutes on 2 CPU cores (--quick: a few, --full: "
        "every algorithm under both formulations and 5 seeds, about 40; --tune: about an hour more).",
    )
    demo.add_argument("--out", default="tcod-demo", metavar="DIR", help="results folder (default: %(default)s)")
    size = demo.add_mutually_exclusive_group()
    size.add_argument("--quick", action="store_true", help="small, fast settings (CI): 2 seeds, fewer steps and tasks")
    size.add_argument("--full", action="store_true", help="every algorithm under both formulations, 5 seeds")
    demo.add_argument("--seed", type=int, default=0, help="base seed; the student seeds are SEED, SEED+1, ... (default: 0)")
    demo.add_argument("--workers", type=int, help="worker processes, one torch thread each (default: 2)")
    demo.add_argument(
        "--tune", action="store_true",
        help="first run the learning rate x updates grid for every run kind on tuning seeds and use its choices "
        "(written to OUT/grid.json) instead of the committed ones",
    )  # fmt: skip
    demo.add_argument(
        "--eta", type=int,
        help="curriculum period (turns advance every ETA steps; default: the one that reaches full depth by half the "
        "steps; the papers use 3-6)",
    )  # fmt: skip
    demo.add_argument("--no-progress", action="store_true", help="hide the progress bar and per-run lines")
    demo.add_argument(
        "--mopd", action="store_true",
        help="multi-teacher OPD instead: a specialist teacher for each of two games (key-and-door, alchemy), one "
        "student distilled from both (each episode from its own game's teacher) against students of one teacher "
        "alone, on both games, same budget, over seeds (about 7 minutes; with --quick, a few)",
    )  # fmt: skip
    for teacher in ("robust", "narrow"):
        demo.add_argument(
            f"--{teacher}", metavar="ALGOS",
            help=f"comma-separated runs distilled from the {teacher} teacher instead of the preset's: ALGO, "
            "ALGO@sampled (the papers' sampled-token formulation) or ALGO@DIVERGENCE (reverse_kl, forward_kl, jsd), "
            "e.g. opd,opd@sampled,opd@reverse_kl",
        )  # fmt: skip

    train = commands.add_parser(
        "train",
        help="train a student with one algorithm (config file + --set overrides)",
        description=textwrap.fill(
            "Train a student by on-policy distillation from a frozen teacher. The loop is rollout -> "
            "score -> advantages -> loss -> update -> evaluate -> log -> checkpoint; metrics go to "
            "OUTPUT_DIR/metrics.jsonl, checkpoints to OUTPUT_DIR/checkpoints (every trainer.checkpoint_every "
            "steps, 10 by default, and at the end), the final student to OUTPUT_DIR/final. Runs under torchrun "
            "for data parallelism.",
            width=88,
        ),
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="""choosing what to train:
  environment  --set env.name=toy (default; built in), twx-<game> (e.g. twx-coin),
               scienceworld or alfworld; --set env.kwargs={...} passes the env's options
  teacher      --set model.teacher_path=DIR, a local Hugging Face model folder; without it
               the teacher is a random-init tiny model (for tests: it teaches nothing)
  student      --set model.student_path=DIR (default: a random-init tiny model)
  every key    tcod-fast train --print-config lists them with their defaults

resuming:
  tcod-fast train --output-dir DIR --resume [--steps N] [--set k=v ...]
  reads DIR/config.yaml, applies the overrides on top and continues from the newest
  checkpoint; a larger --steps trains further. The curriculum and the student model of a
  run cannot change on resume. Without --resume an existing run folder is refused.""",
    )
    _add_config_arguments(train)
    train.add_argument("--algorithm", choices=algorithm_names(), help="shortcut for --set curriculum.algorithm=...")
    train.add_argument("--output-dir", metavar="DIR", help="shortcut for --set trainer.output_dir=...")
    train.add_argument("--steps", type=int, help="shortcut for --set trainer.steps=...")
    train.add_argument("--device", choices=("auto", "cpu", "cuda"), help="shortcut for --set trainer.device=...")
    train.add_argument(
        "--resume",
        action="store_true",
        help="continue the run in OUTPUT_DIR exactly, from its newest checkpoint, with OUTPUT_DIR/config.yaml "
        "as the config (--set overrides apply on top)",
    )
    train.add_argument("--print-config", action="store_true", help="print the resolved config as YAML and exit")

    evaluate = commands.add_parser(
        "eval",
        help="evaluate a student at full depth on held-out seen/unseen tasks",
        description="Play full-depth student episodes on the held-out seen and unseen tasks (temperature "
        "eval.temperature, 0.4 by default) and report success rate, average turns and the teacher-student "
        "KL by turn index. Reads RUN/config.yaml and RUN/final unless --config/--student say otherwise.",
    )
    evaluate.add_argument("--run", metavar="DIR", help="a training run folder (its config.yaml and final/ student)")
    _add_config_arguments(evaluate)
    evaluate.add_argument("--student", metavar="PATH", help="student model folder (default: RUN/final)")
    evaluate.add_argument("--out", metavar="FILE", help="also write the results as JSON here")
    evaluate.add_argument("--device", choices=("auto", "cpu", "cuda"), help="shortcut for --set trainer.device=...")

    bench = commands.add_parser(
        "bench",
        help="benchmark fused_turn_kl on every available backend (loss, per-turn KL, timing)",
        description="Run fused_turn_kl forward+backward on a realistic batch with every backend available "
        "here (native C++ on CPU, triton on GPU, torch everywhere) next to a materialised log-softmax "
        "reference; print the loss, the KL of each turn and the median time per backend.",
    )
    bench_sizes = dict(batch=4, seq=256, vocab=32768, turns=8, repeats=3)
    tiny_sizes = dict(batch=2, seq=16, vocab=64, turns=3, repeats=1)
    _add_bench_arguments(bench, **(tiny_sizes if tiny_requested() else bench_sizes))

    kernel_demo = commands.add_parser(
        "kernel-demo",
        help="fused_turn_kl on a tiny batch: the same report as bench, in a second",
        description="A tiny version of 'bench': shows what fused_turn_kl returns (loss, per-turn KL, "
        "statistics) on every available backend.",
    )
    _add_bench_arguments(kernel_demo, **tiny_sizes)

    for subcommand in (demo, train, evaluate, bench, kernel_demo):
        _add_debug_argument(subcommand)

    envs = commands.add_parser("envs", help="environment tools", description="Environment tools.")
    env_commands = envs.add_subparsers(dest="env_command", metavar="ENV_COMMAND")
    env_commands.required = True
    env_commands.add_parser(
        "make-alfworld-tasks",
        help="generate solvable ALFWorld task folders offline (delegates to tcod_fast.envs.alfworld)",
        description="Generate ALFWorld task folders (game.tw-pddl + traj_data.json) without downloads. "
        "All arguments after the subcommand are passed to tcod_fast.envs.alfworld.cli_make_tasks; run "
        "'tcod-fast envs make-alfworld-tasks -- --help' for its options.",
        add_help=False,
    )
    return parser


def _add_bench_arguments(parser, *, batch, seq, vocab, turns, repeats) -> None:
    parser.add_argument("--batch", type=int, default=batch, help="sequences (default: %(default)s)")
    parser.add_argument("--seq", type=int, default=seq, help="tokens per sequence (default: %(default)s)")
    parser.add_argument("--vocab", type=int, default=vocab, help="vocabulary size (default: %(default)s)")
    parser.add_argument("--turns", type=int, default=turns, help="student turns per sequence (default: %(default)s)")
    parser.add_argument("--repeats", type=int, default=repeats, help="timed repetitions (default: %(default)s)")
    parser.add_argument("--dtype", default="float32", choices=("float32", "bfloat16", "float16"))
    parser.add_argument(
        "--backends",
        default="auto",
        help="comma-separated backends to run (native, torch, triton) or 'auto' = every one available here "
        "(triton only on a GPU: its CPU interpreter is for correctness, not speed)",
    )
    parser.add_argument("--json", metavar="FILE", help="also write the numbers as JSON")


# --------------------------------------------------------------------------------------
# subcommands
# --------------------------------------------------------------------------------------
def _cmd_demo(args) -> int:
    from tcod_fast.demo import demo_settings, run_demo

    if args.workers is not None and args.workers < 1:
        raise UserError(f"--workers must be >= 1, got {args.workers}")
    if args.eta is not None and args.eta < 1:
        raise UserError(f"--eta must be >= 1, got {args.eta}")
    preset = "tiny" if tiny_requested() else "quick" if args.quick else "full" if args.full else "default"
    settings = demo_settings(preset, seed=args.seed, workers=args.workers)
    if args.mopd:
        return _cmd_demo_mopd(args, settings)
    if args.eta is not None:
        settings.eta = args.eta
    for teacher in ("robust", "narrow"):
        listed = getattr(args, teacher)
        if listed is not None:
            setattr(settings, f"{teacher}_algorithms", _demo_algorithms(f"--{teacher}", listed))
    if not args.tune:
        for name in dict.fromkeys([*settings.robust_algorithms, *settings.narrow_algorithms]):
            try:
                settings.point(name)
            except ValueError as error:
                raise UserError(f"{error} (no committed grid point for it)") from None
    results = run_demo(args.out, settings=settings, progress=not args.no_progress, tune=args.tune)
    print((Path(args.out) / "results.md").read_text())
    print(f"results in {Path(args.out).resolve()} (total {results['setup']['wall_seconds']:.0f} s)")
    return 0


def _cmd_demo_mopd(args, settings) -> int:
    from tcod_fast.demo.mopd import run_mopd_demo

    for flag in ("tune", "full", "robust", "narrow", "eta"):
        if getattr(args, flag) not in (None, False):
            raise UserError(f"--mopd runs OPD at its committed point on both games; it takes no --{flag}")
    out = args.out if args.out != "tcod-demo" else "tcod-demo-mopd"
    results = run_mopd_demo(out, settings=settings, progress=not args.no_progress)
    print((Path(out) / "results.md").read_text())
    print(f"results in {Path(out).resolve()} (total {results['setup']['wall_seconds']:.0f} s)")
    return 0


def _demo_algorithms(flag: str, listed: str) -> tuple[str, ...]:
    from tcod_fast.demo import parse_variant

    names = tuple(name.strip() for name in listed.split(",") if name.strip())
    for name in names:
        try:
            parse_variant(name)
        except ValueError as error:
            raise UserError(f"{flag} {error}") from None
    return names


def _train_config(args):
    """The run's config: ``--config`` (or the defaults) with the overrides and the command's
    own options (``--algorithm``, ``--output-dir``, ``--steps``, ``--device``) as values; with
    ``--resume``, the run folder's own ``config.yaml`` with them."""
    overrides = list(args.overrides)
    options = {
        "curriculum.algorithm": getattr(args, "algorithm", None),
        "trainer.output_dir": getattr(args, "output_dir", None),
        "trainer.steps": getattr(args, "steps", None),
        "trainer.device": getattr(args, "device", None),
    }
    values = {key: value for key, value in options.items() if value is not None}
    if not getattr(args, "resume", False):
        if tiny_requested():
            warnings.warn(f"{TINY_ENV_VAR} is set: a tiny run (2 steps, tiny random models; --set values apply on top)", TcodFastWarning, stacklevel=2)
            asked = load_config(args.config, overrides, values)  # which env the tiny settings must fit
            overrides = [*tiny_train_overrides(asked.env.name), *overrides]
        return load_config(args.config, overrides, values)
    if args.config is not None:
        raise UserError(
            f"--resume reads the run folder's own config.yaml and takes changes as --set overrides, got --config {args.config} too"
        )
    run_dir = Path(values.get("trainer.output_dir") or _output_dir_asked(overrides) or TrainerSettings().output_dir)
    saved = run_dir / "config.yaml"
    if not saved.is_file():
        found = "does not exist" if not run_dir.exists() else "has no config.yaml"
        raise UserError(f"--resume needs a run folder made by 'tcod-fast train' (--output-dir DIR), got {str(run_dir)!r}, which {found}")
    return load_config(saved, overrides, values)


def _output_dir_asked(overrides: list[str]) -> str | None:
    """The last ``trainer.output_dir`` among ``--set`` overrides."""
    found = None
    for item in overrides:
        key, _, value = item.partition("=")
        if key.strip() == "trainer.output_dir":
            found = value.strip()
    return found


def _check_run_folder(config, resume: bool) -> bool:
    """Refuse to mix runs in one folder; with ``resume``, say whether the run has finished
    already (True: nothing to do). Reads file names only, loads nothing."""
    run_dir = Path(config.trainer.output_dir)
    if not resume:
        # Under torchrun only the main process looks: the others may start after it has
        # written config.yaml into the new folder. (train() checks the same; this says it
        # before the trainer is imported, in the command's own words.)
        if os.environ.get("RANK", "0") == "0":
            check_new_run_folder(run_dir, setting="--output-dir", hint="add --resume to continue the run in it")
        return False
    checkpoints = list_checkpoints(run_dir / "checkpoints")
    if not checkpoints:
        raise UserError(
            f"--resume needs a run folder with a checkpoint, got {str(run_dir)!r}, which has none yet "
            "(the run stopped before its first checkpoint: delete the folder to start again)"
        )
    saved = config_to_dict(load_config(run_dir / "config.yaml"))
    check_resume_compatible(saved, config, str(run_dir / "config.yaml"))
    step, steps = checkpoint_step(checkpoints[0]), config.trainer.steps
    if step > steps:
        raise UserError(f"--steps must be >= {step} to resume (the run's newest checkpoint is at step {step}), got {steps}")
    if step == steps and (run_dir / "final" / "config.json").is_file():
        print(
            f"tcod-fast train: the run in {run_dir} finished at step {step} (trainer.steps={steps}); nothing changed. "
            f"Give --steps N with N > {step} to train further."
        )
        return True
    return False


def _cmd_train(args) -> int:
    config = _train_config(args)
    if args.print_config:
        import yaml

        print(yaml.safe_dump(config_to_dict(config), sort_keys=False))
        return 0
    check_paths(config)  # before importing the trainer: a wrong path is told in a second
    if _check_run_folder(config, args.resume):
        return 0
    from tcod_fast.trainer.loop import train
    from tcod_fast.trainer.plots import plot_run
    from tcod_fast.trainer.summary import train_summary

    started = time.perf_counter()
    run = train(config, resume=args.resume)
    if run.dist.is_main:
        plot_run(config.trainer.output_dir)
        print(train_summary(run, time.perf_counter() - started))
    return 0


def _cmd_eval(args) -> int:
    if args.run is None and args.config is None:
        raise UserError("eval needs --run DIR (a training run folder) or --config FILE, got neither")
    if args.run is not None:
        run_dir = Path(args.run)
        if not (run_dir / "config.yaml").is_file():
            found = "does not exist" if not run_dir.exists() else "has no config.yaml"
            raise UserError(f"--run must be a training run folder (with config.yaml), got {args.run!r}, which {found}")
    config_path = args.config or str(Path(args.run) / "config.yaml")
    config = load_config(config_path, args.overrides, {"trainer.device": args.device} if args.device else None)
    student = args.student or (str(Path(args.run) / "final") if args.run else None)
    if student is None:
        raise UserError("eval needs --student PATH when no --run folder is given, got neither")
    if not (Path(student) / "config.json").is_file():
        if args.student is None:
            raise UserError(
                f"--run must be a finished run (with final/), got {args.run!r}, which has no final/ student yet "
                f"(continue it: tcod-fast train --output-dir {args.run} --resume)"
            )
        found = "does not exist" if not Path(student).exists() else "has no config.json"
        raise UserError(f"--student must be a local Hugging Face model folder, got {student!r}, which {found}")
    eval_dir = Path(args.run or config.trainer.output_dir) / "eval"
    config = apply_overrides(config, [f"model.student_path={student}", f"trainer.output_dir={eval_dir}"])
    from tcod_fast.trainer.evaluation import evaluate
    from tcod_fast.trainer.setup import setup_run

    run = setup_run(config)
    with run.closing():
        results = evaluate(run, 0)
    text = json.dumps(results, indent=2)
    print(text)
    if args.out:
        Path(args.out).write_text(text + "\n")
    return 0


def _bench_backends(requested: str, device) -> list[str]:
    from tcod_fast.ops.turn_kl import native_backend, triton_backend

    if requested != "auto":
        return [b.strip() for b in requested.split(",") if b.strip()]
    backends = []
    if device.type == "cuda" and triton_backend.HAS_TRITON:
        backends.append("triton")
    if device.type == "cpu" and native_backend.is_available():
        backends.append("native")
    backends.append("torch")
    return backends


def _materialised_reverse_kl(student, teacher, keep):
    """The loss the fused op replaces: full log-softmax tensors, then a masked token mean."""
    import torch

    logp = torch.log_softmax(student.float(), dim=-1)
    logq = torch.log_softmax(teacher.float(), dim=-1)
    kl = (logp.exp() * (logp - logq)).sum(-1)
    return (kl * keep).sum() / keep.sum().clamp_min(1)


def _cmd_bench(args) -> int:
    import torch

    from tcod_fast import fused_turn_kl

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = getattr(torch, args.dtype)
    generator = torch.Generator().manual_seed(0)
    B, T, V = args.batch, args.seq, args.vocab
    student = (torch.randn(B, T, V, generator=generator) * 2).to(device, dtype)
    teacher = (torch.randn(B, T, V, generator=generator) * 2).to(device, dtype)
    # Turns: each sequence alternates prompt/observation (-1) and student replies (0..turns-1).
    turn_ids = torch.full((B, T), -1, dtype=torch.long)
    span = max(T // max(args.turns, 1), 2)
    for k in range(args.turns):
        turn_ids[:, k * span + span // 2 : (k + 1) * span] = k
    turn_ids = turn_ids.to(device)
    keep = (turn_ids >= 0).float()
    print(f"fused_turn_kl on B={B} T={T} V={V} {args.dtype} ({int(keep.sum())} student tokens, {args.turns} turns), device {device}")
    rows = []

    def timed(fn):
        times = []
        result = None
        for _ in range(max(args.repeats, 1) + 1):  # first call warms up (builds, compiles)
            if device.type == "cuda":
                torch.cuda.synchronize()
            start = time.perf_counter()
            result = fn()
            if device.type == "cuda":
                torch.cuda.synchronize()
            times.append(time.perf_counter() - start)
        timed_runs = times[1:] or times
        return result, sorted(timed_runs)[len(timed_runs) // 2]

    for backend in _bench_backends(args.backends, device):
        def step(backend=backend):
            logits = student.detach().clone().requires_grad_(True)
            result = fused_turn_kl(logits, teacher, turn_ids, return_stats=True, num_turns=args.turns, backend=backend)
            result.loss.backward()
            return result

        try:
            result, seconds = timed(step)
        except Exception as exc:  # report and continue: a backend may be unavailable here
            print(f"  {backend:>12}: unavailable ({type(exc).__name__}: {exc})")
            continue
        per_turn = (result.turn_kl_sum.sum(0) / result.turn_token_count.sum(0).clamp_min(1)).tolist()
        row = {"backend": backend, "loss": float(result.loss.detach()), "kl_by_turn": per_turn, "seconds": seconds}
        if backend == "native":
            from tcod_fast.ops.turn_kl import native_backend

            row["isa"] = native_backend.isa()  # which compiled copy of the kernels ran
        rows.append(row)

    def reference():
        logits = student.detach().clone().requires_grad_(True)
        loss = _materialised_reverse_kl(logits, teacher, keep)
        loss.backward()
        return loss

    loss, seconds = timed(reference)
    rows.append({"backend": "materialised log-softmax (torch eager)", "loss": float(loss.detach()), "kl_by_turn": None, "seconds": seconds})
    for row in rows:
        turns = ", ".join(f"{v:.4f}" for v in row["kl_by_turn"]) if row["kl_by_turn"] else "-"
        name = f"{row['backend']} ({row['isa']})" if "isa" in row else row["backend"]
        print(f"  {name:>12}: loss {row['loss']:.6f}  fwd+bwd {row['seconds'] * 1e3:8.2f} ms  KL by turn [{turns}]")
    if args.json:
        Path(args.json).write_text(json.dumps({"shape": [B, T, V], "dtype": args.dtype, "device": str(device), "rows": rows}, indent=2) + "\n")
    return 0


def _cmd_envs(args, rest: list[str]) -> int:
    if args.env_command == "make-alfworld-tasks":
        from tcod_fast.envs.alfworld import cli_make_tasks

        if rest and rest[0] == "--":
            rest = rest[1:]
        return int(cli_make_tasks(rest) or 0)
    raise UserError(f"envs takes make-alfworld-tasks, got {args.env_command!r}")


@contextlib.contextmanager
def _warnings_as_lines(command: str):
    """Print this project's warnings as ``tcod-fast <command>: warning: ...`` lines."""
    original = warnings.showwarning

    def show(message, category, filename, lineno, file=None, line=None):
        if issubclass(category, TcodFastWarning):
            print(f"tcod-fast {command}: warning: {message}", file=sys.stderr)
        else:
            original(message, category, filename, lineno, file, line)

    warnings.showwarning = show
    try:
        yield
    finally:
        warnings.showwarning = original


def _debug_requested(args) -> bool:
    return bool(getattr(args, "debug", False)) or os.environ.get("TCOD_FAST_DEBUG", "").strip() not in ("", "0")


def main(argv: list[str] | None = None) -> int:
    """Run one ``tcod-fast`` command; returns its exit code (2 for a :class:`UserError`,
    printed as one line on stderr)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    # make-alfworld-tasks owns its own options: pass everything after it through untouched.
    if len(argv) >= 2 and argv[0] == "envs" and argv[1] == "make-alfworld-tasks":
        args = parser.parse_args(argv[:2])
        return _cmd_envs(args, argv[2:])
    args = parser.parse_args(argv)
    commands = {
        "demo": _cmd_demo,
        "train": _cmd_train,
        "eval": _cmd_eval,
        "bench": _cmd_bench,
        "kernel-demo": _cmd_bench,
        "envs": lambda parsed: _cmd_envs(parsed, []),
    }
    with _warnings_as_lines(args.command):
        try:
            return commands[args.command](args)
        except UserError as exc:
            if _debug_requested(args):
                raise
            print(f"tcod-fast {args.command}: {' '.join(str(exc).split())}", file=sys.stderr)
            return 2
        except KeyboardInterrupt:
            if _debug_requested(args):
                raise
            hint = " (--resume continues a training run from its last checkpoint)" if args.command == "train" else ""
            print(f"tcod-fast {args.command}: interrupted{hint}", file=sys.stderr)
            return 130


def run() -> None:
    """The ``tcod-fast`` command (and ``python -m tcod_fast.cli``): :func:`main`, then exit
    with its code.

    A process that torchrun started ends with ``os._exit`` once the command has returned:
    by then its run is closed (metrics flushed, process group destroyed, every rank past the
    final barrier), and what is left is C++ teardown at interpreter exit. There, after the
    last Python frame, a static object of the distributed stack still holding a joinable
    thread can abort the process ("terminate called without an active exception", SIGABRT),
    under load about one run in fifty (``tests/trainer/torchrun_exit_stress.py``).
    ``os._exit`` skips that teardown; nothing of the run depends on it."""
    code = main()
    if os.environ.get("TORCHELASTIC_RUN_ID") is not None:  # set by torchrun in every worker
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    sys.exit(code)


if __name__ == "__main__":
    run()
