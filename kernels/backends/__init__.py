"""Kernel backends. Each is a module with the same functions, called by the public ops in
``rlfuse.kernels`` after validation (shapes, dtypes and label ranges are already checked).

Module attributes:
    AVAILABLE: bool               whether it can run here (compiled extension present, ...)
    UNAVAILABLE_REASON: str       why not, when AVAILABLE is False
    DEVICES: tuple[str, ...]      device types it accepts ("cpu", "cuda")

Functions (all tensors on one device; float outputs are float32):
    logprobs_forward(logits [N, V] (last dim contiguous, any row stride), labels [N] int64,
                     temperature, with_entropy)
        -> (logp [N], lse [N] of logits/temperature, entropy [N] or empty(0))
    logprobs_backward(logits, labels, lse, entropy, grad_logp [N], grad_entropy [N] | None,
                      temperature, inplace)
        -> grad wrt logits (logits' shape and dtype); written into ``logits`` when inplace
    gae(rewards [B, T] f32, values [B, T] f32, mask [B, T] bool, gamma, lam) -> (adv, ret)
    ppo_loss_forward(logp, old_logp, advantages, mask (f32 0/1), ref_logp, entropy, values,
                     old_values, returns, *, clip_eps, clip_eps_high, dual_clip, kl_coef,
                     kl_estimator, entropy_coef, value_clip, value_coef)
        all 1-D contiguous f32, the optional ones None when absent
        -> (loss 0-d, stats [7] = STATS_FIELDS token means, grad_logp [N],
            grad_entropy [N] or empty(0), grad_values [N] or empty(0))
        the gradients are of the mean loss, so backward only scales them by grad_output.

A backend may leave a function out; the dispatcher then falls back to the next one.
"""

STATS_FIELDS = ("loss", "policy_loss", "value_loss", "kl", "entropy", "clipfrac", "approx_kl")
KL_ESTIMATORS = ("k1", "k2", "k3")
