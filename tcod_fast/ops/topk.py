"""Checks and preparation of the sparse teacher (top-k ids and log-probs), shared by
``fused_topk_turn_kl`` and ``fused_linear_topk_turn_kl``.

Everything here works on ``N x K`` tensors, never ``N x V``. The backends receive the top-k of
each row sorted by id, padding last, as int32 ids with ``PAD_ID`` in padded slots: the native
and Triton kernels then find the top-k columns of a vocabulary block with one moving pointer
instead of comparing every column with every id.
"""

from __future__ import annotations

import math
import numbers

import torch

from tcod_fast.ops.common import shape_str
from tcod_fast.ops.turns import device_check

TAILS = ("bucket", "renormalize")
# Sorted after every real id; the kernels treat any id >= vocab as padding.
PAD_ID = 2**31 - 1


def check_tail_options(tail, tail_eps) -> None:
    if tail not in TAILS:
        raise ValueError(f"tail must be one of {TAILS}, got {tail!r}")
    if not isinstance(tail_eps, numbers.Real) or not (math.isfinite(tail_eps) and 0.0 < tail_eps < 1.0):
        raise ValueError(f"tail_eps must be a number in (0, 1), got {tail_eps!r}")


def check_topk_tensors(ids, logprobs, lead_shape, vocab: int, device, inputs_name: str) -> None:
    """Type, dtype, shape and device of the teacher's top-k tensors (no value checks, no sync)."""
    for name, x in (("teacher_topk_ids", ids), ("teacher_topk_logprobs", logprobs)):
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if ids.dtype.is_floating_point or ids.dtype.is_complex or ids.dtype == torch.bool:
        raise TypeError(f"teacher_topk_ids must be an integer tensor (-1 = padding), got dtype {ids.dtype}")
    if not logprobs.dtype.is_floating_point:
        raise TypeError(f"teacher_topk_logprobs must be a float tensor (float32), got dtype {logprobs.dtype}")
    if ids.dim() != len(lead_shape) + 1 or tuple(ids.shape[:-1]) != tuple(lead_shape):
        # formatted only here: under torch.compile a dynamic token count cannot be formatted
        expected = f"{shape_str(lead_shape)[:-1]}, K)" if len(lead_shape) else "(K,)"
        raise ValueError(
            f"teacher_topk_ids must be shaped {expected} to match {inputs_name} leading shape "
            f"{shape_str(lead_shape)}, got {shape_str(ids.shape)}"
        )
    if ids.shape[-1] < 1:
        raise ValueError(f"teacher_topk_ids must hold at least one id per row (K >= 1), got {shape_str(ids.shape)}")
    if tuple(logprobs.shape) != tuple(ids.shape):
        raise ValueError(
            f"teacher_topk_logprobs must have teacher_topk_ids' shape {shape_str(ids.shape)}, got {shape_str(logprobs.shape)}"
        )
    if vocab >= PAD_ID:
        raise ValueError(f"vocabularies of {PAD_ID} or more entries are not supported, got {vocab}")
    for name, x in (("teacher_topk_ids", ids), ("teacher_topk_logprobs", logprobs)):
        if x.device != device:
            raise ValueError(f"{name} is on {x.device} but {inputs_name} are on {device}")


def _first_bad(bad: torch.Tensor):
    """Index tuple of the first True entry (CPU only)."""
    return tuple(int(i) for i in bad.nonzero()[0])


def _value_check(bad: torch.Tensor, message, describe) -> None:
    """Raise ``message`` (plus, on CPU, ``describe(first bad index)``) if any entry of ``bad`` is set.

    On accelerators and under ``torch.compile`` the check is asserted asynchronously (no host sync),
    with the plain message.
    """
    if bad.device.type == "cpu" and not torch.compiler.is_compiling():
        if bool(bad.any()):
            raise ValueError(f"{message}; {describe(_first_bad(bad))}")
    else:
        device_check(~bad.any(), message)


def prepare_topk(ids: torch.Tensor, logprobs: torch.Tensor, keep: torch.Tensor, vocab: int, logprob_dtype):
    """Value checks on the kept rows, then each row's top-k sorted by id (padding last).

    Args:
        ids, logprobs: ``(B, T, K)``. Rows that are not kept are neither checked nor read.
        keep: ``(B, T)`` bool.
    Returns:
        ``(sorted_ids, sorted_logprobs)``: ``(B, T, K)`` contiguous, int32 ids with ``PAD_ID`` in
        padded slots (and in every slot of a dropped row), log-probs in ``logprob_dtype`` with 0 in
        padded slots.
    """
    kept = keep.unsqueeze(-1)
    is_pad = ids == -1
    in_range = (ids >= 0) & (ids < vocab)
    _value_check(
        kept & ~(is_pad | in_range),
        f"teacher_topk_ids must be -1 (padding) or lie in [0, V={vocab})",
        lambda at: f"got {int(ids[at])} at {at}",
    )
    valid = kept & in_range
    _value_check(
        valid & ~(logprobs <= 0),
        "teacher_topk_logprobs must be log-probabilities (<= 0, not NaN) at every non-padding id",
        lambda at: f"got {float(logprobs[at])} at {at}",
    )
    keyed = torch.where(valid, ids.to(torch.int64), torch.full_like(ids, PAD_ID, dtype=torch.int64))
    sorted_ids, order = keyed.sort(dim=-1)
    duplicate = (sorted_ids[..., 1:] == sorted_ids[..., :-1]) & (sorted_ids[..., 1:] != PAD_ID)
    _value_check(
        duplicate,
        "teacher_topk_ids must not repeat an id within a row",
        lambda at: f"id {int(sorted_ids[at[:-1]][at[-1]])} appears twice in row {at[:-1]}",
    )
    sorted_logprobs = logprobs.gather(-1, order).to(logprob_dtype)
    sorted_logprobs = torch.where(sorted_ids != PAD_ID, sorted_logprobs, torch.zeros_like(sorted_logprobs))
    return sorted_ids.to(torch.int32).contiguous(), sorted_logprobs.contiguous()
