"""The C++ CPU backend (rlfuse.kernels._C through kernels/backends/cpp.py) against float64
references, plus its own promises: in-place backward, strided rows, ppo_loss = the torch backend,
writes to every output element, and bitwise determinism across thread counts.

Skipped as a whole when the extension is not built.
"""

from __future__ import annotations

import contextlib

import pytest
import torch

import rlfuse.kernels as K
from rlfuse.kernels import reference
from rlfuse.kernels.backends import cpp, torch_backend
from rlfuse.kernels.backends import STATS_FIELDS
from rlfuse.kernels.ppo_loss import token_loss_weights
from rlfuse.kernels.ppo_options import PPOLossOptions

pytestmark = pytest.mark.skipif(not cpp.AVAILABLE, reason=f"cpp backend unavailable: "
                                f"{getattr(cpp, 'UNAVAILABLE_REASON', '')}")


# ------------------------------------------------------------------------------------ helpers
def assert_close(actual, expected, *, atol, rtol=0.0, name="value"):
    """|a - e| <= atol + rtol |e| elementwise, in float64; reports the worst offenders."""
    a = actual.detach().double().reshape(-1)
    e = expected.detach().double().reshape(-1)
    assert a.shape == e.shape, f"{name}: shape {tuple(actual.shape)} vs {tuple(expected.shape)}"
    assert not torch.isnan(a).any(), f"{name}: NaN in output ({int(torch.isnan(a).sum())} elements)"
    err = (a - e).abs()
    bound = atol + rtol * e.abs()
    bad = err > bound
    if bad.any():
        idx = (err - bound).topk(min(5, int(bad.sum()))).indices
        rows = ", ".join(f"[{int(i)}] {a[i].item():.8g} vs {e[i].item():.8g}" for i in idx)
        pytest.fail(f"{name}: {int(bad.sum())}/{a.numel()} elements off "
                    f"(max err {err.max().item():.3g}); worst: {rows}")


def poison_heap(nbytes: int) -> None:
    """Allocate and free NaN-filled buffers of ``nbytes`` so the next allocation of that size
    (an op's output) reuses NaN memory: a kernel that skips writes then fails. (One buffer is
    not enough for glibc's bins; sixteen reliably are, from 1 KB to the mmap threshold.)"""
    bufs = [torch.full((max(1, nbytes // 4),), float("nan")) for _ in range(16)]
    del bufs


@contextlib.contextmanager
def num_threads(n: int):
    old = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(old)


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def rand_logits(shape, seed, dtype=torch.float32, scale=3.0):
    return (torch.randn(shape, generator=gen(seed), dtype=torch.float64) * scale).to(dtype)


def rand_labels(shape, vocab, seed):
    return torch.randint(0, vocab, shape, generator=gen(seed + 1000))


def ref_logprobs(logits, labels, temperature):
    """float64 (logp, entropy) and a function giving the float64 gradient wrt logits."""
    x = logits.detach().double().requires_grad_(True)
    lp, ent = reference.logprobs_from_logits(x, labels, temperature=temperature, return_entropy=True)

    def grad(g_lp, g_ent=None):
        total = (lp * g_lp.double()).sum()
        if g_ent is not None:
            total = total + (ent * g_ent.double()).sum()
        (gx,) = torch.autograd.grad(total, x, retain_graph=True)
        return gx

    return lp.detach(), ent.detach(), grad


def lp_tol(vocab):
    return dict(atol=3e-5 if vocab < 10_000 else 8e-5, rtol=2e-6)


GRAD_RTOL = {torch.float32: 2e-5, torch.float64: 2e-5, torch.bfloat16: 2.0 ** -8, torch.float16: 2.0 ** -11}


# ------------------------------------------------------------------------------------ log-probs
def test_logprobs_noncontiguous_rows():
    """logits[:, :-1] (a strided 3-D view) through the public op, and a strided 2-D view
    straight into the backend (row stride V + 1), forward and in-place backward."""
    full = rand_logits((2, 6, 1001), seed=3).requires_grad_(True)
    view = full[:, :-1]
    labels = rand_labels((2, 5), 1001, seed=3)
    ref_lp, ref_ent, ref_grad = ref_logprobs(view, labels, 1.3)
    with K.use_backend("cpp"):
        logp, ent = K.logprobs_from_logits(view, labels, temperature=1.3, return_entropy=True)
    assert_close(logp, ref_lp, name="logp", **lp_tol(1000))
    assert_close(ent, ref_ent, name="entropy", **lp_tol(1000))
    (gx,) = torch.autograd.grad(logp.sum() + ent.sum(), full)
    assert_close(gx[:, :-1], ref_grad(torch.ones(2, 5), torch.ones(2, 5)), atol=2e-6, rtol=2e-5, name="grad")
    assert torch.equal(gx[:, -1], torch.zeros_like(gx[:, -1]))

    base = rand_logits((7, 1001), seed=4)
    strided = base[:, :1000]  # row stride 1001, last dim contiguous
    lab = rand_labels((7,), 1000, seed=4)
    lp, lse, en = cpp.logprobs_forward(strided, lab, 1.0, True)
    r_lp, r_ent, r_grad = ref_logprobs(strided, lab, 1.0)
    assert_close(lp, r_lp, name="strided logp", **lp_tol(1000))
    assert_close(en, r_ent, name="strided entropy", **lp_tol(1000))
    g_lp, g_ent = torch.randn(7, generator=gen(3)), torch.randn(7, generator=gen(4))
    pad = base[:, 1000].clone()
    out = cpp.logprobs_backward(strided, lab, lse, en, g_lp, g_ent, 1.0, True)
    assert out.data_ptr() == strided.data_ptr()
    assert_close(base[:, :1000], r_grad(g_lp, g_ent), atol=2e-6, rtol=2e-5, name="strided in-place grad")
    assert torch.equal(base[:, 1000], pad), "in-place backward wrote outside the rows"


@pytest.mark.parametrize("dtype", (torch.float32, torch.bfloat16, torch.float16))
@pytest.mark.parametrize("with_entropy", (False, True))
def test_logprobs_backward_inplace(dtype, with_entropy):
    rows, vocab = 6, 2053
    logits = rand_logits((rows, vocab), seed=11, dtype=dtype)
    labels = rand_labels((rows,), vocab, seed=11)
    original = logits.clone()
    r_lp, r_ent, r_grad = ref_logprobs(logits, labels, 0.8)
    lp, lse, ent = cpp.logprobs_forward(logits, labels, 0.8, with_entropy)
    assert ent.numel() == (rows if with_entropy else 0)
    g_lp = torch.randn(rows, generator=gen(5))
    g_lp[2] = 0.0  # a masked token: its gradient row must still be written (zeros)
    g_ent = torch.randn(rows, generator=gen(6)) if with_entropy else None
    if with_entropy:
        g_ent[2] = 0.0
    expected = r_grad(g_lp, g_ent)

    poison_heap(rows * vocab * logits.element_size())
    fresh = cpp.logprobs_backward(logits, labels, lse, ent, g_lp, g_ent, 0.8, False)
    assert torch.equal(logits, original), "out-of-place backward modified the logits"
    assert fresh.dtype == dtype and fresh.shape == logits.shape and fresh.data_ptr() != logits.data_ptr()
    assert_close(fresh, expected, atol=2e-6, rtol=GRAD_RTOL[dtype], name="grad (fresh)")
    assert torch.equal(fresh[2], torch.zeros_like(fresh[2]))

    out = cpp.logprobs_backward(logits, labels, lse, ent, g_lp, g_ent, 0.8, True)
    assert out.data_ptr() == logits.data_ptr(), "in-place backward must return the logits buffer"
    assert not torch.equal(logits, original), "in-place backward left the logits buffer unchanged"
    assert torch.equal(logits, fresh), "in-place and out-of-place gradients differ"


def test_logprobs_vocab_one_and_extremes():
    logits = torch.tensor([[5.0], [-3.0]])
    lp, lse, ent = cpp.logprobs_forward(logits, torch.zeros(2, dtype=torch.long), 1.0, True)
    assert torch.equal(lp, torch.zeros(2)) and torch.equal(ent, torch.zeros(2))
    assert torch.equal(lse, logits[:, 0])
    # -inf logits (banned tokens) and huge values must not produce NaN for valid labels
    x = rand_logits((4, 300), seed=9) * 30
    x[:, :50] = float("-inf")
    lab = torch.full((4,), 100)
    r_lp, _r_ent, _ = ref_logprobs(x[:, 50:], lab - 50, 1.0)
    lp, lse, _ = cpp.logprobs_forward(x, lab, 1.0, False)
    assert_close(lp, r_lp, atol=1e-4, rtol=1e-6, name="logp with -inf logits")
    g = cpp.logprobs_backward(x, lab, lse, None, torch.ones(4), None, 1.0, False)
    assert torch.isfinite(g).all() and torch.equal(g[:, :50], torch.zeros(4, 50))


@pytest.mark.parametrize("vocab", (1, 15, 31, 32, 33, 2047, 2049, 4131))
def test_logprobs_row_max_anywhere(vocab):
    """The row max is taken 32 lanes at a time with a scalar tail, per 2048-wide block: put a
    dominant logit in every kind of place (first, last, a vector lane, the tail, the second
    block) and check log-probs, entropy and the gradient against float64."""
    spots = sorted({0, vocab - 1, min(vocab - 1, 17), vocab - vocab % 32 if vocab % 32 else 0,
                    min(vocab - 1, 2048 + 5)})
    x = rand_logits((len(spots) * 2, vocab), seed=vocab)
    for r, j in enumerate(spots):
        x[2 * r, j] = 40.0                   # one dominant logit
        x[2 * r + 1, j] = x[2 * r + 1].max() + 0.5  # a mild one: every other term counts
    lab = rand_labels((x.shape[0],), vocab, seed=vocab)
    r_lp, r_ent, r_grad = ref_logprobs(x, lab, 1.0)
    lp, lse, ent = cpp.logprobs_forward(x, lab, 1.0, True)
    assert_close(lp, r_lp, **lp_tol(vocab), name="logp")
    assert_close(ent, r_ent, **lp_tol(vocab), name="entropy")
    g = cpp.logprobs_backward(x, lab, lse, ent, torch.ones(len(lab)), torch.ones(len(lab)), 1.0, False)
    assert_close(g, r_grad(torch.ones(len(lab)), torch.ones(len(lab))), atol=2e-6, rtol=GRAD_RTOL[torch.float32],
                 name="grad logits")


def test_logprobs_nan_logit_gives_nan_row():
    """A NaN logit, in the vector part or the tail, makes its row's log-prob NaN (never a
    silently wrong finite number) and leaves the other rows alone."""
    x = rand_logits((3, 100), seed=5)
    x[0, 3] = float("nan")
    x[1, 99] = float("nan")
    lp, _lse, ent = cpp.logprobs_forward(x, torch.zeros(3, dtype=torch.long), 1.0, True)
    assert torch.isnan(lp[:2]).all() and torch.isnan(ent[:2]).all()
    r_lp, _r_ent, _ = ref_logprobs(x[2:], torch.zeros(1, dtype=torch.long), 1.0)
    assert_close(lp[2:], r_lp, **lp_tol(100), name="clean row")


# ------------------------------------------------------------------------------------ GAE
def _gae_inputs(seed):
    b, t = 9, 37
    g = gen(seed)
    rewards = torch.randn(b, t, generator=g)
    values = torch.randn(b, t, generator=g)
    mask = torch.ones(b, t, dtype=torch.bool)
    mask[1, :10] = False                      # left padding
    mask[2, 25:] = False                      # right padding
    mask[3, 5:9] = False                      # a hole
    mask[3, 30:] = False
    mask[4] = False                           # all masked
    mask[5] = torch.rand(t, generator=g) > 0.5  # random holes
    mask[6, :3] = False
    mask[6, -3:] = False                      # both sides
    mask[7, :-1] = False                      # a single valid token (the last)
    mask[8, 1:] = False                       # a single valid token (the first)
    return rewards, values, mask


@pytest.mark.parametrize("gamma,lam", ((1.0, 0.95), (0.99, 0.9), (0.0, 1.0), (1.0, 0.0), (0.5, 1.0)))
def test_gae_against_reference(gamma, lam):
    rewards, values, mask = _gae_inputs(int(gamma * 100 + lam * 10))
    r_adv, r_ret = reference.gae(rewards.double(), values.double(), mask, gamma=gamma, lam=lam)
    poison_heap(rewards.numel() * 4)
    adv, ret = cpp.gae(rewards, values, mask, gamma, lam)
    assert adv.dtype == torch.float32 and adv.shape == rewards.shape
    assert_close(adv, r_adv, atol=1e-5, rtol=1e-5, name="advantages")
    assert_close(ret, r_ret, atol=1e-5, rtol=1e-5, name="returns")
    assert torch.equal(adv[~mask], torch.zeros(int((~mask).sum()))), "masked advantages must be exactly 0"
    assert torch.equal(ret[~mask], torch.zeros(int((~mask).sum()))), "masked returns must be exactly 0"
    # padding / holes give the advantages of the unpadded row
    row = 3
    keep = mask[row]
    a_alone, _ = cpp.gae(rewards[row, keep][None], values[row, keep][None],
                         torch.ones(1, int(keep.sum()), dtype=torch.bool), gamma, lam)
    torch.testing.assert_close(adv[row, keep], a_alone[0], atol=1e-6, rtol=1e-6)


def test_gae_public_api_and_shapes():
    rewards, values, mask = _gae_inputs(3)
    with K.use_backend("cpp"):
        adv, ret = K.gae(rewards, values, mask, gamma=0.97, lam=0.9)
        adv1, ret1 = K.gae(rewards[0], values[0], None, gamma=0.97, lam=0.9)
    t_adv, t_ret = torch_backend.gae(rewards, values, mask, 0.97, 0.9)
    torch.testing.assert_close(adv, t_adv, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(ret, t_ret, atol=1e-5, rtol=1e-5)
    r_adv, r_ret = reference.gae(rewards[:1].double(), values[:1].double(), None, gamma=0.97, lam=0.9)
    assert adv1.shape == (rewards.shape[1],)
    assert_close(adv1, r_adv[0], atol=1e-5, rtol=1e-5, name="1-D advantages")
    assert_close(ret1, r_ret[0], atol=1e-5, rtol=1e-5, name="1-D returns")
    empty = cpp.gae(torch.zeros(0, 5), torch.zeros(0, 5), torch.zeros(0, 5, dtype=torch.bool), 1.0, 0.9)
    assert empty[0].shape == (0, 5)


# ------------------------------------------------------------------------------------ PPO loss
def _ppo_inputs(n, seed, *, ties=False):
    g = gen(seed)
    logp = torch.randn(n, generator=g) * 0.5 - 2.0
    old = logp + torch.randn(n, generator=g) * 0.3
    if ties:
        old[: n // 4] = logp[: n // 4]  # ratio exactly 1: clipped == unclipped
    adv = torch.randn(n, generator=g)
    mask = torch.rand(n, generator=g) > 0.2
    ref = logp + torch.randn(n, generator=g) * 0.2
    ent = torch.rand(n, generator=g) * 3
    values = torch.randn(n, generator=g)
    old_values = values + torch.randn(n, generator=g) * 0.4
    if ties:
        old_values[n // 4: n // 2] = values[n // 4: n // 2]  # |v - old_v| = 0: both value branches tie
    returns = torch.randn(n, generator=g)
    return dict(logp=logp, old_logp=old, advantages=adv, mask=mask, ref_logp=ref, entropy=ent,
                values=values, old_values=old_values, returns=returns)


PPO_CASES = {
    "plain": dict(),
    "clip_high": dict(clip_eps_high=0.28),
    "dual": dict(dual_clip=3.0),
    "k1": dict(kl="k1", kl_coef=0.1),
    "k2": dict(kl="k2", kl_coef=0.2),
    "k3_entropy": dict(kl="k3", kl_coef=0.05, entropy=True, entropy_coef=0.01),
    "values_unclipped": dict(values="plain", value_coef=0.5),
    "values_clip_none": dict(values="old", value_clip=None, value_coef=0.7),
    "values_clipped": dict(values="old", value_clip=0.2, value_coef=0.5),
    "everything": dict(clip_eps_high=0.3, dual_clip=2.5, kl="k3", kl_coef=0.1, entropy=True,
                       entropy_coef=0.02, values="old", value_clip=0.1, value_coef=0.25),
    "k1+_seq_mean": dict(kl="k1+", kl_coef=0.1, entropy=True, entropy_coef=0.01, values="old",
                         loss_agg="seq-mean-token-mean"),
    "k3+_sum_norm": dict(kl="k3+", kl_coef=0.1, values="plain", dual_clip=3.0,
                         loss_agg="seq-mean-token-sum-norm"),
}


def _ppo_options(case):
    return PPOLossOptions(clip_eps=0.2, clip_eps_high=case.get("clip_eps_high"), dual_clip=case.get("dual_clip"),
                          kl_coef=case.get("kl_coef", 0.0), kl_estimator=case.get("kl", "k3"),
                          entropy_coef=case.get("entropy_coef", 0.0), value_clip=case.get("value_clip", 0.2),
                          value_coef=case.get("value_coef", 0.5), loss_agg=case.get("loss_agg", "token-mean"))


@pytest.mark.parametrize("ties", (False, True))
@pytest.mark.parametrize("name", sorted(PPO_CASES))
def test_ppo_loss_same_conventions_as_torch_backend(name, ties):
    """Semantics against the reference live in tests/test_ops_ppo_loss.py; here: the C++ kernel
    matches the torch backend directly (tie-breaking, branch choice) and writes every output
    element (the heap is poisoned first), over several of its 4096-token blocks."""
    case = PPO_CASES[name]
    inp = _ppo_inputs(3 * 4096 + 77, seed=len(name), ties=ties)
    opts = _ppo_options(case)
    flat = dict(ref_logp=inp["ref_logp"] if case.get("kl") else None,
                entropy=inp["entropy"] if case.get("entropy") else None,
                values=inp["values"] if case.get("values") else None,
                old_values=inp["old_values"] if case.get("values") == "old" else None,
                returns=inp["returns"] if case.get("values") else None)
    m = inp["mask"].float()
    weight = token_loss_weights(m, 2473, opts)  # 5 rows of 2473 tokens
    poison_heap(m.numel() * 4)
    out_c = cpp.ppo_loss_forward(inp["logp"], inp["old_logp"], inp["advantages"], m, *flat.values(), weight, opts)
    out_t = torch_backend.ppo_loss_forward(inp["logp"], inp["old_logp"], inp["advantages"], m, *flat.values(),
                                           weight, opts)
    assert len(out_c) == 5 and out_c[1].shape == (len(STATS_FIELDS),)
    for i, (c, t) in enumerate(zip(out_c, out_t)):
        assert c.shape == t.shape and c.dtype == torch.float32, f"output {i}: {c.shape} vs {t.shape}"
        torch.testing.assert_close(c, t, atol=1e-7, rtol=2e-5, msg=lambda s: f"output {i}: {s}")


def test_ppo_loss_rejects_unknown_codes():
    """The extension checks the integer codes it is handed (Python validates the names)."""
    inp = _ppo_inputs(10, seed=1)
    args = (inp["logp"], inp["old_logp"], inp["advantages"], inp["mask"].float(), inp["ref_logp"],
            None, None, None, None, None)
    bad_code, needs_weight = PPOLossOptions(kl_coef=0.1).pack(), PPOLossOptions(kl_coef=0.1).pack()
    bad_code[PPOLossOptions.slot("kl_estimator")] = 9
    needs_weight[PPOLossOptions.slot("loss_agg")] = 1
    with pytest.raises(RuntimeError, match="kl_estimator"):
        cpp._C.ppo_loss_forward(*args, bad_code)
    with pytest.raises(RuntimeError, match="loss weight"):
        cpp._C.ppo_loss_forward(*args, needs_weight)
    with pytest.raises(RuntimeError, match="floats of PPOLossOptions.pack"):  # the one object, whole
        cpp._C.ppo_loss_forward(*args, bad_code[:-2])


# ------------------------------------------------------------------------------------ determinism
def _all_outputs():
    logits = rand_logits((67, 5003), seed=21, dtype=torch.float32)
    labels = rand_labels((67,), 5003, seed=21)
    lp, lse, ent = cpp.logprobs_forward(logits, labels, 0.9, True)
    g_lp, g_ent = torch.randn(67, generator=gen(1)), torch.randn(67, generator=gen(2))
    grad = cpp.logprobs_backward(logits, labels, lse, ent, g_lp, g_ent, 0.9, False)
    lb = logits.bfloat16()
    lpb, lseb, entb = cpp.logprobs_forward(lb, labels, 1.0, True)
    gradb = cpp.logprobs_backward(lb, labels, lseb, entb, g_lp, g_ent, 1.0, True)
    rewards, values, mask = _gae_inputs(5)
    # sizes above the kernels' per-task grains, so 2 and 3 threads really split the work
    adv, ret = cpp.gae(rewards.repeat(2000, 1), values.repeat(2000, 1), mask.repeat(2000, 1), 0.99, 0.95)
    inp = _ppo_inputs(400 * 4096 + 1234, seed=9)
    args = (inp["logp"], inp["old_logp"], inp["advantages"], inp["mask"].float(), inp["ref_logp"],
            inp["entropy"], inp["values"], inp["old_values"], inp["returns"])
    opts = dict(clip_eps=0.2, clip_eps_high=0.28, dual_clip=3.0, kl_coef=0.1, kl_estimator="k3",
                entropy_coef=0.01, value_clip=0.2, value_coef=0.5)
    ppo = cpp.ppo_loss_forward(*args, None, PPOLossOptions(**opts))
    seq = PPOLossOptions(**opts, loss_agg="seq-mean-token-mean")
    ppo_seq = cpp.ppo_loss_forward(*args, token_loss_weights(args[3], args[3].numel() // 2, seq), seq)
    return [lp, lse, ent, grad, lpb, lseb, entb, gradb, adv, ret, *ppo, *ppo_seq]


def _bits(t):
    return t.reshape(-1).view(torch.uint8)


def test_bitwise_determinism_across_thread_counts():
    with num_threads(1):
        one = _all_outputs()
    for n in (2, 3):
        with num_threads(n):
            many = _all_outputs()
        for i, (a, b) in enumerate(zip(one, many)):
            assert a.dtype == b.dtype and a.shape == b.shape
            assert torch.equal(_bits(a), _bits(b)), f"output {i} differs bitwise between 1 and {n} threads"
    for i, (a, b) in enumerate(zip(one, _all_outputs())):
        assert torch.equal(_bits(a), _bits(b)), f"output {i} differs bitwise between two runs"
