"""The benchmark scripts run end to end on tiny CPU shapes.

Their real runs need a GPU or minutes of CPU, and no GPU has been lent to this project yet, so
these smoke runs are what keeps the scripts from rotting between GPU runs: a broken import,
a changed op signature or a JSON key that no longer exists fails here, not on leased GPU time.
They check the scripts' plumbing and report structure, not the numbers (timings of tiny shapes
mean nothing).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
BENCHMARKS = ROOT / "benchmarks"


def _run(args, tmp_path, timeout=600):
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), str(BENCHMARKS), env.get("PYTHONPATH", "")])
    env.setdefault("TRITON_INTERPRET", "1")
    result = subprocess.run(
        [sys.executable, *args], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=timeout
    )
    assert result.returncode == 0, f"{args[0]} failed:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
    return result


@pytest.mark.slow
def test_run_turn_kl_cpu(tmp_path):
    out = tmp_path / "turn_kl.json"
    _run([str(BENCHMARKS / "run_turn_kl.py"), "--rows", "8", "--vocab", "1031", "--repeats", "2",
          "--no-memory", "--out", str(out)], tmp_path)
    report = json.loads(out.read_text())
    assert set(report["results"]) >= {"fused-native", "eager", "compiled"}
    assert all("error" not in entry for entry in report["results"].values()), report["results"]
    assert report["speedup_of_fused"]["vs_eager"] > 0
    assert "malloc_environment" in report


@pytest.mark.slow
def test_run_fused_linear_cpu(tmp_path):
    out = tmp_path / "fused_linear.json"
    _run([str(BENCHMARKS / "run_fused_linear.py"), "--device", "cpu", "--rows", "16", "--hidden", "24/40",
          "--vocab", "301", "--dtype", "float32", "--repeats", "1", "--error-rows", "8", "--out", str(out)], tmp_path)
    report = json.loads(out.read_text())
    (case,) = report["cases"]
    results = case["results"]
    assert set(results) == {"fused-torch", "fused-triton", "eager", "liger"}
    assert "CUDA" in results["liger"]["error"]  # recorded, not dropped
    for name in ("fused-torch", "fused-triton", "eager"):
        assert "error" not in results[name], results[name]
        errors = results[name]["gradient_relative_error"]
        assert errors["dh"] < 1e-4 and errors["dW"] < 1e-4, (name, errors)  # float32 vs float64
    assert case["gemm_flops"] == 2 * 16 * 301 * (3 * 24 + 40)


@pytest.mark.slow
def test_run_max_trajectory_cpu(tmp_path):
    out = tmp_path / "max_trajectory.json"
    _run([str(BENCHMARKS / "run_max_trajectory.py"), "--device", "cpu", "--tiny", "--dtype", "float32",
          "--start-tokens", "16", "--max-tokens", "32", "--resolution", "8", "--repeats", "1", "--out", str(out)],
         tmp_path)
    report = json.loads(out.read_text())
    for loss in ("fused_linear", "materialised"):
        assert report["longest_tokens"][loss] == {"tokens": 32, "reached_cap": True}
        assert report["median_step_s_at_common_tokens"][loss] > 0
    assert [t["tokens"] for t in report["trials"]] == [16, 32, 16, 32]


def test_max_trajectory_search_bisects_to_the_resolution():
    sys.path.insert(0, str(BENCHMARKS))
    try:
        import run_max_trajectory as script
    finally:
        sys.path.remove(str(BENCHMARKS))

    def search(limit, start=2048, cap=131072):
        def step(loss, student, teacher, optimizer, tokens, vocab, device):
            return tokens <= limit, 0.1, None

        return script.longest("fused_linear", None, None, None, 0, "cpu", start, cap, 1024, [], step=step)

    assert search(5000) == (4096, False)  # 2048, 4096 fit; 8192 fails; 6144, 5120 fail
    assert search(6200) == (6144, False)
    assert search(131072) == (131072, True)  # reached the cap without running out
    assert search(1000) == (0, False)  # not even the smallest tried length fits


def test_gpu_session_script_parses():
    subprocess.run(["bash", "-n", str(BENCHMARKS / "gpu_session.sh")], check=True)


@pytest.mark.slow
def test_run_topk_turn_kl_cpu(tmp_path):
    out = tmp_path / "topk.json"
    _run([str(BENCHMARKS / "run_topk_turn_kl.py"), "--rows", "8", "--vocab", "1031", "--k", "3", "17", "--repeats", "2",
          "--no-memory", "--out", str(out)], tmp_path)
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
def test_topk_memory_probe_runs(tmp_path):
    args = [str(BENCHMARKS / "run_topk_turn_kl.py"), "--probe", "fused-native", "--rows", "8", "--vocab", "1031", "--k", "5"]
    line = _run(args, tmp_path).stdout.splitlines()[-1]
    probe = json.loads(line)
    assert probe["extra_peak_bytes"] >= 0 and "extra_peak_over_gradient" in probe


def test_run_padding_free_cpu(tmp_path):
    out = tmp_path / "padding_free.json"
    _run([str(BENCHMARKS / "run_padding_free.py"), "--shapes", "demo", "--episodes", "3", "--longest", "32", "--repeats", "1",
          "--out", str(out)], tmp_path)  # fmt: skip
    (run,) = json.loads(out.read_text())["runs"]
    padded, free = run["layouts"]["padded"], run["layouts"]["padding_free"]
    assert free["model_tokens"] == run["real_tokens"] == sum(run["lengths"]) < padded["model_tokens"]
    assert run["loss_relative_difference"] < 1e-4
