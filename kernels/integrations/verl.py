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

from ._common import as_out_dtype, check_out_dtype, exact_logp_entropy

__all__ = ["compute_gae_advantage_return", "entropy_from_logits", "logprobs_from_logits"]


def logprobs_from_logits(logits: Tensor, labels: Tensor, inplace_backward: bool = True, *,
                         out_dtype: torch.dtype | None = None) -> Tensor:
    """verl's ``logprobs_from_logits``: ``log_softmax(logits)`` at ``labels``, shape ``logits.shape[:-1]``.

    ``labels`` must lie in ``[0, V)``. Computed in float32 by rlfuse and returned in float32
    whatever the logits' dtype, as verl's default GPU path (flash-attn's cross-entropy kernel)
    returns; ``out_dtype=logits.dtype`` gives what verl's torch fallback (no flash-attn) returns
    for fp16/bf16 logits (rounded: less accurate, see docs/integrations.md). float64 logits are
    computed exactly in float64. ``inplace_backward`` is accepted for compatibility and has no
    effect: rlfuse's backward never writes into ``logits`` (so it is always safe to reuse them).
    """
    del inplace_backward
    check_out_dtype(out_dtype)
    if logits.dtype == torch.float64:
        logp = exact_logp_entropy(logits, labels.long(), 1.0, False)[0]
    else:
        logp = _K.logprobs_from_logits(logits, labels)
    return as_out_dtype(logp, torch.float32, out_dtype)


def entropy_from_logits(logits: Tensor, *, out_dtype: torch.dtype | None = None) -> Tensor:
    """verl's ``entropy_from_logits``: entropy of ``softmax(logits)`` per row, computed in float32
    and returned in the logits' dtype, as verl's (plain torch, in the logits' dtype, on every
    path) returns; ``out_dtype=torch.float32`` keeps the float32 result (more accurate). float64
    logits are computed exactly in float64."""
    check_out_dtype(out_dtype)
    zeros = torch.zeros(logits.shape[:-1], dtype=torch.long, device=logits.device)
    if logits.dtype == torch.float64:
        entropy = exact_logp_entropy(logits, zeros, 1.0, True)[1]
    else:
        _, entropy = _K.logprobs_from_logits(logits, zeros, return_entropy=True)
    return as_out_dtype(entropy, logits.dtype, out_dtype)


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
