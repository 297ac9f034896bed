"""What a benchmark is: the op spec every ``bench_<op>.py`` fills in.

Each benchmark module defines one :class:`OpBench` subclass instance called ``BENCH``: its
size presets, its implementations (rlfuse first, then the baselines and the external
peers), how to build inputs, how to run one implementation forward or forward+backward,
the bytes (and FLOPs) the op must move at a size (its roofline floor, see ``roofline.py``)
and its :class:`Target` s. Measuring lives in ``measure.py``, the verdicts in ``analysis.py``.
"""

from __future__ import annotations

import contextlib
import importlib
import math
import re
from dataclasses import dataclass

OPS = ("logprobs", "linear_logprobs", "gae", "ppo_loss", "ppo_step")
# benchmarks with their own command line, dispatched by ``rlfuse bench --ops NAME``: op -> module
COMMAND_OPS = {"generate": "rlfuse.benchmarks.bench_generate", "e2e": "rlfuse.benchmarks.bench_e2e"}
PRESETS = ("quick", "full", "target", "gpu")
MB = 1 << 20
GB = 1 << 30


# --------------------------------------------------------------------------- op specs

@dataclass(frozen=True)
class Target:
    """A target for rlfuse's row of ``op`` at ``size`` in ``mode`` on ``device``.

    Against a baseline measured in the same run (``baseline`` names it):
      kind "speedup": baseline_time / rlfuse_time >= value.
      kind "time_within": rlfuse_time / baseline_time <= value.
      kind "memory_fraction": rlfuse_peak_extra / baseline_peak_extra <= value.
      kind "memory_lower": rlfuse_peak_extra < baseline_peak_extra (value unused).
    Against the machine (``baseline`` is ""):
      kind "floor_fraction": bandwidth floor / rlfuse_time >= value (see roofline.py);
      kind "max_time": rlfuse_time <= value seconds;
      kind "max_extra_memory": rlfuse_peak_extra - ``allowance_bytes`` <= value bytes.
    """

    op: str
    size: dict
    mode: str
    baseline: str
    kind: str
    value: float
    text: str
    device: str = "cpu"
    allowance_bytes: int = 0  # "max_extra_memory": memory the op must hold anyway (e.g. a weight gradient)


class OpBench:
    """Base class of one op's benchmark. Subclasses fill the class attributes and the
    ``setup`` / ``forward`` methods; ``make`` builds the callable that gets timed."""

    op = ""
    title = ""
    modes: tuple[str, ...] = ("fwd", "fwd+bwd")
    # "fwd" runs under torch.no_grad() (the scoring path: reference / old log-probs);
    # ops whose forward is only ever run for training set this False.
    fwd_no_grad = True
    primary = "rlfuse"
    baselines: tuple[str, ...] = ()
    peers: tuple[str, ...] = ()
    sizes_by_preset: dict[str, list[dict]] = {}
    targets: tuple[Target, ...] = ()
    x_key = "N"           # size key on the plots' x axis
    x_label = "tokens"
    # descriptions shown in reports (impl -> one line)
    descriptions: dict[str, str] = {}
    # per-case child timeout multiplier (slow ops)
    timeout_s = 600

    # -- sizes
    def sizes(self, preset: str) -> list[dict]:
        if preset not in self.sizes_by_preset:
            raise ValueError(f"{self.op}: unknown size preset {preset!r}")
        return [dict(s) for s in self.sizes_by_preset[preset]]

    def default_size(self) -> dict:
        return dict(self.sizes_by_preset["target"][0])

    def label(self, size: dict) -> str:
        parts = []
        for k, v in size.items():
            if k == "dtype":
                parts.append(str(v).replace("float", "fp").replace("bfloat16", "bf16"))
            else:
                parts.append(f"{k}={_human(v)}")
        return " ".join(parts)

    def x_value(self, size: dict) -> float:
        return float(size.get(self.x_key, 0))

    # -- implementations
    def impls(self) -> tuple[str, ...]:
        return (self.primary, *self.baselines, *self.peers)

    def kind(self, impl: str) -> str:
        if impl == self.primary or impl.startswith(self.primary + "["):
            return "rlfuse"
        return "peer" if impl in self.peers else "baseline"

    def unavailable(self, impl: str, device) -> str | None:
        """Why ``impl`` cannot run on ``device`` (None when it can)."""
        return None

    def modes_for(self, impl: str) -> tuple[str, ...]:
        return self.modes

    # -- running
    # True when inputs depend on the implementation (e.g. end-to-end: which models to build)
    setup_per_impl = False

    def setup(self, size: dict, device) -> dict:
        raise NotImplementedError

    def setup_for(self, impl: str, size: dict, device) -> dict:
        return self.setup(size, device)

    def forward(self, impl: str, inp: dict, state: dict):
        raise NotImplementedError

    def grad_targets(self, inp: dict) -> list:
        return []

    def loss(self, out, inp: dict):
        first = out[0] if isinstance(out, (tuple, list)) else out
        return first.sum()

    def input_bytes(self, inp: dict) -> int:
        import torch
        return sum(t.numel() * t.element_size() for t in inp.values() if isinstance(t, torch.Tensor))

    def memory_note(self) -> str:
        return ""

    # -- roofline (roofline.py): the least the op must do at ``size`` in ``mode``
    def bytes_moved(self, size: dict, mode: str) -> int | None:
        """Bytes the op must move through memory (each input read and each output written the
        fewest times its contract allows); None when the op has no bandwidth floor."""
        return None

    def flops(self, size: dict, mode: str) -> float | None:
        """Floating-point operations the op must do (matrix ops only); None when negligible."""
        return None

    def extras(self, impl: str, inp: dict, mode: str, time_s: float, device) -> dict:
        """Per-case extra metrics (e.g. achieved bandwidth on a GPU)."""
        return {}

    def make(self, impl: str, inp: dict, mode: str, backend: str):
        """A zero-argument callable running ``impl`` once in ``mode``."""
        import torch
        state: dict = {}
        rl = self.kind(impl) == "rlfuse"
        impl_backend = _impl_backend(impl, backend)

        def ctx():
            if rl:
                import rlfuse.kernels as K
                return K.use_backend(impl_backend)
            return contextlib.nullcontext()

        if mode == "fwd":
            def run():
                with ctx(), (torch.no_grad() if self.fwd_no_grad else contextlib.nullcontext()):
                    return self.forward(impl, inp, state)
        elif mode == "fwd+bwd":
            targets = self.grad_targets(inp)

            def run():
                with ctx():
                    out = self.forward(impl, inp, state)
                    grads = torch.autograd.grad(self.loss(out, inp), targets)
                return grads
        else:
            raise ValueError(f"{self.op}: unknown mode {mode!r}")
        return run


def _impl_backend(impl: str, backend: str) -> str:
    """``rlfuse[torch]`` runs on the torch backend; plain ``rlfuse`` on ``backend``."""
    m = re.match(r"^[^\[]+\[(\w+)\]$", impl)
    return m.group(1) if m else backend


def _human(v) -> str:
    if isinstance(v, int) and v >= 1024 and v % 1024 == 0:
        return f"{v // 1024}K" if v < (1 << 20) or v % (1 << 20) else f"{v >> 20}M"
    return str(v)



def random_normal(shape, device, dtype, *, seed: int = 0, scale: float = 1.0):
    """Standard-normal test data, cheap to make at benchmark sizes: drawn directly on a GPU;
    on CPU a block of <= 16M distinct values (64 MB, well beyond the caches) is tiled along
    the leading rows, so building a 2 GB logits tensor costs a copy, not minutes of RNG."""
    import torch
    shape = tuple(int(x) for x in shape)
    if device.type == "cuda":
        g = torch.Generator(device=device).manual_seed(seed)
        return (torch.randn(shape, generator=g, device=device) * scale).to(dtype)
    g = torch.Generator(device="cpu").manual_seed(seed)
    last = shape[-1]
    rows = math.prod(shape[:-1])
    block_rows = max(1, min(rows, (1 << 24) // max(last, 1)))
    block = (torch.randn(block_rows, last, generator=g) * scale).to(dtype)
    if block_rows == rows:
        return block.reshape(shape).to(device)
    reps = -(-rows // block_rows)
    return block.repeat(reps, 1)[:rows].reshape(shape).to(device)


def load_bench(op: str) -> OpBench:
    if op not in OPS:
        raise ValueError(f"unknown op {op!r}; choose from {list(OPS)}")
    module = importlib.import_module(f"rlfuse.benchmarks.bench_{op}")
    return module.BENCH


def size_key(size: dict) -> tuple:
    """A hashable, order-free key of a size dict (to match rows of one size)."""
    return tuple(sorted((k, str(v)) for k, v in size.items()))
