"""Backend choice: available_backends, use_backend, RLFUSE_BACKEND, auto."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

import rlfuse.kernels as K
from rlfuse.kernels import dispatch
from rlfuse.kernels.backends import torch_backend

CPU = torch.device("cpu")


def _small_logprobs():
    return K.logprobs_from_logits(torch.randn(3, 5), torch.tensor([0, 1, 4]))


def test_torch_always_available():
    names = K.available_backends()
    assert "torch" in names
    assert set(names) <= {"torch", "cpp", "triton", "cuda"}
    reasons = K.unavailable_reasons()
    assert all(isinstance(v, str) and v for v in reasons.values())
    assert not (set(reasons) & set(names))


def test_unknown_backend_name():
    with pytest.raises(ValueError, match="unknown backend"):
        with K.use_backend("nope"):
            pass


def test_use_backend_nests_and_restores(monkeypatch):
    monkeypatch.setenv("RLFUSE_BACKEND", "auto")
    assert K.current_backend() == "auto"
    with K.use_backend("torch"):
        assert K.current_backend() == "torch"
        with K.use_backend("auto"):
            assert K.current_backend() == "auto"
        assert K.current_backend() == "torch"
    assert K.current_backend() == "auto"


def test_env_var_is_honoured_per_call(monkeypatch):
    calls = []
    real = torch_backend.logprobs_forward
    monkeypatch.setattr(torch_backend, "logprobs_forward",
                        lambda *a, **k: calls.append(1) or real(*a, **k))
    monkeypatch.setenv("RLFUSE_BACKEND", "torch")
    assert K.current_backend() == "torch" and dispatch.resolve(CPU, "logprobs_forward") == "torch"
    _small_logprobs()
    assert calls, "RLFUSE_BACKEND=torch did not route the op to the torch backend"
    monkeypatch.setenv("RLFUSE_BACKEND", "nope")  # read per call: the next call sees it
    with pytest.raises(ValueError, match="unknown backend"):
        _small_logprobs()
    with K.use_backend("torch"):  # use_backend wins over the environment
        _small_logprobs()


def test_env_var_in_fresh_process():
    code = ("import torch, rlfuse.kernels as K; from rlfuse.kernels import dispatch;"
            "print(K.current_backend(), dispatch.resolve(torch.device('cpu'), 'gae'))")
    env = {**__import__("os").environ, "RLFUSE_BACKEND": "torch"}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.split() == ["torch", "torch"]


def test_forcing_unavailable_backend_raises():
    missing = [n for n in ("cpp", "triton", "cuda") if n not in K.available_backends()]
    if not missing:
        pytest.skip("every backend is available here")
    for name in missing:
        with K.use_backend(name):
            with pytest.raises(RuntimeError, match=f"{name}.*not available"):
                _small_logprobs()


def test_forcing_backend_without_device_support_raises():
    """A GPU-only backend forced on CPU tensors raises instead of silently falling back."""
    for name in K.available_backends():
        if "cpu" not in getattr(dispatch.get(name), "DEVICES", ("cpu",)):
            with K.use_backend(name), pytest.raises(RuntimeError, match="cannot run"):
                _small_logprobs()
            return
    pytest.skip("no available backend is GPU-only here")


def test_auto_on_cpu(monkeypatch):
    monkeypatch.delenv("RLFUSE_BACKEND", raising=False)
    expected = "cpp" if "cpp" in K.available_backends() else "torch"
    for op in ("logprobs_forward", "gae", "ppo_loss_forward"):
        got = dispatch.resolve(CPU, op)
        if expected == "cpp" and not hasattr(dispatch.get("cpp"), op):
            expected_op = "torch"  # cpp leaves this op out: auto falls back
        else:
            expected_op = expected
        assert got == expected_op, f"auto picked {got!r} for {op} on CPU"
    with K.use_backend("auto"):
        assert dispatch.resolve(CPU, "logprobs_forward") in ("cpp", "torch")


def test_backends_agree_with_each_other():
    """Every available CPU backend gives (nearly) the same answers as torch on one input set."""
    torch.manual_seed(0)
    logits, labels = torch.randn(4, 6, 33), torch.randint(0, 33, (4, 6))
    r, v, m = torch.randn(4, 9), torch.randn(4, 9), torch.rand(4, 9) > 0.3
    with K.use_backend("torch"):
        ref_lp = K.logprobs_from_logits(logits, labels, return_entropy=True)
        ref_gae = K.gae(r, v, m, gamma=0.9, lam=0.8)
    for name in K.available_backends():
        if "cpu" not in getattr(dispatch.get(name), "DEVICES", ("cpu",)):
            continue
        with K.use_backend(name):
            lp = K.logprobs_from_logits(logits, labels, return_entropy=True)
            adv = K.gae(r, v, m, gamma=0.9, lam=0.8)
        for a, b in zip((*lp, *adv), (*ref_lp, *ref_gae)):
            torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5, msg=lambda s: f"{name}: {s}")
