"""The demo's plots over seeds, drawn from its ``results.json`` content (:func:`demo_figures`)
and saved as PNGs (:func:`plot_demo`): success against training step, final KL by turn index,
and TCOD-B2F's training episodes split by player."""

from __future__ import annotations

from pathlib import Path

from tcod_fast.trainer.plots import pyplot, save_figure

__all__ = ["demo_figures", "plot_demo"]


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
    return [save_figure(fig, Path(out) / name) for name, fig in demo_figures(results).items()]


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
    plt = pyplot()
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
