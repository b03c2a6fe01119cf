"""The pass of ``fused_linear_topk_turn_kl``: kept rows in chunks, with ``fused_topk_turn_kl``'s row kernel.

Never materialises the ``tokens x vocab`` logits. Kept rows are processed ``R`` at a time:

1. the chunk's float32 logits ``z = h @ W.T + b`` are formed straight from the matmul into one
   reused ``R x V`` float32 slab (a bf16/fp16 weight is upcast one ``BV``-row block at a time,
   never whole; the logits are never rounded to the input dtype);
2. the row kernel of ``fused_topk_turn_kl`` (the ``backend`` given: native C++, Triton or torch)
   computes the per-row outputs and overwrites the slab with ``d div / d z`` in place;
3. the slab is contracted at once: ``dh = G @ W``, ``dW += G.T @ (c h)``, ``db += G.T c`` in
   float32, with ``c`` the rows' coefficients in the reduction.

So each of the three GEMMs of the unfused path (logits, dh, dW) runs once, on ``R``-row pieces;
rows outside the turn mask cost no matmul work.

Memory beyond the inputs and outputs: one float32 ``R x V`` slab (reused), a ``BV x H`` upcast
weight block for non-float32 weights and the chunk's ``R x H`` rows. Nothing scales with ``N x V``.
"""

from __future__ import annotations

import torch

from tcod_fast.ops.common import compute_dtype
from tcod_fast.ops.linear_head import gather_rows, linear_logits
from tcod_fast.ops.logit_transform import IDENTITY
from tcod_fast.ops.topk_turn_kl.api import run_backend

# Bytes of the chunk's float32 logits slab (R x V): 64 MiB gives R = 110 at V = 151936.
SLAB_BYTES = 64 * 1024 * 1024
VOCAB_BLOCK = 4096
_MIN_ROWS, _MAX_ROWS = 16, 1024


def default_chunk_rows(vocab: int) -> int:
    """Rows per chunk so that the ``R x V`` float32 slab takes about ``SLAB_BYTES``."""
    return int(min(_MAX_ROWS, max(_MIN_ROWS, SLAB_BYTES // (4 * vocab))))


def _hidden_grad(g, weight, dtype):
    """``g @ weight`` in ``dtype``; a weight of another dtype is upcast per block."""
    if weight.dtype == dtype:
        return g @ weight
    out = torch.zeros(g.shape[0], weight.shape[1], dtype=dtype, device=g.device)
    for v0 in range(0, weight.shape[0], VOCAB_BLOCK):
        v1 = min(weight.shape[0], v0 + VOCAB_BLOCK)
        out.addmm_(g[:, v0:v1], weight[v0:v1].to(dtype))
    return out


def forward(
    student_hidden, student_weight, student_bias, topk_ids, topk_logprobs, keep, target_ids, token_scale, divergence,
    beta, temperature, tail, tail_eps, want_hidden_grad, want_weight_grad, want_bias_grad, need_entropy, chunk_rows,
    backend, student_transform=IDENTITY,
):
    """Per-token ``(div, entropy, logp_target, logq_target)`` ``(B, T)`` and the gradients of
    ``sum_n token_scale_n div_n``: ``dh (B, T, H)``, ``dW (V, H)``, ``db (V,)`` in the compute dtype
    (empty tensors for those not asked for, or without ``token_scale``): the outputs of the custom
    op ``tcod_fast::fused_linear_topk_turn_kl_forward``.

    Args:
        student_hidden: ``(B, T, H)`` any float dtype, any row strides; student_weight ``(V, H)``;
            student_bias ``(V,)`` or None.
        topk_ids, topk_logprobs: ``(B, T, K)`` as ``tcod_fast.ops.topk.prepare_topk`` returns them.
        keep: ``(B, T)`` bool; target_ids ``(B, T)`` int64 or None; token_scale ``(B, T)`` or None.
        divergence, beta, temperature, tail, tail_eps: as in ``fused_topk_turn_kl`` (validated).
        chunk_rows: kept rows per chunk; backend: the row kernel (``"native"``, ``"triton"``, ``"torch"``).
        student_transform: the logits' :class:`~tcod_fast.ops.logit_transform.LogitTransform` (soft
            cap, scale); the row kernel applies it as it reads the slab and writes the gradient
            w.r.t. the untransformed logits, so nothing more than the slab is kept for it.
    """
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
        z = linear_logits(h, student_weight, student_bias, dtype, VOCAB_BLOCK, out=slab[:R])
        ones = torch.ones(1, R, dtype=torch.bool, device=device)
        tgt = None if flat_targets is None else flat_targets[rows].view(1, R)
        # the row kernel overwrites the slab with d div / d z (temperature included)
        results = run_backend(
            backend, z.view(1, R, V), ids_rows[rows].view(1, R, -1), logq_rows[rows].view(1, R, -1), ones, tgt,
            divergence, beta, temperature, tail, tail_eps, z.view(1, R, V) if grads else None, None, need_entropy,
            student_transform,
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
