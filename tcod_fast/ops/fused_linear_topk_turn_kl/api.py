"""Public entry point ``fused_linear_topk_turn_kl``: validation, masks, reductions, autograd.

The layering is ``fused_linear_turn_kl``'s: the arguments are checked before any compute, the
reduction becomes one coefficient per token (``tcod_fast/ops/turns.py``), and the
``torch.library`` custom op ``tcod_fast::fused_linear_topk_turn_kl_forward`` (``chunked.py``)
produces the gradients during the forward pass, with the autograd of ``tcod_fast/ops/linear_head.py``.
When the per-token divergence itself is differentiated (``reduction="none"``, or ``result.kl`` in
another loss) the coefficients are only known in backward, which then recomputes the logits
chunks (one more GEMM); nothing ``N x V`` is stored for it.

The public signature and the custom op's argument list look like those of the other ops'
``api.py`` but are each op's own: a public function states its keywords in full, and
``torch.library`` derives a custom op's schema from its annotations; the logic behind them is
shared from ``tcod_fast/ops/``.
"""

from __future__ import annotations

import numbers
from dataclasses import dataclass

import torch

from tcod_fast.ops.common import check_float_tensor, compute_dtype
from tcod_fast.ops.fused_linear_topk_turn_kl import chunked
from tcod_fast.ops.linear_head import check_head, fake_outputs, linear_op_backward, linear_op_forward
from tcod_fast.ops.logit_transform import LogitTransform, resolve_logit_transforms
from tcod_fast.ops.topk import check_tail_options, check_topk_tensors, prepare_topk
from tcod_fast.ops.topk_turn_kl.api import resolve_backend
from tcod_fast.ops.turns import check_options, prepare_turns


@torch.library.custom_op("tcod_fast::fused_linear_topk_turn_kl_forward", mutates_args=())
def _fused_linear_topk_forward(
    student_hidden: torch.Tensor,
    student_weight: torch.Tensor,
    student_bias: torch.Tensor | None,
    topk_ids: torch.Tensor,
    topk_logprobs: torch.Tensor,
    keep: torch.Tensor,
    target_ids: torch.Tensor | None,
    token_scale: torch.Tensor | None,
    divergence: str,
    beta: float,
    temperature: float,
    tail: str,
    tail_eps: float,
    want_hidden_grad: bool,
    want_weight_grad: bool,
    want_bias_grad: bool,
    need_entropy: bool,
    chunk_rows: int,
    backend: str,
    student_scale: float,
    student_cap: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-token ``(div, entropy, logp_target, logq_target)`` ``(B, T)`` and the gradients of
    ``sum_n token_scale_n div_n``: ``dh (B, T, H)``, ``dW (V, H)``, ``db (V,)`` in the compute dtype
    (empty tensors for those not asked for, or without ``token_scale``). ``student_scale``,
    ``student_cap``: the logits' map (``tcod_fast.ops.logit_transform.LogitTransform``)."""
    return chunked.forward(
        student_hidden, student_weight, student_bias, topk_ids, topk_logprobs, keep, target_ids, token_scale,
        divergence, beta, temperature, tail, tail_eps, want_hidden_grad, want_weight_grad, want_bias_grad,
        need_entropy, chunk_rows, backend, LogitTransform(student_scale, student_cap),
    )


@_fused_linear_topk_forward.register_fake
def _(student_hidden, student_weight, student_bias, topk_ids, topk_logprobs, keep, target_ids, token_scale,
      divergence, beta, temperature, tail, tail_eps, want_hidden_grad, want_weight_grad, want_bias_grad, need_entropy,
      chunk_rows, backend, student_scale, student_cap):
    return fake_outputs(student_hidden, student_weight, student_bias, keep, token_scale, want_hidden_grad,
                        want_weight_grad, want_bias_grad)


@dataclass(frozen=True)
class _Config:
    divergence: str
    beta: float
    temperature: float
    tail: str
    tail_eps: float
    need_entropy: bool
    chunk_rows: int
    backend: str
    grad_enabled: bool
    student_transform: LogitTransform

    def run(self, h, w, b, ids, logq, keep, target_ids, token_scale, want_h, want_w, want_b):
        """The custom op on these inputs (see ``tcod_fast.ops.linear_head``)."""
        return torch.ops.tcod_fast.fused_linear_topk_turn_kl_forward(
            h, w, b, ids, logq, keep, target_ids, token_scale, self.divergence, self.beta, self.temperature,
            self.tail, self.tail_eps, want_h, want_w, want_b, self.need_entropy, self.chunk_rows, self.backend,
            *self.student_transform.as_floats(),
        )


class _FusedLinearTopkTurnKL(torch.autograd.Function):
    """Outputs ``(loss = sum_n coeff_n div_n, div, entropy, logp_target, logq_target)``; gradients
    flow to the hidden states, weight and bias."""

    @staticmethod
    def forward(ctx, h, w, b, ids, logq, keep, target_ids, coeff, seq_index, num_seqs, config):
        return linear_op_forward(
            ctx, config, coeff, h, w, b, ids, logq, keep, target_ids, seq_index=seq_index, num_seqs=num_seqs
        )

    @staticmethod
    def backward(ctx, grad_loss, grad_div, *_unused):
        return (*linear_op_backward(ctx, grad_loss, grad_div), None, None, None, None, None, None, None, None)


def fused_linear_topk_turn_kl(
    student_hidden: torch.Tensor,
    student_weight: torch.Tensor,
    teacher_topk_ids: torch.Tensor,
    teacher_topk_logprobs: torch.Tensor,
    turn_ids: torch.Tensor | None = None,
    *,
    student_bias: torch.Tensor | None = None,
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
    chunk_size: int | None = None,
):
    """:func:`tcod_fast.fused_topk_turn_kl` of ``student_hidden @ student_weight.T + student_bias``,
    without a ``tokens x vocab`` tensor.

    Same values, statistics, masks, reductions and gradient as ``fused_topk_turn_kl`` on the
    materialised logits. Logits are formed a chunk of kept rows at a time in float32 straight from
    the matmul, turned into their gradient in place by the logits op's row kernel, and contracted
    into ``dh``, ``dW`` and ``db`` at once; rows outside the turn mask cost no matmul work.

    Args:
        student_hidden: ``(B, T, H)`` or ``(N, H)``, float32/bfloat16/float16 (float64 with the torch
            backend); any row strides. Receives a gradient.
        student_weight: ``(V, H)`` LM-head weight; receives a gradient (accumulated in float32,
            returned in its dtype). A non-float32 weight is upcast one 4096-row block at a time.
        teacher_topk_ids, teacher_topk_logprobs: ``(B, T, K)`` or ``(N, K)``, as in
            ``fused_topk_turn_kl`` (ids in ``[0, V)``, unique per row, ``-1`` = padding).
        student_bias: ``(V,)`` or None; receives a gradient. ``-inf`` entries ban tokens.
        turn_ids, turn_window, turn_weights, target_ids, divergence, beta, tail, tail_eps,
        temperature, reduction, return_stats, num_turns: exactly as in ``fused_topk_turn_kl``.
        cu_seqlens: a packed (padding-free) batch, exactly as in :func:`tcod_fast.fused_turn_kl`:
            ``(S + 1,)`` int32/int64 bounds of the ``S`` sequences laid end to end in the hidden
            states ``(N, H)`` or ``(1, N, H)`` (and the top-k ``(N, K)`` or ``(1, N, K)``);
            ``turn_window`` ``(S, 2)``, ``turn_weights`` ``(S, num_turns)``, the per-turn
            statistics and the per-sequence reductions are then per packed sequence.
        softcap, logit_scale: the student model's logit map: the logits ``z = h @ W.T + b`` become
            ``softcap * tanh(logit_scale * z / softcap)`` (``logit_scale * z`` without a soft
            cap) before the temperature, with the gradient through the ``tanh`` to ``h``, ``W``
            and ``b``. Student side only, as in ``fused_topk_turn_kl`` (the teacher is given as
            log-probs): a number is the student's; a pair's teacher entry must be None. The row
            kernel maps each chunk's float32 slab as it reads it; nothing more is kept.
        backend: the row kernel run on each chunk: ``"auto"`` (Triton on CUDA, native C++ on CPU,
            torch for float64), ``"triton"``, ``"native"`` or ``"torch"``.
        chunk_size: kept rows per chunk. Default: as many as keep the float32 ``chunk x V`` slab
            near 64 MiB (between 16 and 1024 rows; 110 at V = 151936).

    Returns:
        The loss (float32; per-token with the leading shape for ``reduction="none"``), or a
        :class:`~tcod_fast.ops.turns.TurnKLResult` with ``return_stats=True``.

    Memory beyond the inputs and returned gradients: one float32 ``chunk x V`` slab (reused), a
    ``4096 x H`` upcast weight block for non-float32 weights, the chunk's ``chunk x H`` rows, plus
    the float32 ``dh`` (``N x H``) kept from forward to backward and the ``V x H`` float32
    weight-gradient accumulator. Nothing scales with ``N x V``.

    Cost: with a scalar reduction the gradients are produced in the forward pass, so
    forward+backward is the three GEMMs of the unfused path; when the per-token ``kl`` is itself
    differentiated, backward recomputes the logits (four GEMMs in all). A host sync gathers the
    kept rows (``nonzero``).
    """
    # ---- validation: everything is checked before any compute ----
    check_float_tensor("student_hidden", student_hidden, (2, 3))
    device = student_hidden.device
    check_head("student", student_hidden, student_weight, student_bias, device)
    vocab = student_weight.shape[0]
    lead_shape = student_hidden.shape[:-1]
    check_topk_tensors(teacher_topk_ids, teacher_topk_logprobs, lead_shape, vocab, device, "the hidden states")
    divergence = check_options(divergence, reduction, beta, temperature)
    check_tail_options(tail, tail_eps)
    student_transform, _ = resolve_logit_transforms(softcap, logit_scale, teacher_logits=False)
    if chunk_size is not None and (not isinstance(chunk_size, numbers.Integral) or chunk_size < 1):
        raise ValueError(f"chunk_size must be a positive integer (rows per chunk) or None, got {chunk_size!r}")
    turns = prepare_turns(
        lead_shape, device, turn_ids=turn_ids, turn_window=turn_window, turn_weights=turn_weights,
        target_ids=target_ids, vocab_size=vocab, reduction=reduction, return_stats=return_stats,
        num_turns=num_turns, cu_seqlens=cu_seqlens, inputs_name="the hidden states",
    )
    dtype = compute_dtype(student_hidden, student_weight)
    if student_bias is not None and student_bias.dtype == torch.float64:
        dtype = torch.float64
    backend = resolve_backend(backend, device, dtype)
    ids3 = teacher_topk_ids.unsqueeze(0) if turns.flat else teacher_topk_ids
    logq3 = teacher_topk_logprobs.unsqueeze(0) if turns.flat else teacher_topk_logprobs
    topk_ids, topk_logprobs = prepare_topk(ids3, logq3, turns.keep, vocab, dtype)

    h = student_hidden.unsqueeze(0) if turns.flat else student_hidden
    coeff = turns.token_coefficients(reduction, dtype)
    chunk_rows = int(chunk_size) if chunk_size is not None else chunked.default_chunk_rows(vocab)
    config = _Config(
        divergence, float(beta), float(temperature), tail, float(tail_eps), return_stats, chunk_rows, backend,
        torch.is_grad_enabled(), student_transform,
    )
    loss, div, entropy, logp, logq = _FusedLinearTopkTurnKL.apply(
        h, student_weight, student_bias, topk_ids, topk_logprobs, turns.keep, turns.target_ids, coeff, turns.seq_index,
        turns.num_seqs, config,
    )
    if reduction == "none":
        loss = turns.reduce(div, reduction)
    if not return_stats:
        return loss
    return turns.result(loss, div, entropy, logp, logq)
