"""K.ppo_loss on every backend against the float64 autograd of reference.ppo_loss:
loss, every stats key, and the gradients wrt logp, entropy and values."""

from __future__ import annotations

import pytest
import torch

import rlfuse.kernels as K
from rlfuse.kernels import reference
from rlfuse.kernels.backends import STATS_FIELDS
from helpers import assert_close_verbose, make_mask, randn

OPTIONS = {
    "plain": {},
    "clip_high": dict(clip_eps_high=0.28),
    "dual_clip": dict(dual_clip=3.0),
    "asym_dual": dict(clip_eps=0.1, clip_eps_high=0.3, dual_clip=2.0),
    "kl_k1": dict(ref=True, kl_coef=0.1, kl_estimator="k1"),
    "kl_k2": dict(ref=True, kl_coef=0.2, kl_estimator="k2"),
    "kl_k3": dict(ref=True, kl_coef=0.05, kl_estimator="k3"),
    "ref_no_coef": dict(ref=True, kl_coef=0.0),
    "entropy": dict(ent=True, entropy_coef=0.01),
    "entropy_no_coef": dict(ent=True, entropy_coef=0.0),
    "value_clip": dict(val=True, old_val=True, value_clip=0.2, value_coef=0.5),
    "value_noclip": dict(val=True, old_val=True, value_clip=None, value_coef=1.0),
    "value_no_old": dict(val=True, value_coef=0.25),
    "everything": dict(clip_eps=0.2, clip_eps_high=0.25, dual_clip=3.0, ref=True, kl_coef=0.1,
                       kl_estimator="k3", ent=True, entropy_coef=0.02, val=True, old_val=True,
                       value_clip=0.1, value_coef=0.5),
}


def _make(shape, opts, device, seed=0, logp_dtype=torch.float32):
    g = seed * 17
    old = randn(*shape, seed=g, device=device) - 2.0
    # log-ratio mostly within the clip range, with ~15% large moves (ratio far past 1 +- eps and
    # past the dual-clip cap) so every branch is taken
    spikes = (torch.rand(shape, generator=torch.Generator().manual_seed(g + 8)) < 0.15).to(device)
    move = randn(*shape, seed=g + 1, device=device, scale=0.3) + spikes * randn(*shape, seed=g + 9, device=device,
                                                                                   scale=1.5)
    t = dict(
        logp=(old + move).to(logp_dtype),
        old_logp=old,
        advantages=randn(*shape, seed=g + 2, device=device),
    )
    if opts.get("ref"):
        t["ref_logp"] = old + randn(*shape, seed=g + 3, device=device, scale=0.2)
    if opts.get("ent"):
        t["entropy"] = randn(*shape, seed=g + 4, device=device).abs() * 2
    if opts.get("val"):
        t["returns"] = randn(*shape, seed=g + 5, device=device)
        t["values"] = t["returns"] + randn(*shape, seed=g + 6, device=device, scale=0.5)
        if opts.get("old_val"):
            t["old_values"] = t["values"] + randn(*shape, seed=g + 7, device=device, scale=0.3)
    kw = {k: v for k, v in opts.items() if k not in ("ref", "ent", "val", "old_val")}
    return t, kw


GRAD_INPUTS = ("logp", "entropy", "values")
CONST_INPUTS = ("old_logp", "advantages", "ref_logp", "old_values", "returns")


def _run(tensors, mask, kw, upstream=1.0):
    """Op on fresh leaves (every input requires grad, to prove constants get none)."""
    leaves = {k: v.detach().clone().requires_grad_(True) for k, v in tensors.items()}
    loss, stats = K.ppo_loss(leaves["logp"], leaves["old_logp"], leaves["advantages"], mask,
                             **{k: v for k, v in leaves.items() if k not in ("logp", "old_logp", "advantages")},
                             **kw)
    (loss * upstream).backward()
    return loss, stats, leaves


def _ref(tensors, mask, kw, upstream=1.0):
    leaves = {k: v.detach().double().cpu().requires_grad_(k in GRAD_INPUTS) for k, v in tensors.items()}
    loss, stats = reference.ppo_loss(leaves["logp"], leaves["old_logp"], leaves["advantages"],
                                     None if mask is None else mask.cpu(),
                                     **{k: v for k, v in leaves.items() if k not in ("logp", "old_logp", "advantages")},
                                     **kw)
    (loss * upstream).backward()
    return loss, stats, leaves


def _compare(tensors, mask, kw, upstream=1.0, tol=1e-5, grad_tol=None):
    loss, stats, leaves = _run(tensors, mask, kw, upstream)
    r_loss, r_stats, r_leaves = _ref(tensors, mask, kw, upstream)
    assert loss.dim() == 0 and loss.dtype == torch.float32
    assert_close_verbose(loss, r_loss, atol=tol, rtol=tol, name="loss")
    assert set(stats) >= set(STATS_FIELDS), f"missing stats: {set(STATS_FIELDS) - set(stats)}"
    for key in STATS_FIELDS:
        s = stats[key]
        assert isinstance(s, torch.Tensor) and s.dim() == 0 and not s.requires_grad, key
        assert_close_verbose(s, r_stats[key], atol=tol, rtol=tol, name=f"stats[{key!r}]")
    for name in GRAD_INPUTS:
        if name in leaves:
            assert leaves[name].grad is not None, f"no gradient reached {name}"
            assert leaves[name].grad.dtype == leaves[name].dtype
            gt = grad_tol or dict(atol=tol * 0.1, rtol=tol)
            assert_close_verbose(leaves[name].grad, r_leaves[name].grad, name=f"grad {name}", **gt)
    for name in CONST_INPUTS:
        if name in leaves:
            assert leaves[name].grad is None or torch.all(leaves[name].grad == 0), f"gradient leaked into {name}"
    return loss, stats, leaves


@pytest.mark.parametrize("mask_kind", ("mixed", "none"))
@pytest.mark.parametrize("option", list(OPTIONS))
def test_options_against_reference(backend, option, mask_kind):
    shape = (6, 40)
    tensors, kw = _make(shape, OPTIONS[option], backend.device, seed=len(option))
    mask = None if mask_kind == "none" else make_mask(*shape, "mixed", seed=3, device=backend.device)
    _compare(tensors, mask, kw)


def test_clipping_actually_happens(backend):
    """Guard for the grid above: the inputs exercise both clip sides and the dual-clip cap."""
    tensors, kw = _make((6, 40), OPTIONS["everything"], backend.device, seed=1)
    _, stats, _ = _run(tensors, None, kw)
    assert 0.05 < float(stats["clipfrac"]) < 0.95
    r = torch.exp(tensors["logp"] - tensors["old_logp"])
    a = tensors["advantages"]
    assert ((r < 0.8) & (a < 0)).any(), "no low-side clipping"
    assert ((r > 1.25) & (a > 0)).any(), "no high-side clipping"
    assert ((r > 3.0) & (a < 0)).any(), "dual clip (3.0) never active"
    d = tensors["values"] - tensors["old_values"]
    assert (d.abs() > 0.1).any() and (d.abs() < 0.1).any(), "value clip (0.1) never/always active"


@pytest.mark.parametrize("shape", ((1,), (37,), (3, 1), (2, 5, 7)), ids=str)
def test_shapes(backend, shape):
    tensors, kw = _make(shape, OPTIONS["everything"], backend.device, seed=5)
    mask = torch.rand(shape, generator=torch.Generator().manual_seed(0)) > 0.3
    mask.view(-1)[0] = True
    _compare(tensors, mask.to(backend.device), kw)


def test_upstream_gradient_scales(backend):
    tensors, kw = _make((4, 9), OPTIONS["everything"], backend.device, seed=6)
    mask = make_mask(4, 9, "holes", seed=1, device=backend.device)
    _compare(tensors, mask, kw, upstream=-2.5)


@pytest.mark.parametrize("mask_dtype", (torch.float32, torch.int64))
def test_non_bool_mask(backend, mask_dtype):
    tensors, kw = _make((4, 9), OPTIONS["everything"], backend.device, seed=7)
    mask = make_mask(4, 9, "mixed", seed=2, device=backend.device)
    l1, s1, _ = _run(tensors, mask, kw)
    l2, s2, _ = _run(tensors, mask.to(mask_dtype), kw)
    assert torch.equal(l1.detach(), l2.detach())


@pytest.mark.parametrize("option", ("plain", "everything"))
def test_all_masked(backend, option):
    tensors, kw = _make((3, 8), OPTIONS[option], backend.device, seed=8)
    mask = torch.zeros(3, 8, dtype=torch.bool, device=backend.device)
    loss, stats, leaves = _run(tensors, mask, kw)
    assert loss.item() == 0.0 and not torch.isnan(loss)
    for key in STATS_FIELDS:
        assert stats[key].item() == 0.0, key
    for name in GRAD_INPUTS:
        if name in leaves:
            g = leaves[name].grad
            assert g is not None and not torch.isnan(g).any() and torch.all(g == 0), name


def test_bf16_logp(backend):
    tensors, kw = _make((5, 30), OPTIONS["everything"], backend.device, seed=9, logp_dtype=torch.bfloat16)
    mask = make_mask(5, 30, "mixed", seed=4, device=backend.device)
    # the logp gradient comes back in bf16: half an ulp is 2**-9 relative
    loss, stats, leaves = _compare(tensors, mask, kw, tol=1e-5, grad_tol=dict(atol=1e-7, rtol=2.0 ** -8))
    assert leaves["logp"].grad.dtype == torch.bfloat16


def test_stats_detached_and_loss_differentiable(backend):
    tensors, kw = _make((2, 6), OPTIONS["everything"], backend.device, seed=10)
    loss, stats = K.ppo_loss(tensors["logp"].requires_grad_(True), tensors["old_logp"],
                             tensors["advantages"], None, **{k: v for k, v in tensors.items()
                                                             if k not in ("logp", "old_logp", "advantages")}, **kw)
    assert loss.requires_grad
    assert all(not v.requires_grad for v in stats.values())


# ----------------------------------------------------------------------------- errors
def test_errors(backend):
    tensors, _ = _make((3, 4), OPTIONS["everything"], backend.device)
    lp, old, adv = tensors["logp"], tensors["old_logp"], tensors["advantages"]
    with pytest.raises(ValueError, match="kl_estimator"):
        K.ppo_loss(lp, old, adv, ref_logp=tensors["ref_logp"], kl_coef=0.1, kl_estimator="k4")
    with pytest.raises(ValueError, match="shape"):
        K.ppo_loss(lp, old[:, :-1], adv)
    with pytest.raises(ValueError, match="shape"):
        K.ppo_loss(lp, old, adv, torch.ones(3, 5, dtype=torch.bool, device=backend.device))
    with pytest.raises(ValueError, match="shape"):
        K.ppo_loss(lp, old, adv, entropy=tensors["entropy"][:2])
    with pytest.raises(ValueError, match="returns"):
        K.ppo_loss(lp, old, adv, values=tensors["values"])
    with pytest.raises(ValueError, match="dual_clip"):
        K.ppo_loss(lp, old, adv, dual_clip=0.5)
    with pytest.raises(ValueError, match="ref_logp"):
        K.ppo_loss(lp, old, adv, kl_coef=0.1)
