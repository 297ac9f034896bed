"""Optimizer for the trainable adapter and head parameters.

On CUDA the default is bitsandbytes' paged 8-bit AdamW: its two moment buffers take a
quarter of fp32 AdamW's memory and page to host RAM under pressure. On CPU (where bnb's
8-bit optimizers do not run) it is torch's AdamW.
"""

from __future__ import annotations

import torch


def make_optimizer(params, *, lr: float, weight_decay: float = 0.0, device: str = "cpu", kind: str = "auto"):
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

        return bnb.optim.PagedAdamW8bit(params, lr=lr, weight_decay=weight_decay)
    if kind == "adamw":
        return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    raise ValueError(f"model.optimizer: unknown optimizer {kind!r} (use auto, adamw or paged_adamw_8bit)")
