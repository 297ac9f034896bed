"""CUDA C++ backend: the kernels of ``csrc/cuda`` through the ``rlfuse.kernels._C_cuda`` extension.

The extension is imported when this module is (the dispatcher imports backends lazily); when it
is missing or no CUDA device is visible, ``AVAILABLE`` is False and ``UNAVAILABLE_REASON`` says
why. All tensors must be on the same CUDA device. Inputs are converted here (dtype, contiguity,
mask type); the extension checks and launches on the current stream.
"""

from __future__ import annotations

import importlib

import torch
from torch import Tensor

DEVICES = ("cuda",)
_KL_CODES = {"k1": 1, "k2": 2, "k3": 3}  # RLFUSE_KL_K* of csrc/cuda/rlfuse_cuda.h
LOGITS_DTYPES = (torch.float32, torch.bfloat16, torch.float16)

_C = None
AVAILABLE = False
UNAVAILABLE_REASON = ""


def _load() -> None:
    global _C, AVAILABLE, UNAVAILABLE_REASON
    try:
        _C = importlib.import_module("rlfuse.kernels._C_cuda")
    except Exception as exc:  # noqa: BLE001 - a missing or broken build only disables this backend
        UNAVAILABLE_REASON = f"rlfuse.kernels._C_cuda did not import ({type(exc).__name__}: {exc})"
        return
    if not torch.cuda.is_available():
        UNAVAILABLE_REASON = "no CUDA device is visible"
        return
    AVAILABLE = True


_load()


def _f32(t: Tensor | None) -> Tensor | None:
    return None if t is None else t.reshape(-1).to(torch.float32).contiguous()


def logprobs_forward(logits: Tensor, labels: Tensor, temperature: float,
                     with_entropy: bool) -> tuple[Tensor, Tensor, Tensor]:
    """(logp, lse, entropy) per row of ``logits`` [N, V]; ``entropy`` is empty unless asked for."""
    logits = _logits_2d(logits)
    return _C.logprobs_forward(logits, labels.reshape(-1).long().contiguous(), float(temperature), bool(with_entropy))


def logprobs_backward(logits: Tensor, labels: Tensor, lse: Tensor, entropy: Tensor, grad_logp: Tensor,
                      grad_entropy: Tensor | None, temperature: float, inplace: bool) -> Tensor:
    """Gradient wrt ``logits`` (same shape and dtype); written into ``logits`` when ``inplace``."""
    if inplace and logits.stride(-1) != 1:
        raise ValueError("in-place backward needs logits with a contiguous last dim")
    logits2d = _logits_2d(logits)
    if inplace and logits2d.data_ptr() != logits.data_ptr():
        raise ValueError("in-place backward needs logits viewable as [N, V]")
    if grad_entropy is not None and entropy.numel() == 0:
        raise ValueError("a gradient for the entropy needs the entropy saved by the forward")
    grad = _C.logprobs_backward(logits2d, labels.reshape(-1).long().contiguous(), _f32(lse),
                                _f32(entropy) if entropy.numel() else entropy, _f32(grad_logp), _f32(grad_entropy),
                                float(temperature), bool(inplace))
    return logits if inplace else grad.view(logits.shape)


def gae(rewards: Tensor, values: Tensor, mask: Tensor | None, gamma: float, lam: float) -> tuple[Tensor, Tensor]:
    """(advantages, returns) of [B, T] float32 rows; masked positions are skipped and set to 0."""
    shape = rewards.shape
    rewards2d = rewards.to(torch.float32).reshape(-1, shape[-1]).contiguous()
    values2d = values.to(torch.float32).reshape(-1, shape[-1]).contiguous()
    mask2d = None if mask is None else mask.reshape(-1, shape[-1]).to(torch.bool).contiguous()
    adv, ret = _C.gae(rewards2d, values2d, mask2d, float(gamma), float(lam))
    return adv.view(shape), ret.view(shape)


def ppo_loss_forward(logp, old_logp, advantages, mask, ref_logp, entropy, values, old_values, returns, *,
                     clip_eps, clip_eps_high, dual_clip, kl_coef, kl_estimator, entropy_coef, value_clip, value_coef
                     ) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Loss, stats [loss, policy_loss, value_loss, kl, entropy, clipfrac, approx_kl] and the
    gradients of the mean loss wrt logp, entropy and values (means divide by max(Σ mask, 1))."""
    if kl_estimator not in _KL_CODES:
        raise ValueError(f"kl_estimator must be one of {sorted(_KL_CODES)}, got {kl_estimator!r}")
    if values is not None and returns is None:
        raise ValueError("values need returns")
    return _C.ppo_loss_forward(
        _f32(logp), _f32(old_logp), _f32(advantages), _f32(mask), _f32(ref_logp), _f32(entropy), _f32(values),
        _f32(old_values), _f32(returns),
        float(clip_eps), float(clip_eps if clip_eps_high is None else clip_eps_high),
        0.0 if dual_clip is None else float(dual_clip),  # the kernel reads <= 0 as "no dual clip"
        float(kl_coef), _KL_CODES[kl_estimator], float(entropy_coef),
        -1.0 if value_clip is None else float(value_clip),  # and < 0 as "no value clipping"
        float(value_coef))


def _logits_2d(logits: Tensor) -> Tensor:
    if logits.dtype not in LOGITS_DTYPES:
        logits = logits.float()
    if logits.dim() != 2:
        logits = logits.reshape(-1, logits.shape[-1])  # a view when the leading dims allow it
    if logits.stride(-1) != 1 and logits.shape[-1] != 1:
        logits = logits.contiguous()
    return logits
