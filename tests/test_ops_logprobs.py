"""K.logprobs_from_logits on every backend, against float64 references."""

from __future__ import annotations

import pytest
import torch

import rlfuse.kernels as K
from helpers import (
    assert_close_verbose,
    assert_no_worse_than_baseline,
    baseline_logprobs,
    rand_labels,
    rand_logits,
    randn,
    ref_logprobs64,
    ref_logprobs_grad64,
)

VOCABS = (1, 7, 1000, 50257)
TEMPERATURES = (0.7, 1.0, 1.5)


def _shape(backend, vocab: int, ndim: int) -> tuple:
    big = vocab > 10_000
    if ndim == 1:
        return (vocab,)
    if ndim == 2:
        return ((1 if backend.slow else 2) if big else (3 if backend.slow else 9), vocab)
    return (1, 2, vocab) if big else ((2, 2, vocab) if backend.slow else (2, 5, vocab))


def _interpreter_big_vocab(backend, vocab: int, keep: bool) -> None:
    """The Triton CPU interpreter takes seconds per 50257-wide row: on it, the big vocabulary is
    run in one representative case per test (``keep``) and skipped in the others."""
    if backend.slow and vocab > 10_000 and not keep:
        pytest.skip("interpreter: big vocabulary covered by the representative case")


def _tol(vocab: int):
    # float32 compute: rounding of z/T and of a V-term sum
    return dict(atol=2e-5 if vocab < 10_000 else 5e-5, rtol=2e-6)


@pytest.mark.parametrize("temperature", TEMPERATURES)
@pytest.mark.parametrize("ndim", (1, 2, 3))
@pytest.mark.parametrize("vocab", VOCABS)
def test_forward_fp32(backend, vocab, ndim, temperature):
    _interpreter_big_vocab(backend, vocab, keep=ndim == 2 and temperature == 0.7)
    shape = _shape(backend, vocab, ndim)
    logits = rand_logits(shape, seed=vocab + ndim, device=backend.device)
    labels = rand_labels(shape[:-1], vocab, seed=ndim, device=backend.device)
    logp = K.logprobs_from_logits(logits, labels, temperature=temperature)
    logp2, ent = K.logprobs_from_logits(logits, labels, temperature=temperature, return_entropy=True)
    ref_lp, ref_ent = ref_logprobs64(logits, labels, temperature)
    for t in (logp, logp2, ent):
        assert t.dtype == torch.float32 and tuple(t.shape) == shape[:-1] and t.device == logits.device
    assert_close_verbose(logp, ref_lp, name="logp", **_tol(vocab))
    assert_close_verbose(logp2, ref_lp, name="logp (with entropy)", **_tol(vocab))
    assert_close_verbose(ent, ref_ent, name="entropy", **_tol(vocab))
    if vocab == 1:  # a one-token vocabulary is certain
        assert torch.all(logp.abs() <= 1e-6) and torch.all(ent.abs() <= 1e-6)


@pytest.mark.parametrize("temperature", (0.7, 1.5))
@pytest.mark.parametrize("dtype", (torch.bfloat16, torch.float16), ids=("bf16", "fp16"))
@pytest.mark.parametrize("vocab", VOCABS)
def test_forward_low_precision(backend, vocab, dtype, temperature):
    """Apple CCE criterion: error vs the fp64 truth no worse than the same-dtype torch baseline."""
    _interpreter_big_vocab(backend, vocab, keep=dtype == torch.bfloat16 and temperature == 0.7)
    shape = _shape(backend, vocab, 2 if vocab > 10_000 else 3)
    logits = rand_logits(shape, dtype=dtype, seed=vocab + 11, device=backend.device)
    labels = rand_labels(shape[:-1], vocab, seed=5, device=backend.device)
    logp, ent = K.logprobs_from_logits(logits, labels, temperature=temperature, return_entropy=True)
    assert logp.dtype == torch.float32 and ent.dtype == torch.float32
    truth_lp, truth_ent = ref_logprobs64(logits, labels, temperature)
    base_lp, base_ent = baseline_logprobs(logits, labels, temperature)
    assert_no_worse_than_baseline(logp, base_lp, truth_lp, factor=2.0, atol=1e-5, name="logp")
    assert_no_worse_than_baseline(ent, base_ent, truth_ent, factor=2.0, atol=1e-5, name="entropy")


@pytest.mark.parametrize("dtype", (torch.float32, torch.bfloat16, torch.float16, torch.float64),
                         ids=("fp32", "bf16", "fp16", "fp64"))
def test_output_dtype_is_float32(backend, dtype):
    logits = rand_logits((4, 11), dtype=dtype, device=backend.device)
    labels = rand_labels((4,), 11, device=backend.device)
    logp, ent = K.logprobs_from_logits(logits, labels, return_entropy=True)
    assert logp.dtype == torch.float32 and ent.dtype == torch.float32
    ref_lp, ref_ent = ref_logprobs64(logits, labels)
    assert_close_verbose(logp, ref_lp, atol=2e-5, rtol=1e-5, name="logp")
    assert_close_verbose(ent, ref_ent, atol=2e-5, rtol=1e-5, name="entropy")


GRAD_CASES = [  # (vocab, shape, temperature, which outputs carry gradient)
    (7, (5, 7), 1.0, "both"),
    (7, (2, 3, 7), 0.7, "logp"),
    (1000, (6, 1000), 1.5, "both"),
    (1000, (6, 1000), 1.0, "entropy"),
    (1000, (1000,), 0.7, "both"),
    (50257, (2, 50257), 0.7, "both"),
    (1, (3, 1), 1.0, "both"),
]


@pytest.mark.parametrize("vocab,shape,temperature,which", GRAD_CASES,
                         ids=[f"V{v}-{len(s)}d-T{t}-{w}" for v, s, t, w in GRAD_CASES])
def test_backward_fp32(backend, vocab, shape, temperature, which):
    if backend.slow and vocab > 10_000:
        shape = (1, vocab)
    logits = rand_logits(shape, seed=vocab, device=backend.device).requires_grad_(True)
    labels = rand_labels(shape[:-1], vocab, seed=2, device=backend.device)
    w1 = randn(*shape[:-1], seed=3, device=backend.device) if which in ("both", "logp") else None
    w2 = randn(*shape[:-1], seed=4, device=backend.device) if which in ("both", "entropy") else None
    logp, ent = K.logprobs_from_logits(logits, labels, temperature=temperature, return_entropy=True)
    total = logp.new_zeros(())
    if w1 is not None:
        total = total + (logp * w1).sum()
    if w2 is not None:
        total = total + (ent * w2).sum()
    total.backward()
    expected = ref_logprobs_grad64(logits, labels, w1, w2, temperature)
    assert logits.grad.dtype == logits.dtype and logits.grad.shape == logits.shape
    assert_close_verbose(logits.grad, expected, atol=2e-6, rtol=1e-4, name="grad logits")


def test_backward_fp64(backend):
    """float64 logits: float32 compute, the gradient returned in float64."""
    logits = rand_logits((5, 1001), dtype=torch.float64, seed=51, device=backend.device).requires_grad_(True)
    labels = rand_labels((5,), 1001, seed=52, device=backend.device)
    w1, w2 = randn(5, seed=53, device=backend.device), randn(5, seed=54, device=backend.device)
    logp, ent = K.logprobs_from_logits(logits, labels, temperature=0.9, return_entropy=True)
    ((logp * w1).sum() + (ent * w2).sum()).backward()
    assert logits.grad.dtype == torch.float64
    expected = ref_logprobs_grad64(logits, labels, w1, w2, 0.9)
    assert_close_verbose(logits.grad, expected, atol=2e-6, rtol=2e-5, name="grad logits fp64")


def test_backward_without_entropy(backend):
    """return_entropy=False: the gradient is that of the log-prob alone."""
    logits = rand_logits((7, 300), seed=9, device=backend.device).requires_grad_(True)
    labels = rand_labels((7,), 300, device=backend.device)
    w1 = randn(7, seed=10, device=backend.device)
    (K.logprobs_from_logits(logits, labels, temperature=0.7) * w1).sum().backward()
    expected = ref_logprobs_grad64(logits, labels, w1, None, 0.7)
    assert_close_verbose(logits.grad, expected, atol=2e-6, rtol=1e-4, name="grad logits")


@pytest.mark.parametrize("dtype", (torch.bfloat16, torch.float16), ids=("bf16", "fp16"))
@pytest.mark.parametrize("vocab", (7, 1000, 50257))
def test_backward_low_precision(backend, vocab, dtype):
    _interpreter_big_vocab(backend, vocab, keep=dtype == torch.bfloat16)
    shape = ((1 if backend.slow else 2), vocab) if vocab > 10_000 else (6, vocab)
    logits = rand_logits(shape, dtype=dtype, seed=vocab + 1, device=backend.device)
    labels = rand_labels(shape[:-1], vocab, seed=6, device=backend.device)
    w1 = randn(shape[0], seed=7, device=backend.device)
    w2 = randn(shape[0], seed=8, device=backend.device)
    x = logits.clone().requires_grad_(True)
    logp, ent = K.logprobs_from_logits(x, labels, temperature=0.7, return_entropy=True)
    ((logp * w1).sum() + (ent * w2).sum()).backward()
    assert x.grad.dtype == dtype
    xb = logits.clone().requires_grad_(True)
    blp, bent = baseline_logprobs(xb, labels, 0.7)
    ((blp * w1).sum() + (bent * w2).sum()).backward()
    truth = ref_logprobs_grad64(logits, labels, w1, w2, 0.7)
    # Triton's CPU interpreter truncates fp32 -> bf16 stores instead of rounding to nearest (GPU
    # code rounds): its gradient is off by up to 1 ulp, not 0.5, so it gets twice the slack.
    factor = 4.0 if backend.slow and dtype == torch.bfloat16 else 2.0
    assert_no_worse_than_baseline(x.grad, xb.grad, truth, factor=factor, atol=1e-6, name="grad logits")


def test_non_contiguous_rows(backend):
    """logits[:, :-1] (the usual shift for next-token labels) cannot be viewed as 2-D."""
    B, T, V = (2, 4, 37) if backend.slow else (3, 9, 101)
    full = rand_logits((B, T + 1, V), seed=21, device=backend.device).requires_grad_(True)
    logits = full[:, :-1]
    assert not logits.is_contiguous()
    labels = rand_labels((B, T), V, seed=22, device=backend.device)
    w1, w2 = randn(B, T, seed=23, device=backend.device), randn(B, T, seed=24, device=backend.device)
    logp, ent = K.logprobs_from_logits(logits, labels, temperature=1.5, return_entropy=True)
    ref_lp, ref_ent = ref_logprobs64(logits, labels, 1.5)
    assert_close_verbose(logp, ref_lp, atol=2e-5, rtol=2e-6, name="logp")
    assert_close_verbose(ent, ref_ent, atol=2e-5, rtol=2e-6, name="entropy")
    ((logp * w1).sum() + (ent * w2).sum()).backward()
    expected = torch.zeros(full.shape, dtype=torch.float64)
    expected[:, :-1] = ref_logprobs_grad64(logits, labels, w1, w2, 1.5)
    assert_close_verbose(full.grad, expected, atol=2e-6, rtol=1e-4, name="grad logits")
    assert torch.all(full.grad[:, -1] == 0)


def test_vocab_dim_not_contiguous(backend):
    """A transposed matrix (vocab stride != 1) is accepted too."""
    base = rand_logits((53, 6), seed=31, device=backend.device)
    logits = base.t().requires_grad_(False)
    assert logits.stride(-1) != 1
    labels = rand_labels((6,), 53, device=backend.device)
    logp, ent = K.logprobs_from_logits(logits, labels, return_entropy=True)
    ref_lp, ref_ent = ref_logprobs64(logits, labels)
    assert_close_verbose(logp, ref_lp, atol=2e-5, rtol=2e-6, name="logp")
    assert_close_verbose(ent, ref_ent, atol=2e-5, rtol=2e-6, name="entropy")


def test_gradient_does_not_touch_labels_or_inputs(backend):
    logits = rand_logits((4, 13), seed=41, device=backend.device)
    before = logits.clone()
    x = logits.clone().requires_grad_(True)
    labels = rand_labels((4,), 13, device=backend.device)
    labels_before = labels.clone()
    K.logprobs_from_logits(x, labels, return_entropy=True)[0].sum().backward()
    assert torch.equal(x.detach(), before), "the op modified its input logits"
    assert torch.equal(labels, labels_before)


# ----------------------------------------------------------------------------- errors
@pytest.mark.parametrize("bad", (-1, -100, 13, 14), ids=("neg1", "neg100", "eqV", "gtV"))
def test_labels_out_of_range(backend, bad):
    logits = rand_logits((3, 13), device=backend.device)
    labels = torch.tensor([0, bad, 2], device=backend.device)
    with pytest.raises(ValueError, match=r"\[0, 13\)"):
        K.logprobs_from_logits(logits, labels)


def test_labels_shape_mismatch(backend):
    logits = rand_logits((3, 5, 13), device=backend.device)
    with pytest.raises(ValueError, match="shape"):
        K.logprobs_from_logits(logits, rand_labels((3, 4), 13, device=backend.device))
    with pytest.raises(ValueError, match="shape"):
        K.logprobs_from_logits(logits, rand_labels((15,), 13, device=backend.device))


@pytest.mark.parametrize("dtype", (torch.float32, torch.bool))
def test_labels_must_be_integer(backend, dtype):
    logits = rand_logits((3, 13), device=backend.device)
    with pytest.raises(ValueError, match="integer"):
        K.logprobs_from_logits(logits, torch.zeros(3, dtype=dtype, device=backend.device))


def test_bad_temperature_and_logits(backend):
    logits = rand_logits((3, 13), device=backend.device)
    labels = rand_labels((3,), 13, device=backend.device)
    for t in (0.0, -1.0):
        with pytest.raises(ValueError, match="temperature"):
            K.logprobs_from_logits(logits, labels, temperature=t)
    with pytest.raises(ValueError):
        K.logprobs_from_logits(torch.zeros(3, 13, dtype=torch.int64, device=backend.device), labels)


# ----------------------------------------------------------------------------- gradient memory
def test_gradient_memory_is_recycled_only_once_free(backend, monkeypatch):
    """The [N, V] gradient reuses the last one's memory (no fresh pages to fault in) only when
    nobody holds that gradient any more; a held gradient is never overwritten."""
    from rlfuse.kernels import logprobs as op

    if backend.device.type != "cpu":
        pytest.skip("recycling is for CPU memory (CUDA has its caching allocator)")
    recycler = op._GradientRecycler()
    recycler.MIN_BYTES = 0
    monkeypatch.setattr(op, "_recycler", recycler)
    x = rand_logits((6, 301), seed=61, device=backend.device).requires_grad_(True)
    labels = rand_labels((6,), 301, seed=62, device=backend.device)

    def grad_of(weights):
        x.grad = None
        (K.logprobs_from_logits(x, labels) * weights).sum().backward()
        return x.grad

    w_a, w_b = randn(6, seed=63), randn(6, seed=64)
    held = grad_of(w_a)
    held_copy = held.clone()
    second = grad_of(w_b)  # ``held`` is still referenced: fresh memory
    assert second.data_ptr() != held.data_ptr()
    assert torch.equal(held, held_copy), "a gradient the caller holds was overwritten"
    expected = ref_logprobs_grad64(x, labels, w_a, None)
    ptr = second.data_ptr()
    del held, second
    x.grad = None
    third = grad_of(w_a)  # the last gradient is free again: its memory is reused
    assert third.data_ptr() == ptr
    assert_close_verbose(third, expected, atol=2e-6, rtol=1e-4, name="recycled gradient")
    monkeypatch.setenv("RLFUSE_RECYCLE_GRADIENTS", "0")
    del third
    x.grad = None
    assert grad_of(w_a).data_ptr() != ptr
