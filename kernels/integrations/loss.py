"""A fused LM-head + PPO/GRPO loss as an ``nn.Module``, for any training loop.

    loss_fn = FusedLinearPPOLoss(clip_eps=0.2, kl_coef=0.04, temperature=0.7)
    loss, stats = loss_fn(hidden, model.lm_head.weight, labels, old_logp, advantages, mask)

Hidden states go through :func:`rlfuse.kernels.linear_logprobs` (the [tokens, vocab] logits
are never materialised, forward or backward) and the log-probs through
:func:`rlfuse.kernels.ppo_loss`.
"""

from __future__ import annotations

from torch import Tensor, nn

import rlfuse.kernels as _K

__all__ = ["FusedLinearGRPOLoss", "FusedLinearPPOLoss"]


class FusedLinearPPOLoss(nn.Module):
    """Clipped PPO / GRPO policy loss straight from last hidden states and the LM-head weight.

    Args:
        clip_eps, clip_eps_high, dual_clip: the PPO clip range (``clip_eps_high`` for
            DAPO-style asymmetric clipping) and the dual-clip cap, as in ``rlfuse.kernels.ppo_loss``.
        kl_coef, kl_estimator: weight and estimator (k1/k2/k3) of the KL to ``ref_logp``.
        entropy_coef: entropy bonus weight (entropy is computed in the same fused pass).
        temperature: the sampling temperature the log-probs are taken at.
        ignore_index: label value that marks positions outside the loss (default ``-100``).
        chunk_size: tokens per chunk of the fused head (default: rlfuse's choice).

    ``forward(hidden, weight, labels, old_logp=None, advantages=..., mask=None, *, bias=None,
    ref_logp=None, return_logp=False)``:

    * ``hidden`` ``[..., H]`` and ``weight`` ``[V, H]`` (same dtype); ``labels`` ``hidden.shape[:-1]``;
    * ``mask`` defaults to ``labels != ignore_index``; masked labels may hold any value;
    * ``old_logp`` ``None`` means on-policy (ratio 1, the GRPO single-iteration case);
    * ``advantages`` per token (``labels``' shape) or per sequence (``labels.shape[:-1]``,
      broadcast over tokens, as GRPO/RLOO produce);
    * returns ``(loss, stats)`` — token mean over ``mask`` and detached scalar stats — or
      ``(loss, stats, logp)`` with ``return_logp=True`` (float32, 0 where masked).

    Gradients flow to ``hidden``, ``weight`` and ``bias``.
    """

    def __init__(self, *, clip_eps: float = 0.2, clip_eps_high: float | None = None,
                 dual_clip: float | None = None, kl_coef: float = 0.0, kl_estimator: str = "k3",
                 entropy_coef: float = 0.0, temperature: float = 1.0, ignore_index: int = -100,
                 chunk_size: int | None = None):
        super().__init__()
        self.clip_eps, self.clip_eps_high, self.dual_clip = clip_eps, clip_eps_high, dual_clip
        self.kl_coef, self.kl_estimator, self.entropy_coef = kl_coef, kl_estimator, entropy_coef
        self.temperature, self.ignore_index, self.chunk_size = temperature, ignore_index, chunk_size

    def forward(self, hidden: Tensor, weight: Tensor, labels: Tensor, old_logp: Tensor | None = None,
                advantages: Tensor | None = None, mask: Tensor | None = None, *,
                bias: Tensor | None = None, ref_logp: Tensor | None = None, return_logp: bool = False):
        if advantages is None:
            raise ValueError("advantages are required")
        if mask is None:
            mask = labels != self.ignore_index
        mask = mask.bool()
        if tuple(mask.shape) != tuple(labels.shape):
            raise ValueError(f"mask shape {tuple(mask.shape)} does not match labels shape {tuple(labels.shape)}")
        safe_labels = labels.masked_fill(~mask, 0)  # rlfuse needs every label in [0, V)
        want_entropy = self.entropy_coef != 0.0
        out = _K.linear_logprobs(hidden, weight, safe_labels, bias=bias, temperature=self.temperature,
                                 return_entropy=want_entropy, chunk_size=self.chunk_size)
        logp, entropy = out if want_entropy else (out, None)
        if advantages.dim() == labels.dim() - 1:
            advantages = advantages.unsqueeze(-1).expand(labels.shape)
        if old_logp is None:
            old_logp = logp.detach()
        loss, stats = _K.ppo_loss(logp, old_logp.float(), advantages.float(), mask,
                                  clip_eps=self.clip_eps, clip_eps_high=self.clip_eps_high,
                                  dual_clip=self.dual_clip,
                                  ref_logp=None if ref_logp is None else ref_logp.float(),
                                  kl_coef=self.kl_coef,
                                  kl_estimator=self.kl_estimator, entropy=entropy,
                                  entropy_coef=self.entropy_coef, values=None)
        if return_logp:
            return loss, stats, logp.masked_fill(~mask, 0.0)
        return loss, stats

    def extra_repr(self) -> str:
        return (f"clip_eps={self.clip_eps}, clip_eps_high={self.clip_eps_high}, dual_clip={self.dual_clip}, "
                f"kl_coef={self.kl_coef}, kl_estimator={self.kl_estimator!r}, "
                f"entropy_coef={self.entropy_coef}, temperature={self.temperature}")


FusedLinearGRPOLoss = FusedLinearPPOLoss
