"""The options of ``K.ppo_loss`` as one immutable object, checked once when it is made.

Every backend receives a :class:`PPOLossOptions`; the C++ and CUDA bindings receive the flat tuple
of :meth:`PPOLossOptions.as_op_args` (the same tuple the ``rlfuse::ppo_loss`` custom op takes,
since torch.library schemas cannot carry a dataclass) and fill their ``rlfuse_ppo_options``
struct from it in one place. "Absent" is ``None`` here and a ``has_*`` flag in C.

The integer codes below are the single table of estimator / aggregation codes: the C header
``csrc/common/ppo_options.h`` and the Triton kernel use these numbers (a test checks the header).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields
from numbers import Real

# in-loss KL estimators, d = logp - ref_logp. "+" = value of k1/k3, gradient of k2 (= d)
KL_CODES = {"k1": 1, "k2": 2, "k3": 3, "k1+": 4, "k3+": 5}
KL_ESTIMATORS = tuple(KL_CODES)
LOSS_AGG_CODES = {"token-mean": 0, "seq-mean-token-mean": 1, "seq-mean-token-sum-norm": 2}
LOSS_AGGS = tuple(LOSS_AGG_CODES)


def _number(name: str, value, *, optional: bool = False) -> float | None:
    if value is None and optional:
        return None
    if isinstance(value, bool) or not isinstance(value, Real):
        kind = "a number or None" if optional else "a number"
        raise ValueError(f"{name} must be {kind}, got {type(value).__name__} {value!r}")
    value = float(value)
    if not math.isfinite(value):
        raise ValueError(f"{name} must be finite, got {value}")
    return value


@dataclass(frozen=True)
class PPOLossOptions:
    """Every scalar option of ``K.ppo_loss`` (meanings in its docstring); validated on creation."""

    clip_eps: float = 0.2
    clip_eps_high: float | None = None  # None: same as clip_eps
    dual_clip: float | None = None      # None: no dual clip
    kl_coef: float = 0.0
    kl_estimator: str = "k3"
    entropy_coef: float = 0.0
    value_clip: float | None = 0.2      # None: no value clipping
    value_coef: float = 0.5
    loss_agg: str = "token-mean"
    loss_agg_norm: float | None = None  # seq-mean-token-sum-norm only; None: the row length

    def __post_init__(self):
        def put(name, value):
            object.__setattr__(self, name, value)

        for name in ("clip_eps", "kl_coef", "entropy_coef", "value_coef"):
            put(name, _number(name, getattr(self, name)))
        for name in ("clip_eps_high", "dual_clip", "value_clip", "loss_agg_norm"):
            put(name, _number(name, getattr(self, name), optional=True))
        if not self.clip_eps > 0:
            raise ValueError(f"clip_eps must be > 0, got {self.clip_eps}")
        if self.clip_eps_high is not None and self.clip_eps_high < 0:
            raise ValueError(f"clip_eps_high must be >= 0 or None, got {self.clip_eps_high}")
        if self.dual_clip is not None and not self.dual_clip > 1.0:
            raise ValueError(f"dual_clip must be > 1 (it caps the loss at -A*dual_clip) or None, got {self.dual_clip}")
        if self.value_clip is not None and self.value_clip < 0:
            raise ValueError(f"value_clip must be >= 0 or None, got {self.value_clip}")
        if self.kl_estimator not in KL_CODES:
            raise ValueError(f"unknown kl_estimator {self.kl_estimator!r}; choose from {list(KL_ESTIMATORS)}")
        if self.loss_agg not in LOSS_AGG_CODES:
            raise ValueError(f"unknown loss_agg {self.loss_agg!r}; choose from {list(LOSS_AGGS)}")
        if self.loss_agg_norm is not None:
            if self.loss_agg != "seq-mean-token-sum-norm":
                raise ValueError(f"loss_agg_norm is only used by loss_agg='seq-mean-token-sum-norm', "
                                 f"not {self.loss_agg!r}")
            if not self.loss_agg_norm > 0:
                raise ValueError(f"loss_agg_norm must be > 0, got {self.loss_agg_norm}")

    @property
    def clip_high(self) -> float:
        """The upper clip width actually used."""
        return self.clip_eps if self.clip_eps_high is None else self.clip_eps_high

    @property
    def kl_code(self) -> int:
        return KL_CODES[self.kl_estimator]

    def as_op_args(self) -> tuple:
        """The options as the flat tuple of the custom op and the C++/CUDA bindings (names as
        strings become their integer codes); :meth:`from_op_args` inverts it."""
        return (self.clip_eps, self.clip_eps_high, self.dual_clip, self.kl_coef, self.kl_code,
                self.entropy_coef, self.value_clip, self.value_coef, LOSS_AGG_CODES[self.loss_agg],
                self.loss_agg_norm)

    @classmethod
    def from_op_args(cls, *args) -> "PPOLossOptions":
        names = [f.name for f in fields(cls)]
        kw = dict(zip(names, args, strict=True))
        kw["kl_estimator"] = KL_ESTIMATORS[list(KL_CODES.values()).index(kw["kl_estimator"])]
        kw["loss_agg"] = LOSS_AGGS[list(LOSS_AGG_CODES.values()).index(kw["loss_agg"])]
        return cls(**kw)
