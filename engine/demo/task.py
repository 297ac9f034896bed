"""The demo's data: disjoint prompt splits of the arithmetic task, the files each engine stage
reads, and the scripted annotator that ranks sampled answers (standing in for people; its
output is the K-way rankings file a person writes with ``rlfuse label``)."""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path

from ..checkpoint import write_text_atomic
from ..tasks import arithmetic as task

GRADER = "rlfuse.engine.tasks.arithmetic:reward"  # the task's reward: the share of the two answers right


@dataclass(frozen=True)
class Splits:
    heldout: list[str]  # every stage answers these; never trained on
    sft: list[str]
    annotate: list[str]
    synthetic: list[str]
    ppo: list[str]


def make_splits(d, seed: int) -> Splits:
    """Disjoint slices of one seeded sample of the training split, and the fixed held-out set."""
    sizes = {"sft": d.n_sft, "annotate": d.n_annotate, "synthetic": d.n_synthetic, "ppo": d.n_ppo_prompts}
    for name, n in {"n_eval": d.n_eval, **{f"n_{k}": v for k, v in sizes.items()}}.items():
        if n < (0 if name == "n_synthetic" else 1):
            raise ValueError(f"demo.{name} must be >= 1, got {n}")
    train = task.train_prompts(sum(sizes.values()), seed=seed)
    parts, start = {}, 0
    for name, n in sizes.items():
        parts[name], start = train[start: start + n], start + n
    heldout = task.heldout_prompts(d.n_eval)
    if set(heldout) & set(train):
        raise AssertionError("held-out prompts leaked into training")
    return Splits(heldout=heldout, **parts)


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    # ASCII escapes: no U+2028 or U+0085 in a line, which str.splitlines would split on
    return write_text_atomic(path, "".join(json.dumps(r) + "\n" for r in rows))


def write_stage_data(data_dir: Path, s: Splits, system: str, best_of: int = 0) -> dict[str, Path]:
    """sft.jsonl (the ideal answers), ppo_prompts.jsonl, annotate_prompts.jsonl, heldout_prompts.jsonl and
    best_of_prompts.jsonl (the first ``best_of`` held-out prompts)."""
    return {
        "sft": write_jsonl(data_dir / "sft.jsonl", [{"system": system, "prompt": p, "response": task.ideal_response(p)}
                                                   for p in s.sft]),
        "ppo": write_jsonl(data_dir / "ppo_prompts.jsonl", [{"system": system, "prompt": p} for p in s.ppo]),
        "annotate": write_jsonl(data_dir / "annotate_prompts.jsonl", [{"system": system, "prompt": p}
                                                                      for p in s.annotate]),
        "best_of": write_jsonl(data_dir / "best_of_prompts.jsonl", [{"system": system, "prompt": p}
                                                                    for p in s.heldout[:best_of]]),
        "heldout": write_jsonl(data_dir / "heldout_prompts.jsonl",
                               [{"system": system, "prompt": p, "answers": [x.answer for x in task.problems_in(p)]}
                                for p in s.heldout]),
    }


def answered(prompt: str, completion: str) -> bool:
    """Whether the answer states a result for both problems (right or wrong)."""
    parsed = task.parse_answer(completion, task.problems_in(prompt))
    return parsed is not None and None not in parsed


# --------------------------------------------------------------------------- the scripted annotator

def annotator_ranking(task_module, prompt: str, completions: list[str], *, by: str = "correctness",
                      system: str | None = None) -> dict | None:
    """The scripted annotator's K-way ranking of one prompt's answers, in the rankings format
    ``rlfuse rm`` reads ({"prompt", "responses", "ranks"}, 1 = best, equal = tie): by the
    number of right results (``by="correctness"``), or by the rater's full key (correctness,
    then readability, then length: ``by="full"``). Duplicate texts count once; None when every
    answer ties (nothing to learn)."""
    unique = list(dict.fromkeys(completions))
    keys = [task_module.rank_key(prompt, c) if by == "full" else task_module.grade(prompt, c)[0] for c in unique]
    levels = sorted(set(keys), reverse=True)
    if len(levels) < 2:
        return None
    row = {"prompt": prompt, "responses": unique, "ranks": [levels.index(k) + 1 for k in keys]}
    return {"system": system, **row} if system is not None else row


def _pairs(ranks: list[int]) -> int:  # non-tied pairs of one ranking
    return sum(a != b for i, a in enumerate(ranks) for b in ranks[:i])


def write_rankings(data_dir: Path, rows: list[dict], synthetic: list[str], *, system: str, seed: int) -> tuple[Path, dict]:
    """Rank each prompt's sampled answers (``evaluate.answer`` rows, K per prompt) and add one
    synthetic pair per synthetic prompt; one shuffled rankings file. Returns (path, what it holds)."""
    groups: dict[int, list[dict]] = {}
    for r in rows:
        groups.setdefault(r["index"], []).append(r)
    by = "correctness"
    ranked = [x for g in groups.values() if (x := annotator_ranking(task, g[0]["prompt"], [r["completion"] for r in g],
                                                                  system=system))]
    if not ranked:  # e.g. the random tiny model, never right: rank by the rater's tie-breaks
        print("[demo] warning: no sampled answers differ in correctness; ranking by readability and length")
        by = "full"
        ranked = [x for g in groups.values() if (x := annotator_ranking(task, g[0]["prompt"],
                                                                      [r["completion"] for r in g], by=by,
                                                                      system=system))]
    if not ranked:
        raise RuntimeError("the annotator could not rank any sampled answers; sample more (demo.annotate_samples)")
    rng = random.Random(seed)
    pairs = [{"system": system, "prompt": x["prompt"], "responses": [x["chosen"], x["rejected"]], "ranks": [1, 2]}
             for p in synthetic for x in task.synthetic_pairs(p, rng)]
    mixed = ranked + pairs
    random.Random(seed + 1).shuffle(mixed)  # the RM's held-out prompts mix both kinds
    write_jsonl(data_dir / "annotated_samples.jsonl",
                [{"prompt": r["prompt"], "completion": r["completion"], "rank_key": list(task.rank_key(r["prompt"],
                                                                                                 r["completion"]))}
                 for r in rows])
    on_policy = sum(_pairs(x["ranks"]) for x in ranked)
    info = {"rankings": len(ranked), "ranked_by": by, "on_policy_pairs": on_policy, "synthetic_pairs": len(pairs),
            "pairs": on_policy + len(pairs), "all_tied_prompts": len(groups) - len(ranked),
            "annotated_samples": len(rows), "sampled_answer_accuracy": sum(r["correct"] for r in rows) / len(rows)}
    return write_jsonl(data_dir / "rankings.jsonl", mixed), info
