"""Each op inside torch.compile(fullgraph=True): no graph breaks, same results as eager,
forward and backward. ("aot_eager" traces the backward too, and is fast on CPU.)"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest
import torch

import rlfuse.kernels as K
from helpers import assert_close_verbose, make_mask, rand_labels, rand_logits, randn


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def _compiled(fn):
    return torch.compile(fn, fullgraph=True, backend="aot_eager")


def _grads(fn, inputs):
    leaves = [t.detach().clone().requires_grad_(t.is_floating_point() and g) for t, g in inputs]
    out = fn(*leaves)
    outs = out if isinstance(out, tuple) else (out,)
    sum(o.float().sum() * (i + 1) for i, o in enumerate(outs) if o.requires_grad).backward()
    return [o.detach() for o in outs], [leaf.grad for leaf, (_, g) in zip(leaves, inputs) if g]


def _check_same(fn, inputs, what):
    eager_out, eager_grads = _grads(fn, inputs)
    comp_out, comp_grads = _grads(_compiled(fn), inputs)
    for i, (a, b) in enumerate(zip(comp_out, eager_out)):
        assert_close_verbose(a, b, atol=1e-6, rtol=1e-6, name=f"{what} output {i}")
    for i, (a, b) in enumerate(zip(comp_grads, eager_grads)):
        assert a is not None, f"{what}: no gradient for input {i} under compile"
        assert_close_verbose(a, b, atol=1e-6, rtol=1e-6, name=f"{what} grad {i}")


def test_logprobs_compiles(backend):
    d = backend.device
    logits = rand_logits((2, 6, 31), seed=1, device=d)
    labels = rand_labels((2, 5), 31, device=d)

    def fn(x, y):
        logp, ent = K.logprobs_from_logits(x[:, :-1], y, temperature=0.7, return_entropy=True)
        return logp * 2.0, ent

    _check_same(fn, [(logits, True), (labels, False)], "logprobs_from_logits")


def test_logprobs_softcap_logit_scale_compile(backend):
    """The LogprobOptions bundle is built at the public op and flattened at the custom op, inside
    one fullgraph=True graph, for both log-prob ops."""
    d = backend.device
    logits = rand_logits((2, 6, 31), seed=4, device=d)
    labels = rand_labels((2, 6), 31, device=d)
    hidden, weight = randn(2, 6, 8, seed=5, device=d), randn(31, 8, seed=6, device=d)

    def fn(x, h, w, y):
        logp, ent = K.logprobs_from_logits(x, y, temperature=0.7, softcap=2.0, logit_scale=0.5,
                                           return_entropy=True)
        lp2 = K.linear_logprobs(h, w, y, softcap=3.0, logit_scale=-1.5, chunk_size=5)
        return logp, ent, lp2

    _check_same(fn, [(logits, True), (hidden, True), (weight, True), (labels, False)], "softcap/logit_scale")


def test_logprobs_label_check_under_compile(backend):
    d = backend.device
    logits = rand_logits((3, 11), device=d)

    def fn(x, y):
        return K.logprobs_from_logits(x, y)

    with pytest.raises(Exception, match=r"\[0, 11\)"):
        _compiled(fn)(logits, torch.tensor([0, 11, 2], device=d))


def test_linear_logprobs_compiles(backend):
    d = backend.device
    hidden, weight, bias = randn(2, 5, 8, seed=1, device=d), randn(13, 8, seed=2, device=d), randn(13, seed=3, device=d)
    labels = rand_labels((2, 5), 13, device=d)

    def fn(h, w, b, y):
        return K.linear_logprobs(h, w, y, bias=b, temperature=1.5, return_entropy=True, chunk_size=3)

    _check_same(fn, [(hidden, True), (weight, True), (bias, True), (labels, False)], "linear_logprobs")


def test_gae_compiles(backend):
    d = backend.device
    r, v = randn(4, 9, seed=1, device=d), randn(4, 9, seed=2, device=d)
    m = make_mask(4, 9, "mixed", device=d)

    def fn(r, v, m):
        return K.gae(r, v, m, gamma=0.9, lam=0.8)

    eager = fn(r, v, m)
    comp = _compiled(fn)(r, v, m)
    for a, b in zip(comp, eager):
        assert_close_verbose(a, b, atol=1e-6, rtol=1e-6, name="gae")


@pytest.mark.parametrize("loss_agg,kl_estimator,mask_dtype", [
    ("token-mean", "k3", torch.bool), ("seq-mean-token-mean", "k3+", torch.float32),
    ("seq-mean-token-sum-norm", "k1+", torch.int64)])
def test_ppo_loss_compiles(backend, loss_agg, kl_estimator, mask_dtype):
    d = backend.device
    shape = (3, 7)
    lp, olp, adv = randn(*shape, seed=1, device=d) * 0.3 - 1, randn(*shape, seed=2, device=d) * 0.3 - 1, randn(*shape, seed=3, device=d)
    ent, val, oval, ret, ref = (randn(*shape, seed=s, device=d) for s in (4, 5, 6, 7, 8))
    m = make_mask(*shape, "mixed", device=d).to(mask_dtype)  # non-bool masks are value-checked in the op

    def fn(lp, ent, val, olp, adv, oval, ret, ref, m):
        loss, stats = K.ppo_loss(lp, olp, adv, m, dual_clip=3.0, clip_eps_high=0.3, ref_logp=ref, kl_coef=0.1,
                                 kl_estimator=kl_estimator, entropy=ent, entropy_coef=0.01, values=val,
                                 old_values=oval, returns=ret, loss_agg=loss_agg)
        return loss, stats["clipfrac"], stats["kl"]

    inputs = [(lp, True), (ent, True), (val, True), (olp, False), (adv, False), (oval, False), (ret, False),
              (ref, False), (m, False)]
    _check_same(fn, inputs, "ppo_loss")


def test_ppo_loss_mask_check_holds_under_compile():
    """The 0/1 mask check reads data, so it runs inside the op: compiled, a -1 still raises."""
    lp = randn(2, 5, seed=1)
    fn = _compiled(lambda lp, m: K.ppo_loss(lp, lp.detach(), lp.detach(), m)[0])
    fn(lp, torch.ones(2, 5))
    with pytest.raises(ValueError, match="mask"):
        fn(lp, torch.full((2, 5), -1.0))


_FRESH = textwrap.dedent(r"""
    import torch
    import rlfuse.kernels as K

    def f(x, y, h, w, r, v, m):
        # the ops' first calls in this process are inside the compiled graph
        lp = K.logprobs_from_logits(x, y)
        lp2 = K.linear_logprobs(h, w, y)
        adv, _ = K.gae(r, v, m)
        loss, _ = K.ppo_loss(lp, lp.detach(), adv, m)
        return loss + lp2.sum()

    x = torch.randn(2, 5, requires_grad=True); y = torch.tensor([1, 3])
    h = torch.randn(2, 4, requires_grad=True); w = torch.randn(5, 4, requires_grad=True)
    r, v, m = torch.randn(2), torch.randn(2), torch.tensor([True, True])
    torch.compile(f, fullgraph=True, backend="aot_eager")(x, y, h, w, r, v, m).backward()
    assert x.grad is not None and w.grad is not None
    print("OK")
""")


def test_first_call_inside_compile_fresh_process():
    """Backend modules are imported lazily; an op first called inside a compiled graph must not
    break it (dynamo cannot trace importlib)."""
    env = {k: v for k, v in os.environ.items() if k != "RLFUSE_BACKEND"}
    out = subprocess.run([sys.executable, "-c", _FRESH], capture_output=True, text=True, env=env, timeout=300)
    assert out.returncode == 0 and "OK" in out.stdout, out.stderr[-4000:]
