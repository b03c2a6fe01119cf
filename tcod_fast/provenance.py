"""Where a measured result comes from: the commit, the versions and the machine. Every result
file records them (the demo's ``results.json``, the benchmark JSON files)."""

from __future__ import annotations

import os
import platform
import subprocess
from pathlib import Path

__all__ = ["commit", "cpu_model", "machine", "versions"]


def cpu_model() -> str:
    """The CPU's model name from /proc/cpuinfo (``platform.processor()`` where there is none)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine() -> dict:
    """CPU model, logical CPUs and Python version."""
    return {"cpu": cpu_model(), "logical_cpus": os.cpu_count(), "python": platform.python_version()}


def commit() -> str:
    """The checkout's ``git`` commit, with ``+uncommitted changes`` when tracked files differ
    from it; ``unknown`` outside a checkout."""
    root = Path(__file__).resolve().parents[1]
    try:
        head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, timeout=10)
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root, capture_output=True, text=True, timeout=10)
        if head.returncode == 0:
            return head.stdout.strip() + ("+uncommitted changes" if dirty.stdout.strip() else "")
    except (OSError, subprocess.SubprocessError):
        pass
    return "unknown"


def versions() -> dict:
    """torch, transformers (``None`` when absent) and tcod-fast versions."""
    import torch

    import tcod_fast

    found = {"torch": torch.__version__, "tcod_fast": getattr(tcod_fast, "__version__", "unknown")}
    try:
        import transformers

        found["transformers"] = transformers.__version__
    except ImportError:
        found["transformers"] = None
    return found
