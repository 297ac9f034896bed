"""K.ppo_loss on every backend against the float64 autograd of reference.ppo_loss:
loss, every stats key, and the gradients wrt logp, entropy and values; loss aggregations and
KL estimators also against hand computations; masked garbage; errors. (Input validation is
property-tested in test_ops_ppo_loss_validation.py.)

Cases taken from Liger-Kernel's GRPO loss tests (test/chunked_loss/test_grpo_loss.py), written
anew for this op: their loss types grpo / bnpo / dr_grpo (= our seq-mean-token-mean /
token-mean / seq-mean-token-sum-norm), beta 0 and 0.1 (kl_coef, with ref_logp near logp), the
odd shape (3, 47) beside (8, 128), bf16 inputs, per-sequence advantages broadcast over tokens,
random padding of 1 .. B*T/2 tokens, and old_logp present or equal to logp (on-policy).
"""

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
    "kl_k1+": dict(ref=True, kl_coef=0.1, kl_estimator="k1+"),
    "kl_k3+": dict(ref=True, kl_coef=0.2, kl_estimator="k3+"),
    "kl_clamp": dict(ref=True, kl_coef=0.3, kl_estimator="k3", kl_clamp=0.1),
    "kl_clamp_st": dict(ref=True, kl_coef=0.2, kl_estimator="k1+", kl_clamp=0.3),  # both signs clamped
    "log_ratio_clamp": dict(log_ratio_clamp=0.5),
    "log_ratio_clamp_all": dict(log_ratio_clamp=0.4, clip_eps_high=0.28, dual_clip=2.0, ref=True, kl_coef=0.1,
                                kl_estimator="k3", kl_clamp=0.2, ent=True, entropy_coef=0.01,
                                loss_agg="seq-mean-token-mean"),
    "verl_preset": dict(dual_clip=3.0, log_ratio_clamp=20.0, ref=True, kl_coef=0.001, kl_estimator="k3",
                        kl_clamp=10.0),
    "seq_mean": dict(ref=True, kl_coef=0.1, kl_estimator="k2", loss_agg="seq-mean-token-mean"),
    "sum_norm": dict(ent=True, entropy_coef=0.01, loss_agg="seq-mean-token-sum-norm"),
    "sum_norm_const": dict(val=True, old_val=True, loss_agg="seq-mean-token-sum-norm", loss_agg_norm=64.0),
    "everything_seq": dict(clip_eps=0.2, clip_eps_high=0.25, dual_clip=3.0, ref=True, kl_coef=0.1,
                           kl_estimator="k3+", ent=True, entropy_coef=0.02, val=True, old_val=True,
                           value_clip=0.1, value_coef=0.5, loss_agg="seq-mean-token-mean"),
}
LOSS_AGGS = ("token-mean", "seq-mean-token-mean", "seq-mean-token-sum-norm")


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


@pytest.mark.parametrize("option", ["kl_clamp", "kl_clamp_st"])
def test_kl_clamp_actually_clamps(backend, option):
    """Guard for the grid above: some tokens' KL lies past the clamp (both signs for k1+), and
    exactly those get the gradient of the loss without its KL term."""
    tensors, kw = _make((6, 40), OPTIONS[option], backend.device, seed=len(option))
    value = reference.kl_penalty(tensors["logp"].double(), tensors["ref_logp"].double(), kw["kl_estimator"][:2])
    outside = value.abs() > kw["kl_clamp"]
    assert 0 < int(outside.sum()) < outside.numel() // 2
    if kw["kl_estimator"] == "k1+":
        assert (value > kw["kl_clamp"]).any() and (value < -kw["kl_clamp"]).any()
    _, stats, leaves = _run(tensors, None, kw)
    _, _, no_kl = _run(tensors, None, {**kw, "kl_coef": 0.0})
    g, g0 = leaves["logp"].grad, no_kl["logp"].grad
    torch.testing.assert_close(g[outside], g0[outside], rtol=1e-6, atol=1e-8)
    assert not torch.allclose(g[~outside], g0[~outside])
    assert float(stats["kl"]) <= kw["kl_clamp"] + 1e-6


@pytest.mark.parametrize("loss_agg", ("token-mean", "seq-mean-token-sum-norm"))
def test_log_ratio_clamp_actually_clamps(backend, loss_agg):
    """Guard for the grid: tokens past the clamp on both sides get no gradient (the clipped
    surrogate alone), the others the unclamped gradient; a huge log-ratio stays finite."""
    tensors, _ = _make((6, 40), {}, backend.device, seed=31)
    c = 0.5
    log_ratio = (tensors["logp"] - tensors["old_logp"]).double()
    outside = log_ratio.abs() > c
    assert (log_ratio > c).any() and (log_ratio < -c).any() and outside.float().mean() < 0.5
    kw = dict(loss_agg=loss_agg, clip_eps=10.0)  # clip range wider than the clamp: only the clamp bites
    _, stats, leaves = _run(tensors, None, {**kw, "log_ratio_clamp": c})
    _, _, plain = _run(tensors, None, kw)
    g, g0 = leaves["logp"].grad, plain["logp"].grad
    assert torch.all(g[outside] == 0) and (g0[outside] != 0).sum() > 5
    torch.testing.assert_close(g[~outside], g0[~outside], rtol=1e-6, atol=1e-9)
    r = torch.exp(log_ratio.clamp(-c, c))
    assert abs(float(stats["approx_kl"]) - float((r - 1 - log_ratio.clamp(-c, c)).mean())) < 1e-6
    # verl's reason for the clamp: a stale old_logp 100 nats away no longer overflows exp
    tensors["old_logp"][0, 0] = tensors["logp"][0, 0].float() - 100.0
    tensors["advantages"][0, 0] = -1.0  # the unclipped branch -A r is taken: +inf without the clamp
    loss, stats, leaves = _run(tensors, None, {**kw, "log_ratio_clamp": 20.0})
    assert torch.isfinite(loss) and torch.isfinite(leaves["logp"].grad).all()
    assert leaves["logp"].grad[0, 0] == 0
    assert not torch.isfinite(_run(tensors, None, kw)[0])  # without it the ratio is inf


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


@pytest.mark.parametrize("loss_agg", LOSS_AGGS)
@pytest.mark.parametrize("shape", ((1,), (37,), (3, 1), (2, 5, 7)), ids=str)
def test_shapes(backend, shape, loss_agg):
    tensors, kw = _make(shape, OPTIONS["everything"], backend.device, seed=5)
    mask = torch.rand(shape, generator=torch.Generator().manual_seed(0)) > 0.3
    mask.view(-1)[0] = True
    _compare(tensors, mask.to(backend.device), {**kw, "loss_agg": loss_agg})


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


@pytest.mark.parametrize("loss_agg", LOSS_AGGS)
@pytest.mark.parametrize("option", ("plain", "everything"))
def test_all_masked(backend, option, loss_agg):
    tensors, kw = _make((3, 8), OPTIONS[option], backend.device, seed=8)
    kw = {**kw, "loss_agg": loss_agg}
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


# ----------------------------------------------------------------------------- loss aggregation
def _by_hand(per_token, mask, loss_agg, norm=None):
    """The aggregations in plain Python loops (rows = leading dims, tokens = last dim)."""
    rows = [(list(map(float, x)), list(map(bool, m))) for x, m in zip(per_token.reshape(-1, per_token.shape[-1]),
                                                                    mask.reshape(-1, mask.shape[-1]))]
    if loss_agg == "token-mean":
        vals = [v for x, m in rows for v, k in zip(x, m) if k]
        return sum(vals) / max(len(vals), 1)
    row_losses = []
    for x, m in rows:
        if not any(m):
            continue  # an all-masked row is not counted
        total = sum(v for v, k in zip(x, m) if k)
        row_losses.append(total / sum(m) if loss_agg == "seq-mean-token-mean" else total / (norm or len(x)))
    return sum(row_losses) / max(len(row_losses), 1)


@pytest.mark.parametrize("loss_agg,norm", [("token-mean", None), ("seq-mean-token-mean", None),
                                           ("seq-mean-token-sum-norm", None), ("seq-mean-token-sum-norm", 100.0)])
def test_loss_agg_by_hand(backend, loss_agg, norm):
    """ratio = 1 (logp = old_logp): the per-token loss is -A, its gradient -A times the token's weight."""
    shape = (5, 11)
    adv = randn(*shape, seed=1, device=backend.device)
    logp = randn(*shape, seed=2, device=backend.device).requires_grad_(True)
    mask = make_mask(*shape, "mixed", seed=5, device=backend.device)  # row 4 is all-masked
    assert not mask[4].any() and mask.sum(-1).min() == 0 and len(set(mask.sum(-1).tolist())) > 2
    loss, stats = K.ppo_loss(logp, logp.detach(), adv, mask, loss_agg=loss_agg, loss_agg_norm=norm)
    loss.backward()
    want = _by_hand(-adv.cpu(), mask.cpu(), loss_agg, norm)
    assert abs(loss.item() - want) < 1e-5, (loss.item(), want)
    assert abs(stats["loss"].item() - want) < 1e-5
    # the stats stay token means whatever the aggregation
    assert abs(stats["policy_loss"].item() - _by_hand(-adv.cpu(), mask.cpu(), "token-mean")) < 1e-5
    # gradient: d(-A r)/dlogp = -A at r = 1, times the token's weight in the aggregation
    count = mask.sum(-1, keepdim=True).float()
    rows = (count > 0).sum().float()
    weight = {"token-mean": mask / mask.sum(),
              "seq-mean-token-mean": mask / count.clamp_min(1) / rows,
              "seq-mean-token-sum-norm": mask / (norm or shape[-1]) / rows}[loss_agg]
    assert_close_verbose(logp.grad, -adv * weight, atol=1e-7, rtol=1e-5, name="grad logp")


def test_loss_aggs_differ_and_agree_when_they_should(backend):
    """Equal-length rows: seq-mean-token-mean = token-mean; sum-norm with norm = T as well."""
    tensors, kw = _make((4, 9), OPTIONS["everything"], backend.device, seed=12)
    full = torch.ones(4, 9, dtype=torch.bool, device=backend.device)
    losses = {agg: _run(tensors, full, {**kw, "loss_agg": agg})[0].item() for agg in LOSS_AGGS}
    assert abs(losses["token-mean"] - losses["seq-mean-token-mean"]) < 1e-6
    assert abs(losses["token-mean"] - losses["seq-mean-token-sum-norm"]) < 1e-6
    holes = make_mask(4, 9, "holes", seed=3, device=backend.device)
    losses = {agg: _run(tensors, holes, {**kw, "loss_agg": agg})[0].item() for agg in LOSS_AGGS}
    assert len({round(v, 6) for v in losses.values()}) == 3, losses


@pytest.mark.parametrize("loss_agg", LOSS_AGGS)
@pytest.mark.parametrize("shape", ((0,), (2, 0), (0, 5)), ids=str)
def test_empty_inputs(backend, shape, loss_agg):
    tensors, kw = _make(shape, OPTIONS["everything"], backend.device, seed=19)
    loss, stats, leaves = _run(tensors, None, {**kw, "loss_agg": loss_agg})
    assert loss.item() == 0.0 and all(v.item() == 0.0 for v in stats.values())
    assert leaves["logp"].grad.shape == shape


# ----------------------------------------------------------------------------- KL estimators
@pytest.mark.parametrize("est,value_of", [("k1+", "k1"), ("k3+", "k3")])
def test_straight_through_kl(backend, est, value_of):
    """k1+/k3+: the value of k1/k3 (loss and stats["kl"]) and the gradient of k2 (= d)."""
    tensors, _ = _make((4, 16), {"ref": True}, backend.device, seed=13)
    mask = make_mask(4, 16, "holes", seed=6, device=backend.device)
    kw = dict(kl_coef=0.3)

    def run(estimator):
        return _run(tensors, mask, {**kw, "kl_estimator": estimator})

    loss_st, stats_st, leaves_st = run(est)
    loss_v, stats_v, _ = run(value_of)
    _, _, leaves_k2 = run("k2")
    assert_close_verbose(loss_st, loss_v, atol=1e-6, rtol=1e-6, name="loss = that of " + value_of)
    assert_close_verbose(stats_st["kl"], stats_v["kl"], atol=1e-7, rtol=1e-6, name="kl stat")
    assert_close_verbose(leaves_st["logp"].grad, leaves_k2["logp"].grad, atol=1e-8, rtol=1e-6, name="grad = k2's")
    # and by hand: the KL part of the gradient is kl_coef * d / n_valid
    _, _, leaves_0 = _run(tensors, mask, {"kl_coef": 0.0})
    d = (tensors["logp"] - tensors["ref_logp"]) * mask / mask.sum()
    assert_close_verbose(leaves_st["logp"].grad - leaves_0["logp"].grad, 0.3 * d, atol=1e-7, rtol=1e-5,
                         name="kl gradient")


def test_k3_gradient_is_not_k2s(backend):
    """Guard for the test above: k3's own gradient (1 - e^-d) differs from k2's (d)."""
    tensors, _ = _make((3, 16), {"ref": True}, backend.device, seed=14)
    g = {est: _run(tensors, None, {"kl_coef": 0.5, "kl_estimator": est})[2]["logp"].grad for est in ("k3", "k2")}
    assert (g["k3"] - g["k2"]).abs().max() > 1e-4


# ----------------------------------------------------------------------------- ties, garbage, values
def test_ties(backend):
    """ratio exactly 1 (clipped == unclipped) and |v - old_v| = 0 (both value branches tie)."""
    tensors, kw = _make((4, 32), OPTIONS["everything"], backend.device, seed=15)
    tensors["old_logp"][:2] = tensors["logp"][:2].float()
    tensors["old_values"][1:3] = tensors["values"][1:3]
    _compare(tensors, make_mask(4, 32, "holes", seed=7, device=backend.device), kw)


@pytest.mark.filterwarnings("ignore:overflow encountered:RuntimeWarning",
                            "ignore:invalid value encountered:RuntimeWarning")
@pytest.mark.parametrize("loss_agg", LOSS_AGGS)
def test_masked_garbage_never_leaks(backend, loss_agg):
    """inf/NaN (and overflowing ratios) at masked positions change nothing."""
    tensors, kw = _make((5, 24), OPTIONS["everything"], backend.device, seed=16)
    kw = {**kw, "loss_agg": loss_agg}
    mask = make_mask(5, 24, "mixed", seed=8, device=backend.device)
    clean = _run(tensors, mask, kw)
    dirty = {k: v.clone() for k, v in tensors.items()}
    hole = ~mask
    dirty["logp"][hole] = 200.0  # exp(logp - old_logp) overflows
    for name, bad in (("old_logp", float("-inf")), ("advantages", float("nan")), ("ref_logp", float("nan")),
                      ("entropy", float("inf")), ("values", float("inf")), ("returns", float("nan")),
                      ("old_values", float("-inf"))):
        dirty[name][hole] = bad
    loss, stats, leaves = _run(dirty, mask, kw)
    assert torch.isfinite(loss) and all(torch.isfinite(v) for v in stats.values())
    assert_close_verbose(loss, clean[0], atol=1e-6, rtol=1e-6, name="loss")
    for name in GRAD_INPUTS:
        g = leaves[name].grad
        assert torch.isfinite(g).all() and (g[hole] == 0).all(), name
        assert_close_verbose(g[mask], clean[2][name].grad[mask], atol=1e-8, rtol=1e-6, name=f"grad {name}")


def test_values_without_old_values_is_unclipped(backend):
    """Documented choice: values without old_values give the plain 0.5 (v - R)^2, not an error."""
    tensors, kw = _make((3, 10), {"val": True, "old_val": True}, backend.device, seed=17)
    no_old = {k: v for k, v in tensors.items() if k != "old_values"}
    loss, stats, leaves = _run(no_old, None, {"value_clip": 0.1})
    want = 0.5 * ((tensors["values"] - tensors["returns"]) ** 2).mean()
    assert_close_verbose(stats["value_loss"], want, atol=1e-6, rtol=1e-5, name="value_loss")
    clipped = _run(tensors, None, {"value_clip": 0.1})[1]["value_loss"]
    assert abs(clipped.item() - want.item()) > 1e-4  # with old_values the clip is active here


# ----------------------------------------------------------------------------- Liger-Kernel's GRPO cases
@pytest.mark.parametrize("shape", ((8, 128), (3, 47)), ids=str)
@pytest.mark.parametrize("loss_agg", LOSS_AGGS)
@pytest.mark.parametrize("beta,eps", [(0.1, 0.2), (0.0, 0.1)])
@pytest.mark.parametrize("on_policy", (False, True))
def test_grpo_cases(backend, shape, loss_agg, beta, eps, on_policy):
    b, t = shape
    if backend.slow and shape == (8, 128) and (on_policy or beta == 0.0):
        pytest.skip("interpreter: one large case per aggregation is enough")
    g = torch.Generator().manual_seed(b * t)
    logp = torch.randn(b, t, generator=g) - 2.0
    old = logp.clone() if on_policy else logp + torch.randn(b, t, generator=g) * 0.05
    ref = logp + torch.randn(b, t, generator=g) * 0.05
    adv = torch.rand(b, generator=g)[:, None].expand(b, t)  # one advantage per sequence
    mask = torch.ones(b, t)
    n_pad = int(torch.randint(1, b * t // 2, (1,), generator=g))
    mask.view(-1)[torch.randperm(b * t, generator=g)[:n_pad]] = 0
    dev = backend.device
    tensors = dict(logp=logp.to(dev), old_logp=old.to(dev), advantages=adv.to(dev), ref_logp=ref.to(dev))
    kw = dict(clip_eps=eps, kl_coef=beta, kl_estimator="k3", loss_agg=loss_agg)
    _compare(tensors, mask.to(dev), kw)


@pytest.mark.parametrize("loss_agg", LOSS_AGGS)
def test_grpo_bf16_inputs(backend, loss_agg):
    """Every input in bf16 (Liger's bf16 case); the reference sees the same rounded values."""
    tensors, kw = _make((3, 47), {"ref": True, "kl_coef": 0.1}, backend.device, seed=18)
    tensors = {k: v.to(torch.bfloat16) for k, v in tensors.items()}
    mask = make_mask(3, 47, "holes", seed=9, device=backend.device)
    _, _, leaves = _compare(tensors, mask, {**kw, "loss_agg": loss_agg}, tol=1e-5,
                            grad_tol=dict(atol=1e-7, rtol=2.0 ** -8))
    assert leaves["logp"].grad.dtype == torch.bfloat16


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
    with pytest.raises(ValueError, match="mask"):
        K.ppo_loss(lp, old, adv, torch.full((3, 4), -1.0, device=backend.device))  # not a weight
    with pytest.raises(ValueError, match="loss_agg.*token-mean"):
        K.ppo_loss(lp, old, adv, loss_agg="seq-mean")
    with pytest.raises(ValueError, match="kl_estimator.*k3\\+"):
        K.ppo_loss(lp, old, adv, ref_logp=tensors["ref_logp"], kl_estimator="k4")
    with pytest.raises(ValueError, match="clip_eps"):
        K.ppo_loss(lp, old, adv, clip_eps=float("nan"))
    with pytest.raises(ValueError, match="loss_agg_norm"):
        K.ppo_loss(lp, old, adv, loss_agg_norm=10.0)  # only for seq-mean-token-sum-norm


# ----------------------------------------------------------------------------- C++ kernel paths
@pytest.mark.parametrize("n", (5000, (1 << 19) + 77), ids=("small", "streamed"))
def test_cpp_mask_storage_and_reused_buffers(n):
    """The C++ kernel reads a float32, bool or uint8 mask as stored: all three give bitwise the
    same outputs, equal to the torch backend's. At the larger size the gradients are streamed
    and their buffers come back from the kernel's pool: a second call with other inputs must
    overwrite every element (a stale element of the first call would show)."""
    from rlfuse.kernels.backends import cpp, torch_backend
    from rlfuse.kernels.ppo_options import PPOLossOptions
    if not cpp.AVAILABLE:
        pytest.skip(cpp.UNAVAILABLE_REASON)
    opts = PPOLossOptions(clip_eps=0.2, clip_eps_high=0.28, dual_clip=3.0, kl_coef=0.1, entropy_coef=0.01,
                          value_clip=0.2, value_coef=0.5)
    for seed in (1, 2):
        tensors, _ = _make((n,), OPTIONS["everything"], "cpu", seed=seed)
        mask = torch.rand(n, generator=torch.Generator().manual_seed(seed)) < 0.8
        args = [tensors[k] for k in ("logp", "old_logp", "advantages")]
        rest = [tensors[k] for k in ("ref_logp", "entropy", "values", "old_values", "returns")]
        outs = {dt: cpp.ppo_loss_forward(*args, mask.to(dt), *rest, None, opts)
                for dt in (torch.float32, torch.bool, torch.uint8)}
        for dt in (torch.bool, torch.uint8):
            for i, (a, b) in enumerate(zip(outs[torch.float32], outs[dt])):
                assert torch.equal(a, b), f"output {i}: a {dt} mask differs from the float32 mask"
        expected = torch_backend.ppo_loss_forward(*args, mask.float(), *rest, None, opts)
        for i, (c, t) in enumerate(zip(outs[torch.bool], expected)):
            torch.testing.assert_close(c, t, atol=1e-7, rtol=2e-5, msg=lambda s: f"seed {seed}, output {i}: {s}")
        del outs  # frees the buffers into the pool for the next seed
