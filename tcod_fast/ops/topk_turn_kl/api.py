"""Public entry point ``fused_topk_turn_kl``: validation, turn masks, reductions, autograd.

The layering is ``fused_turn_kl``'s (``tcod_fast/ops/turn_kl/api.py``):

1. ``fused_topk_turn_kl`` checks every argument before any kernel runs, builds the keep mask
   (``tcod_fast/ops/turns.py``), checks the teacher's top-k on the kept rows and sorts each row's
   ids (``tcod_fast/ops/topk.py``; ``N x K`` work), and picks a backend.
2. ``_FusedTopkTurnKL`` calls the ``torch.library`` custom op ``tcod_fast::topk_turn_kl_forward``,
   which streams the student logits and returns per-token divergence, entropy, sampled-token
   log-probs and the gradient, already multiplied by each token's coefficient in the reduction.
   Backward rescales only rows whose upstream gradient differs, with ``fused_turn_kl``'s
   ``tcod_fast::scale_grad_rows_``.
3. Reductions, turn weights and per-turn statistics are ``turns.py``'s, on ``N``-sized vectors.

The public signature and the custom op's argument list look like those of the other ops'
``api.py`` but are each op's own: a public function states its keywords in full, and
``torch.library`` derives a custom op's schema from its annotations; the logic behind them is
shared from ``tcod_fast/ops/``.
"""

from __future__ import annotations

import torch

from tcod_fast.ops import common
from tcod_fast.ops.common import FLOAT_DTYPES, compute_dtype, shape_str
from tcod_fast.ops.gradient_memory import empty_gradient
from tcod_fast.ops.logit_transform import LogitTransform, resolve_logit_transforms
from tcod_fast.ops.topk import check_tail_options, check_topk_tensors, prepare_topk
from tcod_fast.ops.topk_turn_kl import native_backend, torch_backend, triton_backend

# turn_kl.api also registers tcod_fast::scale_grad_rows_, which backward calls
from tcod_fast.ops.turn_kl.api import scale_stored_gradient, store_gradient
from tcod_fast.ops.turns import check_options, prepare_turns


def run_backend(
    backend, student, topk_ids, topk_logprobs, keep, target_ids, divergence, beta, temperature, tail, tail_eps,
    grad, grad_scale, want_entropy, student_transform,
):
    """One pass of the chosen backend (see ``torch_backend`` for the contract)."""
    module = {"native": native_backend, "triton": triton_backend}.get(backend, torch_backend)
    return module.forward(
        student, topk_ids, topk_logprobs, keep, target_ids, divergence, beta, temperature, tail, tail_eps, grad,
        grad_scale, want_entropy=want_entropy, student_transform=student_transform,
    )


@torch.library.custom_op("tcod_fast::topk_turn_kl_forward", mutates_args=())
def _topk_turn_kl_forward(
    student: torch.Tensor,
    topk_ids: torch.Tensor,
    topk_logprobs: torch.Tensor,
    keep: torch.Tensor,
    target_ids: torch.Tensor | None,
    grad_scale: torch.Tensor | None,
    divergence: str,
    beta: float,
    temperature: float,
    tail: str,
    tail_eps: float,
    compute_grad: bool,
    need_entropy: bool,
    backend: str,
    student_scale: float,
    student_cap: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-token ``(div, entropy, logp_target, logq_target)`` and ``grad_scale * d div / d student``
    (an empty tensor without ``compute_grad``). ``student_scale``, ``student_cap``: the student
    logits' map (``tcod_fast.ops.logit_transform.LogitTransform``)."""
    grad = empty_gradient(student) if compute_grad else None
    outs = run_backend(
        backend, student, topk_ids, topk_logprobs, keep, target_ids, divergence, beta, temperature, tail, tail_eps,
        grad, grad_scale, need_entropy, LogitTransform(student_scale, student_cap),
    )
    if grad is None:
        grad = student.new_empty(0)
    return (*outs, grad)


@_topk_turn_kl_forward.register_fake
def _(student, topk_ids, topk_logprobs, keep, target_ids, grad_scale, divergence, beta, temperature, tail, tail_eps,
      compute_grad, need_entropy, backend, student_scale, student_cap):
    outs = tuple(keep.new_empty(keep.shape, dtype=compute_dtype(student)) for _ in range(4))
    grad = student.new_empty(student.shape) if compute_grad else student.new_empty(0)
    return (*outs, grad)


class _FusedTopkTurnKL(torch.autograd.Function):
    """Differentiable per-token divergence; the gradient is computed in forward."""

    @staticmethod
    def forward(ctx, student, topk_ids, topk_logprobs, keep, target_ids, grad_scale, divergence, beta, temperature,
                tail, tail_eps, need_entropy, backend, student_transform):
        compute_grad = ctx.needs_input_grad[0]
        div, entropy, logp, logq, grad = torch.ops.tcod_fast.topk_turn_kl_forward(
            student, topk_ids, topk_logprobs, keep, target_ids, grad_scale, divergence, beta, temperature, tail,
            tail_eps, compute_grad, need_entropy, backend, *student_transform.as_floats(),
        )
        ctx.mark_non_differentiable(entropy, logp, logq)
        store_gradient(ctx, grad if compute_grad else None, grad_scale, backend)
        return div, entropy, logp, logq

    @staticmethod
    def backward(ctx, grad_div, *_unused):
        return (scale_stored_gradient(ctx, grad_div, "fused_topk_turn_kl"),) + (None,) * 13


# Evaluated eagerly (and treated as a constant) when torch.compile traces the op.
@torch._dynamo.assume_constant_result
def _native_available() -> bool:
    return native_backend.try_load()


def resolve_backend(backend, device, dtype):
    """The backend of ``fused_topk_turn_kl`` (``tcod_fast.ops.common.resolve_backend``)."""
    return common.resolve_backend(backend, device, dtype, native_backend, triton_backend, _native_available)


def fused_topk_turn_kl(
    student_logits: torch.Tensor,
    teacher_topk_ids: torch.Tensor,
    teacher_topk_logprobs: torch.Tensor,
    turn_ids: torch.Tensor | None = None,
    *,
    turn_window=None,
    turn_weights: torch.Tensor | None = None,
    target_ids: torch.Tensor | None = None,
    divergence: str = "reverse_kl",
    beta: float = 0.5,
    tail: str = "bucket",
    tail_eps: float = 1e-6,
    temperature: float = 1.0,
    softcap: float | tuple[float | None, float | None] | None = None,
    logit_scale: float | tuple[float | None, float | None] | None = None,
    reduction: str = "mean",
    return_stats: bool = False,
    num_turns: int | None = None,
    cu_seqlens: torch.Tensor | None = None,
    backend: str = "auto",
):
    """Exact divergence between student logits and a sparse teacher (its top-k log-probs), with turns.

    For teachers behind an inference server (vLLM, SGLang) that return, per token, only the
    log-probs of their top-k tokens. One streaming pass over the student logits (online softmax,
    float32 accumulation); nothing ``tokens x vocab`` is allocated besides the gradient, which is
    written during the forward pass in the logits' dtype and only scaled in backward (on CPU,
    from 32 MB, into a buffer kept between calls: ``tcod_fast/ops/gradient_memory.py``).

    What it computes, per kept token: ``p = softmax(student_logits / temperature)`` over the V
    columns, ``S`` the row's valid top-k ids, ``q_i = exp(teacher_topk_logprobs_i)``.

    * ``tail="bucket"`` (default): K+1 outcomes, the ids in ``S`` plus one tail.
      ``p_tail = sum_{j not in S} p_j``, computed from a log-sum-exp over the complement itself
      (no cancellation when the top-k hold almost all of the mass); ``q_tail = max(1 - sum_S q,
      tail_eps)``. When ``S`` covers the whole vocabulary there is no tail outcome.
    * ``tail="renormalize"``: both distributions restricted to ``S`` and renormalised; columns
      outside ``S`` get no gradient.

    ``divergence``: reverse KL ``sum_o pi_o (log pi_o - log q_o)``, forward KL
    ``sum_o q_o (log q_o - log pi_o)``, or ``jsd``, the generalised JSD of ``fused_turn_kl``
    (``beta*KL(q||m) + (1-beta)*KL(pi||m)``, ``m = (1-beta) pi + beta q``; ``beta=1`` reverse,
    ``beta=0`` forward, as in TRL), all over the outcomes ``o`` above (``pi`` the student's).

    Gradient (to the student logits only). With ``o(v)`` the outcome of column ``v`` (its own id
    in ``S``, else the tail) and ``z = student_logits / temperature``, in bucket mode every
    column outside ``S`` shares the tail's log-ratio:

    * reverse KL: ``dD/dz_v = p_v (log pi_o(v) - log q_o(v) - D)``;
    * forward KL: ``dD/dz_v = p_v sum_o q_o - q_o(v) p_v / pi_o(v)`` (``= p_v - q_v`` on ``S``
      when the teacher's outcomes sum to 1);
    * JSD: ``dD/dz_v = (1-beta) p_v (log pi_o(v) - log m_o(v) - KL(pi||m))``;

    (derivation: ``dpi_o/dz_v = p_v ([v in o] - pi_o)``, and ``dD/dpi_o`` is ``log pi_o - log q_o
    + 1``, ``-q_o/pi_o`` and ``(1-beta)(log pi_o - log m_o)`` respectively). So the gradient is a
    second streaming pass over the row, as in ``fused_turn_kl``. In renormalize mode the same
    formulas hold with ``p_v`` replaced by ``pi_v`` on ``S`` and 0 elsewhere.
    ``d/d student_logits = (1/temperature) d/dz``.

    Args:
        student_logits: ``(B, T, V)`` or ``(N, V)``, float32/bfloat16/float16 (float64 with the
            torch backend). Receives the gradient. Last dim contiguous; row strides are free.
        teacher_topk_ids: integer ``(B, T, K)`` (or ``(N, K)``); within a row unique ids in
            ``[0, V)``, ``-1`` = padding (so K may be ragged per token).
        teacher_topk_logprobs: float ``(B, T, K)``, the teacher's log-probs of those ids exactly as
            the server returns them (float32; other float dtypes are converted). Ignored at
            padding. Rows that are not kept are neither checked nor read.
        turn_ids, turn_window, turn_weights, num_turns, reduction: exactly as in
            :func:`tcod_fast.fused_turn_kl` (token masks, windows, weights and the reductions
            ``mean``, ``sum``, ``none``, ``seq_mean_token_mean``, ``turn_mean``).
        cu_seqlens: a packed (padding-free) batch, exactly as in :func:`tcod_fast.fused_turn_kl`:
            ``(S + 1,)`` int32/int64 bounds of the ``S`` sequences laid end to end in ``(N, V)``
            or ``(1, N, V)`` logits (and ``(N, K)`` or ``(1, N, K)`` top-k); ``turn_window``
            ``(S, 2)``, ``turn_weights`` ``(S, num_turns)``, the per-turn statistics and the
            per-sequence reductions are then per packed sequence.
        target_ids: sampled tokens (integer, the leading shape). The stats then hold the student's
            full-vocabulary ``log p(a)``, and the teacher's ``log q(a)`` taken from the top-k when
            ``a`` is among them, **NaN otherwise** (and so NaN in ``turn_abs_logratio_sum`` for that
            turn). Servers return the sampled token's log-prob with the top-k (vLLM's
            ``logprobs``/``prompt_logprobs`` always include it): append it to the top-k (as one
            more id, unless already there) to have it always.
        divergence, beta: ``"reverse_kl"`` (default), ``"forward_kl"`` or ``"jsd"`` (with ``beta``).
        tail: ``"bucket"`` (default) or ``"renormalize"``.
        tail_eps: floor of the teacher's tail mass in bucket mode (``0 < tail_eps < 1``).
        temperature: divides the student logits only; the teacher's log-probs are used as given.
            For a matching temperature, the server must return log-probs of the
            temperature-scaled distribution: vLLM's V1 engine returns those of the raw logits
            (temperature 1) unless started with ``--logprobs-mode processed_logprobs`` (check that
            your version applies it to prompt log-probs too); with full teacher logits,
            ``log_softmax(teacher_logits / temperature)``. Top-k log-probs at temperature 1 cannot
            be converted exactly (the new normaliser needs the whole vocabulary).
        softcap, logit_scale: the student model's logit map, for raw student logits taken
            before it: they become ``softcap * tanh(logit_scale * x / softcap)``
            (``logit_scale * x`` without a soft cap) before the temperature divides them, as in
            :func:`tcod_fast.fused_turn_kl`, with the gradient through the ``tanh``. Student side
            only: the teacher's top-k log-probs are already normalised, so a number is the
            student's and a pair ``(student, teacher)`` must have None as its teacher entry (any
            other teacher value is an error). Every backend applies it as it reads the logits.
        return_stats: return a :class:`~tcod_fast.ops.turns.TurnKLResult` (loss, per-token
            divergence, full-vocabulary student entropy, sampled-token log-probs, per-turn sums).
        backend: ``"auto"`` (Triton on CUDA, native C++ on CPU, torch for float64), ``"triton"``,
            ``"native"`` or ``"torch"``.

    Returns:
        The loss (float32; per-token with the leading shape for ``reduction="none"``), or a
        ``TurnKLResult``.

    Notes:
        ``-inf`` student logits contribute exactly 0; masked rows never produce NaN. A teacher
        ``-inf`` log-prob where the student has mass is a true ``+inf`` reverse KL, and student
        ``-inf`` under teacher mass (including a student that puts no mass outside ``S`` while
        ``q_tail >= tail_eps``) a ``+inf`` forward KL: reported, not hidden. The op is registered
        through ``torch.library`` (``tcod_fast::topk_turn_kl_forward``) with a fake implementation,
        so losses calling it compile with ``torch.compile(fullgraph=True)``; it does no host
        synchronisation (pass ``num_turns`` for per-turn statistics on GPU). Backward runs once
        per forward (``retain_graph=True`` through the op raises).
    """
    # ---- validation: everything is checked before any kernel runs ----
    if not isinstance(student_logits, torch.Tensor):
        raise TypeError(f"student_logits must be a torch.Tensor, got {type(student_logits).__name__}")
    if student_logits.dtype not in FLOAT_DTYPES:
        raise TypeError(f"student_logits must be float32/bfloat16/float16/float64, got {student_logits.dtype}")
    if student_logits.dim() not in (2, 3):
        raise ValueError(
            f"student_logits must be (B, T, V) or (N, V), got {student_logits.dim()}-D shape "
            f"{shape_str(student_logits.shape)}"
        )
    device = student_logits.device
    vocab = student_logits.shape[-1]
    lead_shape = student_logits.shape[:-1]
    check_topk_tensors(teacher_topk_ids, teacher_topk_logprobs, lead_shape, vocab, device, "student_logits")
    divergence = check_options(divergence, reduction, beta, temperature)
    check_tail_options(tail, tail_eps)
    student_transform, _ = resolve_logit_transforms(softcap, logit_scale, teacher_logits=False)
    turns = prepare_turns(
        lead_shape, device, turn_ids=turn_ids, turn_window=turn_window, turn_weights=turn_weights,
        target_ids=target_ids, vocab_size=vocab, reduction=reduction, return_stats=return_stats,
        num_turns=num_turns, cu_seqlens=cu_seqlens,
    )
    backend = resolve_backend(backend, device, student_logits.dtype)
    ids3 = teacher_topk_ids.unsqueeze(0) if turns.flat else teacher_topk_ids
    logq3 = teacher_topk_logprobs.unsqueeze(0) if turns.flat else teacher_topk_logprobs
    topk_ids, topk_logprobs = prepare_topk(ids3, logq3, turns.keep, vocab, compute_dtype(student_logits))

    # ---- the one pass over the logits ----
    student3 = student_logits.unsqueeze(0) if turns.flat else student_logits
    if student3.stride(-1) != 1:
        student3 = student3.contiguous()
    coeff = None if reduction == "none" else turns.token_coefficients(reduction, torch.float32)
    grad_scale = None if coeff is None else torch.where(coeff != 0, coeff, torch.ones_like(coeff))
    div, entropy, logp, logq = _FusedTopkTurnKL.apply(
        student3, topk_ids, topk_logprobs, turns.keep, turns.target_ids, grad_scale, divergence, float(beta),
        float(temperature), tail, float(tail_eps), return_stats, backend, student_transform,
    )

    # ---- weights, reductions and per-turn statistics: N-sized ----
    loss = turns.reduce(div, reduction, coeff)
    if not return_stats:
        return loss
    return turns.result(loss, div, entropy, logp, logq)
