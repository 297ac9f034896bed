"""Plain PyTorch statements of every op: the specification the fast backends are tested
against (in float64), written for reading rather than speed. Differentiable by autograd.
"""

from __future__ import annotations

import torch
from torch import Tensor


def logprobs_from_logits(logits: Tensor, labels: Tensor, *, temperature: float = 1.0,
                         return_entropy: bool = False):
    """log softmax(logits / T)[label], and optionally the entropy of softmax(logits / T)."""
    z = logits / temperature
    logprobs = torch.log_softmax(z, dim=-1)
    logp = logprobs.gather(-1, labels.unsqueeze(-1)).squeeze(-1)
    if not return_entropy:
        return logp
    entropy = -(logprobs.exp() * logprobs).sum(-1)
    return logp, entropy


def linear_logprobs(hidden: Tensor, weight: Tensor, labels: Tensor, *, bias: Tensor | None = None,
                    temperature: float = 1.0, return_entropy: bool = False):
    """The unfused LM head: materialises hidden @ weight.T (the thing the kernels avoid)."""
    logits = hidden @ weight.t()
    if bias is not None:
        logits = logits + bias
    return logprobs_from_logits(logits, labels, temperature=temperature, return_entropy=return_entropy)


def gae(rewards: Tensor, values: Tensor, mask: Tensor | None = None, *, gamma: float = 1.0,
        lam: float = 0.95):
    """Generalised advantage estimation, one row at a time over its valid positions only.

    Masked positions are skipped, so a row with padding or holes gives the advantages of the
    same row with those positions removed; the value after a row's last valid token is 0.
    """
    if mask is None:
        mask = torch.ones_like(rewards, dtype=torch.bool)
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
    """(x - mean) / std over the masked positions (unbiased variance); 0 at masked positions."""
    if mask is None:
        mask = torch.ones_like(x, dtype=torch.bool)
    m = mask.to(x.dtype)
    n = m.sum()
    mean = (x * m).sum() / n.clamp_min(1)
    var = (((x - mean) ** 2) * m).sum() / (n - 1).clamp_min(1)
    out = (x - mean) * torch.rsqrt(var + eps)
    if not shift_mean:
        out = out + mean
    return out * m


def kl_penalty(logp: Tensor, ref_logp: Tensor, estimator: str = "k3") -> Tensor:
    """Per-token estimate of KL(policy || reference) from sampled tokens (Schulman's k1/k2/k3)."""
    d = logp - ref_logp
    if estimator == "k1":
        return d
    if estimator == "k2":
        return 0.5 * d * d
    if estimator == "k3":
        return torch.exp(-d) + d - 1
    raise ValueError(f"unknown kl_estimator {estimator!r}; choose from 'k1', 'k2', 'k3'")


def ppo_loss(logp, old_logp, advantages, mask=None, *, clip_eps=0.2, clip_eps_high=None,
             dual_clip=None, ref_logp=None, kl_coef=0.0, kl_estimator="k3", entropy=None,
             entropy_coef=0.0, values=None, old_values=None, returns=None, value_clip=0.2,
             value_coef=0.5):
    """Clipped PPO objective (+ KL, entropy and clipped value terms), token mean over mask."""
    if mask is None:
        mask = torch.ones_like(logp, dtype=torch.bool)
    high = clip_eps if clip_eps_high is None else clip_eps_high
    old_logp, advantages = old_logp.detach(), advantages.detach()
    ratio = torch.exp(logp - old_logp)
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
    log_ratio = (logp - old_logp).detach()
    approx_kl = torch.exp(log_ratio) - 1 - log_ratio

    def mean(x):
        return masked_mean(x, mask)

    loss = mean(per_token)
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
