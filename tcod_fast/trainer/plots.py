"""PNG plots with matplotlib's Agg backend (no display needed).

* ``training_curves.png``: training success and trajectory KL per step, one line per algorithm;
* ``kl_by_turn.png``: the teacher-student KL at each turn index of the final evaluation
  episodes, one line per algorithm (TCOD's escalation curve).
"""

from __future__ import annotations

from pathlib import Path

__all__ = ["plot_demo", "plot_kl_by_turn", "plot_training_curves", "plot_run"]


def _pyplot():
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


def plot_training_curves(curves: dict[str, dict[str, list]], path: str | Path) -> Path:
    """``curves[name] = {"step": [...], "success": [...], "kl": [...]}`` -> two panels."""
    plt = _pyplot()
    fig, (ax_success, ax_kl) = plt.subplots(1, 2, figsize=(11, 4))
    for name, curve in curves.items():
        steps = curve.get("step") or list(range(len(curve.get("kl", []))))
        if curve.get("success"):
            ax_success.plot(steps, curve["success"], marker=".", label=name)
        if curve.get("kl"):
            ax_kl.plot(steps, curve["kl"], marker=".", label=name)
    ax_success.set(xlabel="training step", ylabel="success rate (training episodes)", title="Success over training")
    ax_kl.set(xlabel="training step", ylabel="reverse KL per student token", title="KL(student || teacher) over training")
    for ax in (ax_success, ax_kl):
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_kl_by_turn(curves: dict[str, list[float]], path: str | Path, *, title: str = "KL by turn index") -> Path:
    """``curves[name] = [kl_turn0, kl_turn1, ...]`` -> one line per name."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6.5, 4))
    for name, values in curves.items():
        if values:
            ax.plot(range(len(values)), values, marker="o", label=name)
    ax.set(xlabel="turn index", ylabel="mean reverse KL per student token", title=title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_demo(out: str | Path, results: dict) -> list[Path]:
    """The demo's plots from its ``results.json`` content."""
    out = Path(out)
    training = {
        name: {
            "step": list(range(len(entry.get("train_kl_by_step", [])))),
            "success": entry.get("train_success_by_step", []),
            "kl": entry.get("train_kl_by_step", []),
        }
        for name, entry in results["algorithms"].items()
    }
    kl_curves = {name: entry.get("kl_by_turn", []) for name, entry in results["algorithms"].items()}
    initial = results.get("reference", {}).get("student_init", {}).get("kl_by_turn")
    if initial:
        kl_curves = {"student before distillation": initial, **kl_curves}
    return [
        plot_training_curves(training, out / "training_curves.png"),
        plot_kl_by_turn(kl_curves, out / "kl_by_turn.png", title="KL by turn index (held-out seen tasks, final students)"),
    ]


def plot_run(run_dir: str | Path) -> list[Path]:
    """Plots of one training run folder from its ``metrics.jsonl``."""
    from tcod_fast.trainer.logging import read_metrics

    run_dir = Path(run_dir)
    train = read_metrics(run_dir / "metrics.jsonl", kind="train")
    evals = read_metrics(run_dir / "metrics.jsonl", kind="eval")
    name = train[0].get("run") or train[0].get("algorithm", "run") if train else "run"
    paths = [
        plot_training_curves(
            {name: {"step": [r["step"] for r in train], "success": [r.get("success") for r in train], "kl": [r.get("kl/trajectory_mean") for r in train]}},
            run_dir / "training_curves.png",
        )
    ]
    curves = {}
    if evals and evals[-1].get("kl_by_turn_seen"):
        curves[f"{name} (eval, seen)"] = evals[-1]["kl_by_turn_seen"]
    if train and train[-1].get("kl_by_turn"):
        curves[f"{name} (last training step)"] = train[-1]["kl_by_turn"]
    if curves:
        paths.append(plot_kl_by_turn(curves, run_dir / "kl_by_turn.png"))
    return paths
