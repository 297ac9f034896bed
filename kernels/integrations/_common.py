"""Helpers shared by the drop-ins: argument checks, the float64 escape hatch and the output
dtype policy (docs/integrations.md, "Output dtypes").

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


def check_out_dtype(out_dtype) -> None:
    if out_dtype is not None and not (isinstance(out_dtype, torch.dtype) and out_dtype.is_floating_point):
        raise ValueError(f"out_dtype must be a floating torch.dtype or None, got {out_dtype!r}")


def as_out_dtype(t: Tensor, peer_default: torch.dtype, out_dtype: torch.dtype | None) -> Tensor:
    """``t`` (computed in float32, or float64 for float64 logits) in the dtype the drop-in returns:
    ``out_dtype`` when given, else what the replaced function returns on the peer's default path
    (``peer_default``); float64 results stay float64 unless ``out_dtype`` says otherwise."""
    want = out_dtype if out_dtype is not None else (t.dtype if t.dtype == torch.float64 else peer_default)
    return t if t.dtype == want else t.to(want)
