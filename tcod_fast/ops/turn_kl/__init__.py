"""``fused_turn_kl``: exact full-vocabulary teacher-student divergence with turn masks.

Files: ``reference.py`` (float64 yardstick), ``torch_backend.py`` (chunked PyTorch),
``native_backend.py`` (C++/OpenMP, ``csrc/turn_kl_cpu.cpp``), ``triton_backend.py`` (GPU, or CPU
under ``TRITON_INTERPRET=1``), ``api.py`` (validation, autograd and ``torch.library``
registration). Masks, reductions and :class:`TurnKLResult` are ``tcod_fast/ops/turns.py``, shared
by every op.
"""

from tcod_fast.ops.turn_kl.api import fused_turn_kl
from tcod_fast.ops.turn_kl.reference import turn_kl_reference
from tcod_fast.ops.turns import TurnKLResult

__all__ = ["fused_turn_kl", "turn_kl_reference", "TurnKLResult"]
