"""The C++ CPU backend: thin wrappers over ``rlfuse.kernels._C`` (sources in ``csrc/cpu/``).

Row kernels for log-probs (online log-sum-exp forward, one-pass backward, optionally in
place), a per-row reverse scan for GAE, and a one-pass PPO loss that writes the loss, its
stats and the per-token gradients together. Parallel over rows / fixed token blocks with
OpenMP; reductions use a fixed blocking so results are bitwise identical for any thread count.
"""

from __future__ import annotations

from torch import Tensor

from ..logprob_options import LogprobOptions

try:
    from .. import _C
except Exception as exc:  # noqa: BLE001 - missing or broken build: the backend is just absent
    _C = None
    AVAILABLE = False
    UNAVAILABLE_REASON = f"rlfuse.kernels._C could not be imported ({type(exc).__name__}: {exc}); " \
                         "build it with `pip install --no-build-isolation -e .`"
else:
    AVAILABLE = True
    UNAVAILABLE_REASON = ""

DEVICES = ("cpu",)


def _rows(logits: Tensor) -> Tensor:
    return logits if logits.shape[-1] <= 1 or logits.stride(-1) == 1 else logits.contiguous()


def logprobs_forward(logits: Tensor, labels: Tensor, opts, with_entropy: bool):
    opts = LogprobOptions.of(opts)
    return _C.logprobs_forward(_rows(logits), labels, opts.temperature, bool(with_entropy),
                               opts.softcap, opts.logit_scale)


def logprobs_backward(logits, labels, lse, entropy, grad_logp, grad_entropy, opts, inplace: bool,
                      out: Tensor | None = None):
    opts = LogprobOptions.of(opts)
    if inplace and logits.shape[-1] > 1 and logits.stride(-1) != 1:
        raise ValueError("in-place logprobs_backward needs logits with a contiguous last dim")
    if grad_entropy is None or entropy is None or entropy.numel() == 0:
        entropy, grad_entropy = None, None
    return _C.logprobs_backward(_rows(logits), labels, lse, entropy, grad_logp, grad_entropy,
                                opts.temperature, bool(inplace), opts.softcap, opts.logit_scale,
                                None if inplace else out)


def gae(rewards: Tensor, values: Tensor, mask: Tensor, gamma: float, lam: float):
    return _C.gae(rewards, values, mask, float(gamma), float(lam))


def ppo_loss_forward(logp, old_logp, advantages, mask, ref_logp, entropy, values, old_values,
                     returns, loss_weight, opts):
    return tuple(_C.ppo_loss_forward(logp, old_logp, advantages, mask, ref_logp, entropy, values,
                                     old_values, returns, loss_weight, opts.pack()))


__all__ = ["AVAILABLE", "UNAVAILABLE_REASON", "DEVICES", "logprobs_forward", "logprobs_backward",
           "gae", "ppo_loss_forward"]
