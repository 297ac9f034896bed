"""--report-to: TensorBoard event files and W&B get the scalars of metrics.jsonl; a tracker never fails a run."""

from __future__ import annotations

import importlib.machinery
import sys
import types

import pytest
from engine_helpers import FAST, read_rows

from rlfuse.engine import tracking


def _numeric(row):
    return {k for k, v in row.items() if k not in ("stage", "step") and isinstance(v, (int, float))
            and not isinstance(v, bool)}


def test_tensorboard_event_files_hold_the_metrics_scalars(tmp_path, data, cli):
    pytest.importorskip("tensorboard", reason="tensorboard is not installed (pip install tensorboard)")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run = tmp_path / "run"
    code, _, err = cli("sft", "--data", data["sft"], *FAST, "--run-dir", run, "--max-steps", 2,
                       "--report-to", "tensorboard")
    assert code == 0, err
    rows = read_rows(run / "metrics.jsonl")
    events = list((run / "tensorboard" / "sft").glob("events.out.tfevents.*"))
    assert events
    acc = EventAccumulator(str(run / "tensorboard" / "sft"))
    acc.Reload()
    tags = set(acc.Tags()["scalars"])
    assert tags == {f"sft/{k}" for k in _numeric(rows[0])} and "sft/loss" in tags
    loss = acc.Scalars("sft/loss")
    assert [e.step for e in loss] == [1, 2]
    assert [e.value for e in loss] == pytest.approx([r["loss"] for r in rows], rel=1e-6)


def test_unknown_tracker_and_missing_package_are_one_line_errors(tmp_path, data, cli, monkeypatch):
    code, _, err = cli("sft", "--data", data["sft"], *FAST, "--run-dir", tmp_path / "a", "--report-to", "mlflow")
    assert code == 2 and "unknown tracker 'mlflow'" in err and "Traceback" not in err
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "tensorboard" else real(name, *a))
    code, _, err = cli("sft", "--data", data["sft"], *FAST, "--run-dir", tmp_path / "b", "--report-to", "tensorboard")
    assert code == 2 and "pip install tensorboard" in err
    assert not (tmp_path / "b" / "metrics.jsonl").exists()  # failed before training


class _FakeRun:
    def __init__(self, calls, fail_log):
        self.calls, self.fail_log, self.id = calls, fail_log, "abc123"

    def define_metric(self, *args, **kwargs):
        self.calls.append(("define", args, kwargs))

    def log(self, values):
        if self.fail_log:
            raise ConnectionError("service went away")
        self.calls.append(("log", values))

    def finish(self):
        self.calls.append(("finish",))


def _fake_wandb(monkeypatch, *, online_fails=True, fail_log=False):
    calls = []
    mod = types.ModuleType("wandb")
    mod.__spec__ = importlib.machinery.ModuleSpec("wandb", None)

    def init(mode=None, **kwargs):
        calls.append(("init", mode, kwargs))
        if mode == "online" and online_fails:
            raise ConnectionError("api.wandb.ai unreachable")
        return _FakeRun(calls, fail_log)

    mod.init = init
    monkeypatch.setitem(sys.modules, "wandb", mod)
    monkeypatch.delenv("WANDB_MODE", raising=False)
    monkeypatch.setattr(tracking, "_reachable", lambda *a, **k: True)
    return calls


def test_wandb_falls_back_to_offline_and_logs_the_rows(tmp_path, data, cli, monkeypatch):
    calls = _fake_wandb(monkeypatch)
    run = tmp_path / "run"
    code, _, err = cli("sft", "--data", data["sft"], *FAST, "--run-dir", run, "--max-steps", 2, "--report-to", "wandb")
    assert code == 0, err
    assert [c[1] for c in calls if c[0] == "init"] == ["online", "offline"] and "logging offline" in err
    logged = [c[1] for c in calls if c[0] == "log"]
    rows = read_rows(run / "metrics.jsonl")
    assert [v["sft/step"] for v in logged] == [1, 2]
    assert logged[0]["sft/loss"] == pytest.approx(rows[0]["loss"])
    assert {k[len("sft/"):] for k in logged[0]} - {"step"} == _numeric(rows[0])
    assert ("finish",) in calls and (run / "wandb_id").read_text().strip() == "abc123"


def test_wandb_without_network_starts_offline(tmp_path, monkeypatch):
    calls = _fake_wandb(monkeypatch)
    monkeypatch.setattr(tracking, "_reachable", lambda *a, **k: False)
    t = tracking.WandbTracker(tmp_path)
    t.log({"stage": "rm", "step": 1, "loss": 0.5, "note": "text"})
    assert [c[1] for c in calls if c[0] == "init"] == ["offline"]
    assert [c[1] for c in calls if c[0] == "log"] == [{"rm/step": 1, "rm/loss": 0.5}]


def test_a_failing_wandb_never_fails_the_run(tmp_path, data, cli, monkeypatch):
    _fake_wandb(monkeypatch, online_fails=False, fail_log=True)
    run = tmp_path / "run"
    code, _, err = cli("sft", "--data", data["sft"], *FAST, "--run-dir", run, "--max-steps", 2, "--report-to", "wandb")
    assert code == 0, err
    assert err.count("W&B logging is off") == 1
    assert len(read_rows(run / "metrics.jsonl")) == 2


def test_tensorboard_resume_purges_the_killed_runs_later_steps(tmp_path):
    pytest.importorskip("tensorboard", reason="tensorboard is not installed (pip install tensorboard)")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    first = tracking.TensorBoardTracker(tmp_path)
    for step in (1, 2, 3):  # steps 2-3 logged after the last checkpoint (step 1), then killed
        first.log({"stage": "sft", "step": step, "loss": float(step)})
    first.close()
    resumed = tracking.TensorBoardTracker(tmp_path)
    for step in (2, 3):
        resumed.log({"stage": "sft", "step": step, "loss": 10.0 * step})
    resumed.close()
    acc = EventAccumulator(str(tmp_path / "tensorboard" / "sft"))
    acc.Reload()
    assert [(e.step, e.value) for e in acc.Scalars("sft/loss")] == [(1, 1.0), (2, 20.0), (3, 30.0)]
