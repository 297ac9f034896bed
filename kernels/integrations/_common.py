"""Helpers shared by the drop-ins: argument checks and the float64 escape hatch.

rlfuse's kernels always produce float32 log-probs. A float64 caller (tests, numerics
studies) asked for more precision than that, so float64 logits take an exact float64 path
in plain PyTorch instead of being silently rounded.
"""

from __future__ import annotations

import torch
from torch import Tensor


def check_temperature(temperature: float) -> None:
    if not float(temperature) > 0:
        raise ValueError("temperature must be positive")


def exact_logp_entropy(logits: Tensor, index: Tensor, temperature: float, with_entropy: bool):
    """float64 log softmax(logits / T) at ``index`` (same shape as ``logits.shape[:-1]``)."""
    z = logits / temperature if temperature != 1.0 else logits
    logprobs = torch.log_softmax(z, dim=-1)
    logp = logprobs.gather(-1, index.unsqueeze(-1)).squeeze(-1)
    entropy = -(logprobs.exp() * logprobs).sum(-1) if with_entropy else None
    return logp, entropy
