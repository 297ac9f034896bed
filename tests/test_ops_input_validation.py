"""Issue 21, kernels group: every op and every backend refuses and accepts the same inputs.

* gae on rows of zero time steps ([B, 0], [0]) returns empty outputs on every backend;
* a mask that weights instead of selecting (0.5, -1, NaN, inf) is a ValueError naming the op,
  for gae, masked_whiten and ppo_loss alike, on every backend and in the float64 reference;
* masked_whiten ignores values at masked positions, NaN and inf included.

The ``backend`` fixture runs each test on every backend present here (torch, cpp, the Triton CPU
interpreter; triton and cuda on a GPU). The spy-backend tests show that the checks run before
any backend is reached, so the triton and cuda wrappers get the same validation without a GPU.
"""

from __future__ import annotations

import math

import pytest
import torch

import rlfuse.kernels as K
from rlfuse.kernels import dispatch, reference
from helpers import assert_close_verbose, make_mask, randn

BAD_MASK_VALUES = (0.5, -1.0, 2.0, float("nan"), float("inf"))


def _bad_mask(value, shape=(3, 6), dtype=torch.float32, device="cpu"):
    m = make_mask(*shape, "holes", seed=1, device=device).to(dtype)
    m[1, 2] = value
    return m


# ---------------------------------------------------------------------------------------------
# gae on an empty time axis
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("shape", [(3, 0), (0,), (0, 5), (0, 0)])
def test_gae_empty_time_axis_gives_empty_outputs(backend, shape):
    d = backend.device
    r, v = torch.zeros(shape, device=d), torch.zeros(shape, device=d)
    for mask in (None, torch.ones(shape, dtype=torch.bool, device=d)):
        adv, ret = K.gae(r, v, mask, gamma=0.9, lam=0.8)
        assert adv.shape == shape and ret.shape == shape
        assert adv.dtype == torch.float32 and ret.dtype == torch.float32
        assert adv.numel() == 0 and ret.numel() == 0


def test_gae_empty_time_axis_in_each_backend_module():
    """The backend functions themselves (called after validation) take a [B, 0] batch too."""
    r = torch.zeros(4, 0)
    m = torch.zeros(4, 0, dtype=torch.bool)
    for name in ("torch", "cpp"):
        if name not in K.available_backends():
            continue
        adv, ret = dispatch.get(name).gae(r, r, m, 1.0, 0.95)
        assert adv.shape == (4, 0) and ret.shape == (4, 0), name
    ra, rr = reference.gae(r.double(), r.double(), m)
    assert ra.shape == (4, 0) and rr.shape == (4, 0)


# ---------------------------------------------------------------------------------------------
# non-0/1 masks: the same ValueError, naming the op, everywhere
# ---------------------------------------------------------------------------------------------
def _expect_mask_error(fn, op):
    with pytest.raises(ValueError) as info:
        fn()
    msg = str(info.value)
    assert msg.startswith(f"{op}:") and "mask" in msg and "0/1" in msg, msg


@pytest.mark.parametrize("value", BAD_MASK_VALUES)
def test_non_binary_mask_is_refused_by_every_op(backend, value):
    d = backend.device
    x = randn(3, 6, seed=2, device=d)
    bad = _bad_mask(value, device=d)
    _expect_mask_error(lambda: K.gae(x, x, bad), "gae")
    _expect_mask_error(lambda: K.masked_whiten(x, bad), "masked_whiten")
    _expect_mask_error(lambda: K.ppo_loss(x, x, x, bad), "ppo_loss")


@pytest.mark.parametrize("value", BAD_MASK_VALUES)
def test_reference_refuses_the_same_masks(value):
    x = randn(3, 6, seed=2, dtype=torch.float64)
    bad = _bad_mask(value, dtype=torch.float64)
    _expect_mask_error(lambda: reference.gae(x, x, bad), "gae")
    _expect_mask_error(lambda: reference.masked_whiten(x, bad), "masked_whiten")


@pytest.mark.parametrize("dtype", (torch.float32, torch.float64, torch.int64, torch.uint8, torch.bfloat16))
def test_binary_masks_of_any_real_dtype_equal_the_bool_mask(backend, dtype):
    d = backend.device
    r, v = randn(3, 6, seed=3, device=d), randn(3, 6, seed=4, device=d)
    m = make_mask(3, 6, "holes", seed=5, device=d)
    a_bool, ret_bool = K.gae(r, v, m, gamma=0.9, lam=0.8)
    a, ret = K.gae(r, v, m.to(dtype), gamma=0.9, lam=0.8)
    assert torch.equal(a, a_bool) and torch.equal(ret, ret_bool)
    assert torch.equal(K.masked_whiten(r, m.to(dtype)), K.masked_whiten(r, m))


def test_complex_mask_is_refused():
    x = torch.randn(2, 3)
    m = torch.ones(2, 3, dtype=torch.complex64)
    for fn in (lambda: K.gae(x, x, m), lambda: K.masked_whiten(x, m)):
        with pytest.raises(ValueError, match="mask"):
            fn()


class _Spy:
    """A backend that records what reaches it: it must only ever see validated, bool masks."""

    DEVICES = ("cpu", "cuda")

    def __init__(self):
        self.calls = []

    def gae(self, rewards, values, mask, gamma, lam):
        self.calls.append(mask.dtype)
        return torch.zeros_like(rewards), torch.zeros_like(rewards)


@pytest.mark.parametrize("name", ["torch", "cpp", "triton", "cuda"])
def test_validation_runs_before_any_backend(monkeypatch, name):
    """Whatever backend is picked (here a spy standing in for it, so triton and cuda are covered
    without a GPU), a bad mask never reaches it and a good one arrives as bool."""
    spy = _Spy()
    monkeypatch.setitem(dispatch._loaded, name, spy)
    monkeypatch.setattr(dispatch, "_load", lambda n: spy if n == name else None)
    x = torch.randn(2, 5)
    with K.use_backend(name):
        for value in BAD_MASK_VALUES:
            _expect_mask_error(lambda: K.gae(x, x, _bad_mask(value, (2, 5))), "gae")
        assert spy.calls == []
        K.gae(x, x, torch.ones(2, 5))
        K.gae(torch.zeros(2, 0), torch.zeros(2, 0))
    assert spy.calls == [torch.bool, torch.bool]


def test_mask_check_holds_under_compile():
    r = randn(2, 5, seed=1)
    fn = torch.compile(lambda r, m: K.gae(r, r, m)[0], fullgraph=True, backend="aot_eager")
    fn(r, torch.ones(2, 5))
    with pytest.raises(ValueError, match="gae"):
        fn(r, torch.full((2, 5), 0.5))


# ---------------------------------------------------------------------------------------------
# masked_whiten ignores what padding holds
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("garbage", (float("nan"), float("inf"), -float("inf"), 1e30))
@pytest.mark.parametrize("shift_mean", (True, False))
def test_masked_whiten_ignores_values_at_masked_positions(garbage, shift_mean):
    x = randn(4, 9, seed=6, scale=2.0)
    m = make_mask(4, 9, "mixed", seed=7)
    clean = K.masked_whiten(x, m, shift_mean=shift_mean)
    dirty = x.masked_fill(~m, garbage)
    out = K.masked_whiten(dirty, m, shift_mean=shift_mean)
    assert torch.isfinite(out).all()
    assert torch.equal(out, clean)
    assert torch.all(out[~m] == 0)
    ref = reference.masked_whiten(dirty.double(), m, shift_mean=shift_mean)
    assert_close_verbose(out, ref, atol=1e-5, rtol=1e-5, name="whitened")


def test_masked_whiten_ignores_nan_padding_in_low_precision():
    for dtype in (torch.bfloat16, torch.float16):
        x = randn(3, 8, seed=8, dtype=dtype)
        m = make_mask(3, 8, "right", seed=9)
        out = K.masked_whiten(x.masked_fill(~m, math.nan), m)
        assert torch.isfinite(out).all(), dtype
        assert torch.equal(out, K.masked_whiten(x, m)), dtype


def test_gae_ignores_nan_at_masked_positions(backend):
    """The same promise for gae, on every backend: padding may hold NaN."""
    d = backend.device
    r, v = randn(3, 10, seed=10, device=d), randn(3, 10, seed=11, device=d)
    m = make_mask(3, 10, "holes", seed=12, device=d)
    clean = K.gae(r, v, m, gamma=0.95, lam=0.9)
    dirty = K.gae(r.masked_fill(~m, math.nan), v.masked_fill(~m, math.nan), m, gamma=0.95, lam=0.9)
    for a, b in zip(dirty, clean):
        assert torch.isfinite(a).all()
        assert_close_verbose(a, b, atol=1e-6, rtol=1e-6, name="gae")

