"""Advantage estimators on the [B, R] response grid.

gae   per-token rewards (k1 KL penalty on every token + the score on the last one), a
      learned value baseline, GAE(gamma, lambda) via K.gae, then masked whitening.
grpo  no critic: a completion's advantage is its score minus its group's mean (n samples of
      the same prompt), divided by ``scale_rewards``: the group's std (DeepSeekMath; Bessel's
      correction, as TRL), the whole batch's std ("batch"), or nothing ("none", Dr. GRPO: the
      std division favours prompts that are nearly solved or unsolved), the same on every token.
rloo  no critic: score minus the mean score of the OTHER n-1 samples of the prompt
      (REINFORCE leave-one-out, Ahmadian et al. 2024), the same on every token.

When the KL is not a loss term, group estimators subtract kl_coef * sum_t k1_t from each
sequence's score before grouping (the KL-shaped sequence reward of RLOO). Scores arrive here
already normalised / penalised / clipped (reward_scale.py), so the KL shaping is on that scale.
"""

from __future__ import annotations

import torch

import rlfuse.kernels as K

from . import distributed as D

from .heads import last_token_index

ESTIMATORS = ("gae", "grpo", "rloo")


def kl_per_token(logp: torch.Tensor, ref_logp: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """k1 estimate log pi - log pi_ref on each response token (0 elsewhere)."""
    return (logp - ref_logp) * mask


def shaped_token_rewards(scores, logp, ref_logp, mask, kl_coef: float) -> torch.Tensor:
    """-kl_coef * k1 on every token, plus the sequence score on its last token."""
    rewards = -kl_coef * kl_per_token(logp, ref_logp, mask)
    last = last_token_index(mask)
    rewards[torch.arange(rewards.shape[0], device=rewards.device), last] += scores.to(rewards.dtype)
    return rewards


def gae_advantages(rewards, values, mask, *, gamma: float = 1.0, lam: float = 0.95, whiten: bool = True):
    advantages, returns = K.gae(rewards, values, mask, gamma=gamma, lam=lam)
    if whiten:
        advantages = D.masked_whiten(advantages, mask) * mask  # global-batch statistics under torchrun
    return advantages, returns


def _groups(scores: torch.Tensor, n_samples: int) -> torch.Tensor:
    if n_samples < 2:
        raise ValueError(f"group advantage estimators need n_samples >= 2 completions per prompt, got {n_samples}")
    if scores.numel() % n_samples:
        raise ValueError(f"{scores.numel()} scores do not split into groups of {n_samples}")
    return scores.view(-1, n_samples)


def grpo_advantages(scores: torch.Tensor, n_samples: int, eps: float = 1e-6, scale: str = "group") -> torch.Tensor:
    g = _groups(scores.float(), n_samples)
    centered = g - g.mean(1, keepdim=True)
    if scale == "group":
        return (centered / (g.std(1, keepdim=True) + eps)).reshape(-1)
    if scale == "batch":  # the std of every score of the global batch (all ranks)
        return (centered / (D.mean_std(g)[1] + eps)).reshape(-1)
    if scale == "none":
        return centered.reshape(-1)
    raise ValueError(f"ppo.scale_rewards: unknown value {scale!r} (use group, batch or none)")


def rloo_advantages(scores: torch.Tensor, n_samples: int) -> torch.Tensor:
    g = _groups(scores.float(), n_samples)
    baseline = (g.sum(1, keepdim=True) - g) / (n_samples - 1)  # mean of the others
    return (g - baseline).reshape(-1)


def compute_advantages(ro, *, estimator: str, n_samples: int, kl_coef: float, kl_in_loss: bool,
                       gamma: float = 1.0, lam: float = 0.95, whiten: bool = True, scale_rewards: str = "group"):
    """(advantages [B, R], returns [B, R] or None) for a scored rollout."""
    mask = ro.response_mask
    coef = 0.0 if kl_in_loss else kl_coef  # in-loss KL is applied by K.ppo_loss instead
    if estimator == "gae":
        if ro.values is None:
            raise ValueError("the gae estimator needs values from the value head")
        rewards = shaped_token_rewards(ro.scores, ro.logp, ro.ref_logp, mask, coef)
        return gae_advantages(rewards, ro.values, mask, gamma=gamma, lam=lam, whiten=whiten)
    if estimator not in ESTIMATORS:
        raise ValueError(f"unknown advantage estimator {estimator!r} (use one of {', '.join(ESTIMATORS)})")
    # coef 0 (KL in the loss): old log-probs are not needed here (they may come from the update's forward)
    seq_reward = ro.scores if coef == 0 else ro.scores - coef * kl_per_token(ro.logp, ro.ref_logp, mask).sum(1)
    if estimator == "grpo":
        return grpo_advantages(seq_reward, n_samples, scale=scale_rewards)[:, None] * mask, None
    return rloo_advantages(seq_reward, n_samples)[:, None] * mask, None
