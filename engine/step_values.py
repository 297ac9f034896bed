"""The values one PPO iteration passes forward, each frozen and each made by one function:

    Sampled      rollout.sample_completions   ids, masks, texts, truncated, the sampler's log-probs
      -> Scored      rollout.score            + reference log-probs, raw scores, and the old log-probs,
                                                entropies and values (or None: "from the update's
                                                own forward", see update_plan.reuses_forward)
      -> UpdateBatch make_update_batch        + scaled scores, advantages, returns, and where the
                                                KL goes (reward penalty or loss term), decided here once

No step writes into an earlier value: a stage that needs something new makes the next value.
(``rollout.Rollout`` is the mutable record of scripts and tests; ``score_rollout`` fills it.)

Layout (P = longest prompt, R = longest completion): ``input_ids`` [B, P + R] is the left-padded
prompt then the completion, right-padded after its EOS; every [B, R] field lives on the
completion grid and is 0 past a row's tokens.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch

from .advantages import compute_advantages


@dataclass(frozen=True)
class Sampled:
    input_ids: torch.Tensor       # [B, P + R]
    attention_mask: torch.Tensor  # [B, P + R]
    prompt_len: int
    response_mask: torch.Tensor   # [B, R] float: 1 on completion tokens, up to and including the first EOS
    prompts: list[str]            # the raw prompts (what a reward_fn sees)
    completions: list[str]
    truncated: torch.Tensor       # [B] bool: no EOS within max_new_tokens (cut, not finished)
    sample_logp: torch.Tensor | None = None  # [B, R] the sampler's own log-probs

    def __len__(self) -> int:
        return self.input_ids.shape[0]

    @property
    def labels(self) -> torch.Tensor:
        return self.input_ids[:, self.prompt_len:]


@dataclass(frozen=True)
class Scored(Sampled):
    ref_logp: torch.Tensor | None = None  # [B, R]
    scores: torch.Tensor | None = None    # [B] raw sequence rewards (reward model or reward_fn)
    logp: torch.Tensor | None = None      # [B, R] old log-probs; None: the update's forward gives them
    entropy: torch.Tensor | None = None   # [B, R], None with logp
    values: torch.Tensor | None = None    # [B, R] the critic's, None without one


@dataclass(frozen=True)
class UpdateBatch(Scored):
    """``scores`` here are the scaled ones the advantages were made from; ``raw_scores`` as scored."""

    raw_scores: torch.Tensor | None = None
    advantages: torch.Tensor | None = None  # [B, R]
    returns: torch.Tensor | None = None     # [B, R] value targets, None without a critic
    loss_kl_coef: float = 0.0               # K.ppo_loss's KL coefficient (0 when the KL is in the reward)

    @classmethod
    def of(cls, scored, advantages: torch.Tensor, returns: torch.Tensor | None, *,
           loss_kl_coef: float = 0.0) -> "UpdateBatch":
        """An update batch from any scored record (a ``Scored`` or a ``Rollout``) and its advantages."""
        base = {f.name: getattr(scored, f.name, None) for f in dataclasses.fields(Scored)}
        return cls(**base, raw_scores=base["scores"], advantages=advantages, returns=returns,
                   loss_kl_coef=float(loss_kl_coef))


def make_update_batch(scored: Scored, c, *, scaler, kl_coef: float) -> UpdateBatch:
    """Scale the raw scores (normalise -> missing-EOS penalty -> clip, ``reward_scale.py``), place
    the KL (``c.kl_in_loss``: a K.ppo_loss term with ``kl_coef``; else a k1 penalty in the reward)
    and compute the advantages of ``c.advantage``."""
    scaled = dataclasses.replace(scored, scores=scaler(scored.scores, scored.truncated))
    advantages, returns = compute_advantages(scaled, estimator=c.advantage, n_samples=c.n_samples, kl_coef=kl_coef,
                                             kl_in_loss=c.kl_in_loss, gamma=c.gamma, lam=c.lam,
                                             whiten=c.whiten_advantages, scale_rewards=c.scale_rewards)
    batch = UpdateBatch.of(scaled, advantages, returns, loss_kl_coef=kl_coef if c.kl_in_loss else 0.0)
    return dataclasses.replace(batch, raw_scores=scored.scores)
