"""Public entry point ``fused_turn_kl``: validation, turn masks, reductions, autograd.

Layers, top to bottom:

1. ``fused_turn_kl`` checks every argument (before any kernel runs), builds the per-token keep
   mask from ``turn_ids`` and ``turn_window`` (an ``N``-sized op, never ``N x V``), and picks a
   backend.
2. ``_FusedTurnKL`` (autograd) calls the ``torch.library`` custom op
   ``tcod_fast::turn_kl_forward`` which streams the logits once and returns per-token
   divergence, entropy, sampled-token log-probs and the gradient of each token's divergence,
   already multiplied by the token's coefficient in the reduction (the upstream gradient a
   plain ``loss.backward()`` will bring). Backward compares the incoming per-token gradient
   with that scale and rescales, in place, only the rows where they differ
   (``tcod_fast::scale_grad_rows_``): for the usual scalar loss it touches nothing ``N x V``.
3. Reductions, turn weights and per-(sequence, turn) statistics (``tcod_fast/ops/turns.py``,
   shared by every op) are plain torch ops on ``N``-sized vectors.

The public signature and the custom op's argument list look like those of the other ops'
``api.py`` but are each op's own: a public function states its keywords in full, and
``torch.library`` derives a custom op's schema from its annotations; the logic behind them is
shared from ``tcod_fast/ops/``. ``turn_kl_forward`` and ``turn_kl_forward_inplace`` take the same
arguments but are two custom ops, since only the second mutates ``student`` (a fact of the schema,
not a flag).
"""

import torch

from tcod_fast.ops.common import FLOAT_DTYPES, compute_dtype, resolve_backend, shape_str
from tcod_fast.ops.gradient_memory import empty_gradient
from tcod_fast.ops.logit_transform import as_floats, from_floats, resolve_logit_transforms
from tcod_fast.ops.turn_kl import native_backend, torch_backend, triton_backend
from tcod_fast.ops.turns import check_options, prepare_turns, resolve_vocab_size


# --------------------------------------------------------------------------------------------
# custom op: the one pass over the logits
# --------------------------------------------------------------------------------------------
def _run_backend(
    backend, student, teacher, keep, target_ids, grad_scale, divergence, beta, temperature, vocab_size, grad,
    need_entropy, logit_transform,
):
    args = (student, teacher, keep, target_ids, divergence, beta, temperature, vocab_size, grad, grad_scale)
    student_transform, teacher_transform = from_floats(logit_transform)
    transforms = dict(student_transform=student_transform, teacher_transform=teacher_transform)
    if backend == "native":  # the only backend where the entropy sum is worth skipping (~9%)
        return native_backend.forward(*args, want_entropy=need_entropy, **transforms)
    if backend == "triton":
        return triton_backend.forward(*args, **transforms)
    return torch_backend.forward(*args, **transforms)


@torch.library.custom_op("tcod_fast::turn_kl_forward", mutates_args=())
def _turn_kl_forward(
    student: torch.Tensor,
    teacher: torch.Tensor,
    keep: torch.Tensor,
    target_ids: torch.Tensor | None,
    grad_scale: torch.Tensor | None,
    divergence: str,
    beta: float,
    temperature: float,
    vocab_size: int,
    compute_grad: bool,
    need_entropy: bool,
    backend: str,
    logit_transform: list[float],
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-token (div, entropy, logp_target, logq_target) and grad_scale * d div/d student (or an empty grad).

    ``need_entropy=False`` lets a backend return zeros for the entropy instead of computing it.
    ``logit_transform``: ``[scale_s, cap_s, scale_t, cap_t]`` (``tcod_fast.ops.logit_transform``)."""
    grad = empty_gradient(student) if compute_grad else None
    outs = _run_backend(
        backend, student, teacher, keep, target_ids, grad_scale, divergence, beta, temperature, vocab_size, grad,
        need_entropy, logit_transform,
    )
    if grad is None:
        grad = student.new_empty(0)
    return (*outs, grad)


@_turn_kl_forward.register_fake
def _(
    student, teacher, keep, target_ids, grad_scale, divergence, beta, temperature, vocab_size, compute_grad,
    need_entropy, backend, logit_transform,
):
    outs = tuple(keep.new_empty(keep.shape, dtype=compute_dtype(student)) for _ in range(4))
    grad = student.new_empty(student.shape) if compute_grad else student.new_empty(0)
    return (*outs, grad)


@torch.library.custom_op("tcod_fast::turn_kl_forward_inplace", mutates_args=("student",))
def _turn_kl_forward_inplace(
    student: torch.Tensor,
    teacher: torch.Tensor,
    keep: torch.Tensor,
    target_ids: torch.Tensor | None,
    grad_scale: torch.Tensor | None,
    divergence: str,
    beta: float,
    temperature: float,
    vocab_size: int,
    need_entropy: bool,
    backend: str,
    logit_transform: list[float],
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Like ``turn_kl_forward`` but overwrites ``student`` with the gradient (saves one N x V buffer)."""
    return tuple(
        _run_backend(
            backend, student, teacher, keep, target_ids, grad_scale, divergence, beta, temperature, vocab_size, student,
            need_entropy, logit_transform,
        )
    )


@_turn_kl_forward_inplace.register_fake
def _(student, teacher, keep, target_ids, grad_scale, divergence, beta, temperature, vocab_size, need_entropy, backend,
      logit_transform):
    return tuple(keep.new_empty(keep.shape, dtype=compute_dtype(student)) for _ in range(4))


@torch.library.custom_op("tcod_fast::scale_grad_rows_", mutates_args=("grad",))
def _scale_grad_rows_(grad: torch.Tensor, factor: torch.Tensor, backend: str) -> None:
    """``grad[b, t, :] *= factor[b, t]`` in place; the native and Triton kernels skip rows whose
    factor is exactly 1, so an upstream gradient equal to the forward's scale costs no N x V pass."""
    if backend == "native" and grad.dtype in native_backend.SUPPORTED_DTYPES:
        native_backend.scale_rows_(grad, factor)
    elif backend == "triton" and grad.dtype != torch.float64:
        triton_backend.scale_rows_(grad, factor)
    else:
        grad.mul_(factor.to(grad.dtype if grad.dtype == torch.float64 else torch.float32).unsqueeze(-1))


@_scale_grad_rows_.register_fake
def _(grad, factor, backend):
    return None


class _FusedTurnKL(torch.autograd.Function):
    """Differentiable per-token divergence; the gradient is computed in forward."""

    @staticmethod
    def forward(
        ctx, student, teacher, keep, target_ids, grad_scale, divergence, beta, temperature, vocab_size, need_entropy,
        backend, inplace, logit_transform,
    ):
        compute_grad = ctx.needs_input_grad[0]
        if inplace and compute_grad:
            div, entropy, logp, logq = torch.ops.tcod_fast.turn_kl_forward_inplace(
                student, teacher, keep, target_ids, grad_scale, divergence, beta, temperature, vocab_size,
                need_entropy, backend, logit_transform,
            )
            grad = student
        else:
            div, entropy, logp, logq, grad = torch.ops.tcod_fast.turn_kl_forward(
                student, teacher, keep, target_ids, grad_scale, divergence, beta, temperature, vocab_size,
                compute_grad, need_entropy, backend, logit_transform,
            )
        ctx.mark_non_differentiable(entropy, logp, logq)
        store_gradient(ctx, grad if compute_grad else None, grad_scale, backend)
        return div, entropy, logp, logq

    @staticmethod
    def backward(ctx, grad_div, *_unused):
        grad = scale_stored_gradient(ctx, grad_div, "fused_turn_kl")
        return grad, None, None, None, None, None, None, None, None, None, None, None, None


def store_gradient(ctx, grad: torch.Tensor | None, grad_scale: torch.Tensor | None, backend: str) -> None:
    """Forward's half of :func:`scale_stored_gradient`: keeps ``grad`` (``grad_scale * d div / d
    student``, or None when no gradient is wanted) for backward. Shared with ``fused_topk_turn_kl``."""
    if grad is not None:
        ctx.save_for_backward(grad, grad_scale)
    ctx.backend = backend
    ctx.backward_done = False


def scale_stored_gradient(ctx, grad_div: torch.Tensor, op_name: str) -> torch.Tensor:
    """Backward of an op whose forward stored ``grad_scale * d div / d student`` with
    :func:`store_gradient`: the student gradient for the upstream per-token gradient
    ``grad_div``. Shared with ``fused_topk_turn_kl``.

    The stored gradient already carries grad_scale (the reduction's coefficients); rows whose
    upstream gradient equals it (factor exactly 1) are left as they are. In place: the stored
    gradient is the op's own buffer (or the student logits the user gave up with inplace=True),
    so no second N x V tensor is ever allocated, and backward can run only once.
    """
    if ctx.backward_done:
        raise RuntimeError(
            f"{op_name} scales its stored gradient in place, so its backward can run only once "
            "(do not use retain_graph=True through it)"
        )
    ctx.backward_done = True
    grad, grad_scale = ctx.saved_tensors
    factor = grad_div if grad_scale is None else grad_div / grad_scale
    torch.ops.tcod_fast.scale_grad_rows_(grad, factor, ctx.backend)
    return grad


# --------------------------------------------------------------------------------------------
# backend choice
# --------------------------------------------------------------------------------------------
# Evaluated eagerly (and treated as a constant) when torch.compile traces the op: building or
# loading the extension is not something to trace.
@torch._dynamo.assume_constant_result
def _native_available() -> bool:
    return native_backend.try_load()


def _resolve_backend(backend, device, dtype):
    return resolve_backend(backend, device, dtype, native_backend, triton_backend, _native_available)


def _rows_overlap(x: torch.Tensor) -> bool:
    """True when two elements of ``x`` may share memory (an expanded or overlapping view).

    Sufficient test on the strides: ordered by stride, each dimension must step past everything
    the smaller ones span (exotic interleaved layouts are conservatively reported too)."""
    span = 1
    for stride, size in sorted((x.stride(d), x.shape[d]) for d in range(x.dim()) if x.shape[d] > 1):
        if stride < span:
            return True
        span += (size - 1) * stride
    return False


def _memory_overlaps(a: torch.Tensor, b: torch.Tensor) -> bool:
    """True when the memory ranges of ``a`` and ``b`` intersect."""
    if a.numel() == 0 or b.numel() == 0 or a.device != b.device:
        return False

    def extent(x):
        start = x.data_ptr()
        return start, start + (1 + sum((n - 1) * s for n, s in zip(x.shape, x.stride()))) * x.element_size()

    (a0, a1), (b0, b1) = extent(a), extent(b)
    return a0 < b1 and b0 < a1


def check_inplace_target(student: torch.Tensor, teacher: torch.Tensor) -> None:
    """``inplace=True`` overwrites ``student`` row by row while rows are still being read."""
    if _rows_overlap(student):
        raise ValueError(
            "inplace=True writes the gradient over student_logits, but its rows share memory (an expanded "
            f"or overlapping view with strides {tuple(student.stride())} for shape {shape_str(student.shape)}); "
            "pass logits that own their memory, or inplace=False"
        )
    if _memory_overlaps(student, teacher):
        raise ValueError(
            "inplace=True writes the gradient over student_logits, but student_logits and teacher_logits "
            "share memory; pass separate tensors, or inplace=False"
        )


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
    softcap: float | tuple[float | None, float | None] | None = None,
    logit_scale: float | tuple[float | None, float | None] | None = None,
    vocab_size: int | None = None,
    reduction: str = "mean",
    return_stats: bool = False,
    num_turns: int | None = None,
    cu_seqlens: torch.Tensor | None = None,
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
            sequence (``(S, 2)`` with ``cu_seqlens``). A token is kept iff
            ``turn_id >= 0 and lo <= turn_id < hi``.
        turn_weights: ``(B, num_turns)`` float (``(S, num_turns)`` with ``cu_seqlens``;
            ``(num_turns,)`` allowed for ``(N, V)`` input without it);
            each kept token's loss is multiplied by its turn's weight (T-DUR / SOD weights).
            Turn weights do not change the normalising token counts of the reductions. They must
            be finite (NaN or inf is an error); negative weights are allowed (the loss is linear
            in them).
        target_ids: integer tensor with the leading shape: sampled tokens; their student and
            teacher log-probs are returned in the stats.
        divergence: ``"reverse_kl"`` KL(p_student || q_teacher) (default), ``"forward_kl"``
            KL(q || p), or ``"jsd"``: TRL's generalised JSD
            ``beta*KL(q||m) + (1-beta)*KL(p||m)``, ``m = (1-beta) p + beta q``, with ``beta=1``
            giving reverse KL and ``beta=0`` forward KL exactly as TRL does.
        temperature: both logits are divided by it (no ``temperature**2`` factor is applied).
            Any value in ``[1e-37, 1e37]`` (outside it ``1/temperature`` is no normal float32:
            an error).
        softcap, logit_scale: the model's own logit map, for raw logits taken before it (e.g.
            Gemma 2's ``final_logit_softcapping``, a ``logit_scale`` config field): each side's
            logits ``x`` become ``softcap * tanh(logit_scale * x / softcap)`` (``logit_scale * x``
            without a soft cap), *before* the temperature divides them; the gradient goes through
            the ``tanh`` to the raw student logits. Each is None (nothing), a number (both sides)
            or a pair ``(student, teacher)`` with None for nothing on that side. ``softcap`` must
            be positive and finite, ``logit_scale`` finite and non-zero. With a soft cap a
            ``-inf`` logit becomes ``-softcap``, as in the model. Every backend (torch, native,
            triton) applies the map in its kernel as it reads the logits, and the gradient's
            chain rule there: no transformed copy of the logits is made (the torch backend maps
            one chunk of rows at a time). Without the keywords nothing changes.
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
        cu_seqlens: a packed (padding-free) batch: ``S`` sequences laid end to end in ``(N, V)``
            or ``(1, N, V)`` logits, sequence ``s`` being tokens ``cu_seqlens[s]:cu_seqlens[s+1]``
            (FlashAttention's varlen convention: int32 or int64 ``(S + 1,)`` on the logits'
            device, ``cu_seqlens[0] == 0``, non-decreasing, ``cu_seqlens[-1] == N``; equal
            consecutive entries are empty sequences). Every per-sequence input and output is
            then per packed sequence: ``turn_window`` ``(S, 2)``, ``turn_weights``
            ``(S, num_turns)``, the ``(S, num_turns)`` statistics, and the
            ``seq_mean_token_mean`` and ``turn_mean`` reductions. The results equal, bit for bit
            on CPU, those of the padded ``(S, T, V)`` batch of the same sequences. The value
            checks do not synchronise on accelerators (asynchronous asserts), so the op still
            compiles with ``fullgraph=True``. An error with ``(B, T, V)`` logits, ``B > 1``.
            ``tcod_fast.cu_seqlens_from_position_ids`` builds it from restarting ``position_ids``.
        inplace: write the gradient over ``student_logits`` instead of a new buffer (the logits
            are destroyed; saves one ``tokens x vocab`` allocation). Without it, on CPU a
            gradient of 32 MB or more goes to a buffer kept between calls and written again
            once nothing holds it (``tcod_fast/ops/gradient_memory.py``). An error when rows of
            ``student_logits`` share memory (an expanded or overlapping view) or when it shares
            memory with ``teacher_logits``.
        backend: ``"auto"`` (Triton on CUDA, native C++ on CPU, torch otherwise), ``"triton"``,
            ``"native"`` or ``"torch"``.

    Returns:
        The loss (float32; per-token for ``reduction="none"``), or a ``TurnKLResult``.

    Notes:
        Exact (float32 accumulation, relative error ~1e-6) at any logit scale and temperature:
        logits are taken relative to their row maxima before the temperature divides them, so
        scaled logits 1e14 apart give the one-hot answer, a finite difference of scaled logits.
        ``-inf`` logits at the same entries of student and teacher contribute exactly 0. A
        teacher ``-inf`` where the student has mass is a true ``+inf`` reverse KL (and a
        student ``-inf`` under teacher mass a ``+inf`` forward KL); it is reported, not hidden.
        A NaN logit in a kept row makes that row's divergence, and so the loss, NaN, and its
        whole gradient row NaN (autograd's answer on the float64 reference); rows that are not
        kept never leak NaN. An empty vocabulary (``V = 0``) is an error; an empty batch
        (``B``, ``T`` or ``N`` = 0) gives loss 0 (an empty tensor for ``"none"``) and
        zero-size gradients, for every reduction and backend.
    """
    # ---- validation: everything is checked before any kernel runs ----
    for name, x in (("student_logits", student_logits), ("teacher_logits", teacher_logits)):
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
        if x.dtype not in FLOAT_DTYPES:
            raise TypeError(f"{name} must be float32/bfloat16/float16/float64, got {x.dtype}")
        if x.dim() not in (2, 3):
            raise ValueError(f"{name} must be (B, T, V) or (N, V), got {x.dim()}-D shape {shape_str(x.shape)}")
    if student_logits.device != teacher_logits.device:
        raise ValueError(
            f"student_logits is on {student_logits.device} but teacher_logits is on {teacher_logits.device}"
        )
    if student_logits.shape[:-1] != teacher_logits.shape[:-1]:
        raise ValueError(
            f"student_logits leading shape {shape_str(student_logits.shape[:-1])} does not match "
            f"teacher_logits leading shape {shape_str(teacher_logits.shape[:-1])}"
        )
    vocab_size = resolve_vocab_size(
        student_logits.shape[-1], teacher_logits.shape[-1], vocab_size, "student_logits", "teacher_logits", "columns"
    )
    divergence = check_options(divergence, reduction, beta, temperature)
    logit_transform = as_floats(*resolve_logit_transforms(softcap, logit_scale))
    device = student_logits.device
    turns = prepare_turns(
        student_logits.shape[:-1], device, turn_ids=turn_ids, turn_window=turn_window, turn_weights=turn_weights,
        target_ids=target_ids, vocab_size=vocab_size, reduction=reduction, return_stats=return_stats,
        num_turns=num_turns, cu_seqlens=cu_seqlens,
    )
    backend = _resolve_backend(backend, device, student_logits.dtype)
    if backend != "torch" and (student_logits.dtype == torch.float64 or teacher_logits.dtype == torch.float64):
        raise TypeError(f"backend={backend!r} does not take float64 logits; use backend='torch'")

    # ---- the one pass over the logits ----
    student3 = student_logits.unsqueeze(0) if turns.flat else student_logits
    teacher3 = teacher_logits.unsqueeze(0) if turns.flat else teacher_logits
    if student3.stride(-1) != 1:
        student3 = student3.contiguous()
    if teacher3.stride(-1) != 1:
        teacher3 = teacher3.contiguous()
    if inplace:
        check_inplace_target(student3, teacher3)
    # The reduction's coefficient of each token (0 where dropped): the gradient is written
    # already multiplied by it (1 where it is 0, so a per-token use of `kl` still gets its own).
    coeff = None if reduction == "none" else turns.token_coefficients(reduction, torch.float32)
    grad_scale = None if coeff is None else torch.where(coeff != 0, coeff, torch.ones_like(coeff))
    div, entropy, logp, logq = _FusedTurnKL.apply(
        student3, teacher3, turns.keep, turns.target_ids, grad_scale, divergence, float(beta), float(temperature),
        vocab_size, return_stats, backend, inplace, logit_transform,
    )

    # ---- weights, reductions and per-turn statistics: N-sized ----
    loss = turns.reduce(div, reduction, coeff)
    if not return_stats:
        return loss
    return turns.result(loss, div, entropy, logp, logq)
