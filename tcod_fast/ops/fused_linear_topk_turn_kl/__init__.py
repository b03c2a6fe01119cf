"""``fused_linear_topk_turn_kl``: the sparse-teacher divergence from hidden states and the LM head.

Same results, statistics, masks and reductions as ``fused_topk_turn_kl`` on
``hidden @ weight.T + bias``, without ever materialising the ``tokens x vocab`` logits.

Files: ``reference.py`` (float64 yardstick: materialised logits + ``topk_turn_kl_reference``),
``chunked.py`` (the pass: chunks of kept rows, the row math in ``fused_topk_turn_kl``'s native,
Triton or torch row kernel, chosen by ``backend``), ``api.py`` (validation, masks, reductions,
autograd and ``torch.library`` registration).
"""

from tcod_fast.ops.fused_linear_topk_turn_kl.api import fused_linear_topk_turn_kl
from tcod_fast.ops.fused_linear_topk_turn_kl.reference import fused_linear_topk_turn_kl_reference

__all__ = ["fused_linear_topk_turn_kl", "fused_linear_topk_turn_kl_reference"]
