"""K.masked_whiten (shared by every backend) against the float64 reference."""

from __future__ import annotations

import pytest
import torch

import rlfuse.kernels as K
from rlfuse.kernels import reference
from helpers import MASK_KINDS, assert_close_verbose, make_mask, randn


@pytest.mark.parametrize("shift_mean", (True, False))
@pytest.mark.parametrize("kind", [k for k in MASK_KINDS if k != "all_masked"])
def test_against_reference(kind, shift_mean):
    x = randn(6, 20, seed=1, scale=3.0) + 2.0
    m = make_mask(6, 20, kind, seed=2)
    out = K.masked_whiten(x, m, shift_mean=shift_mean)
    ref = reference.masked_whiten(x.double(), m, shift_mean=shift_mean)
    assert out.dtype == x.dtype and out.shape == x.shape
    assert_close_verbose(out, ref, atol=1e-5, rtol=1e-5, name="whitened")
    assert torch.all(out[~m] == 0)
    valid = out[m].double()
    if shift_mean:
        assert abs(valid.mean().item()) < 1e-5
        assert abs(valid.std().item() - 1.0) < 1e-4
    else:  # scale only: the mean is kept, the spread is 1
        xm = x[m].double()
        assert abs(valid.mean().item() - xm.mean().item()) < 1e-4  # the mean is added back
        assert abs((valid - valid.mean()).std().item() - 1.0) < 1e-4
        assert_close_verbose(valid - valid.mean(), (xm - xm.mean()) / xm.std(), atol=1e-5, name="centred")


def test_mask_none():
    x = randn(4, 7, seed=3)
    out = K.masked_whiten(x, None)
    ref = reference.masked_whiten(x.double(), None)
    assert_close_verbose(out, ref, atol=1e-5, rtol=1e-5, name="whitened")


@pytest.mark.parametrize("dtype", (torch.float32, torch.bfloat16, torch.float16, torch.float64))
def test_all_masked_gives_zeros(dtype):
    x = randn(3, 5, seed=4, dtype=dtype, scale=10.0)
    for shift_mean in (True, False):
        out = K.masked_whiten(x, torch.zeros(3, 5, dtype=torch.bool), shift_mean=shift_mean)
        assert not torch.isnan(out).any(), f"NaN in all-masked whiten ({dtype})"
        assert torch.all(out == 0)


@pytest.mark.parametrize("dtype", (torch.float32, torch.bfloat16, torch.float16))
def test_single_valid_and_constant_values_are_finite(dtype):
    x = randn(2, 6, seed=5, dtype=dtype)
    m = torch.zeros(2, 6, dtype=torch.bool)
    m[1, 3] = True
    out = K.masked_whiten(x, m)
    assert torch.isfinite(out).all() and torch.all(out == 0)
    const = torch.full((2, 6), 3.0, dtype=dtype)
    out = K.masked_whiten(const, torch.ones(2, 6, dtype=torch.bool))
    assert torch.isfinite(out).all() and torch.all(out == 0)


def test_low_precision_matches_reference():
    x = randn(5, 30, seed=6, dtype=torch.bfloat16, scale=2.0)
    m = make_mask(5, 30, "mixed", seed=7)
    out = K.masked_whiten(x, m)
    assert out.dtype == torch.bfloat16
    ref = reference.masked_whiten(x.double(), m)
    assert_close_verbose(out, ref, atol=2e-2, rtol=1e-2, name="bf16 whitened")


def test_gradient_flows():
    x = randn(3, 8, seed=8).requires_grad_(True)
    m = make_mask(3, 8, "holes", seed=9)
    (K.masked_whiten(x, m) * randn(3, 8, seed=10)).sum().backward()
    xd = x.detach().double().requires_grad_(True)
    (reference.masked_whiten(xd, m) * randn(3, 8, seed=10, dtype=torch.float64)).sum().backward()
    assert_close_verbose(x.grad, xd.grad, atol=1e-5, rtol=1e-4, name="grad x")


def test_errors():
    x = randn(3, 4, seed=0)
    with pytest.raises(ValueError, match="shape"):
        K.masked_whiten(x, torch.ones(3, 5, dtype=torch.bool))
    with pytest.raises(ValueError):
        K.masked_whiten(torch.ones(3, 4, dtype=torch.int64), None)
