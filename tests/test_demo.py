"""The arithmetic task (parser, split, annotator) and an end-to-end ``rlfuse demo --preset tiny``."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from rlfuse.engine.tasks import arithmetic as A


# --------------------------------------------------------------------------- task

def test_problem_space_and_prompts():
    probs = A.all_problems()
    assert len(probs) == 155 and all(p.answer >= 0 for p in probs)
    assert A.format_prompt(A.Problem(4, "-", 2), A.Problem(3, "-", 1)) == "What's 4-2 and 3-1?"
    assert A.problems_in("What's 4-2 and 3-1?") == (A.Problem(4, "-", 2), A.Problem(3, "-", 1))
    # a chat-rendered prompt: the problems are the last two expressions
    rendered = "<|im_start|>system\nBe 100% helpful<|im_end|>\n<|im_start|>user\nWhat's 9+8 and 6-0?<|im_end|>"
    assert A.problems_in(rendered) == (A.Problem(9, "+", 8), A.Problem(6, "-", 0))


def test_heldout_split_is_disjoint_and_fixed():
    held = A.heldout_prompts(500)
    assert len(set(held)) == 500 and all(A.is_heldout(p) for p in held)
    assert held == A.heldout_prompts(500)  # the evaluation set does not move between runs
    for seed in (0, 1, 7):
        train = A.train_prompts(3000, seed=seed)
        assert len(set(train)) == 3000
        assert not set(train) & set(held)
        assert not any(A.is_heldout(p) for p in train)
    assert A.train_prompts(50, seed=0) != A.train_prompts(50, seed=1)
    n_held, n_train = len(A._split(True)), len(A._split(False))
    assert n_held + n_train == 155 * 154 and 0.07 < n_held / (n_held + n_train) < 0.13


PROMPT = "What's 4-2 and 3-1?"


@pytest.mark.parametrize("answer, parsed", [
    ("4-2 = 2 and 3-1 = 2, so the answers are 2 and 2.", (2, 2)),
    ("4-2 = 2 and 3-1 = 2.", (2, 2)),
    ("4 - 2 = 2, 3 - 1 = 2", (2, 2)),
    ("4−2 = 2 and 3−1 = 2", (2, 2)),  # unicode minus
    ("4 minus 2 is 2 and 3 minus 1 equals 2", (2, 2)),
    ("**4-2 = 2** and **3-1 = 2**", (2, 2)),
    ("The answers are: 2, 2", (2, 2)),
    ("4-2 = 3 and 3-1 = 2", (3, 2)),
    ("3-1 = 2 and 4-2 = 5", (5, 2)),  # reordered: mapped back onto the question's order
    ("4-2 = 2", (2, None)),
    # the final phrase wins over the working
    ("4-2 = 2 and 3-1 = 2, so the answers are 2 and 3.", (2, 3)),
    ("4-2 = 2 and 3-1 = 2; answer is 1 and 1, no wait, the answers are 2 and 2", (2, 2)),
    # echoing the question or a lone number is not an answer
    ("4-2 and 3-1 are a classic riddle.", None),
    ("The answer to this classic math problem is 11.", None),
    ("", None),
    ("14-2 = 12 and 33-1 = 32", None),  # other numbers, not this question's
])
def test_parse_answer(answer, parsed):
    assert A.parse_answer(answer, A.problems_in(PROMPT)) == parsed


def test_grade_and_reward():
    assert A.grade(PROMPT, "4-2 = 2 and 3-1 = 2, so the answers are 2 and 2.") == (2, True)
    assert A.grade(PROMPT, "4-2 = 2 and 3-1 = 2.") == (2, False)
    assert A.grade(PROMPT, "4-2 = 3 and 3-1 = 2") == (1, False)
    assert A.is_correct(PROMPT, A.ideal_response(PROMPT))
    assert not A.is_correct(PROMPT, "4-2 = 2")
    assert A.reward([PROMPT] * 3, ["4-2 = 2 and 3-1 = 2.", "4-2 = 2 and 3-1 = 9.", "hmm"]) == [1.0, 0.5, 0.0]
    for p in A.train_prompts(200, seed=3):  # every ideal answer grades as right
        assert A.grade(p, A.ideal_response(p))[0] == 2
    with pytest.raises(ValueError):
        A.grade("hello", "2 and 2")


def test_annotator_orders_by_correctness_then_format_then_length():
    good_final = "4-2 = 2 and 3-1 = 2, so the answers are 2 and 2."
    good_short = "4-2 = 2 and 3-1 = 2."
    half = "4-2 = 2 and 3-1 = 3."
    wrong = "4-2 = 1 and 3-1 = 1, so the answers are 1 and 1."
    junk = "A classic riddle!"
    keys = {c: A.rank_key(PROMPT, c) for c in (good_final, good_short, half, wrong, junk)}
    assert keys[good_final] > keys[good_short] > keys[half] > keys[wrong] > keys[junk]
    assert A.rank_key(PROMPT, "4-2 = 2 and 3-1 = 2.") > A.rank_key(PROMPT, "4-2 = 2 and 3-1 = 2. Easy!")

    pairs = A.preference_pairs(PROMPT, [junk, half, good_short, wrong, good_short], max_pairs=10)
    assert pairs and all(p["prompt"] == PROMPT for p in pairs)
    for p in pairs:  # every chosen answer is strictly more correct than its rejected one
        assert A.grade(PROMPT, p["chosen"])[0] > A.grade(PROMPT, p["rejected"])[0]
    assert pairs[0]["chosen"] == good_short and pairs[0]["rejected"] in (wrong, junk)
    assert len({(p["chosen"], p["rejected"]) for p in pairs}) == len(pairs)  # duplicates counted once
    assert len(A.preference_pairs(PROMPT, [junk, half, good_short, wrong], max_pairs=2)) == 2
    # answers that tie on correctness give no pair unless asked for format pairs
    assert A.preference_pairs(PROMPT, [good_final, good_short]) == []
    fmt = A.preference_pairs(PROMPT, [good_short, good_final], correctness_only=False)
    assert fmt == [{"prompt": PROMPT, "chosen": good_final, "rejected": good_short}]


# --------------------------------------------------------------------------- annotator and statistics

def test_annotator_writes_k_way_rankings_by_correctness():
    from rlfuse.engine.demo.task import annotator_ranking

    both, one, none_right = "4-2 = 2 and 3-1 = 2.", "4-2 = 2 and 3-1 = 5.", "4-2 = 7 and 3-1 = 5."
    other_one = "4-2 = 9 and 3-1 = 2."
    r = annotator_ranking(A, PROMPT, [one, both, none_right, other_one, both])
    assert r["prompt"] == PROMPT and r["responses"] == [one, both, none_right, other_one]  # duplicates once
    assert r["ranks"] == [2, 1, 3, 2]  # dense ranks by the number of right results; ties allowed
    assert annotator_ranking(A, PROMPT, [one, other_one]) is None  # all tied: nothing to learn
    # the full key breaks ties by readability, then length
    full = annotator_ranking(A, PROMPT, [both + " Easy!", both], by="full")
    assert full["ranks"] == [2, 1]


def test_paired_comparison():
    from rlfuse.engine.evaluate import compare

    rows = lambda xs: [{"prompt": str(i), "correct": bool(x), "reward": float(x)} for i, x in enumerate(xs)]
    same = compare(rows([1, 0] * 20), rows([1, 0] * 20))
    assert same["accuracy_diff"] == 0 and not same["significant"] and not same["significant_decrease"]
    better = compare(rows([0] * 40), rows([1] * 30 + [0] * 10))
    assert better["significant"] and better["prompts_gained"] == 30 and better["mcnemar_p"] < 1e-6
    worse = compare(rows([1] * 40), rows([0] * 30 + [1] * 10))
    assert worse["significant_decrease"] and not worse["significant"] and worse["prompts_lost"] == 30
    with pytest.raises(ValueError, match="same prompts"):
        compare(rows([1, 0]), rows([1, 0])[::-1])


# --------------------------------------------------------------------------- end to end

def test_demo_tiny_end_to_end(tmp_path):
    """The whole demo on the random tiny model, through the real CLI, in a subprocess."""
    run_dir = tmp_path / "demo"
    proc = subprocess.run([sys.executable, "-c", "import sys; from rlfuse.engine.cli import main; sys.exit(main())",
                           "demo", "--preset", "tiny", "--out", str(run_dir), "--no-progress"],
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    summary = json.loads((run_dir / "demo_summary.json").read_text())
    assert summary["stage_names"] == ["base", "sft", "ppo"]
    assert [s["stage"] for s in summary["stages"]] == ["base", "sft", "ppo"]
    assert all(s["n"] == summary["data"]["heldout_prompts"] > 0 for s in summary["stages"])
    assert set(summary["comparisons"]) == {"SFT vs base", "PPO vs SFT"}
    table = (run_dir / "demo_table.md").read_text()
    for stage in ("base", "sft", "ppo"):
        assert f"| {stage} |" in table
        rows = [json.loads(x) for x in (run_dir / f"eval_{stage}.jsonl").read_text().splitlines()]
        assert len(rows) == summary["data"]["heldout_prompts"]
        held = {json.loads(x)["prompt"] for x in (run_dir / "data" / "heldout_prompts.jsonl").read_text().splitlines()}
        assert {r["prompt"] for r in rows} == held
    for d in ("sft", "rm", "ppo"):  # the engine's per-stage output
        assert (run_dir / d).is_dir()
    assert (run_dir / "metrics.jsonl").is_file() and (run_dir / "summary.json").is_file()
    engine_summary = json.loads((run_dir / "summary.json").read_text())
    assert {"sft", "rm", "ppo"} <= set(engine_summary)
    # training data never contains a held-out prompt
    train = {json.loads(x)["prompt"] for f in ("sft.jsonl", "rankings.jsonl", "ppo_prompts.jsonl")
             for x in (run_dir / "data" / f).read_text().splitlines()}
    assert not train & held
    assert "PPO vs SFT" in proc.stdout and "accuracy" in proc.stdout
    # the annotator's output is the K-way rankings format, and the reward model trained on it
    rankings = [json.loads(x) for x in (run_dir / "data" / "rankings.jsonl").read_text().splitlines()]
    assert any(len(r["responses"]) > 2 for r in rankings)
    assert all(len(r["ranks"]) == len(r["responses"]) and min(r["ranks"]) == 1 for r in rankings)
    assert engine_summary["rm"]["train_pairs"] + engine_summary["rm"]["eval_pairs"] == summary["reward_model"]["pairs"]
    # classic PPO by default (GAE: the critic is trained, so PPO logs a value loss)
    assert summary["ppo_advantage"] == "gae"
    ppo_rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()
                if json.loads(x).get("stage") == "ppo"]
    assert ppo_rows and all(r["value_loss"] is not None for r in ppo_rows)
    # memory: per-stage peaks and PPO's per-phase peaks, all above the loaded model's RSS
    mem = summary["memory"]
    assert set(mem["stage_peak_mb"]) == {"0_base", "1_sft", "2_annotate", "3_reward_model", "4_ppo"}
    assert {"peak_mem_generation_mb", "peak_mem_scoring_mb", "peak_mem_update_mb"} <= set(mem["ppo_phase_peak_mb"])
    assert 0 < mem["model_loaded_rss_mb"] <= max(mem["stage_peak_mb"].values()) <= mem["peak_rss_mb"]
    # ... and the same per-stage breakdown in the run's metrics.jsonl (rows of stage "demo")
    demo_rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()
                 if json.loads(x).get("stage") == "demo"]
    assert [r["demo_stage"] for r in demo_rows] == list(mem["stage_peak_mb"])
    assert [r["step"] for r in demo_rows] == [1, 2, 3, 4, 5]
    assert all(r["peak_mem_mb"] == mem["stage_peak_mb"][r["demo_stage"]] and r["rss_after_mb"] > 0 for r in demo_rows)
    # the engine stages trained in micro-batches (the tiny preset leaves the config's defaults)
    rm_rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()
               if json.loads(x).get("stage") == "rm"]
    assert rm_rows and all(r["micro_batches"] >= 1 for r in rm_rows)
    # stage 5: every saved PPO checkpoint answered the held-out prompts (the curve; 0 = SFT), and the
    # reward model picked among the SFT policy's samples (best-of-n)
    assert [p["step"] for p in summary["curve"]["heldout"]] == [0, 1, 2]
    assert summary["curve"]["heldout"][-1]["accuracy"] == summary["stages"][-1]["accuracy"]
    assert [p["step"] for p in summary["curve"]["training"]] == [1, 2]
    assert (run_dir / "ppo_curves.png").stat().st_size > 1000
    assert summary["best_of"]["prompts"] == 6 and summary["best_of"]["samples_per_prompt"] == 2
    assert 0 <= summary["reward_model"]["heldout_auc"] <= 1 or summary["reward_model"]["heldout_auc"] != summary[
        "reward_model"]["heldout_auc"]  # nan when every SFT answer is wrong (the random model)


def test_demo_advantage_flag_selects_rloo(tmp_path):
    from rlfuse.engine.demo import parse_args, setup

    assert setup(parse_args(["--preset", "tiny", "--out", str(tmp_path / "a")])).cfg.ppo.advantage == "gae"
    run = setup(parse_args(["--preset", "tiny", "--advantage", "rloo", "--out", str(tmp_path / "b")]))
    assert run.cfg.ppo.advantage == "rloo" and run.cfg.ppo.n_samples >= 2
    assert not set(run.heldout) & {p for split in run.splits.values() for p in split}
    with pytest.raises(SystemExit):
        parse_args(["--advantage", "ppo"])


def test_readme_demo_table_is_generated_from_the_committed_run():
    """README's demo table is `python -m rlfuse.engine.demo.report`'s rendering of the committed
    run (and its ceiling run), not typed by hand; the curves beside it come from that run."""
    from pathlib import Path

    from rlfuse.engine.demo.report import MARK_END, MARK_START, table_markdown

    root = Path(__file__).resolve().parents[1]
    results = root / "benchmarks" / "results" / "demo"
    summary = json.loads((results / "demo_summary.json").read_text())
    ceiling_file = results / "ceiling" / "demo_summary.json"
    ceiling = json.loads(ceiling_file.read_text()) if ceiling_file.is_file() else None
    block = (root / "README.md").read_text().split(MARK_START, 1)[1].split(MARK_END, 1)[0]
    assert block == "\n" + table_markdown(summary, ceiling)
    assert summary["ppo_advantage"] == "gae" and summary["ppo_reward"] == "reward model"  # the flagship
    assert (results / "ppo_curves.png").stat().st_size > 10_000
