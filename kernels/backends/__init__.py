"""Kernel backends. Each is a module with the same functions, called by the public ops in
``rlfuse.kernels`` after validation (shapes, dtypes and label ranges are already checked).

Module attributes:
    AVAILABLE: bool               whether it can run here (compiled extension present, ...)
    UNAVAILABLE_REASON: str       why not, when AVAILABLE is False
    DEVICES: tuple[str, ...]      device types it accepts ("cpu", "cuda")

Functions (all tensors on one device; float outputs are float32):
    logprobs_forward(logits [N, V] (last dim contiguous, any row stride), labels [N] int64,
                     opts, with_entropy)
        -> (logp [N], lse [N] of z, entropy [N] or empty(0)), z = the logits transformed by
        opts (a ``kernels.logprob_options.LogprobOptions``, or a bare float = temperature only)
    logprobs_backward(logits, labels, lse, entropy, grad_logp [N], grad_entropy [N] | None,
                      opts, inplace, out=None)
        -> grad wrt logits (logits' shape and dtype); written into ``logits`` when inplace,
        else into ``out`` when given ([N, V], logits' dtype, contiguous last dim), else fresh.
        -inf logits give probability 0, entropy terms 0·log 0 = 0 and gradient 0, never NaN.
    gae(rewards [B, T] f32, values [B, T] f32, mask [B, T] bool, gamma, lam) -> (adv, ret)
    ppo_loss_forward(logp, old_logp, advantages, mask (f32 0/1), ref_logp, entropy, values,
                     old_values, returns, loss_weight, opts: ppo_options.PPOLossOptions)
        all 1-D contiguous f32, the optional ones None when absent; loss_weight None means
        the token mean over mask, else loss = sum(loss_weight * per-token loss) (0 where
        mask is 0); opts.loss_agg is already expressed by loss_weight
        -> (loss 0-d, stats [7] = STATS_FIELDS token means (stats[0] = loss), grad_logp [N],
            grad_entropy [N] or empty(0), grad_values [N] or empty(0))
        the gradients are of the loss, so backward only scales them by grad_output.

A backend may leave a function out; the dispatcher then falls back to the next one.
"""

STATS_FIELDS = ("loss", "policy_loss", "value_loss", "kl", "entropy", "clipfrac", "approx_kl")
from ..ppo_options import KL_ESTIMATORS  # noqa: E402,F401  (the one code table)
