"""The benchmark suite's own machinery: roofline fields, machine-kind targets, the report's
roofline table, the op specs' byte counts and ``rlfuse bench --ops generate|e2e`` selection."""

import sys
import types

import pytest

from rlfuse.benchmarks import analysis, report, roofline, runner
from rlfuse.benchmarks.spec import OPS, Target, load_bench


class _Spec:
    def __init__(self, nbytes, flops=None):
        self.nbytes, self._flops = nbytes, flops

    def bytes_moved(self, size, mode):
        return self.nbytes

    def flops(self, size, mode):
        return self._flops


def test_annotate_is_bytes_over_measured_bandwidth(monkeypatch):
    import torch
    monkeypatch.setitem(roofline._BANDWIDTH, "cpu", 10.0)  # GB/s, as if measured in this process
    m = roofline.annotate(_Spec(2_000_000_000), {}, "fwd", 0.5, torch.device("cpu"))
    assert m["floor_s"] == pytest.approx(0.2) and m["floor_fraction"] == pytest.approx(0.4)
    assert m["achieved_gbps"] == pytest.approx(4.0) and m["bytes_moved"] == 2_000_000_000
    assert roofline.annotate(_Spec(None), {}, "fwd", 0.5, torch.device("cpu")) == {}
    # no tensor-core peak on a CPU: only the achieved rate
    m = roofline.annotate(_Spec(None, flops=1e12), {"dtype": "bfloat16"}, "fwd", 0.5, torch.device("cpu"))
    assert m == {"achieved_tflops": pytest.approx(2.0)}


def test_cpu_copy_bandwidth_keeps_the_best_reading(monkeypatch):
    import torch
    readings = iter([5.0, 3.0, 8.0])
    monkeypatch.setattr(roofline, "_cpu_copy", lambda: next(readings))
    monkeypatch.delitem(roofline._BANDWIDTH, "cpu", raising=False)
    dev = torch.device("cpu")
    assert roofline.copy_bandwidth(dev) == 5.0
    assert roofline.copy_bandwidth(dev) == 5.0  # cached
    assert roofline.copy_bandwidth(dev, refresh=True) == 5.0  # a slower reading does not lower it
    assert roofline.copy_bandwidth(dev, refresh=True) == 8.0


def test_tensor_core_peak_table_picks_the_most_specific_name(monkeypatch):
    import torch
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda d=None: "NVIDIA H100 PCIe")
    assert roofline.tensor_core_peak(torch.device("cuda")) == 756e12
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda d=None: "NVIDIA H100 80GB HBM3")
    assert roofline.tensor_core_peak(torch.device("cuda")) == 989e12
    assert roofline.tensor_core_peak(torch.device("cpu")) is None


def _row(time_s, peak, **mode_extra):
    return {"op": "logprobs", "impl": "rlfuse", "primary": True, "status": "ok", "device": "cpu",
            "size": {"N": 8}, "backend": "cpp", "modes": {"fwd": {"time_s": time_s, "peak_extra_bytes": peak,
                                                                  **mode_extra}}}


@pytest.mark.parametrize("kind,value,allow,expect", [
    ("floor_fraction", 0.6, 0, "MISS"), ("floor_fraction", 0.5, 0, "PASS"),
    ("max_time", 0.1, 0, "MISS"), ("max_time", 0.2, 0, "PASS"),
    ("max_extra_memory", 1000, 0, "MISS"), ("max_extra_memory", 1000, 600, "PASS"),
])
def test_machine_targets_verdicts(kind, value, allow, expect):
    results = [_row(0.2, 1500, floor_s=0.1, floor_fraction=0.5, copy_gbps=10.0)]
    t = Target("logprobs", {"N": 8}, "fwd", "", kind, value, "t", allowance_bytes=allow)
    (e,) = analysis.evaluate_targets([t], [], results)
    assert e["status"] == expect and e["backend"] == "cpp"


def test_machine_target_without_a_floor_is_not_measured():
    t = Target("logprobs", {"N": 8}, "fwd", "", "floor_fraction", 0.6, "t")
    assert analysis.evaluate_targets([t], [], [_row(0.2, 10)])[0]["status"] == "not measured"
    assert analysis.evaluate_targets([t], [], [])[0]["status"] == "not measured"


def test_report_has_the_roofline_table():
    results = [_row(0.2, 1500, floor_s=0.1, floor_fraction=0.5, copy_gbps=10.0, bytes_moved=10**9,
                    achieved_gbps=5.0)]
    data = {"slug": "cpu-x", "generated": "now", "machine": {"cpu_model": "x", "logical_cores": 2},
            "config": {"device": "cpu", "backend": "cpp", "backend_resolved": "cpp"},
            "ops": {"logprobs": {"sizes": [{"N": 8}]}}, "results": results}
    text = report.markdown(report.finalize(data))
    assert "## Roofline" in text and "| **50%** |" in text and "10.0 GB/s" in text


@pytest.mark.parametrize("op", [o for o in OPS if o != "ppo_step"])
def test_every_kernel_op_declares_its_bytes(op):
    bench = load_bench(op)
    for preset in ("target", "gpu"):
        for size in bench.sizes(preset):
            for mode in bench.modes:
                assert bench.bytes_moved(size, mode) > 0
    if "fwd+bwd" in bench.modes:  # the backward at least writes gradients
        size = bench.default_size()
        assert bench.bytes_moved(size, "fwd+bwd") > bench.bytes_moved(size, "fwd")


def test_logprobs_bytes_are_three_logits_passes_with_backward():
    bench = load_bench("logprobs")
    size = dict(N=4096, V=32000, dtype="float32")
    logits = 4096 * 32000 * 4
    assert bench.bytes_moved(size, "fwd") == logits + 4096 * 12
    assert bench.bytes_moved(size, "fwd+bwd") == 3 * logits + 2 * 4096 * 12


def test_bench_ops_generate_and_e2e_select_their_scenarios(capsys):
    # --ops is an alias of --scenarios; generate and e2e are run scenarios with their own sizes
    for op in ("generate", "e2e"):
        assert runner.main(["--quick", "--ops", op, "--list"]) == 0
        out = capsys.readouterr().out
        assert out.startswith(f"{op} ") and " run " in out.splitlines()[0] and "quick: model=" in out
    preset, sizes = runner.resolve_sizes(["e2e:model=smollm2,P=8"], ["e2e"], "full")
    assert preset == "custom" and sizes["e2e"][0]["model"] == "smollm2" and sizes["e2e"][0]["P"] == 8
    assert sizes["e2e"][0]["L"] == load_bench("e2e").default_size()["L"]  # the rest from the default
    assert runner.main(["--ops", "gae,no_such_scenario"]) == 2


def test_the_old_harness_names_live_in_their_modules():
    from rlfuse.benchmarks import analysis, machine, measure, pytest_bridge, spec
    homes = {spec: ("OpBench", "Target", "random_normal", "load_bench", "size_key", "OPS", "PRESETS"),
             pytest_bridge: ("run_benchmark",), roofline: ("copy_bandwidth",),
             measure: ("current_memory", "measure_case", "ChildPool"),
             analysis: ("ratio_rows", "evaluate_targets"), machine: ("machine_info",)}
    for module, names in homes.items():
        for name in names:
            assert hasattr(module, name), (module.__name__, name)


def test_gpu_check_dry_run_writes_the_summary_and_names_each_skip(tmp_path):
    import os
    import subprocess
    from pathlib import Path

    script = Path(__file__).resolve().parents[1] / "benchmarks" / "gpu_check.sh"
    assert subprocess.run(["bash", "-n", str(script)]).returncode == 0
    out = tmp_path / "out"
    # a 15 s budget: the environment probes run, every later step is skipped for lack of time
    env = dict(os.environ, GPU_CHECK_DRY_RUN="1", GPU_CHECK_BUDGET_S="15", OUT=str(out))
    proc = subprocess.run(["bash", str(script)], env=env, capture_output=True, text=True, timeout=300)
    summary = (out / "summary.md").read_text()
    assert "**DRY RUN**" in summary
    assert "- build _C_cuda: SKIPPED (dry run: no CUDA device" in summary
    assert "- tests: CUDA backend: SKIPPED (dry run" in summary
    assert "- engine: tiny-shared: SKIPPED (only" in summary
    assert "RESULT: every step that ran passed" in summary and proc.returncode == 0
    assert sorted(p.name for p in out.iterdir()) == ["logs.tar.gz", "summary.md"]


def test_timing_group_times_the_copy_beside_the_ops():
    from rlfuse.benchmarks.measure import measure_time_group
    policy = dict(min_time_s=0.0, min_reps=3, max_reps=3, slow_s=10.0, slow_reps=3)
    out = measure_time_group(dict(job="time_group", op="gae", size={"B": 8, "T": 64}, impls=["rlfuse", "python_loop"],
                                  modes=["fwd"], device="cpu", backend="torch", policy=policy))
    assert out["status"] == "ok" and set(out["impls"]) == {"rlfuse", "python_loop"}
    rows = [out["impls"][i]["modes"]["fwd"] for i in ("rlfuse", "python_loop")]
    assert rows[0]["copy_gbps"] == rows[1]["copy_gbps"] > 0  # one probe, timed in the same rounds
    for m in rows:
        assert m["bytes_moved"] == 8 * 64 * 17 and m["interleaved_with"] == 1
        assert m["floor_fraction"] == pytest.approx(m["floor_s"] / m["time_s"])
