"""How far the sparse-teacher divergence is from the exact full-vocabulary one, as a function of K.

    python benchmarks/topk_bias.py --out benchmarks/results/cpu_topk_bias.json

No model can be downloaded here, so the distributions are synthetic but shaped like a language
model's next-token distributions over the Qwen2.5 vocabulary (V = 151936): the teacher's logits
fall off as a power of the rank, ``-s log(1 + rank)`` plus N(0, 0.5) noise, with a Zipf exponent
``s`` drawn per token from U(1.2, 3), which puts 40% / 60% / 74% of the mass on the top token
(quartiles over the tokens) and a long tail on the rest. The student is the teacher's logits scaled by 0.8 plus N(0, 1)
noise on every entry: close on the head, with more mass in the tail than the teacher, as a
student part-way through distillation is.

For K in {1, 5, 20, 64, 256} it reports, over the tokens, the mean exact divergence, the mean
top-K divergence with ``tail="bucket"`` and ``tail="renormalize"``, the mean relative error, and
the mean cosine between the top-K gradient w.r.t. the student logits and the exact one. All in
float64 (the torch backend's row math on float64 logits; the exact values from full softmaxes).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from run_report import report_header, tiny_defaults, write_report  # noqa: E402

from tcod_fast.ops.topk import prepare_topk  # noqa: E402
from tcod_fast.ops.topk_turn_kl.torch_backend import rows_forward  # noqa: E402


def make_distributions(rows: int, vocab: int, seed: int):
    gen = torch.Generator().manual_seed(seed)
    exponent = 1.2 + 1.8 * torch.rand(rows, 1, generator=gen, dtype=torch.float64)
    ranks = torch.stack([torch.randperm(vocab, generator=gen) for _ in range(rows)]).double()
    teacher = -exponent * torch.log1p(ranks) + 0.5 * torch.randn(rows, vocab, generator=gen, dtype=torch.float64)
    student = 0.8 * teacher + torch.randn(rows, vocab, generator=gen, dtype=torch.float64)
    return student, teacher


def exact(student, teacher, divergence):
    log_p = torch.log_softmax(student, -1)
    log_q = torch.log_softmax(teacher, -1)
    p, q = log_p.exp(), log_q.exp()
    if divergence == "reverse_kl":
        kl = (p * (log_p - log_q)).sum(-1)
        grad = p * (log_p - log_q - kl[:, None])
    else:
        kl = (q * (log_q - log_p)).sum(-1)
        grad = p - q
    return kl, grad


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=256)
    parser.add_argument("--vocab", type=int, default=151936)
    parser.add_argument("--k", type=int, nargs="+", default=[1, 5, 20, 64, 256])
    parser.add_argument("--chunk", type=int, default=16)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path)
    tiny_defaults(parser, rows=8, vocab=1031, k=[1, 5], chunk=4)
    args = parser.parse_args(argv)

    sums: dict = {}
    top1_mass = []
    for start in range(0, args.rows, args.chunk):
        rows = min(args.chunk, args.rows - start)
        student, teacher = make_distributions(rows, args.vocab, args.seed + start)
        teacher_logp = torch.log_softmax(teacher, -1)
        top1_mass.append(teacher_logp.max(-1).values.exp())
        keep = torch.ones(1, rows, dtype=torch.bool)
        for divergence in ("reverse_kl", "forward_kl"):
            kl, grad = exact(student, teacher, divergence)
            entry = sums.setdefault(divergence, {"exact": 0.0})
            entry["exact"] += float(kl.sum())
            for k in args.k:
                logprobs, ids = teacher_logp.topk(k, -1)
                ids_sorted, logprobs_sorted = prepare_topk(ids[None], logprobs[None], keep, args.vocab, torch.float64)
                for tail in ("bucket", "renormalize"):
                    div, _, _, _, g = rows_forward(
                        student, ids_sorted[0], logprobs_sorted[0], divergence, 0.5, tail, 1e-6, False, True, None
                    )
                    cos = (g * grad).sum(-1) / (g.norm(dim=-1) * grad.norm(dim=-1)).clamp_min(1e-300)
                    key = f"K={k}"
                    acc = entry.setdefault(key, {}).setdefault(tail, {"value": 0.0, "abs_rel_error": 0.0, "grad_cosine": 0.0})
                    acc["value"] += float(div.sum())
                    acc["abs_rel_error"] += float(((div - kl).abs() / kl).sum())
                    acc["grad_cosine"] += float(cos.sum())
        print(f"rows {start + rows}/{args.rows}", flush=True)

    n = args.rows
    results = {}
    for divergence, entry in sums.items():
        results[divergence] = {"mean_exact": entry["exact"] / n}
        for key, tails in entry.items():
            if key == "exact":
                continue
            results[divergence][key] = {
                tail: {name: value / n for name, value in acc.items()} for tail, acc in tails.items()
            }
    mass = torch.cat(top1_mass)
    report = {
        **report_header("cpu"),
        "N": n, "V": args.vocab, "seed": args.seed,
        "distributions": "synthetic, see benchmarks/topk_bias.py: teacher -s log(1 + rank) + N(0, 0.5), "
                         "s ~ U(1.2, 3); student 0.8 teacher + N(0, 1)",
        "teacher_top1_mass_quartiles": [float(x) for x in mass.quantile(torch.tensor([0.25, 0.5, 0.75], dtype=mass.dtype))],
        "results": results,
    }
    for divergence, entry in results.items():
        print(divergence, "exact", round(entry["mean_exact"], 4))
        for key in (f"K={k}" for k in args.k):
            print("  ", key, {tail: {m: round(v, 4) for m, v in acc.items()} for tail, acc in entry[key].items()})
    write_report(report, args.out)
    return report


if __name__ == "__main__":
    main()
