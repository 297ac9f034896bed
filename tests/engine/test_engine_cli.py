"""Every CLI verb end to end on the tiny preset, and the user-error paths (exit code 2)."""

import json

import pytest
from engine_helpers import FAST, read_rows

from rlfuse.engine.checkpoint import latest_checkpoint, load_heads, load_safetensors

PPO_KEYS = {"reward", "kl", "entropy", "clipfrac", "value_loss", "policy_loss", "tokens_per_s", "peak_mem_mb",
            "kl_coef", "approx_kl"}


def test_sft_verb(cli, data, tmp_path):
    run = tmp_path / "run"
    code, out, err = cli("sft", "--data", data["sft"], "--run-dir", run, "--max-steps", 3, *FAST)
    assert code == 0, err
    rows = read_rows(run / "metrics.jsonl")
    assert [r["step"] for r in rows] == [1, 2, 3] and all(r["stage"] == "sft" for r in rows)
    assert all(r["loss"] > 0 and r["tokens_per_s"] > 0 and r["peak_mem_mb"] > 0 for r in rows)
    ckpt = latest_checkpoint(run / "sft")
    assert ckpt.name == "ckpt-0000003"
    adapter = load_safetensors(ckpt / "adapter_model.safetensors")
    assert adapter and all(".lora_" in k for k in adapter)
    assert json.loads((ckpt / "adapter_config.json").read_text())["r"] == 8
    assert "sft:" in (run / "config.yaml").read_text()
    assert json.loads((run / "summary.json").read_text())["sft"]["steps"] == 3
    assert "final_loss" in out


def test_rm_verb_reports_heldout_accuracy(cli, data, tmp_path):
    run = tmp_path / "run"
    code, _, err = cli("rm", "--data", data["prefs"], "--run-dir", run, "--max-steps", 2, *FAST)
    assert code == 0, err
    summary = json.loads((run / "summary.json").read_text())["rm"]
    # held out by prompt (10 pairs over fewer distinct prompts): one prompt, all of its pairs
    assert summary["eval_prompts"] == 1 and summary["eval_pairs"] >= 1 and summary["ratings"] == 1
    assert summary["train_pairs"] + summary["eval_pairs"] == 10
    assert 0.0 <= summary["eval_accuracy"] <= 1.0
    last = read_rows(run / "metrics.jsonl")[-1]
    assert {"bt_loss", "rating_mse", "train_accuracy", "eval_accuracy"} <= set(last)
    heads = load_heads(latest_checkpoint(run / "rm"))
    assert set(heads) == {"reward_head.proj.weight", "reward_head.proj.bias"}


@pytest.mark.parametrize("advantage, extra", [
    ("gae", ["--set", "ppo.adaptive_kl=true"]),  # KL penalty in the reward, adaptive coefficient
    ("grpo", ["--set", "ppo.kl_in_loss=true", "--set", "ppo.kl_estimator=k3"]),  # KL as a loss term
    ("rloo", []),
])
def test_ppo_verb_with_reward_fn(cli, data, tmp_path, advantage, extra):
    run = tmp_path / "run"
    code, _, err = cli("ppo", "--prompts", data["prompts"], "--reward-fn", data["reward_fn"], "--run-dir", run,
                       "--max-steps", 2, "--advantage", advantage, *FAST, *extra)
    assert code == 0, err
    rows = read_rows(run / "metrics.jsonl")
    assert [r["step"] for r in rows] == [1, 2] and PPO_KEYS <= set(rows[0])
    assert abs(rows[0]["kl"]) < 1e-5  # step 0: policy == reference
    samples = read_rows(run / "samples.jsonl")
    assert samples and {"prompt", "completion", "score"} <= set(samples[0])
    assert samples[0]["score"] == float(samples[0]["completion"].count("a"))  # came from our reward_fn
    heads = load_heads(latest_checkpoint(run / "ppo"))
    assert bool(heads) == (advantage == "gae")  # a value head only when there is a critic


def test_pipeline_then_plot(cli, data, tmp_path):
    run = tmp_path / "run"
    code, _, err = cli("pipeline", "--sft-data", data["sft"], "--rm-data", data["prefs"], "--run-dir", run,
                       "--max-steps", 2, "--set", "sft.max_steps=2", "--set", "rm.max_steps=2", *FAST)
    assert code == 0, err
    summary = json.loads((run / "summary.json").read_text())
    assert set(summary) == {"sft", "rm", "ppo"}
    assert summary["ppo"]["sft_checkpoint"].endswith("sft/ckpt-0000002")  # PPO found the earlier stages
    assert summary["ppo"]["reward_checkpoint"].endswith("rm/ckpt-0000002")
    assert summary["ppo"]["reward_source"] == "reward model"
    stages = [r["stage"] for r in read_rows(run / "metrics.jsonl")]
    assert stages == ["sft", "sft", "rm", "rm", "ppo", "ppo"]
    assert abs(read_rows(run / "metrics.jsonl")[4]["kl"]) < 1e-5  # reference = SFT adapter = policy at step 0

    code, out, err = cli("plot", run)
    assert code == 0, err
    pngs = sorted((run / "plots").glob("*.png"))
    assert [p.name for p in pngs] == ["ppo.png", "rm.png", "sft.png"]
    assert all(p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" for p in pngs)


# ---------------------------------------------------------------- user errors: message, exit 2


def test_missing_model_file(cli, data, tmp_path):
    code, _, err = cli("sft", "--data", data["sft"], "--run-dir", tmp_path / "r", "--no-progress",
                       "--model", tmp_path / "nope.gguf")
    assert code == 2 and "nope.gguf" in err and "Traceback" not in err


def test_malformed_jsonl_names_file_and_line(cli, tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "a", "response": "b"}\n{"prompt": oops}\n')
    code, _, err = cli("sft", "--data", bad, "--run-dir", tmp_path / "r", "--no-progress")
    assert code == 2 and f"{bad}:2" in err and "Traceback" not in err


def test_empty_dataset(cli, tmp_path):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    code, _, err = cli("rm", "--data", empty, "--run-dir", tmp_path / "r", "--no-progress")
    assert code == 2 and "empty" in err


def test_unknown_config_key(cli, data, tmp_path):
    code, _, err = cli("ppo", "--prompts", data["prompts"], "--run-dir", tmp_path / "r", "--set", "ppo.kl_coeff=1")
    assert code == 2 and "ppo.kl_coeff" in err
    cfg = tmp_path / "c.yaml"
    cfg.write_text("sft:\n  epochz: 2\n")
    code, _, err = cli("sft", "--config", cfg, "--data", data["sft"], "--run-dir", tmp_path / "r")
    assert code == 2 and "sft.epochz" in err


def test_ppo_without_reward_and_rerun_without_resume(cli, data, tmp_path):
    code, _, err = cli("ppo", "--prompts", data["prompts"], "--run-dir", tmp_path / "r", *FAST)
    assert code == 2 and "reward" in err
    code, _, err = cli("sft", "--data", data["sft"], "--run-dir", tmp_path / "r2", "--max-steps", 1, *FAST)
    assert code == 0, err
    code, _, err = cli("sft", "--data", data["sft"], "--run-dir", tmp_path / "r2", "--max-steps", 1, *FAST)
    assert code == 2 and "--resume" in err


def test_grpo_needs_groups(cli, data, tmp_path):
    code, _, err = cli("ppo", "--prompts", data["prompts"], "--reward-fn", data["reward_fn"], "--run-dir",
                       tmp_path / "r", "--advantage", "grpo", "--n-samples", 1)
    assert code == 2 and "n_samples" in err


def test_bad_reward_fn_spec(cli, data, tmp_path):
    code, _, err = cli("ppo", "--prompts", data["prompts"], "--reward-fn", "no_such_module_xyz:f",
                       "--run-dir", tmp_path / "r")
    assert code == 2 and "no_such_module_xyz" in err


def test_demo_and_bench_dispatch(cli, monkeypatch, tmp_path):
    import sys
    import types

    seen = {}

    def fake_main(argv):
        seen["argv"] = argv
        return 0

    for verb, module in (("demo", "rlfuse.engine.demo"), ("bench", "rlfuse.benchmarks.runner")):
        monkeypatch.setitem(sys.modules, module, types.SimpleNamespace(main=fake_main))
        code, _, _ = cli(verb, "--fast", "x")
        assert code == 0 and seen.pop("argv") == ["--fast", "x"]

        monkeypatch.setitem(sys.modules, module, None)  # importing it now fails as if not installed
        code, _, err = cli(verb)
        assert code == 2 and f"rlfuse {verb}" in err and "not available" in err
