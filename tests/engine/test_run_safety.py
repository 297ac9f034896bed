"""Runs that can't be corrupted: one process per run directory, non-finite updates stopped,
metrics trimmed on every resume, per-stage configs, one-line errors (issue 15)."""

import os
import stat
import subprocess
import sys
import textwrap

import pytest
import torch
from engine_helpers import FAST, read_rows

from rlfuse.engine import sft as sft_module
from rlfuse.engine.checkpoint import latest_checkpoint, load_safetensors
from rlfuse.engine.config import load_config
from rlfuse.engine.runlock import RunDirLocked, lock_run_dir
from rlfuse.engine.stage import NonFiniteError, Stage
from rlfuse.engine.sft import train_sft


class Killed(Exception):
    pass


def _sft_cfg(run_dir, data, **extra):
    overrides = {"run_dir": str(run_dir), "device": "cpu", "progress": False, "save_every": 2,
                 "sft": {"data": str(data["sft"]), "max_steps": 4, "batch_size": 3}}
    overrides.update(extra)
    return load_config(None, overrides)


# --------------------------------------------------------------------------- 1. the run-directory lock

HOLD = textwrap.dedent("""
    import sys, time
    from rlfuse.engine.runlock import lock_run_dir
    lock = lock_run_dir(sys.argv[1])
    print("locked", flush=True)
    time.sleep(float(sys.argv[2]))
""")


def test_second_process_is_refused_with_the_holders_pid(tmp_path, capsys):
    run = tmp_path / "run"
    holder = subprocess.Popen([sys.executable, "-c", HOLD, str(run), "30"], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        second = subprocess.run([sys.executable, "-m", "rlfuse.engine.cli", "sft", "--data", "x.jsonl",
                                 "--run-dir", str(run), "--device", "cpu"], capture_output=True, text=True)
        assert second.returncode == 2
        lines = second.stderr.strip().splitlines()
        assert len(lines) == 1 and f"in use by process {holder.pid}" in lines[0], second.stderr
        with pytest.raises(RunDirLocked, match=str(holder.pid)):  # and in this process too
            lock_run_dir(run)
    finally:
        holder.kill()
        holder.wait()
    # the holder died without releasing: its lock is not stale, the kernel dropped it
    capsys.readouterr()
    lock = lock_run_dir(run)
    assert (run / ".lock").read_text().strip() == str(os.getpid())
    assert f"left by process {holder.pid}, which is gone" in capsys.readouterr().out
    lock.release()


def test_a_training_stage_holds_the_lock_and_gives_it_back(tmp_path, data):
    run, seen = tmp_path / "run", []

    def try_from_another_process(stage, step, metrics):
        if step == 1:
            seen.append(subprocess.run([sys.executable, "-c", HOLD, str(run), "0"], capture_output=True, text=True))

    train_sft(_sft_cfg(run, data, sft={"data": str(data["sft"]), "max_steps": 2}),
              callbacks=[try_from_another_process])
    assert seen[0].returncode != 0 and f"in use by process {os.getpid()}" in seen[0].stderr
    after = subprocess.run([sys.executable, "-c", HOLD, str(run), "0"], capture_output=True, text=True)
    assert after.returncode == 0 and "locked" in after.stdout, after.stderr


# --------------------------------------------------------------------------- 2. non-finite guard

def _nan_loss_at(monkeypatch, bad_steps):
    real, calls = sft_module.sft_loss, []

    def loss_with_nan(*args, **kwargs):
        loss, n = real(*args, **kwargs)
        calls.append(1)
        return (loss * float("nan") if len(calls) in bad_steps else loss), n

    monkeypatch.setattr(sft_module, "sft_loss", loss_with_nan)


def test_nan_loss_stops_the_run_and_keeps_the_checkpoint_clean(tmp_path, data, monkeypatch):
    _nan_loss_at(monkeypatch, {3})
    run = tmp_path / "run"
    with pytest.raises(NonFiniteError, match=r"sft step 3: non-finite loss nan.*last checkpoint: ckpt-0000002"):
        train_sft(_sft_cfg(run, data))
    ckpt = latest_checkpoint(run / "sft")
    assert ckpt.name == "ckpt-0000002"
    assert all(torch.isfinite(t).all() for t in load_safetensors(ckpt / "adapter_model.safetensors").values())


def test_nonfinite_skip_drops_the_update(tmp_path, data, monkeypatch):
    _nan_loss_at(monkeypatch, {2})
    summary = train_sft(_sft_cfg(tmp_path / "run", data, nonfinite="skip"))
    assert summary["nonfinite_skipped"] == 1
    adapter = load_safetensors(latest_checkpoint(tmp_path / "run" / "sft") / "adapter_model.safetensors")
    assert all(torch.isfinite(t).all() for t in adapter.values())


@pytest.mark.parametrize("verb", ["rm", "ppo"])
def test_every_stage_guards_its_update(cli, tmp_path, data, monkeypatch, verb):
    import rlfuse.kernels as K
    from rlfuse.engine.backbone import Backbone

    if verb == "rm":
        real = Backbone.reward_scores
        monkeypatch.setattr(Backbone, "reward_scores", lambda self, *a, **k: real(self, *a, **k) * float("nan"))
        args = ["rm", "--data", data["prefs"]]
    else:
        real = K.ppo_loss
        monkeypatch.setattr(K, "ppo_loss", lambda *a, **k: (lambda out: (out[0] * float("inf"), out[1]))(real(*a, **k)))
        args = ["ppo", "--prompts", data["prompts"], "--reward-fn", data["reward_fn"]]
    code, _, err = cli(*args, "--run-dir", tmp_path / "run", "--max-steps", 2, *FAST)
    assert code == 2 and f"{verb} step 1: non-finite loss" in err and len(err.strip().splitlines()) == 1
    assert latest_checkpoint(tmp_path / "run" / verb) is None  # nothing non-finite was saved


def test_nan_rating_is_rejected_before_training(cli, tmp_path):
    ratings = tmp_path / "r.jsonl"
    ratings.write_text('{"prompt": "a", "response": "b", "score": 1.0}\n'
                       '{"prompt": "a", "response": "c", "score": NaN}\n')
    code, _, err = cli("rm", "--data", ratings, "--run-dir", tmp_path / "run", *FAST)
    assert code == 2 and f"{ratings}:2: non-finite number NaN" in err
    assert not (tmp_path / "run" / "rm").exists()


# --------------------------------------------------------------------------- 3. metrics on resume

def _kill_at(step_to_die):
    def callback(stage, step, metrics):
        if step == step_to_die:
            raise Killed
    return callback


def test_kill_before_first_checkpoint_then_resume_logs_each_step_once(tmp_path, data):
    run = tmp_path / "run"
    with pytest.raises(Killed):
        train_sft(_sft_cfg(run, data, save_every=10), callbacks=[_kill_at(2)])
    assert latest_checkpoint(run / "sft") is None and len(read_rows(run / "metrics.jsonl")) == 2
    train_sft(_sft_cfg(run, data, save_every=10, resume=True))
    assert [r["step"] for r in read_rows(run / "metrics.jsonl")] == [1, 2, 3, 4]


def test_resume_with_nothing_to_resume_is_an_error(cli, tmp_path, data):
    code, _, err = cli("sft", "--data", data["sft"], "--run-dir", tmp_path / "empty", "--resume", *FAST)
    assert code == 2 and "holds no run to resume" in err and len(err.strip().splitlines()) == 1


def test_runtime_adds_up_across_resumes(tmp_path, data):
    run = tmp_path / "run"
    with pytest.raises(Killed):
        train_sft(_sft_cfg(run, data), callbacks=[_kill_at(3)])
    first = torch.load(latest_checkpoint(run / "sft") / "trainer_state.pt", weights_only=False)["runtime_s"]
    assert first > 0
    summary = train_sft(_sft_cfg(run, data, resume=True))
    assert summary["runtime_s"] > first


# --------------------------------------------------------------------------- 4. one config per stage

def test_resume_of_an_earlier_stage_reads_its_own_config(cli, tmp_path, data):
    run = tmp_path / "run"
    code, _, err = cli("sft", "--data", data["sft"], "--run-dir", run, "--max-steps", 4, *FAST,
                       "--set", "save_every=2")
    assert code == 0, err
    code, _, err = cli("rm", "--data", data["prefs"], "--run-dir", run, "--max-steps", 1, *FAST)
    assert code == 0, err
    assert "max_steps: 4" in (run / "sft" / "config.yaml").read_text()
    assert "rm:" in (run / "config.yaml").read_text()  # the top level holds the latest stage's
    # extend SFT: its resume reads its own config (sft.data included), not the rm stage's
    code, out, err = cli("sft", "--run-dir", run, "--resume", "--max-steps", 6, *FAST)
    assert code == 0, err
    assert [r["step"] for r in read_rows(run / "metrics.jsonl") if r["stage"] == "sft"] == [1, 2, 3, 4, 5, 6]


# --------------------------------------------------------------------------- 7./8. one-line errors, files

@pytest.mark.parametrize("device, message", [("gpu", "unknown device 'gpu'"),
                                             ("cuda", "no CUDA GPU is visible")])
def test_bad_device_is_one_line(cli, tmp_path, data, device, message):
    if device == "cuda" and torch.cuda.is_available():
        pytest.skip("a GPU is visible")
    args = [a for a in FAST if a not in ("--device", "cpu")]
    code, _, err = cli("sft", "--data", data["sft"], "--run-dir", tmp_path / "run", *args, "--device", device)
    assert code == 2 and message in err and len(err.strip().splitlines()) == 1


def test_broken_model_config_is_one_line(cli, tmp_path, data):
    model = tmp_path / "model"
    model.mkdir()
    (model / "config.json").write_text('{"model_type": "llama",')
    code, _, err = cli("sft", "--data", data["sft"], "--run-dir", tmp_path / "run", "--model", model, *FAST[:3])
    assert code == 2 and f"{model / 'config.json'}: not a valid JSON model config" in err
    assert len(err.strip().splitlines()) == 1


def test_ctrl_c_says_where_and_how_to_continue(cli, tmp_path, data, monkeypatch):
    real = Stage.end_step

    def interrupt_after_2(self, step, *args, **kwargs):
        real(self, step, *args, **kwargs)
        if step == 2:
            raise KeyboardInterrupt

    monkeypatch.setattr(Stage, "end_step", interrupt_after_2)
    run = tmp_path / "run"
    try:
        code, _, err = cli("sft", "--data", data["sft"], "--run-dir", run, "--max-steps", 4, *FAST)
    except KeyboardInterrupt:
        pytest.fail("Ctrl-C escaped the CLI as a traceback")
    assert code == 130
    assert "interrupted in sft at step 2" in err and "continue with --resume" in err and "Traceback" not in err
    # another process can take the directory over at once
    other = subprocess.run([sys.executable, "-c", HOLD, str(run), "0"], capture_output=True, text=True)
    assert other.returncode == 0 and "locked" in other.stdout, other.stderr


def test_run_dir_files_are_world_readable(tmp_path, data):
    old = os.umask(0o022)
    try:
        train_sft(_sft_cfg(tmp_path / "run", data, sft={"data": str(data["sft"]), "max_steps": 1}))
    finally:
        os.umask(old)
    files = [p for p in (tmp_path / "run").rglob("*") if p.is_file()]
    assert files and {p.name: oct(stat.S_IMODE(p.stat().st_mode)) for p in files} == \
        {p.name: "0o644" for p in files}


def test_bitsandbytes_cpu_kernel_notice_is_filtered():
    code = "import rlfuse.engine.backbone, bitsandbytes"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd="/")
    assert out.returncode == 0, out.stderr
    assert "gemm_4bit_forward" not in out.stderr
