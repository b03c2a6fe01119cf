"""tcod-fast: fused exact teacher-student KL kernels and a multi-turn OPD trainer.

Public kernel API (see each function's docstring for shapes, dtypes and reductions):

* :func:`fused_turn_kl` -- exact full-vocabulary reverse KL / forward KL / JSD from
  student and teacher logits, one streaming pass, turn masks and per-turn statistics.
"""

from tcod_fast.ops.turn_kl import TurnKLResult, fused_turn_kl, turn_kl_reference

__all__ = ["fused_turn_kl", "turn_kl_reference", "TurnKLResult"]
__version__ = "0.1.0"
