"""tcod-fast: fused exact teacher-student KL kernels and a multi-turn OPD trainer.

Public kernel API (see each function's docstring for shapes, dtypes and reductions):

* :func:`fused_turn_kl` -- exact full-vocabulary reverse KL / forward KL / JSD from
  student and teacher logits, one streaming pass, turn masks and per-turn statistics.
* :func:`fused_linear_turn_kl` -- the same from hidden states and LM-head weights, never
  materialising the logits.
* :func:`turn_kl_reference` -- the float64 reference both are tested against.
* :func:`fused_topk_turn_kl` -- the same divergences to a sparse teacher: only its top-k
  log-probs per token, as an inference server (vLLM, SGLang) returns them.
* :func:`fused_linear_topk_turn_kl` -- that from hidden states and the LM head, never
  materialising the logits.
* :func:`topk_turn_kl_reference` -- their float64 reference.
* :func:`cu_seqlens_from_position_ids` -- the ``cu_seqlens`` of a packed (padding-free) batch,
  which every op takes, from position ids that restart at 0.

Submodules: ``curriculum``, ``objectives``, ``envs``, ``rollout``, ``trainer``, ``integrations``
(TRL and verl).

The kernel exports are imported on first use so that light users (environment worker
processes, the CLI's ``--help``) do not pay for importing torch.
"""

__version__ = "0.1.0"

_LAZY = {
    "fused_turn_kl": "tcod_fast.ops.turn_kl",
    "turn_kl_reference": "tcod_fast.ops.turn_kl",
    "TurnKLResult": "tcod_fast.ops.turn_kl",
    "fused_linear_turn_kl": "tcod_fast.ops.fused_linear_turn_kl",
    "fused_linear_turn_kl_reference": "tcod_fast.ops.fused_linear_turn_kl",
    "fused_topk_turn_kl": "tcod_fast.ops.topk_turn_kl",
    "fused_linear_topk_turn_kl": "tcod_fast.ops.fused_linear_topk_turn_kl",
    "topk_turn_kl_reference": "tcod_fast.ops.topk_turn_kl",
    "fused_linear_topk_turn_kl_reference": "tcod_fast.ops.fused_linear_topk_turn_kl",
    "cu_seqlens_from_position_ids": "tcod_fast.ops.turns",
}

__all__ = list(_LAZY)


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        value = getattr(importlib.import_module(_LAZY[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'tcod_fast' has no attribute {name!r}")


def __dir__():
    return sorted(list(globals()) + __all__)
