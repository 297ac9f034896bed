"""``rlfuse label export``: labels.jsonl -> training data.

    rankings  {"prompt", "responses": [...], "ranks": [...]}   (``rlfuse rm --data`` reads it;
              ranks[i] is the rank of responses[i], 1 = best, equal = tie)
    pairs     {"prompt", "chosen", "rejected"}                  (rlfuse's pair format)
    trl       TRL's preference format with an explicit prompt: {"prompt", "chosen", "rejected"},
              plus "margin" (the rank gap) with ``--margin``. One style per file, since
              ``datasets`` types a column from all its rows: ``--trl-style conversational``
              (message lists; the system message is the prompt's first turn) or ``standard``
              (plain strings; refused when a label has a system message, which it cannot carry).
              The default is conversational when any exported label has a system message.
Only the label that counts is exported: the latest per (annotator, task), so a re-submitted
label replaces the earlier one. Skipped items are left out. Tied pairs carry no preference
and identical texts cannot be preferred to themselves, so both are dropped: a text that
appears twice keeps one copy, or none when its copies were ranked differently. Each
annotator's label is its own record (the reward model splits train/held-out by prompt, so
they never straddle the split).
"""

from __future__ import annotations

import json
from pathlib import Path

from ..checkpoint import write_text_atomic
from .records import Label, latest_labels, read_labels

FORMATS = ("rankings", "pairs", "trl")
TRL_STYLES = ("conversational", "standard")


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


def _trl_record(label: Label, chosen: str, rejected: str, gap: int, margin: bool, style: str) -> dict:
    if style == "standard":
        rec = {"prompt": label.prompt, "chosen": chosen, "rejected": rejected}
    else:  # TRL's conversational form, the one that carries a system message
        system = [{"role": "system", "content": label.system}] if label.system is not None else []
        rec = {"prompt": [*system, {"role": "user", "content": label.prompt}],
               "chosen": [{"role": "assistant", "content": chosen}],
               "rejected": [{"role": "assistant", "content": rejected}]}
    if margin:
        rec["margin"] = float(gap)
    return rec


def trl_style_for(labels: list[Label], style: str | None) -> str:
    """The one TRL style of a file: ``style``, or conversational when any label has a system message."""
    with_system = next((lb for lb in labels if lb.system is not None), None)
    if style is None:
        return "conversational" if with_system else "standard"
    if style not in TRL_STYLES:
        raise ValueError(f"--trl-style must be one of {', '.join(TRL_STYLES)}, got {style!r}")
    if style == "standard" and with_system is not None:
        raise ValueError(f"--trl-style standard has no place for the system message of task "
                         f"{with_system.task_id!r}: use --trl-style conversational (the default when a "
                         "task has a system message)")
    return style


def export_records(labels: list[Label], fmt: str, *, margin: bool = False, trl_style: str | None = None) -> list[dict]:
    """Records of ``fmt`` from the labels that count (see the module doc)."""
    if fmt not in FORMATS:
        raise ValueError(f"--format must be one of {', '.join(FORMATS)}, got {fmt!r}")
    labels = [lb for lb in latest_labels(labels) if not lb.skipped]
    style = trl_style_for(labels, trl_style) if fmt == "trl" else None
    out = []
    for label in labels:
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
            out += [_trl_record(label, c, r, gap, margin, style) for c, r, gap in pairs]
    return out


def export_labels(labels_path, fmt: str, out, *, margin: bool = False, trl_style: str | None = None) -> dict:
    if trl_style is not None and fmt != "trl":
        raise ValueError(f"--trl-style is for --format trl, not --format {fmt}")
    if Path(out).is_dir():  # os.replace cannot put a file over a directory
        raise ValueError(f"--out {out} is a directory: name the JSONL file to write, e.g. {Path(out) / 'labels.jsonl'}")
    every = read_labels(labels_path)
    labels = latest_labels(every)
    records = export_records(labels, fmt, margin=margin, trl_style=trl_style)
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    write_text_atomic(out, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records))
    summary = {"labels": len(labels), "superseded": len(every) - len(labels),
               "skipped": sum(lb.skipped for lb in labels), "records": len(records), "format": fmt, "out": str(out)}
    if fmt == "trl":
        summary["trl_style"] = trl_style_for([lb for lb in labels if not lb.skipped], trl_style)
    return summary
