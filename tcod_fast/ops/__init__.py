"""Kernel ops. One sub-package per op (``turn_kl``, ``fused_linear_turn_kl``, ``topk_turn_kl``,
``fused_linear_topk_turn_kl``), each with its public function (``api.py``), a plain torch
reference (``reference.py``) and its fast backends; what several ops share is a module here:
``common.py`` (options, kernel codes, dtypes, checks, backend choice), ``turns.py`` (turn masks,
reductions, per-turn statistics, ``TurnKLResult``), ``topk.py`` (the sparse teacher's checks and
sorting), ``linear_head.py`` (the fused-linear ops' LM-head checks, row gather and autograd),
``logit_transform.py`` (the ``softcap=``/``logit_scale=`` map of the logits),
``gradient_memory.py`` (the CPU gradient buffer kept between calls, in huge pages),
``native_extension.py`` (building and loading the C++ kernels) and ``triton_common.py`` (the
optional triton import and shared ``@triton.jit`` helpers).

Exported here: :func:`cu_seqlens_from_position_ids`, the ``cu_seqlens`` of a packed batch (the
ops' ``cu_seqlens=`` keyword) from position ids that restart at 0; :func:`release_gradient_buffer`,
which frees the CPU gradient buffer the ops keep between calls."""

from tcod_fast.ops.gradient_memory import release_gradient_buffer
from tcod_fast.ops.turns import cu_seqlens_from_position_ids

__all__ = ["cu_seqlens_from_position_ids", "release_gradient_buffer"]
