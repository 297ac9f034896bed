"""``rlfuse label sample``: K distinct responses per prompt from a checkpoint, with provenance."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from engine_helpers import write_jsonl

from rlfuse.engine.backbone import load_backbone
from rlfuse.engine.checkpoint import latest_checkpoint, save_checkpoint
from rlfuse.engine.config import ModelConfig
from rlfuse.engine.label import sample as sample_mod
from rlfuse.engine.label.records import read_tasks


def fake_sft_checkpoint(run_dir):
    """An SFT checkpoint whose adapter differs from LoRA's zero start (what ``rlfuse sft`` leaves)."""
    torch.manual_seed(1)
    bb = load_backbone(ModelConfig(), device="cpu", adapters=["sft"])
    with torch.no_grad():
        for p in bb.adapter_parameters("sft"):
            p.normal_(0.0, 0.05)
    return save_checkpoint(Path(run_dir) / "sft", 1, adapter=bb.adapter_state_dict("sft"),
                           adapter_config=bb.adapter_config_dict(), heads=None, trainer_state={"step": 1})


def test_sample_from_an_sft_checkpoint(cli, tmp_path):
    run = tmp_path / "run"
    fake_sft_checkpoint(run)
    prompts = write_jsonl(tmp_path / "prompts.jsonl", [{"prompt": "say sun"},
                                                       {"prompt": "say moon", "system": "be brief"},
                                                       {"messages": [{"role": "user", "content": "say tree"}]}])
    out = tmp_path / "tasks.jsonl"
    code, stdout, err = cli("label", "sample", "--model", "tiny", "--adapter", run / "sft", "--prompts", prompts,
                            "-k", 3, "--max-new-tokens", 6, "--out", out, "--device", "cpu")
    assert code == 0, err
    tasks = read_tasks(out)
    assert [t.prompt for t in tasks] == ["say sun", "say moon", "say tree"]  # a random tiny model never repeats
    assert [t.system for t in tasks] == [None, "be brief", None]
    for t in tasks:
        assert len(t.responses) == 3 and len({r.strip() for r in t.responses}) == 3
        assert t.sampling["adapter"] == str(latest_checkpoint(run / "sft"))
        assert t.sampling["k"] == 3 and t.sampling["temperature"] == 1.0 and t.sampling["max_new_tokens"] == 6
    assert json.loads(stdout)["tasks"] == 3

    # --config takes the model section of a run's config.yaml: here LoRA rank 4, which the
    # rank-8 SFT adapter does not fit (so the config was read)
    (tmp_path / "run.yaml").write_text("model:\n  name_or_path: tiny\n  lora_r: 4\n")
    code, _, err = cli("label", "sample", "--config", tmp_path / "run.yaml", "--adapter", run / "sft",
                       "--prompts", prompts, "--out", out, "--device", "cpu")
    assert code == 2 and "does not fit adapter" in err


def test_duplicates_are_resampled_and_hopeless_prompts_dropped(tmp_path, monkeypatch):
    # round 1: "x" three times for every prompt; round 2: new texts for "p0" only
    script = {("p0", 0): ["x", "x ", " x"], ("p1", 0): ["x", "x", "x"],
              ("p0", 1): ["y", "x", "z"], ("p1", 1): ["x", "x", "x"]}
    calls = []

    def fake_rollout(backbone, prompts, *, n_samples, max_new_tokens, temperature):
        round_ = sum(1 for c in calls if c == [p.raw for p in prompts])
        calls.append([p.raw for p in prompts])
        return SimpleNamespace(completions=[t for p in prompts for t in script[(p.raw, round_)][:n_samples]])

    monkeypatch.setattr(sample_mod, "generate_rollout", fake_rollout)
    prompts = write_jsonl(tmp_path / "prompts.jsonl", [{"prompt": "p0"}, {"prompt": "p1"}])
    out = tmp_path / "tasks.jsonl"
    result = sample_mod.sample_tasks(ModelConfig(), prompts, out, k=3, rounds=2, device="cpu")
    (task,) = read_tasks(out)
    assert task.prompt == "p0" and task.responses == ["x", "y", "z"]
    assert result["dropped_prompts"] == 1 and calls == [["p0", "p1"], ["p0", "p1"]]


def test_sample_input_errors(tmp_path):
    prompts = write_jsonl(tmp_path / "prompts.jsonl", [{"prompt": "ok"}, {"messages": [
        {"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}, {"role": "user", "content": "c"}]}])
    with pytest.raises(ValueError, match="-k must be >= 2"):
        sample_mod.sample_tasks(ModelConfig(), prompts, tmp_path / "t.jsonl", k=1)
    with pytest.raises(ValueError, match=rf"{prompts}:2: a labelling task holds one user turn"):
        sample_mod.sample_tasks(ModelConfig(), prompts, tmp_path / "t.jsonl", k=2)
