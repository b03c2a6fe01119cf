"""fused_linear_turn_kl where the float32 logits are exact however large they are, and one answer
per edge input, on the torch backend's two chunk modes and the Triton backend."""

import math

import pytest
import torch
from fused_linear_helpers import backend_keywords

from tcod_fast.ops.common import DIVERGENCES, REDUCTIONS
from tcod_fast.ops.fused_linear_turn_kl import api, fused_linear_turn_kl, fused_linear_turn_kl_reference


@pytest.mark.parametrize("divergence", DIVERGENCES)
def test_fused_linear_exact_where_float32_logits_are_exact(mode, divergence):
    """Integer hidden states and weights times 2^k: the float32 matmul is exact, so the op must
    match the float64 reference however large the logits and however small the temperature."""
    N, H, V = 5, 16, 150
    for k in (0, 20):
        for temperature in (1.0, 1e-3, 1e-6):
            h_s = torch.randint(-4, 5, (N, H)).float().requires_grad_(True)
            w_s = (torch.randint(-4, 5, (V, H)).float() * 2.0**k).requires_grad_(True)
            h_t = torch.randint(-4, 5, (N, H)).float()
            w_t = torch.randint(-4, 5, (V, H)).float() * 2.0**k
            kwargs = dict(divergence=divergence, beta=0.3, temperature=temperature, reduction="sum")
            loss = fused_linear_turn_kl(h_s, w_s, h_t, w_t, chunk_size=4, **backend_keywords(mode), **kwargs)
            grads = torch.autograd.grad(loss, (h_s, w_s))
            ref = fused_linear_turn_kl_reference(h_s, w_s, h_t, w_t, **kwargs)
            ref_grads = torch.autograd.grad(ref, (h_s, w_s))
            label = f"{mode} {divergence} 2^{k} T={temperature:g}"
            assert abs(float(loss) - float(ref)) <= 1e-4 * abs(float(ref)) + 1e-5, (label, float(loss), float(ref))
            for name, g, r in zip(["hidden", "weight"], grads, ref_grads):
                assert torch.isfinite(g).all(), f"{label}: non-finite {name} gradient"
                # G is O(1/T) per row; dh = G W and dW = G^T h scale with W and h
                natural = (r.abs().max() + 2.0**k * 64 / temperature).double()
                err = float((g.double() - r.double()).abs().max() / natural)
                assert err <= 1e-4, f"{label}: {name} gradient error {err}"



@pytest.mark.parametrize("mode", ["torch", "triton"])
def test_fused_linear_empty_vocabulary_is_an_error(mode):
    if mode == "triton" and not (api.triton_backend is not None and api.triton_backend.is_available(torch.device("cpu"))):
        pytest.skip("triton not installed, or TRITON_INTERPRET unset")
    with pytest.raises(ValueError, match=r"student_weight has an empty vocabulary \(0 rows\)"):
        fused_linear_turn_kl(torch.randn(2, 8), torch.randn(0, 8), torch.randn(2, 8), torch.randn(0, 8), backend=mode)



@pytest.mark.parametrize("lead", [(0,), (2, 0), (0, 3)], ids=["N=0", "T=0", "B=0"])
def test_fused_linear_empty_batch(mode, lead):
    h_s = torch.randn(*lead, 8, requires_grad=True)
    w_s = torch.randn(12, 8, requires_grad=True)
    b_s = torch.randn(12, requires_grad=True)
    for reduction in REDUCTIONS:
        kwargs = dict(student_bias=b_s, reduction=reduction, return_stats=True)
        result = fused_linear_turn_kl(h_s, w_s, torch.randn(*lead, 6), torch.randn(12, 6), **backend_keywords(mode),
                                      **kwargs)
        assert result.loss.shape == (lead if reduction == "none" else ())
        assert float(result.loss.sum()) == 0.0
        grads = torch.autograd.grad(result.loss.sum(), (h_s, w_s, b_s))
        assert grads[0].shape == h_s.shape
        assert float(grads[1].abs().sum()) == 0.0 and float(grads[2].abs().sum()) == 0.0



def test_fused_linear_nan_row(mode):
    h_s = torch.randn(3, 8)
    h_s[1, 2] = math.nan
    h_s.requires_grad_(True)
    w_s = torch.randn(70, 8, requires_grad=True)
    h_t, w_t = torch.randn(3, 6), torch.randn(70, 6)
    for divergence in DIVERGENCES:
        kwargs = dict(divergence=divergence, beta=0.3, return_stats=True, reduction="sum")
        result = fused_linear_turn_kl(h_s, w_s, h_t, w_t, **backend_keywords(mode), **kwargs)
        ref = fused_linear_turn_kl_reference(h_s, w_s, h_t, w_t, **kwargs)
        for name, res in (("ours", result), ("reference", ref)):
            dh, dw = torch.autograd.grad(res.loss, (h_s, w_s))
            assert torch.isnan(res.loss) and torch.isnan(res.kl[1]) and torch.isfinite(res.kl[[0, 2]]).all(), name
            assert torch.isnan(dh[1]).all() and torch.isfinite(dh[[0, 2]]).all(), name
            assert torch.isnan(dw).all(), name  # every column of dW = G^T h meets the NaN row
