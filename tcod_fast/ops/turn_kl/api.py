"""Public entry point ``fused_turn_kl``: validation, turn masks, reductions, autograd.

Layers, top to bottom:

1. ``fused_turn_kl`` checks every argument (before any kernel runs), builds the per-token keep
   mask from ``turn_ids`` and ``turn_window`` (an ``N``-sized op, never ``N x V``), and picks a
   backend.
2. ``_FusedTurnKL`` (autograd) calls the ``torch.library`` custom op
   ``tcod_fast::turn_kl_forward`` which streams the logits once and returns per-token
   divergence, entropy, sampled-token log-probs and the gradient of each token's divergence.
   Backward only scales that stored gradient by the incoming per-token grad, in place.
3. Reductions, turn weights and per-(sequence, turn) statistics are plain torch ops on
   ``N``-sized vectors.
"""

import math
import numbers

import torch

from tcod_fast.ops.turn_kl import native_backend, torch_backend, triton_backend
from tcod_fast.ops.turn_kl.result import DIVERGENCES, REDUCTIONS, TurnKLResult

BACKENDS = ("auto", "triton", "native", "torch")
_FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)


# --------------------------------------------------------------------------------------------
# custom op: the one pass over the logits
# --------------------------------------------------------------------------------------------
def _run_backend(backend, student, teacher, keep, target_ids, divergence, beta, temperature, vocab_size, grad):
    if backend == "native":
        impl = native_backend.forward
    elif backend == "triton":
        impl = triton_backend.forward
    else:
        impl = torch_backend.forward
    return impl(student, teacher, keep, target_ids, divergence, beta, temperature, vocab_size, grad)


def _stat_dtype(student: torch.Tensor) -> torch.dtype:
    """Per-token outputs are float32, or float64 for float64 logits (gradcheck)."""
    return torch.float64 if student.dtype == torch.float64 else torch.float32


@torch.library.custom_op("tcod_fast::turn_kl_forward", mutates_args=())
def _turn_kl_forward(
    student: torch.Tensor,
    teacher: torch.Tensor,
    keep: torch.Tensor,
    target_ids: torch.Tensor | None,
    divergence: str,
    beta: float,
    temperature: float,
    vocab_size: int,
    compute_grad: bool,
    backend: str,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-token (div, entropy, logp_target, logq_target) and d div/d student (or an empty grad)."""
    grad = torch.empty(student.shape, dtype=student.dtype, device=student.device) if compute_grad else None
    outs = _run_backend(backend, student, teacher, keep, target_ids, divergence, beta, temperature, vocab_size, grad)
    if grad is None:
        grad = student.new_empty(0)
    return (*outs, grad)


@_turn_kl_forward.register_fake
def _(student, teacher, keep, target_ids, divergence, beta, temperature, vocab_size, compute_grad, backend):
    outs = tuple(keep.new_empty(keep.shape, dtype=_stat_dtype(student)) for _ in range(4))
    grad = student.new_empty(student.shape) if compute_grad else student.new_empty(0)
    return (*outs, grad)


@torch.library.custom_op("tcod_fast::turn_kl_forward_inplace", mutates_args=("student",))
def _turn_kl_forward_inplace(
    student: torch.Tensor,
    teacher: torch.Tensor,
    keep: torch.Tensor,
    target_ids: torch.Tensor | None,
    divergence: str,
    beta: float,
    temperature: float,
    vocab_size: int,
    backend: str,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Like ``turn_kl_forward`` but overwrites ``student`` with the gradient (saves one N x V buffer)."""
    return tuple(_run_backend(backend, student, teacher, keep, target_ids, divergence, beta, temperature, vocab_size, student))


@_turn_kl_forward_inplace.register_fake
def _(student, teacher, keep, target_ids, divergence, beta, temperature, vocab_size, backend):
    return tuple(keep.new_empty(keep.shape, dtype=_stat_dtype(student)) for _ in range(4))


class _FusedTurnKL(torch.autograd.Function):
    """Differentiable per-token divergence; the gradient is computed in forward."""

    @staticmethod
    def forward(ctx, student, teacher, keep, target_ids, divergence, beta, temperature, vocab_size, backend, inplace):
        compute_grad = ctx.needs_input_grad[0]
        if inplace and compute_grad:
            div, entropy, logp, logq = torch.ops.tcod_fast.turn_kl_forward_inplace(
                student, teacher, keep, target_ids, divergence, beta, temperature, vocab_size, backend
            )
            grad = student
        else:
            div, entropy, logp, logq, grad = torch.ops.tcod_fast.turn_kl_forward(
                student, teacher, keep, target_ids, divergence, beta, temperature, vocab_size, compute_grad, backend
            )
        ctx.mark_non_differentiable(entropy, logp, logq)
        if compute_grad:
            ctx.save_for_backward(grad)
        ctx.backward_done = False
        return div, entropy, logp, logq

    @staticmethod
    def backward(ctx, grad_div, *_unused):
        if ctx.backward_done:
            raise RuntimeError(
                "fused_turn_kl scales its stored gradient in place, so its backward can run only once "
                "(do not use retain_graph=True through it)"
            )
        ctx.backward_done = True
        (grad,) = ctx.saved_tensors
        # In place: the stored gradient is the op's own buffer (or the student logits the user
        # gave up with inplace=True), so no second N x V tensor is ever allocated.
        grad.mul_(grad_div.unsqueeze(-1))  # float32 scale: computed in float32, rounded once
        return grad, None, None, None, None, None, None, None, None, None


# --------------------------------------------------------------------------------------------
# validation
# --------------------------------------------------------------------------------------------
def _shape_str(shape) -> str:
    return "(" + ", ".join(str(int(d)) for d in shape) + ")"


def _check_int_tensor(name, x, lead_shape, device):
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if x.dtype.is_floating_point or x.dtype.is_complex or x.dtype == torch.bool:
        raise TypeError(f"{name} must be an integer tensor, got dtype {x.dtype}")
    if tuple(x.shape) != tuple(lead_shape):
        raise ValueError(
            f"{name} must have the logits' leading shape {_shape_str(lead_shape)}, got {_shape_str(x.shape)}"
        )
    if x.device != device:
        raise ValueError(f"{name} is on {x.device} but the logits are on {device}")


def _device_check(condition: torch.Tensor, message: str) -> None:
    """Value checks without a host sync on accelerators (asserted asynchronously there)."""
    if condition.device.type == "cpu" and not torch.compiler.is_compiling():
        if not bool(condition):
            raise ValueError(message)
    else:
        torch._assert_async(condition, message)


def _validate_window(turn_window, B, device):
    if turn_window is None:
        return None
    if isinstance(turn_window, torch.Tensor):
        if turn_window.dtype.is_floating_point or turn_window.dtype == torch.bool:
            raise TypeError(f"turn_window tensor must be integer, got dtype {turn_window.dtype}")
        if tuple(turn_window.shape) != (B, 2):
            raise ValueError(
                f"turn_window tensor must be shaped (B, 2) = ({B}, 2) (one [lo, hi) per sequence), "
                f"got {_shape_str(turn_window.shape)}"
            )
        if turn_window.device != device:
            raise ValueError(f"turn_window is on {turn_window.device} but the logits are on {device}")
        _device_check(
            (turn_window[:, 0] <= turn_window[:, 1]).all(), "turn_window has a row with lo > hi (expected lo <= hi)"
        )
        return turn_window.to(torch.long)
    if not (isinstance(turn_window, (tuple, list)) and len(turn_window) == 2):
        raise TypeError(f"turn_window must be (lo, hi) or a (B, 2) integer tensor, got {turn_window!r}")
    lo, hi = turn_window
    if not all(isinstance(v, numbers.Integral) for v in (lo, hi)):
        raise TypeError(f"turn_window must hold two integers (lo, hi), got {turn_window!r}")
    if lo > hi:
        raise ValueError(f"turn_window lo must be <= hi, got lo={lo} > hi={hi}")
    return (int(lo), int(hi))


# Evaluated eagerly (and treated as a constant) when torch.compile traces the op: building or
# loading the extension is not something to trace.
@torch._dynamo.assume_constant_result
def _native_available() -> bool:
    return native_backend.is_available()


def _resolve_backend(backend, device, dtype):
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if backend == "auto":
        if dtype == torch.float64:
            return "torch"
        if device.type == "cuda" and triton_backend.is_available(device):
            return "triton"
        if device.type == "cpu" and _native_available():
            return "native"
        return "torch"
    if backend == "native":
        if device.type != "cpu":
            raise ValueError(f"backend='native' runs on CPU tensors, got tensors on {device}")
        if dtype not in native_backend.SUPPORTED_DTYPES:
            raise TypeError(f"backend='native' supports float32/bfloat16/float16 logits, got {dtype}")
        if not _native_available():
            native_backend.load()  # raises with the build error
    if backend == "triton":
        if not triton_backend.HAS_TRITON:
            raise RuntimeError("backend='triton' needs the triton package: pip install 'tcod-fast[triton]'")
        if not triton_backend.is_available(device):
            raise ValueError(
                f"backend='triton' runs on CUDA tensors (or CPU tensors with TRITON_INTERPRET=1), got {device}"
            )
        if dtype == torch.float64:
            raise TypeError("backend='triton' supports float32/bfloat16/float16 logits, got torch.float64")
    return backend


# --------------------------------------------------------------------------------------------
# public API
# --------------------------------------------------------------------------------------------
def fused_turn_kl(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    turn_ids: torch.Tensor | None = None,
    *,
    turn_window=None,
    turn_weights: torch.Tensor | None = None,
    target_ids: torch.Tensor | None = None,
    divergence: str = "reverse_kl",
    beta: float = 0.5,
    temperature: float = 1.0,
    vocab_size: int | None = None,
    reduction: str = "mean",
    return_stats: bool = False,
    num_turns: int | None = None,
    inplace: bool = False,
    backend: str = "auto",
):
    """Exact full-vocabulary teacher-student divergence with turn masks, in one streaming pass.

    Never materialises a softmax or any float32 ``tokens x vocab`` buffer: each row of logits is
    streamed with an online softmax, accumulated in float32, and the gradient w.r.t. the student
    logits is written during the forward pass (in the logits' dtype) and only scaled in backward.

    Args:
        student_logits: ``(B, T, V_s)`` or ``(N, V_s)``, float32/bfloat16/float16 (float64 with the
            torch backend). Receives the gradient. The last dim must be contiguous; row strides
            are free (e.g. ``logits[:, :-1]`` is used without a copy).
        teacher_logits: ``(B, T, V_t)`` or ``(N, V_t)``, same leading shape and device; any of the
            float dtypes. Stop-gradient.
        turn_ids: integer tensor with the logits' leading shape. ``0, 1, ...`` = the student turn a
            token belongs to, ``-1`` = not trained. ``None``: every token is turn 0.
        turn_window: ``(lo, hi)`` for the whole batch or a ``(B, 2)`` integer tensor, one per
            sequence. A token is kept iff ``turn_id >= 0 and lo <= turn_id < hi``.
        turn_weights: ``(B, num_turns)`` float (``(num_turns,)`` allowed for ``(N, V)`` input);
            each kept token's loss is multiplied by its turn's weight (T-DUR / SOD weights).
            Turn weights do not change the normalising token counts of the reductions.
        target_ids: integer tensor with the leading shape: sampled tokens; their student and
            teacher log-probs are returned in the stats.
        divergence: ``"reverse_kl"`` KL(p_student || q_teacher) (default), ``"forward_kl"``
            KL(q || p), or ``"jsd"``: TRL's generalised JSD
            ``beta*KL(q||m) + (1-beta)*KL(p||m)``, ``m = (1-beta) p + beta q``, with ``beta=1``
            giving reverse KL and ``beta=0`` forward KL exactly as TRL does.
        temperature: both logits are divided by it (no ``temperature**2`` factor is applied).
        vocab_size: use only the first ``vocab_size`` columns of each (padded vocabularies, e.g.
            a 152064-column teacher and a 151936-column student). Without it, differing last
            dimensions are an error. Student columns past it get zero gradient.
        reduction: ``"mean"`` token mean over kept tokens (0 with zero gradient when nothing is
            kept); ``"sum"``; ``"none"`` per-token values with the leading shape (0 at dropped
            tokens); ``"seq_mean_token_mean"`` mean over sequences (with a kept token) of each
            sequence's token mean; ``"turn_mean"`` mean over (sequence, turn) groups of each
            group's token mean.
        return_stats: return a :class:`TurnKLResult` (loss, per-token kl/entropy/log-probs,
            per-(sequence, turn) sums and counts) instead of the loss tensor.
        num_turns: width of the per-turn statistics. Defaults to ``turn_weights.shape[-1]``, else
            ``max(turn_ids) + 1`` (a device sync; pass it to avoid one on GPU).
        inplace: write the gradient over ``student_logits`` instead of a new buffer (the logits
            are destroyed; saves one ``tokens x vocab`` allocation).
        backend: ``"auto"`` (Triton on CUDA, native C++ on CPU, torch otherwise), ``"triton"``,
            ``"native"`` or ``"torch"``.

    Returns:
        The loss (float32; per-token for ``reduction="none"``), or a ``TurnKLResult``.

    Notes:
        ``-inf`` logits at the same entries of student and teacher contribute exactly 0. A
        teacher ``-inf`` where the student has mass is a true ``+inf`` reverse KL (and a
        student ``-inf`` under teacher mass a ``+inf`` forward KL); it is reported, not hidden.
    """
    # ---- validation: everything is checked before any kernel runs ----
    for name, x in (("student_logits", student_logits), ("teacher_logits", teacher_logits)):
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
        if x.dtype not in _FLOAT_DTYPES:
            raise TypeError(f"{name} must be float32/bfloat16/float16/float64, got {x.dtype}")
        if x.dim() not in (2, 3):
            raise ValueError(f"{name} must be (B, T, V) or (N, V), got {x.dim()}-D shape {_shape_str(x.shape)}")
    if student_logits.device != teacher_logits.device:
        raise ValueError(
            f"student_logits is on {student_logits.device} but teacher_logits is on {teacher_logits.device}"
        )
    if student_logits.shape[:-1] != teacher_logits.shape[:-1]:
        raise ValueError(
            f"student_logits leading shape {_shape_str(student_logits.shape[:-1])} does not match "
            f"teacher_logits leading shape {_shape_str(teacher_logits.shape[:-1])}"
        )
    v_s, v_t = student_logits.shape[-1], teacher_logits.shape[-1]
    if vocab_size is None:
        if v_s != v_t:
            raise ValueError(
                f"student_logits has vocab {v_s} but teacher_logits has {v_t}; pass vocab_size= to use "
                f"the first columns both share (e.g. vocab_size={min(v_s, v_t)})"
            )
        vocab_size = v_s
    elif not isinstance(vocab_size, numbers.Integral) or not 1 <= vocab_size <= min(v_s, v_t):
        raise ValueError(
            f"vocab_size must be an integer in [1, min(student vocab {v_s}, teacher vocab {v_t})], got {vocab_size!r}"
        )
    vocab_size = int(vocab_size)
    if divergence not in DIVERGENCES:
        raise ValueError(f"divergence must be one of {DIVERGENCES}, got {divergence!r}")
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")
    if not isinstance(beta, numbers.Real) or not 0.0 <= float(beta) <= 1.0:
        raise ValueError(f"beta must be a number in [0, 1], got {beta!r}")
    if not isinstance(temperature, numbers.Real) or not (math.isfinite(temperature) and temperature > 0):
        raise ValueError(f"temperature must be a finite number > 0, got {temperature!r}")
    device = student_logits.device
    lead_shape = student_logits.shape[:-1]
    B, T = (1, lead_shape[0]) if student_logits.dim() == 2 else (lead_shape[0], lead_shape[1])
    if turn_ids is not None:
        _check_int_tensor("turn_ids", turn_ids, lead_shape, device)
    if target_ids is not None:
        _check_int_tensor("target_ids", target_ids, lead_shape, device)
        if target_ids.numel():
            _device_check(
                ((target_ids >= 0) & (target_ids < vocab_size)).all(),
                f"target_ids must lie in [0, vocab_size={vocab_size})",
            )
    window = _validate_window(turn_window, B, device)
    if turn_weights is not None:
        if not isinstance(turn_weights, torch.Tensor) or not turn_weights.dtype.is_floating_point:
            raise TypeError(f"turn_weights must be a float tensor shaped (B, num_turns), got {turn_weights!r:.80}")
        if turn_weights.dim() == 1 and student_logits.dim() == 2:
            turn_weights = turn_weights.unsqueeze(0)
        if turn_weights.dim() != 2 or turn_weights.shape[0] != B:
            raise ValueError(
                f"turn_weights must be shaped (B, num_turns) with B={B}, got {_shape_str(turn_weights.shape)}"
            )
        if turn_weights.device != device:
            raise ValueError(f"turn_weights is on {turn_weights.device} but the logits are on {device}")
        if num_turns is not None and num_turns != turn_weights.shape[1]:
            raise ValueError(f"num_turns={num_turns} but turn_weights has {turn_weights.shape[1]} turns")
        num_turns = turn_weights.shape[1]
    if num_turns is not None and (not isinstance(num_turns, numbers.Integral) or num_turns < 1):
        raise ValueError(f"num_turns must be a positive integer, got {num_turns!r}")
    backend = _resolve_backend(backend, device, student_logits.dtype)
    if backend != "torch" and (student_logits.dtype == torch.float64 or teacher_logits.dtype == torch.float64):
        raise TypeError(f"backend={backend!r} does not take float64 logits; use backend='torch'")
    # jsd at the endpoints is exactly TRL's special-casing: beta=1 reverse KL, beta=0 forward KL
    if divergence == "jsd" and float(beta) in (0.0, 1.0):
        divergence = "reverse_kl" if float(beta) == 1.0 else "forward_kl"

    # ---- token mask: N-sized ops on the turn ids ----
    student3 = student_logits.unsqueeze(0) if student_logits.dim() == 2 else student_logits
    teacher3 = teacher_logits.unsqueeze(0) if teacher_logits.dim() == 2 else teacher_logits
    if student3.stride(-1) != 1:
        student3 = student3.contiguous()
    if teacher3.stride(-1) != 1:
        teacher3 = teacher3.contiguous()
    ids = torch.zeros(B, T, dtype=torch.long, device=device) if turn_ids is None else turn_ids.reshape(B, T).long()
    keep = ids >= 0
    if isinstance(window, tuple):
        keep = keep & (ids >= window[0]) & (ids < window[1])
    elif window is not None:
        keep = keep & (ids >= window[:, :1]) & (ids < window[:, 1:])
    target3 = None if target_ids is None else target_ids.reshape(B, T).long()

    need_turns = return_stats or reduction == "turn_mean" or turn_weights is not None
    if need_turns and num_turns is None:
        num_turns = int(ids.max()) + 1 if ids.numel() else 1  # documented sync
        num_turns = max(num_turns, 1)
    if need_turns:
        _device_check(
            (torch.where(keep, ids, 0) < num_turns).all(),
            f"turn_ids must be < num_turns={num_turns} for kept tokens",
        )

    div, entropy, logp, logq = _FusedTurnKL.apply(
        student3, teacher3, keep, target3, divergence, float(beta), float(temperature), vocab_size, backend, inplace
    )

    # ---- weights and reductions: N-sized ---
    keep_f = keep.to(div.dtype)
    turn_index = torch.where(keep, ids, torch.zeros_like(ids))
    token_weight = keep_f
    if turn_weights is not None:
        token_weight = keep_f * turn_weights.to(div.dtype).gather(1, turn_index)
    weighted = div * token_weight
    flat_turn = None
    if need_turns:
        flat_turn = (torch.arange(B, device=device).unsqueeze(1) * num_turns + turn_index).reshape(-1)

    def per_turn_sum(values: torch.Tensor) -> torch.Tensor:
        out = torch.zeros(B * num_turns, dtype=div.dtype, device=device)
        return out.index_add(0, flat_turn, (values * keep_f).reshape(-1)).view(B, num_turns)

    if reduction == "none":
        loss = weighted if student_logits.dim() == 3 else weighted.squeeze(0)
    elif reduction == "sum":
        loss = weighted.sum()
    elif reduction == "mean":
        loss = weighted.sum() / keep_f.sum().clamp_min(1.0)
    elif reduction == "seq_mean_token_mean":
        seq_count = keep_f.sum(1)
        seq_mean = weighted.sum(1) / seq_count.clamp_min(1.0)
        loss = seq_mean.sum() / (seq_count > 0).sum().clamp_min(1)
    else:  # turn_mean
        turn_count = per_turn_sum(torch.ones_like(keep_f))
        turn_total = per_turn_sum(weighted)
        loss = (turn_total / turn_count.clamp_min(1.0)).sum() / (turn_count > 0).sum().clamp_min(1)

    if not return_stats:
        return loss

    def lead(x):
        return x if student_logits.dim() == 3 else x.squeeze(0)

    has_target = target_ids is not None
    return TurnKLResult(
        loss=loss,
        kl=lead(div),
        entropy=lead(entropy),
        token_kept=lead(keep),
        turn_token_count=per_turn_sum(torch.ones_like(keep_f)),
        turn_kl_sum=per_turn_sum(div.detach()),
        turn_entropy_sum=per_turn_sum(entropy),
        student_logprob=lead(logp) if has_target else None,
        teacher_logprob=lead(logq) if has_target else None,
        turn_abs_logratio_sum=per_turn_sum((logp - logq).abs()) if has_target else None,
        turn_neg_logprob_sum=per_turn_sum(-logp) if has_target else None,
    )
