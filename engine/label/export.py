"""``rlfuse label export``: labels.jsonl -> training data.

    rankings  {"prompt", "responses": [...], "ranks": [...]}   (``rlfuse rm --data`` reads it;
              ranks[i] is the rank of responses[i], 1 = best, equal = tie)
    pairs     {"prompt", "chosen", "rejected"}                  (rlfuse's pair format)
    trl       TRL's preference format with an explicit prompt: {"prompt", "chosen", "rejected"}
              (conversational message lists when the task has a system message), plus
              "margin" (the rank gap) with ``--margin``
Skipped items are left out. Tied pairs carry no preference and identical texts cannot be
preferred to themselves, so both are dropped: a text that appears twice keeps one copy, or
none when its copies were ranked differently. Each annotator's label is its own record
(the reward model splits train/held-out by prompt, so they never straddle the split).
"""

from __future__ import annotations

import json
from pathlib import Path

from ..checkpoint import write_text_atomic
from .records import Label, read_labels

FORMATS = ("rankings", "pairs", "trl")


def distinct_ranking(label: Label) -> tuple[list[str], list[int]]:
    """The label's responses and ranks with identical texts resolved (see the module doc)."""
    ranks_of: dict[str, set[int]] = {}
    for text, rank in zip(label.responses, label.ranks):
        ranks_of.setdefault(text, set()).add(rank)
    kept = [(text, ranks.pop()) for text, ranks in ranks_of.items() if len(ranks) == 1]
    return [t for t, _ in kept], [r for _, r in kept]


def preference_pairs(responses: list[str], ranks: list[int]) -> list[tuple[str, str, int]]:
    """(chosen, rejected, rank gap) for every non-tied pair, best first."""
    order = sorted(range(len(ranks)), key=lambda i: ranks[i])
    return [(responses[i], responses[j], ranks[j] - ranks[i])
            for a, i in enumerate(order) for j in order[a + 1:] if ranks[i] < ranks[j]]


def _context(label: Label) -> dict:
    return {"prompt": label.prompt, **({"system": label.system} if label.system is not None else {})}


def _trl_record(label: Label, chosen: str, rejected: str, gap: int, margin: bool) -> dict:
    if label.system is None:
        rec = {"prompt": label.prompt, "chosen": chosen, "rejected": rejected}
    else:  # TRL's conversational form is the one that carries a system message
        rec = {"prompt": [{"role": "system", "content": label.system}, {"role": "user", "content": label.prompt}],
               "chosen": [{"role": "assistant", "content": chosen}],
               "rejected": [{"role": "assistant", "content": rejected}]}
    if margin:
        rec["margin"] = float(gap)
    return rec


def export_records(labels: list[Label], fmt: str, *, margin: bool = False) -> list[dict]:
    if fmt not in FORMATS:
        raise ValueError(f"--format must be one of {', '.join(FORMATS)}, got {fmt!r}")
    out = []
    for label in labels:
        if label.skipped:
            continue
        responses, ranks = distinct_ranking(label)
        pairs = preference_pairs(responses, ranks)
        if not pairs:  # all tied, or fewer than two distinct texts
            continue
        if fmt == "rankings":
            out.append({**_context(label), "responses": responses, "ranks": ranks, "task_id": label.task_id,
                        "annotator": label.annotator, **({"none_acceptable": True} if label.none_acceptable else {})})
        elif fmt == "pairs":
            out += [{**_context(label), "chosen": c, "rejected": r} for c, r, _ in pairs]
        else:
            out += [_trl_record(label, c, r, gap, margin) for c, r, gap in pairs]
    return out


def export_labels(labels_path, fmt: str, out, *, margin: bool = False) -> dict:
    if Path(out).is_dir():  # os.replace cannot put a file over a directory
        raise ValueError(f"--out {out} is a directory: name the JSONL file to write, e.g. {Path(out) / 'labels.jsonl'}")
    labels = read_labels(labels_path)
    records = export_records(labels, fmt, margin=margin)
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    write_text_atomic(out, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records))
    return {"labels": len(labels), "skipped": sum(lb.skipped for lb in labels), "records": len(records),
            "format": fmt, "out": str(out)}
