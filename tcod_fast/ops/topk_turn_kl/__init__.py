"""``fused_topk_turn_kl`` and ``fused_linear_topk_turn_kl``: divergence to a sparse teacher.

For teachers behind an inference server that returns only each token's top-k log-probs.

Files: ``reference.py`` (float64 yardstick for both entry points), ``topk.py`` (checks and
sorting of the teacher's top-k), ``torch_backend.py`` (chunked PyTorch, and the statement of the
math), ``native_backend.py`` (C++/OpenMP, ``csrc/topk_turn_kl_cpu.cpp``), ``triton_backend.py``
(GPU, or CPU under ``TRITON_INTERPRET=1``), ``api.py`` (``fused_topk_turn_kl``: validation, masks,
reductions, autograd and ``torch.library`` registration), ``fused_linear.py``
(``fused_linear_topk_turn_kl``: the same from hidden states and the LM head, a chunk of logits at
a time).
"""

from tcod_fast.ops.topk_turn_kl.api import fused_topk_turn_kl
from tcod_fast.ops.topk_turn_kl.fused_linear import fused_linear_topk_turn_kl
from tcod_fast.ops.topk_turn_kl.reference import fused_linear_topk_turn_kl_reference, topk_turn_kl_reference

__all__ = [
    "fused_topk_turn_kl",
    "fused_linear_topk_turn_kl",
    "topk_turn_kl_reference",
    "fused_linear_topk_turn_kl_reference",
]
