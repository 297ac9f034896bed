"""The PPO clipped objective with optional KL-to-reference, entropy bonus and clipped value
loss, as one op: the backend computes the loss, its stats and the per-token gradients in a
single pass, so backward is a scale of saved gradients.

Design:
    * The scalar options travel as one :class:`~rlfuse.kernels.ppo_options.PPOLossOptions`,
      validated once here; backends receive it, the custom op (whose schema cannot hold a
      dataclass) receives it packed into one list of floats (``opts.pack()``), so an added
      option changes neither the schema nor the C++/CUDA bindings.
    * Loss aggregation is expressed to the kernels as an optional per-token loss weight
      (``None`` = token mean over the mask): the op computes it from the mask and the row length,
      so kernels never need to know the row structure. Stats are always token means.
    * Checks that read tensor data (mask values) run inside the op, eagerly, so they also hold
      under ``torch.compile(fullgraph=True)``.
"""

from __future__ import annotations

import torch
from torch import Tensor

from . import _validate, dispatch
from .backends import STATS_FIELDS
from .ppo_options import PPOLossOptions


def token_loss_weights(mask: Tensor, row_len: int, opts: PPOLossOptions) -> Tensor | None:
    """Per-token weight of the loss for ``opts.loss_agg`` (``mask`` float 0/1, 1-D, rows of
    ``row_len`` tokens); None for token-mean, which the kernels do from the mask count."""
    if opts.loss_agg == "token-mean":
        return None
    if mask.numel() == 0:
        return mask.clone()
    rows = mask.view(-1, row_len)
    count = rows.sum(-1, keepdim=True)
    if opts.loss_agg == "seq-mean-token-mean":
        per_row = 1.0 / count.clamp_min(1.0)
    else:  # seq-mean-token-sum-norm (Dr. GRPO): a constant length, not the row's own
        per_row = torch.full_like(count, 1.0 / (row_len if opts.loss_agg_norm is None else opts.loss_agg_norm))
    n_rows = (count > 0).sum().clamp_min(1).to(mask.dtype)  # empty rows are not counted
    return (rows * (per_row / n_rows)).reshape(-1).contiguous()


def _ppo_loss_forward(logp, old_logp, advantages, mask, ref_logp, entropy, values, old_values,
                      returns, row_len, options, backend):
    """(loss, stats, grad_logp, grad_entropy, grad_values): the op's body, shared by the custom
    op (traced by torch.compile) and the eager autograd Function."""
    opts = PPOLossOptions.unpack(options)
    _validate.binary_mask(mask, op="ppo_loss")
    as_stored = backend == "cpp" and mask.dtype in (torch.bool, torch.uint8)
    m = mask if as_stored else mask.to(torch.float32)  # cpp reads bytes: no 4-byte float copy
    weight = token_loss_weights(m.to(torch.float32) if as_stored and opts.loss_agg != "token-mean" else m,
                                row_len, opts)
    return dispatch.get(backend).ppo_loss_forward(
        logp, old_logp, advantages, m, ref_logp, entropy, values, old_values, returns, weight, opts)


@torch.library.custom_op("rlfuse::ppo_loss", mutates_args=())
def _ppo_loss_op(logp: Tensor, old_logp: Tensor, advantages: Tensor, mask: Tensor,
                 ref_logp: Tensor | None, entropy: Tensor | None, values: Tensor | None,
                 old_values: Tensor | None, returns: Tensor | None, row_len: int,
                 options: list[float], backend: str) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    return _ppo_loss_forward(logp, old_logp, advantages, mask, ref_logp, entropy, values, old_values,
                             returns, row_len, options, backend)


@_ppo_loss_op.register_fake
def _(logp, old_logp, advantages, mask, ref_logp, entropy, values, old_values, returns, *args):
    def like(t):
        return torch.empty_like(logp) if t is not None else logp.new_empty(0)
    return (logp.new_empty(()), logp.new_empty(len(STATS_FIELDS)), torch.empty_like(logp),
            like(entropy), like(values))


def _setup_context(ctx, inputs, output):
    _loss, _stats, g_logp, g_ent, g_val = output
    ctx.save_for_backward(g_logp, g_ent, g_val)
    ctx.set_materialize_grads(False)  # no zero-filled [N] grads for the unused outputs
    ctx.has_entropy, ctx.has_values = inputs[5] is not None, inputs[6] is not None
    ctx.n_inputs = len(inputs)


def _backward(ctx, grad_loss, _grad_stats, *_unused):
    g_logp, g_ent, g_val = ctx.saved_tensors
    if grad_loss is None:
        grad_loss = torch.zeros((), device=g_logp.device)
    grads = [g_logp * grad_loss, None, None, None, None,
             g_ent * grad_loss if ctx.has_entropy else None, g_val * grad_loss if ctx.has_values else None]
    return (*grads, *([None] * (ctx.n_inputs - len(grads))))


torch.library.register_autograd("rlfuse::ppo_loss", _backward, setup_context=_setup_context)


class _EagerPPOLoss(torch.autograd.Function):
    """The same op for eager calls, without the custom-op dispatcher: its argument binding and
    redispatch cost ~0.3 ms a call on this CPU, a third of the kernel's own time at 1M tokens.
    torch.compile still sees the custom op (``ppo_loss`` picks by ``is_compiling``)."""

    @staticmethod
    def forward(ctx, *inputs):
        out = _ppo_loss_forward(*inputs)
        _setup_context(ctx, inputs, out)
        ctx.mark_non_differentiable(*out[1:])
        return out

    @staticmethod
    def backward(ctx, *grads):
        return _backward(ctx, *grads)


def ppo_loss(logp: Tensor, old_logp: Tensor, advantages: Tensor, mask: Tensor | None = None, *,
             clip_eps: float = 0.2, clip_eps_high: float | None = None, dual_clip: float | None = None,
             ref_logp: Tensor | None = None, kl_coef: float = 0.0, kl_estimator: str = "k3",
             entropy: Tensor | None = None, entropy_coef: float = 0.0, values: Tensor | None = None,
             old_values: Tensor | None = None, returns: Tensor | None = None,
             value_clip: float | None = 0.2, value_coef: float = 0.5,
             loss_agg: str = "token-mean", loss_agg_norm: float | None = None,
             kl_clamp: float | None = None, log_ratio_clamp: float | None = None):
    """PPO loss over the valid tokens of ``mask`` and a dict of detached scalar stats.

    Per token: ratio = exp(logp - old_logp); policy term max(-A*ratio, -A*clip(ratio,
    1-clip_eps, 1+clip_eps_high)); ``dual_clip`` (> 1) caps it at -A*dual_clip where A < 0;
    plus ``kl_coef`` times a KL estimate to ``ref_logp`` (d = logp - ref_logp); minus
    ``entropy_coef*entropy``; plus ``value_coef`` times 0.5*max((v-R)^2, (v_clip-R)^2).
    ``values`` without ``old_values`` gives the plain (unclipped) value loss 0.5*(v-R)^2.

    KL estimators (value; which divergence the GRADIENT of kl_coef*estimator follows):
        k1 = d: zero expected gradient in the loss (use it as a reward penalty instead);
        k2 = d^2/2: gradient d, that of KL(pi||ref);
        k3 = e^-d + d - 1: gradient 1 - e^-d, whose expectation is that of KL(ref||pi);
        k1+ / k3+: the value of k1 / k3 (what stats["kl"] reports) with the gradient of k2,
        i.e. of KL(pi||ref) (straight-through).
    ``kl_clamp`` (> 0): each token's estimate is clamped to [-kl_clamp, kl_clamp], with gradient
    0 where it was clamped (verl and OpenRLHF clamp k3 at 10): one outlier token cannot dominate.
    ``log_ratio_clamp`` (> 0): logp - old_logp is clamped to [-log_ratio_clamp, log_ratio_clamp]
    before the ratio's exp, with gradient 0 where it was clamped (verl clamps at 20), so a stale
    old_logp cannot overflow the ratio; stats["approx_kl"] reads the clamped log-ratio too.

    ``loss_agg`` (rows = the leading dims of ``logp``, tokens = its last dim; rows with no valid
    token are not counted; an all-masked batch gives 0 and zero gradients, never NaN):
        "token-mean": mean over all valid tokens (default);
        "seq-mean-token-mean": each row's token mean, then the mean over rows;
        "seq-mean-token-sum-norm": each row's token sum / ``loss_agg_norm`` (default the row
        length), then the mean over rows (Dr. GRPO).
    The stats are token means over the valid tokens whatever ``loss_agg`` is (stats["loss"] is
    the returned loss). Gradients flow to ``logp``, ``entropy`` and ``values`` only; values at
    masked positions, even inf/NaN, never reach the result.

    ``mask`` must be boolean or hold only 0/1; invalid options or inputs raise ValueError.

    Returns:
        (loss, stats) with stats keys loss, policy_loss, value_loss, kl, entropy, clipfrac,
        approx_kl, each a detached float32 scalar tensor.
    """
    opts = PPOLossOptions(clip_eps=clip_eps, clip_eps_high=clip_eps_high, dual_clip=dual_clip,
                          kl_coef=kl_coef, kl_estimator=kl_estimator, entropy_coef=entropy_coef,
                          value_clip=value_clip, value_coef=value_coef, loss_agg=loss_agg,
                          loss_agg_norm=loss_agg_norm, kl_clamp=kl_clamp,
                          log_ratio_clamp=log_ratio_clamp)
    _validate.floating("logp", logp)
    shape = logp.shape
    named = dict(old_logp=old_logp, advantages=advantages, mask=mask, ref_logp=ref_logp,
                 entropy=entropy, values=values, old_values=old_values, returns=returns)
    for name, t in named.items():
        if name in ("old_logp", "advantages") or (t is not None and name != "mask"):
            _validate.floating(name, t)
        _validate.same_shape(name, t, "logp", shape)
    if mask is not None:
        _validate.mask_dtype("mask", mask)
    _validate.same_device(logp=logp, **named)
    if values is not None and returns is None:
        raise ValueError("values given without returns: the value loss needs both")
    if ref_logp is None and opts.kl_coef != 0.0:
        raise ValueError("kl_coef is non-zero but ref_logp was not given")

    def flat(t):
        return None if t is None else t.reshape(-1).float().contiguous()

    m = (torch.ones(logp.numel(), dtype=torch.bool, device=logp.device) if mask is None
         else mask.reshape(-1).contiguous().detach())
    backend = dispatch.resolve(logp.device, "ppo_loss_forward")
    op = _ppo_loss_op if torch.compiler.is_compiling() else _EagerPPOLoss.apply
    loss, stat_vec, _g, _ge, _gv = op(
        flat(logp), flat(old_logp).detach(), flat(advantages).detach(), m,
        None if ref_logp is None else flat(ref_logp).detach(), flat(entropy), flat(values),
        None if old_values is None else flat(old_values).detach(),
        None if returns is None else flat(returns).detach(),
        shape[-1] if len(shape) else 1, opts.pack(), backend)
    stat_vec = stat_vec.detach()
    stats = {name: stat_vec[i] for i, name in enumerate(STATS_FIELDS)}
    return loss, stats
