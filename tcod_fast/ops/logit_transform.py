"""Soft-capped and scaled logits, per side: the ``softcap=`` and ``logit_scale=`` keywords of the ops.

Some models transform their logits after the LM head: Gemma 2 soft-caps them,
``softcap * tanh(z / softcap)`` (``final_logit_softcapping``), others multiply them by a
``logit_scale``. The ops apply the same map to each side's logits before the temperature:

    y = softcap * tanh(logit_scale * z / softcap)        (with a soft cap)
    y = logit_scale * z                                   (without one)
    dy/dz = logit_scale * (1 - tanh(logit_scale * z / softcap)^2)   (logit_scale without one)

so ``softmax(y / temperature)`` is the model's distribution. ``1 - tanh(u)^2`` is evaluated as
``4 e / (1 + e)^2`` with ``e = exp(-2|u|)``, which keeps its relative precision where ``tanh``
saturates (``1 - tanh^2`` would cancel to 0 there). With a soft cap, a ``-inf`` logit becomes
``-softcap``, as in the model.

This module parses and checks the keywords (:func:`resolve_logit_transforms`) and holds the
per-side map (:class:`LogitTransform`) in the form every backend takes: the torch backends call
its methods, the Triton kernels take its ``code`` as a constexpr (``triton_common.logit_transform``)
and the native kernels its ``scale`` and ``cap`` (``csrc/cpu_kernel_common.h``). It imports no op
package, so every module of ``tcod_fast.ops`` can import it.
"""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass

import torch

# LogitTransform.code: what a kernel compiles in (a Triton constexpr; the native kernels branch on it)
IDENTITY_CODE, SCALE_CODE, SOFTCAP_CODE = 0, 1, 2


@dataclass(frozen=True)
class LogitTransform:
    """One side's map ``z -> softcap * tanh(scale * z / softcap)`` (``cap == 0``: ``scale * z``).

    The identity (``scale == 1``, ``cap == 0``) is never applied: every backend skips it, so
    calls without the keywords run exactly the code they always ran.
    """

    scale: float = 1.0
    cap: float = 0.0  # 0: no soft cap

    @property
    def identity(self) -> bool:
        return self.scale == 1.0 and self.cap == 0.0

    @property
    def code(self) -> int:
        """``IDENTITY_CODE``, ``SCALE_CODE`` (a scale alone) or ``SOFTCAP_CODE``."""
        if self.cap != 0.0:
            return SOFTCAP_CODE
        return IDENTITY_CODE if self.scale == 1.0 else SCALE_CODE

    def as_floats(self) -> list[float]:
        return [float(self.scale), float(self.cap)]

    def apply(self, z: torch.Tensor) -> torch.Tensor:
        """The transformed logits, a new tensor in ``z``'s dtype (``z`` is never written)."""
        if self.cap == 0.0:
            return z * self.scale
        return torch.tanh(z * (self.scale / self.cap)).mul_(self.cap)

    def apply_(self, z: torch.Tensor) -> torch.Tensor:
        """:meth:`apply` in place, over ``z`` (a buffer of the caller's own)."""
        if self.cap == 0.0:
            return z.mul_(self.scale)
        return z.mul_(self.scale / self.cap).tanh_().mul_(self.cap)

    def apply_with_derivative(self, z: torch.Tensor, inplace: bool = False) -> tuple[torch.Tensor, torch.Tensor | float]:
        """``(y, dy/dz)`` in ``z``'s dtype (``dy/dz`` is the float ``scale`` without a soft cap);
        ``y`` is written over ``z`` with ``inplace``, else a new tensor."""
        derivative = self.derivative(z)
        return (self.apply_(z) if inplace else self.apply(z)), derivative

    def derivative(self, z: torch.Tensor) -> torch.Tensor | float:
        """``dy/dz`` at ``z``: ``scale * 4 e / (1 + e)^2``, ``e = exp(-2 |scale z / cap|)`` (one new
        tensor, one more while it is formed)."""
        if self.cap == 0.0:
            return float(self.scale)
        e = (z * (-2.0 * abs(self.scale / self.cap))).abs_().neg_().exp_()
        denominator = (e + 1.0).square_()
        return e.mul_(4.0 * self.scale).div_(denominator)


IDENTITY = LogitTransform()


def _side_values(name: str, value, sides: int) -> tuple:
    """``value`` as one entry per side: a number is every side's, a pair is ``(student, teacher)``."""
    if value is None or (isinstance(value, numbers.Real) and not isinstance(value, bool)):
        return (value,) * sides
    if isinstance(value, (tuple, list)) and len(value) == 2:
        return tuple(value)
    raise TypeError(f"{name} must be a number, a (student, teacher) pair of numbers or None, got {value!r}")


def _checked(name: str, side: str, value, ok, expected: str) -> float | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a number, a (student, teacher) pair of numbers or None, got {value!r} "
                        f"for the {side}")
    value = float(value)
    if not ok(value):
        raise ValueError(f"{name} must be {expected} (or None), got {value!r} for the {side}")
    return value


def resolve_logit_transforms(softcap, logit_scale, *, teacher_logits: bool = True) -> tuple[LogitTransform, LogitTransform]:
    """The ``(student, teacher)`` maps of the keywords ``softcap`` and ``logit_scale``.

    Each is None, a number (``teacher_logits``: both sides; else the student's) or a pair
    ``(student, teacher)`` whose entries may be None (nothing on that side). ``softcap`` must be
    positive and finite, ``logit_scale`` finite and non-zero. ``teacher_logits=False`` (the top-k
    ops, whose teacher is given as log-probs): only the student side applies, and a teacher-side
    value is an error.
    """
    caps = _side_values("softcap", softcap, 2)
    scales = _side_values("logit_scale", logit_scale, 2)
    if not teacher_logits:
        for name, given, pair in (("softcap", softcap, caps), ("logit_scale", logit_scale, scales)):
            if isinstance(given, (tuple, list)) and pair[1] is not None:
                raise ValueError(
                    f"{name}: the teacher is given as top-k log-probs, already normalised, so only the student "
                    f"side applies; got {given!r} (pass {name}={pair[0]!r} or ({pair[0]!r}, None))"
                )
        caps, scales = (caps[0], None), (scales[0], None)
    transforms = []
    for side, cap, scale in zip(("student", "teacher"), caps, scales):
        cap = _checked("softcap", side, cap, lambda v: 0.0 < v < math.inf, "positive and finite")
        scale = _checked("logit_scale", side, scale, lambda v: math.isfinite(v) and v != 0.0, "finite and non-zero")
        transforms.append(LogitTransform(1.0 if scale is None else scale, 0.0 if cap is None else cap))
    return transforms[0], transforms[1]


def from_floats(values) -> tuple[LogitTransform, LogitTransform]:
    """The ``(student, teacher)`` maps from ``[scale_s, cap_s, scale_t, cap_t]`` (the custom ops' argument)."""
    scale_s, cap_s, scale_t, cap_t = (float(v) for v in values)
    return LogitTransform(scale_s, cap_s), LogitTransform(scale_t, cap_t)


def as_floats(student: LogitTransform, teacher: LogitTransform = IDENTITY) -> list[float]:
    """``[scale_s, cap_s, scale_t, cap_t]``: the maps as a custom op takes them."""
    return student.as_floats() + teacher.as_floats()
