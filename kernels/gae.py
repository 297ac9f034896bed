"""Generalised advantage estimation over padded batches of sequences.

Rows are sequences, ``mask`` marks the response tokens. Masked positions are skipped (the
recurrence passes through them) so left padding, right padding and holes all give the
advantages of the unpadded row.
"""

from __future__ import annotations

import torch
from torch import Tensor

from . import _validate, dispatch


@torch.library.custom_op("rlfuse::gae", mutates_args=())
def _gae_op(rewards: Tensor, values: Tensor, mask: Tensor, gamma: float, lam: float,
            backend: str) -> tuple[Tensor, Tensor]:
    # the 0/1 check reads data, so it runs here (eager, also under compile) for every backend;
    # backends then only ever see a bool mask
    _validate.binary_mask(mask, op="gae")
    return dispatch.get(backend).gae(rewards, values, mask.bool().contiguous(), gamma, lam)


@_gae_op.register_fake
def _(rewards, values, mask, gamma, lam, backend):
    return torch.empty_like(rewards), torch.empty_like(rewards)


def gae(rewards: Tensor, values: Tensor, mask: Tensor | None = None, *, gamma: float = 1.0,
        lam: float = 0.95):
    """Advantages and returns, float32, shaped like ``rewards`` ([B, T] or [T]).

    delta_t = r_t + gamma * V_next - V_t over valid positions, A_t = delta_t + gamma*lam*A_next,
    the value after a row's last valid token is 0; returns = A + V. Both are 0 where masked.
    No gradient flows (advantages are targets). ``mask`` is bool or only 0/1 (else ValueError);
    rows of zero time steps give empty outputs.
    """
    _validate.floating("rewards", rewards)
    _validate.floating("values", values)
    _validate.same_shape("values", values, "rewards", rewards.shape)
    _validate.same_shape("mask", mask, "rewards", rewards.shape)
    _validate.same_device(rewards=rewards, values=values, mask=mask)
    _validate.unit_interval("gamma", gamma)
    _validate.unit_interval("lam", lam)
    if rewards.dim() not in (1, 2):
        raise ValueError(f"rewards must be [batch, time] or [time], got shape {tuple(rewards.shape)}")
    if mask is not None:
        _validate.mask_dtype("mask", mask)
    squeeze = rewards.dim() == 1
    # explicit row count: reshape(-1, 0) cannot infer the rows of a [B, 0] batch
    rows = (1 if squeeze else rewards.shape[0], rewards.shape[-1])
    r = rewards.detach().float().reshape(rows).contiguous()
    v = values.detach().float().reshape(rows).contiguous()
    m = (torch.ones_like(r, dtype=torch.bool) if mask is None
         else mask.detach().reshape(rows).contiguous())
    backend = dispatch.resolve(r.device, "gae")
    adv, ret = _gae_op(r, v, m, float(gamma), float(lam), backend)
    if squeeze:
        adv, ret = adv[0], ret[0]
    return adv, ret
