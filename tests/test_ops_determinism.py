"""Same inputs twice -> bitwise the same outputs and gradients (RL runs must be reproducible).
Sizes are large enough for the CPU backends to split work across threads."""

from __future__ import annotations

import pytest
import torch

import rlfuse.kernels as K
from helpers import make_mask, rand_labels, rand_logits, randn


def _twice(fn):
    a, b = fn(), fn()
    for i, (x, y) in enumerate(zip(a, b)):
        assert x.dtype == y.dtype and x.shape == y.shape
        assert torch.equal(x, y), f"output {i} differs between two identical calls " \
                                  f"(max diff {(x.double() - y.double()).abs().max().item():.3e})"


def _cpu_only(backend):
    if backend.device.type != "cpu":
        pytest.skip("determinism is promised for the CPU backends")


def test_logprobs_deterministic(backend):
    _cpu_only(backend)
    N, V = (8, 3000) if backend.slow else (64, 5000)
    logits = rand_logits((N, V), seed=1)
    labels = rand_labels((N,), V)
    w = randn(N, seed=2)

    def run():
        x = logits.clone().requires_grad_(True)
        logp, ent = K.logprobs_from_logits(x, labels, temperature=0.9, return_entropy=True)
        ((logp * w).sum() + ent.sum()).backward()
        return logp.detach(), ent.detach(), x.grad

    _twice(run)


def test_linear_logprobs_deterministic(backend):
    _cpu_only(backend)
    N, H, V = (40, 16, 500) if backend.slow else (200, 32, 3000)
    hidden, weight, bias = randn(N, H, seed=1), randn(V, H, seed=2, scale=0.2), randn(V, seed=3)
    labels = rand_labels((N,), V)

    def run():
        h, wt, b = (t.clone().requires_grad_(True) for t in (hidden, weight, bias))
        logp, ent = K.linear_logprobs(h, wt, labels, bias=b, return_entropy=True, chunk_size=16)
        (logp.sum() + ent.sum()).backward()
        return logp.detach(), ent.detach(), h.grad, wt.grad, b.grad

    _twice(run)


def test_gae_deterministic(backend):
    _cpu_only(backend)
    B, T = (8, 64) if backend.slow else (64, 256)
    r, v, m = randn(B, T, seed=1), randn(B, T, seed=2), make_mask(B, T, "mixed")
    _twice(lambda: K.gae(r, v, m, gamma=0.99, lam=0.95))


def test_ppo_loss_deterministic(backend):
    _cpu_only(backend)
    shape = (16, 512)
    old = randn(*shape, seed=1) - 2
    t = dict(logp=old + randn(*shape, seed=2, scale=0.3), ent=randn(*shape, seed=3).abs(),
             val=randn(*shape, seed=4))
    consts = dict(old_logp=old, advantages=randn(*shape, seed=5), ref_logp=old + 0.1,
                  old_values=randn(*shape, seed=6), returns=randn(*shape, seed=7))
    m = make_mask(*shape, "mixed")

    def run():
        lp, ent, val = (x.clone().requires_grad_(True) for x in (t["logp"], t["ent"], t["val"]))
        loss, stats = K.ppo_loss(lp, consts["old_logp"], consts["advantages"], m, ref_logp=consts["ref_logp"],
                                 kl_coef=0.1, entropy=ent, entropy_coef=0.01, values=val,
                                 old_values=consts["old_values"], returns=consts["returns"], dual_clip=3.0)
        loss.backward()
        return (loss.detach(), *stats.values(), lp.grad, ent.grad, val.grad)

    _twice(run)
