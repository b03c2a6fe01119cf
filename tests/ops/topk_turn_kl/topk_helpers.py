"""Inputs and comparisons shared by the sparse-teacher op tests."""

from __future__ import annotations

import torch
from op_inputs import random_turn_ids

from tcod_fast import fused_topk_turn_kl, topk_turn_kl_reference

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def vocab_for(backend: str, cpu_size: int = 1037) -> int:
    """Vocabularies that are not a multiple of any block size; smaller under the Triton interpreter."""
    return 203 if backend == "triton" and DEVICE == "cpu" else cpu_size


def make_inputs(B, T, V, K, dtype=torch.float32, *, student_scale=3.0, teacher_scale=3.0, mask="partial",
                n_turns=4, ragged=True, flat=False):
    """Fresh random student logits and a teacher's top-k log-probs (of a random teacher).

    ``teacher_scale`` sets how much of the mass the top-k hold: large (e.g. 30) = almost all of it
    (the ``tail_eps`` floor is active), small = little. With ``ragged`` a random subset of entries
    is padding (-1), and each row's entries are shuffled so nothing relies on the server's order.
    """
    lead = (B * T,) if flat else (B, T)
    student = (torch.randn(*lead, V, dtype=torch.float64) * student_scale).to(dtype)
    teacher_logp = torch.log_softmax(torch.randn(*lead, V, dtype=torch.float64) * teacher_scale, dim=-1)
    logprobs, ids = teacher_logp.topk(K, dim=-1)
    logprobs = logprobs.float()
    if ragged and K > 1:
        pad = torch.rand(*lead, K) < 0.3
        ids = torch.where(pad, torch.full_like(ids, -1), ids)
    order = torch.rand(*lead, K).argsort(-1)
    ids, logprobs = ids.gather(-1, order), logprobs.gather(-1, order)
    turn_ids = random_turn_ids(lead, mask, n_turns)
    target_ids = torch.randint(0, V, lead)
    # half of the targets among the top-k (their teacher log-prob is known), half maybe not
    first_valid = ids.gather(-1, (ids >= 0).long().argmax(-1, keepdim=True)).squeeze(-1)
    use_topk = (torch.rand(lead) < 0.5) & (first_valid >= 0)
    target_ids = torch.where(use_topk, first_valid, target_ids)
    to = dict(device=DEVICE)
    return (student.to(**to).requires_grad_(True), ids.to(**to), logprobs.to(**to), turn_ids.to(**to),
            target_ids.to(**to))


def close(name, ours, theirs, **tol):
    ours, theirs = ours.double().cpu(), theirs.double().cpu()
    assert torch.equal(ours.isnan(), theirs.isnan()), f"{name}: NaN positions differ"
    torch.testing.assert_close(ours.nan_to_num(0), theirs.nan_to_num(0), **tol, msg=lambda m: f"{name}: {m}")


def compare(backend, student, ids, logprobs, turn_ids, tol, **kwargs):
    """The op on ``backend`` against the float64 reference: every stat, and the gradient."""
    result = fused_topk_turn_kl(student, ids, logprobs, turn_ids, backend=backend, return_stats=True, **kwargs)
    loss = result.loss.sum() if kwargs.get("reduction") == "none" else result.loss
    (grad,) = torch.autograd.grad(loss, student)

    ref_student = student.detach().clone().requires_grad_(True)
    ref = topk_turn_kl_reference(ref_student, ids, logprobs, turn_ids, return_stats=True, **kwargs)
    ref_loss = ref.loss.sum() if kwargs.get("reduction") == "none" else ref.loss
    (ref_grad,) = torch.autograd.grad(ref_loss, ref_student)

    close("loss", result.loss, ref.loss, **tol)
    close("kl", result.kl, ref.kl, **tol)
    close("entropy", result.entropy, ref.entropy, **tol)
    assert torch.equal(result.token_kept.cpu(), ref.token_kept.cpu())
    close("turn_token_count", result.turn_token_count, ref.turn_token_count, **tol)
    close("turn_kl_sum", result.turn_kl_sum, ref.turn_kl_sum, **tol)
    close("turn_entropy_sum", result.turn_entropy_sum, ref.turn_entropy_sum, **tol)
    if kwargs.get("target_ids") is not None:
        close("student_logprob", result.student_logprob, ref.student_logprob, **tol)
        close("teacher_logprob", result.teacher_logprob, ref.teacher_logprob, **tol)
        close("turn_abs_logratio_sum", result.turn_abs_logratio_sum, ref.turn_abs_logratio_sum, **tol)
        close("turn_neg_logprob_sum", result.turn_neg_logprob_sum, ref.turn_neg_logprob_sum, **tol)
    # the gradient relative to its own scale (bf16 gradients carry ~3 significant digits)
    scale = ref_grad.abs().max().item() + 1e-12
    close("grad", grad / scale, ref_grad / scale, rtol=0, atol=tol["rtol"] * 2)
    assert torch.isfinite(grad).all()
    return result, grad
