"""The reward model learns from K-way rankings (InstructGPT): the loader, pair construction with
ties, one forward per response, the split by prompt, the Plackett-Luce loss, mixed files, and
the reward adapter starting from the SFT adapter."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from engine_helpers import FAST, write_jsonl

from rlfuse.engine.backbone import Backbone, load_backbone
from rlfuse.engine.checkpoint import latest_checkpoint, load_safetensors, save_checkpoint
from rlfuse.engine.config import ModelConfig, RunConfig
from rlfuse.engine.data import Ranking, load_rankings
from rlfuse.engine.reward import (bradley_terry_loss, plackett_luce_loss, ranking_pairs, split_by_prompt,
                                  train_reward)
from rlfuse.engine.tiny import build_tokenizer


@pytest.fixture(scope="module")
def tok():
    return build_tokenizer()


def fake_sft_checkpoint(run_dir):
    """An SFT checkpoint whose adapter differs from LoRA's zero start (what ``rlfuse sft`` leaves)."""
    torch.manual_seed(1)
    bb = load_backbone(ModelConfig(), device="cpu", adapters=["sft"])
    with torch.no_grad():
        for p in bb.adapter_parameters("sft"):
            p.normal_(0.0, 0.05)
    return save_checkpoint(Path(run_dir) / "sft", 1, adapter=bb.adapter_state_dict("sft"),
                           adapter_config=bb.adapter_config_dict(), heads=None, trainer_state={"step": 1})


@pytest.mark.parametrize("line, message", [
    ({"prompt": "p", "responses": ["a"], "ranks": [1]}, "K >= 2"),
    ({"prompt": "p", "responses": ["a", "b"], "ranks": [1]}, "'ranks' must be a list of 2 ints"),
    ({"prompt": "p", "responses": ["a", "b"], "ranks": [1, 0]}, "ints >= 1"),
    ({"prompt": "p", "responses": ["a", "b"], "ranks": [1, True]}, "ints >= 1"),
    ({"prompt": "p", "responses": ["a", "b"], "ranks": [1, 1.5]}, "ints >= 1"),
    ({"prompt": "p", "responses": "ab", "ranks": [1, 2]}, "list of strings"),
    ({"prompt": "p", "responses": ["a", "a"], "ranks": [1, 2]}, "same text"),
    ({"prompt": "p", "answers": ["a", "b"]}, "expected"),
    ({"prompt": "p", "response": "a", "score": "high"}, "'score' must be a number"),  # a rating line
])
def test_bad_ranking_lines_name_file_and_line(tmp_path, tok, line, message):
    p = write_jsonl(tmp_path / "r.jsonl", [{"prompt": "ok", "responses": ["x", "y"], "ranks": [2, 1]}, line])
    with pytest.raises(ValueError, match=rf"{p}:2: .*{message}"):
        load_rankings(p, tok, 64)


def test_pairs_of_a_ranking_with_ties():
    # responses 1 and 2 tie: all C(4,2)=6 pairs but that one, each oriented better -> worse
    assert sorted(ranking_pairs([1, 2, 2, 3])) == [(0, 1), (0, 2), (0, 3), (1, 3), (2, 3)]
    assert sorted(ranking_pairs([3, 1, 2])) == [(1, 0), (1, 2), (2, 0)]
    assert ranking_pairs([2, 2]) == []


def test_mixed_file_pairs_ratings_rankings(tmp_path, tok):
    p = write_jsonl(tmp_path / "mixed.jsonl", [
        {"prompt": "p1", "chosen": "good", "rejected": "bad"},
        {"prompt": "p2", "response": "fine", "score": 0.5},
        {"prompt": "p3", "responses": ["a", "b", "c"], "ranks": [2, 1, 2]},
        {"prompt": "p4", "chosen": "same", "rejected": "same"},
    ])
    rankings, ratings = load_rankings(p, tok, 64)
    assert [r.ranks for r in rankings] == [[1, 2], [2, 1, 2], [1, 1]]  # a pair line is a K=2 ranking
    assert [len(r.response_ids) for r in rankings] == [2, 3, 2]
    assert len({r.prompt_key for r in rankings}) == 3
    assert [r.score for r in ratings] == [0.5]


def test_bradley_terry_and_plackett_luce_by_hand():
    s = torch.tensor([2.0, 0.5, -1.0, 0.3])
    ranks = [1, 3, 2, 3]  # 0 best, then 2, then 1 and 3 tied last
    # BT: mean over the 5 non-tied pairs (0>2, 0>1, 0>3, 2>1, 2>3)
    diffs = [2.0 + 1.0, 2.0 - 0.5, 2.0 - 0.3, -1.0 - 0.5, -1.0 - 0.3]
    bt = sum(math.log1p(math.exp(-d)) for d in diffs) / 5
    assert bradley_terry_loss([s], [ranks]).item() == pytest.approx(bt, rel=1e-6)
    # PL: 0 chosen from all four, then 2 from {1, 2, 3}; the tied last group makes no choice
    e = [math.exp(x) for x in (2.0, 0.5, -1.0, 0.3)]
    pl = -(math.log(e[0] / sum(e)) + math.log(e[2] / (e[1] + e[2] + e[3]))) / 2
    assert plackett_luce_loss([s], [ranks]).item() == pytest.approx(pl, rel=1e-6)
    # Breslow ties: 0 and 1 tie first, both chosen from {0, 1, 2}; then 2 is left alone
    t = torch.tensor([1.0, 0.0, -0.5])
    lse = math.log(sum(math.exp(x) for x in (1.0, 0.0, -0.5)))
    assert plackett_luce_loss([t], [[1, 1, 2]]).item() == pytest.approx(-(1.0 + 0.0 - 2 * lse) / 2, rel=1e-6)
    # K=2: both losses are -log sigmoid(r1 - r2); a batch is the mean over its prompts
    two = [torch.tensor([0.2, 1.1]), torch.tensor([0.7, -0.4])]
    want = (math.log1p(math.exp(0.9)) + math.log1p(math.exp(-1.1))) / 2
    for loss in (bradley_terry_loss, plackett_luce_loss):
        assert loss(two, [[1, 2], [1, 2]]).item() == pytest.approx(want, rel=1e-6)


def test_split_is_by_prompt():
    rankings = [Ranking(f"prompt{i % 7}", [[1], [2]], [1, 2]) for i in range(40)]
    train, held = split_by_prompt(rankings, 0.3, seed=3)
    train_keys, held_keys = {r.prompt_key for r in train}, {r.prompt_key for r in held}
    assert train_keys and held_keys and not train_keys & held_keys
    assert len(train) + len(held) == 40 and len(held_keys) == 2  # round(0.3 * 7) prompts held out
    assert split_by_prompt(rankings, 0.3, seed=3) == (train, held)  # deterministic


def _cfg(tmp_path, data, **rm):
    cfg = RunConfig(run_dir=str(tmp_path / "run"), device="cpu", progress=False, save_every=100)
    cfg.rm.data, cfg.rm.batch_size, cfg.rm.max_steps = str(data), 2, 1
    for k, v in rm.items():
        setattr(cfg.rm, k, v)
    return cfg


@pytest.mark.parametrize("loss", ["bradley-terry", "plackett-luce"])
def test_each_response_goes_through_the_model_once(tmp_path, monkeypatch, loss):
    data = write_jsonl(tmp_path / "r.jsonl", [
        {"prompt": "p1", "responses": ["a", "b b", "c", "d d d"], "ranks": [1, 2, 2, 3]},  # 5 pairs, 4 rows
        {"prompt": "p2", "responses": ["x", "y", "z"], "ranks": [3, 1, 2]},  # 3 pairs, 3 rows
    ])
    rows = []
    original = Backbone.reward_scores

    def counting(self, input_ids, attention_mask):
        rows.append(input_ids.shape[0])
        return original(self, input_ids, attention_mask)

    monkeypatch.setattr(Backbone, "reward_scores", counting)
    summary = train_reward(_cfg(tmp_path, data, eval_fraction=0.0, loss=loss))
    assert rows == [7]  # one forward of 4 + 3 responses, not 2 x (5 + 3) pair rows
    assert summary["train_pairs"] == 8 and summary["train_rankings"] == 2 and summary["loss_kind"] == loss
    last = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()][-1]
    assert last["pairs"] == 8 and ("bt_loss" if loss == "bradley-terry" else "pl_loss") in last


def test_unknown_loss_is_rejected(tmp_path):
    data = write_jsonl(tmp_path / "r.jsonl", [{"prompt": "p", "chosen": "a", "rejected": "b"}])
    with pytest.raises(ValueError, match="rm.loss.*'hinge'"):
        train_reward(_cfg(tmp_path, data, loss="hinge"))


def test_heldout_prompts_and_mixed_training(cli, tmp_path):
    rows = []
    for i in range(6):  # each prompt ranked twice: its two rankings must land on one side
        rows.append({"prompt": f"q{i}", "responses": ["one", "two", "three"], "ranks": [1, 2, 3]})
        rows.append({"prompt": f"q{i}", "chosen": "one", "rejected": "three"})
    rows.append({"prompt": "q9", "response": "nine", "score": 1.0})
    data = write_jsonl(tmp_path / "mixed.jsonl", rows)
    run = tmp_path / "run"
    code, _, err = cli("rm", "--data", data, "--run-dir", run, "--max-steps", 2, "--set", "rm.eval_fraction=0.34",
                       *FAST)
    assert code == 0, err
    summary = json.loads((run / "summary.json").read_text())["rm"]
    assert summary["eval_prompts"] == 2 and summary["train_prompts"] == 4  # round(0.34 * 6)
    assert summary["eval_rankings"] == 4 and summary["eval_pairs"] == 2 * (3 + 1)
    assert summary["train_pairs"] == 4 * (3 + 1) and summary["ratings"] == 1
    assert 0.0 <= summary["eval_accuracy"] <= 1.0


def test_reward_adapter_starts_from_sft(cli, data, tmp_path):
    run = tmp_path / "run"
    sft = load_safetensors(fake_sft_checkpoint(run) / "adapter_model.safetensors")
    assert any(v.abs().sum() > 0 for k, v in sft.items() if "lora_B" in k)  # not LoRA's zero start

    def rm_adapter(run_dir, *extra):
        code, _, err = cli("rm", "--data", data["prefs"], "--run-dir", run_dir, "--max-steps", 1,
                           "--set", "rm.lr=1e-9", *extra, *FAST)  # a ~1e-9 step: the adapter stays where it started
        assert code == 0, err
        summary = json.loads((run_dir / "summary.json").read_text())["rm"]
        return load_safetensors(latest_checkpoint(run_dir / "rm") / "adapter_model.safetensors"), summary

    started, summary = rm_adapter(run)  # default: <run_dir>/sft
    assert summary["init_from"] == str(latest_checkpoint(run / "sft"))
    assert started.keys() == sft.keys() and all(torch.allclose(started[k], sft[k], atol=1e-6) for k in sft)

    other = tmp_path / "other"  # an explicit rm.sft_checkpoint, from another run dir
    started, _ = rm_adapter(other, "--set", f"rm.sft_checkpoint={run / 'sft'}")
    assert all(torch.allclose(started[k], sft[k], atol=1e-6) for k in sft)

    fresh, summary = rm_adapter(tmp_path / "fresh", "--set", "rm.init_from_sft=false",
                                "--set", f"rm.sft_checkpoint={run / 'sft'}")
    assert summary["init_from"] is None
    assert all(v.abs().max() < 1e-6 for k, v in fresh.items() if "lora_B" in k)  # LoRA's zero start
