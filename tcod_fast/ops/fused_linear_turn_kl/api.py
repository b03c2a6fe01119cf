"""Public entry point ``fused_linear_turn_kl``: validation, masks, reductions, autograd.

Layers, top to bottom:

1. ``fused_linear_turn_kl`` checks every argument before any compute, builds the per-token keep
   mask exactly as ``fused_turn_kl`` does, and turns the reduction into one coefficient per token
   (``c_n = d loss / d div_n``, which depends only on the mask and the turn weights).
2. ``_FusedLinearTurnKL`` (autograd) calls the ``torch.library`` custom op
   ``tcod_fast::fused_linear_turn_kl_forward``. With the coefficients known up front, the forward
   pass already accumulates ``dh = c * G @ W_s``, ``dW = (c * G).T @ h_s`` and ``db`` while the
   logits blocks are at hand, so the four GEMMs (student logits, teacher logits, dh, dW) each run
   once; backward multiplies those by the incoming scalar.
3. When the per-token divergence itself receives a gradient (``reduction="none"``, or
   ``result.kl`` used in another loss), the per-token scales are only known in backward, and the
   weight gradient ``sum_n g_n G_n^T h_n`` cannot be rescaled after the fact. Backward then
   recomputes the logits blocks with those scales (two extra GEMMs); nothing ``N x V`` is ever
   stored for it, only the inputs (by reference).

Why not store ``G``? It is the ``N x V`` tensor this op exists to avoid. Why not store ``dh`` and
recompute only ``dW``? Both need the same recomputed ``G`` blocks; storing ``dh`` saves nothing.
The autograd of 2. and 3. is ``tcod_fast/ops/linear_head.py``'s, shared with
``fused_linear_topk_turn_kl``.

The public signature and the custom op's argument list look like those of the other ops'
``api.py`` but are each op's own: a public function states its keywords in full, and
``torch.library`` derives a custom op's schema from its annotations; the logic behind them is
shared from ``tcod_fast/ops/``.
"""

from __future__ import annotations

import numbers
from dataclasses import dataclass

import torch

from tcod_fast.ops.common import compute_dtype, shape_str
from tcod_fast.ops.fused_linear_turn_kl import chunked
from tcod_fast.ops.linear_head import check_head, fake_outputs, linear_op_backward, linear_op_forward
from tcod_fast.ops.logit_transform import as_floats, from_floats, resolve_logit_transforms
from tcod_fast.ops.turns import check_options, prepare_turns, resolve_vocab_size

try:  # the Triton backend is optional (GPU, or CPU under TRITON_INTERPRET=1)
    from tcod_fast.ops.fused_linear_turn_kl import triton_backend
except ImportError:  # pragma: no cover - only while the module is absent
    triton_backend = None

BACKENDS = ("auto", "triton", "torch")


# --------------------------------------------------------------------------------------------
# custom op: the streaming pass over (rows x vocabulary)
# --------------------------------------------------------------------------------------------
def _backend_module(backend: str):
    return triton_backend if backend == "triton" else chunked  # "torch": chunked.py


@torch.library.custom_op("tcod_fast::fused_linear_turn_kl_forward", mutates_args=())
def _fused_linear_forward(
    student_hidden: torch.Tensor,
    student_weight: torch.Tensor,
    student_bias: torch.Tensor | None,
    teacher_hidden: torch.Tensor,
    teacher_weight: torch.Tensor,
    teacher_bias: torch.Tensor | None,
    keep: torch.Tensor,
    target_ids: torch.Tensor | None,
    token_scale: torch.Tensor | None,
    divergence: str,
    beta: float,
    temperature: float,
    vocab_size: int,
    want_hidden_grad: bool,
    want_weight_grad: bool,
    want_bias_grad: bool,
    chunk_rows: int,
    backend: str,
    chunk_mode: str,
    logit_transform: list[float],
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-token ``(div, entropy, logp_target, logq_target)`` ``(B, T)`` and the gradients of
    ``sum_n token_scale_n * div_n``: ``dh (B, T, H_s)``, ``dW (V_s, H_s)``, ``db (V_s,)`` in the
    compute dtype (empty tensors for the ones not asked for, or when ``token_scale`` is None).
    ``logit_transform``: ``[scale_s, cap_s, scale_t, cap_t]`` (``tcod_fast.ops.logit_transform``)."""
    B, T = keep.shape
    device = student_hidden.device
    dtype = compute_dtype(student_hidden, student_weight)
    kept_rows = keep.reshape(-1).nonzero().squeeze(1)
    grads_wanted = token_scale is not None
    row_scale = token_scale.reshape(-1)[kept_rows] if grads_wanted else None
    weight_grad = None
    if grads_wanted and want_weight_grad:
        weight_grad = torch.zeros(student_weight.shape, dtype=dtype, device=device)
    bias_grad = None
    if grads_wanted and want_bias_grad and student_bias is not None:
        bias_grad = torch.zeros(student_bias.shape, dtype=dtype, device=device)
    flat_targets = None if target_ids is None else target_ids.reshape(-1)
    tiling = dict(chunk_rows=chunk_rows) if backend == "triton" else dict(chunk_rows=chunk_rows, mode=chunk_mode)
    student_transform, teacher_transform = from_floats(logit_transform)
    div, entropy, logp, logq, dh_kept = _backend_module(backend).forward(
        student_hidden, student_weight, student_bias, teacher_hidden, teacher_weight, teacher_bias,
        kept_rows, flat_targets, divergence, beta, temperature, vocab_size,
        row_scale=row_scale, want_hidden_grad=want_hidden_grad, weight_grad=weight_grad,
        bias_grad=bias_grad, student_transform=student_transform, teacher_transform=teacher_transform, **tiling,
    )

    def scatter(values):
        out = torch.zeros(B * T, dtype=dtype, device=device)
        if values is not None:
            out[kept_rows] = values.to(dtype)
        return out.view(B, T)

    def empty():  # a fresh one each time: custom-op outputs must not alias each other
        return student_hidden.new_empty(0, dtype=dtype)

    dh = empty()
    if dh_kept is not None:
        dh = torch.zeros(B * T, student_hidden.shape[-1], dtype=dtype, device=device)
        dh[kept_rows] = dh_kept
        dh = dh.view(B, T, student_hidden.shape[-1])  # explicit: B * T may be 0
    return (
        scatter(div), scatter(entropy), scatter(logp), scatter(logq), dh,
        empty() if weight_grad is None else weight_grad,
        empty() if bias_grad is None else bias_grad,
    )


@_fused_linear_forward.register_fake
def _(student_hidden, student_weight, student_bias, teacher_hidden, teacher_weight, teacher_bias, keep, target_ids,
      token_scale, divergence, beta, temperature, vocab_size, want_hidden_grad, want_weight_grad, want_bias_grad,
      chunk_rows, backend, chunk_mode, logit_transform):
    return fake_outputs(student_hidden, student_weight, student_bias, keep, token_scale, want_hidden_grad,
                        want_weight_grad, want_bias_grad)


@dataclass(frozen=True)
class _Config:
    divergence: str
    beta: float
    temperature: float
    vocab_size: int
    chunk_rows: int
    backend: str
    chunk_mode: str
    fp32_weight_grad: bool
    grad_enabled: bool
    logit_transform: tuple[float, ...]

    def run(self, h_s, w_s, b_s, h_t, w_t, b_t, keep, target_ids, token_scale, want_h, want_w, want_b):
        """The custom op on these inputs (see ``tcod_fast.ops.linear_head``)."""
        return torch.ops.tcod_fast.fused_linear_turn_kl_forward(
            h_s, w_s, b_s, h_t, w_t, b_t, keep, target_ids, token_scale,
            self.divergence, self.beta, self.temperature, self.vocab_size,
            want_h, want_w, want_b, self.chunk_rows, self.backend, self.chunk_mode, list(self.logit_transform),
        )


class _FusedLinearTurnKL(torch.autograd.Function):
    """Outputs ``(loss = sum_n coeff_n div_n, div, entropy, logp_target, logq_target)``.

    Gradients flow to the student hidden states, weight and bias only.
    """

    @staticmethod
    def forward(ctx, h_s, w_s, b_s, h_t, w_t, b_t, keep, target_ids, coeff, seq_index, num_seqs, config):
        return linear_op_forward(
            ctx, config, coeff, h_s, w_s, b_s, h_t, w_t, b_t, keep, target_ids, seq_index=seq_index, num_seqs=num_seqs
        )

    @staticmethod
    def backward(ctx, grad_loss, grad_div, *_unused):
        grads = linear_op_backward(ctx, grad_loss, grad_div, ctx.config.fp32_weight_grad)
        return (*grads, None, None, None, None, None, None, None, None, None)


def _resolve_backend(backend, device, dtypes):
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    has_float64 = torch.float64 in dtypes
    triton_ok = triton_backend is not None and triton_backend.is_available(device)
    if backend == "auto":
        # The Triton kernels have only run under the interpreter so far; until they are checked
        # and timed on a GPU, "auto" keeps the torch backend (which on CUDA already uses the
        # Triton logits kernel of fused_turn_kl for its per-chunk row math).
        return "torch"
    if backend == "triton":
        if triton_backend is None or not triton_backend.HAS_TRITON:
            raise RuntimeError("backend='triton' needs the triton package: pip install 'tcod-fast[triton]'")
        if not triton_ok:
            raise ValueError(
                f"backend='triton' runs on CUDA tensors (or CPU tensors with TRITON_INTERPRET=1), got {device}"
            )
        if has_float64:
            raise TypeError("backend='triton' supports float32/bfloat16/float16 inputs, got torch.float64")
    return backend


# --------------------------------------------------------------------------------------------
# public API
# --------------------------------------------------------------------------------------------
def fused_linear_turn_kl(
    student_hidden: torch.Tensor,
    student_weight: torch.Tensor,
    teacher_hidden: torch.Tensor,
    teacher_weight: torch.Tensor,
    turn_ids: torch.Tensor | None = None,
    *,
    student_bias: torch.Tensor | None = None,
    teacher_bias: torch.Tensor | None = None,
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
    backend: str = "auto",
    chunk_size: int | None = None,
    chunk_mode: str = "slab",
    fp32_weight_grad: bool = False,
):
    """Exact teacher-student divergence from hidden states and LM heads, without the logits.

    Computes what ``fused_turn_kl(student_hidden @ student_weight.T + student_bias,
    teacher_hidden @ teacher_weight.T + teacher_bias, ...)`` computes -- same values, statistics,
    masks and reductions -- but never materialises a ``tokens x vocab`` tensor: logits are formed
    block by block, accumulated in float32 straight from the matmul (never rounded to bf16 before
    the softmax), consumed by an online softmax, and the gradient ``G`` w.r.t. the logits is
    formed block by block and immediately contracted into ``dh = G @ W_s`` and ``dW = G.T @ h``.
    Rows outside the turn mask are never gathered, so they cost no matmul work.

    Args:
        student_hidden: ``(B, T, H_s)`` or ``(N, H_s)``, float32/bfloat16/float16 (float64 with the
            torch backend). Receives a gradient. Any row strides (``hidden[:, :-1]`` is read
            without a copy).
        student_weight: ``(V_s, H_s)`` LM-head weight, any of the float dtypes. Receives a
            gradient, accumulated in float32 and returned in its dtype (see ``fp32_weight_grad``).
        teacher_hidden: ``(B, T, H_t)`` or ``(N, H_t)``, same leading shape and device; ``H_t`` may
            differ from ``H_s``. Stop-gradient; never upcast as a whole (one row chunk at a time).
        teacher_weight: ``(V_t, H_t)``. Stop-gradient.
        turn_ids: integer tensor with the hidden states' leading shape: ``0, 1, ...`` = the
            student turn of a token, ``-1`` = not trained. ``None``: every token is turn 0.
        student_bias: ``(V_s,)`` or None; receives a gradient. ``-inf`` entries ban tokens.
        teacher_bias: ``(V_t,)`` or None.
        turn_window, turn_weights, target_ids, divergence, beta, temperature, reduction,
        return_stats, num_turns: exactly as in :func:`tcod_fast.fused_turn_kl`.
        cu_seqlens: a packed (padding-free) batch, exactly as in :func:`tcod_fast.fused_turn_kl`:
            ``(S + 1,)`` int32/int64 bounds of the ``S`` sequences laid end to end in the hidden
            states ``(N, H)`` or ``(1, N, H)``; ``turn_window`` ``(S, 2)``, ``turn_weights``
            ``(S, num_turns)``, the per-turn statistics and the per-sequence reductions are then
            per packed sequence.
        softcap, logit_scale: the models' own logit map (Gemma 2's ``final_logit_softcapping``,
            a ``logit_scale`` config field), which this op must apply since it forms the logits:
            each side's logits ``z = h @ W.T + b`` become ``softcap * tanh(logit_scale * z /
            softcap)`` (``logit_scale * z`` without a soft cap), *before* the temperature divides
            them. Each is None (nothing), a number (both sides) or a pair ``(student, teacher)``
            with None for nothing on that side; ``softcap`` positive and finite, ``logit_scale``
            finite and non-zero. The gradient goes through the ``tanh``
            (``dy/dz = logit_scale * (1 - tanh^2)``) to ``h``, ``W`` and ``b``. Every backend maps
            each chunk's (or tile's) float32 logits as they are formed and read: the torch backend's
            row kernel as it reads the slab (slab mode) or each block (stream mode), the triton
            backend in its tiles; the derivative is recomputed in the gradient pass (the native row
            kernel keeps it for one row per thread). Nothing ``tokens x vocab`` is made for it.
            Without the keywords nothing changes.
        vocab_size: use only the first ``vocab_size`` rows of both weights (padded vocabularies).
            Without it, ``V_s != V_t`` is an error. Weight rows past it get zero gradient.
        backend: ``"auto"`` (currently always ``"torch"``: the Triton kernels are verified under
            the Triton interpreter but not yet on a GPU), ``"triton"`` (tiled GEMM + online
            softmax, CUDA or ``TRITON_INTERPRET=1``) or ``"torch"``.
        chunk_size: rows per chunk of the torch backend. Default: as many as keep the two cached
            float32 ``chunk x V`` logits slabs near 64 MiB (between 16 and 1024 rows).
        chunk_mode: how the torch backend processes a chunk: ``"slab"`` (its two float32
            ``chunk x V`` logits slabs, each GEMM once) or ``"stream"`` (the vocabulary in
            ``4096``-column blocks with online-softmax recurrences: two more GEMMs, a working set
            of ``O(chunk x 4096)``, for vocabularies where even ``chunk x V`` floats are too
            many). Ignored by the triton backend.
        fp32_weight_grad: instead of returning the weight gradient in the weight's dtype, add the
            float32 accumulator into ``student_weight.main_grad`` (created on first use, the
            Megatron-LM convention for mixed-precision training); this op then adds nothing to
            ``student_weight.grad`` (other uses of a tied weight, e.g. the input embedding, still
            accumulate there through autograd).

    Returns:
        The loss (float32; per-token with the leading shape for ``reduction="none"``), or a
        :class:`~tcod_fast.ops.turns.TurnKLResult` with ``return_stats=True``.

    Memory, in float32 elements beyond the inputs and the returned gradients, with
    ``R = chunk_size``, ``BV = 4096``, ``H = max(H_s, H_t)``:

    * torch backend: ``2 R V`` (the chunk's student and teacher logits slabs, allocated once and
      reused) ``+ BV H`` (a weight block upcast, only for non-float32 weights) ``+ R (H_s + H_t)``;
    * triton backend: one ``BLOCK_M x BLOCK_V`` tile per program;
    * both: ``N H_s`` for the hidden gradient kept between forward and backward and a
      ``V_s H_s`` float32 weight-gradient accumulator (the returned gradient itself for a
      float32 weight).

    With ``softcap``/``logit_scale``: nothing more in slab mode on CPU (the native row kernel keeps
    the map's derivative in one float32 row of ``V`` per thread), one more ``R x V`` chunk where the
    torch row kernel runs, one ``R x BV`` block in stream mode (measured at N = 4096, V = 32000:
    +0.1 MB and +4 MB of peak memory).

    Independent of ``N x V``: e.g. ``V = 32000`` gives ``R = 262`` and 67 MB of slabs, against
    524 MB for one ``4096 x 32000`` float32 logits tensor (the unfused path holds three).

    Cost: with a scalar reduction the gradients are produced during the forward pass (the
    reduction's per-token coefficients are known up front), so forward+backward costs the four
    GEMMs of the unfused path. When the per-token output itself is differentiated
    (``reduction="none"`` or ``result.kl`` in another loss), backward recomputes the logits: six
    GEMMs in all.

    Notes:
        A host sync gathers the kept rows (``nonzero``). Teacher tensors get no gradient even
        if they require one. ``-inf`` bias entries shared by student and teacher contribute 0; a
        teacher ``-inf`` under student mass is a true ``+inf`` reverse KL. Edge inputs behave as
        in :func:`tcod_fast.fused_turn_kl`: exact at any logit scale and temperature wherever the
        float32 logits ``h @ W.T + b`` are (the matmul's own rounding is the only extra error);
        a weight with no rows (``V = 0``) is an error; an empty batch gives loss 0 and zero
        gradients; NaN or inf ``turn_weights`` are an error (negative ones are allowed); a NaN
        in a kept row (hidden state or weight) makes the loss NaN, that row's ``dh`` NaN and,
        as autograd would, ``dW`` and ``db`` NaN.
    """
    # ---- validation: everything is checked before any compute ----
    if not isinstance(student_hidden, torch.Tensor):
        raise TypeError(f"student_hidden must be a torch.Tensor, got {type(student_hidden).__name__}")
    device = student_hidden.device
    check_head("student", student_hidden, student_weight, student_bias, device)
    check_head("teacher", teacher_hidden, teacher_weight, teacher_bias, device)
    if student_hidden.shape[:-1] != teacher_hidden.shape[:-1]:
        raise ValueError(
            f"student_hidden leading shape {shape_str(student_hidden.shape[:-1])} does not match "
            f"teacher_hidden leading shape {shape_str(teacher_hidden.shape[:-1])}"
        )
    vocab_size = resolve_vocab_size(
        student_weight.shape[0], teacher_weight.shape[0], vocab_size, "student_weight", "teacher_weight", "rows"
    )
    divergence = check_options(divergence, reduction, beta, temperature)
    logit_transform = tuple(as_floats(*resolve_logit_transforms(softcap, logit_scale)))
    if chunk_size is not None and (not isinstance(chunk_size, numbers.Integral) or chunk_size < 1):
        raise ValueError(f"chunk_size must be a positive integer (rows per chunk) or None, got {chunk_size!r}")
    if chunk_mode not in chunked.MODES:
        raise ValueError(f"chunk_mode must be one of {chunked.MODES}, got {chunk_mode!r}")
    if not isinstance(fp32_weight_grad, bool):
        raise TypeError(f"fp32_weight_grad must be a bool, got {fp32_weight_grad!r}")
    turns = prepare_turns(
        student_hidden.shape[:-1], device, turn_ids=turn_ids, turn_window=turn_window, turn_weights=turn_weights,
        target_ids=target_ids, vocab_size=vocab_size, reduction=reduction, return_stats=return_stats,
        num_turns=num_turns, cu_seqlens=cu_seqlens, inputs_name="the hidden states",
    )
    dtypes = {x.dtype for x in (student_hidden, student_weight, teacher_hidden, teacher_weight, student_bias,
                                teacher_bias) if x is not None}
    backend = _resolve_backend(backend, device, dtypes)

    # ---- the token mask and reductions are every op's (tcod_fast/ops/turns.py) ----
    flat = turns.flat
    h_s = student_hidden.unsqueeze(0) if flat else student_hidden
    h_t = teacher_hidden.unsqueeze(0) if flat else teacher_hidden
    keep, target3 = turns.keep, turns.target_ids
    stat_dtype = compute_dtype(student_hidden, student_weight)
    coeff = turns.token_coefficients(reduction, stat_dtype)
    chunk_rows = int(chunk_size) if chunk_size is not None else chunked.default_chunk_rows(vocab_size)
    config = _Config(
        divergence, float(beta), float(temperature), vocab_size, chunk_rows, backend, chunk_mode, fp32_weight_grad,
        torch.is_grad_enabled(), logit_transform,
    )
    loss, div, entropy, logp, logq = _FusedLinearTurnKL.apply(
        h_s, student_weight, student_bias, h_t, teacher_weight, teacher_bias, keep, target3, coeff, turns.seq_index,
        turns.num_seqs, config,
    )
    if reduction == "none":
        loss = turns.reduce(div, reduction)
    if not return_stats:
        return loss
    return turns.result(loss, div, entropy, logp, logq)
