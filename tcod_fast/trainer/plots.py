"""PNG plots with matplotlib's Agg backend (no display needed).

* ``training_curves.png``: training success and trajectory KL per step, one line per run;
* ``kl_by_turn.png``: the teacher-student KL at each turn index of the final evaluation
  episodes (TCOD's escalation curve).

Each plot is built by a ``*_figure`` function that returns the matplotlib figure (what a test
or a notebook inspects) and saved by its ``plot_*`` function; :func:`pyplot` and
:func:`save_figure` are the backend and the PNG writer every plot shares.
"""

from __future__ import annotations

from pathlib import Path

from tcod_fast.trainer.metrics_log import read_metrics

__all__ = [
    "kl_by_turn_figure",
    "plot_kl_by_turn",
    "plot_run",
    "plot_training_curves",
    "pyplot",
    "save_figure",
    "training_curves_figure",
]


def pyplot():
    """``matplotlib.pyplot`` on the Agg backend."""
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


def save_figure(fig, path: str | Path) -> Path:
    """Write ``fig`` as a PNG at ``path`` and release it."""
    path = Path(path)
    fig.savefig(path, dpi=110)
    pyplot().close(fig)
    return path


def training_curves_figure(curves: dict[str, dict[str, list]]):
    """``curves[name] = {"step": [...], "success": [...], "kl": [...]}`` -> two panels (success,
    KL), one line per name that has that series."""
    plt = pyplot()
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
    return fig


def plot_training_curves(curves: dict[str, dict[str, list]], path: str | Path) -> Path:
    """:func:`training_curves_figure` saved as a PNG at ``path``."""
    return save_figure(training_curves_figure(curves), path)


def kl_by_turn_figure(curves: dict[str, list[float]], *, title: str = "KL by turn index"):
    """``curves[name] = [kl_turn0, kl_turn1, ...]`` -> one line per non-empty curve."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6.5, 4))
    for name, values in curves.items():
        if values:
            ax.plot(range(len(values)), values, marker="o", label=name)
    ax.set(xlabel="turn index", ylabel="mean reverse KL per student token", title=title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    return fig


def plot_kl_by_turn(curves: dict[str, list[float]], path: str | Path, *, title: str = "KL by turn index") -> Path:
    """:func:`kl_by_turn_figure` saved as a PNG at ``path``."""
    return save_figure(kl_by_turn_figure(curves, title=title), path)


def plot_run(run_dir: str | Path) -> list[Path]:
    """Plots of one training run folder from its ``metrics.jsonl``."""
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
