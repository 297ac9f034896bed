"""Micro-batching (``sft.micro_batch_size``, ``rm.micro_batch_size``): a step split into several
forward + backward passes gives the gradient and loss of one pass over the whole batch, and
really bounds the rows of each forward."""

from __future__ import annotations

import json

import pytest
import torch
from engine_helpers import write_jsonl

from rlfuse.engine import distributed as D
from rlfuse.engine.backbone import Backbone
from rlfuse.engine.config import RunConfig, apply_overrides, validate
from rlfuse.engine.memory import micro_batches
from rlfuse.engine.reward import train_reward
from rlfuse.engine.sft import train_sft


def test_micro_batches_pack_whole_items_in_order():
    assert micro_batches([4, 2, 2, 4, 1, 1, 1], 8) == [[0, 1, 2], [3, 4, 5, 6]]
    assert micro_batches([10, 2, 3], 4) == [[0], [1], [2]]  # too large for one: alone, never split
    assert micro_batches([2] * 5, None) == [[0, 1, 2, 3, 4]]  # None: one pass
    assert micro_batches([2] * 5, None, max_items=2) == [[0, 1], [2, 3], [4]]
    assert micro_batches([1] * 5, 8, max_items=3) == [[0, 1, 2], [3, 4]]
    assert micro_batches([], 8) == []


@pytest.mark.parametrize("key", ["sft.micro_batch_size", "rm.micro_batch_size"])
def test_bad_micro_batch_size_names_the_key(key):
    for value in (0, -2):
        cfg = apply_overrides(RunConfig(), {key: value})
        with pytest.raises(ValueError, match=rf"config key '{key}': must be an integer >= 1, got {value}"):
            validate(cfg)
    with pytest.raises(ValueError, match=rf"config key '{key}': expected int, got 1.5"):
        apply_overrides(RunConfig(), [f"{key}=1.5"])


def test_micro_batch_size_none_means_one_pass():
    cfg = apply_overrides(RunConfig(), ["rm.micro_batch_size=null", "sft.micro_batch_size=none"])
    assert cfg.rm.micro_batch_size is None and cfg.sft.micro_batch_size is None
    validate(cfg)


def _capture_grads(monkeypatch):
    """The gradients of each step as the stage hands them to clipping (before it scales them)."""
    seen: list[list[torch.Tensor]] = []
    clip = D.clip_grad_norm_

    def recording(params, max_norm):
        seen.append([p.grad.detach().double().clone() for p in params if p.grad is not None])
        return clip(params, max_norm)

    monkeypatch.setattr(D, "clip_grad_norm_", recording)
    return seen


def _count_rows(monkeypatch, method):
    rows: list[int] = []
    original = getattr(Backbone, method)

    def counting(self, input_ids, *args, **kwargs):
        if torch.is_grad_enabled():  # training passes only
            rows.append(input_ids.shape[0])
        return original(self, input_ids, *args, **kwargs)

    monkeypatch.setattr(Backbone, method, counting)
    return rows


def _last_row(run_dir):
    return [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()][-1]


def _assert_same_step(one, many):
    (g_one, row_one), (g_many, row_many) = one, many
    assert len(g_one) == len(g_many) == 1  # one step each
    assert len(g_one[0]) == len(g_many[0]) > 0
    for a, b in zip(g_one[0], g_many[0]):
        assert torch.allclose(a, b, rtol=1e-4, atol=1e-7), (a - b).abs().max()
    assert sum(float(g.abs().sum()) for g in g_one[0]) > 0  # a gradient, not zeros on both sides
    assert row_many["loss"] == pytest.approx(row_one["loss"], rel=1e-5)
    assert row_many["grad_norm"] == pytest.approx(row_one["grad_norm"], rel=1e-4)


@pytest.mark.parametrize("loss", ["bradley-terry", "plackett-luce"])
def test_reward_micro_batches_give_the_one_pass_gradient(tmp_path, monkeypatch, loss):
    data = write_jsonl(tmp_path / "r.jsonl", [
        {"prompt": "p1", "responses": ["a", "b b", "c", "d d d"], "ranks": [1, 2, 2, 3]},  # K=4, a tie
        {"prompt": "p2", "responses": ["x", "y", "z z z z z"], "ranks": [3, 1, 2]},
        {"prompt": "p3", "chosen": "good answer", "rejected": "bad"},
        {"prompt": "p4", "chosen": "yes", "rejected": "no no no no no no"},
        {"prompt": "p5", "response": "fine", "score": 0.5},  # ratings: the regression term
        {"prompt": "p6", "response": "so so so", "score": -1.0},
        {"prompt": "p7", "response": "great", "score": 2.0},
    ])
    results = {}
    for micro in (None, 3):
        seen = _capture_grads(monkeypatch)
        rows = _count_rows(monkeypatch, "reward_scores")
        cfg = RunConfig(run_dir=str(tmp_path / f"run{micro}"), device="cpu", progress=False, save_every=100)
        apply_overrides(cfg, {"rm.data": str(data), "rm.batch_size": 4, "rm.max_steps": 1, "rm.eval_fraction": 0.0,
                              "rm.loss": loss, "rm.regression_coef": 0.5, "rm.micro_batch_size": micro})
        train_reward(cfg)
        row = _last_row(tmp_path / f"run{micro}")
        results[micro] = (seen, row)
        if micro is None:
            assert rows == [14] and row["micro_batches"] == 1  # 4 + 3 + 2 + 2 ranked + 3 rated, one pass
        else:  # whole rankings of at most 3 responses (the K=4 one alone), then ratings
            assert sum(rows) == 14 and len(rows) == row["micro_batches"] > 3
            assert sorted(rows)[-1] == 4 and all(r <= 3 for r in sorted(rows)[:-1])
        monkeypatch.undo()
    _assert_same_step(results[None], results[3])
    for key in ("bt_loss" if loss == "bradley-terry" else "pl_loss", "rating_mse", "train_accuracy", "margin"):
        assert results[3][1][key] == pytest.approx(results[None][1][key], rel=1e-5, abs=1e-7)
    assert results[3][1]["pairs"] == results[None][1]["pairs"]


def test_reward_evaluation_scores_in_micro_batches(tmp_path, monkeypatch):
    data = write_jsonl(tmp_path / "r.jsonl", [{"prompt": f"p{i}", "responses": ["a", "b b", "c c c"],
                                               "ranks": [1, 2, 3]} for i in range(8)])
    accuracies = {}
    for micro in (None, 4):
        rows: list[int] = []
        original = Backbone.reward_scores

        def counting(self, input_ids, attention_mask):
            if not torch.is_grad_enabled():
                rows.append(input_ids.shape[0])
            return original(self, input_ids, attention_mask)

        monkeypatch.setattr(Backbone, "reward_scores", counting)
        cfg = RunConfig(run_dir=str(tmp_path / f"run{micro}"), device="cpu", progress=False, save_every=100)
        apply_overrides(cfg, {"rm.data": str(data), "rm.batch_size": 8, "rm.max_steps": 1, "rm.eval_fraction": 0.5,
                              "rm.micro_batch_size": micro})
        accuracies[micro] = train_reward(cfg)["eval_accuracy"]
        monkeypatch.undo()
        # 4 held-out rankings of 3 responses: one forward of 12 rows, or 4-row chunks (whole rankings: 3)
        assert rows == ([12] if micro is None else [3, 3, 3, 3])
    assert accuracies[4] == accuracies[None]


def test_sft_micro_batches_give_the_one_pass_gradient(tmp_path, monkeypatch):
    data = write_jsonl(tmp_path / "sft.jsonl", [{"prompt": f"say {w}", "response": f"{w} " * (i % 4 + 1)}
                                                 for i, w in enumerate(["red", "blue", "green", "cat", "dog",
                                                                        "sun", "moon"])])
    results = {}
    for micro in (None, 2):
        seen = _capture_grads(monkeypatch)
        rows = _count_rows(monkeypatch, "hidden_states")
        cfg = RunConfig(run_dir=str(tmp_path / f"run{micro}"), device="cpu", progress=False, save_every=100)
        apply_overrides(cfg, {"sft.data": str(data), "sft.batch_size": 7, "sft.max_steps": 1,
                              "sft.micro_batch_size": micro})
        train_sft(cfg)
        row = _last_row(tmp_path / f"run{micro}")
        results[micro] = (seen, row)
        assert rows == ([7] if micro is None else [2, 2, 2, 1]) and row["micro_batches"] == len(rows)
        monkeypatch.undo()
    _assert_same_step(results[None], results[2])
    assert results[2][1]["tokens"] == results[None][1]["tokens"] > 0
