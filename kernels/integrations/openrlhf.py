"""OpenRLHF-compatible drop-in (``openrlhf.models.utils.log_probs_from_logits``)."""

from __future__ import annotations

import torch
from torch import Tensor

import rlfuse.kernels as _K

from ._common import check_temperature, exact_logp_entropy

__all__ = ["log_probs_from_logits"]


def log_probs_from_logits(logits: Tensor, labels: Tensor, temperature: float = 1.0) -> Tensor:
    """OpenRLHF's ``log_probs_from_logits``: ``log_softmax(logits / temperature)`` at ``labels``.

    Differences from OpenRLHF, both on the safe side: ``logits`` are never modified
    (OpenRLHF divides them by ``temperature`` in place), and the log-softmax is computed in
    float32 whatever the input dtype (returned in the logits' dtype for fp16/bf16, exactly in
    float64 for float64).
    """
    check_temperature(temperature)
    if logits.dtype == torch.float64:
        return exact_logp_entropy(logits, labels.long(), float(temperature), False)[0]
    logp = _K.logprobs_from_logits(logits, labels, temperature=float(temperature))
    return logp.to(logits.dtype) if logits.dtype in (torch.float16, torch.bfloat16) else logp
