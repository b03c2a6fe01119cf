"""The demo's statistics over seeds: means with 95% t-intervals, the aggregate of one run
kind, success differences paired by seed, and whether the last two evaluations agree."""

from __future__ import annotations

import math
import statistics
from typing import Any

__all__ = ["aggregate", "last_two_evals", "mean_ci95", "mean_curve", "paired_difference", "std"]

# Two-sided 95% quantiles of Student's t by degrees of freedom (beyond 30: the normal's).
_T95 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262, 10: 2.228,
        11: 2.201, 12: 2.179, 13: 2.160, 14: 2.145, 15: 2.131, 16: 2.120, 17: 2.110, 18: 2.101, 19: 2.093,
        20: 2.086, 21: 2.080, 22: 2.074, 23: 2.069, 24: 2.064, 25: 2.060, 26: 2.056, 27: 2.052, 28: 2.048,
        29: 2.045, 30: 2.042}  # fmt: skip


def mean_ci95(values: list[float]) -> tuple[float, float, float]:
    """Mean and its two-sided 95% t-interval over seeds (the interval is the mean alone
    for a single value)."""
    mean = statistics.fmean(values)
    if len(values) < 2:
        return mean, mean, mean
    half = _T95.get(len(values) - 1, 1.960) * statistics.stdev(values) / math.sqrt(len(values))
    return mean, mean - half, mean + half


def std(values: list[float]) -> float:
    """The sample standard deviation over seeds (0 for a single value)."""
    return statistics.stdev(values) if len(values) > 1 else 0.0


def aggregate(runs: list[dict]) -> dict:
    """One run kind over its seeds: success means and spreads, final KL, the escalation
    slope with its 95% interval, and the mean KL by turn."""
    seen = [r["success_seen"] for r in runs]
    unseen = [r["success_unseen"] for r in runs]
    slopes = [r["kl_escalation_slope"] for r in runs]
    slope_mean, lo, hi = mean_ci95(slopes)
    return {
        "success_seen": statistics.fmean(seen),
        "success_seen_std": std(seen),
        "success_unseen": statistics.fmean(unseen),
        "success_unseen_std": std(unseen),
        "final_kl": statistics.fmean(r["final_kl"] for r in runs),
        "kl_escalation_slope": slope_mean,
        "kl_escalation_slope_ci95": [lo, hi],
        "kl_by_turn": mean_curve([r["kl_by_turn"] for r in runs]),
        "seeds": len(runs),
    }


def mean_curve(curves: list[list[float]]) -> list[float]:
    """Per-turn mean over the curves that reach that turn."""
    length = max((len(c) for c in curves), default=0)
    return [statistics.fmean(c[k] for c in curves if len(c) > k) for k in range(length)]


def paired_difference(runs: list[dict], baseline_runs: list[dict]) -> dict | None:
    """Success difference against the baseline, paired by seed (the same student start):
    mean and 95% t-interval over the seeds both have, per split."""
    by_seed = {r["seed"]: r for r in baseline_runs}
    pairs = [(r, by_seed[r["seed"]]) for r in runs if r["seed"] in by_seed]
    if not pairs:
        return None
    entry: dict[str, Any] = {"seeds": len(pairs)}
    for split in ("seen", "unseen"):
        mean, lo, hi = mean_ci95([a[f"success_{split}"] - b[f"success_{split}"] for a, b in pairs])
        entry[f"success_{split}_diff"] = mean
        entry[f"success_{split}_diff_ci95"] = [lo, hi]
    return entry


def last_two_evals(runs: list[dict], split: str) -> dict | None:
    """Mean and spread over seeds of the last two evaluations' success. They agree when
    their means differ by no more than the larger of the seed spread and one task of the
    smaller evaluation (``1 / tasks``, the finest step an evaluation can take: at the
    ceiling every seed scores 1.0 and the spread alone is 0)."""
    curves = [[r2 for r2 in run["history"] if r2["kind"] == "eval" and f"success_{split}" in r2] for run in runs]
    if not curves or any(len(c) < 2 for c in curves):
        return None
    previous = [c[-2][f"success_{split}"] for c in curves]
    last = [c[-1][f"success_{split}"] for c in curves]
    spread = max(std(previous), std(last))
    tasks = min((c[i].get(f"tasks_{split}") or 0 for c in curves for i in (-2, -1)), default=0)
    resolution = 1.0 / tasks if tasks else 0.0
    return {
        "steps": [curves[0][-2]["step"], curves[0][-1]["step"]],
        "previous": statistics.fmean(previous),
        "last": statistics.fmean(last),
        "seed_std": spread,
        "one_task": resolution,
        "agree": abs(statistics.fmean(last) - statistics.fmean(previous)) <= max(spread, resolution),
    }
