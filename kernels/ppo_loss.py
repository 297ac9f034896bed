"""The PPO clipped objective with optional KL-to-reference, entropy bonus and clipped value
loss, as one op: the backend computes the loss, its stats and the per-token gradients in a
single pass, so backward is a scale of saved gradients.
"""

from __future__ import annotations

import torch
from torch import Tensor

from . import _validate, dispatch
from .backends import KL_ESTIMATORS, STATS_FIELDS


@torch.library.custom_op("rlfuse::ppo_loss", mutates_args=())
def _ppo_loss_op(logp: Tensor, old_logp: Tensor, advantages: Tensor, mask: Tensor,
                 ref_logp: Tensor | None, entropy: Tensor | None, values: Tensor | None,
                 old_values: Tensor | None, returns: Tensor | None, clip_eps: float,
                 clip_eps_high: float, dual_clip: float | None, kl_coef: float, kl_estimator: str,
                 entropy_coef: float, value_clip: float | None, value_coef: float,
                 backend: str) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    return dispatch.get(backend).ppo_loss_forward(
        logp, old_logp, advantages, mask, ref_logp, entropy, values, old_values, returns,
        clip_eps=clip_eps, clip_eps_high=clip_eps_high, dual_clip=dual_clip, kl_coef=kl_coef,
        kl_estimator=kl_estimator, entropy_coef=entropy_coef, value_clip=value_clip,
        value_coef=value_coef)


@_ppo_loss_op.register_fake
def _(logp, old_logp, advantages, mask, ref_logp, entropy, values, old_values, returns, *args):
    def like(t):
        return torch.empty_like(logp) if t is not None else logp.new_empty(0)
    return (logp.new_empty(()), logp.new_empty(len(STATS_FIELDS)), torch.empty_like(logp),
            like(entropy), like(values))


def _setup_context(ctx, inputs, output):
    _loss, _stats, g_logp, g_ent, g_val = output
    ctx.save_for_backward(g_logp, g_ent, g_val)
    ctx.has_entropy, ctx.has_values = inputs[5] is not None, inputs[6] is not None


def _backward(ctx, grad_loss, _grad_stats, *_unused):
    g_logp, g_ent, g_val = ctx.saved_tensors
    if grad_loss is None:
        grad_loss = torch.zeros((), device=g_logp.device)
    grads = [g_logp * grad_loss, None, None, None, None,
             g_ent * grad_loss if ctx.has_entropy else None, g_val * grad_loss if ctx.has_values else None]
    return (*grads, *([None] * 11))


torch.library.register_autograd("rlfuse::ppo_loss", _backward, setup_context=_setup_context)


def ppo_loss(logp: Tensor, old_logp: Tensor, advantages: Tensor, mask: Tensor | None = None, *,
             clip_eps: float = 0.2, clip_eps_high: float | None = None, dual_clip: float | None = None,
             ref_logp: Tensor | None = None, kl_coef: float = 0.0, kl_estimator: str = "k3",
             entropy: Tensor | None = None, entropy_coef: float = 0.0, values: Tensor | None = None,
             old_values: Tensor | None = None, returns: Tensor | None = None,
             value_clip: float | None = 0.2, value_coef: float = 0.5):
    """Token-mean PPO loss over ``mask`` and a dict of detached scalar stats.

    ratio = exp(logp - old_logp); policy term max(-A*ratio, -A*clip(ratio, 1-clip_eps,
    1+clip_eps_high)); ``dual_clip`` (> 1) caps it at -A*dual_clip where A < 0; KL to
    ``ref_logp`` with estimator k1/k2/k3 times ``kl_coef``; minus ``entropy_coef*entropy``;
    value term 0.5*max((v-R)^2, (v_clip-R)^2) times ``value_coef``. An all-masked batch gives 0.
    Gradients flow to ``logp``, ``entropy`` and ``values`` only.

    Returns:
        (loss, stats) with stats keys policy_loss, value_loss, kl, entropy, clipfrac, approx_kl
        (and loss), each a detached float32 scalar tensor.
    """
    _validate.floating("logp", logp)
    shape = logp.shape
    named = dict(old_logp=old_logp, advantages=advantages, mask=mask, ref_logp=ref_logp,
                 entropy=entropy, values=values, old_values=old_values, returns=returns)
    for name, t in named.items():
        if t is not None and name != "mask":
            _validate.floating(name, t)
        _validate.same_shape(name, t, "logp", shape)
    _validate.same_device(logp=logp, **named)
    if kl_estimator not in KL_ESTIMATORS:
        raise ValueError(f"unknown kl_estimator {kl_estimator!r}; choose from {list(KL_ESTIMATORS)}")
    if clip_eps < 0 or (clip_eps_high is not None and clip_eps_high < 0):
        raise ValueError(f"clip_eps and clip_eps_high must be >= 0, got {clip_eps}, {clip_eps_high}")
    if dual_clip is not None and dual_clip <= 1.0:
        raise ValueError(f"dual_clip must be > 1 (it caps the loss at -A*dual_clip), got {dual_clip}")
    if value_clip is not None and value_clip < 0:
        raise ValueError(f"value_clip must be >= 0 or None, got {value_clip}")
    if values is not None and returns is None:
        raise ValueError("values given without returns: the value loss needs both")
    if ref_logp is None and kl_coef != 0.0:
        raise ValueError("kl_coef is non-zero but ref_logp was not given")

    def flat(t):
        return None if t is None else t.reshape(-1).float().contiguous()

    m = (torch.ones(logp.numel(), dtype=torch.float32, device=logp.device) if mask is None
         else mask.reshape(-1).to(torch.float32).contiguous())
    backend = dispatch.resolve(logp.device, "ppo_loss_forward")
    loss, stat_vec, _g, _ge, _gv = _ppo_loss_op(
        flat(logp), flat(old_logp).detach(), flat(advantages).detach(), m.detach(),
        None if ref_logp is None else flat(ref_logp).detach(), flat(entropy), flat(values),
        None if old_values is None else flat(old_values).detach(),
        None if returns is None else flat(returns).detach(),
        float(clip_eps), float(clip_eps if clip_eps_high is None else clip_eps_high),
        None if dual_clip is None else float(dual_clip), float(kl_coef), kl_estimator,
        float(entropy_coef), None if value_clip is None else float(value_clip), float(value_coef), backend)
    stat_vec = stat_vec.detach()
    stats = {name: stat_vec[i] for i, name in enumerate(STATS_FIELDS)}
    return loss, stats
