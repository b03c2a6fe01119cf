"""PNG plots with matplotlib's Agg backend (no display needed).

* ``training_curves.png``: training success and trajectory KL per step, one line per run;
* ``kl_by_turn.png``: the teacher-student KL at each turn index of the final evaluation
  episodes (TCOD's escalation curve);
* :func:`plot_demo`: the built-in demo's plots over seeds.

Each plot is built by a ``*_figure`` function that returns the matplotlib figure (what a test
or a notebook inspects) and saved by its ``plot_*`` function.
"""

from __future__ import annotations

from pathlib import Path

from tcod_fast.trainer.metrics_log import read_metrics

__all__ = [
    "demo_figures",
    "kl_by_turn_figure",
    "plot_demo",
    "plot_kl_by_turn",
    "plot_run",
    "plot_training_curves",
    "training_curves_figure",
]


def _pyplot():
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path: str | Path) -> Path:
    """Write ``fig`` as a PNG at ``path`` and release it."""
    path = Path(path)
    fig.savefig(path, dpi=110)
    _pyplot().close(fig)
    return path


def training_curves_figure(curves: dict[str, dict[str, list]]):
    """``curves[name] = {"step": [...], "success": [...], "kl": [...]}`` -> two panels (success,
    KL), one line per name that has that series."""
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
    return fig


def plot_training_curves(curves: dict[str, dict[str, list]], path: str | Path) -> Path:
    """:func:`training_curves_figure` saved as a PNG at ``path``."""
    return _save(training_curves_figure(curves), path)


def kl_by_turn_figure(curves: dict[str, list[float]], *, title: str = "KL by turn index"):
    """``curves[name] = [kl_turn0, kl_turn1, ...]`` -> one line per non-empty curve."""
    plt = _pyplot()
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
    return _save(kl_by_turn_figure(curves, title=title), path)


def _mean_band(series: list[list[float]]):
    """Per-index mean, min and max over the series that reach that index."""
    length = max((len(s) for s in series), default=0)
    means, lows, highs = [], [], []
    for k in range(length):
        values = [s[k] for s in series if len(s) > k and s[k] is not None]
        means.append(sum(values) / len(values))
        lows.append(min(values))
        highs.append(max(values))
    return means, lows, highs


def _eval_curve(run: dict, split: str, start: float | None) -> tuple[list[int], list[float]]:
    evals = [r for r in run["history"] if r.get("kind") == "eval"]
    steps = [r["step"] for r in evals]
    values = [r.get(f"success_{split}") for r in evals]
    if start is not None and (not steps or steps[0] != 0):
        steps, values = [0] + steps, [start] + values
    return steps, values


def plot_demo(out: str | Path, results: dict) -> list[Path]:
    """:func:`demo_figures` saved as PNGs in the folder ``out``; returns their paths."""
    return [_save(fig, Path(out) / name) for name, fig in demo_figures(results).items()]


def _run_style(name: str, names) -> dict:
    """One colour per algorithm, a dashed line for its sampled-token formulation
    (``opd@sampled``) and a dotted one for another divergence (``opd@reverse_kl``)."""
    algorithms = list(dict.fromkeys(n.partition("@")[0] for n in names))
    algorithm, _, how = name.partition("@")
    colour = f"C{algorithms.index(algorithm) % 10}" if algorithm in algorithms else None
    return {"color": colour, "linestyle": "-" if not how else "--" if how == "sampled" else ":"}


def demo_figures(results: dict) -> dict:
    """The demo's plots from its ``results.json`` content, by file name:

    * ``success_vs_step.png``: evaluation success against training step per algorithm (mean
      over seeds, band = min to max), seen and unseen tasks, one column per teacher, the
      teacher's own success as a dashed line;
    * ``kl_by_turn.png``: final KL by turn index per algorithm (mean over seeds, band = min
      to max), one panel per teacher;
    * ``b2f_training.png``: TCOD-B2F's training episodes: success, and the turns per episode
      played by the expert (the prefix) and by the student.
    """
    plt = _pyplot()
    headline, runs = results["headline"], results["runs"]
    teachers = [t for t in ("robust", "narrow") if headline.get(t)]
    inits = results["setup"].get("student_init_evals", {})
    figures = {}

    fig, axes = plt.subplots(2, len(teachers), figsize=(6 * len(teachers), 7.5), squeeze=False)
    for column, teacher in enumerate(teachers):
        for row, split in enumerate(("seen", "unseen")):
            ax = axes[row][column]
            for algorithm in headline[teacher]:
                chosen = [r for r in runs if r["teacher"] == teacher and r["algorithm"] == algorithm]
                curves = [
                    _eval_curve(r, split, (inits.get(f"seed{r['seed']}") or {}).get(f"success_{split}")) for r in chosen
                ]
                if not curves:
                    continue
                steps = max((c[0] for c in curves), key=len)
                mean, low, high = _mean_band([c[1] for c in curves])
                line = ax.plot(steps[: len(mean)], mean, marker=".", label=algorithm, **_run_style(algorithm, headline[teacher]))[0]
                ax.fill_between(steps[: len(mean)], low, high, color=line.get_color(), alpha=0.15)
            ax.axhline(headline["teacher"][teacher][f"success_{split}"], color="black", linestyle="--", label=f"{teacher} teacher")
            ax.set(xlabel="training step", ylabel=f"success, {split} tasks", title=f"{teacher} teacher: {split} tasks", ylim=(-0.03, 1.03))
            ax.grid(alpha=0.3)
            ax.legend(fontsize=8)
    fig.tight_layout()
    figures["success_vs_step.png"] = fig

    fig, axes = plt.subplots(1, len(teachers), figsize=(6 * len(teachers), 4), squeeze=False)
    for column, teacher in enumerate(teachers):
        ax = axes[0][column]
        if teacher == "robust" and headline["student_init"].get("kl_by_turn"):
            values = headline["student_init"]["kl_by_turn"]
            ax.plot(range(len(values)), values, color="grey", marker="o", label="student before distillation")
        for algorithm in headline[teacher]:
            curves = [r["kl_by_turn"] for r in runs if r["teacher"] == teacher and r["algorithm"] == algorithm]
            if not any(curves):
                continue
            mean, low, high = _mean_band(curves)
            line = ax.plot(range(len(mean)), mean, marker="o", label=algorithm, **_run_style(algorithm, headline[teacher]))[0]
            ax.fill_between(range(len(mean)), low, high, color=line.get_color(), alpha=0.15)
        ax.set(xlabel="turn index", ylabel="reverse KL per student token", title=f"KL(student || {teacher} teacher) by turn")
        ax.set_yscale("log")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    figures["kl_by_turn.png"] = fig

    b2f_teachers = [t for t in teachers if "tcod_b2f" in headline[t]]
    if b2f_teachers:
        fig, axes = plt.subplots(2, len(b2f_teachers), figsize=(6 * len(b2f_teachers), 6.5), squeeze=False, sharex=True)
        for column, teacher in enumerate(b2f_teachers):
            chosen = [r for r in runs if r["teacher"] == teacher and r["algorithm"] == "tcod_b2f"]
            trains = [[x for x in r["history"] if x.get("kind") == "train"] for r in chosen]
            success, low, high = _mean_band([[x["success"] for x in t] for t in trains])
            expert, _, _ = _mean_band([[x["turns/expert_mean"] for x in t] for t in trains])
            student, _, _ = _mean_band([[x["turns/student_mean"] for x in t] for t in trains])
            steps = list(range(len(success)))
            ax = axes[0][column]
            ax.plot(steps, success, color="tab:green", label="training episodes won")
            ax.fill_between(steps, low, high, color="tab:green", alpha=0.15)
            ax.set(ylabel="success (training episodes)", title=f"TCOD-B2F, {teacher} teacher", ylim=(-0.03, 1.03))
            ax = axes[1][column]
            ax.stackplot(steps, expert, student, labels=["turns played by the expert (prefix)", "turns played by the student"], alpha=0.6)
            ax.set(xlabel="training step", ylabel="turns per training episode")
            for ax in axes[:, column]:
                ax.grid(alpha=0.3)
                ax.legend(fontsize=8)
        fig.tight_layout()
        figures["b2f_training.png"] = fig
    return figures


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
