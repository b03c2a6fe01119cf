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


#: Sequence lengths of the packed tests: ragged, with an empty sequence (two equal bounds); the
#: sequences ``RAGGED_UNKEPT`` get no kept token (:meth:`PackedTwin.turn_ids`).
RAGGED_LENGTHS = (4, 0, 6, 3, 5)
RAGGED_UNKEPT = (3,)


class PackedTwin:
    """Ragged sequences as a padded batch ``(S, T, ...)`` (each sequence a row, right-padded to
    ``T``, the longest length or 1) and as its packed twin ``(N, ...)``: the same tokens end to
    end, bounded by ``cu_seqlens``. A length of 0 is an empty sequence (a row of padding; two
    equal consecutive ``cu_seqlens`` entries). Build the padded tensors, then :meth:`pack` them.
    """

    def __init__(self, lengths, cu_dtype: torch.dtype = torch.int64):
        self.lengths = list(lengths)
        self.num_seqs = len(self.lengths)
        self.T = max([*self.lengths, 1])
        bounds = [0]
        for length in self.lengths:
            bounds.append(bounds[-1] + length)
        self.N = bounds[-1]
        self.cu_seqlens = torch.tensor(bounds, dtype=cu_dtype)
        # where each packed token sits in the flattened padded batch
        self.rows = torch.tensor([s * self.T + i for s, n in enumerate(self.lengths) for i in range(n)], dtype=torch.long)
        self.padding = torch.ones(self.num_seqs, self.T, dtype=torch.bool)
        for s, n in enumerate(self.lengths):
            self.padding[s, :n] = False

    def pack(self, padded: torch.Tensor, row: bool = False) -> torch.Tensor:
        """``(S, T, ...)`` to a fresh contiguous ``(N, ...)`` (``(1, N, ...)`` with ``row``)."""
        out = padded.detach().reshape(self.num_seqs * self.T, *padded.shape[2:])[self.rows].clone()
        return out.unsqueeze(0) if row else out

    def turn_ids(self, n_turns: int = 3, unkept: tuple[int, ...] = ()) -> torch.Tensor:
        """Random padded turn ids ``(S, T)`` (kept and dropped tokens mixed), -1 on padding and on
        every token of the sequences ``unkept``."""
        turn_ids = random_turn_ids((self.num_seqs, self.T), "partial", n_turns)
        turn_ids[self.padding] = -1
        for s in unkept:
            turn_ids[s] = -1
        return turn_ids


def assert_same(actual, expected) -> None:
    """Bit for bit equal (NaN where NaN), or both None."""
    if actual is None or expected is None:
        assert actual is None and expected is None
        return
    torch.testing.assert_close(actual, expected, rtol=0, atol=0, equal_nan=True)


PER_TOKEN_FIELDS = ("kl", "entropy", "token_kept", "student_logprob", "teacher_logprob")
PER_TURN_FIELDS = ("turn_token_count", "turn_kl_sum", "turn_entropy_sum", "turn_abs_logratio_sum",
                   "turn_neg_logprob_sum")


def assert_same_sums(actual, expected) -> None:
    """Sums over tokens: bit for bit on CPU, where ``index_add`` adds in token order; within
    float32 rounding on CUDA, where it adds with atomics in no fixed order."""
    if actual is None or actual.device.type == "cpu":
        assert_same(actual, expected)
    else:
        torch.testing.assert_close(actual, expected, rtol=1e-5, atol=1e-6, equal_nan=True)


def assert_packed_equals_padded(packed, padded, twin: PackedTwin, reduction: str) -> None:
    """A ``TurnKLResult`` of the packed call equals, bit for bit, that of the padded call on the
    same sequences: its per-token tensors (the padded ones' packed tokens), its per-(sequence,
    turn) statistics and its loss (:func:`assert_same_sums` for these two)."""
    for name in PER_TOKEN_FIELDS:
        value, expected = getattr(packed, name), getattr(padded, name)
        assert_same(None if value is None else value.detach().reshape(-1), None if expected is None else twin.pack(expected))
    for name in PER_TURN_FIELDS:
        assert_same_sums(getattr(packed, name), getattr(padded, name))
    if reduction == "none":
        assert_same(packed.loss.detach().reshape(-1), twin.pack(padded.loss))
    else:
        assert_same_sums(packed.loss, padded.loss)


def device_for(backend: str) -> str:
    """Where a row-kernel op's test inputs live: CUDA where there is one, except for the CPU-only
    native kernels."""
    return "cuda" if torch.cuda.is_available() and backend != "native" else "cpu"
