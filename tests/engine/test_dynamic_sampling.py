"""DAPO's dynamic sampling (ppo.dynamic_sampling): groups whose rewards are all equal are dropped
and fresh prompts refill the batch, so every update sees informative groups only."""

from __future__ import annotations

import pytest
import torch
from engine_helpers import FAST, read_rows, write_jsonl

from rlfuse.engine import ppo as P
from rlfuse.engine.config import PPOConfig
from rlfuse.engine.rollout import Rollout, concat_rollouts, select_rows


def _rollout(prompt_lens, completion_lens, R, start):
    """Rows with real tokens start, start+1, ...: left-padded prompts, right-padded completions."""
    B, Pmax = len(prompt_lens), max(prompt_lens)
    ids = torch.zeros(B, Pmax + R, dtype=torch.long)
    attn = torch.zeros(B, Pmax + R, dtype=torch.long)
    rmask = torch.zeros(B, R)
    tok = start
    for b, (p, r) in enumerate(zip(prompt_lens, completion_lens)):
        for col in list(range(Pmax - p, Pmax)) + list(range(Pmax, Pmax + r)):
            ids[b, col], attn[b, col], tok = tok, 1, tok + 1
        rmask[b, :r] = 1
    ro = Rollout(ids, attn, Pmax, rmask, [f"p{start}{b}" for b in range(B)], [f"c{start}{b}" for b in range(B)])
    ro.logp = -torch.arange(B * R, dtype=torch.float32).view(B, R) * rmask
    ro.ref_logp, ro.entropy = ro.logp * 2, ro.logp * 3
    ro.scores, ro.truncated = torch.arange(B, dtype=torch.float32) + start, torch.zeros(B, dtype=torch.bool)
    return ro


def _rows(ro):
    """Each row's (prompt tokens, completion tokens, its [R] fields on its tokens): layout-free."""
    out = []
    for b in range(len(ro)):
        prompt = ro.input_ids[b, :ro.prompt_len][ro.attention_mask[b, :ro.prompt_len].bool()].tolist()
        m = ro.response_mask[b].bool()
        comp = ro.input_ids[b, ro.prompt_len:][m].tolist()
        out.append((prompt, comp, ro.logp[b][m].tolist(), ro.entropy[b][m].tolist(), float(ro.scores[b]),
                    ro.prompts[b]))
    return out


def test_concat_rollouts_keeps_every_rows_tokens_and_the_layout():
    a = _rollout([3, 1], [2, 4], R=4, start=10)
    b = _rollout([5, 2, 4], [1, 6, 3], R=6, start=100)
    cat = concat_rollouts([a, b], pad_id=0)
    assert cat.prompt_len == 5 and cat.response_mask.shape == (5, 6) and cat.input_ids.shape == (5, 11)
    assert _rows(cat) == _rows(a) + _rows(b)
    # every completion starts at column P, every prompt ends at P - 1
    assert bool((cat.attention_mask[:, 4] == 1).all()) and torch.equal(cat.attention_mask[:, 5:].float(),
                                                                     cat.response_mask)
    assert _rows(select_rows(cat, [4, 1])) == [_rows(b)[2], _rows(a)[1]]


def test_informative_groups_are_the_ones_with_unequal_rewards():
    scores = torch.tensor([1.0, 1.0, 0.0, 2.0, 3.0, 3.0, 0.5, 0.0])
    assert P.informative_groups(scores, 2) == [1, 3]


def test_dynamic_sampling_needs_groups():
    with pytest.raises(ValueError, match="ppo.dynamic_sampling.*gae has no groups"):
        P.resolve_ppo_config(PPOConfig(dynamic_sampling=True), use_reward_model=False)
    P.resolve_ppo_config(PPOConfig(dynamic_sampling=True, advantage="grpo", n_samples=2), use_reward_model=False)


@pytest.fixture
def half_informative(tmp_path):
    """Prompts "say X": only the "say cat"/"say dog" prompts get a reward that varies with the answer."""
    words = ["cat", "dog", "red", "blue", "sun", "moon", "tree", "green"]
    prompts = write_jsonl(tmp_path / "prompts.jsonl", [{"prompt": f"say {w}"} for w in words])
    rf = tmp_path / "rewards.py"
    rf.write_text("def reward(prompts, completions):\n"
                  "    return [float(len(c) % 3) if ('cat' in p or 'dog' in p) else 1.0\n"
                  "            for p, c in zip(prompts, completions)]\n")
    return prompts, f"{rf}:reward"


def _run(cli, tmp_path, half_informative, name, monkeypatch, *extra):
    prompts, reward = half_informative
    seen = []
    update = P.ppo_update

    def recording(backbone, optimizer, ro, *args, **kwargs):
        seen.append(ro.scores.clone())
        return update(backbone, optimizer, ro, *args, **kwargs)

    monkeypatch.setattr(P, "ppo_update", recording)
    code, _, err = cli("ppo", "--prompts", prompts, "--reward-fn", reward, "--run-dir", tmp_path / name,
                       "--max-steps", 2, "--advantage", "grpo", *FAST, "--set", "ppo.batch_size=4",
                       "--set", "ppo.minibatch_size=8", "--set", "ppo.max_new_tokens=8", *extra)
    assert code == 0, err
    return read_rows(tmp_path / name / "metrics.jsonl"), seen


def test_updates_see_only_informative_groups(cli, tmp_path, half_informative, monkeypatch):
    rows, seen = _run(cli, tmp_path, half_informative, "ds", monkeypatch, "--set", "ppo.dynamic_sampling=true",
                      "--set", "ppo.max_sampling_rounds=8")
    for scores, row in zip(seen, rows):
        groups = scores.view(-1, 2)
        assert bool((groups[:, 0] != groups[:, 1]).all()), scores  # no group of equal rewards is trained on
        assert row["kept_groups"] == len(groups) and row["informative_frac"] < 1.0
        assert row["sampling_rounds"] >= 2  # 4 prompts, most of them uninformative: refilled
    again, _ = _run(cli, tmp_path, half_informative, "ds2", monkeypatch, "--set", "ppo.dynamic_sampling=true",
                    "--set", "ppo.max_sampling_rounds=8")
    keys = ("reward", "kept_groups", "sampling_rounds", "informative_frac", "loss")
    assert [[r[k] for k in keys] for r in again] == [[r[k] for k in keys] for r in rows]  # reproducible


def test_without_dynamic_sampling_equal_groups_are_trained_on(cli, tmp_path, half_informative, monkeypatch):
    rows, seen = _run(cli, tmp_path, half_informative, "plain", monkeypatch)
    assert "kept_groups" not in rows[0]
    assert any(bool((s.view(-1, 2)[:, 0] == s.view(-1, 2)[:, 1]).any()) for s in seen)
