"""The peers' contracts, checked against the peers: each drop-in of rlfuse.integrations beside
the function it replaces, on random inputs — values, gradients, output dtypes.

* TRL and Liger-Kernel (the ``peers`` extra): their installed functions are called; the tests
  skip, saying why, where the package is absent.
* verl and OpenRLHF are not installable here (Ray, vLLM, flash-attn): their code paths are
  restated below from their documented formulas (verl ``core_algos`` / ``torch_functional``,
  OpenRLHF ``models/utils.py`` / ``models/loss.py``), in float64 where the peer computes in
  float32, and our drop-ins are checked against those statements.
"""

from __future__ import annotations

import pytest
import torch

import rlfuse.integrations as I
from rlfuse.integrations import openrlhf, verl
from rlfuse.integrations import trl as rtrl
from rlfuse.integrations.loss import PEER_PRESETS


def _need(module: str):
    return pytest.importorskip(module, reason=f"{module} is not installed (the peers extra: pip install -e '.[peers]')")


def _truth_logp(logits, index, temperature=1.0):
    lp = torch.log_softmax(logits.double() / temperature, -1)
    return lp.gather(-1, index.unsqueeze(-1)).squeeze(-1)


def _truth_entropy(logits, temperature=1.0):
    lp = torch.log_softmax(logits.double() / temperature, -1)
    return -(lp.exp() * lp).sum(-1)


def _logits(shape, dtype, seed, scale=3.0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(*shape, generator=g) * scale).to(dtype)


# ----------------------------------------------------------------------------------------
# output dtypes: the policy of docs/integrations.md, and how much accuracy each choice costs
# ----------------------------------------------------------------------------------------

def test_float32_output_is_more_accurate_than_the_logits_dtype():
    """What docs/integrations.md measures: for bf16 logits the float32 result is ~1e-6 from the
    float64 truth, the same result rounded to bf16 ~1e-2 (half a bf16 ulp at |logp| in [4, 16))."""
    logits = _logits((512, 4001), torch.bfloat16, seed=0, scale=2.5)
    labels = torch.randint(0, 4001, (512,), generator=torch.Generator().manual_seed(1))
    truth = _truth_logp(logits, labels)
    f32 = verl.logprobs_from_logits(logits, labels)
    bf16 = verl.logprobs_from_logits(logits, labels, out_dtype=torch.bfloat16)
    assert f32.dtype == torch.float32 and bf16.dtype == torch.bfloat16
    err32, err16 = (f32.double() - truth).abs(), (bf16.double() - truth).abs()
    assert err32.max() < 1e-5
    assert err16.mean() > 1e-3 and err16.max() > 100 * err32.max()
    ent = verl.entropy_from_logits(logits)
    assert ent.dtype == torch.bfloat16  # verl's own entropy is computed in the logits' dtype
    ent32 = verl.entropy_from_logits(logits, out_dtype=torch.float32)
    h = _truth_entropy(logits)
    assert (ent32.double() - h).abs().max() < 1e-5 < (ent.double() - h).abs().max()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64], ids=str)
def test_output_dtype_per_peer(dtype):
    logits = _logits((3, 5, 37), dtype, seed=2)
    idx = torch.randint(0, 37, (3, 5))
    idx_k = torch.randint(0, 37, (3, 5, 4))
    f64 = dtype == torch.float64
    want32 = torch.float64 if f64 else torch.float32
    expected = {
        # TRL on a GPU: its Triton kernel (float32) for one label per row; its torch path for K
        "trl.selective_log_softmax": (rtrl.selective_log_softmax(logits, idx), want32),
        "trl.selective_log_softmax[K]": (rtrl.selective_log_softmax(logits, idx_k), dtype),
        "trl.entropy_from_logits": (rtrl.entropy_from_logits(logits), want32),
        "trl.selective_log_softmax_and_entropy": (rtrl.selective_log_softmax_and_entropy(logits, idx)[1], want32),
        # verl: flash-attn's cross-entropy (float32) for log-probs; its entropy in the logits' dtype
        "verl.logprobs_from_logits": (verl.logprobs_from_logits(logits, idx), want32),
        "verl.entropy_from_logits": (verl.entropy_from_logits(logits), dtype),
        # OpenRLHF: the logits' dtype (float32 through flash-attn, bf16 through its row loop)
        "openrlhf.log_probs_from_logits": (openrlhf.log_probs_from_logits(logits, idx), dtype),
    }
    for name, (out, want) in expected.items():
        assert out.dtype == want, f"{name}: {out.dtype}, expected {want}"
    # the explicit option, both ways, gives the same values rounded
    for fn in (lambda **k: rtrl.selective_log_softmax(logits, idx, **k),
               lambda **k: verl.logprobs_from_logits(logits, idx, **k),
               lambda **k: openrlhf.log_probs_from_logits(logits, idx, **k),
               lambda **k: verl.entropy_from_logits(logits, **k)):
        a, b = fn(out_dtype=torch.float32), fn(out_dtype=dtype)
        assert a.dtype == torch.float32 and b.dtype == dtype
        assert torch.equal(a.to(dtype), b) if not f64 else torch.allclose(a.double(), b, atol=1e-6)
    with pytest.raises(ValueError, match="out_dtype"):
        verl.logprobs_from_logits(logits, idx, out_dtype=torch.int32)


# ----------------------------------------------------------------------------------------
# TRL (installed): the drop-ins against trl.trainer.utils
# ----------------------------------------------------------------------------------------

@pytest.fixture
def trl_utils():
    tu = _need("trl.trainer.utils")
    rtrl.unpatch()
    yield tu
    rtrl.unpatch()


def _values_and_grads(fn, logits, *args, **kw):
    leaf = logits.detach().clone().requires_grad_()
    out = fn(leaf, *args, **kw)
    outs = out if isinstance(out, tuple) else (out,)
    g = torch.Generator().manual_seed(99)
    loss = sum((o.float() * torch.randn(o.shape, generator=g)).sum() for o in outs)
    loss.backward()
    return [o.detach() for o in outs], leaf.grad


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("temperature", [1.0, 0.6])
@pytest.mark.parametrize("shape", [(3, 7, 257), (2, 1, 1023), (5, 50257)], ids=str)
def test_trl_selective_log_softmax_contract(trl_utils, dtype, temperature, shape):
    logits = _logits(shape, dtype, seed=sum(shape))
    g = torch.Generator().manual_seed(len(shape))
    idx = torch.randint(0, shape[-1], shape[:-1], generator=g)
    mask = torch.rand(shape[:-1], generator=g) > 0.3
    ours, g_ours = _values_and_grads(rtrl.selective_log_softmax, logits, idx, temperature, mask,
                                     out_dtype=dtype)  # TRL's CPU path returns the logits' dtype
    theirs, g_theirs = _values_and_grads(trl_utils.selective_log_softmax, logits, idx, temperature, mask)
    assert ours[0].dtype == theirs[0].dtype == dtype and g_ours.dtype == g_theirs.dtype == dtype
    assert torch.all(ours[0][~mask] == 0) and torch.all(theirs[0][~mask] == 0)
    if dtype == torch.float32:
        torch.testing.assert_close(ours[0], theirs[0], rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(g_ours, g_theirs, rtol=1e-5, atol=1e-6)
    else:  # TRL does the log-softmax in bf16; ours is float32 rounded once: no further from the truth
        truth = _truth_logp(logits, idx, temperature).masked_fill(~mask, 0)
        assert (ours[0].double() - truth).abs().max() <= (theirs[0].double() - truth).abs().max() + 1e-6
        torch.testing.assert_close(g_ours.float(), g_theirs.float(), rtol=0.05, atol=0.02)
    default = rtrl.selective_log_softmax(logits, idx, temperature, mask)
    assert default.dtype == torch.float32  # TRL's kernel path (GPU)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_trl_top_k_entropy_and_combined_contract(trl_utils, dtype):
    logits = _logits((4, 6, 301), dtype, seed=5)
    g = torch.Generator().manual_seed(6)
    idx_k = torch.randint(0, 301, (4, 6, 3), generator=g)
    idx = idx_k[..., 0]
    mask = torch.rand(4, 6, generator=g) > 0.25
    tol = dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else dict(rtol=0.03, atol=0.06)
    pairs = [
        ((rtrl.selective_log_softmax, trl_utils.selective_log_softmax), (idx_k,), {}),
        ((rtrl.entropy_from_logits, trl_utils.entropy_from_logits), (), {}),
        ((rtrl.selective_log_softmax_and_entropy, trl_utils.selective_log_softmax_and_entropy),
         (idx,), dict(temperature=0.8, row_mask=mask)),
    ]
    for (ours_fn, trl_fn), args, kw in pairs:
        ours, g_ours = _values_and_grads(ours_fn, logits, *args, **kw)
        theirs, g_theirs = _values_and_grads(trl_fn, logits, *args, **kw)
        for a, b in zip(ours, theirs):
            assert a.shape == b.shape
            torch.testing.assert_close(a.float(), b.float(), **tol)
        torch.testing.assert_close(g_ours.float(), g_theirs.float(), **tol)
    # K labels: TRL has only its torch path, in the logits' dtype; so do we by default
    assert rtrl.selective_log_softmax(logits, idx_k).dtype == trl_utils.selective_log_softmax(logits, idx_k).dtype


def test_trl_neg_inf_logits_entropy_finite_where_trl_is_nan(trl_utils):
    logits = _logits((2, 3, 50), torch.float32, seed=7)
    logits[..., :10] = float("-inf")
    ours = rtrl.entropy_from_logits(logits)
    theirs = trl_utils.entropy_from_logits(logits)
    assert torch.isfinite(ours).all() and torch.isnan(theirs).all()
    torch.testing.assert_close(ours.double(), _truth_entropy(logits[..., 10:]), rtol=1e-5, atol=1e-5)


# ----------------------------------------------------------------------------------------
# Liger-Kernel's fused GRPO loss (installed) = TRL's GRPO loss types
# ----------------------------------------------------------------------------------------

def _grpo_inputs(seed, b=4, t=9, h=16, v=97):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(b, t, h, generator=g)
    weight = torch.randn(v, h, generator=g) * 0.4
    ids = torch.randint(0, v, (b, t), generator=g)
    mask = torch.ones(b, t, dtype=torch.long)
    mask[0, 6:] = 0           # right padding
    mask[1, :2] = 0           # left padding
    mask[3] = 0               # a completion with no token (TRL still counts the row)
    with torch.no_grad():
        logp = _truth_logp(hidden @ weight.t() / 0.7, ids).float()
    old = logp + 0.15 * torch.randn(b, t, generator=g)
    old[2, 3] = logp[2, 3] - 2.0  # a ratio far past the clip range
    ref_hidden = hidden + 0.05 * torch.randn(b, t, h, generator=g)
    adv = torch.randn(b, generator=g)
    return hidden, weight, ids, mask, old, ref_hidden, adv


@pytest.mark.parametrize("loss_type", ["dapo", "bnpo", "grpo", "dr_grpo"])
@pytest.mark.parametrize("beta", [0.0, 0.04])
def test_grpo_loss_against_liger(loss_type, beta):
    chunked = _need("liger_kernel.chunked_loss")
    hidden, weight, ids, mask, old, ref_hidden, adv = _grpo_inputs(seed=len(loss_type) + int(beta * 100))
    max_len = 12
    liger = chunked.LigerFusedLinearGRPOLoss(beta=beta, compiled=False, use_ref_model=beta != 0.0, chunk_size=2,
                                              epsilon_low=0.2, epsilon_high=0.28, loss_type=loss_type,
                                              max_completion_length=max_len, temperature=0.7)
    ours = I.FusedLinearGRPOLoss(peer="trl", loss_agg=loss_type, kl_coef=beta, clip_eps=0.2, clip_eps_high=0.28,
                                 temperature=0.7, loss_agg_norm=max_len if loss_type == "dr_grpo" else None)
    ref_kw = dict(ref_input=ref_hidden, ref_weight=weight) if beta else {}

    def grads(fn):
        h, w = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
        loss = fn(h, w)
        loss.backward()
        return loss.detach(), h.grad, w.grad

    theirs = grads(lambda h, w: liger(h, w, ids, mask, adv, old_per_token_logps=old, **ref_kw)[0])
    mine = grads(lambda h, w: ours(h, w, ids, old, adv, mask.bool(),
                                   **({"ref_hidden": ref_hidden} if beta else {}))[0])
    for name, a, b in zip(("loss", "grad hidden", "grad weight"), mine, theirs):
        torch.testing.assert_close(a, b, rtol=2e-5, atol=1e-6, msg=lambda m: f"{loss_type} {name}: {m}")
    assert mine[0].abs() > 1e-4


def test_reference_hidden_states_equal_reference_log_probs():
    hidden, weight, ids, mask, old, ref_hidden, adv = _grpo_inputs(seed=3)
    ref_weight = weight * 1.1 + 0.05 * torch.randn(weight.shape, generator=torch.Generator().manual_seed(4))
    loss_fn = I.FusedLinearGRPOLoss(kl_coef=0.1, temperature=0.7)
    with torch.no_grad():
        ref_logp = _truth_logp(ref_hidden @ ref_weight.t() / 0.7, ids).float()
    a = loss_fn(hidden, weight, ids, old, adv, mask.bool(), ref_hidden=ref_hidden, ref_weight=ref_weight)
    b = loss_fn(hidden, weight, ids, old, adv, mask.bool(), ref_logp=ref_logp)
    torch.testing.assert_close(a[0], b[0], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(a[1]["kl"], b[1]["kl"], rtol=1e-5, atol=1e-7)
    assert float(a[1]["kl"]) > 1e-4
    with pytest.raises(ValueError, match="not both"):
        loss_fn(hidden, weight, ids, old, adv, mask.bool(), ref_logp=ref_logp, ref_hidden=ref_hidden)
    with pytest.raises(ValueError, match="ref_hidden only"):
        loss_fn(hidden, weight, ids, old, adv, mask.bool(), ref_logp=ref_logp, ref_weight=ref_weight)


# ----------------------------------------------------------------------------------------
# verl, restated from core_algos (compute_policy_loss_vanilla, kl_penalty, agg_loss)
# ----------------------------------------------------------------------------------------

def _verl_policy_loss(logp, old_logp, adv, mask, agg, clip_low=0.2, clip_high=0.2, clip_ratio_c=3.0):
    neg_kl = torch.clamp(logp - old_logp, -20.0, 20.0)
    ratio = torch.exp(neg_kl)
    loss1 = -adv * ratio
    loss2 = -adv * torch.clamp(ratio, 1 - clip_low, 1 + clip_high)
    clipped = torch.maximum(loss1, loss2)
    dual = torch.minimum(-adv * clip_ratio_c, clipped)
    per_token = torch.where(adv < 0, dual, clipped)
    return per_token, _verl_agg(per_token, mask, agg)


def _verl_low_var_kl(logp, ref_logp):
    kl = torch.clamp(ref_logp - logp, -20, 20)
    return torch.clamp(torch.exp(kl) - kl - 1, -10, 10)


def _verl_agg(per_token, mask, agg):
    m = mask.to(per_token.dtype)
    if agg == "token-mean":
        return (per_token * m).sum() / m.sum()
    if agg == "seq-mean-token-mean":
        return ((per_token * m).sum(-1) / m.sum(-1)).mean()
    return (per_token * m).sum(-1).sum() / m.shape[-1]  # seq-mean-token-sum-norm: rows summed


@pytest.mark.parametrize("agg", ["token-mean", "seq-mean-token-mean", "seq-mean-token-sum-norm"])
def test_verl_policy_and_kl_loss(agg):
    """FusedLinearPPOLoss(peer="verl") = verl's actor loss pg_loss + kl_coef * kl_loss, for
    log-ratios past verl's clamps (old_logp 30 nats away; logp - ref = -27, the issue's case)."""
    b, t, h, v = 3, 8, 16, 61
    g = torch.Generator().manual_seed(11)
    hidden = torch.randn(b, t, h, generator=g)
    weight = torch.randn(v, h, generator=g) * 0.5
    ids = torch.randint(0, v, (b, t), generator=g)
    mask = torch.ones(b, t, dtype=torch.bool)
    mask[0, 5:] = False
    mask[2, 6:] = False
    with torch.no_grad():
        logp = _truth_logp(hidden @ weight.t(), ids)
    old = (logp + 0.3 * torch.randn(b, t, generator=g, dtype=torch.float64)).float()
    old[1, 2] = float(logp[1, 2]) - 30.0   # ratio e^30: verl clamps the log-ratio at 20
    ref = (logp + 0.2 * torch.randn(b, t, generator=g, dtype=torch.float64)).float()
    ref[1, 4] = float(logp[1, 4]) + 27.0   # k3 = e^27: verl clamps it at 10
    adv = torch.randn(b, t, generator=g)
    adv[1, 2] = -1.0  # the dual clip caps -A r at 3 |A|
    kl_coef = 0.05

    leaf_h, leaf_w = hidden.double().requires_grad_(), weight.double().requires_grad_()
    lp = _truth_logp(leaf_h @ leaf_w.t(), ids)
    _, pg_loss = _verl_policy_loss(lp, old.double(), adv.double(), mask, agg, clip_high=0.28)
    kl_loss = _verl_agg(_verl_low_var_kl(lp, ref.double()), mask, agg)
    want = pg_loss + kl_coef * kl_loss
    want.backward()

    loss_fn = I.FusedLinearPPOLoss(peer="verl", kl_coef=kl_coef, clip_eps_high=0.28, loss_agg=agg)
    assert (loss_fn.dual_clip, loss_fn.log_ratio_clamp, loss_fn.kl_clamp) == (3.0, 20.0, 10.0)
    hh, ww = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    loss, stats = loss_fn(hh, ww, ids, old, adv, mask, ref_logp=ref)
    loss.backward()
    assert torch.isfinite(loss) and abs(float(want.detach())) > 1e-3
    torch.testing.assert_close(loss.double(), want.detach(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(hh.grad.double(), leaf_h.grad, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(ww.grad.double(), leaf_w.grad, rtol=1e-4, atol=1e-6)
    # without the clamps (rlfuse's defaults) the outlier token's KL alone is e^27 / n
    plain = I.FusedLinearPPOLoss(kl_coef=kl_coef, clip_eps_high=0.28, loss_agg=agg)
    assert float(plain(hidden, weight, ids, old, adv, mask, ref_logp=ref)[1]["kl"]) > 1e9 > float(stats["kl"])


def test_verl_logprob_and_entropy_contract():
    """verl.utils.torch_functional: logprobs_from_logits through flash-attn's cross-entropy (float32
    log-softmax of the logits, float32 out) and entropy_from_logits (softmax/logsumexp in the
    logits' dtype); gradients of the log-probs as flash-attn's (softmax - onehot)."""
    logits = _logits((6, 11, 503), torch.bfloat16, seed=12)
    labels = torch.randint(0, 503, (6, 11), generator=torch.Generator().manual_seed(13))
    leaf = logits.detach().clone().requires_grad_()
    ours = verl.logprobs_from_logits(leaf, labels)
    ref_leaf = logits.detach().float().requires_grad_()
    theirs = torch.log_softmax(ref_leaf, -1).gather(-1, labels[..., None]).squeeze(-1)  # flash-attn CE, float32
    assert ours.dtype == theirs.dtype == torch.float32
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-5)
    w = torch.randn(ours.shape, generator=torch.Generator().manual_seed(14))
    (ours * w).sum().backward()
    (theirs * w).sum().backward()
    assert leaf.grad.dtype == torch.bfloat16
    torch.testing.assert_close(leaf.grad.float(), ref_leaf.grad.bfloat16().float(), rtol=0.02, atol=1e-3)
    pd = torch.softmax(logits, -1)
    verl_entropy = torch.logsumexp(logits, -1) - (pd * logits).sum(-1)
    ent = verl.entropy_from_logits(logits)
    assert ent.dtype == verl_entropy.dtype == torch.bfloat16
    torch.testing.assert_close(ent.float(), verl_entropy.float(), rtol=0.02, atol=0.1)


# ----------------------------------------------------------------------------------------
# OpenRLHF, restated from models/utils.py (compute_approx_kl, log_probs_from_logits) and
# models/loss.py (PolicyLoss)
# ----------------------------------------------------------------------------------------

def _openrlhf_approx_kl(logp, base, estimator):
    log_ratio = logp - base
    if estimator == "k2":
        log_ratio = log_ratio ** 2 / 2.0
    elif estimator == "k3":
        log_ratio = torch.exp(-log_ratio) - 1 + log_ratio
    return log_ratio.clamp(-10, 10)


@pytest.mark.parametrize("estimator", ["k1", "k2", "k3"])
def test_openrlhf_policy_and_kl_loss(estimator):
    """FusedLinearPPOLoss(peer="openrlhf", kl_estimator=...) = OpenRLHF's PolicyLoss (token
    mean) + kl_coef * masked_mean(compute_approx_kl(...)) with its +-10 clamp on every estimator."""
    b, t, h, v = 3, 7, 8, 41
    g = torch.Generator().manual_seed(21)
    hidden = torch.randn(b, t, h, generator=g)
    weight = torch.randn(v, h, generator=g)
    ids = torch.randint(0, v, (b, t), generator=g)
    mask = torch.rand(b, t, generator=g) > 0.2
    with torch.no_grad():
        logp = _truth_logp(hidden @ weight.t() / 0.9, ids)
    old = (logp + 0.2 * torch.randn(b, t, generator=g, dtype=torch.float64)).float()
    ref = (logp + 0.5 * torch.randn(b, t, generator=g, dtype=torch.float64)).float()
    ref[0, 0], ref[2, 1] = float(logp[0, 0]) + 14.0, float(logp[2, 1]) - 14.0  # past the clamp both ways
    mask[0, 0] = mask[2, 1] = True
    adv = torch.randn(b, t, generator=g)

    leaf_h, leaf_w = hidden.double().requires_grad_(), weight.double().requires_grad_()
    lp = _truth_logp(leaf_h @ leaf_w.t() / 0.9, ids)
    ratio = torch.exp(lp - old.double())
    surr = -torch.minimum(ratio * adv.double(), ratio.clamp(0.8, 1.2) * adv.double())
    m = mask.double()
    kl = _openrlhf_approx_kl(lp, ref.double(), estimator)
    want = (surr * m).sum() / m.sum() + 0.1 * (kl * m).sum() / m.sum()
    want.backward()

    loss_fn = I.FusedLinearPPOLoss(peer="openrlhf", kl_estimator=estimator, kl_coef=0.1, temperature=0.9)
    hh, ww = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    loss, _ = loss_fn(hh, ww, ids, old, adv, mask, ref_logp=ref)
    loss.backward()
    torch.testing.assert_close(loss.double(), want.detach(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(hh.grad.double(), leaf_h.grad, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(ww.grad.double(), leaf_w.grad, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_openrlhf_log_probs_contract(dtype):
    """float32 logits: OpenRLHF's logsumexp (or flash-attn) path, float32 out; bf16: its row-wise
    log_softmax in bf16, bf16 out — ours rounds the float32 result once, no further from the truth."""
    logits = _logits((4, 9, 211), dtype, seed=31)
    labels = torch.randint(0, 211, (4, 9), generator=torch.Generator().manual_seed(32))
    their_leaf = logits.clone().requires_grad_()
    theirs = torch.log_softmax(their_leaf / 0.7, -1).gather(-1, labels[..., None]).squeeze(-1)
    leaf = logits.clone().requires_grad_()
    ours = openrlhf.log_probs_from_logits(leaf, labels, temperature=0.7)
    assert torch.equal(leaf.detach(), logits)  # OpenRLHF divides in place; we never do
    assert ours.dtype == theirs.dtype == dtype
    truth = _truth_logp(logits, labels, 0.7)
    w = torch.randn(ours.shape, generator=torch.Generator().manual_seed(33))
    (ours.float() * w).sum().backward()
    (theirs.float() * w).sum().backward()
    assert leaf.grad.dtype == their_leaf.grad.dtype == dtype
    if dtype == torch.float32:
        torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(leaf.grad, their_leaf.grad, rtol=1e-5, atol=1e-6)
    else:
        assert (ours.double() - truth).abs().max() <= (theirs.double() - truth).abs().max() + 1e-6
        torch.testing.assert_close(leaf.grad.float(), their_leaf.grad.float(), rtol=0.05, atol=0.01)


# ----------------------------------------------------------------------------------------
# the presets and aliases themselves
# ----------------------------------------------------------------------------------------

def test_presets_aliases_and_overrides():
    assert set(PEER_PRESETS) == {"verl", "trl", "openrlhf"}
    assert I.FusedLinearPPOLoss(peer="trl").loss_agg == "token-mean"
    assert I.FusedLinearPPOLoss(loss_agg="grpo").loss_agg == "seq-mean-token-mean"
    assert I.FusedLinearPPOLoss(loss_agg="dr_grpo").loss_agg == "seq-mean-token-sum-norm"
    assert I.FusedLinearPPOLoss(loss_agg="bnpo").loss_agg == "token-mean"
    verl_k1 = I.FusedLinearPPOLoss(peer="verl", kl_estimator="k1")
    assert verl_k1.kl_clamp is None and verl_k1.dual_clip == 3.0  # verl clamps only low_var_kl
    assert I.FusedLinearPPOLoss(peer="verl", dual_clip=None).dual_clip is None  # explicit beats preset
    assert I.FusedLinearPPOLoss(peer="openrlhf").kl_estimator == "k1"
    plain = I.FusedLinearPPOLoss()
    assert (plain.dual_clip, plain.kl_clamp, plain.log_ratio_clamp, plain.loss_agg) == (None, None, None,
                                                                                       "token-mean")
    with pytest.raises(ValueError, match="peer"):
        I.FusedLinearPPOLoss(peer="deepspeed")
    with pytest.raises(ValueError, match="dr_grpo"):
        I.FusedLinearPPOLoss(loss_agg="seq-mean")
    with pytest.raises(ValueError, match="log_ratio_clamp"):
        I.FusedLinearPPOLoss(log_ratio_clamp=-1.0)
    assert "peer='verl'" in repr(I.FusedLinearPPOLoss(peer="verl"))
