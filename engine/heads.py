"""Scalar heads read one number off the backbone's last hidden state.

The value head reads every response position of the policy's forward (so one pass
gives log-probs and values); the reward head reads the last real token of a sequence
scored with the ``reward`` adapter. Both are a single fp32 ``nn.Linear(H, 1)``.

PPO starts its value head at zero (``zero_()``) or as a copy of the reward head: a random
head's first value estimates are noise of the same size as the returns, and the value
loss it causes pulls the shared backbone away from the policy's optimum.
"""

from __future__ import annotations

import math

import torch
from torch import nn


class ScalarHead(nn.Module):
    def __init__(self, hidden_size: int):
        super().__init__()
        self.proj = nn.Linear(hidden_size, 1)
        nn.init.normal_(self.proj.weight, std=1.0 / math.sqrt(hidden_size + 1))
        nn.init.zeros_(self.proj.bias)

    @torch.no_grad()
    def zero_(self) -> "ScalarHead":
        nn.init.zeros_(self.proj.weight)
        nn.init.zeros_(self.proj.bias)
        return self

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        # hidden may be bf16 from a quantized base; the head and its output stay fp32
        return self.proj(hidden.to(self.proj.weight.dtype)).squeeze(-1)


def last_token_index(attention_mask: torch.Tensor) -> torch.Tensor:
    """Index of the last real token in each row, for left, right or no padding."""
    T = attention_mask.shape[1]
    positions = torch.arange(T, device=attention_mask.device).expand_as(attention_mask)
    return torch.where(attention_mask.bool(), positions, torch.full_like(positions, -1)).max(dim=1).values.clamp(min=0)


def gather_last(x: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """x[b, last_token_index[b]] for x of shape [B, T] or [B, T, H]."""
    idx = last_token_index(attention_mask)
    return x[torch.arange(x.shape[0], device=x.device), idx]
