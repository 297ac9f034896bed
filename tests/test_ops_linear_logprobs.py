"""K.linear_logprobs (the fused LM head) on every backend, against float64 autograd of
reference.linear_logprobs, plus a peak-memory check that no [N, V] tensor is allocated."""

from __future__ import annotations

import itertools
import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch

import rlfuse.kernels as K
from rlfuse.kernels import reference
from helpers import (
    assert_close_verbose,
    assert_no_worse_than_baseline,
    baseline_linear,
    rand_labels,
    randn,
    ref_linear64,
)

# (N, V, chunk) over the odd shapes; H, bias, temperature and entropy cycle through the cases
_GRID = list(itertools.product((1, 37, 300), (1, 13, 1000), (1, 7, None)))
CASES = [
    (n, h, v, chunk, bias, temp, ent)
    for i, (n, v, chunk) in enumerate(_GRID)
    for h, bias, temp, ent in [((8, 64)[i % 2], bool(i % 3), (1.0, 0.7, 1.5)[i % 3], bool((i // 2) % 2))]
]


def _inputs(n, h, v, *, dtype=torch.float32, bias=False, device="cpu", seed=0, lead=None):
    lead = (n,) if lead is None else lead
    hidden = randn(*lead, h, seed=seed, dtype=dtype, device=device)
    weight = randn(v, h, seed=seed + 1, dtype=dtype, device=device, scale=h ** -0.5 * 2)
    b = randn(v, seed=seed + 2, dtype=dtype, device=device) if bias else None
    labels = rand_labels(lead, v, seed=seed + 3, device=device)
    return hidden, weight, b, labels


@pytest.mark.parametrize("n,h,v,chunk,bias,temperature,entropy", CASES,
                         ids=[f"N{n}-H{h}-V{v}-c{c}-{'b' if b else 'nob'}-T{t}-{'ent' if e else 'noent'}"
                              for n, h, v, c, b, t, e in CASES])
def test_forward_backward_fp32(backend, n, h, v, chunk, bias, temperature, entropy):
    if backend.slow:
        n = min(n, 45)  # the interpreter is slow per row and per chunk launch
    hidden, weight, b, labels = _inputs(n, h, v, bias=bias, device=backend.device, seed=n + v)
    w1 = randn(n, seed=5, device=backend.device)
    w2 = randn(n, seed=6, device=backend.device) if entropy else None
    hx, wx = hidden.clone().requires_grad_(True), weight.clone().requires_grad_(True)
    bx = None if b is None else b.clone().requires_grad_(True)
    out = K.linear_logprobs(hx, wx, labels, bias=bx, temperature=temperature, return_entropy=entropy,
                            chunk_size=chunk)
    logp, ent = out if entropy else (out, None)
    assert logp.dtype == torch.float32 and logp.shape == (n,)
    total = (logp * w1).sum() + ((ent * w2).sum() if entropy else 0.0)
    total.backward()
    ref_lp, ref_ent, ref_grads = ref_linear64(hidden, weight, labels, b, temperature, w1, w2)
    tol = dict(atol=3e-5, rtol=1e-5)
    assert_close_verbose(logp, ref_lp, name="logp", **tol)
    if entropy:
        assert ent.dtype == torch.float32 and ent.shape == (n,)
        assert_close_verbose(ent, ref_ent, name="entropy", **tol)
    gtol = dict(atol=2e-5, rtol=1e-4)
    assert_close_verbose(hx.grad, ref_grads[0], name="grad hidden", **gtol)
    assert_close_verbose(wx.grad, ref_grads[1], name="grad weight", **gtol)
    if bias:
        assert_close_verbose(bx.grad, ref_grads[2], name="grad bias", **gtol)


@pytest.mark.parametrize("chunk", (None, 5))
def test_3d_hidden(backend, chunk):
    B, T, H, V = 2, 7, 16, 50
    hidden, weight, b, labels = _inputs(None, H, V, bias=True, device=backend.device, seed=3, lead=(B, T))
    hx, wx, bx = (t.clone().requires_grad_(True) for t in (hidden, weight, b))
    w1, w2 = randn(B, T, seed=1, device=backend.device), randn(B, T, seed=2, device=backend.device)
    logp, ent = K.linear_logprobs(hx, wx, labels, bias=bx, temperature=0.7, return_entropy=True,
                                  chunk_size=chunk)
    assert logp.shape == (B, T) and ent.shape == (B, T)
    ((logp * w1).sum() + (ent * w2).sum()).backward()
    ref_lp, ref_ent, ref_grads = ref_linear64(hidden, weight, labels, b, 0.7, w1, w2)
    assert_close_verbose(logp, ref_lp, atol=3e-5, rtol=1e-5, name="logp")
    assert_close_verbose(ent, ref_ent, atol=3e-5, rtol=1e-5, name="entropy")
    for got, exp, nm in zip((hx.grad, wx.grad, bx.grad), ref_grads, ("hidden", "weight", "bias")):
        assert got.shape == exp.shape
        assert_close_verbose(got, exp, atol=2e-5, rtol=1e-4, name=f"grad {nm}")


def test_matches_unfused_logprobs(backend):
    """Same answer as logprobs_from_logits on the materialised logits (same backend)."""
    hidden, weight, b, labels = _inputs(29, 24, 301, bias=True, device=backend.device, seed=8)
    fused = K.linear_logprobs(hidden, weight, labels, bias=b, temperature=1.5, chunk_size=4)
    unfused = K.logprobs_from_logits(hidden @ weight.t() + b, labels, temperature=1.5)
    assert_close_verbose(fused, unfused, atol=2e-5, rtol=1e-5, name="fused vs unfused")


@pytest.mark.parametrize("chunk", (None, 64))
def test_bf16(backend, chunk):
    """Low precision: error vs the fp64 truth no worse than the unfused same-dtype baseline
    (bf16 matmul, float32 log-softmax), forward and gradients."""
    n, h, v = (48, 32, 512) if backend.slow else (300, 64, 1000)
    dt = torch.bfloat16
    hidden, weight, b, labels = _inputs(n, h, v, dtype=dt, bias=True, device=backend.device, seed=12)
    w1, w2 = randn(n, seed=13, device=backend.device), randn(n, seed=14, device=backend.device)
    hx, wx, bx = (t.clone().requires_grad_(True) for t in (hidden, weight, b))
    logp, ent = K.linear_logprobs(hx, wx, labels, bias=bx, temperature=0.7, return_entropy=True,
                                  chunk_size=chunk)
    assert logp.dtype == torch.float32 and ent.dtype == torch.float32
    ((logp * w1).sum() + (ent * w2).sum()).backward()
    for g, t in ((hx.grad, hidden), (wx.grad, weight), (bx.grad, b)):
        assert g.dtype == t.dtype and g.shape == t.shape
    t_lp, t_ent, t_grads = ref_linear64(hidden, weight, labels, b, 0.7, w1, w2)
    b_lp, b_ent, b_grads = baseline_linear(hidden, weight, labels, b, 0.7, w1, w2)
    assert_no_worse_than_baseline(logp, b_lp, t_lp, factor=2.0, atol=1e-4, name="logp")
    assert_no_worse_than_baseline(ent, b_ent, t_ent, factor=2.0, atol=1e-4, name="entropy")
    # gradients: weight grads accumulate over chunks (in bf16 when the weight is bf16), and the
    # interpreter truncates bf16 stores, so allow a wider factor than the forward
    factor = 4.0
    for g, bg, tg, nm in zip((hx.grad, wx.grad, bx.grad), b_grads, t_grads, ("hidden", "weight", "bias")):
        assert_no_worse_than_baseline(g, bg, tg, factor=factor, atol=1e-4, name=f"grad {nm}")


def test_grad_only_through_entropy(backend):
    hidden, weight, b, labels = _inputs(11, 8, 40, device=backend.device, seed=21)
    hx, wx = hidden.clone().requires_grad_(True), weight.clone().requires_grad_(True)
    w2 = randn(11, seed=2, device=backend.device)
    _, ent = K.linear_logprobs(hx, wx, labels, return_entropy=True, chunk_size=3)
    (ent * w2).sum().backward()
    _, _, ref_grads = ref_linear64(hidden, weight, labels, None, 1.0, None, w2)
    assert_close_verbose(hx.grad, ref_grads[0], atol=2e-5, rtol=1e-4, name="grad hidden")
    assert_close_verbose(wx.grad, ref_grads[1], atol=2e-5, rtol=1e-4, name="grad weight")


# ------------------------------------------------- cases from Liger-Kernel's FLCE tests
# Liger's fused-linear-cross-entropy tests, restated for our op (our own code): a positive
# uniform-random weight (so logits are large and all of one sign), input scales 1 and 5, token
# counts that are not a multiple of the chunk, bias on/off, fp32 and bf16, a soft-capped head,
# an ignore_index (-100) whose tokens leave no gradient, an all-ignored batch, and the mean
# reduction over kept tokens - the loss there is CE = -mean(logp) over the kept tokens.
LIGER_CASES = [  # (tokens, hidden, vocab, input scale, bias, softcap)
    (2 * 4, 64, 64, 1.0, False, None),
    (4 * 23, 48, 1001, 1.0, True, None),
    (3 * 13, 32, 503, 5.0, True, None),
    (2 * 21, 32, 777, 1.0, False, 30.0),
]


def _liger_inputs(n, h, v, scale, bias, dtype, device, seed):
    g = torch.Generator().manual_seed(seed)
    hidden = (torch.randn(n, h, generator=g) * scale).to(dtype)
    weight = (torch.rand(v, h, generator=g) / h ** 0.5).to(dtype)  # uniform [0, 1): one-signed logits
    b = torch.rand(v, generator=g).to(dtype) if bias else None
    labels = torch.randint(0, v, (n,), generator=g)
    labels[torch.rand(n, generator=g) < 0.3] = -100  # ignore_index
    return [t if t is None else t.to(device) for t in (hidden, weight, b, labels)]


def _masked_ce(logp_fn, labels):
    """CE with ignore_index=-100 through our op: labels clamped into range, then masked out."""
    keep = labels != -100
    logp = logp_fn(torch.where(keep, labels, torch.zeros_like(labels)))
    return -(logp * keep).sum() / keep.sum().clamp_min(1)


@pytest.mark.parametrize("dtype", (torch.float32, torch.bfloat16), ids=("fp32", "bf16"))
@pytest.mark.parametrize("n,h,v,scale,bias,softcap", LIGER_CASES,
                         ids=[f"N{c[0]}-H{c[1]}-V{c[2]}-x{c[3]}-bias{int(c[4])}-cap{c[5]}" for c in LIGER_CASES])
def test_liger_style_cross_entropy(backend, n, h, v, scale, bias, softcap, dtype):
    if backend.slow and v > 600:
        pytest.skip("interpreter: the smaller Liger shapes cover it")
    hidden, weight, b, labels = _liger_inputs(n, h, v, scale, bias, dtype, backend.device, seed=n + v)
    params = [t.clone().requires_grad_(True) for t in (hidden, weight, b) if t is not None]
    loss = _masked_ce(lambda y: K.linear_logprobs(params[0], params[1], y, bias=params[2] if bias else None,
                                                   chunk_size=16, softcap=softcap), labels)
    loss.backward()
    ref_params = [t.detach().double().requires_grad_(True) for t in (hidden, weight, b) if t is not None]
    ref = _masked_ce(lambda y: reference.linear_logprobs(ref_params[0], ref_params[1], y,
                                                         bias=ref_params[2] if bias else None, softcap=softcap),
                     labels)
    ref.backward()
    ignored = labels == -100
    assert torch.all(params[0].grad[ignored] == 0), "an ignored token got a hidden-state gradient"
    if dtype == torch.float32:
        assert_close_verbose(loss, ref, atol=2e-5, rtol=1e-5, name="loss")
        for p, r, nm in zip(params, ref_params, ("hidden", "weight", "bias")):
            assert_close_verbose(p.grad, r.grad, atol=2e-5, rtol=1e-4, name=f"grad {nm}")
        return
    # bf16: no worse than the unfused same-dtype head (bf16 matmul, float32 log-softmax)
    base_params = [t.clone().requires_grad_(True) for t in (hidden, weight, b) if t is not None]

    def unfused(y):
        logits = base_params[0] @ base_params[1].t()
        if bias:
            logits = logits + base_params[2]
        return reference.logprobs_from_logits(logits.float(), y, softcap=softcap)

    base = _masked_ce(unfused, labels)
    base.backward()
    assert_no_worse_than_baseline(loss.reshape(1), base.reshape(1), ref.detach().reshape(1), factor=2.0,
                                  atol=1e-4, name="loss")
    for p, bp, r, nm in zip(params, base_params, ref_params, ("hidden", "weight", "bias")):
        assert_no_worse_than_baseline(p.grad, bp.grad, r.grad, factor=4.0, atol=1e-4, name=f"grad {nm}")


def test_liger_style_all_ignored(backend):
    """Every token ignored: loss 0 and all-zero gradients, never NaN."""
    hidden, weight, b, labels = _liger_inputs(10, 16, 33, 1.0, True, torch.float32, backend.device, seed=3)
    labels = torch.full_like(labels, -100)
    params = [t.clone().requires_grad_(True) for t in (hidden, weight, b)]
    loss = _masked_ce(lambda y: K.linear_logprobs(params[0], params[1], y, bias=params[2], chunk_size=4,
                                                   return_entropy=False), labels)
    loss.backward()
    assert loss.item() == 0.0
    for p in params:
        assert torch.isfinite(p.grad).all() and torch.all(p.grad == 0)


# ----------------------------------------------------------------------------- errors
def test_errors(backend):
    d = backend.device
    hidden, weight, b, labels = _inputs(5, 8, 13, bias=True, device=d)
    with pytest.raises(ValueError, match="hidden size"):
        K.linear_logprobs(randn(5, 9, seed=0, device=d), weight, labels)
    with pytest.raises(ValueError, match="dtype"):
        K.linear_logprobs(hidden.to(torch.bfloat16), weight, labels)
    with pytest.raises(ValueError, match="dtype"):
        K.linear_logprobs(hidden, weight, labels, bias=b.double())
    with pytest.raises(ValueError, match="bias"):
        K.linear_logprobs(hidden, weight, labels, bias=b[:-1])
    with pytest.raises(ValueError, match="shape"):
        K.linear_logprobs(hidden, weight, labels[:-1])
    with pytest.raises(ValueError, match="integer"):
        K.linear_logprobs(hidden, weight, labels.float())
    for bad in (-1, 13):
        lab = labels.clone()
        lab[2] = bad
        with pytest.raises(ValueError, match=r"\[0, 13\)"):
            K.linear_logprobs(hidden, weight, lab)
    with pytest.raises(ValueError, match="chunk_size"):
        K.linear_logprobs(hidden, weight, labels, chunk_size=0)
    with pytest.raises(ValueError, match="temperature"):
        K.linear_logprobs(hidden, weight, labels, temperature=0.0)


# ----------------------------------------------------------------------------- memory
_MEMORY_SCRIPT = textwrap.dedent(r"""
    import gc, json, sys
    import torch
    import rlfuse.kernels as K

    backend, N, V, H = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])

    def status(field):
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) * 1024
        raise RuntimeError(field)

    def reset_peak():
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")   # resets VmHWM (peak RSS) to the current RSS

    torch.manual_seed(0)
    hidden = torch.randn(N, H, requires_grad=True)
    weight = (torch.randn(V, H) / H ** 0.5).requires_grad_(True)
    labels = torch.randint(0, V, (N,))

    def fused():
        with K.use_backend(backend):
            logp, ent = K.linear_logprobs(hidden, weight, labels, return_entropy=True)
            (logp.sum() + ent.sum()).backward()

    def control():   # the [N, V] logits the fused op must never hold
        with torch.no_grad():
            (hidden @ weight.t()).sum()

    def rss_peak(fn):
        hidden.grad = torch.zeros_like(hidden)    # the grads' own storage is not "extra"
        weight.grad = torch.zeros_like(weight)
        gc.collect()
        reset_peak()
        base = status("VmRSS")
        fn()
        return status("VmHWM") - base

    # warm-up on a slice: loads kernels, thread pools, lazily initialised state
    with K.use_backend(backend):
        K.linear_logprobs(hidden[:64].detach().requires_grad_(), weight, labels[:64]).sum().backward()
    out = {"fused": rss_peak(fused), "control": rss_peak(control)}
    print(json.dumps(out))
""")


def test_memory_no_n_by_v(backend):
    """N=2048, V=16384, H=32: forward+backward (log-probs and entropy) peak extra memory must stay
    far below N*V*4 bytes (128 MiB). Measured as the peak RSS of a fresh process (VmHWM, reset
    through /proc/self/clear_refs), which also sees memory a C++ kernel allocates outside torch;
    glibc's mmap threshold is lowered so freed buffers leave the RSS at once instead of staying
    in the heap. A control that materialises the [N, V] logits proves the meter sees them."""
    if backend.device.type != "cpu" or backend.slow:
        pytest.skip("CPU RSS test; the Triton interpreter's memory is not the kernel's")
    if not os.path.exists("/proc/self/clear_refs"):
        pytest.skip("needs Linux /proc/self/clear_refs")
    N, V, H = 2048, 16384, 32
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536", MALLOC_TRIM_THRESHOLD_="0")
    proc = subprocess.run([sys.executable, "-c", _MEMORY_SCRIPT, backend.name, str(N), str(V), str(H)],
                          capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    res = json.loads([ln for ln in proc.stdout.splitlines() if ln.startswith("{")][-1])
    nv = N * V * 4
    mib = {k: round(v / 2 ** 20, 1) for k, v in res.items()}
    print(f"peak extra RSS (MiB), N*V*4 = {nv / 2**20:.0f} MiB: {mib}")
    assert res["control"] >= 0.9 * nv, f"control failed: the meter did not see the [N, V] logits {mib}"
    assert res["fused"] < nv / 2, f"fused linear_logprobs peak extra memory too high: {mib}"
