"""Plain PyTorch statements of every op: the specification the fast backends are tested
against (in float64), written for reading rather than speed. Differentiable by autograd.
"""

from __future__ import annotations

import torch
from torch import Tensor

from . import _validate  # the spec refuses the same inputs as the ops


def logprobs_from_logits(logits: Tensor, labels: Tensor, *, temperature: float = 1.0,
                         return_entropy: bool = False, softcap: float | None = None,
                         logit_scale: float | None = None):
    """log softmax(z)[label], and optionally the entropy of softmax(z), where
    z = softcap·tanh(logits·logit_scale / softcap) / T (each step only when given)."""
    z = logits
    if logit_scale is not None:
        z = z * logit_scale
    if softcap is not None:
        z = softcap * torch.tanh(z / softcap)
    z = z / temperature
    logprobs = torch.log_softmax(z, dim=-1)
    logp = logprobs.gather(-1, labels.unsqueeze(-1)).squeeze(-1)
    if not return_entropy:
        return logp
    # 0·log 0 = 0 for -inf logits; the select goes inside the product so its gradient is 0 too
    finite = torch.where(torch.isneginf(logprobs), torch.zeros_like(logprobs), logprobs)
    entropy = -(logprobs.exp() * finite).sum(-1)
    return logp, entropy


def linear_logprobs(hidden: Tensor, weight: Tensor, labels: Tensor, *, bias: Tensor | None = None,
                    temperature: float = 1.0, return_entropy: bool = False,
                    softcap: float | None = None, logit_scale: float | None = None):
    """The unfused LM head: materialises hidden @ weight.T (the thing the kernels avoid)."""
    logits = hidden @ weight.t()
    if bias is not None:
        logits = logits + bias
    return logprobs_from_logits(logits, labels, temperature=temperature, return_entropy=return_entropy,
                                softcap=softcap, logit_scale=logit_scale)


def gae(rewards: Tensor, values: Tensor, mask: Tensor | None = None, *, gamma: float = 1.0,
        lam: float = 0.95):
    """Generalised advantage estimation, one row at a time over its valid positions only.

    Masked positions are skipped, so a row with padding or holes gives the advantages of the
    same row with those positions removed; the value after a row's last valid token is 0.
    """
    if mask is None:
        mask = torch.ones_like(rewards, dtype=torch.bool)
    _validate.binary_mask(mask, op="gae")
    mask = mask.bool()
    adv = torch.zeros_like(rewards)
    for b in range(rewards.shape[0]):
        idx = mask[b].nonzero().flatten().tolist()
        next_value, next_adv = 0.0, 0.0
        for t in reversed(idx):
            delta = rewards[b, t] + gamma * next_value - values[b, t]
            next_adv = delta + gamma * lam * next_adv
            adv[b, t] = next_adv
            next_value = values[b, t]
    returns = torch.where(mask, adv + values, torch.zeros_like(values))
    return adv, returns


def masked_mean(x: Tensor, mask: Tensor) -> Tensor:
    """Mean over the masked positions; values at masked-out positions (even inf/NaN) are ignored."""
    weight = mask.to(x.dtype)
    return torch.where(mask.bool(), x * weight, 0.0).sum() / weight.sum().clamp_min(1)


def masked_whiten(x: Tensor, mask: Tensor | None, *, shift_mean: bool = True, eps: float = 1e-8):
    """(x - mean) / std over the masked positions (unbiased variance); 0 at masked positions.
    Values at masked positions, even inf/NaN, are ignored (selected out, never multiplied by 0)."""
    if mask is None:
        mask = torch.ones_like(x, dtype=torch.bool)
    _validate.binary_mask(mask, op="masked_whiten")
    mask = mask.bool()
    n = mask.sum().to(x.dtype)
    xv = torch.where(mask, x, 0.0)
    mean = xv.sum() / n.clamp_min(1)
    var = torch.where(mask, (xv - mean) ** 2, 0.0).sum() / (n - 1).clamp_min(1)
    out = (xv - mean) * torch.rsqrt(var + eps)
    if not shift_mean:
        out = out + mean
    return torch.where(mask, out, 0.0)


def kl_penalty(logp: Tensor, ref_logp: Tensor, estimator: str = "k3") -> Tensor:
    """Per-token estimate of KL(policy || reference) from sampled tokens (Schulman's k1/k2/k3).

    "k1+" and "k3+" are straight-through: the value of k1 / k3 with the gradient of k2 (= d).
    """
    d = logp - ref_logp
    k2 = 0.5 * d * d
    if estimator == "k1":
        return d
    if estimator == "k2":
        return k2
    if estimator == "k3":
        return torch.exp(-d) + d - 1
    if estimator in ("k1+", "k3+"):
        value = kl_penalty(logp, ref_logp, estimator[:2]).detach()
        return value + (k2 - k2.detach())
    raise ValueError(f"unknown kl_estimator {estimator!r}; choose from 'k1', 'k2', 'k3', 'k1+', 'k3+'")


def aggregate_loss(per_token: Tensor, mask: Tensor, loss_agg: str = "token-mean",
                   loss_agg_norm: float | None = None) -> Tensor:
    """Reduce per-token losses to one scalar; rows = leading dims, tokens = the last dim.

    token-mean: mean over all valid tokens. seq-mean-token-mean: each row's token mean, then
    the mean over rows. seq-mean-token-sum-norm: each row's token sum / loss_agg_norm (default
    the row length T), then the mean over rows. Rows without a valid token are not counted.
    """
    if loss_agg == "token-mean" or per_token.numel() == 0:
        return masked_mean(per_token, mask)
    t = per_token.shape[-1] if per_token.dim() else 1
    x, m = per_token.reshape(-1, t), mask.reshape(-1, t).bool()
    row_sum = torch.where(m, x, 0.0).sum(-1)
    count = m.sum(-1).to(x.dtype)
    if loss_agg == "seq-mean-token-mean":
        row_loss = row_sum / count.clamp_min(1)
    elif loss_agg == "seq-mean-token-sum-norm":
        row_loss = row_sum / (t if loss_agg_norm is None else loss_agg_norm)
    else:
        raise ValueError(f"unknown loss_agg {loss_agg!r}")
    rows = count > 0
    return torch.where(rows, row_loss, 0.0).sum() / rows.sum().clamp_min(1)


def ppo_loss(logp, old_logp, advantages, mask=None, *, clip_eps=0.2, clip_eps_high=None,
             dual_clip=None, ref_logp=None, kl_coef=0.0, kl_estimator="k3", entropy=None,
             entropy_coef=0.0, values=None, old_values=None, returns=None, value_clip=0.2,
             value_coef=0.5, loss_agg="token-mean", loss_agg_norm=None, kl_clamp=None,
             log_ratio_clamp=None):
    """Clipped PPO objective (+ KL, entropy and clipped value terms), aggregated over mask by
    ``loss_agg`` (see aggregate_loss); the stats are token means whatever loss_agg is.
    ``values`` without ``old_values``: the value loss is not clipped. ``log_ratio_clamp``: the
    log-ratio logp - old_logp is clamped to [-c, c] (gradient 0 outside) before its exp, and the
    approx_kl stat reads the clamped log-ratio too."""
    if mask is None:
        mask = torch.ones_like(logp, dtype=torch.bool)
    high = clip_eps if clip_eps_high is None else clip_eps_high
    old_logp, advantages = old_logp.detach(), advantages.detach()
    log_ratio = logp - old_logp
    if log_ratio_clamp is not None:
        log_ratio = torch.clamp(log_ratio, -log_ratio_clamp, log_ratio_clamp)
    ratio = torch.exp(log_ratio)
    unclipped = -advantages * ratio
    clipped = -advantages * torch.clamp(ratio, 1 - clip_eps, 1 + high)
    pg = torch.where(unclipped >= clipped, unclipped, clipped)
    is_clipped = clipped > unclipped
    if dual_clip is not None:
        cap = -advantages * dual_clip
        pg = torch.where((advantages < 0) & (pg > cap), cap, pg)
    per_token = pg
    zero = torch.zeros_like(logp)
    kl = zero
    if ref_logp is not None:
        kl = kl_penalty(logp, ref_logp.detach(), kl_estimator)
        if kl_clamp is not None:  # the value clamped, its gradient 0 outside [-kl_clamp, kl_clamp]
            kl = torch.clamp(kl, -kl_clamp, kl_clamp)
        per_token = per_token + kl_coef * kl
    ent = zero if entropy is None else entropy
    if entropy is not None:
        per_token = per_token - entropy_coef * entropy
    vf = zero
    if values is not None:
        if returns is None:
            raise ValueError("ppo_loss: values given without returns")
        returns = returns.detach()
        vf = (values - returns) ** 2
        if value_clip is not None and old_values is not None:
            old_values = old_values.detach()
            v_clip = old_values + torch.clamp(values - old_values, -value_clip, value_clip)
            vf_clip = (v_clip - returns) ** 2
            vf = torch.where(vf >= vf_clip, vf, vf_clip)
        vf = 0.5 * vf
        per_token = per_token + value_coef * vf
    log_ratio = log_ratio.detach()
    approx_kl = torch.exp(log_ratio) - 1 - log_ratio

    def mean(x):
        return masked_mean(x, mask)

    loss = aggregate_loss(per_token, mask, loss_agg, loss_agg_norm)
    stats = {
        "loss": loss.detach(),
        "policy_loss": mean(pg).detach(),
        "value_loss": mean(vf).detach(),
        "kl": mean(kl).detach(),
        "entropy": mean(ent).detach(),
        "clipfrac": mean(is_clipped.to(logp.dtype)).detach(),
        "approx_kl": mean(approx_kl).detach(),
    }
    return loss, stats
