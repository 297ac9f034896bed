"""Per-phase peak memory (metrics.MemoryPhases) and returning freed heap to the OS (memory.release_memory)."""

from __future__ import annotations

import sys

import pytest

from rlfuse.engine.memory import release_memory
from rlfuse.engine.metrics import MemoryPhases, process_peak_rss_mb, rss_mb

linux = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="RSS peaks per phase need /proc (Linux)")
MiB = 2**20


@linux
def test_phase_peaks_are_separate_and_nested_phases_count_for_the_outer_one():
    phases = MemoryPhases("cpu")
    with phases("outer"):
        with phases("big"):
            block = b"\x01" * (200 * MiB)  # touched pages: resident
            del block  # a large block is unmapped at once: RSS falls back
        with phases("small"):
            block = b"\x01" * (5 * MiB)
            del block
    assert phases.peak_mb["big"] > rss_mb() + 150
    assert phases.peak_mb["small"] < phases.peak_mb["big"] - 150  # the big phase's peak did not leak into it
    assert phases.peak_mb["outer"] >= phases.peak_mb["big"]  # although "small" reset the kernel's peak
    assert process_peak_rss_mb() >= phases.peak_mb["big"]
    assert phases.after_mb["outer"] < phases.peak_mb["big"] - 150
    assert phases.as_metrics() == {f"peak_mem_{k}_mb": round(v, 1) for k, v in phases.peak_mb.items()}


RELEASE_PROBE = """
import json, numpy as np
from rlfuse.engine.memory import release_memory
from rlfuse.engine.metrics import rss_mb
before = rss_mb()
blocks = [np.ones(1000) for _ in range(25000)]  # ~200 MiB of 8 KB heap blocks (not mmap'd one by one)
pin = [bytearray(64) for _ in range(1000)]  # live heap above them: glibc cannot trim them from the top
grown = rss_mb() - before
del blocks
held = rss_mb() - before  # glibc keeps the freed blocks in its arenas
release_memory()
print(json.dumps({"grown": grown, "held": held, "after": rss_mb() - before}))
"""


@linux
def test_release_memory_returns_freed_small_blocks_to_the_os():
    """In a fresh process, so the heap starts in a known state (a long test session's heap
    has free space of its own and may trim or reuse differently)."""
    import json
    import subprocess

    out = subprocess.run([sys.executable, "-c", RELEASE_PROBE], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    r = json.loads(out.stdout.strip().splitlines()[-1])
    assert r["grown"] > 150 and r["held"] > 150, r  # freed, yet still resident...
    assert r["after"] < r["held"] - 100, r  # ...until release_memory hands it back
