"""vLLM against Hugging Face on CPU: rollout tokens/s, the weight push, and the trainer's peak RSS
with the teacher in process or served.

Needs vLLM (the ``.venv-vllm`` of the README). One run measures, on one machine:

1. rollout throughput: the same batch of prompts (random token ids, the same for both), the same
   number of new tokens per prompt (eos ignored), temperature 1, through ``HFGenerator`` (this
   project's batched KV-cache loop) and a vLLM engine (``vllm.LLM.generate``); best of
   ``--repeats`` after one warm-up each;
2. the weight push ``VLLMGenerator.push_weights`` of the student (safetensors + ``reload_weights``);
3. peak RSS of ``tcod-fast train`` (2 steps, ``loss.estimator=topk``) in a child process with the
   teacher in process (``model.teacher_path``) and served (``teacher.server_url``, a vLLM server
   started here and stopped at the end); ``ru_maxrss`` of that child alone (``os.wait4``).

    python benchmarks/run_vllm_rollout.py --out benchmarks/results/cpu_vllm_rollout.json
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent / "tests" / "trainer"))
sys.path.insert(0, str(HERE.parent / "tests" / "serving"))

from run_report import report_header, write_report  # noqa: E402

STUDENT = dict(hidden_size=512, intermediate_size=1408, num_hidden_layers=6, num_attention_heads=8, num_key_value_heads=8)
TEACHER = dict(hidden_size=768, intermediate_size=2048, num_hidden_layers=8, num_attention_heads=12, num_key_value_heads=12)


def _tiny(tokenizer, shape: dict, seed: int):
    from tcod_fast.trainer.build import build_model
    from tcod_fast.tiny_models import TinyModelConfig

    return build_model(None, TinyModelConfig(max_position_embeddings=1024, seed=seed, **shape), tokenizer)


def _child_peak_rss_mb(command: list[str], log: Path) -> tuple[float, int, float]:
    started = time.perf_counter()
    with open(log, "w") as handle:
        process = subprocess.Popen(command, stdout=handle, stderr=subprocess.STDOUT)
        _, status, usage = os.wait4(process.pid, 0)
    return usage.ru_maxrss / 1024, os.waitstatus_to_exitcode(status), time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--prompts", type=int, default=16)
    parser.add_argument("--prompt-tokens", type=int, default=96)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()

    import vllm
    from trainer_helpers import build_toy_tokenizer, tiny_overrides
    from vllm_helpers import VLLMServer

    from tcod_fast.rollout import HFGenerator, SamplingParams, VLLMGenerator

    torch.manual_seed(0)
    tokenizer = build_toy_tokenizer()
    work = Path(tempfile.mkdtemp(prefix="bench-vllm-"))
    student = _tiny(tokenizer, STUDENT, seed=1).eval()
    student_dir = work / "student"
    student.save_pretrained(str(student_dir))
    tokenizer.save_pretrained(str(student_dir))
    prompts = torch.randint(3, len(tokenizer), (args.prompts, args.prompt_tokens)).tolist()
    generated = args.prompts * args.new_tokens
    report = {
        **report_header("cpu"),
        "vllm": vllm.__version__,
        "transformers": __import__("transformers").__version__,
        "torch_threads": torch.get_num_threads(),
        "cpu_flags": sorted(
            flag
            for flag in next(
                (line.split(":", 1)[1].split() for line in Path("/proc/cpuinfo").read_text().splitlines() if line.startswith("flags")),
                [],
            )
            if flag.startswith(("avx", "fma", "amx", "sse4"))
        ),
        "commit": subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, cwd=HERE).stdout.strip(),
        "student_params": sum(p.numel() for p in student.parameters()),
        "batch": {"prompts": args.prompts, "prompt_tokens": args.prompt_tokens, "new_tokens": args.new_tokens},
    }

    # 1. rollout throughput
    hf = HFGenerator(student, tokenizer, eos_token_ids=(-1,))  # no eos: every prompt gets new_tokens
    params = SamplingParams(temperature=1.0, max_new_tokens=args.new_tokens, seed=0)
    hf_times = []
    for repeat in range(args.repeats + 1):
        started = time.perf_counter()
        outputs = hf.generate(prompts, params)
        elapsed = time.perf_counter() - started
        assert sum(len(o.token_ids) for o in outputs) == generated
        if repeat:
            hf_times.append(elapsed)
    started = time.perf_counter()
    engine = VLLMGenerator(
        str(student_dir), tokenizer, dtype="float32", gpu_memory_utilization=0.05, max_model_len=1024,
        enforce_eager=True, seed=0,
    )
    engine_start = time.perf_counter() - started
    vllm_params = vllm.SamplingParams(temperature=1.0, max_tokens=args.new_tokens, ignore_eos=True, seed=0, detokenize=False)
    vllm_times = []
    for repeat in range(args.repeats + 1):
        started = time.perf_counter()
        outputs = engine.llm.generate([{"prompt_token_ids": p} for p in prompts], vllm_params, use_tqdm=False)
        elapsed = time.perf_counter() - started
        assert sum(len(o.outputs[0].token_ids) for o in outputs) == generated
        if repeat:
            vllm_times.append(elapsed)
    # 2. weight push
    pushes = [engine.push_weights(student) for _ in range(args.repeats)]
    engine.close()
    report["rollout"] = {
        "generated_tokens": generated,
        "hf_seconds": hf_times,
        "vllm_seconds": vllm_times,
        "hf_tokens_per_s": generated / min(hf_times),
        "vllm_tokens_per_s": generated / min(vllm_times),
        "vllm_engine_start_s": engine_start,
        "weight_push_seconds": pushes,
        "weight_push_mb": sum(p.numel() * p.element_size() for p in student.parameters()) / 2**20,
    }
    print(report["rollout"], flush=True)

    # 3. trainer peak RSS: teacher in process vs served
    teacher = _tiny(tokenizer, TEACHER, seed=2)
    teacher_dir = work / "teacher"
    teacher.save_pretrained(str(teacher_dir))
    tokenizer.save_pretrained(str(teacher_dir))
    report["teacher_params"] = sum(p.numel() for p in teacher.parameters())
    del teacher
    student_shape = "{" + ", ".join(f"{k}: {v}" for k, v in STUDENT.items()) + ", max_position_embeddings: 1024, seed: 1}"

    def train_command(out: Path, *extra: str) -> list[str]:
        overrides = tiny_overrides(
            out, f"model.tokenizer_path={teacher_dir}", f"model.student_tiny={student_shape}",
            "loss.estimator=topk", "curriculum.algorithm=opd", "eval.num_tasks=0", *extra,
        )
        return [sys.executable, "-m", "tcod_fast.cli", "train", *[a for o in overrides for a in ("--set", o)]]

    rss = {}
    rss["in_process_mb"], code, seconds = _child_peak_rss_mb(
        train_command(work / "in-process", f"model.teacher_path={teacher_dir}"), work / "in-process.log"
    )
    assert code == 0, (work / "in-process.log").read_text()[-2000:]
    rss["in_process_train_s"] = seconds
    server = VLLMServer(teacher_dir, work / "server.log", memory_fraction=0.15)
    try:
        rss["served_mb"], code, seconds = _child_peak_rss_mb(
            train_command(work / "served", f"teacher.server_url={server.url}"), work / "served.log"
        )
        assert code == 0, (work / "served.log").read_text()[-2000:]
        rss["served_train_s"] = seconds
    finally:
        server.stop()
    report["trainer_peak_rss"] = rss
    print(rss, flush=True)
    write_report(report, args.out)
    shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
