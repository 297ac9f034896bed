"""pytest-benchmark entry to the rlfuse benchmark suite.

    pytest benchmarks/ --benchmark-only                       # the foundation targets' sizes
    pytest benchmarks/ --benchmark-only --bench-sizes quick   # or full / gpu
    pytest benchmarks/bench_gae.py --benchmark-only --bench-backend cpp

The repository's pytest config has ``testpaths = ["tests"]``, so benchmarks run only when
this folder is named; ``bench_*.py`` files are collected by the hook below (they do not
match ``test_*.py``), so ``pytest tests/`` never sees them.

Each case is timed in-process by the ``benchmark`` fixture and its peak extra memory is
measured in a fresh child process (``extra_info["peak_extra_mb"]``). Nothing is asserted
about speed: at the end of the session a summary prints rlfuse's ratio against every
baseline and whether each foundation target was met.
"""

from __future__ import annotations

import pytest

from rlfuse.benchmarks import analysis, report
from rlfuse.benchmarks.machine import drop_repo_root_from_path
from rlfuse.benchmarks.pytest_bridge import PYTEST_RESULTS
from rlfuse.benchmarks.spec import OPS, load_bench


def pytest_collection_finish(session):
    # pytest put the checkout root on sys.path to import this package; drop it before any
    # benchmark imports transformers, whose probe for the HF ``kernels`` package would
    # otherwise load the repo's kernels/ folder a second time (see machine.py).
    drop_repo_root_from_path()


def pytest_addoption(parser):
    group = parser.getgroup("rlfuse-bench")
    group.addoption("--bench-sizes", default=None,
                    help="size preset: target (default on CPU), quick, full, gpu (default with CUDA)")
    group.addoption("--bench-backend", default="auto",
                    help="rlfuse backend for the 'rlfuse' rows (auto, torch, cpp, triton, cuda)")
    group.addoption("--bench-ops", default=None, help="comma-separated ops (default: all)")
    group.addoption("--bench-device", default=None, help="cpu or cuda (default: cuda when present)")
    group.addoption("--bench-no-memory", action="store_true",
                    help="skip the child-process peak-memory measurement")


class _BenchModule(pytest.Module):
    """A ``bench_*.py`` file collected as the installed ``rlfuse.benchmarks.<name>`` (its relative
    imports need the package; pytest's default import mode would import it as a top-level file)."""

    def _getobj(self):
        import importlib
        return importlib.import_module(f"rlfuse.benchmarks.{self.path.stem}")


def pytest_collect_file(file_path, parent):
    # bench_*.py do not match python_files; collect them here unless named on the command line
    # (pytest collects explicitly named files itself, through the hook below)
    if file_path.suffix == ".py" and file_path.name.startswith("bench_") \
            and not parent.session.isinitpath(file_path):
        return _BenchModule.from_parent(parent, path=file_path)
    return None


def pytest_pycollect_makemodule(module_path, parent):
    if module_path.name.startswith("bench_"):
        return _BenchModule.from_parent(parent, path=module_path)
    return None


def _device(config) -> str:
    dev = config.getoption("--bench-device")
    if dev:
        return dev
    import torch
    return "cuda" if torch.cuda.is_available() else "cpu"


def pytest_generate_tests(metafunc):
    if "bench_case" not in metafunc.fixturenames:
        return
    config = metafunc.config
    bench = getattr(metafunc.module, "BENCH", None)
    if bench is None:
        return
    device = _device(config)
    preset = config.getoption("--bench-sizes") or ("gpu" if device == "cuda" else "target")
    ops = config.getoption("--bench-ops")
    cases, ids = [], []
    if ops and bench.op not in [o.strip() for o in ops.split(",")]:
        sizes = []
    else:
        sizes = bench.sizes(preset)
    for size in sizes:
        for mode in bench.modes:
            for impl in bench.impls():
                if mode not in bench.modes_for(impl):
                    continue
                cases.append(dict(op=bench.op, size=size, impl=impl, mode=mode, device=device,
                                  backend=config.getoption("--bench-backend"),
                                  memory=not config.getoption("--bench-no-memory")))
                ids.append(f"{bench.label(size).replace(' ', '-')}-{mode}-{impl}")
    metafunc.parametrize("bench_case", cases, ids=ids)


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    if not PYTEST_RESULTS:
        return
    ratios = analysis.ratio_rows(PYTEST_RESULTS)
    targets = [t for name in OPS for t in load_bench(name).targets]
    data = {"results": PYTEST_RESULTS, "ratios": ratios, "roofline": analysis.roofline_rows(PYTEST_RESULTS),
            "targets": analysis.evaluate_targets(targets, ratios, PYTEST_RESULTS),
            "ran_ops": sorted({r["op"] for r in PYTEST_RESULTS})}
    terminalreporter.write_sep("=", "rlfuse vs baselines")
    for line in report.summary_lines(data):
        terminalreporter.write_line(line)
