"""Kernels v2 options of both log-prob ops on every backend: ``softcap`` and ``logit_scale``
(z = softcap·tanh(x·logit_scale / softcap) / T), and -inf logits (0·log 0 = 0, never NaN),
forward and backward, against float64 autograd of ``reference``."""

from __future__ import annotations

import pytest
import torch

import rlfuse.kernels as K
from rlfuse.kernels import reference
from rlfuse.kernels.logprob_options import LogprobOptions
from helpers import assert_close_verbose, assert_no_worse_than_baseline, rand_labels, randn

# (softcap, logit_scale, temperature): each alone, together, a negative scale, a tight cap
OPTION_CASES = [(30.0, None, 1.0), (None, 0.25, 1.0), (5.0, 0.5, 0.7), (2.0, -1.5, 1.3), (None, None, 1.0)]
OPTION_IDS = [f"cap{c}-scale{s}-T{t}" for c, s, t in OPTION_CASES]


def _ref64(logits, labels, w_logp, w_ent, **opts):
    """float64 (logp, entropy, grad wrt logits) of sum(logp·w_logp + entropy·w_ent)."""
    z = logits.detach().double().requires_grad_(True)
    logp, ent = reference.logprobs_from_logits(z, labels, return_entropy=True, **opts)
    finite = torch.where(torch.isfinite(logp), logp, torch.zeros_like(logp))  # a -inf label's logp
    ((finite * w_logp.double()).sum() + (ent * w_ent.double()).sum()).backward()
    return logp.detach(), ent.detach(), z.grad


def _weighted_backward(logp, ent, w_logp, w_ent):
    finite = torch.where(torch.isfinite(logp), logp, torch.zeros_like(logp))
    ((finite * w_logp).sum() + (ent * w_ent).sum()).backward()


@pytest.mark.parametrize("softcap,logit_scale,temperature", OPTION_CASES, ids=OPTION_IDS)
def test_logprobs_softcap_logit_scale_fp32(backend, softcap, logit_scale, temperature):
    d = backend.device
    n, v = (3, 301) if backend.slow else (9, 1001)
    x = (randn(n, v, seed=1) * 8).to(d).requires_grad_(True)  # |x| up to ~40: well inside the cap's tanh tail
    labels = rand_labels((n,), v, seed=2, device=d)
    w1, w2 = randn(n, seed=3, device=d), randn(n, seed=4, device=d)
    opts = dict(softcap=softcap, logit_scale=logit_scale, temperature=temperature)
    logp, ent = K.logprobs_from_logits(x, labels, return_entropy=True, **opts)
    _weighted_backward(logp, ent, w1, w2)
    ref_lp, ref_ent, ref_grad = _ref64(x, labels, w1, w2, **opts)
    assert_close_verbose(logp, ref_lp, atol=3e-5, rtol=2e-6, name="logp")
    assert_close_verbose(ent, ref_ent, atol=3e-5, rtol=2e-6, name="entropy")
    assert_close_verbose(x.grad, ref_grad, atol=2e-6, rtol=1e-4, name="grad logits")
    if softcap is not None:  # the cap is really applied: the result differs from the uncapped one
        plain = K.logprobs_from_logits(x.detach(), labels, logit_scale=logit_scale, temperature=temperature)
        assert (plain - logp.detach()).abs().max() > 1e-3


@pytest.mark.parametrize("dtype", (torch.bfloat16, torch.float16), ids=("bf16", "fp16"))
def test_logprobs_softcap_low_precision(backend, dtype):
    """Apple CCE criterion with a cap and a scale: error vs the fp64 truth no worse than the
    same-dtype PyTorch baseline (the float32 transform + log-softmax of the rounded logits)."""
    d = backend.device
    n, v = (2, 50257) if not backend.slow else (1, 4099)  # odd vocabulary (GPT-2's)
    x = (randn(n, v, seed=5) * 10).to(dtype).to(d)
    labels = rand_labels((n,), v, seed=6, device=d)
    w1, w2 = randn(n, seed=7, device=d), randn(n, seed=8, device=d)
    opts = dict(softcap=15.0, logit_scale=0.8, temperature=0.7)
    a = x.clone().requires_grad_(True)
    logp, ent = K.logprobs_from_logits(a, labels, return_entropy=True, **opts)
    _weighted_backward(logp, ent, w1, w2)
    b = x.clone().requires_grad_(True)
    blp, bent = reference.logprobs_from_logits(b.float(), labels, return_entropy=True, **opts)
    _weighted_backward(blp, bent, w1, w2)
    truth_lp, truth_ent, truth_grad = _ref64(x, labels, w1, w2, **opts)
    assert_no_worse_than_baseline(logp, blp, truth_lp, factor=2.0, atol=1e-5, name="logp")
    assert_no_worse_than_baseline(ent, bent, truth_ent, factor=2.0, atol=1e-5, name="entropy")
    factor = 4.0 if backend.slow and dtype == torch.bfloat16 else 2.0  # interpreter truncates bf16 stores
    assert a.grad.dtype == dtype
    assert_no_worse_than_baseline(a.grad, b.grad, truth_grad, factor=factor, atol=1e-6, name="grad logits")


@pytest.mark.parametrize("softcap", (None, 4.0))
def test_logprobs_neg_inf_logits(backend, softcap):
    """Masked vocabulary (-inf logits) with return_entropy=True: entropy equals
    torch.distributions.Categorical's, no gradient is NaN, a -inf label gives logp = -inf."""
    d = backend.device
    n, v = (4, 97) if backend.slow else (6, 1003)
    x = randn(n, v, seed=11) * 3
    x[0, ::3] = float("-inf")  # a third of the vocabulary banned
    x[1, 5] = float("-inf")
    x[2, :-1] = float("-inf")  # only the last token allowed: certain, entropy 0
    x[3, 17] = float("-inf")  # ... and it is row 3's label
    labels = rand_labels((n,), v, seed=12)
    labels[0], labels[2], labels[3] = 1, v - 1, 17
    x, labels = x.to(d).requires_grad_(True), labels.to(d)
    w1, w2 = randn(n, seed=13, device=d), randn(n, seed=14, device=d)
    logp, ent = K.logprobs_from_logits(x, labels, return_entropy=True, softcap=softcap)
    if softcap is None:
        assert logp[3] == float("-inf")
        want_ent = torch.distributions.Categorical(logits=x.detach().cpu().double()).entropy()
        assert_close_verbose(ent, want_ent, atol=3e-5, rtol=1e-5, name="entropy vs Categorical")
        assert abs(ent[2].item()) < 1e-6 and abs(logp[2].item()) < 1e-6
    assert torch.isfinite(ent).all()
    assert torch.isfinite(logp[torch.arange(n, device=d) != 3]).all()
    _weighted_backward(logp, ent, w1, w2)
    assert torch.isfinite(x.grad).all(), "a -inf logit made a gradient NaN/inf"
    ref_lp, ref_ent, ref_grad = _ref64(x, labels, w1, w2, softcap=softcap)
    assert_close_verbose(ent, ref_ent, atol=3e-5, rtol=1e-5, name="entropy")
    assert_close_verbose(x.grad, ref_grad, atol=2e-6, rtol=1e-4, name="grad logits")
    if softcap is None:
        assert (x.grad[0, 3::3] == 0).all(), "a banned token must get zero gradient"


def test_logprobs_neg_inf_logp_only_gradient(backend):
    """Only logp carries gradient while the op returned the entropy: still no NaN."""
    d = backend.device
    x = randn(3, 50, seed=21).to(d)
    x[:, ::4] = float("-inf")
    x.requires_grad_(True)
    labels = torch.tensor([1, 2, 3], device=d)
    logp, _ent = K.logprobs_from_logits(x, labels, return_entropy=True)
    logp.sum().backward()
    assert torch.isfinite(x.grad).all()


@pytest.mark.parametrize("softcap,logit_scale,temperature", OPTION_CASES[:4], ids=OPTION_IDS[:4])
def test_linear_logprobs_softcap_logit_scale(backend, softcap, logit_scale, temperature):
    d = backend.device
    n, h, v = (7, 16, 97) if backend.slow else (37, 32, 1001)
    hidden = randn(n, h, seed=31, device=d).requires_grad_(True)
    weight = randn(v, h, seed=32, device=d, scale=2.0).requires_grad_(True)
    bias = randn(v, seed=33, device=d).requires_grad_(True)
    labels = rand_labels((n,), v, seed=34, device=d)
    w1, w2 = randn(n, seed=35, device=d), randn(n, seed=36, device=d)
    opts = dict(softcap=softcap, logit_scale=logit_scale, temperature=temperature)
    logp, ent = K.linear_logprobs(hidden, weight, labels, bias=bias, return_entropy=True, chunk_size=5, **opts)
    ((logp * w1).sum() + (ent * w2).sum()).backward()
    p64 = [t.detach().double().requires_grad_(True) for t in (hidden, weight, bias)]
    rlp, rent = reference.linear_logprobs(*p64[:2], labels, bias=p64[2], return_entropy=True, **opts)
    ((rlp * w1.double()).sum() + (rent * w2.double()).sum()).backward()
    assert_close_verbose(logp, rlp, atol=5e-5, rtol=1e-5, name="logp")
    assert_close_verbose(ent, rent, atol=5e-5, rtol=1e-5, name="entropy")
    for got, want, name in zip((hidden, weight, bias), p64, ("hidden", "weight", "bias")):
        assert_close_verbose(got.grad, want.grad, atol=1e-5, rtol=1e-4, name=f"grad {name}")


def test_linear_logprobs_neg_inf_bias(backend):
    """A -inf bias bans tokens inside the fused head: entropy as Categorical's, finite grads."""
    d = backend.device
    n, h, v = (5, 8, 61) if backend.slow else (23, 16, 503)
    hidden = randn(n, h, seed=41, device=d).requires_grad_(True)
    weight = randn(v, h, seed=42, device=d).requires_grad_(True)
    bias = torch.zeros(v, device=d)
    bias[::7] = float("-inf")
    bias.requires_grad_(True)
    labels = rand_labels((n,), v, seed=43, device=d)
    labels[labels % 7 == 0] += 1  # labels among the allowed tokens
    logp, ent = K.linear_logprobs(hidden, weight, labels, bias=bias, return_entropy=True, chunk_size=4)
    logits = (hidden.detach() @ weight.detach().t() + bias.detach()).double().cpu()
    want = torch.distributions.Categorical(logits=logits).entropy()
    assert_close_verbose(ent, want, atol=5e-5, rtol=1e-5, name="entropy vs Categorical")
    (logp.sum() + ent.sum()).backward()
    for t, name in ((hidden, "hidden"), (weight, "weight"), (bias, "bias")):
        assert torch.isfinite(t.grad).all(), f"grad {name} is not finite"
    assert (bias.grad[::7] == 0).all() and (weight.grad[::7] == 0).all()


# ---------------------------------------------------------------------------------- validation
@pytest.mark.parametrize("kwargs,match", [
    (dict(softcap=0.0), "softcap"), (dict(softcap=-3.0), "softcap"), (dict(softcap=float("inf")), "softcap"),
    (dict(softcap=float("nan")), "softcap"), (dict(logit_scale=0.0), "logit_scale"),
    (dict(logit_scale=float("nan")), "logit_scale"), (dict(temperature=float("inf")), "temperature"),
    (dict(temperature=0.0), "temperature"), (dict(softcap="30"), "softcap"),
])
def test_option_errors(backend, kwargs, match):
    d = backend.device
    x, y = randn(2, 5, seed=1, device=d), torch.tensor([0, 1], device=d)
    with pytest.raises(ValueError, match=match):
        K.logprobs_from_logits(x, y, **kwargs)
    with pytest.raises(ValueError, match=match):
        K.linear_logprobs(x, randn(5, 5, seed=2, device=d), y, **kwargs)


def test_options_bundle():
    opts = LogprobOptions.create(0.5, 10, None)
    assert opts.as_args() == (0.5, 10.0, 1.0) and not opts.is_plain
    assert LogprobOptions.of(2.0) == LogprobOptions(2.0) and LogprobOptions.of(opts) is opts
    with pytest.raises(Exception):  # frozen: one value from the public op to the kernels
        opts.softcap = 3.0
