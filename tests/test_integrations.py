"""rlfuse.integrations: drop-ins against float64 truths and the originals' semantics."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

import rlfuse.integrations as I
import rlfuse.kernels as K
from rlfuse.integrations import openrlhf, verl
from rlfuse.integrations import trl as rtrl


def _ref_logp(logits, index, temperature=1.0):
    lp = torch.log_softmax(logits.double() / temperature, -1)
    if index.dim() == logits.dim() - 1:
        return lp.gather(-1, index.unsqueeze(-1)).squeeze(-1)
    return lp.gather(-1, index)


def _ref_entropy(logits, temperature=1.0):
    lp = torch.log_softmax(logits.double() / temperature, -1)
    return -(lp.exp() * lp).sum(-1)


def test_import_needs_only_torch_and_kernels():
    code = ("import sys, rlfuse.integrations, rlfuse.integrations.trl, rlfuse.integrations.verl; "
            "bad = [m for m in sys.modules if m.split('.')[0] in "
            "('trl', 'transformers', 'peft', 'accelerate', 'datasets', 'rlfuse.engine')]; "
            "bad += [m for m in sys.modules if m.startswith('rlfuse.engine')]; "
            "assert not bad, bad")
    subprocess.run([sys.executable, "-c", code], check=True, cwd="/")


# ----------------------------------------------------------------------------------------
# TRL drop-ins
# ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_selective_log_softmax_matches_float64(temperature):
    torch.manual_seed(0)
    logits = torch.randn(3, 7, 50) * 3
    index = torch.randint(0, 50, (3, 7))
    out = I.selective_log_softmax(logits, index, temperature)
    assert out.shape == index.shape and out.dtype == torch.float32
    torch.testing.assert_close(out.double(), _ref_logp(logits, index, temperature), rtol=1e-5, atol=1e-5)


def test_selective_log_softmax_k_indices_row_mask_and_grad():
    torch.manual_seed(1)
    logits = (torch.randn(2, 5, 40) * 2).requires_grad_()
    index = torch.randint(0, 40, (2, 5, 3))
    row_mask = torch.ones(2, 5, 3, dtype=torch.bool)
    row_mask[1, 2:] = False
    out = I.selective_log_softmax(logits, index, 0.9, row_mask=row_mask)
    ref = _ref_logp(logits.detach(), index, 0.9).masked_fill(~row_mask, 0)
    torch.testing.assert_close(out.double(), ref, rtol=1e-5, atol=1e-5)
    out.sum().backward()
    leaf = logits.detach().double().requires_grad_()
    _ref_logp(leaf, index, 0.9).masked_fill(~row_mask, 0).sum().backward()
    torch.testing.assert_close(logits.grad.double(), leaf.grad, rtol=1e-5, atol=1e-6)


def test_selective_log_softmax_strided_bf16_and_float64():
    torch.manual_seed(2)
    full = torch.randn(2, 6, 33)
    logits = full[:, :-1]  # the usual non-contiguous slice
    index = torch.randint(0, 33, (2, 5))
    torch.testing.assert_close(I.selective_log_softmax(logits, index).double(), _ref_logp(logits, index),
                               rtol=1e-5, atol=1e-5)
    bf = I.selective_log_softmax(logits.bfloat16(), index)
    assert bf.dtype == torch.float32  # float32 like TRL's GPU kernel, not rounded to bf16
    torch.testing.assert_close(bf.double(), _ref_logp(logits.bfloat16(), index), rtol=1e-5, atol=1e-5)
    f64 = I.selective_log_softmax(logits.double(), index)
    assert f64.dtype == torch.float64
    torch.testing.assert_close(f64, _ref_logp(logits, index), rtol=1e-12, atol=1e-12)
    with pytest.raises(ValueError, match="temperature"):
        I.selective_log_softmax(logits, index, temperature=0.0)


def test_entropy_from_logits_and_combined():
    torch.manual_seed(3)
    logits = (torch.randn(4, 9, 27) * 2).requires_grad_()
    ent = I.entropy_from_logits(logits, chunk_size=3)
    torch.testing.assert_close(ent.double(), _ref_entropy(logits.detach()), rtol=1e-5, atol=1e-5)
    index = torch.randint(0, 27, (4, 9))
    mask = torch.rand(4, 9) > 0.3
    lp, ent2 = I.selective_log_softmax_and_entropy(logits, index, temperature=1.3, row_mask=mask)
    torch.testing.assert_close(lp.double(), _ref_logp(logits.detach(), index, 1.3).masked_fill(~mask, 0),
                               rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(ent2.double(), _ref_entropy(logits.detach(), 1.3).masked_fill(~mask, 0),
                               rtol=1e-5, atol=1e-5)
    (lp.sum() + ent2.sum()).backward()
    assert torch.isfinite(logits.grad).all()
    _, detached = I.selective_log_softmax_and_entropy(logits, index, entropy_requires_grad=False)
    assert not detached.requires_grad


def test_trl_dropins_match_trl_originals():
    tu = pytest.importorskip("trl.trainer.utils")
    rtrl.unpatch()
    torch.manual_seed(4)
    logits = torch.randn(3, 8, 64) * 2
    index = torch.randint(0, 64, (3, 8))
    mask = torch.rand(3, 8) > 0.25
    torch.testing.assert_close(I.selective_log_softmax(logits, index, 0.8, mask),
                               tu.selective_log_softmax(logits, index, 0.8, mask), rtol=1e-5, atol=1e-5)
    idx_k = torch.randint(0, 64, (3, 8, 4))
    torch.testing.assert_close(I.selective_log_softmax(logits, idx_k), tu.selective_log_softmax(logits, idx_k),
                               rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(I.entropy_from_logits(logits), tu.entropy_from_logits(logits), rtol=1e-5, atol=1e-5)
    a = I.selective_log_softmax_and_entropy(logits, index, temperature=0.5, row_mask=mask)
    b = tu.selective_log_softmax_and_entropy(logits, index, temperature=0.5, row_mask=mask)
    for x, y in zip(a, b):
        torch.testing.assert_close(x, y, rtol=1e-5, atol=1e-5)


# ----------------------------------------------------------------------------------------
# verl / OpenRLHF drop-ins
# ----------------------------------------------------------------------------------------

def test_verl_logprobs_from_logits_semantics():
    torch.manual_seed(5)
    logits = torch.randn(2, 6, 31)
    labels = torch.randint(0, 31, (2, 6))
    before = logits.clone()
    out = I.logprobs_from_logits(logits, labels, inplace_backward=True)
    assert torch.equal(logits, before)
    assert out.shape == labels.shape and out.dtype == torch.float32
    torch.testing.assert_close(out.double(), _ref_logp(logits, labels), rtol=1e-5, atol=1e-5)
    bf = verl.logprobs_from_logits(logits.bfloat16(), labels)
    assert bf.dtype == torch.float32  # verl's flash-attn path returns float32 for bf16 logits
    torch.testing.assert_close(bf.double(), _ref_logp(logits.bfloat16(), labels), rtol=1e-5, atol=1e-5)
    rounded = verl.logprobs_from_logits(logits.bfloat16(), labels, out_dtype=torch.bfloat16)
    assert rounded.dtype == torch.bfloat16  # verl's torch fallback, on request
    assert torch.equal(rounded, bf.bfloat16())
    ent = verl.entropy_from_logits(logits)
    torch.testing.assert_close(ent.double(), _ref_entropy(logits), rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match=r"\[0, 31\)"):
        I.logprobs_from_logits(logits, labels.masked_fill(labels == labels[0, 0], -100))


def test_openrlhf_log_probs_from_logits_does_not_mutate():
    torch.manual_seed(6)
    logits = torch.randn(2, 5, 17, requires_grad=True)
    labels = torch.randint(0, 17, (2, 5))
    before = logits.detach().clone()
    out = openrlhf.log_probs_from_logits(logits, labels, temperature=0.6)
    assert torch.equal(logits.detach(), before)
    torch.testing.assert_close(out.double(), _ref_logp(before, labels, 0.6), rtol=1e-5, atol=1e-5)
    out.sum().backward()
    assert logits.grad is not None


def _verl_gae_semantics(rewards, values, mask, gamma, lam):
    """verl's masked GAE written out: skip masked steps, carry the running state through them,
    returns = A + V, A whitened over the mask (mean, unbiased var, eps 1e-8) at every position."""
    rewards, values, mask = rewards.double(), values.double(), mask.double()
    batch, length = rewards.shape
    next_value = torch.zeros(batch, dtype=torch.float64)
    running = torch.zeros(batch, dtype=torch.float64)
    adv = torch.zeros(batch, length, dtype=torch.float64)
    for t in range(length - 1, -1, -1):
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        candidate = delta + gamma * lam * running
        next_value = torch.where(mask[:, t] > 0, values[:, t], next_value)
        running = torch.where(mask[:, t] > 0, candidate, running)
        adv[:, t] = running
    returns = adv + values
    n = mask.sum()
    mean = (adv * mask).sum() / n
    var = ((adv - mean) ** 2 * mask).sum() / (n - 1)
    return (adv - mean) / torch.sqrt(var + 1e-8), returns


@pytest.mark.parametrize("gamma,lam", [(1.0, 0.95), (0.9, 1.0), (0.99, 0.0)])
def test_compute_gae_advantage_return_matches_verl(gamma, lam):
    torch.manual_seed(7)
    rewards = torch.randn(4, 10)
    values = torch.randn(4, 10)
    mask = torch.ones(4, 10, dtype=torch.long)
    mask[0, 7:] = 0          # right padding
    mask[1, :3] = 0          # left padding
    mask[2, 4:6] = 0         # a hole (observation tokens)
    adv, ret = I.compute_gae_advantage_return(rewards, values, mask, torch.tensor(gamma), lam)
    ref_adv, ref_ret = _verl_gae_semantics(rewards, values, mask, gamma, lam)
    assert adv.dtype == torch.float32 and adv.shape == rewards.shape
    torch.testing.assert_close(adv.double(), ref_adv, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(ret.double(), ref_ret, rtol=1e-4, atol=1e-5)
    # on response tokens, the un-whitened advantages are rlfuse's GAE
    raw, _ = K.gae(rewards, values, mask, gamma=gamma, lam=lam)
    m = mask.bool()
    torch.testing.assert_close(ret[m], (raw + values)[m], rtol=1e-5, atol=1e-5)


def test_compute_gae_advantage_return_degenerate_masks():
    r, v = torch.randn(2, 4), torch.randn(2, 4)
    with pytest.raises(ValueError, match="At least one"):
        I.compute_gae_advantage_return(r, v, torch.zeros(2, 4), 1.0, 0.95)
    one = torch.zeros(2, 4)
    one[0, 1] = 1
    with pytest.raises(ValueError, match="one"):
        I.compute_gae_advantage_return(r, v, one, 1.0, 0.95)


# ----------------------------------------------------------------------------------------
# Fused linear PPO/GRPO loss module
# ----------------------------------------------------------------------------------------

def _unfused_ppo(hidden, weight, labels, old_logp, adv, mask, temperature, clip_eps, kl_coef=0.0, ref_logp=None,
                 entropy_coef=0.0):
    logits = (hidden @ weight.t()).double() / temperature
    lp_all = torch.log_softmax(logits, -1)
    logp = lp_all.gather(-1, labels.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    ratio = torch.exp(logp - old_logp.double())
    pg = torch.maximum(-adv * ratio, -adv * ratio.clamp(1 - clip_eps, 1 + clip_eps))
    per = pg
    if ref_logp is not None:
        d = logp - ref_logp.double()
        per = per + kl_coef * (torch.exp(-d) + d - 1)
    if entropy_coef:
        per = per - entropy_coef * (-(lp_all.exp() * lp_all).sum(-1))
    m = mask.double()
    return (per * m).sum() / m.sum()


@pytest.mark.parametrize("per_sequence_adv", [False, True])
def test_fused_linear_ppo_loss_matches_unfused(per_sequence_adv):
    torch.manual_seed(8)
    b, t, h, v = 3, 6, 16, 45
    hidden = torch.randn(b, t, h, requires_grad=True)
    weight = (torch.randn(v, h) * 0.3).requires_grad_()
    labels = torch.randint(0, v, (b, t))
    labels[0, :2] = -100
    labels[2, 4:] = -100
    mask = labels != -100
    with torch.no_grad():
        old = _ref_logp(hidden @ weight.t(), labels.clamp(min=0), 0.8).float() + 0.1 * torch.randn(b, t)
        ref = old + 0.05 * torch.randn(b, t)
    adv = torch.randn(b) if per_sequence_adv else torch.randn(b, t)
    adv_tok = adv.unsqueeze(-1).expand(b, t) if per_sequence_adv else adv
    module = I.FusedLinearPPOLoss(clip_eps=0.2, kl_coef=0.1, entropy_coef=0.01, temperature=0.8, chunk_size=5)
    loss, stats, logp = module(hidden, weight, labels, old, adv, ref_logp=ref, return_logp=True)
    assert set(stats) >= {"policy_loss", "kl", "entropy", "clipfrac"}
    assert torch.all(logp[~mask] == 0)
    loss.backward()
    h2, w2 = hidden.detach().double().requires_grad_(), weight.detach().double().requires_grad_()
    ref_loss = _unfused_ppo(h2, w2, labels, old, adv_tok.double(), mask, 0.8, 0.2, 0.1, ref, 0.01)
    ref_loss.backward()
    torch.testing.assert_close(loss.double(), ref_loss, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(hidden.grad.double(), h2.grad, rtol=1e-3, atol=1e-5)
    torch.testing.assert_close(weight.grad.double(), w2.grad, rtol=1e-3, atol=1e-5)


def test_fused_linear_grpo_loss_on_policy_and_errors():
    torch.manual_seed(9)
    hidden = torch.randn(2, 4, 8, requires_grad=True)
    weight = torch.randn(20, 8, requires_grad=True)
    labels = torch.randint(0, 20, (2, 4))
    loss_fn = I.FusedLinearGRPOLoss()
    adv = torch.tensor([1.0, -1.0])
    loss, stats = loss_fn(hidden, weight, labels, None, adv)
    # on-policy: ratio 1, loss = -mean(A) over tokens = 0 for these advantages
    assert abs(float(loss.detach())) < 1e-6 and float(stats["clipfrac"]) == 0.0
    loss.backward()
    assert hidden.grad.abs().sum() > 0
    with pytest.raises(ValueError):
        I.FusedLinearPPOLoss(kl_coef=0.1)(hidden, weight, labels, None, adv)  # kl without ref_logp
    assert "clip_eps=0.2" in repr(loss_fn)


# ----------------------------------------------------------------------------------------
# TRL patch
# ----------------------------------------------------------------------------------------

@pytest.fixture
def trl_utils():
    tu = pytest.importorskip("trl.trainer.utils")
    rtrl.unpatch()
    yield tu
    rtrl.unpatch()


def _tiny_llama(vocab=67, hidden=32, seed=0):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                      tie_word_embeddings=False)
    return LlamaForCausalLM(cfg)


def _score(model, ids, labels, **kw):
    model.zero_grad()
    out = model(input_ids=ids, labels=labels, fused_lm_head=True, **kw)
    loss = out.log_probs.sum() + (0.5 * out.entropy.sum() if out.entropy is not None else 0)
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return out, grads


class _Spy:
    def __init__(self, monkeypatch):
        self.calls = 0
        real = K.linear_logprobs

        def spy(*a, **k):
            self.calls += 1
            return real(*a, **k)

        monkeypatch.setattr(K, "linear_logprobs", spy)


def test_patch_routes_fused_head_through_rlfuse_and_unpatch_restores(trl_utils, monkeypatch):
    from trl.kernels import ChunkedLogProbFunction

    original = {n: vars(trl_utils)[n] for n in ("_ChunkedLogProbFunction", "selective_log_softmax",
                                                "entropy_from_logits", "selective_log_softmax_and_entropy")}
    assert original["_ChunkedLogProbFunction"] is ChunkedLogProbFunction
    model = _tiny_llama()
    trl_utils.add_fused_lm_head(model, temperature=0.7, outputs=("log_probs", "entropy"))
    ids = torch.randint(0, 67, (3, 12))
    labels = ids.clone()
    labels[:, :5] = -100
    labels[1, 9:] = -100
    spy = _Spy(monkeypatch)

    plain, plain_grads = _score(model, ids, labels)
    assert spy.calls == 0
    rtrl.patch()
    rtrl.patch()  # idempotent
    assert rtrl.is_patched()
    assert trl_utils._ChunkedLogProbFunction is rtrl.RlfuseChunkedLogProb
    assert trl_utils.selective_log_softmax is rtrl.selective_log_softmax
    before = rtrl.patch_stats()["rlfuse"]
    fused, fused_grads = _score(model, ids, labels)
    assert spy.calls == 1 and rtrl.patch_stats()["rlfuse"] == before + 1
    rtrl.unpatch()
    for name, obj in original.items():
        assert vars(trl_utils)[name] is obj, name
    _score(model, ids, labels)
    assert spy.calls == 1  # TRL's own kernel again

    torch.testing.assert_close(fused.log_probs, plain.log_probs, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(fused.entropy, plain.entropy, rtol=1e-5, atol=1e-5)
    assert torch.all(fused.log_probs[plain.label_mask.logical_not()] == 0)
    torch.testing.assert_close(fused.loss, plain.loss, rtol=1e-5, atol=1e-5)
    assert set(fused_grads) == set(plain_grads)
    for name in plain_grads:
        torch.testing.assert_close(fused_grads[name], plain_grads[name], rtol=1e-4, atol=1e-5, msg=name)


def test_patched_context_manager_and_shift_labels(trl_utils, monkeypatch):
    model = _tiny_llama(seed=1)
    trl_utils.add_fused_lm_head(model, outputs=("log_probs",))
    ids = torch.randint(0, 67, (2, 10))
    shift = torch.randint(0, 67, (2, 10))
    shift[0, -3:] = -100
    plain, _ = _score(model, ids, None, shift_labels=shift)
    spy = _Spy(monkeypatch)
    with rtrl.patched():
        with rtrl.patched():  # nested: stays patched until the outer block ends
            pass
        assert rtrl.is_patched()
        fused, _ = _score(model, ids, None, shift_labels=shift)
    assert not rtrl.is_patched() and spy.calls == 1
    assert fused.entropy is None and fused.log_probs.shape == (2, 10)
    torch.testing.assert_close(fused.log_probs, plain.log_probs, rtol=1e-5, atol=1e-5)
    rtrl.patch()
    with rtrl.patched():
        pass
    assert rtrl.is_patched()  # a block entered while patched leaves it patched


def test_shim_apply_matches_trl_function_with_bias_scale_and_ignored_targets(trl_utils):
    from trl.kernels import ChunkedLogProbFunction

    torch.manual_seed(10)
    n, h, v = 23, 16, 70
    hidden = torch.randn(n, h, requires_grad=True)
    weight = torch.randn(v, h, requires_grad=True)
    bias = torch.randn(v, requires_grad=True)
    targets = torch.randint(0, v, (n,))
    targets[[0, 5, 17]] = -100  # ignore labels reaching the kernel are scored as 0 outputs
    outs = ("log_probs", "entropy")

    def run(fn, tgt):
        for p in (hidden, weight, bias):
            p.grad = None
        lp, ent, *rest = fn.apply(hidden, weight, bias, tgt, 0.9, 32, None, 1.7, outs)
        (lp.sum() + ent.sum()).backward()
        return lp, ent, rest, hidden.grad.clone(), weight.grad.clone(), bias.grad.clone()

    ours = run(rtrl.RlfuseChunkedLogProb, targets)
    theirs = run(ChunkedLogProbFunction, targets.clamp(min=0))
    valid = targets >= 0
    assert torch.all(ours[0][~valid] == 0) and torch.all(ours[1][~valid] == 0)
    assert ours[2] == [None, None, None]
    torch.testing.assert_close(ours[0][valid], theirs[0][valid], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(ours[1][valid], theirs[1][valid], rtol=1e-5, atol=1e-5)
    # gradients: TRL's with the ignored rows' outputs zeroed the same way
    for p in (hidden, weight, bias):
        p.grad = None
    lp, ent, *_ = ChunkedLogProbFunction.apply(hidden, weight, bias, targets.clamp(min=0), 0.9, 32, None, 1.7, outs)
    (lp[valid].sum() + ent[valid].sum()).backward()
    for got, want in zip(ours[3:], (hidden.grad, weight.grad, bias.grad)):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)


def test_shim_falls_back_to_trl_for_extra_outputs_and_says_so_once(trl_utils, monkeypatch, caplog):
    from trl.kernels import ChunkedLogProbFunction

    torch.manual_seed(11)
    hidden, weight = torch.randn(9, 8), torch.randn(30, 8)
    targets = torch.randint(0, 30, (9,))
    spy = _Spy(monkeypatch)
    before = rtrl.patch_stats()["fallback"]
    monkeypatch.setattr(rtrl, "_told", set())
    cases = [(None, 1.0, ("log_probs", "entropy", "is_top1")), (None, 1.0, ("log_probs", "is_top1")),
             (30.0, 1.0, ("log_probs", "mean_logits")), (None, 0.0, ("log_probs",))]
    with caplog.at_level("WARNING", logger="rlfuse.integrations.trl"):
        for args in cases:
            ours = rtrl.RlfuseChunkedLogProb.apply(hidden, weight, None, targets, 1.0, 16, *args)
            theirs = ChunkedLogProbFunction.apply(hidden, weight, None, targets, 1.0, 16, *args)
            for a, b in zip(ours, theirs):
                assert (a is None) == (b is None)
                if a is not None:
                    torch.testing.assert_close(a, b)
    assert spy.calls == 0 and rtrl.patch_stats()["fallback"] == before + len(cases)
    lines = [r.getMessage() for r in caplog.records if r.name == "rlfuse.integrations.trl"]
    assert len(lines) == 3, lines  # one line per reason, the repeated is_top1 reason once
    assert "is_top1" in lines[0] and "soft-capped" in lines[1] and "logit_scale 0.0" in lines[2]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("outputs", [("log_probs",), ("log_probs", "entropy", "mean_logits")], ids=len)
@pytest.mark.parametrize("softcap,scale", [(None, 1.0), (None, 0.5), (5.0, 1.7)], ids=str)
def test_shim_serves_softcap_scale_and_mean_logits(trl_utils, monkeypatch, dtype, outputs, softcap, scale):
    """TRL's other output sets (KTO's mean_logits) and soft-capped heads (Gemma) run on rlfuse,
    equal to TRL's kernel: values and gradients."""
    from trl.kernels import ChunkedLogProbFunction

    if softcap is not None and "mean_logits" in outputs:
        pytest.skip("mean logits of soft-capped logits fall back (tested above)")
    torch.manual_seed(12)
    n, h, v = 37, 16, 301
    hidden = torch.randn(n, h, dtype=dtype, requires_grad=True)
    weight = (torch.randn(v, h) * 0.5).to(dtype).requires_grad_()
    bias = torch.randn(v, dtype=dtype, requires_grad=True)
    targets = torch.randint(0, v, (n,))
    targets[[2, 30]] = -100
    valid = targets >= 0
    spy = _Spy(monkeypatch)

    def run(fn):
        for p in (hidden, weight, bias):
            p.grad = None
        out = fn.apply(hidden, weight, bias, targets if fn is rtrl.RlfuseChunkedLogProb else targets.clamp(min=0),
                       0.8, 64, softcap, scale, outputs)
        lp, ent, _, mean_logits, _ = out
        loss = lp[valid].sum() + (ent[valid].sum() if ent is not None else 0)
        loss.backward()
        return out, [p.grad.float().clone() for p in (hidden, weight, bias)]

    ours, g_ours = run(rtrl.RlfuseChunkedLogProb)
    theirs, g_theirs = run(ChunkedLogProbFunction)
    assert spy.calls == 1
    tol = dict(rtol=1e-4, atol=1e-5) if dtype == torch.float32 else dict(rtol=2e-2, atol=2e-2)
    for a, b in zip(ours, theirs):
        assert (a is None) == (b is None)
        if a is not None:
            assert a.dtype == b.dtype == torch.float32
            torch.testing.assert_close(a[valid], b[valid], **tol)
    if "mean_logits" in outputs:
        assert not ours[3].requires_grad and torch.all(ours[3][~valid] == 0)
        # against float64 the closed form is at least as close as TRL's tiled sum
        z = (hidden.detach().double() @ weight.detach().double().t() + bias.detach().double()) * scale / 0.8
        truth = z.mean(-1)
        assert (ours[3][valid].double() - truth[valid]).abs().max() <= (
            (theirs[3][valid].double() - truth[valid]).abs().max() + 1e-6)
    if dtype == torch.float32:
        for a, b in zip(g_ours, g_theirs):
            torch.testing.assert_close(a, b, **tol)
        return
    # bf16: both round differently; ours must be no further from the float64 gradient than TRL's
    from rlfuse.kernels import reference
    leaves = [t.detach().double().requires_grad_() for t in (hidden, weight, bias)]
    lp, ent = reference.linear_logprobs(leaves[0], leaves[1], targets.clamp(min=0), bias=leaves[2], temperature=0.8,
                                        return_entropy=True, softcap=softcap, logit_scale=scale)
    (lp[valid].sum() + (ent[valid].sum() if "entropy" in outputs else 0)).backward()
    for name, a, b, leaf in zip(("hidden", "weight", "bias"), g_ours, g_theirs, leaves):
        e_ours, e_trl = (a.double() - leaf.grad).abs(), (b.double() - leaf.grad).abs()
        assert e_ours.mean() <= 1.25 * e_trl.mean() + 1e-7, (name, float(e_ours.mean()), float(e_trl.mean()))
        assert e_ours.max() <= 2.0 * e_trl.max() + 1e-6, (name, float(e_ours.max()), float(e_trl.max()))


def test_patch_reaches_modules_imported_later_and_restores_them(trl_utils):
    import types

    fake = types.ModuleType("trl._rlfuse_probe")
    sys.modules[fake.__name__] = fake
    try:
        rtrl.patch()
        fake.selective_log_softmax = trl_utils.selective_log_softmax  # a module importing it while patched
        assert fake.selective_log_softmax is rtrl.selective_log_softmax
        rtrl.unpatch()
        assert fake.selective_log_softmax is not rtrl.selective_log_softmax
        assert fake.selective_log_softmax is trl_utils.selective_log_softmax
        # already imported before patch(): patched in place, restored after
        late = types.ModuleType("trl._rlfuse_probe2")
        late.entropy_from_logits = trl_utils.entropy_from_logits
        sys.modules[late.__name__] = late
        original = late.entropy_from_logits
        with rtrl.patched():
            assert late.entropy_from_logits is rtrl.entropy_from_logits
        assert late.entropy_from_logits is original
    finally:
        sys.modules.pop("trl._rlfuse_probe", None)
        sys.modules.pop("trl._rlfuse_probe2", None)


def test_patch_refuses_a_trl_without_the_symbols(trl_utils, monkeypatch):
    import trl

    monkeypatch.delattr(trl_utils, "_ChunkedLogProbFunction")
    with pytest.raises(RuntimeError, match=rf"TRL {trl.__version__}.*_ChunkedLogProbFunction"):
        rtrl.patch()
    assert not rtrl.is_patched()


def test_patch_refuses_a_changed_kernel_signature(trl_utils, monkeypatch):
    class Changed:
        @staticmethod
        def forward(ctx, hidden, weight, labels, temperature):
            pass

        @staticmethod
        def apply(*a):
            pass

    monkeypatch.setattr(trl_utils, "_ChunkedLogProbFunction", Changed)
    with pytest.raises(RuntimeError, match="_ChunkedLogProbFunction.forward takes"):
        rtrl.patch()


def test_patch_without_trl_says_so(monkeypatch):
    monkeypatch.setitem(sys.modules, "trl.trainer.utils", None)  # import now raises ImportError
    with pytest.raises(RuntimeError, match="needs TRL 1.x installed"):
        rtrl.patch()
    assert not rtrl.is_patched()
    # the drop-ins themselves never need TRL
    assert rtrl.selective_log_softmax(torch.zeros(2, 3), torch.tensor([0, 2])).shape == (2,)
