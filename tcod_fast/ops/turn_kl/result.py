"""The result object of :func:`tcod_fast.fused_turn_kl` with ``return_stats=True``."""

from __future__ import annotations

from dataclasses import dataclass, fields

import torch

from tcod_fast.ops.common import DIVERGENCES, REDUCTIONS  # noqa: F401  (their home is common.py)


@dataclass
class TurnKLResult:
    """Everything one pass over the logits yields.

    Per-token tensors have the logits' leading shape (``(B, T)`` or ``(N,)``) and hold 0 at
    dropped tokens (``turn_id < 0`` or outside the window). Per-turn tensors are shaped
    ``(B, num_turns)`` (``B = 1`` for ``(N, V)`` inputs) and only count kept tokens.

    Attributes:
        loss: the reduced loss (scalar, or per-token for ``reduction="none"``); carries grad.
        kl: per-token divergence of the chosen kind (reverse KL, forward KL or JSD), float32,
            unweighted (turn weights only enter ``loss``). Carries grad to the student logits.
        entropy: per-token student entropy ``H(p)``, float32.
        token_kept: bool mask of the tokens that took part.
        student_logprob, teacher_logprob: ``log p(a)``, ``log q(a)`` of ``target_ids`` (float32);
            ``None`` when no ``target_ids`` were given.
        turn_token_count: kept tokens per (sequence, turn), float32.
        turn_kl_sum: sum of ``kl`` per (sequence, turn).
        turn_entropy_sum: sum of ``entropy`` per (sequence, turn).
        turn_abs_logratio_sum: sum of ``|log p(a) - log q(a)|`` per (sequence, turn) (T-DUR's d_k
            numerator); ``None`` without ``target_ids``.
        turn_neg_logprob_sum: sum of ``-log p(a)`` per (sequence, turn) (T-DUR's h_k numerator);
            ``None`` without ``target_ids``.
    """

    loss: torch.Tensor
    kl: torch.Tensor
    entropy: torch.Tensor
    token_kept: torch.Tensor
    turn_token_count: torch.Tensor
    turn_kl_sum: torch.Tensor
    turn_entropy_sum: torch.Tensor
    student_logprob: torch.Tensor | None = None
    teacher_logprob: torch.Tensor | None = None
    turn_abs_logratio_sum: torch.Tensor | None = None
    turn_neg_logprob_sum: torch.Tensor | None = None

    def turn_kl_mean(self) -> torch.Tensor:
        """Mean KL per (sequence, turn); 0 where a turn has no kept token."""
        return self.turn_kl_sum / self.turn_token_count.clamp_min(1)

    def as_dict(self) -> dict:
        return {f.name: getattr(self, f.name) for f in fields(self)}
