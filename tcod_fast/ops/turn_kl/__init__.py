"""``fused_turn_kl``: exact full-vocabulary teacher-student divergence with turn masks.

Files: ``reference.py`` (float64 yardstick), ``torch_backend.py`` (chunked PyTorch),
``native_backend.py`` (C++/OpenMP, ``csrc/turn_kl_cpu.cpp``), ``triton_backend.py`` (GPU, or CPU
under ``TRITON_INTERPRET=1``), ``api.py`` (validation, masks, reductions, autograd and
``torch.library`` registration).
"""

from tcod_fast.ops.turn_kl.reference import turn_kl_reference
from tcod_fast.ops.turn_kl.result import TurnKLResult
from tcod_fast.ops.turn_kl.api import fused_turn_kl

__all__ = ["fused_turn_kl", "turn_kl_reference", "TurnKLResult"]
