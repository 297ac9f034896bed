"""Property tests of K.ppo_loss's input validation (issue 15, items 6 and 9): random bad input
always gives a ValueError with a message naming the problem, never a crash, a NaN or a silent
misuse (a -1 in a mask acting as a weight). Valid random input gives a finite loss.

Runs on the default CPU backend (cpp when built) and on the torch backend.
"""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import rlfuse.kernels as K
from rlfuse.kernels.ppo_options import KL_ESTIMATORS, LOSS_AGGS

SETTINGS = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
SHAPE = (3, 5)
BACKENDS = ("auto", "torch")


def _inputs(seed=0):
    g = torch.Generator().manual_seed(seed)
    lp = torch.randn(SHAPE, generator=g) * 0.3 - 1.0
    return dict(logp=lp, old_logp=lp + torch.randn(SHAPE, generator=g) * 0.1,
                advantages=torch.randn(SHAPE, generator=g), ref_logp=lp + 0.1,
                entropy=torch.rand(SHAPE, generator=g), values=torch.randn(SHAPE, generator=g),
                old_values=torch.randn(SHAPE, generator=g), returns=torch.randn(SHAPE, generator=g))


def _call(backend, t, mask=None, **kw):
    with K.use_backend(backend):
        return K.ppo_loss(t["logp"], t["old_logp"], t["advantages"], mask, ref_logp=t["ref_logp"],
                          entropy=t["entropy"], values=t["values"], old_values=t["old_values"],
                          returns=t["returns"], **kw)


def _expect_error(fn, *words):
    with pytest.raises(ValueError) as info:
        fn()
    msg = str(info.value)
    assert msg and all(w in msg for w in words), msg
    return msg


# scalars of every awkward kind: non-finite, signs, zero, the boundaries, wrong types
ANY_NUMBER = st.one_of(
    st.floats(allow_nan=True, allow_infinity=True, width=32),
    st.sampled_from([0.0, -0.0, 1.0, -1.0, 1.0 + 1e-7, 1e30, float("nan"), float("inf"), -float("inf")]),
    st.integers(-3, 3),
    st.none(), st.booleans(), st.text(max_size=3), st.just(torch.tensor(0.2)))
NUMERIC_OPTIONS = ("clip_eps", "clip_eps_high", "dual_clip", "kl_coef", "entropy_coef", "value_clip",
                   "value_coef", "loss_agg_norm", "kl_clamp", "log_ratio_clamp")
OPTIONAL = {"clip_eps_high", "dual_clip", "value_clip", "loss_agg_norm", "kl_clamp", "log_ratio_clamp"}


def _option_is_valid(name, value, loss_agg):
    """The documented rules, restated independently of kernels/ppo_options.py."""
    if value is None:
        return name in OPTIONAL
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        return False
    return {"clip_eps": value > 0, "clip_eps_high": value >= 0, "dual_clip": value > 1,
            "value_clip": value >= 0, "value_coef": value >= 0, "kl_clamp": value > 0, "log_ratio_clamp": value > 0,
            "loss_agg_norm": value > 0 and loss_agg == "seq-mean-token-sum-norm"}.get(name, True)


@pytest.mark.parametrize("backend_name", BACKENDS)
@SETTINGS
@given(name=st.sampled_from(NUMERIC_OPTIONS), value=ANY_NUMBER, loss_agg=st.sampled_from(LOSS_AGGS))
def test_numeric_options(backend_name, name, value, loss_agg):
    t = _inputs()
    kw = {"kl_coef": 0.1, "loss_agg": loss_agg, name: value}
    if _option_is_valid(name, value, loss_agg):
        loss, stats = _call(backend_name, t, **kw)
        if abs(float(value) if value is not None else 0.0) < 1e6:  # huge coefficients may overflow float32
            assert torch.isfinite(loss) and all(torch.isfinite(v) for v in stats.values())
    else:
        _expect_error(lambda: _call(backend_name, t, **kw), name)


@pytest.mark.parametrize("backend_name", BACKENDS)
@SETTINGS
@given(kl=st.one_of(st.sampled_from(KL_ESTIMATORS), st.text(max_size=4), st.none(), st.integers(0, 5)),
       agg=st.one_of(st.sampled_from(LOSS_AGGS), st.text(max_size=8), st.none()))
def test_named_options(backend_name, kl, agg):
    t = _inputs()
    call = lambda: _call(backend_name, t, kl_coef=0.1, kl_estimator=kl, loss_agg=agg)  # noqa: E731
    if kl not in KL_ESTIMATORS:
        _expect_error(call, "kl_estimator", "k3+")  # names the choices
    elif agg not in LOSS_AGGS:
        _expect_error(call, "loss_agg", "seq-mean-token-sum-norm")
    else:
        assert torch.isfinite(call()[0])


MASK_VALUES = st.sampled_from([0.0, 1.0, 0.0, 1.0, -1.0, 2.0, 0.5, float("nan"), float("inf"), -0.0])


@pytest.mark.parametrize("backend_name", BACKENDS)
@SETTINGS
@given(values=st.lists(MASK_VALUES, min_size=15, max_size=15),
       dtype=st.sampled_from([torch.float32, torch.float64, torch.bfloat16, torch.int64, torch.int8]))
def test_mask_values(backend_name, values, dtype):
    """Bool or 0/1 only; anything else (a -1 weight, a NaN) is a ValueError naming the mask."""
    mask = torch.tensor(values).reshape(SHAPE)
    if not dtype.is_floating_point:
        mask = torch.nan_to_num(mask, nan=3.0, posinf=3.0).to(dtype)
    else:
        mask = mask.to(dtype)
    t = _inputs()
    if bool(((mask == 0) | (mask == 1)).all()):
        loss, _ = _call(backend_name, t, mask)
        assert torch.isfinite(loss)
        same, _ = _call(backend_name, t, mask.bool())
        assert torch.equal(loss, same)
    else:
        _expect_error(lambda: _call(backend_name, t, mask), "mask")


@pytest.mark.parametrize("backend_name", BACKENDS)
@SETTINGS
@given(which=st.sampled_from(["old_logp", "advantages", "mask", "ref_logp", "entropy", "values", "old_values",
                              "returns"]),
       shape=st.lists(st.integers(0, 6), min_size=0, max_size=3).map(tuple))
def test_shapes(backend_name, which, shape):
    t = _inputs()
    bad = torch.zeros(shape, dtype=torch.bool if which == "mask" else torch.float32)
    mask = bad if which == "mask" else None
    if which != "mask":
        t[which] = bad
    call = lambda: _call(backend_name, t, mask)  # noqa: E731
    if shape == SHAPE:
        assert torch.isfinite(call()[0])
    else:
        _expect_error(call, which, "shape")


@pytest.mark.parametrize("backend_name", BACKENDS)
@SETTINGS
@given(which=st.sampled_from(["logp", "old_logp", "advantages", "ref_logp", "entropy", "values", "returns"]),
       bad=st.sampled_from([torch.int64, torch.int32, torch.bool, torch.complex64, "list", "none_required"]))
def test_types(backend_name, which, bad):
    t = _inputs()
    if bad == "list":
        t[which] = t[which].tolist()
    elif bad == "none_required":
        if which not in ("logp", "old_logp", "advantages", "returns"):
            return  # optional inputs may be None
        if which == "returns":  # values without returns: the value loss needs both
            t["returns"] = None
            _expect_error(lambda: _call(backend_name, t), "returns")
            return
        t[which] = None
    else:
        t[which] = t[which].to(bad)
    _expect_error(lambda: _call(backend_name, t), which)
