"""The pytest-benchmark side of the suite: the body of every ``test_<op>(benchmark,
bench_case)``. It times a case in-process with the ``benchmark`` fixture, measures its peak
extra memory in a fresh child process, adds the roofline fields and keeps a row for the
session summary (``conftest.pytest_terminal_summary``)."""

from __future__ import annotations

import contextlib
import gc
import time

from . import roofline
from .measure import ChildPool, sync
from .spec import MB, _impl_backend, load_bench, size_key

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
    key = (case["op"], size_key(case["size"]), case["device"],
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
        child = dict(case, modes=[case["mode"]])
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
    mode_row = {"time_s": median, "peak_extra_bytes": peak}
    mode_row.update(roofline.annotate(bench, case["size"], case["mode"], median, device))
    if "floor_fraction" in mode_row:
        benchmark.extra_info.update(floor_fraction=round(mode_row["floor_fraction"], 4),
                                    copy_gbps=mode_row["copy_gbps"])
    PYTEST_RESULTS.append({
        "op": case["op"], "impl": case["impl"], "kind": bench.kind(case["impl"]), "size": case["size"],
        "primary": case["impl"] == bench.primary,
        "label": bench.label(case["size"]), "device": case["device"], "status": "ok",
        "backend": benchmark.extra_info.get("backend"),
        "modes": {case["mode"]: mode_row},
    })
    del fn


