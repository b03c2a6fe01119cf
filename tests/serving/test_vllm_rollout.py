"""Student rollouts through a real in-process vLLM engine (``rollout.backend=vllm``).

One engine for the module's single test (start-up is the slow part): the trainer's own
engine, checked against the Hugging Face backend and the HF student it mirrors.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "trainer"))
from trainer_helpers import tiny_config  # noqa: E402
from vllm_helpers import MEMORY_FRACTION, TINY_VLLM_MODEL, VLLM_SKIP_REASON  # noqa: E402

pytestmark = [
    pytest.mark.skipif(VLLM_SKIP_REASON is not None, reason=f"needs vLLM: {VLLM_SKIP_REASON}"),
    pytest.mark.slow,
]


def _sampled_logprobs_vllm(engine, prompts, seed):
    import vllm

    params = vllm.SamplingParams(temperature=1.0, max_tokens=8, logprobs=0, seed=seed, detokenize=False)
    outputs = engine.llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
    results = []
    for output in outputs:
        completion = output.outputs[0]
        ids = list(completion.token_ids)
        values = [entry[token].logprob for entry, token in zip(completion.logprobs, ids)]
        results.append((ids, torch.tensor(values, dtype=torch.float64)))
    return results


def _sampled_logprobs_hf(model, prompt, ids):
    with torch.no_grad():
        logits = model(torch.tensor([prompt + ids])).logits[0].double()
    logprobs = torch.log_softmax(logits, -1)[len(prompt) - 1 : -1]
    return logprobs.gather(-1, torch.tensor(ids).unsqueeze(-1)).squeeze(-1)


def test_vllm_backend_matches_hf_and_follows_the_optimizer(tmp_path):
    from tcod_fast.trainer import loop
    from tcod_fast.trainer.setup import setup_run
    from tcod_fast.trainer.generators import close_generators, weight_push_metrics

    config = tiny_config(
        tmp_path / "run",
        "rollout.backend=vllm",
        f"rollout.vllm_gpu_memory_utilization={MEMORY_FRACTION}",
        "rollout.temperature=0",
        "curriculum.algorithm=opd",
        f"model.student_tiny={TINY_VLLM_MODEL % 1}",
    )
    run = setup_run(config)
    try:
        # 1. greedy rollouts: the vLLM backend gives the HF backend's trajectories exactly
        from_vllm = loop.rollout(run, 0)
        engine = run.vllm_engines["student"]
        run.config.rollout.backend = "hf"
        from_hf = loop.rollout(run, 0)
        run.config.rollout.backend = "vllm"
        assert len(from_vllm.trajectories) == len(from_hf.trajectories) > 0
        for ours, theirs in zip(from_vllm.trajectories, from_hf.trajectories):
            assert ours.token_ids == theirs.token_ids
            assert ours.turn_ids == theirs.turn_ids
            assert [t.action for t in ours.turns] == [t.action for t in theirs.turns]
        assert engine.last_push_seconds is not None
        assert weight_push_metrics(run) == {"time/weight_push_s": engine.last_push_seconds}

        # 2. one optimiser step, pushed into the engine: its log-probs follow the HF student
        prompts = [list(t.token_ids[:12]) for t in from_vllm.trajectories[:3]]
        import copy

        old_student = copy.deepcopy(run.student).eval()
        scores = loop.score(run, from_vllm)
        run.config.trainer.lr = 1e-2
        for group in run.optimizer.param_groups:
            group["lr"] = 1e-2
        loop.train_on_batch(run, from_vllm, loop.compute_advantages(run, from_vllm, scores))
        engine.push_weights(run.student)
        after = _sampled_logprobs_vllm(engine, prompts, seed=3)
        run.student.eval()
        moved = 0.0
        for prompt, (ids, values) in zip(prompts, after):
            expected = _sampled_logprobs_hf(run.student, prompt, ids)
            torch.testing.assert_close(values, expected, atol=1e-4, rtol=0)
            moved = max(moved, float((expected - _sampled_logprobs_hf(old_student, prompt, ids)).abs().max()))
        assert moved > 1e-3, "the optimiser step did not reach the engine"
    finally:
        close_generators(run)
        run.logger.close()
