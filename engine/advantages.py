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

Estimators live in one registry (``@register_estimator``): each declares its traits, and the
rest of the engine reads those instead of testing an estimator's name. To add one, decorate a
function ``fn(ro, *, n_samples, reward_kl_coef, gamma, lam, whiten, scale_rewards) ->
(advantages [B, R], returns [B, R] or None)`` here (see docs/contributing.md).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

import rlfuse.kernels as K

from . import distributed as D

from .heads import last_token_index



@dataclass(frozen=True)
class Estimator:
    name: str
    fn: Callable
    needs_critic: bool  # learns a value function (value head, ppo.critic), returns are its targets
    grouped: bool       # compares the n_samples completions of a prompt (needs n_samples >= 2)
    kl_in_loss: bool    # default KL placement: a K.ppo_loss term (True) or a k1 penalty in the reward
    loss_agg: str       # default K.ppo_loss aggregation
    scales_rewards: bool = False  # takes ppo.scale_rewards (group | batch | none)


REGISTRY: dict[str, Estimator] = {}


def register_estimator(name: str, *, needs_critic: bool, grouped: bool, kl_in_loss: bool, loss_agg: str,
                       scales_rewards: bool = False):
    def register(fn):
        if name in REGISTRY:
            raise ValueError(f"advantage estimator {name!r} is registered twice")
        REGISTRY[name] = Estimator(name, fn, needs_critic, grouped, kl_in_loss, loss_agg, scales_rewards)
        return fn
    return register


def get_estimator(name: str) -> Estimator:
    """The registered estimator ``name``, or a one-line error naming the key and the choices."""
    try:
        return REGISTRY[name]
    except (KeyError, TypeError):
        raise ValueError(f"ppo.advantage: unknown estimator {name!r} (use one of {', '.join(REGISTRY)})") from None


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


@register_estimator("gae", needs_critic=True, grouped=False, kl_in_loss=False, loss_agg="token-mean")
def _gae(ro, *, n_samples, reward_kl_coef, gamma, lam, whiten, scale_rewards):
    if ro.values is None:
        raise ValueError("the gae estimator needs values from the value head")
    rewards = shaped_token_rewards(ro.scores, ro.logp, ro.ref_logp, ro.response_mask, reward_kl_coef)
    return gae_advantages(rewards, ro.values, ro.response_mask, gamma=gamma, lam=lam, whiten=whiten)


def _sequence_rewards(ro, reward_kl_coef: float) -> torch.Tensor:
    # coef 0 (KL in the loss): old log-probs are not needed here (they may come from the update's forward)
    if reward_kl_coef == 0:
        return ro.scores
    return ro.scores - reward_kl_coef * kl_per_token(ro.logp, ro.ref_logp, ro.response_mask).sum(1)


@register_estimator("grpo", needs_critic=False, grouped=True, kl_in_loss=True, loss_agg="seq-mean-token-mean",
                    scales_rewards=True)
def _grpo(ro, *, n_samples, reward_kl_coef, gamma, lam, whiten, scale_rewards):
    adv = grpo_advantages(_sequence_rewards(ro, reward_kl_coef), n_samples, scale=scale_rewards)
    return adv[:, None] * ro.response_mask, None


@register_estimator("rloo", needs_critic=False, grouped=True, kl_in_loss=False, loss_agg="token-mean")
def _rloo(ro, *, n_samples, reward_kl_coef, gamma, lam, whiten, scale_rewards):
    return rloo_advantages(_sequence_rewards(ro, reward_kl_coef), n_samples)[:, None] * ro.response_mask, None


ESTIMATORS = tuple(REGISTRY)


def compute_advantages(ro, *, estimator: str, n_samples: int, kl_coef: float, kl_in_loss: bool,
                       gamma: float = 1.0, lam: float = 0.95, whiten: bool = True, scale_rewards: str = "group"):
    """(advantages [B, R], returns [B, R] or None) for a scored rollout. The KL goes into the
    reward (k1 penalty, ``kl_coef``) unless ``kl_in_loss``, where K.ppo_loss applies it instead."""
    return get_estimator(estimator).fn(ro, n_samples=n_samples, reward_kl_coef=0.0 if kl_in_loss else kl_coef,
                                       gamma=gamma, lam=lam, whiten=whiten, scale_rewards=scale_rewards)
