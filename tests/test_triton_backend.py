"""The Triton backend against the float64 reference.

On a machine without CUDA the kernels run in Triton's CPU interpreter (TRITON_INTERPRET=1,
set below before triton or rlfuse is imported); with CUDA they run compiled on the GPU.
Kernel outputs are poisoned (NaN-prefilled allocations) so a kernel that skips a write fails.
"""

import os
import sys

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest

pytest.importorskip("triton")

import rlfuse.kernels as K  # noqa: E402
from rlfuse.kernels import dispatch, reference  # noqa: E402
from rlfuse.kernels.ppo_loss import token_loss_weights  # noqa: E402
from rlfuse.kernels.ppo_options import PPOLossOptions  # noqa: E402

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
DEVICE = "cpu" if INTERPRET or not torch.cuda.is_available() else "cuda"


def _forget_stale_state():
    """If this process looked at the triton backend (or imported its kernels) before
    TRITON_INTERPRET was set, drop those cached answers so they are taken again."""
    if dispatch._loaded.get("triton", "unset") is None:
        dispatch._loaded.pop("triton", None)
        dispatch._load_errors.pop("triton", None)
    for name in [m for m in sys.modules if m.startswith("rlfuse.kernels.triton.")]:
        mod = sys.modules[name]
        kernels = [v for v in vars(mod).values()
                   if type(v).__name__ in ("JITFunction", "InterpretedFunction", "Autotuner")]
        interpreted = [type(k.fn if type(k).__name__ == "Autotuner" else k).__name__
                       == "InterpretedFunction" for k in kernels]
        if any(interpreted) != INTERPRET:
            del sys.modules[name]


_forget_stale_state()
TRITON_OK = "triton" in K.available_backends()
pytestmark = pytest.mark.skipif(not TRITON_OK, reason=f"triton backend unavailable: "
                                f"{K.unavailable_reasons().get('triton')}")


def _backend():
    return dispatch.get("triton")


def _kmod(name):
    import importlib
    return importlib.import_module(f"rlfuse.kernels.triton.{name}")


class _PoisonedTorch:
    """Stands in for ``torch`` inside the kernel modules: fresh allocations come back full
    of NaN (floats) or a sentinel (integers) instead of whatever memory held."""

    def __getattr__(self, name):
        return getattr(torch, name)

    @staticmethod
    def _poison(t):
        if t.is_floating_point():
            return t.fill_(float("nan"))
        return t.fill_(-7) if t.dtype != torch.bool else t

    def empty(self, *args, **kwargs):
        return self._poison(torch.empty(*args, **kwargs))

    def empty_like(self, *args, **kwargs):
        return self._poison(torch.empty_like(*args, **kwargs))


@pytest.fixture(autouse=True)
def poisoned(monkeypatch):
    if not TRITON_OK:
        return
    for name in ("logprobs", "gae", "ppo_loss"):
        monkeypatch.setattr(_kmod(name), "torch", _PoisonedTorch())


def close(actual, expected, atol, rtol=1e-5, what=""):
    actual, expected = actual.double().cpu(), expected.double().cpu()
    assert torch.isfinite(actual).all(), f"{what}: non-finite values in {actual}"
    err = (actual - expected).abs()
    bound = atol + rtol * expected.abs()
    worst = int(torch.argmax(err - bound))
    assert bool((err <= bound).all()), (
        f"{what}: max err {err.max().item():.3e}; worst at flat index {worst}: "
        f"{actual.flatten()[worst].item()!r} vs {expected.flatten()[worst].item()!r}")


def rand_logits(shape, dtype=torch.float32, scale=3.0, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(shape, generator=g, dtype=torch.float64) * scale).to(dtype).to(DEVICE)


def rand_labels(shape, v, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, v, shape, generator=g).to(DEVICE)


# --------------------------------------------------------------------------------------------
# backend flags
# --------------------------------------------------------------------------------------------

def test_backend_flags_follow_the_environment(monkeypatch):
    mod = _backend()
    assert mod.AVAILABLE and mod.UNAVAILABLE_REASON == ""
    assert "cuda" in mod.DEVICES
    if INTERPRET:
        assert "cpu" in mod.DEVICES
        monkeypatch.setenv("TRITON_INTERPRET", "0")
        assert mod.DEVICES == ("cuda",)
        assert mod.AVAILABLE == torch.cuda.is_available()
        if not torch.cuda.is_available():
            assert "CUDA" in mod.UNAVAILABLE_REASON
    for fn in ("logprobs_forward", "logprobs_backward", "gae", "ppo_loss_forward"):
        assert callable(getattr(mod, fn))


def test_auto_never_picks_triton_for_cpu_tensors():
    assert dispatch.resolve(torch.device("cpu"), "gae") != "triton"


# --------------------------------------------------------------------------------------------
# log-probs
# --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("v", [1, 3, 1000])
@pytest.mark.parametrize("temperature", [1.0, 0.7])
@pytest.mark.parametrize("with_entropy", [False, True])
def test_logprobs_forward_matches_reference(v, temperature, with_entropy):
    x = rand_logits((7, v), seed=v)
    y = rand_labels((7,), v)
    logp, lse, ent = _backend().logprobs_forward(x, y, temperature, with_entropy)
    ref_lp, ref_h = reference.logprobs_from_logits(x.double(), y, temperature=temperature,
                                                   return_entropy=True)
    close(logp, ref_lp, 2e-5, what="logp")
    close(lse, torch.logsumexp(x.double() / temperature, -1), 2e-5, what="lse")
    assert logp.dtype == lse.dtype == torch.float32
    if with_entropy:
        close(ent, ref_h, 2e-5, what="entropy")
    else:
        assert ent.numel() == 0


@pytest.mark.parametrize("with_entropy", [False, True])
def test_logprobs_backward_inplace_matches_out_of_place(with_entropy):
    be = _backend()
    x = rand_logits((5, 600), seed=13)
    y = rand_labels((5,), 600, seed=14)
    _lp, lse, ent = be.logprobs_forward(x, y, 0.8, True)
    g = torch.Generator().manual_seed(1)
    glp = torch.randn(5, generator=g).to(DEVICE)
    gh = torch.randn(5, generator=g).to(DEVICE) if with_entropy else None
    out = be.logprobs_backward(x, y, lse, ent, glp, gh, 0.8, False)
    assert out.data_ptr() != x.data_ptr() and out.shape == x.shape and out.dtype == x.dtype
    buf = x.clone()
    res = be.logprobs_backward(buf, y, lse, ent, glp, gh, 0.8, True)
    assert res.data_ptr() == buf.data_ptr()
    assert torch.equal(res, out)
    assert torch.equal(buf, out)
    # against autograd on the float64 reference
    x64 = x.double().requires_grad_()
    lp64, h64 = reference.logprobs_from_logits(x64, y, temperature=0.8, return_entropy=True)
    obj = (lp64 * glp.double()).sum() + ((h64 * gh.double()).sum() if with_entropy else 0.0)
    obj.backward()
    close(out, x64.grad, 1e-6, what="grad")


def test_logprobs_backward_inplace_strided_bf16():
    be = _backend()
    big = rand_logits((4, 130), dtype=torch.bfloat16, seed=15)
    x = big[:, :129]  # row stride 130, in-place must respect it
    y = rand_labels((4,), 129, seed=16)
    _lp, lse, ent = be.logprobs_forward(x, y, 1.0, True)
    glp, gh = torch.ones(4, device=DEVICE), torch.full((4,), 0.5, device=DEVICE)
    expected = be.logprobs_backward(x, y, lse, ent, glp, gh, 1.0, False)
    tail = big[:, 129].clone()
    be.logprobs_backward(x, y, lse, ent, glp, gh, 1.0, True)
    assert torch.equal(big[:, :129], expected)
    assert torch.equal(big[:, 129], tail)  # the column outside the view is untouched


def test_logprobs_neg_inf_logits_and_determinism():
    be = _backend()
    x = rand_logits((3, 700), seed=17)
    x[:, :400] = float("-inf")  # whole first tiles masked out
    y = rand_labels((3,), 300, seed=18) + 400
    a = be.logprobs_forward(x, y, 1.0, True)
    b = be.logprobs_forward(x, y, 1.0, True)
    for u, w in zip(a, b):
        assert torch.equal(u, w)
    ref_lp = reference.logprobs_from_logits(x[:, 400:].double(), y - 400)
    close(a[0], ref_lp, 2e-5, what="logp")
    ref_h = reference.logprobs_from_logits(x[:, 400:].double(), y - 400, return_entropy=True)[1]
    close(a[2], ref_h, 2e-5, what="entropy")
    glp, gh = torch.ones(3, device=DEVICE), torch.full((3,), -0.7, device=DEVICE)
    grad = be.logprobs_backward(x, y, a[1], a[2], glp, gh, 1.0, False)
    x64 = x[:, 400:].double().requires_grad_()
    lp64, h64 = reference.logprobs_from_logits(x64, y - 400, return_entropy=True)
    (lp64.sum() - 0.7 * h64.sum()).backward()
    close(grad[:, 400:], x64.grad, 1e-6, what="grad")
    assert torch.all(grad[:, :400] == 0)


@pytest.mark.parametrize("with_bias", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_linear_logprobs_through_triton(with_bias, dtype):
    g = torch.Generator().manual_seed(21)
    n, hdim, v = 11, 16, 301
    hidden = (torch.randn(n, hdim, generator=g)).to(dtype).to(DEVICE).requires_grad_()
    weight = (torch.randn(v, hdim, generator=g) * 0.5).to(dtype).to(DEVICE).requires_grad_()
    bias = (torch.randn(v, generator=g) * 0.1).to(dtype).to(DEVICE).requires_grad_() if with_bias else None
    labels = rand_labels((n,), v, seed=22)
    with K.use_backend("triton"):
        lp, h = K.linear_logprobs(hidden, weight, labels, bias=bias, temperature=0.9,
                                  return_entropy=True, chunk_size=4)
    (lp.sum() - 0.3 * h.sum()).backward()
    h64, w64 = hidden.detach().double().requires_grad_(), weight.detach().double().requires_grad_()
    b64 = bias.detach().double().requires_grad_() if with_bias else None
    rlp, rh = reference.linear_logprobs(h64, w64, labels, bias=b64, temperature=0.9, return_entropy=True)
    (rlp.sum() - 0.3 * rh.sum()).backward()
    if dtype == torch.float32:
        close(lp, rlp, 1e-4, what="logp")
        close(h, rh, 1e-4, what="entropy")
        close(hidden.grad, h64.grad, 1e-4, what="grad hidden")
        close(weight.grad, w64.grad, 1e-4, what="grad weight")
        if with_bias:
            close(bias.grad, b64.grad, 1e-4, what="grad bias")
    else:  # bf16 logits from a bf16 matmul: compare against torch's own bf16 path
        with K.use_backend("torch"):
            tlp, th = K.linear_logprobs(hidden.detach(), weight.detach(), labels,
                                        bias=None if bias is None else bias.detach(),
                                        temperature=0.9, return_entropy=True, chunk_size=4)
        close(lp, tlp, 1e-4, what="logp vs torch backend")
        close(h, th, 1e-4, what="entropy vs torch backend")
        close(lp, rlp, 0.15, what="logp vs fp64")
        assert hidden.grad.dtype == dtype and torch.isfinite(weight.grad.float()).all()


# --------------------------------------------------------------------------------------------
# GAE
# --------------------------------------------------------------------------------------------

def _gae_inputs(b, t, seed):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(b, t, generator=g).to(DEVICE), torch.randn(b, t, generator=g).to(DEVICE))


def _masks(b, t, seed):
    g = torch.Generator().manual_seed(seed)
    ar = torch.arange(t)
    lengths = torch.randint(0, t + 1, (b,), generator=g)
    right = ar[None, :] < lengths[:, None]                # right padding
    left = ar[None, :] >= (t - lengths)[:, None]          # left padding
    holes = torch.rand(b, t, generator=g) > 0.35          # scattered holes
    none = torch.zeros(b, t, dtype=torch.bool)
    mixed = holes.clone()
    mixed[0] = False                                       # one all-masked row
    mixed[-1] = True                                       # and a full one
    return {"full": torch.ones(b, t, dtype=torch.bool), "right": right, "left": left,
            "holes": holes, "none": none, "mixed": mixed}


@pytest.mark.parametrize("t", [1, 32, 45, 100])
@pytest.mark.parametrize("kind", ["full", "right", "left", "holes", "none", "mixed"])
def test_gae_matches_reference(t, kind):
    r, v = _gae_inputs(3, t, seed=t)
    mask = _masks(3, t, seed=t + 1)[kind].to(DEVICE)
    for gamma, lam in [(1.0, 0.95), (0.99, 1.0)]:
        adv, ret = _backend().gae(r, v, mask, gamma, lam)
        ra, rr = reference.gae(r.double(), v.double(), mask, gamma=gamma, lam=lam)
        close(adv, ra, 1e-5, what=f"adv {kind} T={t} gamma={gamma} lam={lam}")
        close(ret, rr, 1e-5, what=f"ret {kind}")
        assert torch.all(adv[~mask] == 0) and torch.all(ret[~mask] == 0)


@pytest.mark.parametrize("block_t", [16, 64])
def test_gae_tiles_and_padding_invariance(block_t):
    """T not a multiple of BLOCK_T; a row padded left/right/with holes equals the bare row."""
    gae_k = _kmod("gae").gae
    g = torch.Generator().manual_seed(3)
    n_valid = 23
    core_r, core_v = torch.randn(n_valid, generator=g), torch.randn(n_valid, generator=g)
    bare_a, bare_ret = gae_k(core_r[None].to(DEVICE), core_v[None].to(DEVICE),
                             torch.ones(1, n_valid, dtype=torch.bool, device=DEVICE), 0.97, 0.9, block_t=block_t)
    t = 37
    layouts = [list(range(n_valid)), list(range(t - n_valid, t)),
               sorted(torch.randperm(t, generator=g)[:n_valid].tolist())]
    r = torch.randn(3, t, generator=g) * 100  # garbage where masked
    v = torch.randn(3, t, generator=g) * 100
    mask = torch.zeros(3, t, dtype=torch.bool)
    for row, pos in enumerate(layouts):
        r[row, pos], v[row, pos], mask[row, pos] = core_r, core_v, True
    adv, ret = gae_k(r.to(DEVICE), v.to(DEVICE), mask.to(DEVICE), 0.97, 0.9, block_t=block_t)
    for row, pos in enumerate(layouts):
        close(adv[row, pos], bare_a[0], 1e-5, what=f"layout {row}")
        close(ret[row, pos], bare_ret[0], 1e-5, what=f"layout {row} returns")
    ra, _ = reference.gae(core_r[None].double(), core_v[None].double(), gamma=0.97, lam=0.9)
    close(bare_a[0], ra[0], 1e-5, what="bare")


def test_gae_public_op_1d_and_lam_zero():
    r, v = _gae_inputs(1, 50, seed=8)
    mask = _masks(1, 50, seed=9)["holes"].to(DEVICE)
    with K.use_backend("triton"):
        adv, ret = K.gae(r[0], v[0], mask[0], gamma=0.9, lam=0.0)
    ra, rr = reference.gae(r.double(), v.double(), mask, gamma=0.9, lam=0.0)
    assert adv.shape == (50,)
    close(adv, ra[0], 1e-5, what="adv")
    close(ret, rr[0], 1e-5, what="ret")


# --------------------------------------------------------------------------------------------
# PPO loss
# --------------------------------------------------------------------------------------------

PPO_CASES = {
    "plain": dict(),
    "asym_clip": dict(clip_eps=0.1, clip_eps_high=0.3),
    "dual_clip": dict(dual_clip=3.0),
    "kl_k1": dict(ref=True, kl_coef=0.2, kl_estimator="k1"),
    "kl_k2": dict(ref=True, kl_coef=0.2, kl_estimator="k2"),
    "kl_k3": dict(ref=True, kl_coef=0.2, kl_estimator="k3"),
    "ref_no_coef": dict(ref=True),
    "entropy": dict(ent=True, entropy_coef=0.01),
    "values_clipped": dict(val=True, value_clip=0.2, value_coef=0.5),
    "values_unclipped": dict(val=True, value_clip=None, value_coef=1.0),
    "values_no_old": dict(val=True, no_old=True),
    "everything": dict(clip_eps=0.2, clip_eps_high=0.28, dual_clip=2.5, ref=True, kl_coef=0.05,
                       kl_estimator="k3", ent=True, entropy_coef=0.02, val=True, value_clip=0.3,
                       value_coef=0.7),
}


def _ppo_inputs(n, seed, mask_kind="random"):
    g = torch.Generator().manual_seed(seed)

    def rnd(scale=1.0):
        return torch.randn(n, generator=g) * scale

    logp = rnd() - 2.0
    d = dict(logp=logp, old_logp=logp + rnd(0.3), advantages=rnd(), ref_logp=logp + rnd(0.2),
             entropy=torch.rand(n, generator=g) * 3, values=rnd(), returns=rnd())
    d["old_values"] = d["values"] + rnd(0.3)
    if mask_kind == "random":
        mask = torch.rand(n, generator=g) > 0.25
    elif mask_kind == "none":
        mask = torch.zeros(n, dtype=torch.bool)
    else:
        mask = torch.ones(n, dtype=torch.bool)
    # garbage where masked: an overflowing ratio must not leak NaN into the loss
    d["old_logp"] = torch.where(mask, d["old_logp"], torch.full_like(logp, -200.0))
    return {k: t.to(DEVICE) for k, t in d.items()}, mask.to(DEVICE)


def _ppo_kwargs(case, x, dtype=None):
    opts = dict(case)
    kw = {k: opts[k] for k in ("clip_eps", "clip_eps_high", "dual_clip", "kl_coef", "kl_estimator",
                               "entropy_coef", "value_clip", "value_coef") if k in opts}

    def take(name):
        t = x[name]
        return t if dtype is None else t.to(dtype)

    if opts.get("ref"):
        kw["ref_logp"] = take("ref_logp")
    if opts.get("ent"):
        kw["entropy"] = take("entropy").clone().requires_grad_()
    if opts.get("val"):
        kw["values"] = take("values").clone().requires_grad_()
        kw["returns"] = take("returns")
        if not opts.get("no_old"):
            kw["old_values"] = take("old_values")
    return kw


# masked garbage overflows exp() on purpose; the interpreter (numpy) warns about it
_GARBAGE_WARNINGS = pytest.mark.filterwarnings("ignore:overflow encountered:RuntimeWarning",
                                               "ignore:invalid value encountered:RuntimeWarning")


# the semantics (every option against the float64 reference, all-masked batches) are tested for
# every backend in tests/test_ops_ppo_loss.py; here: several programs per call (a small CHUNK)
# with overflowing garbage in the padding, and the backend called directly


@_GARBAGE_WARNINGS
@pytest.mark.parametrize("case", ["plain", "everything"])
def test_ppo_loss_masked_garbage_matches_clean_reference(case, monkeypatch):
    """Random mask with overflowing garbage in the padding; several programs (small CHUNK)."""
    monkeypatch.setattr(_kmod("ppo_loss"), "CHUNK", 256)
    opts = PPO_CASES[case]
    x, mask = _ppo_inputs(1000, seed=4, mask_kind="random")
    logp = x["logp"].clone().requires_grad_()
    kw = _ppo_kwargs(opts, x)
    with K.use_backend("triton"):
        loss, stats = K.ppo_loss(logp, x["old_logp"], x["advantages"], mask, **kw)
    loss.backward()
    # the reference on the valid tokens only is the same token mean
    logp64 = x["logp"][mask].double().requires_grad_()
    sub = {k: t[mask] for k, t in x.items()}
    kw64 = _ppo_kwargs(opts, sub, torch.float64)
    ref_loss, ref_stats = reference.ppo_loss(logp64, sub["old_logp"].double(),
                                             sub["advantages"].double(), None, **kw64)
    ref_loss.backward()
    close(loss, ref_loss, 1e-6, what="loss")
    for name in stats:
        close(stats[name], ref_stats[name], 1e-6, what=name)
    close(logp.grad[mask], logp64.grad, 1e-7, what="grad logp")
    assert torch.all(logp.grad[~mask] == 0)
    if "values" in kw:
        close(kw["values"].grad[mask], kw64["values"].grad, 1e-7, what="grad values")
        assert torch.all(kw["values"].grad[~mask] == 0)
    if "entropy" in kw:
        close(kw["entropy"].grad[mask], kw64["entropy"].grad, 1e-7, what="grad entropy")


class _PoisonedTorch:
    """``torch`` for the kernel module, with ``empty`` returning NaN-filled memory."""

    def __getattr__(self, name):
        return getattr(torch, name)

    @staticmethod
    def empty(*args, **kwargs):
        return torch.empty(*args, **kwargs).fill_(float("nan"))


@_GARBAGE_WARNINGS
def test_ppo_loss_backend_direct_and_deterministic(monkeypatch):
    monkeypatch.setattr(_kmod("ppo_loss"), "CHUNK", 128)
    x, mask = _ppo_inputs(700, seed=11, mask_kind="random")
    args = (x["logp"], x["old_logp"], x["advantages"], mask.float(), x["ref_logp"], x["entropy"],
            x["values"], x["old_values"], x["returns"])
    opts = PPOLossOptions(clip_eps=0.2, clip_eps_high=0.25, dual_clip=3.0, kl_coef=0.1, kl_estimator="k2",
                          entropy_coef=0.01, value_clip=0.2, value_coef=0.5)
    monkeypatch.setattr(_kmod("ppo_loss"), "torch", _PoisonedTorch())  # outputs start as NaN
    out1 = _backend().ppo_loss_forward(*args, None, opts)
    out2 = _backend().ppo_loss_forward(*args, None, opts)
    assert all(torch.isfinite(t).all() for t in out1), "an output element was never written"
    for a, b in zip(out1, out2):
        assert torch.equal(a, b)
    loss, stats, g_logp, g_ent, g_val = out1
    assert stats.shape == (7,) and g_ent.shape == g_val.shape == (700,)
    assert loss.item() == stats[0].item()
    ref = dispatch.get("torch").ppo_loss_forward(*[a.clone() for a in args], None, opts)
    # the torch backend lets masked garbage through as NaN; compare the valid tokens' grads
    close(g_logp[mask], ref[2][mask], 1e-7, what="grad logp vs torch backend")
    close(g_val[mask], ref[4][mask], 1e-7, what="grad values vs torch backend")
    close(g_ent, ref[3], 1e-7, what="grad entropy vs torch backend")
    none = _backend().ppo_loss_forward(*args[:4], None, None, None, None, None, None, opts)
    assert none[3].numel() == 0 and none[4].numel() == 0
    # a loss weight (seq-mean-token-mean over rows of 100) across program boundaries
    seq = PPOLossOptions(kl_coef=0.1, kl_estimator="k3+", loss_agg="seq-mean-token-mean")
    w = token_loss_weights(mask.float(), 100, seq)
    got = _backend().ppo_loss_forward(*args, w, seq)
    want = dispatch.get("torch").ppo_loss_forward(*[a.clone() for a in args], w, seq)
    close(got[0], want[0], 1e-6, what="weighted loss vs torch backend")
    close(got[2][mask], want[2][mask], 1e-7, what="weighted grad logp vs torch backend")
