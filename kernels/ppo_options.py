"""The options of ``K.ppo_loss`` as one immutable object, checked once when it is made: the one
table of the op's options.

Every Python backend receives a :class:`PPOLossOptions`. What crosses the C boundary is ONE
object, :meth:`PPOLossOptions.pack`: a list of floats, two slots (present, value) per field in
field order, which the ``rlfuse::ppo_loss`` custom op (a torch.library schema cannot carry a
dataclass), the C++ and the CUDA bindings pass on unchanged. The C side of the table (the codes,
the ``rlfuse_ppo_options`` struct and the function that unpacks the list into it) is generated
from this class into the marked block of ``csrc/common/ppo_options.h``::

    python -m rlfuse.kernels.ppo_options --write   # after adding or changing a field

and a test fails while the header is stale. So a new option is a field here (+ its check), its
maths in each backend, and nothing in the schema or the bindings. "Absent" is ``None`` here and
a ``has_*`` flag of 0 in C.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields
from numbers import Real
from pathlib import Path

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
    kl_clamp: float | None = None       # each token's KL estimate clamped to [-kl_clamp, kl_clamp]
                                        # (gradient 0 where clamped; verl and OpenRLHF clamp k3 at 10)
    log_ratio_clamp: float | None = None  # logp - old_logp clamped to [-c, c] before the ratio's exp
                                          # (gradient 0 where clamped; verl clamps at 20)

    def __post_init__(self):
        def put(name, value):
            object.__setattr__(self, name, value)

        for name in ("clip_eps", "kl_coef", "entropy_coef", "value_coef"):
            put(name, _number(name, getattr(self, name)))
        for name in ("clip_eps_high", "dual_clip", "value_clip", "loss_agg_norm", "kl_clamp", "log_ratio_clamp"):
            put(name, _number(name, getattr(self, name), optional=True))
        if not self.clip_eps > 0:
            raise ValueError(f"clip_eps must be > 0, got {self.clip_eps}")
        if self.clip_eps_high is not None and self.clip_eps_high < 0:
            raise ValueError(f"clip_eps_high must be >= 0 or None, got {self.clip_eps_high}")
        if self.dual_clip is not None and not self.dual_clip > 1.0:
            raise ValueError(f"dual_clip must be > 1 (it caps the loss at -A*dual_clip) or None, got {self.dual_clip}")
        if not self.value_coef >= 0:  # a negative weight would train the critic away from the returns
            raise ValueError(f"value_coef must be >= 0, got {self.value_coef}")
        if self.value_clip is not None and self.value_clip < 0:
            raise ValueError(f"value_clip must be >= 0 or None, got {self.value_clip}")
        if self.kl_clamp is not None and not self.kl_clamp > 0:
            raise ValueError(f"kl_clamp must be > 0 or None, got {self.kl_clamp}")
        if self.log_ratio_clamp is not None and not self.log_ratio_clamp > 0:
            raise ValueError(f"log_ratio_clamp must be > 0 or None, got {self.log_ratio_clamp}")
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

    def pack(self) -> list[float]:
        """The options as one flat list: slots 2i, 2i+1 = (present, value) of field i; a name
        becomes its integer code. :meth:`unpack` (Python) and ``rlfuse_ppo_options_unpack`` (C)
        invert it."""
        out: list[float] = []
        for f in fields(self):
            value = getattr(self, f.name)
            if f.name in CODES:
                value = CODES[f.name][value]
            out += [0.0, 0.0] if value is None else [1.0, float(value)]
        return out

    @classmethod
    def unpack(cls, packed) -> "PPOLossOptions":
        packed = list(packed)
        if len(packed) != 2 * len(fields(cls)):
            raise ValueError(f"packed PPO options: {len(packed)} slots, expected {2 * len(fields(cls))}")
        kw = {}
        for i, f in enumerate(fields(cls)):
            present, value = packed[2 * i], packed[2 * i + 1]
            if f.name in CODES:
                names = {code: name for name, code in CODES[f.name].items()}
                kw[f.name] = names.get(int(value), int(value))  # an unknown code fails validation
            else:
                kw[f.name] = value if present else None
        return cls(**kw)

    @classmethod
    def slot(cls, name: str) -> int:
        """Index of field ``name``'s value in :meth:`pack`'s list (its presence flag is one before)."""
        return 2 * [f.name for f in fields(cls)].index(name) + 1


# fields whose values are names, crossing the C boundary as these integer codes
CODES = {"kl_estimator": KL_CODES, "loss_agg": LOSS_AGG_CODES}
_CODE_PREFIX = {"kl_estimator": "RLFUSE_KL_", "loss_agg": "RLFUSE_AGG_"}
HEADER = Path(__file__).resolve().parent.parent / "csrc" / "common" / "ppo_options.h"
BEGIN, END = "// BEGIN GENERATED from kernels/ppo_options.py", "// END GENERATED"


def _c_name(prefix: str, name: str) -> str:
    return prefix + name.upper().replace("+", "_PLUS").replace("-", "_")


def c_table() -> str:
    """The C side of the table: codes, the struct (fields in table order) and its unpacker."""
    lines = [BEGIN, "// (python -m rlfuse.kernels.ppo_options --write; do not edit by hand)"]
    for field_name, codes in CODES.items():
        items = ", ".join(f"{_c_name(_CODE_PREFIX[field_name], k)} = {v}" for k, v in codes.items())
        lines.append(f"enum {{ {items} }};  // {field_name}")
    n_slots = 2 * len(fields(PPOLossOptions))
    lines += [f"enum {{ RLFUSE_PPO_OPTION_SLOTS = {n_slots} }};  // len(PPOLossOptions().pack())", "",
              "typedef struct rlfuse_ppo_options {"]
    unpack = []
    for i, f in enumerate(fields(PPOLossOptions)):
        if f.name in CODES:
            lines.append(f"  int {f.name};  // {_CODE_PREFIX[f.name]}*")
            unpack.append(f"  o.{f.name} = (int)v[{2 * i + 1}];")
        elif "None" in str(f.type):
            lines += [f"  int has_{f.name};  // 0: None", f"  float {f.name};"]
            unpack += [f"  o.has_{f.name} = v[{2 * i}] != 0.0;", f"  o.{f.name} = (float)v[{2 * i + 1}];"]
        else:
            lines.append(f"  float {f.name};")
            unpack.append(f"  o.{f.name} = (float)v[{2 * i + 1}];")
    lines += ["} rlfuse_ppo_options;", "",
              "// the list of PPOLossOptions.pack() (RLFUSE_PPO_OPTION_SLOTS doubles) as the struct",
              "static inline rlfuse_ppo_options rlfuse_ppo_options_unpack(const double* v) {",
              "  rlfuse_ppo_options o;", *unpack, "  return o;", "}", END]
    return "\n".join(lines)


def header_with_table(text: str) -> str:
    """``text`` (the header) with its generated block replaced by :func:`c_table`."""
    start, stop = text.index(BEGIN), text.index(END) + len(END)
    return text[:start] + c_table() + text[stop:]


if __name__ == "__main__":
    import sys

    current = HEADER.read_text()
    fresh = header_with_table(current)
    if "--write" in sys.argv[1:]:
        HEADER.write_text(fresh)
        print(f"wrote {HEADER}")
    else:
        sys.exit(0 if fresh == current else f"{HEADER} is stale: run python -m rlfuse.kernels.ppo_options --write")
