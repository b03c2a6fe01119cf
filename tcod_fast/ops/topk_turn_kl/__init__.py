"""``fused_topk_turn_kl``: exact divergence between student logits and a sparse teacher.

For teachers behind an inference server that returns only each token's top-k log-probs.

Files: ``reference.py`` (float64 yardstick), ``torch_backend.py`` (chunked PyTorch, and the
statement of the math), ``native_backend.py`` (C++/OpenMP, ``csrc/topk_turn_kl_cpu.cpp``),
``triton_backend.py`` (GPU, or CPU under ``TRITON_INTERPRET=1``), ``api.py`` (validation, masks,
reductions, autograd and ``torch.library`` registration). The checks and sorting of the teacher's
top-k are ``tcod_fast/ops/topk.py``, shared with ``fused_linear_topk_turn_kl``.
"""

from tcod_fast.ops.topk_turn_kl.api import fused_topk_turn_kl
from tcod_fast.ops.topk_turn_kl.reference import topk_turn_kl_reference

__all__ = ["fused_topk_turn_kl", "topk_turn_kl_reference"]
