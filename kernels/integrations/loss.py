"""A fused LM-head + PPO/GRPO loss as an ``nn.Module``, for any training loop.

    loss_fn = FusedLinearPPOLoss(clip_eps=0.2, kl_coef=0.04, temperature=0.7)
    loss, stats = loss_fn(hidden, model.lm_head.weight, labels, old_logp, advantages, mask)

    loss_fn = FusedLinearGRPOLoss(peer="verl", kl_coef=0.001)   # verl's defaults, one argument

Hidden states go through :func:`rlfuse.kernels.linear_logprobs` (the [tokens, vocab] logits
are never materialised, forward or backward) and the log-probs through
:func:`rlfuse.kernels.ppo_loss`.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

import rlfuse.kernels as _K
from rlfuse.kernels.ppo_options import LOSS_AGGS, PPOLossOptions

__all__ = ["LOSS_AGG_ALIASES", "PEER_PRESETS", "FusedLinearGRPOLoss", "FusedLinearPPOLoss"]

# the peers' names for the kernel's aggregations (TRL / Liger ``loss_type``; verl's are ours)
LOSS_AGG_ALIASES = {"dapo": "token-mean", "bnpo": "token-mean", "grpo": "seq-mean-token-mean",
                    "dr_grpo": "seq-mean-token-sum-norm"}

# rlfuse's own defaults, then what each peer's PPO/GRPO policy loss does by default
_DEFAULTS = dict(clip_eps=0.2, clip_eps_high=None, dual_clip=None, kl_coef=0.0, kl_estimator="k3",
                 entropy_coef=0.0, loss_agg="token-mean", loss_agg_norm=None, kl_clamp=None,
                 log_ratio_clamp=None)
PEER_PRESETS = {
    # core_algos.compute_policy_loss_vanilla: dual clip c = 3 always, log-ratio clamped to +-20;
    # kl_penalty "low_var_kl" (k3, verl's kl_loss_type default) clamped to +-10 (k1/k2 are not)
    "verl": dict(dual_clip=3.0, log_ratio_clamp=20.0, kl_estimator="k3", kl_clamp=10.0),
    # GRPOTrainer: loss_type "dapo" (token mean), k3 without clamps, no dual clip
    "trl": dict(loss_agg="dapo", kl_estimator="k3"),
    # PolicyLoss (no dual clip by default) and compute_approx_kl: k1 by default, every estimate
    # clamped to +-10
    "openrlhf": dict(kl_estimator="k1", kl_clamp=10.0),
}
_UNSET = object()


def _resolve(peer: str | None, given: dict) -> dict:
    if peer is not None and peer not in PEER_PRESETS:
        raise ValueError(f"unknown peer {peer!r}; choose from {sorted(PEER_PRESETS)} or None")
    preset = PEER_PRESETS.get(peer, {})
    out = {k: given[k] if given[k] is not _UNSET else preset.get(k, v) for k, v in _DEFAULTS.items()}
    if peer == "verl" and given["kl_clamp"] is _UNSET and out["kl_estimator"] not in ("k3", "k3+"):
        out["kl_clamp"] = None  # verl clamps only its low_var_kl (k3)
    agg = out["loss_agg"]
    out["loss_agg"] = LOSS_AGG_ALIASES.get(agg, agg)
    if out["loss_agg"] not in LOSS_AGGS:
        raise ValueError(f"unknown loss_agg {agg!r}; choose from {list(LOSS_AGGS)} or the aliases "
                         f"{sorted(LOSS_AGG_ALIASES)}")
    return out


def _row_scale(peer: str | None, loss_agg: str, mask: Tensor) -> Tensor | None:
    """The factor from rlfuse's row aggregation (a mean over the rows holding a valid token) to
    the peer's, or None when they agree: TRL (and Liger) divide by every row of the batch, empty
    ones included; verl's seq-mean-token-sum-norm sums the rows instead of averaging them."""
    if loss_agg == "token-mean" or peer not in ("trl", "verl") or mask.dim() < 2:
        return None
    rows = mask.reshape(-1, mask.shape[-1])
    nonempty = rows.any(-1).sum().to(torch.float32)
    if peer == "trl":
        return nonempty / max(rows.shape[0], 1)
    if loss_agg == "seq-mean-token-sum-norm":  # verl: sum over rows / norm
        return nonempty
    return None


class FusedLinearPPOLoss(nn.Module):
    """Clipped PPO / GRPO policy loss straight from last hidden states and the LM-head weight.

    Args:
        peer: ``"verl"``, ``"trl"`` or ``"openrlhf"`` takes that trainer's defaults for every
            option not passed (see ``PEER_PRESETS`` and docs/integrations.md), including how
            it averages over rows; None (default) takes rlfuse's (``K.ppo_loss``'s).
        clip_eps, clip_eps_high, dual_clip: the PPO clip range (``clip_eps_high`` for
            DAPO-style asymmetric clipping) and the dual-clip cap, as in ``rlfuse.kernels.ppo_loss``.
        kl_coef, kl_estimator, kl_clamp: weight, estimator (k1/k2/k3/k1+/k3+) and clamp of the
            per-token KL to the reference.
        log_ratio_clamp: clamp of ``logp - old_logp`` before the ratio's exp (verl: 20).
        entropy_coef: entropy bonus weight (entropy is computed in the same fused pass).
        loss_agg: ``"token-mean"``, ``"seq-mean-token-mean"``, ``"seq-mean-token-sum-norm"``
            or the peers' names for them: ``"dapo"``/``"bnpo"`` (token mean), ``"grpo"``,
            ``"dr_grpo"``. ``loss_agg_norm``: the constant of the last one (TRL's
            ``max_completion_length``; default the padded row length).
        temperature: the sampling temperature the log-probs are taken at.
        ignore_index: label value that marks positions outside the loss (default ``-100``).
        chunk_size: tokens per chunk of the fused head (default: rlfuse's choice).

    ``forward(hidden, weight, labels, old_logp=None, advantages=..., mask=None, *, bias=None,
    ref_logp=None, ref_hidden=None, ref_weight=None, ref_bias=None, return_logp=False)``:

    * ``hidden`` ``[..., H]`` and ``weight`` ``[V, H]`` (same dtype); ``labels`` ``hidden.shape[:-1]``;
    * ``mask`` defaults to ``labels != ignore_index``; masked labels may hold any value;
    * ``old_logp`` ``None`` means on-policy (ratio 1, the GRPO single-iteration case);
    * ``advantages`` per token (``labels``' shape) or per sequence (``labels.shape[:-1]``,
      broadcast over tokens, as GRPO/RLOO produce);
    * the reference as log-probs (``ref_logp``) or as the reference model's last hidden states
      (``ref_hidden``; the head is ``ref_weight`` / ``ref_bias``, or ``weight`` / ``bias`` when
      ``ref_weight`` is None):
      the fused head then computes the reference log-probs, without gradient;
    * returns ``(loss, stats)`` — the loss aggregated by ``loss_agg`` and detached scalar
      stats — or ``(loss, stats, logp)`` with ``return_logp=True`` (float32, 0 where masked).

    Gradients flow to ``hidden``, ``weight`` and ``bias``.
    """

    def __init__(self, *, peer: str | None = None, clip_eps=_UNSET, clip_eps_high=_UNSET, dual_clip=_UNSET,
                 kl_coef=_UNSET, kl_estimator=_UNSET, entropy_coef=_UNSET, loss_agg=_UNSET,
                 loss_agg_norm=_UNSET, kl_clamp=_UNSET, log_ratio_clamp=_UNSET, temperature: float = 1.0,
                 ignore_index: int = -100, chunk_size: int | None = None):
        super().__init__()
        opts = _resolve(peer, dict(clip_eps=clip_eps, clip_eps_high=clip_eps_high, dual_clip=dual_clip,
                                   kl_coef=kl_coef, kl_estimator=kl_estimator, entropy_coef=entropy_coef,
                                   loss_agg=loss_agg, loss_agg_norm=loss_agg_norm, kl_clamp=kl_clamp,
                                   log_ratio_clamp=log_ratio_clamp))
        self.options = PPOLossOptions(**opts)  # validated here, not at the first forward
        self.peer = peer
        self.temperature, self.ignore_index, self.chunk_size = temperature, ignore_index, chunk_size

    def __getattr__(self, name):  # clip_eps, kl_coef, ... read from the options
        options = self.__dict__.get("options")
        if options is not None and name in _DEFAULTS:
            return getattr(options, name)
        return super().__getattr__(name)

    def _logp(self, hidden, weight, bias, labels, with_entropy):
        return _K.linear_logprobs(hidden, weight, labels, bias=bias, temperature=self.temperature,
                                  return_entropy=with_entropy, chunk_size=self.chunk_size)

    def forward(self, hidden: Tensor, weight: Tensor, labels: Tensor, old_logp: Tensor | None = None,
                advantages: Tensor | None = None, mask: Tensor | None = None, *,
                bias: Tensor | None = None, ref_logp: Tensor | None = None, ref_hidden: Tensor | None = None,
                ref_weight: Tensor | None = None, ref_bias: Tensor | None = None, return_logp: bool = False):
        if advantages is None:
            raise ValueError("advantages are required")
        if ref_logp is not None and ref_hidden is not None:
            raise ValueError("pass the reference as ref_logp or as ref_hidden, not both")
        if ref_hidden is None and (ref_weight is not None or ref_bias is not None):
            raise ValueError("ref_weight / ref_bias are used with ref_hidden only")
        if mask is None:
            mask = labels != self.ignore_index
        mask = mask.bool()
        if tuple(mask.shape) != tuple(labels.shape):
            raise ValueError(f"mask shape {tuple(mask.shape)} does not match labels shape {tuple(labels.shape)}")
        safe_labels = labels.masked_fill(~mask, 0)  # rlfuse needs every label in [0, V)
        o = self.options
        want_entropy = o.entropy_coef != 0.0
        out = self._logp(hidden, weight, bias, safe_labels, want_entropy)
        logp, entropy = out if want_entropy else (out, None)
        if ref_hidden is not None:  # the reference model's head: the policy's unless given
            ref_w, ref_b = (weight, bias) if ref_weight is None else (ref_weight, ref_bias)
            with torch.no_grad():
                ref_logp = self._logp(ref_hidden, ref_w, ref_b, safe_labels, False)
        if advantages.dim() == labels.dim() - 1:
            advantages = advantages.unsqueeze(-1).expand(labels.shape)
        if old_logp is None:
            old_logp = logp.detach()
        loss, stats = _K.ppo_loss(logp, old_logp.float(), advantages.float(), mask,
                                  ref_logp=None if ref_logp is None else ref_logp.float(),
                                  entropy=entropy, values=None, clip_eps=o.clip_eps,
                                  clip_eps_high=o.clip_eps_high, dual_clip=o.dual_clip, kl_coef=o.kl_coef,
                                  kl_estimator=o.kl_estimator, entropy_coef=o.entropy_coef,
                                  loss_agg=o.loss_agg, loss_agg_norm=o.loss_agg_norm, kl_clamp=o.kl_clamp,
                                  log_ratio_clamp=o.log_ratio_clamp)
        scale = _row_scale(self.peer, o.loss_agg, mask)
        if scale is not None:
            loss = loss * scale
            stats = {**stats, "loss": stats["loss"] * scale}
        if return_logp:
            return loss, stats, logp.masked_fill(~mask, 0.0)
        return loss, stats

    def extra_repr(self) -> str:
        o = self.options
        return (f"peer={self.peer!r}, clip_eps={o.clip_eps}, clip_eps_high={o.clip_eps_high}, "
                f"dual_clip={o.dual_clip}, kl_coef={o.kl_coef}, kl_estimator={o.kl_estimator!r}, "
                f"kl_clamp={o.kl_clamp}, log_ratio_clamp={o.log_ratio_clamp}, entropy_coef={o.entropy_coef}, "
                f"loss_agg={o.loss_agg!r}, loss_agg_norm={o.loss_agg_norm}, temperature={self.temperature}")


FusedLinearGRPOLoss = FusedLinearPPOLoss
