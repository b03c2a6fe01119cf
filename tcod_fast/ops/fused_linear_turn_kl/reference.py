"""Float64 reference of ``fused_linear_turn_kl``: materialise the logits, then ``turn_kl_reference``.

Slow and memory hungry on purpose (two float64 ``N x V`` logits tensors and everything the
logits reference builds on them); it is the yardstick for the fused backends and shares no
code with their row gathering, vocabulary streaming or reductions.

Its signature repeats ``fused_linear_turn_kl``'s (and has the shape of
``fused_linear_topk_turn_kl``'s) so that a call of the op replays on the reference unchanged; only
the body differs.
"""

from __future__ import annotations

import torch

from tcod_fast.ops.turn_kl.reference import turn_kl_reference


def materialise_logits(hidden, weight, bias=None, dtype=torch.float64):
    """``hidden @ weight.T + bias`` computed in ``dtype`` (float64 by default), shaped ``(..., V)``."""
    logits = hidden.to(dtype) @ weight.to(dtype).t()
    if bias is not None:
        logits = logits + bias.to(dtype)
    return logits


def fused_linear_turn_kl_reference(
    student_hidden: torch.Tensor,
    student_weight: torch.Tensor,
    teacher_hidden: torch.Tensor,
    teacher_weight: torch.Tensor,
    turn_ids: torch.Tensor | None = None,
    *,
    student_bias: torch.Tensor | None = None,
    teacher_bias: torch.Tensor | None = None,
    **options,
):
    """Float64 reference with the semantics of ``fused_linear_turn_kl``: float64 logits
    ``h @ W.T + b`` of both heads, then :func:`~tcod_fast.ops.turn_kl.reference.turn_kl_reference`
    with the same ``**options`` (backend-only keywords such as ``chunk_size`` are ignored there;
    ``softcap`` and ``logit_scale`` map the float64 logits there, with autograd through the map).

    Gradients reach ``student_hidden``, ``student_weight`` and ``student_bias`` through autograd
    (in their own dtypes); the teacher side is detached. No input validation.
    """
    student_logits = materialise_logits(student_hidden, student_weight, student_bias)
    with torch.no_grad():
        teacher_logits = materialise_logits(teacher_hidden, teacher_weight, teacher_bias)
    return turn_kl_reference(student_logits, teacher_logits, turn_ids, **options)
