"""What a benchmark is: the one :class:`Scenario` contract, in two kinds.

* **op scenarios** (:class:`OpBench`, one ``bench_<op>.py`` each): sizes, implementations
  (rlfuse first, then the baselines and the external peers), inputs, how to run one
  implementation forward or forward+backward, the bytes (and FLOPs) the op must move (its
  roofline floor, ``roofline.py``) and its :class:`Target` s;
* **run scenarios** (:class:`RunScenario`): an end-to-end run. Engines A and B (and more), the
  per-child function ``child(engine, size, ctx) -> metrics`` run in a fresh process per
  (repeat, engine), interleaved, and ``summarize`` turning the runs into one result with the
  columns of its markdown table.

Every module named in :data:`SCENARIOS` defines ``BENCH`` (an instance of either kind). The
runner (``runner.py``) executes both in one child pool (``measure.py``) and the reporter
(``report.py``) writes ``benchmarks/results/<machine slug>/<scenario>/``.
"""

from __future__ import annotations

import contextlib
import importlib
import math
import re
import statistics
from dataclasses import dataclass

# scenario name -> module; op scenarios first (their order is the report's)
SCENARIOS = {name: f"rlfuse.benchmarks.bench_{name}" for name in (
    "logprobs", "linear_logprobs", "gae", "ppo_loss", "ppo_step",
    "e2e", "generate", "scaling", "critic", "prefill_buckets", "memory", "trl_patch", "gpu_engine")}
OPS = ("logprobs", "linear_logprobs", "gae", "ppo_loss", "ppo_step")  # the op scenarios
PRESETS = ("quick", "full", "target", "gpu")
MB = 1 << 20
GB = 1 << 30


class Scenario:
    """What every scenario declares: a name, a title, size presets, the engines it compares."""

    family = ""            # "op" or "run"
    op = ""                # the scenario's name
    title = ""
    sizes_by_preset: dict[str, list[dict]] = {}
    timeout_s = 600        # per child process
    default_preset = "full"  # the preset of a plain ``rlfuse bench --scenarios NAME`` on CPU

    def sizes(self, preset: str) -> list[dict]:
        if preset not in self.sizes_by_preset:
            raise ValueError(f"{self.op}: unknown size preset {preset!r}")
        return [dict(s) for s in self.sizes_by_preset[preset]]

    def default_size(self) -> dict:
        """What explicit sizes fill their missing keys from: the first preset of target, full, gpu, quick."""
        for preset in ("target", "full", "gpu", "quick"):
            if self.sizes_by_preset.get(preset):
                return dict(self.sizes_by_preset[preset][0])
        return {}

    def label(self, size: dict) -> str:
        parts = []
        for k, v in size.items():
            if k == "dtype":
                parts.append(str(v).replace("float", "fp").replace("bfloat16", "bf16"))
            else:
                parts.append(f"{k}={_human(v)}")
        return " ".join(parts)


class RunScenario(Scenario):
    """An end-to-end run: each (repeat, engine) in a fresh child, engines interleaved and the
    order reversed every other repeat. Subclasses fill ``engines``, ``child`` and ``columns``."""

    family = "run"
    engines: tuple[str, ...] = ()
    repeats = 3                     # default repeats (a size's ``repeats`` key overrides it)
    metrics: tuple[str, ...] = ()   # per-run numbers whose medians ``summarize`` keeps
    plot_label = ""                 # the y axis of the scenario's PNG (``plot_values``)

    def prepare(self, size: dict, workdir: str) -> dict:
        """Once per size, in the parent (e.g. save the model both engines load): the ``ctx``
        every child gets."""
        return {}

    def child(self, engine: str, size: dict, ctx: dict) -> dict:
        """One run of ``engine`` in this (fresh) process -> its metrics."""
        raise NotImplementedError

    def unavailable(self, engine: str) -> str | None:
        return None

    def summarize(self, size: dict, runs: dict[str, list[dict]]) -> dict:
        """The result of one size: medians per engine of ``metrics`` plus what ``finish`` adds."""
        med = {e: {k: statistics.median(r[k] for r in rs if r.get(k) is not None)
                   for k in self.metrics if any(r.get(k) is not None for r in rs)}
               for e, rs in runs.items() if rs}
        res = {"scenario": self.op, "size": size, "label": self.label(size), "median": med, "runs": runs}
        res.update(self.finish(size, med))
        return res

    def finish(self, size: dict, med: dict[str, dict]) -> dict:
        """Ratios and floors from the medians (e.g. speed-up of rlfuse over its peer)."""
        return {}

    def stem(self, res: dict) -> str:
        """The result's JSON file name (without .json) in the scenario's folder."""
        return f"{self.op}-" + re.sub(r"[^A-Za-z0-9.=,-]+", "", self.label(res["size"]).replace(" ", "-"))

    def columns(self, res: dict) -> list[tuple[str, str]]:
        """(header, cell) pairs of the result's row in the scenario's results.md."""
        return [("size", res.get("label", "")), *((f"{e} {k}", _cell(v)) for e, m in res.get("median", {}).items()
                                                 for k, v in m.items())]

    def plot_values(self, res: dict) -> dict[str, float]:
        """engine -> the number the scenario's PNG shows per engine (default: the first metric)."""
        key = self.metrics[0] if self.metrics else None
        return {e: m[key] for e, m in res.get("median", {}).items() if key in m}


def _cell(v) -> str:
    if isinstance(v, float):
        return f"{v:.3g}"
    return "-" if v is None else str(v)


def fraction(floor_s, time_s) -> float | None:
    return floor_s / time_s if floor_s and time_s else None


def pct(x) -> str:
    return "-" if x is None else f"{100 * x:.0f}%"


def floor_cell(m: dict, time_key: str) -> str:
    """An engine's matmul floor and the share of it its time reaches: '1.23 s (**45%**)'."""
    floor = m.get("matmul_floor_s")
    return "-" if floor is None else f"{floor:.3g} s (**{pct(fraction(floor, m.get(time_key)))}**)"


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


class OpBench(Scenario):
    """Base class of one op's benchmark. Subclasses fill the class attributes and the
    ``setup`` / ``forward`` methods; ``make`` builds the callable that gets timed."""

    family = "op"
    modes: tuple[str, ...] = ("fwd", "fwd+bwd")
    # "fwd" runs under torch.no_grad() (the scoring path: reference / old log-probs);
    # ops whose forward is only ever run for training set this False.
    fwd_no_grad = True
    primary = "rlfuse"
    baselines: tuple[str, ...] = ()
    peers: tuple[str, ...] = ()
    targets: tuple[Target, ...] = ()
    x_key = "N"           # size key on the plots' x axis
    x_label = "tokens"
    # descriptions shown in reports (impl -> one line)
    descriptions: dict[str, str] = {}
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


def load_bench(name: str) -> Scenario:
    """The scenario called ``name`` (an op or a run scenario)."""
    if name not in SCENARIOS:
        raise ValueError(f"unknown scenario {name!r}; choose from {list(SCENARIOS)}")
    return importlib.import_module(SCENARIOS[name]).BENCH


load_scenario = load_bench


def size_key(size: dict) -> tuple:
    """A hashable, order-free key of a size dict (to match rows of one size)."""
    return tuple(sorted((k, str(v)) for k, v in size.items()))
