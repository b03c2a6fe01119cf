"""pytest-benchmark suite for fused_linear_turn_kl: forward+backward time and peak extra memory.

    pytest benchmarks/bench_fused_linear_turn_kl.py --benchmark-json=benchmarks/results/cpu_fused_linear_suite.json

Three ways to get the reverse-KL loss and the gradients w.r.t. the student hidden states and
LM-head weight from hidden states:

* ``fused``: ``fused_linear_turn_kl`` (no logits tensor at all);
* ``unfused``: ``h @ W.T`` -> logits -> ``fused_turn_kl`` (the logits kernel, native on CPU);
* ``eager``: ``h @ W.T`` -> ``log_softmax`` -> ``sum p (log p - log q)``, what people write today.

Default size N=4096, H=256, V=32000 float32, checked against two bounds (extra peak memory
<= 0.25x one float32 N x V logits tensor, time <= 1.2x ``unfused``); set
``FLK_BENCH_SIZES=1024x256x32000,4096x256x32000`` for others. Peak extra memory is measured in
a fresh process per case (``python benchmarks/bench_fused_linear_turn_kl.py --probe ...``):
the resident-set high-water mark is reset after the inputs exist, one forward+backward runs,
and the rise is reported (gradients of the student included). Medians, command, CPU, torch
version and timestamp are written to ``benchmarks/results/cpu_fused_linear.json``.
"""

from __future__ import annotations

import datetime
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
from run_report import cpu_model

from tcod_fast.tiny_settings import tiny_requested

RESULTS_PATH = Path(__file__).resolve().parent / "results" / "cpu_fused_linear.json"
VARIANTS = ("fused", "unfused", "eager")
INTERLEAVED_ROUNDS = int(os.environ.get("FLK_BENCH_INTERLEAVED_ROUNDS", "5"))


def _sizes():
    # TCOD_FAST_TINY=1 (tcod_fast/tiny_settings.py): one tiny shape, to check that the suite runs.
    spec = os.environ.get("FLK_BENCH_SIZES", "16x24x301" if tiny_requested() else "4096x256x32000")
    return [tuple(int(v) for v in item.split("x")) for item in spec.split(",") if item]


def make_inputs(n, h, v, seed=0):
    """Student/teacher hidden states and LM heads, filled in place (no temporaries)."""
    torch.manual_seed(seed)
    h_s = torch.empty(n, h).normal_().requires_grad_(True)
    w_s = torch.empty(v, h).normal_(0.0, 2.0 / h**0.5).requires_grad_(True)
    h_t = torch.empty(n, h).normal_()
    w_t = torch.empty(v, h).normal_(0.0, 2.0 / h**0.5)
    return h_s, w_s, h_t, w_t


def forward_backward(variant, h_s, w_s, h_t, w_t):
    from tcod_fast import fused_turn_kl
    from tcod_fast.ops.fused_linear_turn_kl import fused_linear_turn_kl

    if variant == "fused":
        loss = fused_linear_turn_kl(h_s, w_s, h_t, w_t)
    elif variant == "unfused":
        with torch.no_grad():
            teacher_logits = h_t @ w_t.t()
        loss = fused_turn_kl(h_s @ w_s.t(), teacher_logits)
    elif variant == "eager":
        with torch.no_grad():
            log_q = torch.log_softmax(h_t @ w_t.t(), dim=-1)
        log_p = torch.log_softmax(h_s @ w_s.t(), dim=-1)
        loss = (log_p.exp() * (log_p - log_q)).sum(-1).mean()
    else:
        raise ValueError(f"variant must be one of {VARIANTS}, got {variant!r}")
    loss.backward()
    return loss.detach()


# --------------------------------------------------------------------------------------------
# peak memory probe (runs in its own process)
# --------------------------------------------------------------------------------------------
def _rss_kib(field):
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field):
                return int(line.split()[1])
    raise RuntimeError(f"{field} missing from /proc/self/status")


def probe(variant, n, h, v):
    """Extra peak bytes of one forward+backward above the inputs, in this (fresh) process."""
    forward_backward(variant, *make_inputs(8, h, 512))  # load kernels / extensions first
    inputs = make_inputs(n, h, v)
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # reset the high-water mark to the current RSS
        before = _rss_kib("VmRSS") * 1024
    except OSError:  # no resettable peak: fall back to the lifetime maximum
        before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    forward_backward(variant, *inputs)
    after = _rss_kib("VmHWM") * 1024
    h_s, w_s = inputs[0], inputs[1]
    grad_bytes = (h_s.grad.numel() + w_s.grad.numel()) * 4
    return {"variant": variant, "N": n, "H": h, "V": v, "extra_peak_bytes": after - before, "student_grad_bytes": grad_bytes}


def measure_peak(variant, n, h, v):
    out = subprocess.run(
        [sys.executable, str(Path(__file__).resolve()), "--probe", variant, str(n), str(h), str(v)],
        capture_output=True, text=True, check=True,
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


# --------------------------------------------------------------------------------------------
# pytest-benchmark cases
# --------------------------------------------------------------------------------------------
if "pytest" in sys.modules:
    import pytest

    _RECORDS: dict = {}
    _INTERLEAVED: dict = {}

    @pytest.fixture(scope="module", autouse=True)
    def _write_results():
        yield
        if _RECORDS or _INTERLEAVED:
            _dump(_RECORDS, _INTERLEAVED)

    @pytest.mark.parametrize("size", _sizes(), ids=lambda s: "N{}xH{}xV{}".format(*s))
    @pytest.mark.parametrize("variant", VARIANTS)
    def test_forward_backward(benchmark, variant, size):
        n, h, v = size
        # two input sets, alternated, so a repeated run never finds its inputs in cache
        sets = [make_inputs(n, h, v, seed=s) for s in (0, 1)]
        counter = {"i": 0}

        def setup():
            inputs = sets[counter["i"] % 2]
            counter["i"] += 1
            for x in inputs[:2]:
                x.grad = None
            return (variant, *inputs), {}

        forward_backward(*setup()[0])  # warm-up
        benchmark.pedantic(forward_backward, setup=setup, rounds=3, iterations=1)
        memory = measure_peak(variant, n, h, v)
        benchmark.extra_info.update(memory)
        _RECORDS[(variant, size)] = {
            "median_s": benchmark.stats.stats.median,
            "rounds_s": list(benchmark.stats.stats.data),
            **memory,
        }


    @pytest.mark.parametrize("size", _sizes(), ids=lambda s: "N{}xH{}xV{}".format(*s))
    def test_interleaved_rounds(size):
        """The three variants alternated round by round, so load from other processes on a shared
        machine hits all of them alike; the ratios in the JSON come from these medians."""
        n, h, v = size
        inputs = make_inputs(n, h, v)
        times = {variant: [] for variant in VARIANTS}
        for _ in range(INTERLEAVED_ROUNDS):
            for variant in VARIANTS:
                for x in inputs[:2]:
                    x.grad = None
                start = time.perf_counter()
                forward_backward(variant, *inputs)
                times[variant].append(time.perf_counter() - start)
        _INTERLEAVED[size] = times



def _dump(records, interleaved):
    cases = []
    for size in sorted({size for _, size in records} | set(interleaved)):
        n, h, v = size
        row = {"N": n, "H": h, "V": v, "dtype": "float32", "logits_bytes_avoided": n * v * 4}
        for variant in VARIANTS:
            if (variant, size) in records:
                row[variant] = records[(variant, size)]
        if size in interleaved:
            row["interleaved_rounds_s"] = interleaved[size]
            row["interleaved_median_s"] = {k: statistics.median(t) for k, t in interleaved[size].items()}
        targets = {}
        if "fused" in row:
            row["extra_peak_fused_over_logits"] = row["fused"]["extra_peak_bytes"] / row["logits_bytes_avoided"]
            row["extra_peak_fused_minus_grads_over_logits"] = (
                row["fused"]["extra_peak_bytes"] - row["fused"]["student_grad_bytes"]
            ) / row["logits_bytes_avoided"]
            targets["extra_peak_le_0.25x_logits"] = row["extra_peak_fused_over_logits"] <= 0.25
        if "fused" in row and "unfused" in row:
            row["time_fused_over_unfused_separate_runs"] = row["fused"]["median_s"] / row["unfused"]["median_s"]
        if "interleaved_median_s" in row:
            medians = row["interleaved_median_s"]
            row["time_fused_over_unfused"] = medians["fused"] / medians["unfused"]
            # ratio within each round (fused and unfused ran back to back under the same load)
            paired = [f / u for f, u in zip(interleaved[size]["fused"], interleaved[size]["unfused"])]
            row["time_fused_over_unfused_per_round"] = paired
            row["time_fused_over_unfused_per_round_median"] = statistics.median(paired)
            row["time_fused_over_eager"] = medians["fused"] / medians["eager"]
            targets["time_le_1.2x_unfused"] = row["time_fused_over_unfused"] <= 1.2
        row["targets"] = targets
        cases.append(row)
    payload = {
        "command": " ".join([Path(sys.executable).name, "-m", "pytest", *sys.argv[1:]]) if "pytest" in sys.modules
        else " ".join(sys.argv),
        "env": {k: v for k, v in os.environ.items() if k.startswith(("FLK_BENCH_", "TCOD_FAST_TINY"))},
        "cpu_model": cpu_model(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch_version": torch.__version__,
        "timestamp_utc": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "note": "per-variant entries: pytest-benchmark median of 3 rounds after one warm-up, run one "
        "variant after the other; interleaved_*: the variants alternated round by round (the fair "
        "comparison on a shared, loaded machine; time ratios use these); extra peak = rise of the "
        "process RSS high-water mark during one forward+backward in a fresh process, student "
        "gradients included",
        "load_average_1_5_15_min_at_write": list(os.getloadavg()),
        "cases": cases,
    }
    RESULTS_PATH.parent.mkdir(parents=True, exist_ok=True)
    RESULTS_PATH.write_text(json.dumps(payload, indent=2) + "\n")


if __name__ == "__main__" and len(sys.argv) == 6 and sys.argv[1] == "--probe":
    print(json.dumps(probe(sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5]))))
