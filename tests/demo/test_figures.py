"""The demo's plots, drawn by real matplotlib (Agg): each figure holds one series per algorithm
it is given, and :func:`plot_demo` writes a non-empty PNG of each figure's size."""

import pytest

pytest.importorskip("matplotlib", reason="the plots need matplotlib (pip install 'tcod-fast[train]')")

from matplotlib.collections import PolyCollection  # noqa: E402
from png_checks import assert_png, line_labels  # noqa: E402

from tcod_fast.demo.figures import demo_figures, plot_demo  # noqa: E402


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
    figures = demo_figures(results)
    assert list(figures) == ["success_vs_step.png", "kl_by_turn.png", "b2f_training.png"]

    success = figures["success_vs_step.png"].axes  # rows seen/unseen, columns robust/narrow
    assert len(success) == 4
    assert line_labels(success[0]) == ["opd", "tcod_b2f", "robust teacher"]
    assert line_labels(success[1]) == ["opd", "narrow teacher"]
    # evaluation steps start at 0 with the untrained student's success; the mean over two seeds
    assert list(success[0].get_lines()[0].get_xdata()) == [0, 2, 4]
    assert list(success[0].get_lines()[0].get_ydata()) == pytest.approx([0.1, 0.7, 0.9])

    kl_robust, kl_narrow = figures["kl_by_turn.png"].axes
    assert line_labels(kl_robust) == ["student before distillation", "opd", "tcod_b2f"]
    assert line_labels(kl_narrow) == ["opd"]
    assert list(kl_robust.get_lines()[1].get_ydata()) == pytest.approx([0.8, 0.6, 0.9])

    b2f_success, b2f_turns = figures["b2f_training.png"].axes  # only the robust teacher ran TCOD-B2F
    assert line_labels(b2f_success) == ["training episodes won"]
    stacked = [c for c in b2f_turns.collections if isinstance(c, PolyCollection)]
    assert len(stacked) == 2  # expert prefix and student turns
    sizes = {name: tuple(fig.get_size_inches()) for name, fig in figures.items()}
    for fig in figures.values():
        fig.clf()

    paths = plot_demo(tmp_path, results)
    assert [p.name for p in paths] == list(sizes)
    for path in paths:
        assert_png(path, sizes[path.name])
