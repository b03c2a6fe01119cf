"""Plain float64 reference of ``fused_turn_kl``.

Materialises everything (softmax, log-softmax, per-token losses) in float64 and lets autograd
produce the gradient. It is slow and memory hungry on purpose: it is the yardstick every fast
backend is tested against, and it is written independently of the fast path's masking and
reduction code so a bug there cannot hide in both.
"""

from __future__ import annotations

from dataclasses import dataclass, fields

import torch

from tcod_fast.ops.turns import TurnKLResult


def _xlogy_ratio(weight: torch.Tensor, log_a: torch.Tensor, log_b: torch.Tensor) -> torch.Tensor:
    """``weight * (log_a - log_b)`` with the convention ``0 * anything = 0``.

    The unselected branch is fed finite values so autograd never multiplies 0 by inf. A NaN
    weight (a NaN logit in the row) counts as present, so the row's value is NaN, not 0.
    """
    present = weight != 0
    safe_a = torch.where(present, log_a, torch.zeros_like(log_a))
    safe_b = torch.where(present, log_b, torch.zeros_like(log_b))
    return torch.where(present, weight * (safe_a - safe_b), torch.zeros_like(weight))


def divergence_per_row(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    divergence: str = "reverse_kl",
    beta: float = 0.5,
    temperature: float = 1.0,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-row divergence, student entropy and log-softmaxes, in float64.

    Args:
        student_logits, teacher_logits: ``(..., V)``, any float dtype (upcast to float64).
    Returns:
        ``(divergence, entropy, log_p, log_q)``; the first two shaped ``(...)``.
    """
    z_s = student_logits.double() / temperature
    z_t = teacher_logits.double().detach() / temperature
    log_p = torch.log_softmax(z_s, dim=-1)
    log_q = torch.log_softmax(z_t, dim=-1)
    p, q = log_p.exp(), log_q.exp()
    entropy = -_xlogy_ratio(p, log_p, torch.zeros_like(log_p)).sum(-1)
    reverse = _xlogy_ratio(p, log_p, log_q).sum(-1)
    forward = _xlogy_ratio(q, log_q, log_p).sum(-1)
    if divergence == "reverse_kl" or (divergence == "jsd" and beta == 1.0):
        value = reverse
    elif divergence == "forward_kl" or (divergence == "jsd" and beta == 0.0):
        value = forward
    elif divergence == "jsd":
        # TRL's generalised JSD: m = (1 - beta) p + beta q, beta*KL(q||m) + (1-beta)*KL(p||m).
        m = (1.0 - beta) * p + beta * q
        log_m = torch.where(m != 0, m, torch.ones_like(m)).log()
        value = beta * _xlogy_ratio(q, log_q, log_m).sum(-1) + (1.0 - beta) * _xlogy_ratio(
            p, log_p, log_m
        ).sum(-1)
    else:
        raise ValueError(f"unknown divergence {divergence!r}")
    return value, entropy.detach(), log_p, log_q


def transformed_logits(logits: torch.Tensor, softcap=None, logit_scale=None, side: int = 0) -> torch.Tensor:
    """One side's logits in float64 after the model's logit map: ``logit_scale * logits``, then
    ``softcap * tanh(. / softcap)`` (each skipped when None). ``softcap`` and ``logit_scale`` are a
    number or a ``(student, teacher)`` pair, as the ops take them; ``side`` 0 is the student, 1 the
    teacher. Differentiable (plain autograd through ``tanh``)."""
    softcap = softcap[side] if isinstance(softcap, (tuple, list)) else softcap
    logit_scale = logit_scale[side] if isinstance(logit_scale, (tuple, list)) else logit_scale
    x = logits.double()
    if logit_scale is not None:
        x = x * float(logit_scale)
    if softcap is not None:
        x = float(softcap) * torch.tanh(x / float(softcap))
    return x


# Keywords of the public functions that choose how, not what, to compute. The references accept
# and ignore them, so a call of a public function can be replayed on its reference unchanged.
BACKEND_ONLY_KEYWORDS = ("backend", "inplace", "chunk_size", "chunk_mode", "fp32_weight_grad")


@dataclass(frozen=True)
class TurnOptions:
    """The keywords every reference shares with its public function, with the same defaults
    (their meaning: :func:`tcod_fast.fused_turn_kl`)."""

    turn_window: tuple[int, int] | torch.Tensor | None = None
    turn_weights: torch.Tensor | None = None
    target_ids: torch.Tensor | None = None
    divergence: str = "reverse_kl"
    beta: float = 0.5
    temperature: float = 1.0
    reduction: str = "mean"
    return_stats: bool = False
    num_turns: int | None = None
    cu_seqlens: torch.Tensor | None = None
    softcap: float | tuple | None = None
    logit_scale: float | tuple | None = None

    @classmethod
    def from_keywords(cls, function_name: str, keywords: dict):
        """The options given to ``function_name`` as ``**keywords``; backend-only keywords are
        dropped, any other unknown keyword is a TypeError."""
        names = {field.name for field in fields(cls)}
        unknown = sorted(set(keywords) - names - set(BACKEND_ONLY_KEYWORDS))
        if unknown:
            raise TypeError(
                f"{function_name} got unexpected keyword argument(s) {', '.join(map(repr, unknown))}; "
                f"expected some of {', '.join(sorted(names))} (or the ignored {', '.join(BACKEND_ONLY_KEYWORDS)})"
            )
        return cls(**{name: value for name, value in keywords.items() if name in names})


@dataclass(frozen=True)
class TurnKLOptions(TurnOptions):
    """The keyword options of :func:`turn_kl_reference`."""

    vocab_size: int | None = None


def turn_kl_reference(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    turn_ids: torch.Tensor | None = None,
    **options,
):
    """Float64 reference with the semantics of :func:`tcod_fast.fused_turn_kl`.

    Args:
        student_logits: ``(B, T, V_s)`` or ``(N, V_s)``, any float dtype (upcast to float64).
            Gradients reach it through autograd.
        teacher_logits: ``(B, T, V_t)`` or ``(N, V_t)``, any float dtype; detached.
        turn_ids: integer tensor with the leading shape (``-1`` = not trained), or None (every
            token is turn 0).
        **options: the keywords of ``fused_turn_kl`` (:class:`TurnKLOptions`: ``turn_window``,
            ``turn_weights``, ``target_ids``, ``divergence``, ``beta``, ``temperature``,
            ``vocab_size``, ``reduction``, ``return_stats``, ``num_turns``, ``cu_seqlens``,
            ``softcap``, ``logit_scale``), with its defaults.
            Backend-only keywords (``backend``, ``inplace``, ...) are ignored; any other is a
            TypeError.

    Returns:
        The float64 loss (per-token with the leading shape for ``reduction="none"``), or a
        ``TurnKLResult`` of float64 tensors. No input validation: feed it valid inputs.
    """
    options = TurnKLOptions.from_keywords("turn_kl_reference", options)
    squeeze = student_logits.dim() == 2
    s = student_logits.unsqueeze(0) if squeeze else student_logits
    t = teacher_logits.unsqueeze(0) if squeeze else teacher_logits
    if options.vocab_size is not None:
        s, t = s[..., :options.vocab_size], t[..., :options.vocab_size]
    B, T = s.shape[:2]
    ids, kept, num_turns, weights, sequences = reference_turns(turn_ids, options, B, T)

    # Dropped rows never take part: zero them so garbage (NaN, a teacher -inf under student
    # mass) there cannot reach the kept rows' gradient through autograd.
    row_kept = kept.to(s.device).unsqueeze(-1)
    s = torch.where(row_kept, s, torch.zeros((), dtype=s.dtype, device=s.device))
    t = torch.where(row_kept, t, torch.zeros((), dtype=t.dtype, device=t.device))
    if options.softcap is not None or options.logit_scale is not None:
        s = transformed_logits(s, options.softcap, options.logit_scale, side=0)
        t = transformed_logits(t, options.softcap, options.logit_scale, side=1)
    div, entropy, log_p, log_q = divergence_per_row(s, t, options.divergence, options.beta, options.temperature)
    per_token, loss = reference_loss(div.cpu(), kept, ids, weights, options.reduction, num_turns, squeeze, sequences)
    if not options.return_stats:
        return loss

    logp_a = logq_a = None
    if options.target_ids is not None:
        tgt = options.target_ids.reshape(B, T, 1).long().to(log_p.device)
        logp_a = torch.where(kept, log_p.gather(-1, tgt).squeeze(-1).detach().cpu(), torch.zeros(B, T, dtype=torch.float64))
        logq_a = torch.where(kept, log_q.gather(-1, tgt).squeeze(-1).detach().cpu(), torch.zeros(B, T, dtype=torch.float64))
    return reference_result(loss, per_token, entropy, kept, ids, num_turns, logp_a, logq_a, squeeze, sequences)


# ---- the turn structure, reductions and statistics, shared with the top-k op's reference ----
def reference_turns(turn_ids, options: TurnOptions, B: int, T: int):
    """``(ids, kept, num_turns, weights, sequences)`` on CPU, token by token: ``ids`` ``(B, T)``
    int64 turn ids, ``kept`` ``(B, T)`` bool (``turn_id >= 0 and lo <= turn_id < hi``, with the
    window of the token's sequence), the width of the per-turn tensors, the turn weights
    ``(S, num_turns)`` float64 or None, and the ``S`` sequences, each the list of its tokens'
    ``(row, position)``: row ``b`` of a padded batch, or with ``cu_seqlens`` the tokens
    ``cu_seqlens[s]:cu_seqlens[s + 1]`` of the one row."""
    turn_window, turn_weights, num_turns = options.turn_window, options.turn_weights, options.num_turns
    if options.cu_seqlens is None:
        sequences = [[(b, i) for i in range(T)] for b in range(B)]
    else:
        bounds = [int(x) for x in options.cu_seqlens]
        sequences = [[(0, i) for i in range(lo, hi)] for lo, hi in zip(bounds[:-1], bounds[1:])]
    ids = torch.zeros(B, T, dtype=torch.long) if turn_ids is None else turn_ids.reshape(B, T).long().cpu()
    kept = torch.zeros(B, T, dtype=torch.bool)
    for seq, tokens in enumerate(sequences):
        if turn_window is None:
            lo, hi = 0, None
        elif isinstance(turn_window, torch.Tensor):
            lo, hi = (int(x) for x in turn_window.reshape(-1, 2)[seq])
        else:
            lo, hi = int(turn_window[0]), int(turn_window[1])
        for b, i in tokens:
            tid = int(ids[b, i])
            kept[b, i] = tid >= 0 and tid >= lo and (hi is None or tid < hi)

    if num_turns is None:
        if turn_weights is not None:
            num_turns = turn_weights.shape[-1]
        else:
            num_turns = int(ids.max()) + 1 if bool((ids >= 0).any()) else 1
    weights = None if turn_weights is None else turn_weights.reshape(len(sequences), -1).double().cpu()
    return ids, kept, num_turns, weights, sequences


def _token_mask(tokens, shape) -> torch.Tensor:
    """``(B, T)`` bool, True at the ``(row, position)`` pairs ``tokens``."""
    mask = torch.zeros(shape, dtype=torch.bool)
    for b, i in tokens:
        mask[b, i] = True
    return mask


def reference_loss(div, kept, ids, weights, reduction: str, num_turns: int, squeeze: bool, sequences):
    """``(per_token, loss)`` from per-token divergences ``div`` ``(B, T)`` (CPU, float64): the
    divergence at kept tokens (0 elsewhere), and the reduced loss, written out group by group
    (``sequences``: :func:`reference_turns`')."""
    token_weight = kept.double().clone()
    if weights is not None:
        for seq, tokens in enumerate(sequences):
            for b, i in tokens:
                if kept[b, i]:
                    token_weight[b, i] = weights[seq, int(ids[b, i])]
    per_token = torch.where(kept, div, torch.zeros_like(div))
    weighted = per_token * token_weight

    if reduction == "none":
        loss = weighted
    elif reduction == "sum":
        loss = weighted.sum()
    elif reduction == "mean":
        loss = weighted.sum() / max(int(kept.sum()), 1)
    elif reduction == "seq_mean_token_mean":
        seq_means = []
        for tokens in sequences:
            in_seq = _token_mask(tokens, kept.shape) & kept
            if in_seq.any():
                seq_means.append(weighted[in_seq].sum() / int(in_seq.sum()))
        loss = torch.stack(seq_means).sum() / len(seq_means) if seq_means else weighted.sum() * 0
    elif reduction == "turn_mean":
        turn_means = []
        for tokens in sequences:
            in_seq = _token_mask(tokens, kept.shape) & kept
            for k in range(num_turns):
                in_turn = in_seq & (ids == k)
                if in_turn.any():
                    turn_means.append(weighted[in_turn].sum() / int(in_turn.sum()))
        loss = torch.stack(turn_means).sum() / len(turn_means) if turn_means else weighted.sum() * 0
    else:
        raise ValueError(f"unknown reduction {reduction!r}")

    if squeeze and reduction == "none":
        loss = loss.squeeze(0)
    return per_token, loss


def reference_result(
    loss, per_token, entropy, kept, ids, num_turns, logp_a, logq_a, squeeze, sequences
) -> TurnKLResult:
    """The stats object, with every per-(sequence, turn) sum accumulated token by token.
    ``logp_a``/``logq_a``: ``(B, T)`` float64 sampled-token log-probs (0 at dropped tokens), or
    None without targets; ``sequences``: :func:`reference_turns`'."""
    ent = torch.where(kept, entropy.cpu(), torch.zeros_like(entropy.cpu()))

    def turn_sums(values):
        sums = torch.zeros(len(sequences), num_turns, dtype=torch.float64)
        for seq, tokens in enumerate(sequences):
            for b, i in tokens:
                if kept[b, i]:
                    sums[seq, int(ids[b, i])] += float(values[b, i])
        return sums

    counts = turn_sums(torch.ones(kept.shape, dtype=torch.float64))
    kl_sum = turn_sums(per_token.detach())
    ent_sum = turn_sums(ent)
    abs_sum = nlp_sum = None
    if logp_a is not None:
        abs_sum = turn_sums((logp_a.double() - logq_a.double()).abs())
        nlp_sum = turn_sums(-logp_a.double())

    def shape_back(x):
        return None if x is None else (x.squeeze(0) if squeeze else x)

    return TurnKLResult(
        loss=loss,
        kl=shape_back(per_token),
        entropy=shape_back(ent),
        token_kept=shape_back(kept),
        turn_token_count=counts,
        turn_kl_sum=kl_sum,
        turn_entropy_sum=ent_sum,
        student_logprob=shape_back(logp_a),
        teacher_logprob=shape_back(logq_a),
        turn_abs_logratio_sum=abs_sum,
        turn_neg_logprob_sum=nlp_sum,
    )
