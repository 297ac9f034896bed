"""Input checks shared by the public ops. Every failure is a ValueError naming the argument."""

from __future__ import annotations

import os

import torch
from torch import Tensor

_FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


def floating(name: str, x: Tensor) -> None:
    if not isinstance(x, Tensor):
        raise ValueError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if x.dtype not in _FLOAT_DTYPES:
        raise ValueError(f"{name} must be a floating tensor (fp32/fp16/bf16/fp64), got {x.dtype}")


def integer_labels(labels: Tensor, expected_shape, what: str) -> None:
    if not isinstance(labels, Tensor):
        raise ValueError(f"labels must be a torch.Tensor, got {type(labels).__name__}")
    if labels.dtype.is_floating_point or labels.dtype == torch.bool or labels.is_complex():
        raise ValueError(f"labels must be an integer tensor, got {labels.dtype}")
    if tuple(labels.shape) != tuple(expected_shape):
        raise ValueError(f"labels shape {tuple(labels.shape)} does not match {what} {tuple(expected_shape)}")


def same_shape(name: str, x: Tensor | None, ref_name: str, shape) -> None:
    if x is None:
        return
    if not isinstance(x, Tensor):
        raise ValueError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if tuple(x.shape) != tuple(shape):
        raise ValueError(f"{name} shape {tuple(x.shape)} does not match {ref_name} shape {tuple(shape)}")


def same_device(**tensors: Tensor | None) -> None:
    devices = {name: t.device for name, t in tensors.items() if isinstance(t, Tensor)}
    if len(set(devices.values())) > 1:
        raise ValueError(f"all tensors must be on one device, got {devices}")


def unit_interval(name: str, value: float) -> None:
    if not (0.0 <= float(value) <= 1.0):
        raise ValueError(f"{name} must lie in [0, 1], got {value}")


def positive(name: str, value: float) -> None:
    if not float(value) > 0.0:
        raise ValueError(f"{name} must be > 0, got {value}")


def label_range(labels: Tensor, vocab_size: int) -> None:
    """Labels must index the vocabulary. Runs inside the ops (eagerly, also under compile).

    Costs one small reduction and, on a GPU, a sync; RLFUSE_CHECK_LABELS=0 turns it off.
    """
    if labels.numel() == 0 or os.environ.get("RLFUSE_CHECK_LABELS", "1") == "0":
        return
    lo, hi = torch.aminmax(labels)
    lo, hi = int(lo), int(hi)
    if lo < 0 or hi >= vocab_size:
        bad = lo if lo < 0 else hi
        raise ValueError(f"labels must lie in [0, {vocab_size}) (the vocabulary size), found {bad}; "
                         "mask ignored positions (e.g. -100) out before calling")


def mask_dtype(name: str, mask: Tensor) -> None:
    if mask.is_complex():
        raise ValueError(f"{name} must be a bool or 0/1 real tensor, got {mask.dtype}")


def binary_mask(mask: Tensor, name: str = "mask", op: str | None = None) -> None:
    """A mask selects tokens, it does not weight them: bool, or only 0/1 (NaN is refused too).
    Reads the data, so the ops call it inside their custom op (eager, also under compile).
    ``op`` names the op in the message: every op refuses the same masks with the same words."""
    mask_dtype(name, mask)
    if mask.dtype == torch.bool or mask.numel() == 0:
        return
    bad = (mask != 0) & (mask != 1)
    if bool(bad.any()):
        where = f"{op}: " if op else ""
        raise ValueError(f"{where}{name} must be boolean or hold only 0/1 (it selects tokens, it does "
                         f"not weight them), found {mask[bad][0].item()}")
