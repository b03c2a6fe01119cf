"""What every benchmark JSON file starts with, and how it is written (shared by the run_* scripts)."""

from __future__ import annotations

import json
import platform
import sys
from datetime import datetime, timezone
from pathlib import Path

import torch


def cpu_model() -> str:
    """The CPU's model name from /proc/cpuinfo (``platform.processor()`` where there is none)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()


def report_header(device: str) -> dict:
    """The command as typed, UTC timestamp, the device's name (GPU or CPU model) and torch version."""
    return {
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "timestamp": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "device": torch.cuda.get_device_name() if device == "cuda" else cpu_model(),
        "torch": torch.__version__,
    }


def write_report(report: dict, path: Path | None) -> None:
    """Write ``report`` as indented JSON to ``path`` (parents created); nothing when ``path`` is None."""
    if path is None:
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(report, indent=2) + "\n")


def cuda_copy_bandwidth(nbytes: int) -> float:
    """Read+write bytes per second of a device-to-device copy of ``nbytes``."""
    import triton.testing

    src = torch.empty(nbytes // 2, dtype=torch.bfloat16, device="cuda").normal_()
    dst = torch.empty_like(src)
    seconds = triton.testing.do_bench(lambda: dst.copy_(src), warmup=25, rep=200, return_mode="median") / 1e3
    return 2 * src.numel() * src.element_size() / seconds


def cuda_peak_extra_bytes(step) -> int:
    """Peak CUDA memory ``step()`` allocates beyond what is allocated when it starts, in bytes."""
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    step()
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated() - base
