"""The benchmarks as one system: the Scenario contract, the runner's run-scenario loop (interleaved
engines, one JSON per size, results.md rebuilt from the folder), the one child pool, the one
memory meter, the matmul floor, the torch.compile peer of the fused head and ``rlfuse memory``."""

import argparse
import os
import sys
import types

import pytest
import torch

from rlfuse.benchmarks import baselines, measure, report, roofline, runner, spec


class _Toy(spec.RunScenario):
    """A toy: engine ``a`` takes 1 s, ``b`` 2 s."""

    op = "toy"
    title = "toy scenario"
    engines = ("a", "b")
    metrics = ("seconds", "pid")
    plot_label = "seconds"
    repeats = 2
    sizes_by_preset = {"quick": [dict(n=1)], "full": [dict(n=1), dict(n=2)]}
    calls: list = []

    def prepare(self, size, workdir):
        return {"workdir": workdir}

    def child(self, engine, size, ctx):
        self.calls.append(engine)
        return {"seconds": {"a": 1.0, "b": 2.0}[engine] * size["n"], "pid": os.getpid()}

    def finish(self, size, med):
        return {"speedup": med["b"]["seconds"] / med["a"]["seconds"]}

    def columns(self, res):
        return [("n", res["size"]["n"]), ("speed-up", f"{res['speedup']:.2f}x")]


@pytest.fixture
def toy(monkeypatch):
    bench = _Toy()
    bench.calls = []
    monkeypatch.setitem(sys.modules, "rlfuse_toy_scenario", types.SimpleNamespace(BENCH=bench))
    monkeypatch.setitem(spec.SCENARIOS, "toy", "rlfuse_toy_scenario")
    return bench


def _args(**kw):
    base = dict(repeats=None, quick=False, timeout=None, threads=None, no_plots=True)
    return argparse.Namespace(**{**base, **kw})


def test_run_scenario_interleaves_engines_and_writes_one_json_per_size(toy, tmp_path):
    pool = measure.ChildPool(isolate=False)
    out = tmp_path / "toy"
    assert runner.run_scenario(toy, toy.sizes("full"), _args(), pool, "cpu", {"cpu_model": "x"}, out) == 0
    assert toy.calls == ["a", "b", "b", "a"] * 2  # order reversed every other repeat, per size
    assert sorted(p.name for p in out.glob("*.json")) == ["toy-n=1.json", "toy-n=2.json"]
    md = (out / "results.md").read_text()
    assert "| n | speed-up | repeats | load | measured |" in md and md.count("| **") == 0
    assert "| 1 | 2.00x | 2 |" in md and "| 2 | 2.00x | 2 |" in md
    # a rerun of one size replaces its JSON; the table keeps the other size's row
    assert runner.run_scenario(toy, toy.sizes("quick"), _args(repeats=1), pool, "cpu", {}, out) == 0
    assert len(list(out.glob("*.json"))) == 2 and (out / "results.md").read_text().count("| 2.00x |") == 2


def test_a_failing_engine_is_reported_not_raised(toy, tmp_path, capsys):
    def broken(engine, size, ctx):
        raise RuntimeError("no such model")

    toy.child = broken
    pool = measure.ChildPool(isolate=False)
    assert runner.run_scenario(toy, toy.sizes("quick"), _args(), pool, "cpu", {}, tmp_path) == 1
    assert "RuntimeError: no such model" in capsys.readouterr().err
    assert not list(tmp_path.glob("*.json"))


def test_run_job_runs_in_a_fresh_process(tmp_path, monkeypatch):
    import multiprocessing as mp

    (tmp_path / "toy_fresh_scenario.py").write_text(
        "import os\nfrom rlfuse.benchmarks.spec import RunScenario\n"
        "class T(RunScenario):\n    op = 'toy_fresh'\n    engines = ('a',)\n"
        "    def child(self, engine, size, ctx):\n        return {'pid': os.getpid(), 'x': size['x']}\n"
        "BENCH = T()\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    pool = measure.ChildPool()
    pool.ctx = mp.get_context("spawn")  # the child finds the test's module on sys.path
    res = pool.run(dict(job="run", op="toy_fresh", module="toy_fresh_scenario", engine="a", size={"x": 3},
                        device="cpu"), timeout=120)
    assert res["status"] == "ok", res
    assert res["metrics"]["x"] == 3 and res["metrics"]["pid"] != os.getpid() and "load_at_start" in res


def test_idle_check_waits_at_most_its_budget(monkeypatch):
    loads = iter([9.0, 9.0, 0.1])
    monkeypatch.setattr(measure, "load_1min", lambda: next(loads))
    monkeypatch.setattr(measure.time, "sleep", lambda s: None)
    assert measure.wait_for_idle(60, busy_load=1.0) == 0.1
    monkeypatch.setattr(measure, "load_1min", lambda: 9.0)
    assert measure.wait_for_idle(0.0, busy_load=1.0) == 9.0  # no budget: starts at once


def test_every_scenario_declares_the_contract():
    for name in spec.SCENARIOS:
        bench = spec.load_bench(name)
        assert bench.op == name and bench.family in ("op", "run") and bench.title, name
        assert "quick" in bench.sizes_by_preset, name
        if bench.family == "run":
            assert len(bench.engines) >= 2 and bench.metrics, name
            assert type(bench).child is not spec.RunScenario.child, name


def test_list_shows_both_kinds(capsys):
    assert runner.main(["--list", "--scenarios", "all", "--quick"]) == 0
    out = capsys.readouterr().out
    assert "gae              op" in out and "e2e              run" in out and "memory           run" in out


def test_peak_meter_sees_an_allocation():
    from rlfuse.engine.memory import PeakMeter

    meter = PeakMeter("cpu")
    meter.start()
    x = torch.ones(16 << 20)  # 64 MiB
    extra = meter.peak_extra()
    del x
    assert extra >= 60 << 20 and meter.method and measure.memory_meter(torch.device("cpu")).exact == meter.exact


def test_matmul_floor_counts_forward_and_input_gradient_rows():
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 4)).requires_grad_(False)
    model[0].weight.requires_grad_(True)  # a trained first layer (as LoRA would be): the input of layer 2 needs dX
    x = torch.randn(5, 3, 8)
    with roofline.MatmulFloor(model) as mf:
        model(x).sum().backward()
    # layer 1 (8x16): forward only (its input needs no gradient); layer 2 (16x4): forward + dX
    assert mf.calls == {(0, 15): 1, (1, 15): 2}
    f = mf.floor(scale=0.5)
    assert f["gflop"] == pytest.approx(0.5 * 2 * 15 * (8 * 16 + 2 * 16 * 4) / 1e9) and f["floor_s"] > 0


def test_compiled_chunked_head_matches_the_unfused_head(monkeypatch):
    # the kernels uncompiled (compile time is not what this checks): chunking, the saved
    # log-sum-exp and the hand-written backward must give the unfused head's values and gradients
    monkeypatch.setattr(baselines, "_compiled_chunk_kernels",
                        lambda: (baselines._chunk_forward, baselines._chunk_backward))
    g = torch.Generator().manual_seed(0)
    h = torch.randn(37, 8, generator=g, requires_grad=True)
    w = torch.randn(50, 8, generator=g, requires_grad=True)
    y = torch.randint(0, 50, (37,), generator=g)
    out = baselines.compiled_chunked_linear_logprobs(h, w, y, chunk_rows=16)
    ref = baselines.linear_log_softmax_gather(h, w, y)
    torch.testing.assert_close(out, ref)
    up = torch.randn(37, generator=g)
    for a, b in zip(torch.autograd.grad(out, (h, w), up), torch.autograd.grad(ref, (h, w), up)):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
    assert "torch_compile_chunked" in spec.load_bench("linear_logprobs").peers


def test_memory_verb_is_the_memory_scenario(monkeypatch):
    from rlfuse.engine import cli

    seen = {}
    monkeypatch.setitem(sys.modules, "rlfuse.benchmarks.runner",
                        types.SimpleNamespace(main=lambda argv: seen.setdefault("argv", argv) and 0))
    assert cli.main(["memory", "--batch-size", "2", "--seq-len", "64"]) == 0
    assert seen["argv"] == ["--scenarios", "memory", "--sizes", "memory:model=tiny-small,batch_size=2,seq_len=64"]


def test_the_engine_does_not_import_the_benchmarks():
    from pathlib import Path

    engine = Path(__file__).resolve().parents[1] / "engine"
    for path in engine.rglob("*.py"):
        text = path.read_text()
        assert "import rlfuse.benchmarks" not in text and "from rlfuse.benchmarks" not in text, path


def test_run_report_reads_its_folder(toy, tmp_path):
    res = toy.summarize({"n": 3}, {"a": [{"seconds": 1.0, "pid": 1}], "b": [{"seconds": 4.0, "pid": 2}]})
    res.update(repeats=1, load_1min=0.5, measured_at="2026-01-01T00:00:00Z")
    (tmp_path / "old-format.json").write_text('{"something": "else"}')  # left out, not a crash
    paths = report.write_run(tmp_path, toy, res, plots=False)
    assert [p.name for p in paths] == ["toy-n=3.json", "results.md"]
    assert "| 3 | 4.00x | 1 | 0.5 | 2026-01-01T00:00:00Z |" in (tmp_path / "results.md").read_text()
