"""The rlfuse benchmark suite's machinery, one concern per module; this module re-exports
their public names so ``from .harness import OpBench, Target, run_benchmark`` keeps working.

* ``spec.py``          - what a benchmark is: :class:`OpBench` (sizes, implementations, inputs,
                         bytes/FLOPs it must move), :class:`Target`, the op list and presets;
* ``measure.py``       - how it is measured: timing policy, memory meters, one case, the
                         interleaved timing group, the pool of fresh child processes;
* ``roofline.py``      - the bandwidth (and tensor-core) floor of each timed row;
* ``analysis.py``      - what the rows say: ratio rows, target verdicts;
* ``machine.py``       - where it ran: machine info, results-folder slug, ``sys.path`` hygiene;
* ``pytest_bridge.py`` - the pytest-benchmark test body (``run_benchmark``);
* ``report.py`` / ``runner.py`` / ``conftest.py`` - reports, ``rlfuse bench``, pytest hooks.
"""

from __future__ import annotations

import sys

from .analysis import MEMORY_FLOOR, evaluate_targets, primary_row, ratio_rows, roofline_rows
from .machine import cpu_model, describe_backend, drop_repo_root_from_path, machine_info, machine_slug
from .measure import (MEMORY_ONLY, ChildPool, CpuMemoryMeter, CudaMemoryMeter, TimingPolicy, current_memory,
                      measure_case, measure_time_group, memory_meter, sync, time_and_memory)
from .pytest_bridge import PYTEST_RESULTS, run_benchmark
from .roofline import copy_bandwidth, device_copy_bandwidth, tensor_core_peak
from .spec import (COMMAND_OPS, GB, MB, OPS, PRESETS, OpBench, Target, _impl_backend, load_bench, random_normal,
                   size_key)

_size_key = size_key  # the name report.py / runner.py used before the split

__all__ = [
    "COMMAND_OPS", "GB", "MB", "MEMORY_FLOOR", "MEMORY_ONLY", "OPS", "PRESETS", "PYTEST_RESULTS", "ChildPool",
    "CpuMemoryMeter", "CudaMemoryMeter", "OpBench", "Target", "TimingPolicy", "copy_bandwidth", "cpu_model",
    "current_memory", "describe_backend", "device_copy_bandwidth", "drop_repo_root_from_path",
    "evaluate_targets", "load_bench", "machine_info", "machine_slug", "measure_case", "measure_time_group",
    "memory_meter", "primary_row", "random_normal", "ratio_rows", "roofline_rows", "run_benchmark", "size_key",
    "sync", "tensor_core_peak", "time_and_memory",
]

if __name__ == "__main__":  # pragma: no cover - debugging aid: run one case from JSON
    import json
    print(json.dumps(measure_case(json.loads(sys.argv[1])), indent=1))
