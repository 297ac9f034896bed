"""The options of the log-prob ops, carried as one frozen value from the public op to every
backend kernel (so a new option is not retyped in a dozen signatures).

Each logit x becomes, in this order (the LM heads of Cohere/Granite, then Gemma-2/3):

    z = x · logit_scale                 (logit_scale: finite, nonzero; 1 = off)
    z = softcap · tanh(z / softcap)     (softcap: finite, > 0; None = off)
    z = z / temperature                 (temperature: finite, > 0)

and the ops return log softmax(z)[label] and the entropy of softmax(z).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass(frozen=True)
class LogprobOptions:
    temperature: float = 1.0
    softcap: float | None = None
    logit_scale: float = 1.0

    def __post_init__(self):
        t, c, s = self.temperature, self.softcap, self.logit_scale
        if not (isinstance(t, (int, float)) and math.isfinite(t) and t > 0):
            raise ValueError(f"temperature must be a finite number > 0, got {t!r}")
        if c is not None and not (isinstance(c, (int, float)) and math.isfinite(c) and c > 0):
            raise ValueError(f"softcap must be None or a finite number > 0, got {c!r}")
        if not (isinstance(s, (int, float)) and math.isfinite(s) and s != 0):
            raise ValueError(f"logit_scale must be a finite nonzero number, got {s!r}")

    @classmethod
    def create(cls, temperature=1.0, softcap=None, logit_scale=None) -> "LogprobOptions":
        """From the public ops' keyword arguments (``logit_scale=None`` means 1)."""
        for name, value in (("temperature", temperature), ("softcap", softcap), ("logit_scale", logit_scale)):
            if isinstance(value, bool) or (value is not None and not isinstance(value, (int, float))):
                raise ValueError(f"{name} must be a number, got {type(value).__name__} {value!r}")
        return cls(float(temperature), None if softcap is None else float(softcap),
                   1.0 if logit_scale is None else float(logit_scale))

    @classmethod
    def of(cls, options: "LogprobOptions | float") -> "LogprobOptions":
        """Backends accept the options or, for temperature-only calls, a bare temperature."""
        return options if isinstance(options, LogprobOptions) else cls(float(options))

    # The one place the options cross the torch.library boundary (custom ops take scalars).
    def as_args(self) -> tuple[float, float | None, float]:
        return self.temperature, self.softcap, self.logit_scale

    @property
    def inv_temperature(self) -> float:
        return 1.0 / self.temperature

    @property
    def is_plain(self) -> bool:
        """Only a temperature: z = x / temperature."""
        return self.softcap is None and self.logit_scale == 1.0

    def transform(self, x: Tensor) -> Tensor:
        """z from the logits x (float32 or float64), as differentiable torch ops."""
        z = x * self.logit_scale if self.logit_scale != 1.0 else x
        if self.softcap is not None:
            z = torch.tanh(z / self.softcap) * self.softcap
        return z / self.temperature if self.temperature != 1.0 else z

    def transform_with_slope(self, x: Tensor) -> tuple[Tensor, Tensor | float]:
        """(z, dz/dx) for the hand-written backward of the torch backend (x float32, not modified)."""
        scale_t = self.logit_scale / self.temperature
        if self.softcap is None:
            return x * scale_t, scale_t
        t = torch.tanh(x * (self.logit_scale / self.softcap))
        z = t * (self.softcap / self.temperature)
        return z, t.square_().neg_().add_(1.0).mul_(scale_t)
