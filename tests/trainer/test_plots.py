"""The trainer's plots, drawn by real matplotlib (Agg): each figure holds one series per run
it is given, and each ``plot_*`` writes a non-empty PNG of the figure's size."""

import json

import pytest

pytest.importorskip("matplotlib", reason="the plots need matplotlib (pip install 'tcod-fast[train]')")

from png_checks import PNG_SIGNATURE, assert_png, line_labels  # noqa: E402

from tcod_fast.trainer import plots  # noqa: E402


def test_training_curves_one_line_per_run_and_series(tmp_path):
    curves = {
        "opd": {"step": [0, 1, 2], "success": [0.0, 0.5, 1.0], "kl": [1.0, 0.6, 0.2]},
        "sod": {"step": [0, 1, 2], "success": [0.1, 0.2, 0.3], "kl": [0.9, 0.8, 0.7]},
        "grpo": {"step": [0, 1, 2], "success": [0.0, 0.0, 0.5], "kl": []},  # no KL logged
    }
    fig = plots.training_curves_figure(curves)
    ax_success, ax_kl = fig.axes
    assert line_labels(ax_success) == ["opd", "sod", "grpo"]
    assert line_labels(ax_kl) == ["opd", "sod"]
    assert list(ax_success.get_lines()[1].get_ydata()) == [0.1, 0.2, 0.3]
    assert [t.get_text() for t in ax_kl.get_legend().get_texts()] == ["opd", "sod"]
    size = tuple(fig.get_size_inches())
    fig.clf()

    path = plots.plot_training_curves(curves, tmp_path / "training_curves.png")
    assert path == tmp_path / "training_curves.png"
    assert_png(path, size)


def test_kl_by_turn_skips_empty_curves(tmp_path):
    curves = {"seen": [0.3, 0.5, 0.9, 1.4], "unseen": [], "last step": [0.2, 0.4]}
    fig = plots.kl_by_turn_figure(curves, title="escalation")
    (ax,) = fig.axes
    assert line_labels(ax) == ["seen", "last step"]
    assert list(ax.get_lines()[0].get_xdata()) == [0, 1, 2, 3]
    assert ax.get_title() == "escalation"
    size = tuple(fig.get_size_inches())
    fig.clf()
    assert_png(plots.plot_kl_by_turn(curves, tmp_path / "kl.png"), size)


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
