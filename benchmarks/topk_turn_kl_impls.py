"""The implementations the ``fused_topk_turn_kl`` benchmarks compare, all computing one loss:
token-mean reverse KL between the student and a top-k teacher with a tail bucket.

* ``fused-<backend>``: ``tcod_fast.fused_topk_turn_kl`` (``tail="bucket"``).
* ``trl-eager``: the same loss written the way TRL's server-backed distillation computes it:
  the full float32 ``log_softmax`` of the student, a gather at the teacher's top-k ids, a tail
  entry ``log(1 - sum)`` appended on both sides (``logsumexp`` clamped below 0, then
  ``log(-expm1)``), the divergence over the K+1 entries under a support mask, a token mean;
  autograd for the gradient. Plain torch, as people write it today.
* ``trl-compiled``: ``torch.compile`` of ``trl-eager`` (the strongest CPU peer).
* ``full-logits-<backend>``: ``tcod_fast.fused_turn_kl`` with the teacher's full logits (what
  the sparse op replaces when the teacher fits in the process).

Every implementation takes ``(student_logits (N, V), case)`` where ``case`` holds the teacher's
top-k ids and log-probs ``(N, K)`` and its full logits ``(N, V)``, and returns the scalar loss
with a graph to ``student_logits``.
"""

from __future__ import annotations

import functools

import torch

from tcod_fast import fused_topk_turn_kl, fused_turn_kl


def trl_style_topk_reverse_kl(student_logits, topk_ids, topk_logprobs):
    log_p = torch.log_softmax(student_logits.float(), dim=-1)
    valid = topk_ids >= 0
    ids = torch.where(valid, topk_ids, torch.zeros_like(topk_ids))
    minus_inf = torch.full((), float("-inf"), dtype=log_p.dtype, device=log_p.device)
    student_k = torch.where(valid, log_p.gather(-1, ids), minus_inf)
    teacher_k = torch.where(valid, topk_logprobs.to(log_p.dtype), minus_inf)

    def with_tail(log_probs):
        covered = torch.logsumexp(log_probs, dim=-1, keepdim=True).clamp(max=-1e-7)
        return torch.cat([log_probs, torch.log(-torch.expm1(covered))], dim=-1)

    student_all, teacher_all = with_tail(student_k), with_tail(teacher_k)
    support = torch.cat([valid, torch.ones_like(valid[..., :1])], dim=-1)
    safe_student = torch.where(support, student_all, torch.zeros_like(student_all))
    safe_teacher = torch.where(support, teacher_all, torch.zeros_like(teacher_all))
    p = torch.where(support, student_all.exp(), torch.zeros_like(student_all))
    per_entry = torch.nan_to_num(p * (safe_student - safe_teacher), nan=0.0)
    return per_entry.sum(-1).mean()


@functools.lru_cache(maxsize=None)
def compiled_trl_style():
    return torch.compile(trl_style_topk_reverse_kl, dynamic=False)


def fused(backend: str):
    def run(student_logits, case):
        return fused_topk_turn_kl(student_logits, case["ids"], case["logprobs"], backend=backend)

    return run


def full_logits(backend: str):
    def run(student_logits, case):
        return fused_turn_kl(student_logits, case["teacher_logits"], backend=backend)

    return run


def implementations(device: str) -> dict:
    peers = {
        "trl-eager": lambda s, case: trl_style_topk_reverse_kl(s, case["ids"], case["logprobs"]),
        "trl-compiled": lambda s, case: compiled_trl_style()(s, case["ids"], case["logprobs"]),
    }
    if device == "cpu":
        return {"fused-native": fused("native"), "fused-torch": fused("torch"), **peers,
                "full-logits-native": full_logits("native")}
    return {"fused-triton": fused("triton"), **peers, "full-logits-triton": full_logits("triton")}


def make_case(rows: int, vocab: int, k: int, dtype, device, seed: int = 0) -> dict:
    """Teacher logits ~ N(0, 2) and their top-k log-probs (float32, as a server returns them)."""
    gen = torch.Generator(device="cpu").manual_seed(seed)
    teacher = torch.empty(rows, vocab, dtype=torch.float32).normal_(0, 2, generator=gen)
    logprobs, ids = torch.log_softmax(teacher, dim=-1).topk(k, dim=-1)
    return {"ids": ids.to(device), "logprobs": logprobs.to(device), "teacher_logits": teacher.to(dtype).to(device)}


def forward_backward(impl, student_logits, case):
    loss = impl(student_logits, case)
    loss.backward()
    return loss
