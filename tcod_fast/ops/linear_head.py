"""What the two fused-linear ops (``fused_linear_turn_kl``, ``fused_linear_topk_turn_kl``) share:
the checks of an LM head, the row gather of the hidden states, the float32 logits of a chunk of
rows, and their autograd.

The autograd of a fused-linear op: its ``torch.autograd.Function`` takes the student head
``(h, w, b)``, the op's other tensors (``inputs``, ending with ``keep`` and ``target_ids``), the
per-token coefficients ``coeff`` of the reduction (``c_n = d loss / d div_n``, None for
``reduction="none"``) and a frozen config whose ``run(h, w, b, *inputs, token_scale, want_h,
want_w, want_b)`` calls the op's custom op: per-token ``(div, entropy, logp_target,
logq_target)`` ``(B, T)`` and the gradients ``(dh, dW, db)`` of ``sum_n token_scale_n div_n``
(empty tensors for those not asked for, or without ``token_scale``). With the coefficients known
up front, :func:`linear_op_forward` has the custom op produce the gradients during the forward
pass; :func:`linear_op_backward` hands them out scaled by the incoming scalar, or, when the
per-token divergence itself receives a gradient, recomputes them with the per-token scales (the
weight gradient ``sum_n g_n G_n^T h_n`` cannot be rescaled after the fact, and ``G`` is the
``N x V`` tensor these ops exist to avoid).
"""

from __future__ import annotations

import torch

from tcod_fast.ops.common import check_float_tensor, compute_dtype, shape_str
from tcod_fast.ops.turns import sequence_sums


def check_head(side, hidden, weight, bias, device):
    """Checks one LM head (``hidden`` ``(B, T, H)`` or ``(N, H)``, ``weight`` ``(V, H)``, ``bias``
    ``(V,)`` or None) against itself and ``device``."""
    check_float_tensor(f"{side}_hidden", hidden, (2, 3))
    check_float_tensor(f"{side}_weight", weight, (2,))
    if hidden.shape[-1] != weight.shape[1]:
        raise ValueError(
            f"{side}_weight is (V, H) = {shape_str(weight.shape)} with hidden size {weight.shape[1]}, "
            f"but {side}_hidden has hidden size {hidden.shape[-1]} (shape {shape_str(hidden.shape)})"
        )
    if bias is not None:
        check_float_tensor(f"{side}_bias", bias, (1,))
        if bias.shape[0] != weight.shape[0]:
            raise ValueError(
                f"{side}_bias must be shaped ({weight.shape[0]},) like {side}_weight's vocabulary, "
                f"got {shape_str(bias.shape)}"
            )
    for name, x in ((f"{side}_hidden", hidden), (f"{side}_weight", weight), (f"{side}_bias", bias)):
        if x is not None and x.device != device:
            raise ValueError(f"{name} is on {x.device} but student_hidden is on {device}")


def gather_rows(hidden: torch.Tensor, flat_rows: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Rows ``b * T + t`` of a ``(B, T, H)`` tensor (any row strides) in ``dtype``; no ``N x H`` copy."""
    try:
        flat = hidden.view(-1, hidden.shape[-1])
    except RuntimeError:  # row strides that do not flatten (e.g. hidden[:, :-1]): index (b, t)
        T = hidden.shape[1]
        return hidden[flat_rows // T, flat_rows % T].to(dtype)
    return flat.index_select(0, flat_rows).to(dtype)


def linear_logits(h, weight, bias, dtype, vocab_block, out):
    """``out = h @ weight.T + bias`` in ``dtype``: ``h`` ``(R, H)`` already in ``dtype``, ``weight``
    ``(V, H)``, ``bias`` ``(V,)`` or None, ``out`` ``(R, V)``. A weight of another dtype is upcast
    ``vocab_block`` rows at a time, never whole; the logits are never rounded to the input dtype."""
    if weight.dtype == dtype:
        if bias is None:
            return torch.mm(h, weight.t(), out=out)
        return torch.addmm(bias.to(dtype), h, weight.t(), out=out)
    for v0 in range(0, weight.shape[0], vocab_block):
        v1 = min(weight.shape[0], v0 + vocab_block)
        block = weight[v0:v1].to(dtype)
        if bias is None:
            torch.mm(h, block.t(), out=out[:, v0:v1])
        else:
            torch.addmm(bias[v0:v1].to(dtype), h, block.t(), out=out[:, v0:v1])
    return out


def fake_outputs(student_hidden, student_weight, student_bias, keep, token_scale, want_h, want_w, want_b):
    """The outputs of a fused-linear custom op's fake implementation (the shapes ``torch.compile``
    traces with): per-token ``(div, entropy, logp_target, logq_target)`` ``(B, T)`` and ``(dh, dW,
    db)`` in the compute dtype, empty tensors for the gradients not asked for (or without
    ``token_scale``)."""
    dtype = compute_dtype(student_hidden, student_weight)
    grads_wanted = token_scale is not None

    def empty():  # a fresh one each time: custom-op outputs must not alias each other
        return student_hidden.new_empty(0, dtype=dtype)

    dh = student_hidden.new_empty(student_hidden.shape, dtype=dtype) if grads_wanted and want_h else empty()
    dw = student_weight.new_empty(student_weight.shape, dtype=dtype) if grads_wanted and want_w else empty()
    has_bias = grads_wanted and want_b and student_bias is not None
    db = student_bias.new_empty(student_bias.shape, dtype=dtype) if has_bias else empty()
    stats = tuple(keep.new_empty(keep.shape, dtype=dtype) for _ in range(4))
    return (*stats, dh, dw, db)


def backward_token_scale(keep, coeff, grad_loss, grad_div) -> torch.Tensor:
    """``d total / d div_n`` per token ``(B, T)`` when backward must recompute: the upstream
    gradient of the per-token divergence plus the loss's gradient times each token's coefficient."""
    token_scale = torch.zeros_like(keep, dtype=coeff.dtype if coeff is not None else grad_div.dtype)
    if grad_div is not None:
        token_scale = token_scale + grad_div.to(token_scale.dtype)
    if grad_loss is not None and coeff is not None:
        token_scale = token_scale + grad_loss.to(token_scale.dtype) * coeff
    return token_scale


def linear_op_forward(ctx, config, coeff, h, w, b, *inputs, seq_index, num_seqs):
    """``(loss = sum_n coeff_n div_n, div, entropy, logp_target, logq_target)``. With a scalar
    reduction the gradients are produced here and kept for backward. ``seq_index`` ``(B, T)`` and
    ``num_seqs``: the sequence of every token and their number (``TurnLayout``); the loss adds the
    tokens sequence by sequence, as ``TurnLayout.sum_tokens`` does."""
    want_h, want_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
    want_b = b is not None and ctx.needs_input_grad[2]
    grads_now = config.grad_enabled and coeff is not None and (want_h or want_w or want_b)
    div, entropy, logp, logq, dh, dw, db = config.run(
        h, w, b, *inputs, coeff if grads_now else None, want_h, want_w, want_b
    )
    loss = sequence_sums(div * coeff, seq_index, num_seqs).sum() if coeff is not None else div.new_zeros(())
    ctx.config = config
    ctx.wants = (want_h, want_w, want_b)
    ctx.stored_grads = (dh, dw, db) if grads_now else None
    ctx.save_for_backward(h, w, b, coeff, *inputs)
    ctx.mark_non_differentiable(entropy, logp, logq)
    ctx.set_materialize_grads(False)
    return loss, div, entropy, logp, logq


def linear_op_backward(ctx, grad_loss, grad_div, fp32_weight_grad=False):
    """``(grad_h, grad_w, grad_b)`` for the upstream gradients of the loss and the per-token
    divergence, in the inputs' dtypes (None for those not wanted). The gradients kept by forward
    are handed out once, scaled in place; otherwise (``grad_div`` given, or a second backward) the
    logits are recomputed.

    ``fp32_weight_grad``: add the weight gradient (accumulated in the compute dtype) into the
    weight's ``main_grad`` (created on first use, float32) and return None for it."""
    h, w, b, coeff, *inputs = ctx.saved_tensors
    want_h, want_w, want_b = ctx.wants
    stored, ctx.stored_grads = ctx.stored_grads, None
    if grad_loss is None and grad_div is None:
        return None, None, None
    if grad_div is None and stored is not None:
        dh, dw, db = stored
        scale = grad_loss
    else:
        keep = inputs[-2]
        token_scale = backward_token_scale(keep, coeff, grad_loss, grad_div)
        _, _, _, _, dh, dw, db = ctx.config.run(h, w, b, *inputs, token_scale, want_h, want_w, want_b)
        scale = None

    def scaled(g):
        # in place: these buffers belong to this op and are released here
        return g if scale is None else g.mul_(scale.to(g.dtype))

    grad_h = scaled(dh).to(h.dtype) if want_h else None
    grad_b = scaled(db).to(b.dtype) if want_b else None
    grad_w = None
    if want_w:
        dw = scaled(dw)
        if fp32_weight_grad:
            main_grad = getattr(w, "main_grad", None)
            if main_grad is None:
                w.main_grad = dw.float() if dw.dtype != torch.float32 else dw
            else:
                main_grad.add_(dw)
        else:
            grad_w = dw.to(w.dtype)
    return grad_h, grad_w, grad_b
