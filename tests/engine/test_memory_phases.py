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


@linux
def test_release_memory_returns_freed_small_blocks_to_the_os():
    import numpy as np

    before = rss_mb()
    blocks = [np.ones(1000) for _ in range(25000)]  # ~200 MiB of 8 KB heap blocks (not mmap'd one by one)
    grown = rss_mb() - before
    assert grown > 150
    del blocks
    held = rss_mb() - before  # glibc keeps small freed blocks in its arenas
    release_memory()
    assert rss_mb() - before < min(held, grown) - 100
