"""OpenRLHF-compatible drop-in (``openrlhf.models.utils.log_probs_from_logits``)."""

from __future__ import annotations

import torch
from torch import Tensor

import rlfuse.kernels as _K

from ._common import as_out_dtype, check_out_dtype, check_temperature, exact_logp_entropy

__all__ = ["log_probs_from_logits"]


def log_probs_from_logits(logits: Tensor, labels: Tensor, temperature: float = 1.0, *,
                          out_dtype: torch.dtype | None = None) -> Tensor:
    """OpenRLHF's ``log_probs_from_logits``: ``log_softmax(logits / temperature)`` at ``labels``.

    Returned in the logits' dtype, as OpenRLHF's returns (float32 for float32 logits, its
    flash-attn path; fp16/bf16 for fp16/bf16, its row-wise log-softmax), but computed in
    float32 whatever the input: ``out_dtype=torch.float32`` keeps that (more accurate, see
    docs/integrations.md). float64 logits are computed exactly in float64. Unlike OpenRLHF's,
    ``logits`` are never modified (OpenRLHF divides them by ``temperature`` in place).
    """
    check_temperature(temperature)
    check_out_dtype(out_dtype)
    if logits.dtype == torch.float64:
        logp = exact_logp_entropy(logits, labels.long(), float(temperature), False)[0]
    else:
        logp = _K.logprobs_from_logits(logits, labels, temperature=float(temperature))
    return as_out_dtype(logp, logits.dtype, out_dtype)
