"""Inputs and checks shared by the op tests under ``tests/ops/`` (importable from every test
folder: the root conftest's folder, ``tests/``, is on ``sys.path``)."""

from __future__ import annotations

from collections.abc import Callable

import torch


def random_turn_ids(lead: tuple[int, ...], mask: str = "partial", n_turns: int = 4) -> torch.Tensor:
    """Turn ids (int64, shape ``lead``): ``"none"`` keeps every token (random turns ``0..n_turns-1``),
    ``"all"`` drops every token (-1), ``"partial"`` mixes kept and dropped tokens at random and
    keeps at least the first one."""
    if mask == "none":
        return torch.randint(0, n_turns, lead)
    if mask == "all":
        return torch.full(lead, -1)
    turn_ids = torch.randint(-1, n_turns, lead)
    turn_ids.view(-1)[0] = 0
    return turn_ids


def fit_linear_head(loss_of_logits: Callable[[torch.Tensor], torch.Tensor], *, vocab: int = 97) -> list[float]:
    """Train a linear head on 64 fixed random hidden states (width 16) for 60 Adam steps on
    ``loss_of_logits(head(hidden))`` (logits ``(64, vocab)``); the loss of every step."""
    torch.manual_seed(0)
    hidden = torch.randn(64, 16)
    head = torch.nn.Linear(16, vocab)
    optimizer = torch.optim.Adam(head.parameters(), lr=3e-2)
    losses = []
    for _ in range(60):
        loss = loss_of_logits(head(hidden))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(float(loss.detach()))
    return losses


def assert_compiles_like_eager(loss_fn: Callable[..., torch.Tensor], student: torch.Tensor, *rest, backend: str):
    """``torch.compile(loss_fn, fullgraph=True)`` gives eager's loss and gradient w.r.t. ``student``
    (a leaf that requires grad; ``rest`` are the other arguments)."""
    compiled = torch.compile(loss_fn, fullgraph=True, backend=backend)
    loss = compiled(student, *rest)
    loss.backward()
    expected_student = student.detach().clone().requires_grad_(True)
    expected = loss_fn(expected_student, *rest)
    expected.backward()
    torch.testing.assert_close(loss, expected)
    torch.testing.assert_close(student.grad, expected_student.grad)
