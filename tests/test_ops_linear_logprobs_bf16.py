"""K.linear_logprobs with bf16 hidden states and weight on the CPU backends (issue 22): no float32
copy of the [V, H] weight, no [V, H] gradient for a frozen head, every output written (outputs
poisoned with NaN beforehand), and log-probs and gradients no worse against float64 than the
same-dtype PyTorch baseline on odd shapes."""

from __future__ import annotations

import importlib

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

import rlfuse.kernels as K
from helpers import assert_no_worse_than_baseline, baseline_linear, rand_labels, randn, ref_linear64

_op_module = importlib.import_module("rlfuse.kernels.linear_logprobs")
_IMPLS = {"linear_logprobs": _op_module._linear_logprobs_op._init_fn,
          "linear_logprobs_backward": _op_module._linear_logprobs_backward_op._init_fn}
_ALLOCATING = {"empty", "empty_like", "new_empty", "zeros", "zeros_like", "new_zeros", "empty_strided",
               "_to_copy", "clone", "full", "full_like", "ones_like", "contiguous"}
CPU_BACKENDS = [b for b in ("torch", "cpp") if b in K.available_backends()]


class AllocationMeter(TorchDispatchMode):
    """Records (op, dtype, numel) of every tensor an allocating aten op makes, inside rlfuse's custom
    ops too (their Python bodies are run under the meter), and C++ kernels' at::empty (they go
    through the dispatcher). ``poison``: fresh float buffers are filled with NaN, so an output
    element the op forgets to write shows."""

    def __init__(self, poison: bool = False):
        super().__init__()
        self.poison, self.made = poison, []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func.namespace == "rlfuse":
            with self:
                return _IMPLS[func._opname](*args, **kwargs)
        out = func(*args, **kwargs)
        name = func._opname
        if name in _ALLOCATING:
            for t in tree_leaves(out):
                if isinstance(t, torch.Tensor):
                    self.made.append((name, t.dtype, t.numel()))
                    if self.poison and name.startswith(("empty", "new_empty")) and t.is_floating_point():
                        t.fill_(float("nan"))
        return out


def _inputs(n, h, v, *, seed, bias=False):
    hidden = randn(n, h, seed=seed, dtype=torch.bfloat16)
    weight = randn(v, h, seed=seed + 1, dtype=torch.bfloat16, scale=h ** -0.5 * 2)
    b = randn(v, seed=seed + 2, dtype=torch.bfloat16) if bias else None
    return hidden, weight, b, rand_labels((n,), v, seed=seed + 3)


def test_the_meter_sees_a_float32_weight_copy():
    """Control: a float32 copy and a [V, H] zeros inside the op's own body are seen."""
    w = torch.zeros(64, 32, dtype=torch.bfloat16)
    with AllocationMeter() as meter:
        w.float(), torch.zeros_like(w)
    assert ("_to_copy", torch.float32, w.numel()) in meter.made
    assert ("zeros_like", torch.bfloat16, w.numel()) in meter.made


@pytest.mark.parametrize("cpu_backend", CPU_BACKENDS)
@pytest.mark.parametrize("frozen", (True, False), ids=("frozen-head", "trained-head"))
def test_no_float32_weight_copy_and_no_gradient_for_a_frozen_head(cpu_backend, frozen):
    n, h, v, chunk = 96, 128, 1031, 16  # V x H is 10x a chunk's logits
    hidden, weight, _, labels = _inputs(n, h, v, seed=4)
    hx = hidden.clone().requires_grad_(True)
    wx = weight.clone().requires_grad_(not frozen)
    with K.use_backend(cpu_backend), AllocationMeter() as meter:
        logp, ent = K.linear_logprobs(hx, wx, labels, chunk_size=chunk, return_entropy=True)
        (logp.sum() + ent.sum()).backward()
    big = [m for m in meter.made if m[2] >= v * h]
    assert not [m for m in big if m[1] == torch.float32], f"float32 [V, H]-sized tensors: {big}"
    if frozen:
        assert not big, f"a frozen head still got a [V, H] tensor: {big}"
        assert wx.grad is None
    else:
        assert big == [("zeros_like", torch.bfloat16, v * h)] and wx.grad.dtype == torch.bfloat16
    f32 = [m for m in meter.made if m[1] == torch.float32]
    assert max(m[2] for m in f32) <= chunk * v, "float32 temporaries beyond one chunk of logits"


@pytest.mark.parametrize("cpu_backend", CPU_BACKENDS)
def test_a_frozen_head_gives_the_same_hidden_gradient(cpu_backend):
    hidden, weight, b, labels = _inputs(50, 64, 777, seed=9, bias=True)
    grads = []
    for trained in (True, False):
        hx = hidden.clone().requires_grad_(True)
        wx, bx = weight.clone().requires_grad_(trained), b.clone().requires_grad_(trained)
        with K.use_backend(cpu_backend):
            K.linear_logprobs(hx, wx, labels, bias=bx, chunk_size=7).sum().backward()
        grads.append(hx.grad)
    assert torch.equal(grads[0], grads[1])


@pytest.mark.parametrize("cpu_backend", CPU_BACKENDS)
@pytest.mark.parametrize("n,h,v,chunk,bias,temperature", [
    (1, 8, 13, None, False, 1.0),
    (37, 24, 1001, 5, True, 0.7),
    (129, 64, 503, 64, False, 1.3),
    (300, 40, 2053, None, True, 1.0),
])
def test_bf16_vs_float64_on_odd_shapes_with_poisoned_outputs(cpu_backend, n, h, v, chunk, bias, temperature):
    hidden, weight, b, labels = _inputs(n, h, v, seed=n + v, bias=bias)
    w1, w2 = randn(n, seed=1), randn(n, seed=2)
    params = [t.clone().requires_grad_(True) for t in (hidden, weight, b) if t is not None]
    with K.use_backend(cpu_backend), AllocationMeter(poison=True) as meter:
        logp, ent = K.linear_logprobs(params[0], params[1], labels, bias=params[2] if bias else None,
                                      temperature=temperature, chunk_size=chunk, return_entropy=True)
        ((logp * w1).sum() + (ent * w2).sum()).backward()
    assert any(m[0].startswith("empty") for m in meter.made)  # the poison reached the op's buffers
    assert logp.dtype == ent.dtype == torch.float32
    outs = {"logp": logp, "entropy": ent, **{f"grad {k}": p.grad for k, p in zip(("hidden", "weight", "bias"), params)}}
    for name, t in outs.items():
        assert torch.isfinite(t).all(), f"{name}: an element was never written (NaN poison left)"
    t_lp, t_ent, t_grads = ref_linear64(hidden, weight, labels, b, temperature, w1, w2)
    b_lp, b_ent, b_grads = baseline_linear(hidden, weight, labels, b, temperature, w1, w2)
    assert_no_worse_than_baseline(logp, b_lp, t_lp, factor=1.5, atol=1e-5, name="logp")
    assert_no_worse_than_baseline(ent, b_ent, t_ent, factor=1.5, atol=1e-5, name="entropy")
    for p, bg, tg, nm in zip(params, b_grads, t_grads, ("hidden", "weight", "bias")):
        assert p.grad.dtype == torch.bfloat16
        assert_no_worse_than_baseline(p.grad, bg, tg, factor=2.0, atol=1e-4, name=f"grad {nm}")
