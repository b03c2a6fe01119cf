"""How well does the sampled-token OPD estimator point where the exact divergence points?

On the demo's students and teachers (``--demo DIR``, the output folder of ``tcod-fast demo``),
for one rollout batch per student seed, every trained position ``t`` of the student's own
episodes gives, in logit space (``p`` the student's softmax, ``q`` the teacher's, ``pi`` the
distribution the rollout samples from: ``p`` at the rollout temperature):

* the exact reverse-KL gradient ``g_rev = p * (log p - log q - KL(p||q))`` and the forward-KL
  gradient ``g_fwd = p - q`` (what the full-vocabulary formulation descends);
* the sampled estimator's gradient for a token ``a ~ pi``: ``-A_a (e_a - p)`` with the k1
  advantage ``A_a = log q_a - log p_a`` (the papers' formulation at a PPO ratio of 1), its
  exact expectation over ``a ~ pi`` and its variance.

Each is taken to parameter space with one backward pass through the student (a vector-Jacobian
product), and the script reports, per rollout temperature:

* ``bias``: the cosine between the estimator's expected gradient and the exact reverse-KL one
  (1 when ``pi = p``; lower when the rollout temperature differs from the one the log-probs
  are taken at);
* ``cosine_by_draws``: the cosine between the exact reverse-KL gradient and the average of
  ``k`` independent single-token draws at every position (``k = 1`` is one training batch;
  ``k`` draws stand for ``k`` times as many episodes), mean over repeats;
* ``decision_share``: the share of trained positions where the teacher puts less than 0.9 on
  its top token, and the share of the exact divergence those positions hold.

Writes one JSON file (``--out``), with the machine, versions and commit.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import torch
from run_report import report_header, write_report

from tcod_fast.demo import demo_settings, run_config
from tcod_fast.trainer import loop
from tcod_fast.trainer.loss import forward_models, pack_micro_batch
from tcod_fast.trainer.setup import setup_run


def _flat_grad(model: torch.nn.Module) -> torch.Tensor:
    grads = [p.grad.reshape(-1) if p.grad is not None else torch.zeros(p.numel()) for p in model.parameters()]
    return torch.cat(grads).clone()


def _parameter_gradient(run, logits: torch.Tensor, logit_grad: torch.Tensor) -> torch.Tensor:
    """``J^T logit_grad``: the student's parameter gradient for a logit-space gradient."""
    run.student.zero_grad(set_to_none=True)
    logits.backward(logit_grad, retain_graph=True)
    return _flat_grad(run.student)


def _cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(torch.nn.functional.cosine_similarity(a.double(), b.double(), dim=0))


def probe(run, batch, temperature: float, draws: int, repeats: int, generator: torch.Generator) -> dict:
    packed = pack_micro_batch(
        batch.trajectories, batch.plans, context_mode=run.config.env.context_mode,
        pad_token_id=run.tokenizer.pad_token_id, num_turns=run.max_turns,
    )  # fmt: skip
    outputs = forward_models(run.student, run.teacher, packed)
    logits = outputs.student  # (R, T, V), with grad
    trained = packed.trained
    count = float(trained.sum())
    with torch.no_grad():
        logp = torch.log_softmax(logits.double(), -1)
        logq = torch.log_softmax(outputs.teacher.double(), -1)
        p, q = logp.exp(), logq.exp()
        kl = (p * (logp - logq)).sum(-1, keepdim=True)
        mask = trained.unsqueeze(-1).double() / count  # the token mean over trained positions
        g_rev = p * (logp - logq - kl) * mask
        g_fwd = (p - q) * mask
        pi = torch.softmax(logits.double() / temperature, -1)
        advantage = logq - logp  # k1, for every possible token
        # E_{a~pi}[-A_a (e_a - p)] = -(pi * A) + p * sum(pi * A)
        expected = (-(pi * advantage) + p * (pi * advantage).sum(-1, keepdim=True)) * mask
        teacher_top = q.max(-1).values
        decision = trained & (teacher_top < 0.9)
        kl_tokens = kl.squeeze(-1)
    grad_rev = _parameter_gradient(run, logits, g_rev.float())
    grad_fwd = _parameter_gradient(run, logits, g_fwd.float())
    grad_expected = _parameter_gradient(run, logits, expected.float())

    def one_draw() -> torch.Tensor:
        flat = pi.reshape(-1, pi.shape[-1])
        tokens = torch.multinomial(flat.float(), 1, generator=generator).reshape(pi.shape[:-1])
        onehot = torch.nn.functional.one_hot(tokens, pi.shape[-1]).double()
        a = advantage.gather(-1, tokens.unsqueeze(-1))
        return (-a * (onehot - p)) * mask

    cosines: dict[int, list[float]] = {}
    for _ in range(repeats):
        total = torch.zeros_like(p)
        k = 0
        for power in range(int(math.log2(draws)) + 1):
            while k < 2**power:
                total += one_draw()
                k += 1
            grad = _parameter_gradient(run, logits, (total / k).float())
            cosines.setdefault(k, []).append(_cosine(grad, grad_rev))
    run.student.zero_grad(set_to_none=True)
    return {
        "rollout_temperature": temperature,
        "episodes": len(batch.trajectories),
        "trained_tokens": int(count),
        "bias_cosine_expected_vs_reverse_kl": _cosine(grad_expected, grad_rev),
        "cosine_forward_vs_reverse_kl": _cosine(grad_fwd, grad_rev),
        "cosine_by_draws": {str(k): sum(v) / len(v) for k, v in cosines.items()},
        "decision_share_of_positions": float(decision.sum()) / count,
        "decision_share_of_kl": float(kl_tokens[decision].sum() / kl_tokens[trained].sum()),
        "mean_kl": float(kl_tokens[trained].mean()),
    }


def _quantiles(values: list[float]) -> dict:
    ordered = sorted(values)

    def at(q: float) -> float:
        return ordered[min(int(q * (len(ordered) - 1) + 0.5), len(ordered) - 1)]

    return {"q25": at(0.25), "median": at(0.5), "q75": at(0.75)}


def summarise(rows: list[dict]) -> dict:
    """Per rollout temperature, over every (seed, batch): the expected estimator's bias and
    the quartiles of the cosine to the exact gradient by the number of draws averaged."""
    summary = {}
    for temperature in sorted({r["rollout_temperature"] for r in rows}):
        mine = [r for r in rows if r["rollout_temperature"] == temperature]
        draws = sorted({int(k) for r in mine for k in r["cosine_by_draws"]})
        summary[str(temperature)] = {
            "batches": len(mine),
            "bias_cosine_expected_vs_reverse_kl": _quantiles([r["bias_cosine_expected_vs_reverse_kl"] for r in mine]),
            "cosine_by_draws": {str(k): _quantiles([r["cosine_by_draws"][str(k)] for r in mine]) for k in draws},
            "trained_tokens": _quantiles([r["trained_tokens"] for r in mine]),
            "decision_share_of_positions": _quantiles([r["decision_share_of_positions"] for r in mine]),
        }
    return summary


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--demo", type=Path, required=True, help="output folder of tcod-fast demo (its models)")
    parser.add_argument("--seeds", default="0,1,2", help="student seeds (their starts must be in --demo)")
    parser.add_argument("--temperatures", default="0.6,1.0")
    parser.add_argument("--draws", type=int, default=64, help="largest number of draws averaged (a power of 2)")
    parser.add_argument("--repeats", type=int, default=8, help="independent draws sets per batch (default: %(default)s)")
    parser.add_argument("--batches", type=int, default=4, help="rollout batches per seed and temperature (default: %(default)s)")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    settings = demo_settings("default")
    started = time.perf_counter()
    rows = []
    for seed in [int(s) for s in args.seeds.split(",")]:
        for temperature in [float(t) for t in args.temperatures.split(",")]:
            config = run_config(settings, args.demo, "robust", "opd", seed)
            config.trainer.output_dir = str(args.out.parent / f".probe_seed{seed}")
            config.rollout.temperature = temperature
            run = setup_run(config)
            with run.closing():
                for index in range(args.batches):  # the batches of the first steps (other tasks each)
                    batch = loop.rollout(run, index)
                    row = probe(run, batch, temperature, args.draws, args.repeats, torch.Generator().manual_seed(seed * 100 + index))
                    row.update(seed=seed, batch=index)
                    rows.append(row)
                    print(json.dumps(row), flush=True)
    report = {**report_header("cpu"), "seconds": time.perf_counter() - started, "summary": summarise(rows), "rows": rows}
    write_report(report, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
