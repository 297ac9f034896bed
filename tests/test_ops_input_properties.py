"""Issue 21, property tests of gae and masked_whiten over random shapes and masks: empty axes,
any real mask dtype, invalid mask values and NaN/inf at masked positions. Each runs on the
default CPU backend (cpp when built) and on the torch backend; 300 cases per backend.

Properties:
    * a mask holding anything but 0/1 is a ValueError naming the op, whatever else is given;
    * otherwise the result has the input's shape, is finite where the valid inputs are, is 0 at
      masked positions, does not depend on what masked positions hold, and matches the float64
      reference (gae) or the whitening of the valid values alone (masked_whiten).
"""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import rlfuse.kernels as K
from rlfuse.kernels import reference
from helpers import assert_close_verbose

CASES = 300
SETTINGS = settings(max_examples=CASES, deadline=None, suppress_health_check=[HealthCheck.too_slow])
BACKENDS = ("auto", "torch")
GARBAGE = (math.nan, math.inf, -math.inf, 1e30)


@st.composite
def masked_batch(draw, max_dims=2):
    """(x, y, mask, bad): two float tensors and a mask of one random shape (axes may be 0);
    masked positions of x and y hold garbage; ``bad`` says the mask holds a non-0/1 value."""
    dims = draw(st.integers(1, max_dims))
    shape = tuple(draw(st.lists(st.integers(0, 9), min_size=dims, max_size=dims)))
    n = math.prod(shape)
    seed = draw(st.integers(0, 2**31 - 1))
    g = torch.Generator().manual_seed(seed)
    keep = torch.rand(shape, generator=g) < draw(st.sampled_from([0.0, 0.3, 0.7, 1.0]))
    dtype = draw(st.sampled_from([torch.bool, torch.float32, torch.float64, torch.int64, torch.uint8, torch.bfloat16]))
    mask = keep.to(dtype)
    bad = False
    if n and dtype != torch.bool and draw(st.booleans()):
        value = draw(st.sampled_from([0.5, -1.0, 2.0, math.nan, math.inf]))
        if dtype.is_floating_point or value in (-1.0, 2.0):
            if not dtype.is_floating_point and value < 0 and dtype == torch.uint8:
                value = 2.0
            flat = mask.reshape(-1).clone()
            flat[draw(st.integers(0, n - 1))] = value
            mask = flat.reshape(shape)
            bad = True
    x = torch.randn(shape, generator=g) * 3
    y = torch.randn(shape, generator=g)
    fill = draw(st.sampled_from(GARBAGE))
    return x.masked_fill(~keep, fill), y.masked_fill(~keep, fill), mask, keep, bad


def _expect_op_error(fn, op):
    with pytest.raises(ValueError) as info:
        fn()
    assert str(info.value).startswith(f"{op}:") and "0/1" in str(info.value), str(info.value)


@pytest.mark.parametrize("backend_name", BACKENDS)
@SETTINGS
@given(batch=masked_batch(max_dims=2), gamma=st.floats(0, 1), lam=st.floats(0, 1))
def test_gae_properties(backend_name, batch, gamma, lam):
    r, v, mask, keep, bad = batch
    with K.use_backend(backend_name):
        if bad:
            return _expect_op_error(lambda: K.gae(r, v, mask, gamma=gamma, lam=lam), "gae")
        adv, ret = K.gae(r, v, mask, gamma=gamma, lam=lam)
        clean = K.gae(r.masked_fill(~keep, 0.0), v.masked_fill(~keep, 0.0), keep, gamma=gamma, lam=lam)
    assert adv.shape == r.shape and ret.shape == r.shape and adv.dtype == torch.float32
    assert torch.isfinite(adv).all() and torch.isfinite(ret).all()
    assert torch.all(adv[~keep] == 0) and torch.all(ret[~keep] == 0)
    assert torch.equal(adv, clean[0]) and torch.equal(ret, clean[1])  # padding never reaches the result
    if r.numel():
        rows = (1, r.shape[-1]) if r.dim() == 1 else r.shape
        ref_a, ref_r = reference.gae(r.double().reshape(rows), v.double().reshape(rows), keep.reshape(rows),
                                     gamma=gamma, lam=lam)
        tol = 1e-4 * (1 + ref_a.abs().max().item())
        assert_close_verbose(adv.reshape(rows), ref_a, atol=tol, name="advantages")
        assert_close_verbose(ret.reshape(rows), ref_r, atol=tol, name="returns")


@pytest.mark.parametrize("backend_name", BACKENDS)
@SETTINGS
@given(batch=masked_batch(max_dims=3), shift_mean=st.booleans())
def test_masked_whiten_properties(backend_name, batch, shift_mean):
    x, _, mask, keep, bad = batch
    with K.use_backend(backend_name):
        if bad:
            return _expect_op_error(lambda: K.masked_whiten(x, mask, shift_mean=shift_mean), "masked_whiten")
        out = K.masked_whiten(x, mask, shift_mean=shift_mean)
    assert out.shape == x.shape and out.dtype == x.dtype
    assert torch.isfinite(out).all() and torch.all(out[~keep] == 0)
    valid = x[keep].double()
    if valid.numel() >= 2:  # whitening of the valid values alone, unbiased variance
        want = (valid - valid.mean()) / torch.sqrt(valid.var() + 1e-8)
        if not shift_mean:
            want = want + valid.mean()
        assert_close_verbose(out[keep], want, atol=1e-4 * (1 + want.abs().max().item()), name="whitened")
