"""One core's fp32 FMA and bf16 dot-product peaks, measured (``flop_peak.c``).

The fraction of peak that a benchmark reports divides its FLOP/s by these, on the same core in
the same run. ``peaks()`` compiles the C file with the system compiler into a temporary shared
library (under a second), then times each loop: the best of ``repeats`` runs of ~20 ms each, so
another process taking the core for a moment lowers no more than one of them.
Run: ``python -m benchmarks.flop_peak``.
"""

from __future__ import annotations

import ctypes
import functools
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

_SOURCE = Path(__file__).with_name("flop_peak.c")


@functools.lru_cache(maxsize=None)
def _library() -> ctypes.CDLL:
    cc = shutil.which("cc") or shutil.which("gcc") or shutil.which("clang")
    if cc is None:
        raise RuntimeError("flop_peak: no C compiler (cc, gcc or clang) on PATH")
    out = Path(tempfile.mkdtemp(prefix="rlfuse-peak-")) / "flop_peak.so"
    subprocess.run([cc, "-O3", "-shared", "-fPIC", str(_SOURCE), "-o", str(out)], check=True)
    lib = ctypes.CDLL(str(out))
    for name in ("fma_f32", "dot_bf16"):
        getattr(lib, name).restype, getattr(lib, name).argtypes = ctypes.c_float, [ctypes.c_int64]
        getattr(lib, name + "_flop_per_iter").restype = ctypes.c_int64
    return lib


def _has_bf16_dot() -> bool:
    from rlfuse.engine.backbone import cpu_bf16_flags

    return "avx512_bf16" in cpu_bf16_flags()  # vdpbf16ps (the loop below), whatever the vendor


def peak(kind: str, *, repeats: int = 31, seconds: float = 0.02) -> float:
    """FLOP/s of one core's ``kind`` loop ("fma_f32" or "dot_bf16"), best of ``repeats``."""
    if kind == "dot_bf16" and not _has_bf16_dot():
        raise RuntimeError("flop_peak: this CPU has no avx512_bf16 (vdpbf16ps)")
    lib = _library()
    fn, per_iter = getattr(lib, kind), getattr(lib, kind + "_flop_per_iter")()
    iters = 1 << 16
    while True:  # size the loop to ~seconds
        t0 = time.perf_counter()
        fn(iters)
        dt = time.perf_counter() - t0
        if dt >= seconds / 4:
            break
        iters *= 4
    iters = max(1, int(iters * seconds / dt))
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn(iters)
        best = min(best, time.perf_counter() - t0)
    return iters * per_iter / best


def peaks(**kw) -> dict[str, float]:
    """{"fma_f32": FLOP/s, "dot_bf16": FLOP/s (absent without avx512_bf16)} of one core."""
    out = {"fma_f32": peak("fma_f32", **kw)}
    if _has_bf16_dot():
        out["dot_bf16"] = peak("dot_bf16", **kw)
    return out


if __name__ == "__main__":
    for name, value in peaks().items():
        print(f"{name}: {value / 1e9:.1f} GFLOP/s on one core")
