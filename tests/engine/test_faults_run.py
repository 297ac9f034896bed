"""Issue 21, runs that survive the world:

* a refused command changes nothing in the run (the run directory's bytes are unchanged) and the
  untouched command still resumes;
* filesystem faults (the run directory is a file, is read-only, the disk fills during a
  checkpoint or a metrics write) end in one line naming the last good checkpoint, and --resume
  continues once the fault is gone;
* SIGTERM ends a run as Ctrl-C does: one line naming the last checkpoint and how to resume.
"""

from __future__ import annotations

import errno
import hashlib
import os
import signal
import subprocess
import sys
import time

import pytest
from engine_helpers import FAST, read_rows, one_line_error

from rlfuse.engine import checkpoint as ckpt_module
from rlfuse.engine import cli as cli_module
from rlfuse.engine import runlock
from rlfuse.engine.checkpoint import latest_checkpoint


def snapshot(run_dir):
    """Every file's bytes under the run directory (the lock file included)."""
    return {str(p.relative_to(run_dir)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(run_dir.rglob("*")) if p.is_file()}


def sft(cli, data, run, *extra):
    return cli("sft", "--data", data["sft"], "--run-dir", run, *FAST, *extra)


# --------------------------------------------------------------------------- a refused command changes nothing

@pytest.mark.parametrize("change", [["--set", "model.lora_r=16"], ["--set", "model.lora_target_modules=q_proj"],
                                    ["--model", "tiny-small"]])
def test_refused_resume_leaves_the_run_untouched(cli, data, tmp_path, change):
    run = tmp_path / "run"
    code, _, err = sft(cli, data, run, "--max-steps", 2)
    assert code == 0, err
    before = snapshot(run)
    code, _, err = sft(cli, data, run, "--max-steps", 3, "--resume", *change)
    line = one_line_error(code, err)
    assert "lora_r" in line or "lora_target_modules" in line or "does not fit" in line, line
    assert snapshot(run) == before
    code, out, err = sft(cli, data, run, "--max-steps", 3, "--resume")  # the untouched command still works
    assert code == 0, err
    assert "resuming sft from" in out and [r["step"] for r in read_rows(run / "metrics.jsonl")] == [1, 2, 3]


def test_other_refusals_leave_the_run_untouched(cli, data, tmp_path):
    run = tmp_path / "run"
    assert sft(cli, data, run, "--max-steps", 2)[0] == 0
    before = snapshot(run)
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "x"\n')
    for args in (["--max-steps", 3],  # no --resume on a run that has a checkpoint
                 ["--max-steps", 3, "--resume", "--set", f"sft.data={bad}"],  # its data does not parse
                 ["--max-steps", 3, "--resume", "--seed", "-4"]):  # a seed out of range
        code, _, err = sft(cli, data, run, *args)
        one_line_error(code, err)
        assert snapshot(run) == before, args


# --------------------------------------------------------------------------- the run directory itself

def _no_training(monkeypatch):
    def refuse(*a, **k):
        raise AssertionError("the model was about to load")
    monkeypatch.setattr(cli_module, "_train", refuse)


def test_run_dir_naming_a_file(cli, data, tmp_path, monkeypatch):
    _no_training(monkeypatch)
    path = tmp_path / "notadir"
    path.write_text("keep me")
    code, _, err = sft(cli, data, path)
    one_line_error(code, err, str(path), "is a file")
    assert path.read_text() == "keep me"


def test_run_dir_below_a_file(cli, data, tmp_path, monkeypatch):
    _no_training(monkeypatch)
    (tmp_path / "afile").write_text("x")
    code, _, err = sft(cli, data, tmp_path / "afile" / "run")
    one_line_error(code, err, "cannot write the run directory", "--run-dir")


@pytest.mark.parametrize("err_no,words", [(errno.EROFS, "Read-only file system"),
                                          (errno.EACCES, "Permission denied")])
def test_unwritable_run_dir_is_refused_before_the_model_loads(cli, data, tmp_path, monkeypatch, err_no, words):
    # (the tests may run as root, for whom chmod does not make a folder read-only: the probe fails instead)
    _no_training(monkeypatch)

    def fail(run_dir):
        raise OSError(err_no, os.strerror(err_no), str(run_dir / ".write-test-x"))
    monkeypatch.setattr(runlock, "_probe_writable", fail)
    code, _, err = sft(cli, data, tmp_path / "run")
    one_line_error(code, err, "cannot write the run directory", words, "--run-dir")


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only folders")
def test_read_only_run_dir_for_real(cli, data, tmp_path, monkeypatch):
    _no_training(monkeypatch)
    run = tmp_path / "run"
    run.mkdir()
    run.chmod(0o555)
    try:
        code, _, err = sft(cli, data, run)
        one_line_error(code, err, "cannot write the run directory")
    finally:
        run.chmod(0o755)


# --------------------------------------------------------------------------- the disk fills up

def _disk_full_at(monkeypatch, name: str, step: int):
    """Writes of ``name`` inside ckpt-<step> get half their bytes out, then ENOSPC."""
    real = ckpt_module._atomic_write

    def writer(path, write):
        if path.name == name and path.parent.name == f"ckpt-{step:07d}":
            def half_then_full(tmp):
                write(tmp)
                with open(tmp, "r+b") as fh:
                    fh.truncate(os.path.getsize(tmp) // 2)
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), tmp)
            return real(path, half_then_full)
        return real(path, write)
    monkeypatch.setattr(ckpt_module, "_atomic_write", writer)


@pytest.mark.parametrize("name", ["adapter_model.safetensors", "trainer_state.pt"])
def test_disk_full_during_checkpoint_names_the_last_good_one(cli, data, tmp_path, monkeypatch, name):
    run = tmp_path / "run"
    _disk_full_at(monkeypatch, name, 4)
    code, _, err = sft(cli, data, run, "--max-steps", 4, "--set", "save_every=2")
    one_line_error(code, err, "ckpt-0000004", "No space left on device", "ckpt-0000002", "--resume")
    assert latest_checkpoint(run / "sft", verify=True).name == "ckpt-0000002"
    assert not (run / "sft" / "ckpt-0000004").exists()  # the half-written folder is gone
    assert not [p for p in (run / "sft").rglob("*.tmp")]
    assert (run / ".lock").read_text() == ""  # released
    monkeypatch.undo()  # space is back
    code, out, err = sft(cli, data, run, "--max-steps", 4, "--set", "save_every=2", "--resume")
    assert code == 0, err
    assert "resuming sft from" in out and "(step 2)" in out
    assert [r["step"] for r in read_rows(run / "metrics.jsonl")] == [1, 2, 3, 4]
    assert latest_checkpoint(run / "sft", verify=True).name == "ckpt-0000004"


def test_disk_full_writing_metrics(cli, data, tmp_path, monkeypatch):
    from rlfuse.engine.metrics import RunLog

    run = tmp_path / "run"
    real = RunLog.log

    def log(self, row):
        if row.get("step") == 3:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(self.metrics_path))
        real(self, row)
    monkeypatch.setattr(RunLog, "log", log)
    code, _, err = sft(cli, data, run, "--max-steps", 4, "--set", "save_every=2")
    one_line_error(code, err, "No space left on device", "metrics.jsonl", "last checkpoint: ckpt-0000002",
                   "--resume")
    monkeypatch.undo()
    code, _, err = sft(cli, data, run, "--max-steps", 4, "--set", "save_every=2", "--resume")
    assert code == 0, err
    assert [r["step"] for r in read_rows(run / "metrics.jsonl")] == [1, 2, 3, 4]


# --------------------------------------------------------------------------- SIGTERM ends a run like Ctrl-C

def _start_long_run(tmp_path, data):
    run = tmp_path / "run"
    cmd = [sys.executable, "-m", "rlfuse.engine.cli", "sft", "--data", str(data["sft"]), "--run-dir", str(run),
           *FAST, "--max-steps", "100000", "--set", "save_every=2"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    deadline = time.time() + 120
    while not (run / "sft" / "latest").is_file():  # wait for a first checkpoint
        assert proc.poll() is None, proc.communicate()
        assert time.time() < deadline, "no checkpoint within 120 s"
        time.sleep(0.1)
    return run, proc


@pytest.mark.parametrize("sig,code,reason", [(signal.SIGTERM, 143, "terminated (SIGTERM)"),
                                             (signal.SIGINT, 130, "interrupted")])
def test_sigterm_ends_a_run_like_ctrl_c(tmp_path, data, sig, code, reason):
    run, proc = _start_long_run(tmp_path, data)
    proc.send_signal(sig)
    try:
        _, err = proc.communicate(timeout=60)
    finally:
        proc.kill()
    assert proc.returncode == code, err
    assert "Traceback" not in err
    last = err.strip().splitlines()[-1]
    assert last.startswith(f"rlfuse: {reason} in sft at step "), err
    assert "; last checkpoint: ckpt-" in last and last.endswith("; continue with --resume"), last
    named = last.split("last checkpoint: ")[1].split(";")[0]
    assert latest_checkpoint(run / "sft", verify=True).name >= named  # the named one, or one written just after
    assert (run / ".lock").read_text() == ""  # lock released on the way out


LAUNCHER = """
import sys
from rlfuse.engine import cli, distributed

# a stand-in for torchrun: says it started, then reports the SIGTERM it is passed
RANK = (
    "import signal, sys, time\\n"
    "signal.signal(signal.SIGTERM, lambda *a: (open(sys.argv[1], 'w').write('got SIGTERM'), sys.exit(143)))\\n"
    "print('started', flush=True)\\n"
    "time.sleep(60)\\n"
)
distributed.torchrun_command = lambda nproc, argv: [sys.executable, "-c", RANK, sys.argv[1]]
sys.exit(cli.main(["sft", "--nproc-per-node", "2", "--device", "cpu"]))
"""


def test_sigterm_to_the_data_parallel_launcher_reaches_the_ranks(tmp_path):
    marker = tmp_path / "rank.txt"
    proc = subprocess.Popen([sys.executable, "-c", LAUNCHER, str(marker)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "started"
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=60)
    finally:
        proc.kill()
    assert proc.returncode == 143 and "Traceback" not in err, err
    assert marker.read_text() == "got SIGTERM"
