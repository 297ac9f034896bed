"""A run killed mid-way and resumed ends where the uninterrupted run ends."""

import pytest
import torch
from engine_helpers import FAST, read_rows

from rlfuse.engine.checkpoint import latest_checkpoint, load_safetensors, load_trainer_state
from rlfuse.engine.config import load_config
from rlfuse.engine.ppo import train_ppo
from rlfuse.engine.sft import train_sft


class Killed(Exception):
    pass


def kill_at(step_to_die):
    def callback(stage, step, metrics):
        if step == step_to_die:
            raise Killed(f"{stage} killed after step {step}")
    return callback


def count_a(prompts, completions):
    return [float(c.count("a")) for c in completions]


def _cfg(run_dir, data, **extra):
    overrides = {"run_dir": str(run_dir), "device": "cpu", "progress": False, "save_every": 2,
                 "ppo": {"prompts": str(data["prompts"]), "max_steps": 4, "batch_size": 2, "n_samples": 2,
                         "max_new_tokens": 4, "ppo_epochs": 1, "minibatch_size": 2, "adaptive_kl": True,
                         "kl_horizon": 10},
                 "sft": {"data": str(data["sft"]), "max_steps": 4, "batch_size": 3}}
    overrides.update(extra)
    return load_config(None, overrides)


def _adapter(run_dir, stage):
    return load_safetensors(latest_checkpoint(run_dir / stage) / "adapter_model.safetensors")


@pytest.mark.parametrize("stage", ["ppo", "sft"])
def test_resume_after_kill_matches_uninterrupted_run(tmp_path, data, stage):
    train = (lambda cfg, **kw: train_ppo(cfg, reward_fn=count_a, **kw)) if stage == "ppo" else train_sft
    full, killed = tmp_path / "full", tmp_path / "killed"
    train(_cfg(full, data))

    # die after step 3: the last checkpoint is step 2, and step 3 was already logged
    with pytest.raises(Killed):
        train(_cfg(killed, data), callbacks=[kill_at(3)])
    assert latest_checkpoint(killed / stage).name == "ckpt-0000002"
    assert [r["step"] for r in read_rows(killed / "metrics.jsonl")] == [1, 2, 3]

    cfg = _cfg(killed, data)
    cfg.resume = True
    resumed_steps = []
    train(cfg, callbacks=[lambda s, step, m: resumed_steps.append(step)])
    assert resumed_steps == [3, 4]  # continued from the checkpoint, not from 0
    assert load_trainer_state(latest_checkpoint(killed / stage))["step"] == 4

    # same adapter, optimizer trajectory, sampled tokens and KL coefficient as the run never killed
    a, b = _adapter(full, stage), _adapter(killed, stage)
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=1e-6)
    full_rows, killed_rows = read_rows(full / "metrics.jsonl"), read_rows(killed / "metrics.jsonl")
    assert [r["step"] for r in killed_rows] == [1, 2, 3, 4]  # the redone step 3 is logged once
    key = "reward" if stage == "ppo" else "loss"
    assert [r[key] for r in killed_rows] == pytest.approx([r[key] for r in full_rows], abs=1e-6)
    if stage == "ppo":
        assert [r["kl_coef"] for r in killed_rows] == pytest.approx([r["kl_coef"] for r in full_rows])


def test_cli_resume_extends_a_finished_run(cli, data, tmp_path):
    run = tmp_path / "run"
    args = ["ppo", "--prompts", data["prompts"], "--reward-fn", data["reward_fn"], "--run-dir", run, *FAST]
    assert cli(*args, "--max-steps", 1)[0] == 0
    code, out, err = cli(*args, "--max-steps", 2, "--resume")
    assert code == 0, err
    assert [r["step"] for r in read_rows(run / "metrics.jsonl")] == [1, 2]
    code, out, err = cli(*args, "--max-steps", 2, "--resume")  # nothing left to do
    assert code == 0 and "already finished" in out


@pytest.mark.parametrize("damage", ["delete", "truncate"])
def test_resume_falls_back_when_latest_is_gone_or_truncated(tmp_path, data, capsys, damage):
    import shutil

    run = tmp_path / "run"
    train_sft(_cfg(run, data))
    newest = latest_checkpoint(run / "sft")
    assert newest.name == "ckpt-0000004"
    if damage == "delete":
        shutil.rmtree(newest)
    else:
        adapter = newest / "adapter_model.safetensors"
        adapter.write_bytes(adapter.read_bytes()[:100])
    capsys.readouterr()
    cfg = _cfg(run, data)
    cfg.resume = True
    steps = []
    train_sft(cfg, callbacks=[lambda s, step, m: steps.append(step)])
    out = capsys.readouterr().out
    assert "'latest' names ckpt-0000004, which is missing or incomplete; using ckpt-0000002" in out
    assert "resuming sft from" in out and "(step 2): restored the adapter, optimizer state and RNG" in out
    assert steps == [3, 4] and [r["step"] for r in read_rows(run / "metrics.jsonl")] == [1, 2, 3, 4]
