"""Optimizer for the trainable adapter and head parameters.

On CUDA the default is bitsandbytes' paged 8-bit AdamW: its two moment buffers take a
quarter of fp32 AdamW's memory and page to host RAM under pressure. On CPU (where bnb's
8-bit optimizers do not run) it is torch's AdamW.
"""

from __future__ import annotations

import math

import torch


def make_optimizer(params, *, lr: float, weight_decay: float = 0.0, device: str = "cpu", kind: str = "auto",
                   eps: float = 1e-8):
    """``params``: a list of parameters, or of param groups ``{"params": [...], "lr": ...}``
    (e.g. the value head with its own learning rate); frozen parameters are dropped."""
    params = list(params)
    if params and isinstance(params[0], dict):
        groups = [{**g, "params": [p for p in g["params"] if p.requires_grad]} for g in params]
        params = [g for g in groups if g["params"]]
    else:
        params = [p for p in params if p.requires_grad]
    if not params:
        raise ValueError("no trainable parameters for the optimizer")
    if kind == "auto":
        kind = "paged_adamw_8bit" if str(device).startswith("cuda") else "adamw"
    if kind == "paged_adamw_8bit":
        import bitsandbytes as bnb

        return bnb.optim.PagedAdamW8bit(params, lr=lr, weight_decay=weight_decay, eps=eps)
    if kind == "adamw":
        return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay, eps=eps)
    raise ValueError(f"model.optimizer: unknown optimizer {kind!r} (use auto, adamw or paged_adamw_8bit)")


def lr_factor(schedule: str, step: int, total: int, warmup: int = 0) -> float:
    """The learning-rate multiplier of (0-based) step ``step`` of ``total``: a linear warm-up from
    0 over ``warmup`` steps, then constant, linear decay to 0, or half a cosine to 0 (the
    conventions of transformers' get_*_schedule_with_warmup). A pure function of the step, so a
    resumed run continues on the same curve with nothing extra to checkpoint."""
    if step < warmup:
        return step / max(1, warmup)
    if schedule == "constant":
        return 1.0
    progress = (step - warmup) / max(1, total - warmup)
    if schedule == "linear":
        return max(0.0, 1.0 - progress)
    if schedule == "cosine":
        return max(0.0, 0.5 * (1.0 + math.cos(math.pi * progress)))
    raise ValueError(f"unknown lr_schedule {schedule!r} (use constant, linear or cosine)")


def apply_lr_schedule(optimizer, factor: float) -> None:
    """Every param group's lr = its base lr (the one it was built with) x ``factor``."""
    for group in optimizer.param_groups:
        group.setdefault("base_lr", group["lr"])
        group["lr"] = group["base_lr"] * factor


def gradient_step(optimizer, params, loss, *, max_grad_norm: float, check_update=None, drop=()):
    """The one gradient step of every stage: reduce -> clip -> non-finite guard -> step.

    Gradients are summed over data-parallel ranks (each rank's loss already carries its share
    of the global normaliser); ``drop``: parameters whose gradients are discarded first (the
    policy during critic warm-up: AdamW leaves a parameter without a gradient where it is);
    ``check_update(loss, grad_norm)`` (``Stage.check_update``) may refuse a non-finite update.
    Returns (gradient norm, whether the optimizer stepped)."""
    from . import distributed as D

    D.reduce_gradients(params)
    for p in drop:
        p.grad = None
    grad_norm = D.clip_grad_norm_(params, max_grad_norm)
    if check_update is not None and not check_update(loss, grad_norm):
        return grad_norm, False
    optimizer.step()
    return grad_norm, True
