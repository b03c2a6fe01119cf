"""``tcod-fast demo --mopd --quick`` end to end: the results contract (``setup`` /
``headline`` / ``runs``), the specialist teachers, the plot, and verdicts that follow the
numbers."""

import json

import pytest
from png_checks import assert_png

from tcod_fast.cli import main
from tcod_fast.demo.configs import GAMES
from tcod_fast.demo.mopd import MOPD_RUNS, SPECIALIST_SHARE, mopd_config, mopd_verdicts
from tcod_fast.demo.settings import demo_settings

SPLIT_KEYS = ("success_seen", "success_seen_std", "success_unseen", "success_unseen_std")


@pytest.fixture(scope="module")
def mopd_demo(tmp_path_factory):
    out = tmp_path_factory.mktemp("mopd")
    assert main(["demo", "--mopd", "--quick", "--no-progress", "--out", str(out)]) == 0
    return out, json.loads((out / "results.json").read_text())


def _fraction(value):
    return isinstance(value, float) and 0.0 <= value <= 1.0


def test_results_keep_the_demo_shape(mopd_demo):
    out, results = mopd_demo
    assert set(results) == {"setup", "headline", "verdicts", "runs"}
    headline, setup = results["headline"], results["setup"]
    seeds = demo_settings("quick").seeds
    assert setup["seeds"] == seeds and setup["games"] == list(GAMES) and setup["commit"]
    for game in GAMES:
        assert set(SPLIT_KEYS) <= set(headline["teacher"][game])
        assert set(SPLIT_KEYS) <= set(headline["mopd"][game])
        for family in GAMES:
            assert set(SPLIT_KEYS) <= set(headline["single"][game][family])
            assert all(_fraction(headline["single"][game][family][k]) or k.endswith("_std") for k in SPLIT_KEYS)
    assert all("family" in row and row["family"] in GAMES for row in results["runs"])
    students = [r for r in results["runs"] if r["kind"] in MOPD_RUNS]
    assert len(students) == len(MOPD_RUNS) * len(seeds) * len(GAMES)
    assert {r["kind"] for r in students} == set(MOPD_RUNS)
    # the headline is the mean of the rows
    mopd_toy = [r["success_seen"] for r in students if r["kind"] == "mopd" and r["family"] == "toy"]
    assert headline["mopd"]["toy"]["success_seen"] == pytest.approx(sum(mopd_toy) / len(mopd_toy))
    assert_png(out / "mopd.png", (9, 4))
    assert (out / "results.md").read_text().count("\n|") >= 5
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert {r.get("demo_run") for r in records if r.get("evaluates") == "student"} == set(MOPD_RUNS)
    assert any("env/alchemy/success" in r for r in records if r["kind"] == "train")


def test_each_specialist_plays_its_own_game_not_the_other(mopd_demo):
    _, results = mopd_demo
    headline = results["headline"]
    for game in GAMES:
        other = next(f for f in GAMES if f != game)
        own = headline["teacher"][game]["success_seen"]
        foreign = headline["teacher_on_other_game"][game][other]["success_seen"]
        assert foreign == 0.0, (game, foreign)  # its actions mean nothing in the other game
        assert own > foreign, game


def test_every_run_has_the_same_budget(tmp_path):
    settings = demo_settings("quick")
    configs = {kind: mopd_config(settings, tmp_path, kind, 0) for kind in MOPD_RUNS}
    budget = {(c.trainer.steps, c.rollout.tasks_per_step, c.trainer.lr, c.trainer.updates_per_step) for c in configs.values()}
    assert len(budget) == 1
    assert all([e.name for e in c.envs] == list(GAMES) for c in configs.values())
    assert [t.envs for t in configs["mopd"].teachers] == [[g] for g in GAMES]
    assert [len(configs[f"single_{g}"].teachers) for g in GAMES] == [1] * len(GAMES)


def test_verdicts_follow_the_numbers():
    entry = {"success_seen": 0.9, "success_unseen": 0.5, "success_seen_std": 0.0, "success_unseen_std": 0.0}
    student = {"success_seen": 0.8, "success_unseen": 0.3, "success_seen_std": 0.0, "success_unseen_std": 0.0}
    ahead = {"seeds": 3, "success_seen_diff": 0.4, "success_seen_diff_ci95": [0.2, 0.6],
             "success_unseen_diff": 0.0, "success_unseen_diff_ci95": [-0.1, 0.1]}  # fmt: skip
    headline = {
        "teacher": {g: entry for g in GAMES},
        "mopd": {g: student for g in GAMES},
        "mopd_vs_single": {g: {f: ahead for f in GAMES} for g in GAMES},
    }
    lines = mopd_verdicts(headline)
    assert f"toy, seen: the MOPD student (0.80) reaches {SPECIALIST_SHARE} x its specialist teacher (0.90 -> 0.72)" in lines
    assert f"toy, unseen: the MOPD student (0.30) falls short of {SPECIALIST_SHARE} x its specialist teacher (0.50 -> 0.40)" in lines
    assert any(line.startswith("alchemy, seen: the MOPD student beats the student of the toy teacher alone") for line in lines)
    assert any(line.startswith("alchemy, unseen: the MOPD student is not told apart from") for line in lines)


def test_mopd_takes_no_single_game_options(capsys):
    assert main(["demo", "--mopd", "--tune"]) == 2
    assert "--mopd runs OPD at its committed point on both games; it takes no --tune" in capsys.readouterr().err
