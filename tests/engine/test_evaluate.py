"""`rlfuse eval` on the checkpoints of a tiny run, and the evaluator's statistics."""

from __future__ import annotations

import json

import pytest
import torch
from engine_helpers import FAST, WORDS, one_line_error, read_rows, write_jsonl

from rlfuse.engine.cli import main
from rlfuse.engine.evaluate import best_of_n, compare, summarize


def count_a(prompts, completions):
    return [float(c.count("a")) for c in completions]


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """sft (2 steps) -> rm (2 steps) -> ppo (1 step) in one run folder of the tiny model."""
    root = tmp_path_factory.mktemp("eval")
    sft = write_jsonl(root / "sft.jsonl", [{"prompt": f"say {w}", "response": f"{w} {w}"} for w in WORDS])
    prefs = write_jsonl(root / "prefs.jsonl", [{"prompt": f"say {w}", "chosen": w, "rejected": "no"} for w in WORDS])
    prompts = write_jsonl(root / "prompts.jsonl", [{"prompt": f"say {w}"} for w in WORDS])
    rf = root / "rewards.py"
    rf.write_text("def count_a(prompts, completions):\n    return [float(c.count('a')) for c in completions]\n")
    run_dir = root / "run"
    common = [*FAST, "--run-dir", run_dir, "--max-steps", "2"]
    assert main([str(a) for a in ["sft", "--data", sft, *common, "--set", "sft.lr=0.02"]]) == 0
    assert main([str(a) for a in ["rm", "--data", prefs, *common]]) == 0
    assert main([str(a) for a in ["ppo", "--prompts", prompts, "--reward-fn", f"{rf}:count_a", *common,
                                  "--set", "ppo.lr=0.02"]]) == 0
    return {"run": run_dir, "prompts": prompts, "reward_fn": f"{rf}:count_a", "root": root}


def test_eval_compares_two_checkpoints_of_a_tiny_run(run, tmp_path, cli):
    from rlfuse.engine.data import load_prompts, pad
    from rlfuse.engine.generate import completion_text
    from rlfuse.engine.trained import load_trained

    r, out = run["run"], tmp_path / "eval"
    code, stdout, err = cli("eval", "--checkpoints", r / "sft", r / "ppo", "--prompts", run["prompts"],
                            "--reward-fn", run["reward_fn"], "--reward-checkpoint", r / "rm", "--success", "1",
                            "--max-new-tokens", 6, "--device", "cpu", "--no-progress", "--batch-size", 3,
                            "--out", out)
    assert code == 0, err
    result = json.loads((out / "eval.json").read_text())
    sft, ppo = str(r / "sft"), str(r / "ppo")
    assert list(result["checkpoints"]) == [sft, ppo] and list(result["pairs"]) == [f"{ppo} vs {sft}"]
    assert result["settings"]["reference"].startswith(sft)  # PPO's reference: the run's SFT checkpoint
    rows = read_rows(out / "answers.jsonl")
    by = {c: [x for x in rows if x["checkpoint"] == c] for c in (sft, ppo)}
    assert [x["index"] for x in by[sft]] == list(range(len(WORDS)))

    # the answers are the checkpoint's own greedy answers, scored by the reward function
    policy = load_trained(r / "sft", device="cpu").backbone
    for p, row in zip(load_prompts(run["prompts"], policy.tokenizer, 256), by[sft]):
        ids, attn = pad([p.input_ids], policy.tokenizer.pad_token_id, side="left")
        ours = policy.generate(ids, attn, max_new_tokens=6, greedy=True)[0, ids.shape[1]:].tolist()
        assert row["completion"] == completion_text(policy.tokenizer, ours, policy.eos_token_ids())[0]
        assert row["reward"] == row["completion"].count("a") and row["correct"] == (row["reward"] >= 1)
        assert row["kl"] == pytest.approx(0.0, abs=1e-4)  # the SFT checkpoint IS the reference
    assert any(abs(x["kl"]) > 1e-3 for x in by[ppo]) or [x["completion"] for x in by[ppo]] == \
        [x["completion"] for x in by[sft]]

    # the statistics are those of the rows
    for c in (sft, ppo):
        s = result["checkpoints"][c]
        assert s["n"] == len(WORDS) and s["accuracy"] == pytest.approx(sum(x["correct"] for x in by[c]) / len(WORDS))
        assert s["accuracy_ci95"][0] <= s["accuracy"] <= s["accuracy_ci95"][1]
        assert s["mean_rm_score"] == pytest.approx(sum(x["rm_score"] for x in by[c]) / len(WORDS))
        assert s["length"]["max"] <= 6
    pair = result["pairs"][f"{ppo} vs {sft}"]
    assert pair["accuracy_diff"] == pytest.approx(result["checkpoints"][ppo]["accuracy"]
                                                  - result["checkpoints"][sft]["accuracy"])
    wins = sum((b["rm_score"] > a["rm_score"]) + 0.5 * (b["rm_score"] == a["rm_score"]) for a, b in zip(by[sft], by[ppo]))
    assert pair["rm_win_rate"] == pytest.approx(wins / len(WORDS))
    assert "| checkpoint |" in (out / "eval.md").read_text() and "reward-model win rate" in stdout


def test_eval_base_and_sampled_answers(run, tmp_path, cli):
    """'base' is the bare model; sampled answers use the same keys for every checkpoint."""
    r, out = run["run"], tmp_path / "eval"
    code, _, err = cli("eval", "--checkpoints", "base", r / "ppo", "--prompts", run["prompts"],
                       "--reward-fn", run["reward_fn"], "--reference", "base", "--temperature", "1.0",
                       "--n-samples", 2, "--max-new-tokens", 5, "--device", "cpu", "--no-progress", "--out", out)
    assert code == 0, err
    result = json.loads((out / "eval.json").read_text())
    assert result["checkpoints"]["base"]["n"] == 2 * len(WORDS)
    rows = [x for x in read_rows(out / "answers.jsonl") if x["checkpoint"] == "base"]
    assert all(x["kl"] == pytest.approx(0.0, abs=1e-4) for x in rows)  # base against base
    assert {x["sample"] for x in rows} == {0, 1}
    pair = result["pairs"][f"{r / 'ppo'} vs base"]
    assert pair["mcnemar_p"] is None  # two answers per prompt: no one-answer McNemar


def test_eval_refuses_bad_input(run, tmp_path, cli):
    r = run["run"]
    code, _, err = cli("eval", "--checkpoints", r / "sft", "--prompts", run["prompts"], "--device", "cpu")
    one_line_error(code, err, "--reward-fn", "--reward-checkpoint")
    code, _, err = cli("eval", "--checkpoints", tmp_path / "nope", "--prompts", run["prompts"],
                       "--reward-fn", run["reward_fn"])
    one_line_error(code, err, "nope")
    code, _, err = cli("eval", "--checkpoints", "base", "--prompts", run["prompts"], "--reward-fn", run["reward_fn"])
    one_line_error(code, err, "base")
    code, _, err = cli("eval", "--checkpoints", r / "sft", r / "sft", "--prompts", run["prompts"],
                       "--reward-fn", run["reward_fn"])
    one_line_error(code, err, "twice")
    code, _, err = cli("eval", "--checkpoints", r / "sft", "--prompts", run["prompts"], "--reward-fn",
                       run["reward_fn"], "--temperature", "-1")
    one_line_error(code, err, "--temperature")


def _rows(xs, **extra):
    return [{"prompt": str(i), "index": i, "correct": bool(x), "reward": float(x), **extra} for i, x in enumerate(xs)]


def test_compare_is_paired_over_prompts():
    same = compare(_rows([1, 0] * 20), _rows([1, 0] * 20))
    assert same["accuracy_diff"] == 0 and not same["significant"] and not same["significant_decrease"]
    better = compare(_rows([0] * 40), _rows([1] * 30 + [0] * 10))
    assert better["significant"] and better["prompts_gained"] == 30 and better["mcnemar_p"] < 1e-6
    assert better["accuracy_diff_ci95"][0] > 0.5
    with pytest.raises(ValueError, match="same prompts"):
        compare(_rows([1, 0]), _rows([1, 0])[::-1])
    a = [dict(r, rm_score=0.0) for r in _rows([0] * 4)]
    b = [dict(r, rm_score=s) for r, s in zip(_rows([0] * 4), [1.0, -1.0, 0.0, 2.0])]
    assert compare(a, b)["rm_win_rate"] == pytest.approx((1 + 0 + 0.5 + 1) / 4)


def test_summarize_and_best_of_n():
    rows = [{"index": i // 2, "sample": i % 2, "prompt": str(i // 2), "correct": c, "reward": float(c),
             "rm_score": s, "n_tokens": 3 + i, "truncated": i == 3}
            for i, (c, s) in enumerate([(True, 0.1), (False, 0.9), (False, -1.0), (True, 2.0)])]
    s = summarize(rows)
    assert s["n"] == 4 and s["prompts"] == 2 and s["accuracy"] == 0.5 and s["rm_auc"] == pytest.approx(0.75)
    assert s["length"] == {"mean": 4.5, "median": 4.5, "max": 6, "truncated_frac": 0.25}
    bo = best_of_n(rows)
    # prompt 0: the RM picks the wrong sample (0.9); prompt 1: the right one (2.0)
    assert bo["rm_pick_accuracy"] == 0.5 and bo["oracle_accuracy"] == 1.0 and bo["sample_accuracy"] == 0.5
    assert torch.isfinite(torch.tensor(bo["rm_pick_accuracy_ci95"])).all()
