"""The CUDA backend (``rlfuse.kernels.backends.cuda``) against float64 references.

The tests here need a CUDA device and the built ``rlfuse.kernels._C_cuda`` extension. The
``check_*`` functions take the backend module and a device so that tests/test_cuda_sources.py
runs the very same checks on CPU tensors through the host emulation build of the kernels.
The truth is ``rlfuse.kernels.reference`` in float64 on the CPU, from the same (possibly
low-precision) inputs; low-precision gradients must be no worse than PyTorch's own.
Beyond the backend interface, the tests also hold the backend to: odd vocabularies and
misaligned rows, in-place gradients that leave the rest of the buffer alone, outputs fully
written (freed memory is NaN-poisoned first), zero gradients for zero-weight rows/tokens even
when those hold NaN, and bitwise reproducible PPO sums.
"""

from __future__ import annotations

import itertools
import math

import helpers
import pytest
import torch

from rlfuse.kernels import reference
from rlfuse.kernels.backends import STATS_FIELDS
from rlfuse.kernels.ppo_loss import token_loss_weights
from rlfuse.kernels.ppo_options import PPOLossOptions


def _cuda_backend():
    try:
        from rlfuse.kernels.backends import cuda as backend
    except Exception:  # noqa: BLE001 - no package, no extension: the GPU tests skip
        return None
    return backend if backend.AVAILABLE else None


BACKEND = _cuda_backend()
needs_cuda = pytest.mark.skipif(BACKEND is None,
                                reason="needs a CUDA device and the rlfuse.kernels._C_cuda extension")

# ---------------------------------------------------------------------------------------------
# float64 truths, from kernels/reference.py (through tests/helpers.py)
# ---------------------------------------------------------------------------------------------


def ref_logprobs(logits, labels, temperature):
    """(logp, lse, entropy) in float64 of the logits as stored (after their own rounding)."""
    logits, labels = logits.detach().cpu(), labels.cpu()
    logp, entropy = helpers.ref_logprobs64(logits, labels, temperature)
    return logp, torch.logsumexp(logits.double() / temperature, -1), entropy


def ref_gae(rewards, values, mask, gamma, lam):
    return reference.gae(rewards.detach().cpu().double(), values.detach().cpu().double(),
                         None if mask is None else mask.cpu(), gamma=gamma, lam=lam)


def ref_ppo(logp, old_logp, advantages, mask, ref_logp, entropy, values, old_values, returns, row_len=None,
            **options):
    """(loss, stats[7], grad_logp, grad_entropy | None, grad_values | None) in float64; the 1-D
    inputs are rows of ``row_len`` tokens (one row when None) for the loss aggregation."""

    def d(t, grad=False):
        if t is None:
            return None
        t = t.detach().cpu().double()
        return (t.view(-1, row_len) if row_len else t).requires_grad_(grad)

    logp, entropy, values = d(logp, True), d(entropy, True), d(values, True)
    loss, stats = reference.ppo_loss(logp, d(old_logp), d(advantages), d(mask), ref_logp=d(ref_logp),
                                     entropy=entropy, values=values, old_values=d(old_values),
                                     returns=d(returns), **options)
    inputs = [t for t in (logp, entropy, values) if t is not None]
    grads = iter(torch.autograd.grad(loss, inputs, allow_unused=True, materialize_grads=True))
    g_logp = next(grads).reshape(-1)
    g_ent = None if entropy is None else next(grads).reshape(-1)
    g_val = None if values is None else next(grads).reshape(-1)
    return loss.detach(), torch.stack([stats[k] for k in STATS_FIELDS]), g_logp, g_ent, g_val


# ---------------------------------------------------------------------------------------------
# helpers
# ---------------------------------------------------------------------------------------------


def poison_allocator(device):
    """Fill freed memory with NaN so that an output element the kernel forgets shows up as NaN
    (the caching allocator hands the same blocks to the next allocations)."""
    device = torch.device(device)
    if device.type == "cuda":
        blocks = [torch.full((n,), float("nan"), device=device) for n in (1 << 10, 1 << 16, 1 << 20, 1 << 24)]
        del blocks


def make_logits(n, vocab, dtype, device, *, layout, seed=0):
    """[n, vocab] logits (helpers.rand_logits: spread plus a few near-one-hot rows), "contiguous" or
    "strided": a column window of a wider buffer starting at column 1, so that rows are not
    16-byte aligned and the row stride is not vocab. Returns (logits, the whole buffer)."""
    if layout == "contiguous":
        base = helpers.rand_logits((n, vocab), dtype=dtype, device=device, seed=seed)
        return base, base
    base = helpers.rand_logits((n, vocab + 5), dtype=dtype, device=device, seed=seed)
    return base[:, 1:vocab + 1], base


def _labels(n, vocab, device):
    labels = helpers.rand_labels((n,), vocab)
    if n > 1:
        labels[0] = vocab - 1  # the last column: in the scalar tail for most alignments
        labels[1] = 0
    return labels.to(device)


# ---------------------------------------------------------------------------------------------
# checks, shared with the emulation tests
# ---------------------------------------------------------------------------------------------


def check_logprobs_forward(backend, device, n, vocab, dtype, layout, temperature, with_entropy):
    logits, _ = make_logits(n, vocab, dtype, device, layout=layout, seed=vocab + n)
    labels = _labels(n, vocab, device)
    poison_allocator(device)
    logp, lse, entropy = backend.logprobs_forward(logits, labels, temperature, with_entropy)
    want_logp, want_lse, want_entropy = ref_logprobs(logits, labels, temperature)
    for t in (logp, lse, entropy):
        assert t.dtype == torch.float32 and t.device.type == torch.device(device).type
    # fp32 math on values up to |lse|: a few ulps of the largest magnitude
    scale = max(1.0, want_lse.abs().max().item()) if n else 1.0
    helpers.assert_close_verbose(logp, want_logp, rtol=2e-5, atol=4e-6 * scale, name="logp")
    helpers.assert_close_verbose(lse, want_lse, rtol=2e-5, atol=4e-6 * scale, name="lse")
    if with_entropy:
        helpers.assert_close_verbose(entropy, want_entropy, rtol=2e-5, atol=4e-6 * scale, name="entropy")
    else:
        assert entropy.numel() == 0


def check_logprobs_backward(backend, device, n, vocab, dtype, layout, temperature, with_entropy, inplace):
    logits, base = make_logits(n, vocab, dtype, device, layout=layout, seed=3 * vocab + n)
    labels = _labels(n, vocab, device)
    grad_logp = helpers.randn(n, seed=5)
    grad_entropy = helpers.randn(n, seed=6) if with_entropy else None
    if n > 2:  # a padded row: both incoming gradients zero
        grad_logp[2] = 0.0
        if grad_entropy is not None:
            grad_entropy[2] = 0.0
    grad_logp = grad_logp.to(device)
    grad_entropy = None if grad_entropy is None else grad_entropy.to(device)
    _, lse, entropy = backend.logprobs_forward(logits, labels, temperature, with_entropy)
    want = helpers.ref_logprobs_grad64(logits.cpu(), labels.cpu(), grad_logp.cpu(),
                                       None if grad_entropy is None else grad_entropy.cpu(), temperature)
    baseline = None
    if dtype != torch.float32:  # the same-dtype PyTorch way: fp32 log-softmax, gradient cast back
        x = logits.detach().cpu().float().requires_grad_()
        b_logp, b_ent = helpers.baseline_logprobs(x, labels.cpu(), temperature)
        total = (b_logp * grad_logp.cpu()).sum()
        if grad_entropy is not None:
            total = total + (b_ent * grad_entropy.cpu()).sum()
        (baseline,) = torch.autograd.grad(total, x)
        baseline = baseline.to(dtype)
    base_before = base.clone()
    poison_allocator(device)
    grad = backend.logprobs_backward(logits, labels, lse, entropy, grad_logp, grad_entropy, temperature, inplace)
    assert grad.shape == logits.shape and grad.dtype == dtype
    if inplace:
        assert grad.data_ptr() == logits.data_ptr()
        if layout == "strided":  # columns outside the view are untouched
            assert torch.equal(base[:, 0], base_before[:, 0])
            assert torch.equal(base[:, vocab + 1:], base_before[:, vocab + 1:])
    else:
        assert torch.equal(base, base_before), "out-of-place backward modified the logits"
    if baseline is None:
        atol = 1e-6 * max(1.0, want.abs().max().item())
        helpers.assert_close_verbose(grad, want, rtol=2e-5, atol=atol, name="grad_logits")
    else:
        helpers.assert_no_worse_than_baseline(grad, baseline, want, factor=1.5, atol=1e-6,
                                              name=f"grad_logits {dtype}")
    if n > 2:
        assert (grad[2] == 0).all(), "a row with zero incoming gradients must get zero gradients"


def check_logprobs_transform(backend, device, dtype, softcap, logit_scale, temperature=0.8, n=5, vocab=777):
    """Soft-capped / scaled logits (LogprobOptions) with -inf entries, forward and backward (into
    ``out``), against the float64 reference through autograd."""
    from rlfuse.kernels.logprob_options import LogprobOptions

    opts = LogprobOptions.create(temperature, softcap, logit_scale)
    x = (helpers.randn(n, vocab, seed=vocab + 1) * 6).to(dtype)
    x[1, ::5] = -float("inf")  # a masked vocabulary
    x[2, 3] = -float("inf")
    labels = _labels(n, vocab, "cpu")
    labels[3] = 3  # a label whose own logit is finite next to -inf ones
    g_lp, g_h = helpers.randn(n, seed=7), helpers.randn(n, seed=8)
    z = x.double().requires_grad_()
    want_logp, want_h = reference.logprobs_from_logits(z, labels, temperature=temperature, softcap=softcap,
                                                       logit_scale=logit_scale, return_entropy=True)
    ((want_logp * g_lp.double()).sum() + (want_h * g_h.double()).sum()).backward()
    logits, labels_d = x.to(device), labels.to(device)
    logp, lse, entropy = backend.logprobs_forward(logits, labels_d, opts, True)
    tol = dict(rtol=2e-5, atol=2e-5 * max(1.0, want_logp.abs().max().item()))
    helpers.assert_close_verbose(logp, want_logp.detach(), name="logp", **tol)
    helpers.assert_close_verbose(entropy, want_h.detach(), name="entropy", **tol)
    out = torch.full_like(logits, float("nan"))
    grad = backend.logprobs_backward(logits, labels_d, lse, entropy, g_lp.to(device), g_h.to(device), opts,
                                     False, out=out)
    assert grad.data_ptr() == out.data_ptr() and torch.isfinite(grad).all()
    if dtype == torch.float32:
        helpers.assert_close_verbose(grad, z.grad, rtol=2e-5, atol=1e-6 * max(1.0, z.grad.abs().max().item()),
                                     name="grad_logits")
    else:  # the gradient rounded to the logits dtype
        helpers.assert_close_verbose(grad, z.grad, rtol=1e-2, atol=1e-2 * z.grad.abs().max().item(),
                                     name="grad_logits")


def check_logprobs_extreme(backend, device):
    """3-D logits, a -inf logit (a banned token: p = 0 must not turn into NaN), a near one-hot row."""
    logits = helpers.randn(2, 5, 300, seed=11)
    logits[0, 0, 7] = -float("inf")
    logits[0, 1] *= 1000.0
    labels = helpers.rand_labels((2, 5), 300, seed=12)
    labels[0, 0] = 8
    logits, labels = logits.to(device), labels.to(device)
    logp, lse, entropy = backend.logprobs_forward(logits, labels, 1.0, True)
    flat = logits.reshape(-1, 300).cpu()
    want_logp, _, want_entropy = ref_logprobs(flat, labels.reshape(-1).cpu(), 1.0)  # 0·log 0 = 0 there too
    helpers.assert_close_verbose(logp, want_logp, rtol=1e-5, atol=1e-4, name="logp")
    helpers.assert_close_verbose(entropy, want_entropy, rtol=1e-5, atol=1e-4, name="entropy")
    ones = torch.ones(10, device=device)
    grad = backend.logprobs_backward(logits, labels, lse, entropy, ones, ones, 1.0, False)
    assert grad.shape == logits.shape and torch.isfinite(grad).all()
    assert grad[0, 0, 7] == 0


def gae_case(batch, seq, pattern, device, seed=0):
    """[batch, seq] rewards, values and a helpers.make_mask mask ("full", "holes", "mixed", ...)."""
    rewards = helpers.randn(batch, seq, seed=seed)
    values = helpers.randn(batch, seq, seed=seed + 1)
    mask = helpers.make_mask(batch, seq, pattern, seed=seed)
    return rewards.to(device), values.to(device), mask.to(device)


def check_gae(backend, device, batch, seq, pattern, gamma, lam, pass_mask=True):
    rewards, values, mask = gae_case(batch, seq, pattern, device, seed=seq)
    poison_allocator(device)
    adv, ret = backend.gae(rewards, values, mask if pass_mask else None, gamma, lam)
    want_adv, want_ret = ref_gae(rewards, values, mask if pass_mask else None, gamma, lam)
    assert adv.dtype == torch.float32 and adv.shape == rewards.shape and ret.shape == rewards.shape
    scale = max(1.0, want_adv.abs().max().item())
    helpers.assert_close_verbose(adv, want_adv, rtol=1e-5, atol=1e-6 * scale, name="advantages")
    helpers.assert_close_verbose(ret, want_ret, rtol=1e-5, atol=1e-6 * scale, name="returns")
    if pass_mask:
        assert (adv[~mask] == 0).all() and (ret[~mask] == 0).all()


def check_gae_padding_invariance(backend, device, seq):
    """Left padding, right padding and holes give the advantages of the unpadded row."""
    g = torch.Generator().manual_seed(7)
    core_r, core_v = torch.randn(seq, generator=g), torch.randn(seq, generator=g)
    want_adv, _ = backend.gae(core_r[None].to(device), core_v[None].to(device), None, 0.99, 0.95)
    pad = 37
    total = seq + 2 * pad
    rows_r, rows_v, rows_m, where = [], [], [], []
    for layout in ("left", "right", "holes"):
        r = torch.randn(total, generator=g) * 100  # garbage where masked
        v = torch.randn(total, generator=g) * 100
        if layout == "left":
            idx = torch.arange(2 * pad, total)
        elif layout == "right":
            idx = torch.arange(0, seq)
        else:
            idx = torch.sort(torch.randperm(total, generator=g)[:seq]).values
        m = torch.zeros(total, dtype=torch.bool)
        m[idx], r[idx], v[idx] = True, core_r, core_v
        rows_r.append(r)
        rows_v.append(v)
        rows_m.append(m)
        where.append(idx)
    adv, _ = backend.gae(torch.stack(rows_r).to(device), torch.stack(rows_v).to(device),
                         torch.stack(rows_m).to(device), 0.99, 0.95)
    for i, idx in enumerate(where):
        helpers.assert_close_verbose(adv[i].cpu()[idx], want_adv[0].cpu(), rtol=1e-5, atol=1e-5, name=f"padded row {i}")


PPO_DEFAULTS = dict(clip_eps=0.2, clip_eps_high=0.28, dual_clip=None, kl_coef=0.1, kl_estimator="k3",
                    entropy_coef=0.01, value_clip=0.2, value_coef=0.5)


def ppo_case(n, device, *, ref, ent, val, old_val, mask_kind="random", seed=0):
    g = torch.Generator().manual_seed(seed)

    def r(scale=1.0):
        return torch.randn(n, generator=g) * scale

    logp = r(0.5) - 1.0
    old_logp = logp + r(0.3)  # ratios far enough from 1 that every clip branch is taken
    adv = r()
    if mask_kind == "random":
        mask = (torch.rand(n, generator=g) > 0.3).float()
    elif mask_kind == "none":
        mask = torch.zeros(n)
    else:
        mask = torch.ones(n)
    values = r() if val else None
    t = dict(logp=logp, old_logp=old_logp, advantages=adv, mask=mask,
             ref_logp=logp + r(0.2) if ref else None, entropy=r().abs() if ent else None, values=values,
             old_values=values + r(0.3) if val and old_val else None, returns=r() if val else None)
    return {k: None if v is None else v.to(device) for k, v in t.items()}


def ppo_call(backend, inputs, opts, row_len=None):
    """backend.ppo_loss_forward with the options as a PPOLossOptions and the op's loss weights."""
    options = PPOLossOptions(**opts)
    mask = inputs["mask"]
    weight = token_loss_weights(mask.float(), row_len or max(mask.numel(), 1), options)
    return backend.ppo_loss_forward(*inputs.values(), weight, options)


def check_ppo(backend, device, n, *, ref=True, ent=True, val=True, old_val=True, mask_kind="random", **options):
    opts = {**PPO_DEFAULTS, **options}
    inputs = ppo_case(n, device, ref=ref, ent=ent, val=val, old_val=old_val, mask_kind=mask_kind, seed=n)
    row_len = 50 if n % 50 == 0 and n > 0 else None  # rows for the loss aggregations
    poison_allocator(device)
    out = ppo_call(backend, inputs, opts, row_len)
    want = ref_ppo(*inputs.values(), row_len=row_len, **opts)
    loss, stats, g_logp, g_ent, g_val = out
    assert loss.dim() == 0 and stats.shape == (7,)
    helpers.assert_close_verbose(loss, want[0], rtol=1e-5, atol=1e-6, name="loss")
    helpers.assert_close_verbose(stats, want[1], rtol=1e-5, atol=1e-6, name="stats")
    grad_scale = 1.0 / max(1.0, inputs["mask"].sum().item())
    for name, got, exp in (("grad_logp", g_logp, want[2]), ("grad_entropy", g_ent, want[3]),
                           ("grad_values", g_val, want[4])):
        if exp is None:
            assert got.numel() == 0, f"{name} must be empty when its input is None"
        else:
            helpers.assert_close_verbose(got, exp, rtol=1e-5, atol=1e-6 * grad_scale, name=name)
    # bitwise reproducible
    again = ppo_call(backend, inputs, opts, row_len)
    for a, b in zip(out, again):
        assert torch.equal(a, b), "ppo_loss_forward is not deterministic"


def check_ppo_masked_garbage(backend, device, n):
    """Masked tokens contribute nothing even when they hold inf/NaN; an all-masked batch is 0."""
    inputs = ppo_case(n, device, ref=True, ent=True, val=True, old_val=True, seed=3)
    mask = inputs["mask"]
    for key in ("logp", "old_logp", "advantages", "values", "returns"):
        inputs[key] = inputs[key].masked_fill(mask == 0, float("nan"))
    loss, stats, g_logp, g_ent, g_val = ppo_call(backend, inputs, PPO_DEFAULTS)
    assert torch.isfinite(loss) and torch.isfinite(stats).all()
    for g in (g_logp, g_ent, g_val):
        assert torch.isfinite(g).all() and (g[mask == 0] == 0).all()
    for agg in ("seq-mean-token-mean", "seq-mean-token-sum-norm"):  # garbage never leaks via weights
        out = ppo_call(backend, inputs, {**PPO_DEFAULTS, "loss_agg": agg}, row_len=n // 10)
        assert all(torch.isfinite(t).all() for t in out) and (out[2][mask == 0] == 0).all(), agg
    inputs["mask"] = torch.zeros_like(mask)
    loss, stats, g_logp, g_ent, g_val = ppo_call(backend, inputs, PPO_DEFAULTS)
    assert loss.item() == 0.0 and (stats == 0).all()
    for g in (g_logp, g_ent, g_val):
        assert (g == 0).all()


PPO_OPTION_GRID = [
    dict(ref=ref, ent=ent, val=val, old_val=old_val, kl_estimator=est, dual_clip=dual, value_clip=vclip)
    for ref, ent, val, old_val, est, dual, vclip in itertools.product(
        (False, True), (False, True), (False, True), (False, True), ("k1", "k2", "k3", "k1+", "k3+"), (None, 3.0),
        (None, 0.2))
    if val or not old_val
] + [dict(ref=True, ent=True, val=True, old_val=True, kl_estimator=est, loss_agg=agg)
     for est in ("k2", "k3+") for agg in ("seq-mean-token-mean", "seq-mean-token-sum-norm")]

# ---------------------------------------------------------------------------------------------
# GPU tests
# ---------------------------------------------------------------------------------------------

DTYPES = [torch.float32, torch.bfloat16, torch.float16]


@needs_cuda
@pytest.mark.gpu
@pytest.mark.parametrize("vocab", [1, 3, 50, 1000, 50257, 128256])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("layout", ["contiguous", "strided"])
def test_logprobs_forward(vocab, dtype, layout):
    n = 64 if vocab < 100_000 else 16
    check_logprobs_forward(BACKEND, "cuda", n, vocab, dtype, layout, 1.0, True)
    check_logprobs_forward(BACKEND, "cuda", n, vocab, dtype, layout, 0.7, False)


@needs_cuda
@pytest.mark.gpu
@pytest.mark.parametrize("vocab", [1, 3, 1000, 50257, 128256])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("layout", ["contiguous", "strided"])
@pytest.mark.parametrize("with_entropy", [False, True])
@pytest.mark.parametrize("inplace", [False, True])
def test_logprobs_backward(vocab, dtype, layout, with_entropy, inplace):
    n = 32 if vocab < 100_000 else 8
    check_logprobs_backward(BACKEND, "cuda", n, vocab, dtype, layout, 0.8, with_entropy, inplace)


@needs_cuda
@pytest.mark.gpu
def test_logprobs_empty_and_many_rows():
    check_logprobs_forward(BACKEND, "cuda", 0, 50, torch.float32, "contiguous", 1.0, True)
    check_logprobs_forward(BACKEND, "cuda", 70_000, 7, torch.bfloat16, "strided", 1.0, True)
    check_logprobs_backward(BACKEND, "cuda", 70_000, 7, torch.bfloat16, "strided", 1.0, True, False)


@needs_cuda
@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("softcap,logit_scale", [(None, 0.25), (30.0, None), (4.0, -1.5)])
def test_logprobs_softcap_logit_scale_and_neg_inf(dtype, softcap, logit_scale):
    check_logprobs_transform(BACKEND, "cuda", dtype, softcap, logit_scale)


@needs_cuda
@pytest.mark.gpu
def test_logprobs_3d_logits_and_extreme_values():
    check_logprobs_extreme(BACKEND, "cuda")


@needs_cuda
@pytest.mark.gpu
@pytest.mark.parametrize("seq", [1, 7, 300, 2048, 2049, 5000])
@pytest.mark.parametrize("pattern", ["full", "left", "right", "holes", "mixed"])
def test_gae(seq, pattern):
    check_gae(BACKEND, "cuda", 6, seq, pattern, 0.99, 0.95)


@needs_cuda
@pytest.mark.gpu
@pytest.mark.parametrize("gamma,lam", [(1.0, 1.0), (0.0, 0.95), (0.9, 0.0), (0.0, 0.0)])
def test_gae_gamma_lambda(gamma, lam):
    check_gae(BACKEND, "cuda", 10, 300, "mixed", gamma, lam)


@needs_cuda
@pytest.mark.gpu
def test_gae_without_mask_and_padding_invariance():
    check_gae(BACKEND, "cuda", 6, 1000, "full", 0.99, 0.95, pass_mask=False)
    check_gae_padding_invariance(BACKEND, "cuda", 3000)


@needs_cuda
@pytest.mark.gpu
@pytest.mark.parametrize("case", PPO_OPTION_GRID, ids=lambda c: "-".join(f"{k}={v}" for k, v in c.items()))
def test_ppo_loss_options(case):
    check_ppo(BACKEND, "cuda", 5000, **case)


@needs_cuda
@pytest.mark.gpu
@pytest.mark.parametrize("n", [0, 1, 2047, 2048, 2049, 300_000])
@pytest.mark.parametrize("mask_kind", ["random", "none", "all"])
def test_ppo_loss_sizes(n, mask_kind):
    check_ppo(BACKEND, "cuda", n, mask_kind=mask_kind)
    check_ppo(BACKEND, "cuda", n, mask_kind=mask_kind, clip_eps_high=0.2, dual_clip=2.0, kl_estimator="k2")


@needs_cuda
@pytest.mark.gpu
def test_ppo_loss_masked_garbage():
    check_ppo_masked_garbage(BACKEND, "cuda", 10_000)


@needs_cuda
@pytest.mark.gpu
def test_non_default_stream_and_device_checks():
    stream = torch.cuda.Stream()
    logits = torch.randn(128, 4096, device="cuda")
    labels = torch.randint(0, 4096, (128,), device="cuda")
    want = BACKEND.logprobs_forward(logits, labels, 1.0, True)
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        got = BACKEND.logprobs_forward(logits, labels, 1.0, True)
    torch.cuda.current_stream().wait_stream(stream)
    for a, b in zip(got, want):
        assert torch.equal(a, b)
    with pytest.raises(RuntimeError):
        BACKEND.logprobs_forward(logits.cpu(), labels.cpu(), 1.0, True)
    assert math.isfinite(want[0].sum().item())
