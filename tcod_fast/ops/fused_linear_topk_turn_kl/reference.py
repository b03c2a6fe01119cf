"""Float64 reference of ``fused_linear_topk_turn_kl``: materialise the logits, then ``topk_turn_kl_reference``.

Slow and memory hungry on purpose (a float64 ``N x V`` logits tensor and everything the top-k
reference builds on it); it is the yardstick for the chunked pass and shares no code with its row
gathering, slab reuse or reductions.

Its signature repeats ``fused_linear_topk_turn_kl``'s (and has the shape of
``fused_linear_turn_kl``'s) so that a call of the op replays on the reference unchanged; only the
body differs.
"""

from __future__ import annotations

import torch

from tcod_fast.ops.fused_linear_turn_kl.reference import materialise_logits
from tcod_fast.ops.topk_turn_kl.reference import topk_turn_kl_reference


def fused_linear_topk_turn_kl_reference(
    student_hidden: torch.Tensor,
    student_weight: torch.Tensor,
    teacher_topk_ids: torch.Tensor,
    teacher_topk_logprobs: torch.Tensor,
    turn_ids: torch.Tensor | None = None,
    *,
    student_bias: torch.Tensor | None = None,
    **options,
):
    """Float64 reference of ``fused_linear_topk_turn_kl``: the float64 logits ``h @ W.T + b`` of
    ``student_hidden`` ``(B, T, H)`` or ``(N, H)``, ``student_weight`` ``(V, H)`` and
    ``student_bias`` ``(V,)`` or None, then :func:`topk_turn_kl_reference` on them with the
    teacher's top-k, ``turn_ids`` and ``**options`` (backend-only keywords such as
    ``chunk_size`` are ignored there; ``softcap`` and ``logit_scale`` map the float64 student
    logits there). Gradients reach the hidden states, weight and bias."""
    logits = materialise_logits(student_hidden, student_weight, student_bias)
    return topk_turn_kl_reference(logits, teacher_topk_ids, teacher_topk_logprobs, turn_ids, **options)
