"""``fused_linear_topk_turn_kl``: the sparse-teacher divergence from hidden states and the LM head.

Never materialises the ``tokens x vocab`` logits. Kept rows are processed ``R`` at a time:

1. the chunk's float32 logits ``z = h @ W.T + b`` are formed straight from the matmul into one
   reused ``R x V`` float32 slab (a bf16/fp16 weight is upcast one ``BV``-row block at a time,
   never whole; the logits are never rounded to the input dtype);
2. the row kernel of ``fused_topk_turn_kl`` (native C++ on CPU, Triton on CUDA, else torch)
   computes the per-row outputs and overwrites the slab with ``d div / d z`` in place;
3. the slab is contracted at once: ``dh = G @ W``, ``dW += G.T @ (c h)``, ``db += G.T c`` in
   float32, with ``c`` the rows' coefficients in the reduction.

So each of the three GEMMs of the unfused path (logits, dh, dW) runs once, on ``R``-row pieces;
rows outside the turn mask cost no matmul work. When the per-token divergence itself is
differentiated (``reduction="none"``, or ``result.kl`` in another loss) the coefficients are only
known in backward, which then recomputes the logits chunks (one more GEMM); nothing ``N x V`` is
stored for it. The layering (coefficients known up front, gradients produced in forward, a
recompute only when needed) is ``fused_linear_turn_kl``'s, and so is the autograd code
(``linear_op_forward`` / ``linear_op_backward``).
"""

from __future__ import annotations

import numbers
from dataclasses import dataclass

import torch

from tcod_fast.ops.common import check_float_tensor, compute_dtype
from tcod_fast.ops.fused_linear_turn_kl.api import check_head, fake_gradients, linear_op_backward, linear_op_forward
from tcod_fast.ops.fused_linear_turn_kl.chunked import gather_rows
from tcod_fast.ops.topk_turn_kl.api import resolve_backend, run_backend
from tcod_fast.ops.topk_turn_kl.topk import check_tail_options, check_topk_tensors, prepare_topk
from tcod_fast.ops.turn_kl.turns import check_options, prepare_turns

# Bytes of the chunk's float32 logits slab (R x V): 64 MiB gives R = 110 at V = 151936.
SLAB_BYTES = 64 * 1024 * 1024
VOCAB_BLOCK = 4096
_MIN_ROWS, _MAX_ROWS = 16, 1024


def default_chunk_rows(vocab: int) -> int:
    return int(min(_MAX_ROWS, max(_MIN_ROWS, SLAB_BYTES // (4 * vocab))))


def _logits_into(slab, h, weight, bias, dtype):
    """``slab = h @ weight.T + bias`` in ``dtype``; a weight of another dtype is upcast per block."""
    if weight.dtype == dtype:
        if bias is None:
            return torch.mm(h, weight.t(), out=slab)
        return torch.addmm(bias.to(dtype), h, weight.t(), out=slab)
    V = weight.shape[0]
    for v0 in range(0, V, VOCAB_BLOCK):
        v1 = min(V, v0 + VOCAB_BLOCK)
        block = weight[v0:v1].to(dtype)
        if bias is None:
            torch.mm(h, block.t(), out=slab[:, v0:v1])
        else:
            torch.addmm(bias[v0:v1].to(dtype), h, block.t(), out=slab[:, v0:v1])
    return slab


def _hidden_grad(g, weight, dtype):
    """``g @ weight`` in ``dtype``; a weight of another dtype is upcast per block."""
    if weight.dtype == dtype:
        return g @ weight
    out = torch.zeros(g.shape[0], weight.shape[1], dtype=dtype, device=g.device)
    for v0 in range(0, weight.shape[0], VOCAB_BLOCK):
        v1 = min(weight.shape[0], v0 + VOCAB_BLOCK)
        out.addmm_(g[:, v0:v1], weight[v0:v1].to(dtype))
    return out


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
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-token ``(div, entropy, logp_target, logq_target)`` ``(B, T)`` and the gradients of
    ``sum_n token_scale_n div_n``: ``dh (B, T, H)``, ``dW (V, H)``, ``db (V,)`` in the compute dtype
    (empty tensors for those not asked for, or without ``token_scale``)."""
    B, T = keep.shape
    device = student_hidden.device
    dtype = compute_dtype(student_hidden, student_weight)
    V, H = student_weight.shape
    kept_rows = keep.reshape(-1).nonzero().squeeze(1)  # host sync (documented)
    n_kept = kept_rows.shape[0]
    grads = token_scale is not None
    dw = torch.zeros(V, H, dtype=dtype, device=device) if grads and want_weight_grad else None
    db = torch.zeros(V, dtype=dtype, device=device) if grads and want_bias_grad and student_bias is not None else None
    dh = torch.zeros(B * T, H, dtype=dtype, device=device) if grads and want_hidden_grad else None
    outs = [torch.zeros(B * T, dtype=dtype, device=device) for _ in range(4)]
    ids_rows = topk_ids.reshape(B * T, -1)
    logq_rows = topk_logprobs.reshape(B * T, -1)
    flat_targets = None if target_ids is None else target_ids.reshape(-1)
    step = max(1, min(chunk_rows, n_kept))
    slab = torch.empty(step, V, dtype=dtype, device=device) if n_kept else None
    for start in range(0, n_kept, step):
        rows = kept_rows[start:start + step]
        R = rows.shape[0]
        h = gather_rows(student_hidden, rows, dtype)
        z = _logits_into(slab[:R], h, student_weight, student_bias, dtype)
        ones = torch.ones(1, R, dtype=torch.bool, device=device)
        tgt = None if flat_targets is None else flat_targets[rows].view(1, R)
        # the row kernel overwrites the slab with d div / d z (temperature included)
        results = run_backend(
            backend, z.view(1, R, V), ids_rows[rows].view(1, R, -1), logq_rows[rows].view(1, R, -1), ones, tgt,
            divergence, beta, temperature, tail, tail_eps, z.view(1, R, V) if grads else None, None, need_entropy,
        )
        for out, value in zip(outs, results):
            out[rows] = value.view(R).to(dtype)
        if grads:
            scale = token_scale.reshape(-1)[rows].to(dtype)[:, None]
            g = z  # unscaled rows; the scale goes on the R x H side (V / H times cheaper)
            if dh is not None:
                dh[rows] = _hidden_grad(g, student_weight, dtype) * scale
            if dw is not None:
                dw.addmm_(g.t(), h * scale)
            if db is not None:
                db.add_(torch.mv(g.t(), scale.squeeze(1)))

    def empty():  # a fresh one each time: custom-op outputs must not alias each other
        return student_hidden.new_empty(0, dtype=dtype)

    return (
        *(o.view(B, T) for o in outs),
        empty() if dh is None else dh.view(B, T, H),
        empty() if dw is None else dw,
        empty() if db is None else db,
    )


@_fused_linear_topk_forward.register_fake
def _(student_hidden, student_weight, student_bias, topk_ids, topk_logprobs, keep, target_ids, token_scale,
      divergence, beta, temperature, tail, tail_eps, want_hidden_grad, want_weight_grad, want_bias_grad, need_entropy,
      chunk_rows, backend):
    dtype = compute_dtype(student_hidden, student_weight)
    stats = tuple(keep.new_empty(keep.shape, dtype=dtype) for _ in range(4))
    grads = fake_gradients(student_hidden, student_weight, student_bias, dtype, token_scale is not None,
                           want_hidden_grad, want_weight_grad, want_bias_grad)
    return (*stats, *grads)


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

    def run(self, h, w, b, ids, logq, keep, target_ids, token_scale, want_h, want_w, want_b):
        """The custom op on these inputs (see ``fused_linear_turn_kl.api.linear_op_forward``)."""
        return torch.ops.tcod_fast.fused_linear_topk_turn_kl_forward(
            h, w, b, ids, logq, keep, target_ids, token_scale, self.divergence, self.beta, self.temperature,
            self.tail, self.tail_eps, want_h, want_w, want_b, self.need_entropy, self.chunk_rows, self.backend,
        )


class _FusedLinearTopkTurnKL(torch.autograd.Function):
    """Outputs ``(loss = sum_n coeff_n div_n, div, entropy, logp_target, logq_target)``; gradients
    flow to the hidden states, weight and bias."""

    @staticmethod
    def forward(ctx, h, w, b, ids, logq, keep, target_ids, coeff, config):
        return linear_op_forward(ctx, config, coeff, h, w, b, ids, logq, keep, target_ids)

    @staticmethod
    def backward(ctx, grad_loss, grad_div, *_unused):
        grad_h, dw, grad_b = linear_op_backward(ctx, grad_loss, grad_div)
        grad_w = None if dw is None else dw.to(ctx.saved_tensors[1].dtype)
        return grad_h, grad_w, grad_b, None, None, None, None, None, None


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
    reduction: str = "mean",
    return_stats: bool = False,
    num_turns: int | None = None,
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
        backend: the row kernel run on each chunk: ``"auto"`` (Triton on CUDA, native C++ on CPU,
            torch for float64), ``"triton"``, ``"native"`` or ``"torch"``.
        chunk_size: kept rows per chunk. Default: as many as keep the float32 ``chunk x V`` slab
            near 64 MiB (between 16 and 1024 rows; 110 at V = 151936).

    Returns:
        The loss (float32; per-token with the leading shape for ``reduction="none"``), or a
        :class:`~tcod_fast.ops.turn_kl.result.TurnKLResult` with ``return_stats=True``.

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
    if chunk_size is not None and (not isinstance(chunk_size, numbers.Integral) or chunk_size < 1):
        raise ValueError(f"chunk_size must be a positive integer (rows per chunk) or None, got {chunk_size!r}")
    turns = prepare_turns(
        lead_shape, device, turn_ids=turn_ids, turn_window=turn_window, turn_weights=turn_weights,
        target_ids=target_ids, vocab_size=vocab, reduction=reduction, return_stats=return_stats,
        num_turns=num_turns, inputs_name="the hidden states",
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
    chunk_rows = int(chunk_size) if chunk_size is not None else default_chunk_rows(vocab)
    config = _Config(
        divergence, float(beta), float(temperature), tail, float(tail_eps), return_stats, chunk_rows, backend,
        torch.is_grad_enabled(),
    )
    loss, div, entropy, logp, logq = _FusedLinearTopkTurnKL.apply(
        h, student_weight, student_bias, topk_ids, topk_logprobs, turns.keep, turns.target_ids, coeff, config
    )
    if reduction == "none":
        loss = turns.reduce(div, reduction)
    if not return_stats:
        return loss
    return turns.result(loss, div, entropy, logp, logq)
