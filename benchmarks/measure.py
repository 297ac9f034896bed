"""How a scenario is measured: the timing policy, one op case in this process, several
implementations timed interleaved, one run-scenario child, and the one pool of fresh child
processes (interleaving is the runner's; the pool adds the idle check and the retries).

* time: median wall-clock of repeated calls after one warm-up call (CUDA-synchronised);
* peak memory: the peak EXTRA memory of one call over what was resident after the inputs
  were built, each case in a fresh child, read by the one meter
  (``rlfuse.engine.memory.PeakMeter``: CPU peak RSS with ``VmHWM`` reset right before the call,
  GPU ``max_memory_allocated``);
* the roofline fields of every timed mode (``roofline.annotate``), against a bandwidth
  measured in the same process.
"""

from __future__ import annotations

import gc
import importlib
import multiprocessing as mp
import os
import statistics
import time
import traceback
from dataclasses import dataclass

from . import roofline
from .machine import drop_repo_root_from_path
from .spec import _impl_backend, load_bench


def memory_meter(device):
    """The one meter (``engine/memory.py``'s :class:`PeakMeter`, shared with ``rlfuse memory``)."""
    from rlfuse.engine.memory import PeakMeter
    return PeakMeter(device)


def current_memory(device) -> int:
    """Resident bytes now (CPU: RSS after a GC and malloc_trim) or allocated bytes (CUDA)."""
    return memory_meter(device).now()


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


def time_and_memory(fn, device, memory_base: int | None = None) -> dict:
    """Warm up once, then one call measured for both time and peak extra memory (the timing
    proper is the interleaved group's, ``measure_time_group``)."""
    t0 = time.perf_counter()
    fn()
    sync(device)
    warmup = time.perf_counter() - t0
    meter = memory_meter(device)
    meter.start()
    t0 = time.perf_counter()
    fn()
    sync(device)
    elapsed = time.perf_counter() - t0
    peak = meter.peak_extra()
    if memory_base is not None:  # count from an earlier point (e.g. before the models were built)
        peak += max(0, meter.base - memory_base)
    return {"time_s": elapsed, "warmup_s": warmup, "peak_extra_bytes": int(peak), "memory_method": meter.method}


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
        inp = bench.setup_for(case["impl"], case["size"], device)
        result["input_bytes"] = int(bench.input_bytes(inp))
        if bench.kind(case["impl"]) == "rlfuse":
            result["backend"] = _impl_backend(case["impl"], case.get("backend", "auto"))
        for mode in case["modes"]:
            if mode not in bench.modes_for(case["impl"]):
                continue
            fn = bench.make(case["impl"], inp, mode, case.get("backend", "auto"))
            m = time_and_memory(fn, device, memory_base=inp.get("_memory_base"))
            m.update(bench.extras(case["impl"], inp, mode, m["time_s"], device))
            result["modes"][mode] = m
            del fn
            gc.collect()
    except Exception as exc:  # noqa: BLE001 - reported, not raised: one failed case must not stop a suite
        result.update(status="error", error=f"{type(exc).__name__}: {exc}",
                      traceback=traceback.format_exc(limit=8))
    return result


COPY = "__copy__"  # the roofline's copy probe among a timing group's implementations


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


def measure_run(job: dict) -> dict:
    """One run-scenario child: ``BENCH.child(engine, size, ctx)`` in this process (``BENCH`` of the
    job's ``module`` when it names one: a scenario outside the registry)."""
    out = {"op": job["op"], "engine": job["engine"], "size": job["size"], "status": "ok"}
    try:
        import torch
        torch.set_num_threads(int(job.get("threads") or 1))
        torch.manual_seed(int(job.get("seed", 0)))
        bench = importlib.import_module(job["module"]).BENCH if job.get("module") else load_bench(job["op"])
        out["metrics"] = bench.child(job["engine"], job["size"], job.get("ctx") or {})
    except Exception as exc:  # noqa: BLE001
        out.update(status="error", error=f"{type(exc).__name__}: {exc}", traceback=traceback.format_exc(limit=8))
    return out


JOBS = {"time_group": measure_time_group, "run": measure_run, "case": measure_case}


def run_job(job: dict) -> dict:
    return JOBS[job.get("job", "case")](job)


def _child_main(job: dict, conn) -> None:
    drop_repo_root_from_path()
    if job.get("threads"):  # before torch's pools start (a forkserver child inherits the server's env)
        os.environ["OMP_NUM_THREADS"] = str(job["threads"])
    try:
        conn.send(run_job(job))
    finally:
        conn.close()


def load_1min() -> float | None:
    try:
        return round(os.getloadavg()[0], 2)
    except (OSError, AttributeError):
        return None


def wait_for_idle(max_wait_s: float, busy_load: float | None = None, poll_s: float = 5.0) -> float | None:
    """The idle check: before a child starts, wait (at most ``max_wait_s``) until the 1-minute
    load falls below ``busy_load`` (default: half the cores); returns the load it starts at."""
    busy = busy_load if busy_load is not None else 0.5 * (os.cpu_count() or 1)
    deadline = time.monotonic() + max_wait_s
    load = load_1min()
    while load is not None and load >= busy and time.monotonic() < deadline:
        time.sleep(min(poll_s, max(0.0, deadline - time.monotonic())))
        load = load_1min()
    return load


class ChildPool:
    """The one pool: each job (an op case, a timing group, a run-scenario child) in a fresh
    process, forked from a forkserver that has already imported torch (fast, clean heap) where
    available, else spawned; an idle check before each job and a retry after a crash."""

    def __init__(self, isolate: bool = True, idle_wait_s: float = 0.0):
        self.isolate = isolate
        self.idle_wait_s = idle_wait_s
        self.ctx = None
        if isolate:
            methods = mp.get_all_start_methods()
            if "forkserver" in methods:
                self.ctx = mp.get_context("forkserver")
                # heavy imports done once in the server (missing ones are skipped by multiprocessing)
                self.ctx.set_forkserver_preload(["torch", "rlfuse.kernels", "rlfuse.benchmarks.measure",
                                                 "rlfuse.benchmarks.baselines", "transformers", "peft",
                                                 "trl.kernels"])
            else:
                self.ctx = mp.get_context("spawn")

    def run(self, case: dict, timeout: float = 900, retries: int = 1) -> dict:
        """Run ``case`` in a fresh child; a child that crashes (a signal, e.g. an extension
        rebuilt under it) is retried ``retries`` times, a timeout is not."""
        load = wait_for_idle(self.idle_wait_s) if self.idle_wait_s else load_1min()
        result = self._run_once(case, timeout)
        while retries > 0 and result.get("crashed"):
            retries -= 1
            time.sleep(5)
            result = self._run_once(case, timeout)
        result["load_at_start"] = load
        return result

    def _run_once(self, case: dict, timeout: float) -> dict:
        if not self.isolate:
            return run_job(case)
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

