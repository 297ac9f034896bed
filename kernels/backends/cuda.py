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

from rlfuse.kernels.logprob_options import LogprobOptions  # absolute: tests load this file standalone

DEVICES = ("cuda",)
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


def logprobs_forward(logits: Tensor, labels: Tensor, opts, with_entropy: bool) -> tuple[Tensor, Tensor, Tensor]:
    """(logp, lse, entropy) per row of ``logits`` [N, V]; ``entropy`` is empty unless asked for."""
    opts = LogprobOptions.of(opts)
    logits = _logits_2d(logits)
    return _C.logprobs_forward(logits, labels.reshape(-1).long().contiguous(), opts.temperature,
                               bool(with_entropy), opts.softcap, opts.logit_scale)


def logprobs_backward(logits: Tensor, labels: Tensor, lse: Tensor, entropy: Tensor, grad_logp: Tensor,
                      grad_entropy: Tensor | None, opts, inplace: bool, out: Tensor | None = None) -> Tensor:
    """Gradient wrt ``logits`` (same shape and dtype); written into ``logits`` when ``inplace``,
    else into ``out`` when given."""
    opts = LogprobOptions.of(opts)
    if inplace and logits.stride(-1) != 1:
        raise ValueError("in-place backward needs logits with a contiguous last dim")
    logits2d = _logits_2d(logits)
    if inplace and logits2d.data_ptr() != logits.data_ptr():
        raise ValueError("in-place backward needs logits viewable as [N, V]")
    if grad_entropy is not None and entropy.numel() == 0:
        raise ValueError("a gradient for the entropy needs the entropy saved by the forward")
    if out is not None and (inplace or out.dtype != logits2d.dtype or out.dim() != 2):
        out = None  # written fresh, copied below
    grad = _C.logprobs_backward(logits2d, labels.reshape(-1).long().contiguous(), _f32(lse),
                                _f32(entropy) if entropy.numel() else entropy, _f32(grad_logp), _f32(grad_entropy),
                                opts.temperature, bool(inplace), opts.softcap, opts.logit_scale, out)
    if inplace:
        return logits
    return grad.view(logits.shape)


def gae(rewards: Tensor, values: Tensor, mask: Tensor | None, gamma: float, lam: float) -> tuple[Tensor, Tensor]:
    """(advantages, returns) of [B, T] float32 rows; masked positions are skipped and set to 0."""
    shape = rewards.shape
    rows = (shape[0] if rewards.dim() == 2 else 1, shape[-1])  # reshape(-1, 0) fails for T = 0
    rewards2d = rewards.to(torch.float32).reshape(rows).contiguous()
    values2d = values.to(torch.float32).reshape(rows).contiguous()
    mask2d = None if mask is None else mask.reshape(rows).to(torch.bool).contiguous()
    adv, ret = _C.gae(rewards2d, values2d, mask2d, float(gamma), float(lam))
    return adv.view(shape), ret.view(shape)


def ppo_loss_forward(logp, old_logp, advantages, mask, ref_logp, entropy, values, old_values, returns,
                     loss_weight, opts) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Loss, stats [loss, policy_loss, value_loss, kl, entropy, clipfrac, approx_kl] and the
    gradients of the loss wrt logp, entropy and values (means divide by max(Σ mask, 1))."""
    if values is not None and returns is None:
        raise ValueError("values need returns")
    return _C.ppo_loss_forward(
        _f32(logp), _f32(old_logp), _f32(advantages), _f32(mask), _f32(ref_logp), _f32(entropy), _f32(values),
        _f32(old_values), _f32(returns), _f32(loss_weight), opts.pack())


def _logits_2d(logits: Tensor) -> Tensor:
    if logits.dtype not in LOGITS_DTYPES:
        logits = logits.float()
    if logits.dim() != 2:
        logits = logits.reshape(-1, logits.shape[-1])  # a view when the leading dims allow it
    if logits.stride(-1) != 1 and logits.shape[-1] != 1:
        logits = logits.contiguous()
    return logits
