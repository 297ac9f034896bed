"""Shared machinery of the rlfuse benchmark suite.

Every benchmark module (``bench_<op>.py``) defines one :class:`OpBench` subclass instance
called ``BENCH``: its size sweeps, its implementations (rlfuse first, then the baselines
and the external peers), how to build inputs and how to run one implementation forward
or forward+backward. This module turns those into measurements:

* time: median wall-clock of repeated calls after one warm-up call (CUDA-synchronised);
* peak memory: the peak EXTRA memory of one call over what was resident after the inputs
  were built. On CPU each case runs in a fresh child process and reads the peak RSS
  (``VmHWM``, reset through ``/proc/self/clear_refs`` right before the measured call, after
  ``malloc_trim`` so freed heap pages are not silently reused); where the kernel cannot
  reset the peak, ``ru_maxrss`` is used and the result is flagged approximate. On a GPU it
  is ``torch.cuda.max_memory_allocated`` minus the allocation before the call.

Both ``pytest benchmarks/ --benchmark-only`` (via ``conftest.py``) and ``rlfuse bench``
(via ``runner.py``) go through :func:`measure_case` and :class:`ChildPool`.
"""

from __future__ import annotations

import contextlib
import ctypes
import gc
import importlib
import math
import multiprocessing as mp
import os
import platform
import re
import statistics
import sys
import time
import traceback
from dataclasses import dataclass

OPS = ("logprobs", "linear_logprobs", "gae", "ppo_loss", "ppo_step")
PRESETS = ("quick", "full", "target", "gpu")
MB = 1 << 20
MEMORY_FLOOR = 64 << 10  # bytes: smaller peak-extra readings are at the measurement's noise floor


# --------------------------------------------------------------------------- op specs

@dataclass(frozen=True)
class Target:
    """A foundation target: rlfuse vs ``baseline`` at ``size`` in ``mode``.

    kind "speedup": baseline_time / rlfuse_time >= value.
    kind "time_within": rlfuse_time / baseline_time <= value.
    kind "memory_fraction": rlfuse_peak_extra / baseline_peak_extra <= value.
    kind "memory_lower": rlfuse_peak_extra < baseline_peak_extra (value unused).
    """

    op: str
    size: dict
    mode: str
    baseline: str
    kind: str
    value: float
    text: str
    device: str = "cpu"


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


def drop_repo_root_from_path() -> list[str]:
    """Remove the source checkout's root from ``sys.path``.

    ``python -m`` from the checkout (and pytest's rootdir insertion) put the repository root
    on ``sys.path``; its ``kernels/`` folder then shadows the Hugging Face ``kernels`` package
    that transformers / bitsandbytes probe for, and importing it as a top-level ``kernels``
    registers the ``rlfuse::*`` custom ops a second time (torch then fails with an INTERNAL
    ASSERT). The installed ``rlfuse.*`` packages never need the root on the path.
    """
    removed = []
    for entry in list(sys.path):
        root = os.path.abspath(entry or os.getcwd())
        if (os.path.isfile(os.path.join(root, "kernels", "dispatch.py"))
                and os.path.isfile(os.path.join(root, "benchmarks", "harness.py"))
                and os.path.isfile(os.path.join(root, "setup.py"))):
            sys.path.remove(entry)
            removed.append(entry)
    for name, finder in list(sys.path_importer_cache.items()):
        if name in removed:
            del sys.path_importer_cache[name]
    return removed


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


# --------------------------------------------------------------------------- memory

def _libc():
    try:
        return ctypes.CDLL("libc.so.6")
    except OSError:
        return None


def _proc_status() -> dict[str, int]:
    out = {}
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(("VmRSS", "VmHWM")):
                    key, val = line.split(":", 1)
                    out[key] = int(val.split()[0]) * 1024
    except OSError:
        pass
    return out


class CpuMemoryMeter:
    """Peak extra resident memory of the code between ``start()`` and ``peak_extra()``."""

    def __init__(self):
        self.libc = _libc()
        self.exact = self._can_reset()
        self.base = 0
        self.method = "VmHWM reset via /proc/self/clear_refs" if self.exact else "ru_maxrss (approximate)"

    @staticmethod
    def _can_reset() -> bool:
        try:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")
            return "VmHWM" in _proc_status()
        except OSError:
            return False

    def _rss(self) -> int:
        st = _proc_status()
        if "VmRSS" in st:
            return st["VmRSS"]
        import resource
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024

    def start(self):
        gc.collect()
        if self.libc is not None:
            with contextlib.suppress(Exception):
                self.libc.malloc_trim(0)
        if self.exact:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")
        self.base = self._rss()

    def peak_extra(self) -> int:
        if self.exact:
            peak = _proc_status().get("VmHWM", 0)
        else:
            import resource
            peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        return max(0, peak - self.base)


class CudaMemoryMeter:
    method = "torch.cuda.max_memory_allocated - allocated before the call"
    exact = True

    def __init__(self, device):
        self.device = device
        self.base = 0

    def start(self):
        import torch
        gc.collect()
        torch.cuda.synchronize(self.device)
        torch.cuda.reset_peak_memory_stats(self.device)
        self.base = torch.cuda.memory_allocated(self.device)

    def peak_extra(self) -> int:
        import torch
        torch.cuda.synchronize(self.device)
        return max(0, torch.cuda.max_memory_allocated(self.device) - self.base)


def current_memory(device) -> int:
    """Resident bytes now (CPU: RSS after a GC and malloc_trim) or allocated bytes (CUDA)."""
    if device.type == "cuda":
        import torch
        torch.cuda.synchronize(device)
        return torch.cuda.memory_allocated(device)
    gc.collect()
    libc = _libc()
    if libc is not None:
        with contextlib.suppress(Exception):
            libc.malloc_trim(0)
    return _proc_status().get("VmRSS", 0)


def memory_meter(device):
    return CudaMemoryMeter(device) if device.type == "cuda" else CpuMemoryMeter()


def sync(device):
    if device.type == "cuda":
        import torch
        torch.cuda.synchronize(device)


# --------------------------------------------------------------------------- timing

@dataclass
class TimingPolicy:
    min_time_s: float = 0.5     # keep repeating until this much time is measured
    min_reps: int = 3
    max_reps: int = 200
    slow_s: float = 1.5         # a call slower than this gets only ``slow_reps`` timed calls
    slow_reps: int = 2

    @classmethod
    def for_preset(cls, preset: str) -> "TimingPolicy":
        if preset == "quick":
            return cls(min_time_s=0.1, min_reps=3, max_reps=50, slow_s=0.4, slow_reps=2)
        return cls()


def time_and_memory(fn, device, policy: TimingPolicy, memory_base: int | None = None) -> dict:
    """Warm up once, then one call measured for both time and peak extra memory, then more
    timed calls until ``policy`` is satisfied."""
    t0 = time.perf_counter()
    fn()
    sync(device)
    warmup = time.perf_counter() - t0
    meter = memory_meter(device)
    meter.start()
    t0 = time.perf_counter()
    fn()
    sync(device)
    times = [time.perf_counter() - t0]
    peak = meter.peak_extra()
    if memory_base is not None:  # count from an earlier point (e.g. before the models were built)
        peak += max(0, meter.base - memory_base)
    want = policy.slow_reps if times[0] > policy.slow_s else policy.min_reps
    while len(times) < policy.max_reps and (len(times) < want or sum(times) < policy.min_time_s):
        if times[0] > policy.slow_s and len(times) >= want:
            break
        t0 = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - t0)
    return {
        "time_s": statistics.median(times),
        "time_min_s": min(times),
        "time_max_s": max(times),
        "reps": len(times),
        "warmup_s": warmup,
        "peak_extra_bytes": int(peak),
        "memory_method": meter.method,
    }


# --------------------------------------------------------------------------- one case

def measure_case(case: dict) -> dict:
    """Run one case (op, size, impl, modes) in this process; returns a JSON-able dict."""
    import torch

    result = {"op": case["op"], "impl": case["impl"], "size": case["size"],
              "device": case["device"], "status": "ok", "modes": {}}
    try:
        bench = load_bench(case["op"])
        device = torch.device(case["device"])
        result["kind"] = bench.kind(case["impl"])
        result["primary"] = case["impl"] == bench.primary
        result["label"] = bench.label(case["size"])
        reason = bench.unavailable(case["impl"], device)
        if reason:
            result.update(status="skipped", reason=reason)
            return result
        if case.get("threads"):
            torch.set_num_threads(int(case["threads"]))
        torch.manual_seed(int(case.get("seed", 0)))
        policy = TimingPolicy(**case["policy"]) if case.get("policy") else TimingPolicy()
        inp = bench.setup_for(case["impl"], case["size"], device)
        result["input_bytes"] = int(bench.input_bytes(inp))
        if bench.kind(case["impl"]) == "rlfuse":
            result["backend"] = _impl_backend(case["impl"], case.get("backend", "auto"))
        for mode in case["modes"]:
            if mode not in bench.modes_for(case["impl"]):
                continue
            fn = bench.make(case["impl"], inp, mode, case.get("backend", "auto"))
            m = time_and_memory(fn, device, policy, memory_base=inp.get("_memory_base"))
            m.update(bench.extras(case["impl"], inp, mode, m["time_s"], device))
            result["modes"][mode] = m
            del fn
            gc.collect()
    except Exception as exc:  # noqa: BLE001 - reported, not raised: one failed case must not stop a suite
        result.update(status="error", error=f"{type(exc).__name__}: {exc}",
                      traceback=traceback.format_exc(limit=8))
    return result


MEMORY_ONLY = dict(min_time_s=0.0, min_reps=1, max_reps=1, slow_s=0.0, slow_reps=1)


def measure_time_group(group: dict) -> dict:
    """Time several implementations of one (op, size) in ONE process, interleaved: after a
    warm-up call each, rounds of one call per implementation (alternating the order every
    round) until each has enough samples. Load on a shared machine then hits rlfuse and its
    baselines alike, which keeps the ratios honest even when absolute times are noisy."""
    import torch

    out = {"op": group["op"], "size": group["size"], "status": "ok", "impls": {}}
    try:
        bench = load_bench(group["op"])
        device = torch.device(group["device"])
        if group.get("threads"):
            torch.set_num_threads(int(group["threads"]))
        policy = TimingPolicy(**group["policy"]) if group.get("policy") else TimingPolicy()
        inputs: dict = {}
        for impl in group["impls"]:
            key = impl if bench.setup_per_impl else None
            if key not in inputs:
                torch.manual_seed(int(group.get("seed", 0)))
                inputs[key] = bench.setup_for(impl, group["size"], device)
            out["impls"][impl] = {"status": "ok", "modes": {}}
        for mode in group["modes"]:
            fns = {}
            for impl in group["impls"]:
                if mode in bench.modes_for(impl) and out["impls"][impl]["status"] == "ok":
                    inp = inputs[impl if bench.setup_per_impl else None]
                    fns[impl] = bench.make(impl, inp, mode, group.get("backend", "auto"))
            warm, times = {}, {impl: [] for impl in fns}
            for impl, fn in list(fns.items()):
                try:
                    t0 = time.perf_counter()
                    fn()
                    sync(device)
                    warm[impl] = time.perf_counter() - t0
                except Exception as exc:  # noqa: BLE001
                    out["impls"][impl] = {"status": "error", "error": f"{type(exc).__name__}: {exc}", "modes": {}}
                    del fns[impl]

            def need(impl):
                ts = times[impl]
                if not ts:
                    return True
                if len(ts) >= policy.max_reps:
                    return False
                if ts[0] > policy.slow_s:
                    return len(ts) < policy.slow_reps
                return len(ts) < policy.min_reps or sum(ts) < policy.min_time_s

            order = list(fns)
            rnd = 0
            while any(need(i) for i in order):
                for impl in (order if rnd % 2 == 0 else order[::-1]):
                    if need(impl):
                        t0 = time.perf_counter()
                        fns[impl]()
                        sync(device)
                        times[impl].append(time.perf_counter() - t0)
                rnd += 1
            for impl, ts in times.items():
                med = statistics.median(ts)
                m = {"time_s": med, "time_min_s": min(ts), "time_max_s": max(ts),
                     "reps": len(ts), "warmup_s": warm[impl], "interleaved_with": len(order) - 1}
                m.update(bench.extras(impl, inputs[impl if bench.setup_per_impl else None], mode, med, device))
                out["impls"][impl]["modes"][mode] = m
            del fns
            gc.collect()
    except Exception as exc:  # noqa: BLE001
        out.update(status="error", error=f"{type(exc).__name__}: {exc}", traceback=traceback.format_exc(limit=8))
    return out


def _child_main(job: dict, conn) -> None:
    drop_repo_root_from_path()
    try:
        if job.get("job") == "time_group":
            conn.send(measure_time_group(job))
        else:
            conn.send(measure_case(job))
    finally:
        conn.close()


class ChildPool:
    """Runs each case in a fresh process: forked from a forkserver that has already
    imported torch (fast, clean heap) where available, else spawned."""

    def __init__(self, isolate: bool = True):
        self.isolate = isolate
        self.ctx = None
        if isolate:
            methods = mp.get_all_start_methods()
            if "forkserver" in methods:
                self.ctx = mp.get_context("forkserver")
                # heavy imports done once in the server (missing ones are skipped by multiprocessing)
                self.ctx.set_forkserver_preload(["torch", "rlfuse.kernels", "rlfuse.benchmarks.harness",
                                                 "rlfuse.benchmarks.baselines", "transformers", "peft",
                                                 "trl.kernels"])
            else:
                self.ctx = mp.get_context("spawn")

    def run(self, case: dict, timeout: float = 900, retries: int = 1) -> dict:
        """Run ``case`` in a fresh child; a child that crashes (a signal, e.g. an extension
        rebuilt under it) is retried ``retries`` times, a timeout is not."""
        result = self._run_once(case, timeout)
        while retries > 0 and result.get("crashed"):
            retries -= 1
            time.sleep(5)
            result = self._run_once(case, timeout)
        return result

    def _run_once(self, case: dict, timeout: float) -> dict:
        if not self.isolate:
            return measure_time_group(case) if case.get("job") == "time_group" else measure_case(case)
        recv, send = self.ctx.Pipe(duplex=False)
        proc = self.ctx.Process(target=_child_main, args=(case, send), daemon=True)
        proc.start()
        send.close()
        result = None
        timed_out = False
        t0 = time.monotonic()
        try:
            if recv.poll(timeout):
                result = recv.recv()
            else:
                timed_out = True
        except (EOFError, OSError):
            result = None
        finally:
            recv.close()
        if result is None:
            if timed_out:
                proc.kill()
                why = f"timed out after {timeout:.0f} s"
            else:
                proc.join(30)
                code = proc.exitcode
                why = (f"child killed by signal {-code} after {time.monotonic() - t0:.0f} s"
                       + (" (SIGKILL: likely out of memory)" if code == -9 else "") if code and code < 0
                       else f"child exited with code {code} after {time.monotonic() - t0:.0f} s")
            result = {"op": case["op"], "impl": case.get("impl"), "size": case["size"],
                      "device": case["device"], "status": "error", "error": why, "modes": {}, "impls": {},
                      "crashed": not timed_out and bool(proc.exitcode and proc.exitcode < 0 and proc.exitcode != -9)}
        proc.join(10)
        if proc.is_alive():
            proc.kill()
            proc.join(5)
        result["wall_s"] = round(time.monotonic() - t0, 2)
        return result


# --------------------------------------------------------------------------- GPU helpers

_COPY_BW: dict = {}


def device_copy_bandwidth(device, nbytes: int = 1 << 30, reps: int = 10) -> float:
    """Measured HBM bandwidth of a device-to-device copy (GB/s, read + write), cached."""
    import torch
    key = str(device)
    if key not in _COPY_BW:
        src = torch.empty(nbytes, dtype=torch.uint8, device=device)
        dst = torch.empty_like(src)
        dst.copy_(src)
        torch.cuda.synchronize(device)
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(reps):
            dst.copy_(src)
        end.record()
        torch.cuda.synchronize(device)
        seconds = start.elapsed_time(end) / 1e3 / reps
        _COPY_BW[key] = 2 * nbytes / seconds / 1e9
        del src, dst
    return _COPY_BW[key]


# --------------------------------------------------------------------------- pytest

PYTEST_RESULTS: list[dict] = []   # filled by run_benchmark, summarised by conftest
_INPUT_CACHE: dict = {}
_POOL: "ChildPool | None" = None


def run_benchmark(benchmark, case: dict) -> None:
    """Body of every ``test_<op>(benchmark, bench_case)``: time ``case`` in-process with the
    pytest-benchmark fixture and measure its peak extra memory in a fresh child process."""
    import pytest
    import torch

    global _POOL
    bench = load_bench(case["op"])
    device = torch.device(case["device"])
    reason = bench.unavailable(case["impl"], device)
    if reason:
        pytest.skip(reason)
    key = (case["op"], _size_key(case["size"]), case["device"],
           case["impl"] if bench.setup_per_impl else None)
    if _INPUT_CACHE.get("key") != key:
        _INPUT_CACHE.clear()
        gc.collect()
        torch.manual_seed(0)
        _INPUT_CACHE.update(key=key, inp=bench.setup_for(case["impl"], case["size"], device))
    inp = _INPUT_CACHE["inp"]
    fn = bench.make(case["impl"], inp, case["mode"], case.get("backend", "auto"))

    def timed():
        fn()
        sync(device)

    t0 = time.perf_counter()
    timed()
    first = time.perf_counter() - t0
    t0 = time.perf_counter()
    timed()
    second = time.perf_counter() - t0
    rounds = 2 if second > 1.5 else max(3, min(30, int(1.0 / max(second, 1e-6))))
    benchmark.group = f"{case['op']} | {bench.label(case['size'])} | {case['mode']}"
    benchmark.extra_info.update(op=case["op"], impl=case["impl"], kind=bench.kind(case["impl"]),
                                size=case["size"], mode=case["mode"], device=case["device"],
                                first_call_s=first)
    if bench.kind(case["impl"]) == "rlfuse":
        benchmark.extra_info["backend"] = _impl_backend(case["impl"], case.get("backend", "auto"))
    peak = None
    if case.get("memory", True):
        if _POOL is None:
            _POOL = ChildPool(isolate=True)
        child = dict(case, modes=[case["mode"]], policy=MEMORY_ONLY)
        res = _POOL.run(child, timeout=bench.timeout_s)
        m = res.get("modes", {}).get(case["mode"])
        if m is not None:
            peak = m["peak_extra_bytes"]
            benchmark.extra_info["peak_extra_mb"] = round(peak / MB, 2)
            benchmark.extra_info["memory_method"] = m["memory_method"]
        else:
            benchmark.extra_info["memory_error"] = res.get("error") or res.get("reason")
    benchmark.pedantic(timed, rounds=rounds, iterations=1, warmup_rounds=0)
    stats = getattr(benchmark, "stats", None)
    median = None
    with contextlib.suppress(Exception):
        median = stats.stats.median
    if median is None:
        median = second
    PYTEST_RESULTS.append({
        "op": case["op"], "impl": case["impl"], "kind": bench.kind(case["impl"]), "size": case["size"],
        "primary": case["impl"] == bench.primary,
        "label": bench.label(case["size"]), "device": case["device"], "status": "ok",
        "backend": benchmark.extra_info.get("backend"),
        "modes": {case["mode"]: {"time_s": median, "peak_extra_bytes": peak}},
    })
    del fn


# --------------------------------------------------------------------------- machine

def _slug(text: str) -> str:
    text = re.sub(r"\(r\)|\(tm\)|\bcpu\b|\bprocessor\b|@.*$|\d+-core", "", text.lower())
    return re.sub(r"[^a-z0-9]+", "-", text).strip("-") or "unknown"


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.lower().startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown"


def _version(dist: str) -> str | None:
    try:
        from importlib.metadata import version
        return version(dist)
    except Exception:  # noqa: BLE001
        return None


def machine_info(device_type: str = "cpu") -> dict:
    import torch

    info = {
        "cpu_model": cpu_model(),
        "logical_cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "versions": {name: _version(dist) for name, dist in (
            ("torch", "torch"), ("triton", "triton"), ("transformers", "transformers"),
            ("peft", "peft"), ("trl", "trl"), ("liger_kernel", "liger-kernel"),
            ("rlfuse", "rlfuse"), ("pytest_benchmark", "pytest-benchmark"))},
        "device": device_type,
    }
    info["versions"]["torch"] = torch.__version__
    with contextlib.suppress(Exception):
        import psutil
        info["physical_cores"] = psutil.cpu_count(logical=False)
        info["memory_gb"] = round(psutil.virtual_memory().total / 2**30, 1)
    with contextlib.suppress(OSError, AttributeError):
        info["loadavg_at_start"] = [round(x, 2) for x in os.getloadavg()]
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        info["gpu"] = {"name": props.name, "memory_gb": round(props.total_memory / 2**30, 1),
                       "capability": f"{props.major}.{props.minor}", "cuda": torch.version.cuda,
                       "count": torch.cuda.device_count()}
    try:
        import rlfuse.kernels as K
        info["backends"] = K.available_backends()
        info["backends_missing"] = K.unavailable_reasons()
    except Exception as exc:  # noqa: BLE001
        info["backends"] = [f"import failed: {exc}"]
    return info


def machine_slug(info: dict) -> str:
    if info.get("device") == "cuda" and info.get("gpu"):
        gpu = info["gpu"]
        n = gpu.get("count", 1)
        return f"gpu-{_slug(gpu['name'])}" + (f"-x{n}" if n > 1 else "")
    return f"cpu-{_slug(info['cpu_model'])}-{info['logical_cores']}c"


# --------------------------------------------------------------------------- derived

def ratio_rows(results: list[dict]) -> list[dict]:
    """rlfuse (each op's primary impl) vs every other impl measured at the same
    (op, size, mode, device)."""
    index = {}
    for r in results:
        if r.get("status") != "ok":
            continue
        for mode, m in r["modes"].items():
            key = (r["op"], _size_key(r["size"]), mode, r["device"])
            index.setdefault(key, {})[r["impl"]] = (r, m)
    rows = []
    primaries = {}
    for r in results:
        if r.get("primary"):
            primaries[r["op"]] = r["impl"]
    for (op, _sk, mode, dev), impls in index.items():
        primary = primaries.get(op, "rlfuse")
        if primary not in impls:
            continue
        pr, pm = impls[primary]
        for impl, (r, m) in impls.items():
            if impl == primary:
                continue
            speed = m["time_s"] / pm["time_s"] if pm["time_s"] > 0 else math.inf
            pb, bb = pm.get("peak_extra_bytes"), m.get("peak_extra_bytes")
            # below ~64 KiB the RSS measurement is at its floor (pages, allocator slack): no ratio
            mem_ratio = pb / bb if pb is not None and bb is not None and bb >= MEMORY_FLOOR else None
            rows.append({
                "op": op, "size": pr["size"], "label": pr.get("label", ""), "mode": mode,
                "device": dev, "baseline": impl, "kind": r.get("kind", "baseline"),
                "speedup": speed, "memory_ratio": mem_ratio,
                "rlfuse_time_s": pm["time_s"], "baseline_time_s": m["time_s"],
                "rlfuse_peak_extra_bytes": pm["peak_extra_bytes"],
                "baseline_peak_extra_bytes": m["peak_extra_bytes"],
                "backend": pr.get("backend"),
            })
    return rows


def _size_key(size: dict) -> tuple:
    return tuple(sorted((k, str(v)) for k, v in size.items()))


def evaluate_targets(targets: list[Target], ratios: list[dict]) -> list[dict]:
    out = []
    for t in targets:
        match = [r for r in ratios if r["op"] == t.op and r["mode"] == t.mode and r["baseline"] == t.baseline
                 and _size_key(r["size"]) == _size_key(t.size) and r["device"] == t.device]
        entry = {"op": t.op, "text": t.text, "size": t.size, "mode": t.mode, "baseline": t.baseline,
                 "kind": t.kind, "target": t.value, "device": t.device}
        if not match:
            entry.update(status="not measured")
            out.append(entry)
            continue
        r = match[0]
        entry["backend"] = r.get("backend")
        if t.kind == "speedup":
            got = r["speedup"]
            ok = got >= t.value
            entry.update(measured=got, status="PASS" if ok else "MISS",
                         detail=f"{got:.2f}x faster (target >= {t.value:g}x)"
                         + ("" if ok else f"; short by {t.value / got:.2f}x"))
        elif t.kind == "time_within":
            got = 1.0 / r["speedup"] if r["speedup"] else math.inf
            ok = got <= t.value
            entry.update(measured=got, status="PASS" if ok else "MISS",
                         detail=f"rlfuse time = {got:.2f}x baseline (target <= {t.value:g}x)"
                         + ("" if ok else f"; over by {got / t.value:.2f}x"))
        elif t.kind in ("memory_fraction", "memory_lower"):
            got = r["memory_ratio"]
            limit = t.value if t.kind == "memory_fraction" else 1.0
            ok = got is not None and (got <= limit if t.kind == "memory_fraction" else got < 1.0)
            shown = "n/a" if got is None else f"{got:.3f}"
            entry.update(measured=got, status="PASS" if ok else "MISS",
                         detail=f"peak extra memory = {shown}x baseline "
                         f"(target {'<=' if t.kind == 'memory_fraction' else '<'} {limit:g}x)"
                         + ("" if ok or got is None else f"; over by {got / limit:.2f}x"))
        out.append(entry)
    return out


def describe_backend(backend: str, device: str) -> str:
    """The backend that ``auto`` resolves to for ``device`` (for the report)."""
    try:
        import torch
        from rlfuse.kernels import dispatch
        if backend == "auto":
            return dispatch.resolve(torch.device(device), "logprobs_forward")
        return backend
    except Exception:  # noqa: BLE001
        return backend


if __name__ == "__main__":  # pragma: no cover - debugging aid: run one case from JSON
    import json
    print(json.dumps(measure_case(json.loads(sys.argv[1])), indent=1))
