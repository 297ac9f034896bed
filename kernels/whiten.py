"""Masked whitening of advantages (a handful of reductions: plain PyTorch is already
memory-bound and deterministic here, so every backend shares this one)."""

from __future__ import annotations

from torch import Tensor

from . import _validate, reference


def masked_whiten(x: Tensor, mask: Tensor | None, *, shift_mean: bool = True, eps: float = 1e-8) -> Tensor:
    """(x - mean) / std over the positions where ``mask`` is true (unbiased variance);
    masked positions are 0. With ``shift_mean=False`` the mean is added back (scale only)."""
    _validate.floating("x", x)
    _validate.same_shape("mask", mask, "x", x.shape)
    _validate.same_device(x=x, mask=mask)
    return reference.masked_whiten(x, None if mask is None else mask.bool(), shift_mean=shift_mean, eps=eps)
