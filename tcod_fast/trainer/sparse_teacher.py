"""The teacher as a top-K map per token: from a served teacher, or from the in-process one.

A teacher behind an inference server returns, per position, only its top-K log-probs and
the log-prob of the token that is there. The loss then takes the teacher's side from those:

* ``loss.estimator="topk"``: the OPD term is ``fused_topk_turn_kl`` between the student's
  full distribution and the teacher's top-K (plus one tail outcome);
* ``loss.estimator="sampled"``: the PPO advantage uses the teacher's exact log-prob of each
  sampled token (appended to the top-K map as one more id, so ``fused_topk_turn_kl``'s
  statistics carry it as ``teacher_logprob``).

Shapes: ``R`` rows, ``T`` positions, ``K`` = ``teacher.top_k``; the maps are ``(R, T, K+1)``:
the teacher's top-K ids of the token each position predicts, then the target token itself
(``-1`` when it is already among the K).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

__all__ = [
    "SparseTeacher",
    "in_process_sparse_teacher",
    "served_sparse_teacher",
    "sparse_teacher_maps",
]


@dataclass
class SparseTeacher:
    """The teacher's top-K maps of a packed micro-batch.

    Attributes:
        topk_ids: ``(R, T, K+1)`` int64, ``-1`` padding (and everywhere at untrained positions).
        topk_logprobs: ``(R, T, K+1)`` float32 log-probs of ``topk_ids`` (0 at padding).
    """

    topk_ids: torch.Tensor
    topk_logprobs: torch.Tensor


def _append_target(topk_ids, topk_logprobs, target_ids, target_logprobs, trained) -> SparseTeacher:
    """Add each target token as one more id unless it is among the top-K; blank untrained
    positions."""
    present = (topk_ids == target_ids.unsqueeze(-1)).any(-1)
    extra_ids = torch.where(present, torch.full_like(target_ids, -1), target_ids)
    extra_logprobs = torch.where(present, torch.zeros_like(target_logprobs), target_logprobs)
    ids = torch.cat([topk_ids, extra_ids.unsqueeze(-1)], dim=-1)
    logprobs = torch.cat([topk_logprobs, extra_logprobs.unsqueeze(-1)], dim=-1)
    ids = torch.where(trained.unsqueeze(-1), ids, torch.full_like(ids, -1))
    logprobs = torch.where(trained.unsqueeze(-1), logprobs, torch.zeros_like(logprobs))
    return SparseTeacher(topk_ids=ids, topk_logprobs=logprobs.float())


@torch.no_grad()
def in_process_sparse_teacher(teacher_logits: torch.Tensor, packed, top_k: int) -> SparseTeacher:
    """Top-K maps from in-process teacher logits ``(R, T, V)`` (what a server would return)."""
    logprobs = torch.log_softmax(teacher_logits.float(), dim=-1)
    values, ids = logprobs.topk(min(top_k, logprobs.shape[-1]), dim=-1)
    target_logprobs = logprobs.gather(-1, packed.target_ids.unsqueeze(-1)).squeeze(-1)
    return _append_target(ids, values, packed.target_ids, target_logprobs, packed.trained)


def served_sparse_teacher(teacher, packed) -> SparseTeacher:
    """Top-K maps of ``packed`` from a :class:`~tcod_fast.rollout.served_teacher.ServedTeacher`:
    each sequence is scored on its own (a padded row from column 0, or a padding-free row's
    span between two ``cu_seqlens`` bounds). Only sequences with a trained token are sent."""
    trained = packed.trained.cpu()
    input_ids = packed.model_inputs["input_ids"].cpu()
    if packed.cu_seqlens is None:
        lengths = packed.model_inputs["attention_mask"].sum(-1).cpu().tolist()
        spans = [(row, 0, int(length)) for row, length in enumerate(lengths)]
    else:
        bounds = packed.cu_seqlens.cpu().tolist()
        spans = [(0, start, end - start) for start, end in zip(bounds[:-1], bounds[1:])]
    rows, positions = input_ids.shape
    top_k = teacher.top_k
    topk_ids = torch.full((rows, positions, top_k), -1, dtype=torch.int64)
    topk_logprobs = torch.zeros((rows, positions, top_k), dtype=torch.float32)
    target_logprobs = torch.zeros((rows, positions), dtype=torch.float32)
    asked = [(row, start, length) for row, start, length in spans if bool(trained[row, start : start + length].any())]
    scores = teacher.score([input_ids[row, start : start + length].tolist() for row, start, length in asked])
    for (row, start, length), score in zip(asked, scores):
        # logits at position t predict token t + 1: shift the per-token scores by one.
        span = slice(start, start + length - 1)
        topk_ids[row, span] = score.topk_ids[1:]
        topk_logprobs[row, span] = score.topk_logprobs[1:]
        target_logprobs[row, span] = score.token_logprobs[1:]
    sparse = _append_target(topk_ids, topk_logprobs, packed.target_ids.cpu(), target_logprobs, trained)
    device = packed.target_ids.device
    return SparseTeacher(topk_ids=sparse.topk_ids.to(device), topk_logprobs=sparse.topk_logprobs.to(device))


def sparse_teacher_maps(run, teacher, outputs, packed) -> SparseTeacher | None:
    """The top-K maps of ``packed`` of ``teacher`` (the micro-batch's,
    :class:`~tcod_fast.trainer.setup.Teacher`): from its server when served, else from its
    logits (``outputs.teacher``, ``teacher.top_k`` ids per position); ``None`` without any
    teacher."""
    if teacher.served is not None:
        return served_sparse_teacher(teacher.served, packed)
    if outputs.teacher is not None:
        return in_process_sparse_teacher(outputs.teacher, packed, run.config.teacher.top_k)
    return None
