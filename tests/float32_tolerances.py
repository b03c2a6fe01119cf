"""Tolerances for comparing two float32 computations of the same quantity that take different
paths: other processes (gloo all-reduce vs a local sum, FSDP2's reduce-scatter vs DDP's
all-reduce), other backends, other compiled copies of a kernel, another CPU's matmul kernels.

Such paths add the same terms in another order. Summing ``n`` float32 terms in any order has a
forward error of at most ``gamma(n) * sum |term|`` with ``gamma(n) = n u / (1 - n u)`` and the
unit roundoff ``u = 2**-24`` (Higham, *Accuracy and Stability of Numerical Algorithms*, 2nd
ed., section 4.2). Two orders differ by at most twice that. The bounds below apply it to the
sums each quantity is made of; they hold on any CPU, and are far below what a real defect (a
token counted twice, a padding pass that contributes, a wrong normaliser) changes.
"""

from __future__ import annotations

import math

U32 = 2.0**-24  # float32 unit roundoff


def gamma(n: int) -> float:
    """Higham's ``gamma_n``: the relative error bound of an ``n``-term float32 sum."""
    if n * U32 >= 1:
        raise ValueError(f"gamma needs n * u < 1, got n = {n}")
    return n * U32 / (1 - n * U32)


def kl_tolerance(vocab_size: int, terms: int = 1) -> dict[str, float]:
    """``pytest.approx`` keywords for a float32 KL (or a token mean of ``terms`` of them, each
    over ``vocab_size`` entries) computed in two summation orders.

    A KL is the difference of two vocabulary sums, ``sum p log p`` and ``sum p log q``: its
    error is relative to ``H(p) + CE(p, q) <= 2 log V + KL``, not to the (much smaller) KL. The
    token mean adds ``terms`` more additions."""
    n = vocab_size + terms
    return {"rel": 2 * gamma(n), "abs": 2 * gamma(n) * 2 * math.log(max(vocab_size, 2))}


def trained_loss_tolerance(vocab_size: int, tokens: int, updates: int) -> dict[str, float]:
    """``pytest.approx`` keywords for a logged training loss of two runs that apply the same
    ``updates`` optimiser updates in other summation orders (another number of processes,
    FSDP2 vs DDP).

    Every update sums per-token gradients (``tokens`` terms, each itself a sum over the
    vocabulary), so each update's rounding reaches the weights, and the next loss is a sum of
    ``tokens x vocab`` terms of those weights: the relative bound is ``gamma`` of all the terms
    the loss has passed through, ``(updates + 1) x tokens x vocab``."""
    n = (updates + 1) * tokens * vocab_size
    return {"rel": 2 * gamma(n), "abs": 2 * gamma(n) * 2 * math.log(max(vocab_size, 2))}


def weights_tolerance(tokens: int, updates: int, lr: float, largest_weight: float) -> float:
    """``atol`` for weights after ``updates`` optimiser updates in two summation orders.

    Each update's gradient is a sum over ``tokens`` terms (relative error ``gamma(tokens)``),
    AdamW moves a weight by at most about ``lr`` per update, and rounding the weight itself
    costs one ulp of ``largest_weight`` per update."""
    return 2 * updates * (gamma(tokens) * (largest_weight + lr) + U32 * largest_weight)


def gradient_tolerance(terms: int, largest: float) -> dict[str, float]:
    """``assert_close`` keywords for gradients that are sums of ``terms`` float32 terms,
    whose largest entry is ``largest`` (the size of the sums involved: an entry that cancels
    to near 0 still carries the rounding of its large terms)."""
    return {"rtol": 2 * gamma(terms), "atol": 2 * gamma(terms) * largest}


def close(tolerance: dict[str, float]) -> dict[str, float]:
    """The same tolerance as ``torch.testing.assert_close`` keywords."""
    return {"rtol": tolerance.get("rel", tolerance.get("rtol")), "atol": tolerance.get("abs", tolerance.get("atol"))}


def kernel_copies_tolerance(output: str, vocab_size: int, dtype, expected) -> dict[str, float]:
    """``assert_close`` keywords for one output (``"divergence"``, ``"entropy"`` or
    ``"gradient"``) of two compiled copies of a row kernel (portable vs AVX2 lanes): they add a
    row's ``vocab_size`` terms in other orders; a gradient stored in 16 bits may then round
    one ulp (``2**-7`` relative in bfloat16, ``2**-10`` in float16) apart."""
    import torch

    if output == "gradient":
        tolerance = gradient_tolerance(vocab_size, float(expected.float().abs().max()))
        if dtype != torch.float32:
            tolerance["rtol"] = max(tolerance["rtol"], torch.finfo(dtype).eps)
        return tolerance
    return close(kl_tolerance(vocab_size))
