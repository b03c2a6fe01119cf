"""Run the README's two-process FSDP2 command many times, under CPU load, and check that every
run exits cleanly: exit code 0 and no process aborted at shutdown.

A process that ends with its process group alive can abort while the interpreter tears down
("terminate called without an active exception", SIGABRT); whether it does depends on thread
timing, so one run proves nothing and a loop under load is the check:

    python tests/trainer/torchrun_exit_stress.py --runs 50 --load 2 --out /tmp/torchrun-stress

Each run trains on the tiny settings (``TCOD_FAST_TINY=1``) in a fresh folder; ``--load N``
keeps N busy processes running meanwhile. Prints a line per run and a summary (also written as
``summary.json`` in ``--out``), and exits 1 if any run failed.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

from tcod_fast.provenance import cpu_model

REPO = Path(__file__).resolve().parents[2]
#: README, "Multi-device training"
COMMAND = [
    "torchrun", "--nproc-per-node", "2", "-m", "tcod_fast.cli", "train", "--algorithm", "tcod_f2b",
    "--output-dir", "runs/f2b", "--set", "trainer.parallelism=fsdp2",
]  # fmt: skip
ABORT_MARKERS = ("terminate called", "SIGABRT", "Signal 6", "core dumped")


def _busy(until: float) -> None:
    while time.time() < until:
        pass


def run_once(folder: Path, timeout: float) -> dict:
    """One run of :data:`COMMAND` in ``folder``: its exit code, seconds and any abort lines."""
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    torchrun = shutil.which("torchrun", path=os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")]))
    env = {
        **os.environ,
        "TCOD_FAST_TINY": "1",
        "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])),
    }
    started = time.perf_counter()
    out = subprocess.run(
        [torchrun or "torchrun", *COMMAND[1:]], cwd=folder, env=env, stdin=subprocess.DEVNULL,
        capture_output=True, text=True, timeout=timeout,
    )  # fmt: skip
    text = out.stdout + out.stderr
    (folder / "output.log").write_text(text)
    aborts = [line for line in text.splitlines() if any(marker in line for marker in ABORT_MARKERS)]
    return {"returncode": out.returncode, "seconds": round(time.perf_counter() - started, 1), "abort_lines": aborts}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=50, help="runs of the command (default: %(default)s)")
    parser.add_argument("--load", type=int, default=2, help="busy processes alongside (default: %(default)s)")
    parser.add_argument("--out", type=Path, required=True, help="folder for the runs and summary.json")
    parser.add_argument("--timeout", type=float, default=600, help="seconds one run may take (default: %(default)s)")
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    until = time.time() + args.runs * args.timeout
    load = [multiprocessing.Process(target=_busy, args=(until,), daemon=True) for _ in range(args.load)]
    for process in load:
        process.start()
    runs = []
    try:
        for index in range(args.runs):
            result = run_once(args.out / f"run{index:03d}", args.timeout)
            runs.append(result)
            state = "ok" if result["returncode"] == 0 and not result["abort_lines"] else "FAILED"
            print(f"run {index + 1}/{args.runs}: {state}, exit code {result['returncode']}, {result['seconds']} s"
                  + "".join(f"\n    {line}" for line in result["abort_lines"]), flush=True)  # fmt: skip
    finally:
        for process in load:
            process.terminate()
    failed = [i for i, r in enumerate(runs) if r["returncode"] != 0 or r["abort_lines"]]
    summary = {
        "command": " ".join(COMMAND),
        "runs": len(runs),
        "failed_runs": failed,
        "load_processes": args.load,
        "cpu": cpu_model(),
        "logical_cpus": os.cpu_count(),
        "results": runs,
    }
    (args.out / "summary.json").write_text(json.dumps(summary, indent=1) + "\n")
    print(f"{len(runs) - len(failed)} of {len(runs)} runs exited cleanly under {args.load} busy processes ({summary['cpu']})")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
