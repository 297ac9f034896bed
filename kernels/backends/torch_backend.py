"""The always-available backend: the backend interface in plain PyTorch.

Readable and device-agnostic. Log-prob work is done in row chunks so its float32
temporaries stay O(chunk · V) even for bf16 inputs of any length.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .. import reference
from ..logprob_options import LogprobOptions

AVAILABLE = True
DEVICES = ("cpu", "cuda")
_ROW_ELEMENTS = 1 << 22  # float32 temporaries per chunk: 16 MB


def _row_chunks(n_rows: int, n_cols: int):
    step = max(1, _ROW_ELEMENTS // max(n_cols, 1))
    for start in range(0, n_rows, step):
        yield start, min(n_rows, start + step)


def logprobs_forward(logits: Tensor, labels: Tensor, opts, with_entropy: bool):
    opts = LogprobOptions.of(opts)
    n, v = logits.shape
    logp = torch.empty(n, dtype=torch.float32, device=logits.device)
    lse = torch.empty_like(logp)
    entropy = torch.empty_like(logp) if with_entropy else logp.new_empty(0)
    for s, e in _row_chunks(n, v):
        # at most two float32 [chunk, V] temporaries, updated in place
        z = logits[s:e].to(torch.float32, copy=True)
        if not opts.is_plain:
            z = opts.transform(z)
        elif opts.temperature != 1.0:
            z.div_(opts.temperature)
        m = z.amax(-1, keepdim=True)
        z.sub_(m)  # shifted logits z - max
        picked = z.gather(-1, labels[s:e, None]).squeeze(-1)
        p = torch.exp(z) if with_entropy else z.exp_()
        sum_exp = p.sum(-1)
        log_sum = torch.log(sum_exp)
        lse[s:e] = log_sum + m.squeeze(-1)
        logp[s:e] = picked - log_sum
        if with_entropy:
            # H = log S - sum(e^z' z') / S with z' the shifted logits; 0·log 0 = 0 (-inf logits)
            z.masked_fill_(p == 0, 0.0)
            entropy[s:e] = log_sum - z.mul_(p).sum(-1) / sum_exp
        del z, p
    return logp, lse, entropy


def logprobs_backward(logits, labels, lse, entropy, grad_logp, grad_entropy, opts, inplace: bool,
                      out: Tensor | None = None):
    opts = LogprobOptions.of(opts)
    n, v = logits.shape
    out = logits if inplace else (torch.empty_like(logits) if out is None else out)
    for s, e in _row_chunks(n, v):
        x = logits[s:e].to(torch.float32, copy=True)
        log_p, slope = opts.transform_with_slope(x)  # z and dz/dx
        del x
        log_p.sub_(lse[s:e, None])
        # d logp_y / dz = onehot(y) - p ;  d H / dz = -p * (log p + H), 0 where p = 0
        if grad_entropy is None:
            g = log_p.exp_().mul_(-grad_logp[s:e, None])
        else:
            p = torch.exp(log_p)
            coef = log_p.add_(entropy[s:e, None]).mul_(grad_entropy[s:e, None]).add_(grad_logp[s:e, None])
            g = p.mul_(coef.masked_fill_(p == 0, 0.0)).neg_()
            del coef
        g.scatter_add_(-1, labels[s:e, None], grad_logp[s:e, None])
        g.mul_(slope)
        out[s:e] = g
        del g, log_p
    return out


def gae(rewards: Tensor, values: Tensor, mask: Tensor, gamma: float, lam: float):
    """Reverse recurrence vectorised over rows; masked steps carry the state through."""
    adv = torch.zeros_like(rewards)
    next_value = rewards.new_zeros(rewards.shape[0])  # not rewards[:, 0]: T may be 0
    next_adv = torch.zeros_like(next_value)
    for t in range(rewards.shape[1] - 1, -1, -1):
        m = mask[:, t]
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        a = delta + gamma * lam * next_adv
        adv[:, t] = torch.where(m, a, 0.0)
        next_value = torch.where(m, values[:, t], next_value)
        next_adv = torch.where(m, a, next_adv)
    returns = torch.where(mask, adv + values, 0.0)
    return adv, returns


def ppo_loss_forward(logp, old_logp, advantages, mask, ref_logp, entropy, values, old_values,
                     returns, loss_weight, opts):
    """Loss, stats and per-token gradients with the derivatives written out (custom ops run
    below autograd, so the gradient is stated, not traced)."""
    n = mask.sum()
    inv = 1.0 / n.clamp_min(1.0)
    valid = mask != 0  # select, never multiply: padding may hold inf/NaN garbage
    # the weight of each token in the loss (and its gradients); the stats stay token means
    w = mask * inv if loss_weight is None else loss_weight
    zero = torch.zeros_like(logp)
    log_ratio = logp - old_logp
    ratio_stops = None  # where the log-ratio was clamped: d ratio / d logp = 0 (NaN stays NaN)
    if opts.log_ratio_clamp is not None:
        c = opts.log_ratio_clamp
        ratio_stops = (log_ratio > c) | (log_ratio < -c)
        log_ratio = log_ratio.clamp(-c, c)
    ratio = torch.exp(log_ratio)
    a = advantages
    unclipped = -a * ratio
    clipped = -a * ratio.clamp(1 - opts.clip_eps, 1 + opts.clip_high)
    take_unclipped = unclipped >= clipped
    pg = torch.where(take_unclipped, unclipped, clipped)
    d_pg = torch.where(take_unclipped, unclipped, zero)  # d(-A r)/d logp = -A r
    if ratio_stops is not None:
        d_pg = torch.where(ratio_stops, zero, d_pg)
    if opts.dual_clip is not None:
        capped = (a < 0) & (pg > -a * opts.dual_clip)
        pg = torch.where(capped, -a * opts.dual_clip, pg)
        d_pg = torch.where(capped, zero, d_pg)
    total, g_logp = pg, d_pg
    kl = zero
    if ref_logp is not None:
        d = logp - ref_logp
        est = opts.kl_estimator
        if est in ("k1", "k1+"):
            kl, d_kl = d, torch.ones_like(d)
        elif est == "k2":
            kl, d_kl = 0.5 * d * d, d
        else:
            e = torch.exp(-d)
            kl, d_kl = e + d - 1, 1 - e
        if est.endswith("+"):  # straight-through: the value above, the gradient of k2
            d_kl = d
        if opts.kl_clamp is not None:  # clamped value, gradient 0 where clamped (NaN stays NaN)
            outside = (kl > opts.kl_clamp) | (kl < -opts.kl_clamp)
            kl = kl.clamp(-opts.kl_clamp, opts.kl_clamp)
            d_kl = torch.where(outside, zero, d_kl)
        total = total + opts.kl_coef * kl
        g_logp = g_logp + opts.kl_coef * d_kl
    ent = zero if entropy is None else entropy
    if entropy is not None:
        total = total - opts.entropy_coef * entropy
    vf = zero
    g_val = logp.new_empty(0)
    if values is not None:
        err = values - returns
        vf, d_vf = err * err, err
        if opts.value_clip is not None and old_values is not None:
            delta = values - old_values
            err_c = old_values + delta.clamp(-opts.value_clip, opts.value_clip) - returns
            use_unclipped = vf >= err_c * err_c
            inside = (delta.abs() < opts.value_clip).to(err.dtype)
            vf = torch.where(use_unclipped, vf, err_c * err_c)
            d_vf = torch.where(use_unclipped, err, err_c * inside)
        vf = 0.5 * vf
        total = total + opts.value_coef * vf
        g_val = torch.where(valid, opts.value_coef * d_vf * w, 0.0)
    approx_kl = ratio - 1 - log_ratio
    clip_ind = (clipped > unclipped).to(logp.dtype)
    terms = torch.stack([total, pg, vf, kl, ent, clip_ind, approx_kl])
    stat_vec = torch.where(valid, terms * mask, 0.0).sum(-1) * inv
    if loss_weight is not None:
        stat_vec[0] = torch.where(valid, total * loss_weight, 0.0).sum()
    g_logp = torch.where(valid, g_logp * w, 0.0)
    g_ent = -opts.entropy_coef * w if entropy is not None else logp.new_empty(0)
    return stat_vec[0].clone(), stat_vec, g_logp, g_ent, g_val
