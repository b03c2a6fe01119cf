"""The implementations the ``fused_turn_kl`` benchmarks compare, all computing the same loss.

* ``fused-<backend>``: ``tcod_fast.fused_turn_kl`` (token-mean reverse KL).
* ``eager``: the way people write it today: ``log_softmax`` of both, ``exp``, sum, autograd.
* ``compiled``: ``torch.compile`` of ``eager`` (the strongest CPU peer).
* ``liger-jsd``: Liger-Kernel's JSD at beta=1 (reverse KL), including the float32
  ``log_softmax`` of both inputs it needs (GPU only).

Every implementation takes ``(student_logits, teacher_logits)`` of shape ``(N, V)`` and
returns the scalar loss with a graph to ``student_logits``.
"""

from __future__ import annotations

import functools

import torch

from tcod_fast import fused_turn_kl


def eager_reverse_kl(student_logits: torch.Tensor, teacher_logits: torch.Tensor) -> torch.Tensor:
    log_p = torch.log_softmax(student_logits.float(), dim=-1)
    log_q = torch.log_softmax(teacher_logits.float(), dim=-1)
    return (log_p.exp() * (log_p - log_q)).sum(-1).mean()


@functools.lru_cache(maxsize=None)
def compiled_reverse_kl():
    return torch.compile(eager_reverse_kl, dynamic=False)


def fused(backend: str):
    def run(student_logits, teacher_logits):
        return fused_turn_kl(student_logits, teacher_logits, backend=backend)

    return run


def liger_reverse_kl():
    """Liger-Kernel's JSD with beta=1; raises ImportError when liger-kernel is missing."""
    from liger_kernel.transformers import LigerJSD

    jsd = LigerJSD(beta=1.0)

    def run(student_logits, teacher_logits):
        log_p = torch.log_softmax(student_logits.float(), dim=-1)
        log_q = torch.log_softmax(teacher_logits.float(), dim=-1)
        return jsd(log_p, log_q)

    return run


def implementations(device: str) -> dict:
    impls = {"eager": eager_reverse_kl, "compiled": lambda s, t: compiled_reverse_kl()(s, t)}
    if device == "cpu":
        impls = {"fused-native": fused("native"), "fused-torch": fused("torch"), **impls}
    else:
        impls = {"fused-triton": fused("triton"), **impls}
        try:
            impls["liger-jsd"] = liger_reverse_kl()
        except ImportError:
            pass
    return impls


def forward_backward(impl, student_logits, teacher_logits):
    loss = impl(student_logits, teacher_logits)
    loss.backward()
    return loss
