"""The ops' large CPU gradient (``tcod_fast/ops/gradient_memory.py``): kept between calls and written
again only once nothing holds it, marked for huge pages, and exact either way."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from tcod_fast import fused_topk_turn_kl, fused_turn_kl
from tcod_fast.ops import gradient_memory, release_gradient_buffer
from tcod_fast.ops.gradient_memory import (
    GRADIENT_BUFFER_MIN_BYTES,
    HUGE_PAGE_BYTES,
    REUSE_ENV,
    new_gradient,
    transparent_huge_page_mode,
)

ROWS = 16
VOCAB = GRADIENT_BUFFER_MIN_BYTES // 4 // ROWS + 1031  # a (1, 16, V) fp32 gradient just over the threshold


def _vm_flags(address: int) -> set[str]:
    """The VmFlags of the mapping of this process that holds ``address`` (/proc/self/smaps)."""
    inside = False
    for line in Path("/proc/self/smaps").read_text().splitlines():
        head = line.split()[0]
        if "-" in head and ":" not in head:
            start, end = (int(x, 16) for x in head.split("-"))
            inside = start <= address < end
        elif inside and line.startswith("VmFlags:"):
            return set(line.split()[1:])
    raise AssertionError(f"no mapping holds {address:#x}")


@pytest.fixture(autouse=True)
def _no_kept_buffer():
    release_gradient_buffer()
    yield
    release_gradient_buffer()


def _inputs(seed: int, rows: int = ROWS):
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(1, rows, VOCAB, generator=gen) * 3, torch.randn(1, rows, VOCAB, generator=gen) * 3


def _reference_grad(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    ref = student.detach().double().requires_grad_(True)
    log_p, log_q = ref.log_softmax(-1), teacher.double().log_softmax(-1)
    (log_p.exp() * (log_p - log_q)).sum(-1).mean().backward()
    return ref.grad


def _op_grad(student: torch.Tensor, teacher: torch.Tensor, backend: str = "native") -> torch.Tensor:
    leaf = student.clone().requires_grad_(True)
    fused_turn_kl(leaf, teacher, backend=backend).backward()
    return leaf.grad


def _assert_exact(grad: torch.Tensor, reference: torch.Tensor) -> None:
    torch.testing.assert_close(grad.double(), reference, rtol=1e-3, atol=1e-7)


@pytest.mark.parametrize("backend", ["native", "torch"])
def test_a_dropped_gradient_is_written_again_and_stays_exact(backend):
    first_s, first_t = _inputs(1)
    grad = _op_grad(first_s, first_t, backend)
    address = grad.data_ptr()
    _assert_exact(grad, _reference_grad(first_s, first_t))
    del grad  # nothing holds the first gradient any more
    second_s, second_t = _inputs(2)
    again = _op_grad(second_s, second_t, backend)
    assert again.data_ptr() == address
    _assert_exact(again, _reference_grad(second_s, second_t))


def test_a_gradient_still_held_is_never_overwritten():
    first_s, first_t = _inputs(3)
    held = _op_grad(first_s, first_t)  # a leaf's .grad the user keeps
    kept_copy = held.clone()
    second_s, second_t = _inputs(4)
    second = _op_grad(second_s, second_t)
    assert second.data_ptr() != held.data_ptr()
    assert torch.equal(held, kept_copy)
    _assert_exact(second, _reference_grad(second_s, second_t))

    view = second[:, :2]  # a view holds the storage too
    del second
    third_s, third_t = _inputs(5)
    third = _op_grad(third_s, third_t)
    assert third.data_ptr() != view.data_ptr()
    _assert_exact(third, _reference_grad(third_s, third_t))


def test_two_forwards_before_one_backward_keep_both_gradients():
    """The first forward's gradient waits in the autograd graph while the second forward runs."""
    (a_s, a_t), (b_s, b_t) = _inputs(6), _inputs(7)
    leaf = a_s.clone().requires_grad_(True)
    other = b_s.clone().requires_grad_(True)
    (fused_turn_kl(leaf, a_t, backend="native") + fused_turn_kl(other, b_t, backend="native")).backward()
    assert leaf.grad.data_ptr() != other.grad.data_ptr()
    _assert_exact(leaf.grad, _reference_grad(a_s, a_t))
    _assert_exact(other.grad, _reference_grad(b_s, b_t))


def test_a_smaller_call_writes_into_the_kept_buffer_and_topk_shares_it():
    big_s, big_t = _inputs(8, rows=ROWS + 4)
    grad = _op_grad(big_s, big_t)
    address = grad.data_ptr()
    del grad
    small_s, small_t = _inputs(9)  # still over the threshold
    small = _op_grad(small_s, small_t)
    assert small.data_ptr() == address and small.is_contiguous()
    _assert_exact(small, _reference_grad(small_s, small_t))
    del small

    gen = torch.Generator().manual_seed(10)
    ids = torch.randperm(VOCAB, generator=gen)[: (ROWS + 4) * 8].view(1, ROWS + 4, 8)
    logq = torch.randn(1, ROWS + 4, 8, generator=gen).log_softmax(-1) - 0.5
    leaf = big_s.clone().requires_grad_(True)
    fused_topk_turn_kl(leaf, ids, logq, backend="native").backward()
    assert leaf.grad.data_ptr() == address
    ref = big_s.double().requires_grad_(True)
    fused_topk_turn_kl(ref, ids, logq.double(), backend="torch").backward()  # float64 runs the reference
    _assert_exact(leaf.grad, ref.grad)


def test_reuse_can_be_turned_off_and_the_buffer_released(monkeypatch):
    s, t = _inputs(11)
    _op_grad(s, t)  # its gradient is dropped at once
    kept = gradient_memory._KEPT._storage
    assert kept is not None
    monkeypatch.setenv(REUSE_ENV, "0")
    grad = _op_grad(s, t)
    assert grad.data_ptr() != kept.data_ptr()  # a free kept buffer, not taken
    assert gradient_memory._KEPT._storage is kept  # nor replaced
    _assert_exact(grad, _reference_grad(s, t))
    del kept
    release_gradient_buffer()
    assert gradient_memory._KEPT._storage is None


def test_small_gradients_are_plain_allocations(monkeypatch):
    calls = []
    monkeypatch.setattr(gradient_memory, "_madvise", lambda: lambda *args: calls.append(args))
    small = torch.empty(GRADIENT_BUFFER_MIN_BYTES // 4 - 1)
    gradient_memory.empty_gradient(small)
    assert calls == [] and gradient_memory._KEPT._storage is None
    new_gradient(torch.empty(GRADIENT_BUFFER_MIN_BYTES // 4))
    assert len(calls) == 1 and calls[0][0] % HUGE_PAGE_BYTES == 0 and calls[0][1] % HUGE_PAGE_BYTES == 0


@pytest.mark.skipif("[madvise]" not in (transparent_huge_page_mode() or ""), reason="Linux transparent huge pages are not in madvise mode here")
def test_a_new_large_gradient_is_marked_for_huge_pages():
    grad = new_gradient(torch.empty(GRADIENT_BUFFER_MIN_BYTES // 4 + 1000))
    inner = -(-grad.data_ptr() // HUGE_PAGE_BYTES) * HUGE_PAGE_BYTES  # its first whole 2 MiB page
    assert "hg" in _vm_flags(inner)
    assert "hg" not in _vm_flags(torch.empty(10 << 20).data_ptr() + (4 << 20))  # a plain allocation is not
