"""What every benchmark JSON file starts with, and how it is written (shared by the run_* scripts)."""

from __future__ import annotations

import argparse
import json
import sys
from datetime import datetime, timezone
from pathlib import Path

import torch

from tcod_fast import provenance
from tcod_fast.provenance import cpu_model
from tcod_fast.tiny_settings import tiny_requested


def lr_and_updates(text: str) -> tuple[float, int]:
    """The argparse type of a ``--point LR,UPDATES`` option (``1e-3,8``): a demo grid point."""
    lr, _, updates = text.partition(",")
    try:
        return float(lr), int(updates)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected LR,UPDATES such as 1e-3,8, got {text!r}") from None


def report_header(device: str) -> dict:
    """The command as typed, UTC timestamp, the device's name (GPU or CPU model) and torch
    version (and ``"tiny": true`` for a run on :func:`tiny_defaults`' shapes)."""
    header = {
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "timestamp": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "device": torch.cuda.get_device_name() if device == "cuda" else cpu_model(),
        "torch": torch.__version__,
        "commit": provenance.commit(),
        "versions": provenance.versions(),
        "machine": provenance.machine(),
    }
    if tiny_requested():
        header["tiny"] = True  # TCOD_FAST_TINY: a check that the script runs; no measurement
    return header


def tiny_defaults(parser, **defaults) -> None:
    """Under ``TCOD_FAST_TINY=1`` (see ``tcod_fast/tiny_settings.py``), make ``defaults``
    (tiny shapes, few repeats) the script's defaults; options given still win."""
    if tiny_requested():
        parser.set_defaults(**defaults)


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


def fused_speed_summary(results: dict, fused_name: str, floor_bytes: int, floor_label: str, device: str) -> dict:
    """How the fused implementation ``fused_name`` compares, from ``results[name]["median_s"]``:
    ``speedup_of_fused`` (every other implementation's median over the fused one's) and the fused
    one's bytes per second at the ``floor_bytes`` it must move (``fused_bytes_per_s_at_<floor_label>``),
    on CUDA also as a fraction of the device's copy bandwidth. Only ``speedup_of_fused`` (empty)
    when the fused implementation has no time."""
    summary = {"speedup_of_fused": {}}
    fused = results.get(fused_name, {}).get("median_s")
    if not fused:
        return summary
    for name, entry in results.items():
        if name != fused_name and "median_s" in entry:
            summary["speedup_of_fused"][f"vs_{name}"] = entry["median_s"] / fused
    summary[f"fused_bytes_per_s_at_{floor_label}"] = floor_bytes / fused
    if device == "cuda":
        bandwidth = cuda_copy_bandwidth(floor_bytes)
        summary["device_copy_bytes_per_s"] = bandwidth
        summary["fused_fraction_of_copy_bandwidth"] = floor_bytes / fused / bandwidth
    return summary


def cuda_peak_extra_bytes(step) -> int:
    """Peak CUDA memory ``step()`` allocates beyond what is allocated when it starts, in bytes."""
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    step()
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated() - base
