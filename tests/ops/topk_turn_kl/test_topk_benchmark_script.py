"""benchmarks/run_topk_turn_kl.py runs end to end on tiny CPU shapes (plumbing and report
structure, not the numbers: timings of tiny shapes mean nothing)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[3]
SCRIPT = ROOT / "benchmarks" / "run_topk_turn_kl.py"


def _run(args, tmp_path):
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), str(SCRIPT.parent), env.get("PYTHONPATH", "")])
    env.setdefault("TRITON_INTERPRET", "1")
    result = subprocess.run(
        [sys.executable, str(SCRIPT), *args], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600
    )
    assert result.returncode == 0, f"run_topk_turn_kl.py failed:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
    return result.stdout


@pytest.mark.slow
def test_run_topk_turn_kl_cpu(tmp_path):
    out = tmp_path / "topk.json"
    _run(["--rows", "8", "--vocab", "1031", "--k", "3", "17", "--repeats", "2", "--no-memory", "--out", str(out)],
         tmp_path)
    report = json.loads(out.read_text())
    assert [case["K"] for case in report["cases"]] == [3, 17]
    for case in report["cases"]:
        results = case["results"]
        assert set(results) == {"fused-native", "fused-torch", "trl-eager", "trl-compiled", "full-logits-native"}
        assert all("error" not in entry for entry in results.values()), results
        assert all(len(entry["times_s"]) == 2 for entry in results.values())
        assert case["speedup_of_fused"]["vs_trl-compiled"] > 0
        assert case["floor_bytes_3NVe"] == 3 * 8 * 1031 * 4
    assert report["device"] and report["command"] and "load_average_1_5_15_min_at_write" in report


@pytest.mark.slow
def test_memory_probe_runs(tmp_path):
    line = _run(["--probe", "fused-native", "--rows", "8", "--vocab", "1031", "--k", "5"], tmp_path).splitlines()[-1]
    probe = json.loads(line)
    assert probe["extra_peak_bytes"] >= 0 and "extra_peak_over_gradient" in probe
