"""verl-compatible drop-ins (``verl.utils.torch_functional`` / ``verl.trainer.ppo.core_algos``).

Same names, signatures and return conventions as verl, computed by rlfuse's kernels::

    from rlfuse.integrations.verl import logprobs_from_logits, compute_gae_advantage_return
    log_prob = logprobs_from_logits(logits, responses)                      # [B, T]
    adv, ret = compute_gae_advantage_return(token_level_rewards, values, response_mask,
                                            gamma=1.0, lam=0.95)
"""

from __future__ import annotations

import torch
from torch import Tensor

import rlfuse.kernels as _K

from ._common import exact_logp_entropy

__all__ = ["compute_gae_advantage_return", "entropy_from_logits", "logprobs_from_logits"]

_LOW_PRECISION = (torch.float16, torch.bfloat16)


def logprobs_from_logits(logits: Tensor, labels: Tensor, inplace_backward: bool = True) -> Tensor:
    """verl's ``logprobs_from_logits``: ``log_softmax(logits)`` at ``labels``, shape ``logits.shape[:-1]``.

    ``labels`` must lie in ``[0, V)``. Computed in float32 by rlfuse and returned in the
    logits' dtype for fp16/bf16 (as verl does), float32 for fp32, and exactly in float64 for
    float64. ``inplace_backward`` is accepted for compatibility and has no effect: rlfuse's
    backward never writes into ``logits`` (so it is always safe to reuse them).
    """
    del inplace_backward
    if logits.dtype == torch.float64:
        return exact_logp_entropy(logits, labels.long(), 1.0, False)[0]
    logp = _K.logprobs_from_logits(logits, labels)
    return logp.to(logits.dtype) if logits.dtype in _LOW_PRECISION else logp


def entropy_from_logits(logits: Tensor) -> Tensor:
    """verl's ``entropy_from_logits``: entropy of ``softmax(logits)`` per row, in the logits' dtype
    for fp16/bf16 (computed in float32), float32 otherwise (float64 for float64)."""
    if logits.dtype == torch.float64:
        zeros = torch.zeros(logits.shape[:-1], dtype=torch.long, device=logits.device)
        return exact_logp_entropy(logits, zeros, 1.0, True)[1]
    zeros = torch.zeros(logits.shape[:-1], dtype=torch.long, device=logits.device)
    _, entropy = _K.logprobs_from_logits(logits, zeros, return_entropy=True)
    return entropy.to(logits.dtype) if logits.dtype in _LOW_PRECISION else entropy


def compute_gae_advantage_return(token_level_rewards: Tensor, values: Tensor, response_mask: Tensor,
                                 gamma, lam):
    """verl's GAE estimator: ``(advantages, returns)``, advantages whitened over ``response_mask``.

    Matches current verl (the version that skips masked "observation" tokens) position for
    position, including masked ones:

    * the recurrence runs over the positions where ``response_mask`` is set; masked positions
      are passed through (their value and TD error are skipped), the value after a row's last
      response token is 0 — this is :func:`rlfuse.kernels.gae`;
    * at a masked position the un-whitened advantage is that of the next response token in the
      row (0 after the last one), as verl's carried ``lastgaelam`` gives;
    * ``returns = advantages + values`` (before whitening, at every position);
    * ``advantages`` are whitened with the mean and unbiased variance over the mask,
      ``(A - mean) * rsqrt(var + 1e-8)``, applied at every position (mask the result yourself,
      as verl's losses do).

    Like verl's ``masked_whiten`` it raises ``ValueError`` when the mask holds 0 or 1 tokens.
    Computed in float32 (rlfuse's GAE kernel); returned in the promoted dtype of ``rewards`` and
    ``values``. No gradient flows. ``gamma``/``lam`` may be floats or 0-d tensors.
    """
    mask = response_mask.bool()
    n = int(mask.sum())
    if n == 0:
        raise ValueError("At least one element in the mask has to be 1.")
    if n == 1:
        raise ValueError("The sum of the mask is one, which can cause a division by zero.")
    gamma, lam = float(gamma), float(lam)
    out_dtype = torch.promote_types(token_level_rewards.dtype, values.dtype)
    with torch.no_grad():
        adv, _ = _K.gae(token_level_rewards, values, mask, gamma=gamma, lam=lam)  # 0 where masked
        # carry: a masked position takes the advantage of the next response token of its row
        length = adv.shape[-1]
        pos = torch.arange(length, device=adv.device).expand_as(mask)
        next_valid = torch.where(mask, pos, length).flip(-1).cummin(-1).values.flip(-1)
        carried = adv.gather(-1, next_valid.clamp(max=length - 1))
        adv = torch.where(next_valid < length, carried, adv.new_zeros(()))
        returns = adv + values.detach().float()
        m = mask.float()
        mean = (adv * m).sum() / n
        var = ((adv - mean).square() * m).sum() / (n - 1)
        advantages = (adv - mean) * torch.rsqrt(var + 1e-8)
    return advantages.to(out_dtype), returns.to(out_dtype)
