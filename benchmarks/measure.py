"""How a benchmark case is measured: memory meters, the timing policy, one case in this
process, several implementations timed interleaved, and the pool of fresh child processes.

* time: median wall-clock of repeated calls after one warm-up call (CUDA-synchronised);
* peak memory: the peak EXTRA memory of one call over what was resident after the inputs
  were built. On CPU each case runs in a fresh child process and reads the peak RSS
  (``VmHWM``, reset through ``/proc/self/clear_refs`` right before the measured call, after
  ``malloc_trim`` so freed heap pages are not silently reused); where the kernel cannot
  reset the peak, ``ru_maxrss`` is used and the result is flagged approximate. On a GPU it
  is ``torch.cuda.max_memory_allocated`` minus the allocation before the call;
* the roofline fields of every timed mode (``roofline.annotate``), against a bandwidth
  measured in the same process.
"""

from __future__ import annotations

import contextlib
import ctypes
import gc
import multiprocessing as mp
import statistics
import time
import traceback
from dataclasses import dataclass

from . import roofline
from .machine import drop_repo_root_from_path
from .spec import _impl_backend, load_bench


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


COPY = "__copy__"  # the roofline's copy probe among a timing group's implementations
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
        # the roofline's bandwidth: a large copy timed in the same rounds as the implementations
        probe = roofline.CopyProbe(device) if any(bench.bytes_moved(group["size"], m)
                                                  for m in group["modes"]) else None
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
            if probe is not None and fns:
                fns[COPY] = probe
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
            copy_ts = times.pop(COPY, None)
            bandwidth = probe.gbps(statistics.median(copy_ts)) if copy_ts else None
            for impl, ts in times.items():
                med = statistics.median(ts)
                m = {"time_s": med, "time_min_s": min(ts), "time_max_s": max(ts),
                     "reps": len(ts), "warmup_s": warm[impl], "interleaved_with": len(times) - 1}
                m.update(bench.extras(impl, inputs[impl if bench.setup_per_impl else None], mode, med, device))
                m.update(roofline.annotate(bench, group["size"], mode, med, device, bandwidth_gbps=bandwidth))
                out["impls"][impl]["modes"][mode] = m
            del fns
            gc.collect()
        del probe
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

