"""``fused_linear_turn_kl``: exact teacher-student divergence from hidden states and LM heads.

Same results, statistics, masks and reductions as ``fused_turn_kl`` on
``hidden @ weight.T + bias``, without ever materialising the ``tokens x vocab`` logits.

Files: ``reference.py`` (float64 yardstick: materialised logits + ``turn_kl_reference``),
``chunked.py`` (``backend="torch"``: chunked over rows and vocabulary, any device, with the row
math in ``fused_turn_kl``'s native or Triton row kernel where one runs), ``triton_backend.py``
(GPU, or CPU under ``TRITON_INTERPRET=1``), ``api.py`` (validation, masks, reductions, autograd
and ``torch.library`` registration). The LM-head checks, row gather and autograd are
``tcod_fast/ops/linear_head.py``, shared with ``fused_linear_topk_turn_kl``.
"""

from tcod_fast.ops.fused_linear_turn_kl.api import fused_linear_turn_kl
from tcod_fast.ops.fused_linear_turn_kl.reference import fused_linear_turn_kl_reference

__all__ = ["fused_linear_turn_kl", "fused_linear_turn_kl_reference"]
