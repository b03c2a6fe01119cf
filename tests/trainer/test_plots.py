"""The plots, drawn by real matplotlib (Agg): each figure holds one series per run / algorithm
it is given, and each ``plot_*`` writes a non-empty PNG of the figure's size."""

import json

import pytest

pytest.importorskip("matplotlib", reason="the plots need matplotlib (pip install 'tcod-fast[train]')")

from matplotlib.collections import PolyCollection  # noqa: E402
from matplotlib.image import imread  # noqa: E402

from tcod_fast.trainer import plots  # noqa: E402

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def _assert_png(path, figsize_inches):
    """A PNG at ``path`` whose pixel size is the figure's at the plots' 110 dpi."""
    assert path.exists() and path.stat().st_size > 1000, path
    assert path.read_bytes()[:8] == PNG_SIGNATURE
    height, width = imread(path).shape[:2]
    assert (width, height) == (round(figsize_inches[0] * 110), round(figsize_inches[1] * 110))


def _labels(ax):
    return [line.get_label() for line in ax.get_lines()]


def test_training_curves_one_line_per_run_and_series(tmp_path):
    curves = {
        "opd": {"step": [0, 1, 2], "success": [0.0, 0.5, 1.0], "kl": [1.0, 0.6, 0.2]},
        "sod": {"step": [0, 1, 2], "success": [0.1, 0.2, 0.3], "kl": [0.9, 0.8, 0.7]},
        "grpo": {"step": [0, 1, 2], "success": [0.0, 0.0, 0.5], "kl": []},  # no KL logged
    }
    fig = plots.training_curves_figure(curves)
    ax_success, ax_kl = fig.axes
    assert _labels(ax_success) == ["opd", "sod", "grpo"]
    assert _labels(ax_kl) == ["opd", "sod"]
    assert list(ax_success.get_lines()[1].get_ydata()) == [0.1, 0.2, 0.3]
    assert [t.get_text() for t in ax_kl.get_legend().get_texts()] == ["opd", "sod"]
    size = tuple(fig.get_size_inches())
    fig.clf()

    path = plots.plot_training_curves(curves, tmp_path / "training_curves.png")
    assert path == tmp_path / "training_curves.png"
    _assert_png(path, size)


def test_kl_by_turn_skips_empty_curves(tmp_path):
    curves = {"seen": [0.3, 0.5, 0.9, 1.4], "unseen": [], "last step": [0.2, 0.4]}
    fig = plots.kl_by_turn_figure(curves, title="escalation")
    (ax,) = fig.axes
    assert _labels(ax) == ["seen", "last step"]
    assert list(ax.get_lines()[0].get_xdata()) == [0, 1, 2, 3]
    assert ax.get_title() == "escalation"
    size = tuple(fig.get_size_inches())
    fig.clf()
    _assert_png(plots.plot_kl_by_turn(curves, tmp_path / "kl.png"), size)


def test_plot_run_reads_metrics_jsonl(tmp_path):
    records = [
        {"kind": "train", "step": s, "run": "toy-opd", "success": 0.25 * s, "kl/trajectory_mean": 1.0 - 0.2 * s,
         "kl_by_turn": [0.1, 0.2 + s]}
        for s in range(3)
    ]
    records.append({"kind": "eval", "step": 2, "kl_by_turn_seen": [0.5, 0.7, 0.9]})
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    paths = plots.plot_run(tmp_path)
    assert [p.name for p in paths] == ["training_curves.png", "kl_by_turn.png"]
    for path in paths:
        assert path.stat().st_size > 1000 and path.read_bytes()[:8] == PNG_SIGNATURE


def _demo_results():
    """A ``results.json`` of the demo's shape: two teachers, two seeds, OPD and TCOD-B2F under the
    robust teacher and OPD under the narrow one."""

    def run(teacher, algorithm, seed):
        history = [{"kind": "eval", "step": s, "success_seen": 0.1 * s + seed, "success_unseen": 0.05 * s}
                   for s in (2, 4)]
        history += [{"kind": "train", "step": s, "success": 0.2 * s, "turns/expert_mean": 3.0 - s,
                     "turns/student_mean": 2.0 + s} for s in range(3)]
        return {"teacher": teacher, "algorithm": algorithm, "seed": seed, "history": history,
                "kl_by_turn": [0.3 + seed, 0.6, 0.9]}

    runs = [run(t, a, seed) for t, algorithms in (("robust", ["opd", "tcod_b2f"]), ("narrow", ["opd"]))
            for a in algorithms for seed in (0, 1)]
    return {
        "setup": {"student_init_evals": {f"seed{s}": {"success_seen": 0.1, "success_unseen": 0.0} for s in (0, 1)}},
        "headline": {
            "teacher": {t: {"success_seen": 0.9, "success_unseen": 0.7} for t in ("robust", "narrow")},
            "student_init": {"kl_by_turn": [1.0, 1.2, 1.4]},
            "robust": {"opd": {}, "tcod_b2f": {}},
            "narrow": {"opd": {}},
        },
        "runs": runs,
    }


def test_demo_figures_one_series_per_algorithm(tmp_path):
    results = _demo_results()
    figures = plots.demo_figures(results)
    assert list(figures) == ["success_vs_step.png", "kl_by_turn.png", "b2f_training.png"]

    success = figures["success_vs_step.png"].axes  # rows seen/unseen, columns robust/narrow
    assert len(success) == 4
    assert _labels(success[0]) == ["opd", "tcod_b2f", "robust teacher"]
    assert _labels(success[1]) == ["opd", "narrow teacher"]
    # evaluation steps start at 0 with the untrained student's success; the mean over two seeds
    assert list(success[0].get_lines()[0].get_xdata()) == [0, 2, 4]
    assert list(success[0].get_lines()[0].get_ydata()) == pytest.approx([0.1, 0.7, 0.9])

    kl_robust, kl_narrow = figures["kl_by_turn.png"].axes
    assert _labels(kl_robust) == ["student before distillation", "opd", "tcod_b2f"]
    assert _labels(kl_narrow) == ["opd"]
    assert list(kl_robust.get_lines()[1].get_ydata()) == pytest.approx([0.8, 0.6, 0.9])

    b2f_success, b2f_turns = figures["b2f_training.png"].axes  # only the robust teacher ran TCOD-B2F
    assert _labels(b2f_success) == ["training episodes won"]
    stacked = [c for c in b2f_turns.collections if isinstance(c, PolyCollection)]
    assert len(stacked) == 2  # expert prefix and student turns
    sizes = {name: tuple(fig.get_size_inches()) for name, fig in figures.items()}
    for fig in figures.values():
        fig.clf()

    paths = plots.plot_demo(tmp_path, results)
    assert [p.name for p in paths] == list(sizes)
    for path in paths:
        _assert_png(path, sizes[path.name])
