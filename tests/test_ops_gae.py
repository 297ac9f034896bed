"""K.gae on every backend against reference.gae (a python loop, in float64)."""

from __future__ import annotations

import itertools

import pytest
import torch

import rlfuse.kernels as K
from rlfuse.kernels import reference
from helpers import MASK_KINDS, assert_close_verbose, make_mask, randn

COEFS = (0.0, 0.5, 0.95, 1.0)
SHAPES = ((1, 1), (1, 17), (5, 1), (6, 33), (4, 64))


def _inputs(b, t, kind, device, seed=0):
    r = randn(b, t, seed=seed, device=device)
    v = randn(b, t, seed=seed + 1, device=device)
    m = make_mask(b, t, kind, seed=seed + 2, device=device)
    return r, v, m


def _ref(r, v, m, gamma, lam):
    adv, ret = reference.gae(r.double().cpu(), v.double().cpu(), m.cpu(), gamma=gamma, lam=lam)
    return adv, ret


def _tol(t):
    # a row of T deltas accumulates with gamma*lam up to 1: absolute error grows with T
    return dict(atol=2e-6 * max(t, 1) ** 0.5 * 4, rtol=1e-5)


def _check(adv, ret, r, v, m, gamma, lam):
    ref_adv, ref_ret = _ref(r, v, m, gamma, lam)
    assert adv.dtype == torch.float32 and ret.dtype == torch.float32
    assert adv.shape == r.shape and ret.shape == r.shape
    assert_close_verbose(adv, ref_adv, name="advantages", **_tol(r.shape[-1]))
    assert_close_verbose(ret, ref_ret, name="returns", **_tol(r.shape[-1]))
    # masked outputs are exactly 0; returns == advantages + values on valid positions
    assert torch.all(adv[~m] == 0) and torch.all(ret[~m] == 0), "masked positions must be exactly 0"
    assert_close_verbose(ret[m], (adv + v.float())[m], atol=1e-6, rtol=1e-6, name="returns - (adv + values)")
    assert torch.isfinite(adv).all() and torch.isfinite(ret).all()


@pytest.mark.parametrize("gamma,lam", list(itertools.product(COEFS, COEFS)))
def test_gamma_lam_grid(backend, gamma, lam):
    r, v, m = _inputs(10, 24, "mixed", backend.device, seed=int(gamma * 100 + lam * 10))
    adv, ret = K.gae(r, v, m, gamma=gamma, lam=lam)
    _check(adv, ret, r, v, m, gamma, lam)


@pytest.mark.parametrize("kind", MASK_KINDS)
@pytest.mark.parametrize("shape", SHAPES, ids=[f"{b}x{t}" for b, t in SHAPES])
def test_shapes_and_masks(backend, shape, kind):
    b, t = shape
    r, v, m = _inputs(b, t, kind, backend.device, seed=b * 100 + t)
    adv, ret = K.gae(r, v, m, gamma=0.99, lam=0.95)
    _check(adv, ret, r, v, m, 0.99, 0.95)


def test_mask_none_is_all_valid(backend):
    r, v, _ = _inputs(3, 9, "full", backend.device, seed=4)
    a1, r1 = K.gae(r, v, None, gamma=0.9, lam=0.8)
    a2, r2 = K.gae(r, v, torch.ones_like(r, dtype=torch.bool), gamma=0.9, lam=0.8)
    assert torch.equal(a1, a2) and torch.equal(r1, r2)
    _check(a1, r1, r, v, torch.ones_like(r, dtype=torch.bool), 0.9, 0.8)


@pytest.mark.parametrize("mask_dtype", (torch.float32, torch.int64, torch.uint8))
def test_non_bool_mask(backend, mask_dtype):
    r, v, m = _inputs(4, 12, "mixed", backend.device, seed=7)
    a1, r1 = K.gae(r, v, m.to(mask_dtype), gamma=0.95, lam=0.9)
    a2, r2 = K.gae(r, v, m, gamma=0.95, lam=0.9)
    assert torch.equal(a1, a2) and torch.equal(r1, r2)


@pytest.mark.parametrize("gamma,lam", ((1.0, 0.95), (0.9, 0.5), (1.0, 1.0)))
def test_padding_invariance(backend, gamma, lam):
    """A row embedded with left padding, right padding or holes (garbage rewards/values at the
    masked positions) gives the advantages of the unpadded row at its valid positions."""
    d = backend.device
    L, pad = 11, 6
    row_r, row_v = randn(1, L, seed=1, device=d), randn(1, L, seed=2, device=d)
    adv0, ret0 = K.gae(row_r, row_v, None, gamma=gamma, lam=lam)
    T = L + pad
    garbage_r, garbage_v = randn(3, T, seed=3, device=d, scale=100), randn(3, T, seed=4, device=d, scale=100)
    r, v = garbage_r.clone(), garbage_v.clone()
    m = torch.zeros(3, T, dtype=torch.bool, device=d)
    positions = [torch.arange(pad, T), torch.arange(0, L),                          # left, right
                 torch.tensor([0, 2, 3, 5, 7, 8, 9, 12, 13, 15, 16])]               # holes
    for b, pos in enumerate(positions):
        pos = pos.to(d)
        assert pos.numel() == L
        r[b, pos], v[b, pos], m[b, pos] = row_r[0], row_v[0], True
    adv, ret = K.gae(r, v, m, gamma=gamma, lam=lam)
    for b, (name, pos) in enumerate(zip(("left", "right", "holes"), positions)):
        assert_close_verbose(adv[b, pos.to(d)], adv0[0], atol=1e-6, rtol=0, name=f"{name}-padded advantages")
        assert_close_verbose(ret[b, pos.to(d)], ret0[0], atol=1e-6, rtol=0, name=f"{name}-padded returns")
    assert torch.all(adv[~m] == 0) and torch.all(ret[~m] == 0)


def test_all_masked_rows(backend):
    r, v, _ = _inputs(3, 8, "full", backend.device, seed=9)
    m = torch.zeros_like(r, dtype=torch.bool)
    adv, ret = K.gae(r, v, m, gamma=0.99, lam=0.95)
    assert torch.all(adv == 0) and torch.all(ret == 0)


def test_one_dimensional(backend):
    r, v, m = _inputs(1, 19, "holes", backend.device, seed=10)
    adv1, ret1 = K.gae(r[0], v[0], m[0], gamma=0.9, lam=0.7)
    adv2, ret2 = K.gae(r, v, m, gamma=0.9, lam=0.7)
    assert adv1.shape == (19,) and ret1.shape == (19,)
    assert torch.equal(adv1, adv2[0]) and torch.equal(ret1, ret2[0])
    _check(adv1[None], ret1[None], r, v, m, 0.9, 0.7)


@pytest.mark.parametrize("dtype", (torch.bfloat16, torch.float64))
def test_other_input_dtypes(backend, dtype):
    r, v, m = _inputs(4, 10, "mixed", backend.device, seed=11)
    r, v = r.to(dtype), v.to(dtype)
    adv, ret = K.gae(r, v, m, gamma=0.95, lam=0.9)
    assert adv.dtype == torch.float32
    _check(adv, ret, r, v, m, 0.95, 0.9)


def test_no_gradient(backend):
    r, v, m = _inputs(2, 5, "full", backend.device, seed=12)
    v = v.requires_grad_(True)
    adv, ret = K.gae(r, v, m)
    assert not adv.requires_grad and not ret.requires_grad


def test_errors(backend):
    r, v, m = _inputs(2, 5, "full", backend.device)
    for bad in (-0.1, 1.01):
        with pytest.raises(ValueError, match="gamma"):
            K.gae(r, v, m, gamma=bad)
        with pytest.raises(ValueError, match="lam"):
            K.gae(r, v, m, lam=bad)
    with pytest.raises(ValueError, match="shape"):
        K.gae(r, v[:, :-1], m)
    with pytest.raises(ValueError, match="shape"):
        K.gae(r, v, m[:1])
    with pytest.raises(ValueError):
        K.gae(r[None], v[None], m[None])  # 3-D


# Row counts around the cpp kernel's 16-row groups (and its 8-row generic interleave), lengths
# around its 16-step tiles: every group/tile edge, spare lanes and partial tiles.
EDGE_ROWS = (1, 7, 15, 16, 17, 33, 255)
EDGE_STEPS = (1, 15, 16, 17, 100)


@pytest.mark.parametrize("kind", ("mixed", "holes", "left", "right"))
@pytest.mark.parametrize("b", EDGE_ROWS)
def test_group_and_tile_edges(backend, b, kind):
    if backend.slow and b > 7:
        pytest.skip("slow backend: the small row counts cover it")
    for t in EDGE_STEPS[:3] if backend.slow else EDGE_STEPS:
        r, v, m = _inputs(b, t, kind, backend.device, seed=b * 1000 + t)
        # garbage (NaN, huge) at masked positions must not leak into any row or lane
        r = torch.where(m, r, torch.full_like(r, float("nan")))
        v = torch.where(m, v, torch.full_like(v, 1e30))
        adv, ret = K.gae(r, v, m, gamma=0.99, lam=0.95)
        _check(adv, ret, r, v, m, 0.99, 0.95)


def test_fully_masked_rows_among_valid_ones(backend):
    """All-masked rows inside a group of valid rows (and a whole group of them) stay 0."""
    b, t = 40, 37
    r, v, m = _inputs(b, t, "holes", backend.device, seed=21)
    m[3] = False
    m[16:32] = False
    adv, ret = K.gae(r, v, m, gamma=1.0, lam=0.9)
    _check(adv, ret, r, v, m, 1.0, 0.9)
    assert torch.all(adv[16:32] == 0) and torch.all(ret[3] == 0)


def _cpp_only(backend):
    if backend.name != "cpp":
        pytest.skip("cpp kernel paths")


def test_cpp_paths_agree_bitwise(backend, monkeypatch):
    """The AVX-512 tile path and the generic interleaved path give the same bits (both round
    fma(gamma, next_v, r) - v and fma(gamma*lam, next_a, delta) once each)."""
    _cpp_only(backend)
    from rlfuse.kernels._C import gae as cpp_gae  # the kernel reads the switch per call
    for b, t in ((1, 1), (17, 33), (255, 100)):
        r, v, m = _inputs(b, t, "mixed", backend.device, seed=b + t)
        monkeypatch.delenv("RLFUSE_GAE_GENERIC", raising=False)
        wide = cpp_gae(r, v, m, 0.99, 0.95)
        monkeypatch.setenv("RLFUSE_GAE_GENERIC", "1")
        generic = cpp_gae(r, v, m, 0.99, 0.95)
        for x, y, name in zip(wide, generic, ("advantages", "returns")):
            assert torch.equal(x.view(torch.int32), y.view(torch.int32)), f"{b}x{t}: {name} differ between paths"
        _check(*generic, r, v, m, 0.99, 0.95)


def test_cpp_thread_count_invariance(backend):
    """Rows split across threads (a size above the kernel's per-task grain, rows not a multiple
    of 16) give the same bits with 1, 2 and 3 threads."""
    _cpp_only(backend)
    r, v, m = _inputs(619, 1024, "mixed", backend.device, seed=31)  # 39 groups of 16, the last of 11
    before = torch.get_num_threads()
    try:
        outs = []
        for n in (1, 2, 3):
            torch.set_num_threads(n)
            outs.append(K.gae(r, v, m, gamma=0.99, lam=0.95))
    finally:
        torch.set_num_threads(before)
    for n, (a, rt) in zip((2, 3), outs[1:]):
        assert torch.equal(a, outs[0][0]) and torch.equal(rt, outs[0][1]), f"{n} threads differ from 1 thread"
    rows = slice(600, 619)  # across the last, partial group (the python reference is slow)
    _check(outs[0][0][rows], outs[0][1][rows], r[rows], v[rows], m[rows], 0.99, 0.95)
