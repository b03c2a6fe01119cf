"""The turn structure every op shares: argument checks for the turn keywords, the per-token keep
mask, the reductions, the per-turn statistics and :class:`TurnKLResult`, what ``return_stats=True``
returns.

Everything here works on ``N``-sized tensors (turn ids, masks, per-token values), never on
``N x V`` ones, and does no host synchronisation except where documented (``num_turns``,
:func:`cu_seqlens_from_position_ids`).

Sequences: a padded ``(B, T)`` batch holds one sequence per row; a packed (padding-free) batch
holds ``S`` sequences end to end in one row, their bounds in ``cu_seqlens``. Both become a
per-token sequence index (:class:`TurnLayout`), from which everything per sequence is computed.
"""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass

import torch

from tcod_fast.ops.common import DIVERGENCES, REDUCTIONS, shape_str


@dataclass
class TurnKLResult:
    """Everything one pass over the logits yields.

    Per-token tensors have the logits' leading shape (``(B, T)`` or ``(N,)``) and hold 0 at
    dropped tokens (``turn_id < 0`` or outside the window). Per-turn tensors are shaped
    ``(S, num_turns)``, one row per sequence (``S = B`` for ``(B, T, V)`` inputs, 1 for
    ``(N, V)`` inputs, ``len(cu_seqlens) - 1`` for a packed batch), and only count kept tokens.

    Attributes:
        loss: the reduced loss (scalar, or per-token for ``reduction="none"``); carries grad.
        kl: per-token divergence of the chosen kind (reverse KL, forward KL or JSD), float32,
            unweighted (turn weights only enter ``loss``). Carries grad to the student logits.
        entropy: per-token student entropy ``H(p)``, float32.
        token_kept: bool mask of the tokens that took part.
        student_logprob, teacher_logprob: ``log p(a)``, ``log q(a)`` of ``target_ids`` (float32);
            ``None`` when no ``target_ids`` were given.
        turn_token_count: kept tokens per (sequence, turn), float32.
        turn_kl_sum: sum of ``kl`` per (sequence, turn).
        turn_entropy_sum: sum of ``entropy`` per (sequence, turn).
        turn_abs_logratio_sum: sum of ``|log p(a) - log q(a)|`` per (sequence, turn) (T-DUR's d_k
            numerator); ``None`` without ``target_ids``.
        turn_neg_logprob_sum: sum of ``-log p(a)`` per (sequence, turn) (T-DUR's h_k numerator);
            ``None`` without ``target_ids``.
    """

    loss: torch.Tensor
    kl: torch.Tensor
    entropy: torch.Tensor
    token_kept: torch.Tensor
    turn_token_count: torch.Tensor
    turn_kl_sum: torch.Tensor
    turn_entropy_sum: torch.Tensor
    student_logprob: torch.Tensor | None = None
    teacher_logprob: torch.Tensor | None = None
    turn_abs_logratio_sum: torch.Tensor | None = None
    turn_neg_logprob_sum: torch.Tensor | None = None

    def turn_kl_mean(self) -> torch.Tensor:
        """Mean KL per (sequence, turn); 0 where a turn has no kept token."""
        return self.turn_kl_sum / self.turn_token_count.clamp_min(1)


def device_check(condition: torch.Tensor, message: str, received=None) -> None:
    """Value checks without a host sync on accelerators (asserted asynchronously there).

    ``received``: a callable naming what was received (``"got 3"``); it reads values, so only
    the host check (CPU, eager) calls it and appends it to ``message``."""
    if condition.device.type == "cpu" and not torch.compiler.is_compiling():
        if not bool(condition):
            raise ValueError(message if received is None else f"{message}, {received()}")
    else:
        torch._assert_async(condition, message)


def check_int_tensor(name, x, lead_shape, device) -> None:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if x.dtype.is_floating_point or x.dtype.is_complex or x.dtype == torch.bool:
        raise TypeError(f"{name} must be an integer tensor, got dtype {x.dtype}")
    if tuple(x.shape) != tuple(lead_shape):
        raise ValueError(f"{name} must have the logits' leading shape {shape_str(lead_shape)}, got {shape_str(x.shape)}")
    if x.device != device:
        raise ValueError(f"{name} is on {x.device} but the logits are on {device}")


# The kernels work in float32 with 1/temperature and log2(e)/temperature as factors; inside this
# range both are finite, normal float32 numbers (and the results exact, see the kernels' notes).
TEMPERATURE_RANGE = (1e-37, 1e37)


def check_options(divergence, reduction, beta, temperature) -> str:
    """Validates the divergence keywords; returns the divergence to compute.

    ``jsd`` at the endpoints is exactly TRL's special-casing: beta=1 reverse KL, beta=0 forward KL.
    """
    if divergence not in DIVERGENCES:
        raise ValueError(f"divergence must be one of {DIVERGENCES}, got {divergence!r}")
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")
    if not isinstance(beta, numbers.Real) or not 0.0 <= float(beta) <= 1.0:
        raise ValueError(f"beta must be a number in [0, 1], got {beta!r}")
    if not isinstance(temperature, numbers.Real) or not (math.isfinite(temperature) and temperature > 0):
        raise ValueError(f"temperature must be a finite number > 0, got {temperature!r}")
    lo, hi = TEMPERATURE_RANGE
    if not lo <= temperature <= hi:
        raise ValueError(
            f"temperature must lie in [{lo:g}, {hi:g}] (1/temperature must be a normal float32), got {temperature!r}"
        )
    if divergence == "jsd" and float(beta) in (0.0, 1.0):
        return "reverse_kl" if float(beta) == 1.0 else "forward_kl"
    return divergence


def resolve_vocab_size(v_s: int, v_t: int, vocab_size, student_name: str, teacher_name: str, unit: str) -> int:
    """The number of leading vocabulary entries both models share and the op uses (>= 1)."""
    for name, v in ((student_name, v_s), (teacher_name, v_t)):
        if v == 0:
            raise ValueError(f"{name} has an empty vocabulary (0 {unit}); expected at least 1")
    if vocab_size is None:
        if v_s != v_t:
            raise ValueError(
                f"{student_name} has vocab {v_s} but {teacher_name} has {v_t}; pass vocab_size= to use "
                f"the first {unit} both share (e.g. vocab_size={min(v_s, v_t)})"
            )
        return int(v_s)
    if not isinstance(vocab_size, numbers.Integral) or not 1 <= vocab_size <= min(v_s, v_t):
        raise ValueError(
            f"vocab_size must be an integer in [1, min(student vocab {v_s}, teacher vocab {v_t})], got {vocab_size!r}"
        )
    return int(vocab_size)


def _validate_window(turn_window, num_seqs, device, seqs="B"):
    if turn_window is None:
        return None
    if isinstance(turn_window, torch.Tensor):
        if turn_window.dtype.is_floating_point or turn_window.dtype == torch.bool:
            raise TypeError(f"turn_window tensor must be integer, got dtype {turn_window.dtype}")
        if tuple(turn_window.shape) != (num_seqs, 2):
            raise ValueError(
                f"turn_window tensor must be shaped ({seqs}, 2) = ({num_seqs}, 2) (one [lo, hi) per sequence), "
                f"got {shape_str(turn_window.shape)}"
            )
        if turn_window.device != device:
            raise ValueError(f"turn_window is on {turn_window.device} but the logits are on {device}")
        device_check((turn_window[:, 0] <= turn_window[:, 1]).all(), "turn_window has a row with lo > hi (expected lo <= hi)")
        return turn_window.to(torch.long)
    if not (isinstance(turn_window, (tuple, list)) and len(turn_window) == 2):
        raise TypeError(f"turn_window must be (lo, hi) or a (B, 2) integer tensor, got {turn_window!r}")
    lo, hi = turn_window
    if not all(isinstance(v, numbers.Integral) for v in (lo, hi)):
        raise TypeError(f"turn_window must hold two integers (lo, hi), got {turn_window!r}")
    if lo > hi:
        raise ValueError(f"turn_window lo must be <= hi, got lo={lo} > hi={hi}")
    return (int(lo), int(hi))


def check_cu_seqlens(cu_seqlens, lead_shape, device, inputs_name: str = "the logits") -> None:
    """Checks ``cu_seqlens`` (FlashAttention's varlen convention: ``(S + 1,)`` int32/int64,
    ``cu_seqlens[0] == 0``, non-decreasing, ``cu_seqlens[-1] == N``) against the inputs' leading
    shape, which must be one packed row, ``(N,)`` or ``(1, N)``. The value checks are
    :func:`device_check`'s (no host sync on accelerators)."""
    if not isinstance(cu_seqlens, torch.Tensor):
        raise TypeError(f"cu_seqlens must be an int32 or int64 tensor, got {type(cu_seqlens).__name__}")
    if cu_seqlens.dtype not in (torch.int32, torch.int64):
        raise TypeError(f"cu_seqlens must be an int32 or int64 tensor, got dtype {cu_seqlens.dtype}")
    if cu_seqlens.dim() != 1 or cu_seqlens.shape[0] == 0:
        raise ValueError(
            f"cu_seqlens must be 1-D, shaped (S + 1,) for S >= 0 packed sequences, got shape {shape_str(cu_seqlens.shape)}"
        )
    if cu_seqlens.device != device:
        raise ValueError(f"cu_seqlens is on {cu_seqlens.device} but {inputs_name} are on {device}")
    if len(lead_shape) != 1 and lead_shape[0] != 1:
        raise ValueError(
            f"cu_seqlens marks the sequences of one packed row, so {inputs_name} must have leading shape (N,) or "
            f"(1, N), got {shape_str(lead_shape)}"
        )
    n = lead_shape[-1]
    device_check(cu_seqlens[0] == 0, "cu_seqlens[0] must be 0", lambda: f"got {int(cu_seqlens[0])}")
    rises = cu_seqlens[1:] >= cu_seqlens[:-1]

    def first_decrease():
        at = int((~rises).nonzero()[0, 0])
        return f"got {int(cu_seqlens[at])} then {int(cu_seqlens[at + 1])} at entries {at} and {at + 1}"

    device_check(rises.all(), "cu_seqlens must be non-decreasing", first_decrease)
    device_check(
        cu_seqlens[-1] == n, f"cu_seqlens[-1] must equal the number of tokens N = {n} of {inputs_name}",
        lambda: f"got {int(cu_seqlens[-1])}",
    )


def cu_seqlens_from_position_ids(position_ids: torch.Tensor) -> torch.Tensor:
    """The ``cu_seqlens`` of a packed row from its ``position_ids``, which restart at 0 at every
    sequence (as padding-free trainers build them: verl's ``use_remove_padding``, TRL's
    ``padding_free``).

    Args:
        position_ids: integer ``(N,)`` or ``(1, N)``, each token's position in its sequence. A
            sequence starts wherever it is 0; the first token must start one.

    Returns:
        ``(S + 1,)`` int32 on ``position_ids``' device: ``[0, start_1, ..., start_{S-1}, N]``,
        FlashAttention's varlen convention (``[0]`` when ``N = 0``).

    Synchronises with the host: the number of sequences, so the output's size, depends on the
    values. Build ``cu_seqlens`` where the batch is built (in the collator), not inside a
    compiled loss.
    """
    if not isinstance(position_ids, torch.Tensor):
        raise TypeError(f"position_ids must be a torch.Tensor, got {type(position_ids).__name__}")
    if position_ids.dtype.is_floating_point or position_ids.dtype.is_complex or position_ids.dtype == torch.bool:
        raise TypeError(f"position_ids must be an integer tensor, got dtype {position_ids.dtype}")
    if position_ids.dim() == 2 and position_ids.shape[0] == 1:
        position_ids = position_ids[0]
    if position_ids.dim() != 1:
        raise ValueError(f"position_ids must be shaped (N,) or (1, N), got {shape_str(position_ids.shape)}")
    starts = (position_ids == 0).nonzero().flatten()
    if position_ids.shape[0] and (starts.numel() == 0 or int(starts[0]) != 0):
        raise ValueError(
            f"position_ids must be 0 at the first token (it starts the first sequence), got {int(position_ids[0])}"
        )
    return torch.cat([starts, starts.new_full((1,), position_ids.shape[0])]).to(torch.int32)


def _sequence_index(cu_seqlens, B: int, T: int, device) -> tuple[torch.Tensor, int]:
    """The sequence of every token ``(B, T)`` int64, and the number of sequences: row ``b`` is
    sequence ``b`` without ``cu_seqlens``; with it (``B = 1``), token ``n`` is in sequence ``s``
    iff ``cu_seqlens[s] <= n < cu_seqlens[s + 1]``."""
    if cu_seqlens is None:
        return torch.arange(B, device=device).unsqueeze(1).expand(B, T), B
    ends = cu_seqlens[1:].long().contiguous()
    seq_index = torch.searchsorted(ends, torch.arange(T, device=device), right=True)
    return seq_index.view(1, T), cu_seqlens.shape[0] - 1


def sequence_sums(values: torch.Tensor, seq_index: torch.Tensor, num_seqs: int) -> torch.Tensor:
    """Sum of per-token ``values`` per sequence, ``(num_seqs,)``.

    Each sequence's tokens are added one at a time in token order (``index_add``; on CPU a
    sequential loop), so a packed batch and its padded twin, whose padding adds exact zeros, give
    the same sums bit for bit."""
    out = torch.zeros(num_seqs, dtype=values.dtype, device=values.device)
    return out.index_add(0, seq_index.reshape(-1), values.reshape(-1))


@dataclass
class TurnLayout:
    """The prepared turn structure of a batch: which tokens are kept, their weights, their turn
    and their sequence.

    A padded ``(B, T)`` batch is the case where sequence ``b`` is row ``b``; a packed batch is one
    row ``(1, N)`` of ``S`` sequences. Everything per sequence (windows, turn weights, the
    per-sequence reductions and statistics) goes through ``seq_index``, for both.

    Attributes:
        B, T: rows and tokens per row as the kernels see them (``B = 1`` for ``(N, ...)`` inputs).
        flat: the inputs were ``(N, ...)``; per-token outputs are returned as ``(N,)``.
        num_seqs: ``S``, the sequences: the ``B`` rows, or ``len(cu_seqlens) - 1``.
        seq_index: ``(B, T)`` int64, the sequence of every token.
        keep: ``(B, T)`` bool, the tokens that take part.
        turn_index: ``(B, T)`` int64, the turn of every kept token (0 at dropped ones).
        target_ids: ``(B, T)`` int64, contiguous, or None.
        turn_weights: ``(S, num_turns)`` float, or None.
        num_turns: width of the per-turn tensors, or None when nothing needs them.
    """

    B: int
    T: int
    flat: bool
    num_seqs: int
    seq_index: torch.Tensor
    keep: torch.Tensor
    turn_index: torch.Tensor
    target_ids: torch.Tensor | None
    turn_weights: torch.Tensor | None
    num_turns: int | None

    def lead(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, T)`` back to the caller's leading shape."""
        return x.squeeze(0) if self.flat else x

    def token_weight(self, dtype: torch.dtype) -> torch.Tensor:
        """``keep * turn_weight`` per token: what multiplies each token's divergence."""
        weight = self.keep.to(dtype)
        if self.turn_weights is not None:
            weight = weight * self.turn_weights.to(dtype)[self.seq_index, self.turn_index]
        return weight

    def per_turn_sum(self, values: torch.Tensor) -> torch.Tensor:
        """Sum of ``values`` over kept tokens per (sequence, turn): ``(S, num_turns)``, each
        group's tokens added in token order (see :func:`sequence_sums`)."""
        group = self.seq_index * self.num_turns + self.turn_index
        kept_values = values * self.keep.to(values.dtype)
        return sequence_sums(kept_values, group, self.num_seqs * self.num_turns).view(self.num_seqs, self.num_turns)

    def sum_tokens(self, values: torch.Tensor) -> torch.Tensor:
        """The sum of per-token ``values`` ``(B, T)``: sequence by sequence, then over the
        sequences, so a packed batch and its padded twin add the same terms in the same order."""
        return sequence_sums(values, self.seq_index, self.num_seqs).sum()

    def token_coefficients(self, reduction: str, dtype: torch.dtype) -> torch.Tensor | None:
        """``d loss / d div`` per token ``(B, T)`` (None for ``"none"``).

        Every scalar reduction is linear in the per-token divergence with coefficients that
        depend only on the mask and the turn weights, so ``loss = sum(coeff * div)``.
        """
        weight = self.token_weight(dtype)
        keep_f = self.keep.to(dtype)
        if reduction == "none":
            return None
        if reduction == "sum":
            return weight
        if reduction == "mean":
            return weight / keep_f.sum().clamp_min(1.0)
        if reduction == "seq_mean_token_mean":
            seq_count = sequence_sums(keep_f, self.seq_index, self.num_seqs)
            num_seqs = (seq_count > 0).sum().clamp_min(1).to(dtype)
            return weight / seq_count[self.seq_index].clamp_min(1.0) / num_seqs
        turn_count = self.per_turn_sum(torch.ones_like(keep_f))  # turn_mean
        num_groups = (turn_count > 0).sum().clamp_min(1).to(dtype)
        return weight / turn_count[self.seq_index, self.turn_index].clamp_min(1.0) / num_groups

    def reduce(self, div: torch.Tensor, reduction: str, coefficients: torch.Tensor | None = None) -> torch.Tensor:
        """The loss from per-token divergences ``(B, T)``; 0 (with zero gradient) if nothing is kept.

        ``coefficients``: ``token_coefficients(reduction, ...)`` when the caller already has them.
        """
        if reduction == "none":
            return self.lead(div * self.token_weight(div.dtype))
        if coefficients is None:
            coefficients = self.token_coefficients(reduction, div.dtype)
        return self.sum_tokens(coefficients.to(div.dtype) * div)

    def result(self, loss, div, entropy, logp, logq) -> TurnKLResult:
        """Assemble the stats object from the per-token outputs of one pass."""
        has_target = self.target_ids is not None
        ones = torch.ones_like(div, dtype=div.dtype)
        return TurnKLResult(
            loss=loss,
            kl=self.lead(div),
            entropy=self.lead(entropy),
            token_kept=self.lead(self.keep),
            turn_token_count=self.per_turn_sum(ones.detach()),
            turn_kl_sum=self.per_turn_sum(div.detach()),
            turn_entropy_sum=self.per_turn_sum(entropy),
            student_logprob=self.lead(logp) if has_target else None,
            teacher_logprob=self.lead(logq) if has_target else None,
            turn_abs_logratio_sum=self.per_turn_sum((logp - logq).abs()) if has_target else None,
            turn_neg_logprob_sum=self.per_turn_sum(-logp) if has_target else None,
        )


def prepare_turns(
    lead_shape,
    device: torch.device,
    *,
    turn_ids,
    turn_window,
    turn_weights,
    target_ids,
    vocab_size: int,
    reduction: str,
    return_stats: bool,
    num_turns,
    cu_seqlens=None,
    inputs_name: str = "the logits",
) -> TurnLayout:
    """Check the turn keywords against the leading shape and build the keep mask.

    A token is kept iff ``turn_id >= 0 and lo <= turn_id < hi``. ``num_turns`` defaults to
    ``turn_weights.shape[-1]``, else ``max(turn_ids) + 1`` (one host sync, only when per-turn
    tensors are needed: pass ``num_turns`` to avoid it). ``cu_seqlens`` (``(S + 1,)``, see
    :func:`check_cu_seqlens`) makes the one row of a ``(N,)`` or ``(1, N)`` leading shape ``S``
    sequences: windows and turn weights are then given per packed sequence.
    """
    flat = len(lead_shape) == 1
    B, T = (1, lead_shape[0]) if flat else (lead_shape[0], lead_shape[1])
    if cu_seqlens is not None:
        check_cu_seqlens(cu_seqlens, lead_shape, device, inputs_name)
    seq_index, num_seqs = _sequence_index(cu_seqlens, B, T, device)
    seqs = "B" if cu_seqlens is None else "S"  # what the messages call the number of sequences
    if turn_ids is not None:
        check_int_tensor("turn_ids", turn_ids, lead_shape, device)
    if target_ids is not None:
        check_int_tensor("target_ids", target_ids, lead_shape, device)
        if target_ids.numel():
            device_check(
                ((target_ids >= 0) & (target_ids < vocab_size)).all(),
                f"target_ids must lie in [0, vocab_size={vocab_size})",
            )
    window = _validate_window(turn_window, num_seqs, device, seqs)
    if turn_weights is not None:
        if not isinstance(turn_weights, torch.Tensor) or not turn_weights.dtype.is_floating_point:
            raise TypeError(f"turn_weights must be a float tensor shaped ({seqs}, num_turns), got {turn_weights!r:.80}")
        if turn_weights.dim() == 1 and flat and cu_seqlens is None:
            turn_weights = turn_weights.unsqueeze(0)
        if turn_weights.dim() != 2 or turn_weights.shape[0] != num_seqs:
            raise ValueError(
                f"turn_weights must be shaped ({seqs}, num_turns) with {seqs}={num_seqs}, got {shape_str(turn_weights.shape)}"
            )
        if turn_weights.device != device:
            raise ValueError(f"turn_weights is on {turn_weights.device} but {inputs_name} are on {device}")
        if num_turns is not None and num_turns != turn_weights.shape[1]:
            raise ValueError(f"num_turns={num_turns} but turn_weights has {turn_weights.shape[1]} turns")
        if turn_weights.numel():
            # negative weights are allowed (the loss is linear in them); NaN/inf would poison it
            device_check(torch.isfinite(turn_weights).all(), "turn_weights must be finite, got NaN or inf entries")
        num_turns = turn_weights.shape[1]
    if num_turns is not None and (not isinstance(num_turns, numbers.Integral) or num_turns < 1):
        raise ValueError(f"num_turns must be a positive integer, got {num_turns!r}")

    ids = torch.zeros(B, T, dtype=torch.long, device=device) if turn_ids is None else turn_ids.reshape(B, T).long()
    keep = ids >= 0
    if isinstance(window, tuple):
        keep = keep & (ids >= window[0]) & (ids < window[1])
    elif window is not None:
        seq_window = window[seq_index]  # (B, T, 2): the [lo, hi) of each token's sequence
        keep = keep & (ids >= seq_window[..., 0]) & (ids < seq_window[..., 1])
    turn_index = torch.where(keep, ids, torch.zeros_like(ids))

    need_turns = return_stats or reduction == "turn_mean" or turn_weights is not None
    if need_turns:
        if num_turns is None:
            num_turns = max(int(ids.max()) + 1 if ids.numel() else 1, 1)  # documented sync
        device_check((turn_index < num_turns).all(), f"turn_ids must be < num_turns={num_turns} for kept tokens")
    return TurnLayout(
        B=B,
        T=T,
        flat=flat,
        num_seqs=num_seqs,
        seq_index=seq_index,
        keep=keep,
        turn_index=turn_index,
        # contiguous: the kernels read row r's target at offset r (input_ids[:, 1:] is a strided view)
        target_ids=None if target_ids is None else target_ids.reshape(B, T).long().contiguous(),
        turn_weights=turn_weights,
        num_turns=int(num_turns) if need_turns else None,
    )
