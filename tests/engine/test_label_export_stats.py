"""``rlfuse label export`` and ``rlfuse label stats`` on hand-written labels."""

from __future__ import annotations

import json

import pytest
from engine_helpers import read_rows, write_jsonl

from rlfuse.engine.data import load_rankings
from rlfuse.engine.label.stats import kendall_tau_b, label_stats, pair_agreement
from rlfuse.engine.tiny import build_tokenizer


def lab(task_id, annotator, ranks, *, responses=("a", "b", "c"), order=None, skipped=False, seconds=2.0, **kw):
    return {"task_id": task_id, "annotator": annotator, "prompt": f"prompt {task_id}", "responses": list(responses),
            "ranks": None if skipped else ranks, "skipped": skipped, "shown_order": order or [0, 1, 2][:len(responses)],
            "seconds": seconds, **kw}


@pytest.fixture
def labels(tmp_path):
    return write_jsonl(tmp_path / "labels.jsonl", [
        lab("t0", "ann", [2, 1, 3]),
        lab("t1", "ann", [1, 1, 2]),  # a tie: (a, b) carries no preference
        lab("t2", "ann", None, skipped=True),
        lab("t3", "ann", [1, 2, 1], responses=("same", "other", "same")),  # identical texts, one rank: one copy
        lab("t4", "ann", [1, 2, 3], responses=("same", "other", "same")),  # ranked differently: both dropped
        lab("t5", "ann", [1, 1, 1]),  # all tied: nothing to learn
        lab("t6", "bob", [1, 2], responses=("x", "y"), order=[1, 0], system="be brief"),
    ])


def test_export_pairs_drops_ties_and_identical_texts(tmp_path, labels, cli):
    out = tmp_path / "pairs.jsonl"
    code, stdout, err = cli("label", "export", labels, "--format", "pairs", "--out", out)
    assert code == 0, err
    got = [(r["prompt"], r["chosen"], r["rejected"]) for r in read_rows(out)]
    assert got == [("prompt t0", "b", "a"), ("prompt t0", "b", "c"), ("prompt t0", "a", "c"),
                   ("prompt t1", "a", "c"), ("prompt t1", "b", "c"),
                   ("prompt t3", "same", "other"),
                   ("prompt t6", "x", "y")]
    assert read_rows(out)[-1]["system"] == "be brief"
    assert json.loads(stdout)["skipped"] == 1


def test_export_rankings_feeds_the_reward_model(tmp_path, labels, cli):
    out = tmp_path / "rankings.jsonl"
    assert cli("label", "export", labels, "--format", "rankings", "--out", out)[0] == 0
    rows = read_rows(out)
    assert [(r["task_id"], r["responses"], r["ranks"]) for r in rows] == [
        ("t0", ["a", "b", "c"], [2, 1, 3]), ("t1", ["a", "b", "c"], [1, 1, 2]),
        ("t3", ["same", "other"], [1, 2]), ("t6", ["x", "y"], [1, 2])]
    rankings, _ = load_rankings(out, build_tokenizer(), 64)  # the format `rlfuse rm --data` reads
    assert [r.ranks for r in rankings] == [[2, 1, 3], [1, 1, 2], [1, 2], [1, 2]]


def test_export_trl_preference_format(tmp_path, labels, cli):
    out = tmp_path / "trl.jsonl"
    assert cli("label", "export", labels, "--format", "trl", "--out", out, "--margin")[0] == 0
    rows = read_rows(out)  # t6 has a system message: the whole file is conversational
    assert rows[:3] == [{"prompt": [{"role": "user", "content": "prompt t0"}],
                         "chosen": [{"role": "assistant", "content": c}],
                         "rejected": [{"role": "assistant", "content": r}], "margin": m}
                        for c, r, m in (("b", "a", 1.0), ("b", "c", 2.0), ("a", "c", 1.0))]  # m = rank gap
    assert rows[-1] == {"prompt": [{"role": "system", "content": "be brief"}, {"role": "user", "content": "prompt t6"}],
                        "chosen": [{"role": "assistant", "content": "x"}],
                        "rejected": [{"role": "assistant", "content": "y"}], "margin": 1.0}
    with pytest.raises(SystemExit):  # argparse names the valid formats
        cli("label", "export", labels, "--format", "csv", "--out", out)


def test_kendall_tau_and_agreement_by_hand():
    assert kendall_tau_b([1, 2, 3], [1, 2, 3]) == 1.0
    assert kendall_tau_b([1, 2, 3], [3, 2, 1]) == -1.0
    # x orders all 3 pairs, y ties (0, 1): C=2, D=0, tau_b = 2 / sqrt(3 * 2)
    assert kendall_tau_b([1, 2, 3], [1, 1, 2]) == pytest.approx(2 / 6 ** 0.5)
    assert kendall_tau_b([1, 1], [1, 2]) is None
    assert pair_agreement([1, 2, 3], [2, 1, 3]) == (2, 3)
    assert pair_agreement([1, 2, 3], [1, 1, 2]) == (2, 2)


def test_stats_rates_position_bias_and_agreement(tmp_path, cli):
    from rlfuse.engine.label.records import read_labels

    rows = [lab("t0", "ann", [1, 2, 3], seconds=2.0), lab("t1", "ann", [2, 1, 2], order=[1, 0, 2], seconds=4.0),
            lab("t2", "ann", None, skipped=True, seconds=1.0), lab("t3", "ann", [3, 2, 1], order=[1, 2, 0]),
            lab("t0", "bob", [1, 3, 2], seconds=8.0), lab("t1", "bob", [3, 2, 1])]
    path = write_jsonl(tmp_path / "labels.jsonl", rows)
    stats = label_stats(read_labels(path))
    ann, bob = stats["per_annotator"]["ann"], stats["per_annotator"]["bob"]
    assert (ann["labels"], ann["skipped"], ann["skip_rate"]) == (4, 1, 0.25)
    assert ann["tie_rate"] == pytest.approx(1 / 3) and bob["tie_rate"] == 0.0
    assert ann["seconds_median"] == 2.0 and bob["seconds_mean"] == 5.0
    # ann ranked the first-shown card best on t0 (index 0) and t1 (index 1), not on t3 (index 1 is rank 2)
    assert ann["first_shown_best_rate"] == pytest.approx(2 / 3)
    assert ann["first_shown_best_chance"] == pytest.approx(1 / 3)
    (pair,) = stats["agreement"]
    assert pair["annotators"] == ["ann", "bob"] and pair["shared_items"] == 2
    # t0: (0,1) agree, (0,2) agree, (1,2) disagree; t1: ann ties (0,2); (0,1) agree, (1,2) disagree
    assert pair["pair_agreement"] == pytest.approx(3 / 5) and pair["pairs_compared"] == 5
    tau_t0 = (2 - 1) / 3
    tau_t1 = (1 - 1) / (2 * 3) ** 0.5
    assert pair["kendall_tau"] == pytest.approx((tau_t0 + tau_t1) / 2)
    code, out, err = cli("label", "stats", path)
    assert code == 0 and "ann" in out and "Kendall tau" in out and "60%" in out, err
