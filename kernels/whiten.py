"""Masked whitening of advantages (a handful of reductions: plain PyTorch is already
memory-bound and deterministic here, so every backend shares this one)."""

from __future__ import annotations

import torch
from torch import Tensor

from . import _validate, reference


def masked_whiten(x: Tensor, mask: Tensor | None, *, shift_mean: bool = True, eps: float = 1e-8) -> Tensor:
    """(x - mean) / std over the positions where ``mask`` is true (unbiased variance);
    masked positions are 0. With ``shift_mean=False`` the mean is added back (scale only).
    ``mask`` is bool or only 0/1 (else ValueError); values at masked positions, NaN included,
    never reach the valid ones."""
    _validate.floating("x", x)
    _validate.same_shape("mask", mask, "x", x.shape)
    _validate.same_device(x=x, mask=mask)
    if mask is not None:
        _validate.binary_mask(mask, op="masked_whiten")  # selects, never weights (as gae, ppo_loss)
    # fp16 cannot hold eps (1e-8 rounds to 0, so a zero variance gives inf * 0 = NaN): work in fp32
    xf = x.float() if x.dtype in (torch.float16, torch.bfloat16) else x
    out = reference.masked_whiten(xf, None if mask is None else mask.bool(), shift_mean=shift_mean, eps=eps)
    return out.to(x.dtype)
