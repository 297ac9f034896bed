"""One exact draw per row from softmax(z / T): inverse-CDF with the row's own uniform.

    token  = the first i whose float64 CDF passes u * total (a zero-probability token, a
             zero-width CDF step, can never be chosen)
    logp   = float32 log-prob of that token under softmax(z / T)

Two implementations of the same draw: the C++ row kernel ``rlfuse.kernels._C.sample_rows``
(csrc/cpu/sample.cpp: max, float64 sum of exp(x - max), then a scan that stops at the target,
with no [B, V] float64 tensors), and the pure-torch one below, used on CUDA, for other dtypes
and when the extension is not built. They agree up to float rounding at exact CDF boundaries.
"""

from __future__ import annotations

import torch

try:
    from rlfuse.kernels import _C
except Exception:  # noqa: BLE001 - missing or broken build: the torch path serves
    _C = None

HAS_KERNEL = _C is not None and hasattr(_C, "sample_rows")


def pick_tokens_torch(z: torch.Tensor, u: torch.Tensor | None,
                      temperature: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """(tokens, log-probs) from logits ``z`` [B, V] at temperature T: inverse CDF (float64
    cumulative sum of the probabilities) with uniforms ``u`` [B], or argmax when ``u`` is None."""
    if temperature != 1.0:  # z / 1 would be a [B, V] copy for nothing
        z = z / temperature
    logp = torch.log_softmax(z, -1)
    if u is None:
        tokens = z.argmax(-1)
    else:
        cdf = logp.double().exp().cumsum(-1)
        # right=True: a zero-probability token (a zero-width CDF step) can never be chosen
        tokens = torch.searchsorted(cdf, (u * cdf[:, -1]).unsqueeze(-1), right=True).squeeze(-1)
        tokens = tokens.clamp_(max=z.shape[-1] - 1)
    return tokens, logp.gather(-1, tokens.unsqueeze(-1)).squeeze(-1)


def pick_tokens(z: torch.Tensor, u: torch.Tensor | None,
                temperature: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`pick_tokens_torch`, through the C++ kernel for float32 CPU logits when it is built."""
    if u is not None and HAS_KERNEL and z.device.type == "cpu" and z.dtype == torch.float32 and z.ndim == 2:
        return _C.sample_rows(z, u.to(torch.float64), float(temperature))
    return pick_tokens_torch(z, u, temperature)
