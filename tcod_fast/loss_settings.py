"""The loss section of a run (:class:`LossSettings`) and its estimators (:class:`Estimator`).

An estimator says how the OPD (teacher) term is estimated; the trainer resolves
``loss.estimator`` to its record once, where the run is built, and every later step asks the
record's properties rather than comparing names:

* ``full_vocab``: the exact divergence over the vocabulary (``fused_turn_kl``, or
  ``fused_linear_turn_kl`` from hidden states); needs the teacher in process; any divergence;
* ``sampled``: ``k1``/``k3`` of the sampled token as a PPO advantage (the TCOD reference
  code's formulation); the teacher in process or served; reverse KL only;
* ``topk``: the divergence to the teacher's top-K log-probs plus a tail outcome
  (``fused_topk_turn_kl``); the teacher in process or served; any divergence.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

__all__ = ["ESTIMATORS", "Estimator", "LossSettings", "get_estimator"]

DIVERGENCES = ("reverse_kl", "forward_kl", "jsd")


@dataclass(frozen=True)
class Estimator:
    """How the OPD term of the loss is estimated.

    Attributes:
        name: the ``loss.estimator`` value that selects it.
        needs_teacher_model: the teacher's full logits are needed, so the teacher runs in
            the trainer's process (a served teacher cannot provide them).
        ppo_advantage: the OPD term enters the PPO clipped surrogate as an advantage
            (the rollout policy's log-probs are then needed when a step makes several
            updates), rather than being differentiated exactly.
        sparse_teacher: the teacher is given as top-K log-prob maps plus a tail.
        divergences: the ``loss.divergence`` values it can estimate.
        fused_linear: the fused-linear op may compute it from hidden states and LM heads.
    """

    name: str
    needs_teacher_model: bool
    ppo_advantage: bool
    sparse_teacher: bool
    divergences: tuple[str, ...]
    fused_linear: bool


#: The estimators, by ``loss.estimator`` name.
ESTIMATORS: dict[str, Estimator] = {
    "full_vocab": Estimator("full_vocab", True, False, False, DIVERGENCES, fused_linear=True),
    "sampled": Estimator("sampled", False, True, False, ("reverse_kl",), fused_linear=False),
    "topk": Estimator("topk", False, False, True, DIVERGENCES, fused_linear=False),
}


def get_estimator(name: str) -> Estimator:
    """The record of estimator ``name``; an unknown name is a ``ValueError`` listing the known ones."""
    try:
        return ESTIMATORS[name]
    except KeyError:
        raise ValueError(f"loss.estimator must be one of {', '.join(ESTIMATORS)}, got {name!r}") from None


@dataclass
class LossSettings:
    """The training signal.

    Attributes:
        estimator: ``full_vocab``: exact KL over the vocabulary with the teacher in process
            (``fused_linear_turn_kl`` on hidden states + LM heads when ``fused_linear``
            allows, else ``fused_turn_kl`` on logits); ``sampled``: the TCOD reference
            code's sampled-token estimator used as an advantage in a PPO clipped surrogate;
            ``topk``: the divergence to the teacher's top-``teacher.top_k`` log-probs plus a
            tail outcome (``fused_topk_turn_kl``), what a served teacher provides.
        sampled_kl: ``k1`` (advantage ``kl_coef (log q - log p_old)``) or ``k3`` (advantage
            ``-kl_coef k3``, never positive); ``sampled`` estimator only.
        divergence: ``reverse_kl``, ``forward_kl`` or ``jsd`` (full vocabulary only).
        jsd_beta: beta of the generalised JSD.
        fused_linear: ``auto`` (use the fused-linear op when the op exists and the full
            vocabulary KL is the only term), ``always`` or ``never`` (not on/off: YAML 1.1
            reads those as booleans).
        backend: kernel backend of the fused ops (``auto``, ``native``, ``triton``, ``torch``).
        packing: how a micro-batch's sequences become the models' rows: ``padded`` (one per
            row, right-padded to the longest), ``padding_free`` (end to end in one row, bounds
            as ``cu_seqlens``; no padding token is computed) or ``auto`` (padding-free when
            both models' attention keeps the sequences of a row apart at a per-sequence cost,
            flash or flex attention; else padded: ``eager``/``sdpa`` pay a dense mask over the
            whole row).
        kl_coef: OPD coefficient of the opd/tcod/guided algorithms.
        clip_low / clip_high / dual_clip: PPO clipping (TCOD: 0.2, 0.2, 3.0).
        sod_coef / sod_delta: SOD's ``c`` and ``delta``.
        grpo_eps: added to the group std.
    """

    estimator: Literal["full_vocab", "sampled", "topk"] = "full_vocab"
    sampled_kl: Literal["k1", "k3"] = "k1"
    divergence: Literal["reverse_kl", "forward_kl", "jsd"] = "reverse_kl"
    jsd_beta: float = 0.5
    fused_linear: Literal["auto", "always", "never"] = "auto"
    backend: Literal["auto", "native", "triton", "torch"] = "auto"
    packing: Literal["auto", "padded", "padding_free"] = "auto"
    kl_coef: float = 1.0
    clip_low: float = 0.2
    clip_high: float | None = None
    dual_clip: float | None = 3.0
    sod_coef: float = 1.0
    sod_delta: float = 0.2
    grpo_eps: float = 1e-6
