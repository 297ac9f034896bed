"""``rlfuse label stats``: how the annotators label, and how much they agree.

Per annotator: labels, skip rate, tie rate (share of ranked items with at least one tie),
"none acceptable" rate, seconds per item (median, mean), and position bias: how often the
card shown FIRST was ranked best, next to the rate expected when position does not matter
(the mean share of rank-1 cards per item).
Per pair of annotators, on the items both ranked: pairwise agreement (of the response pairs
both ordered, the share ordered the same way) and Kendall's tau-b (mean over items where it
is defined, i.e. neither annotator tied everything).
Only the label that counts enters: the latest per (annotator, task); ``superseded`` counts
the earlier ones that re-submissions replaced.
"""

from __future__ import annotations

import itertools
import json
import math
import statistics

from .records import Label, latest_labels, read_labels


def _sign(x: int) -> int:
    return (x > 0) - (x < 0)


def kendall_tau_b(x: list[int], y: list[int]) -> float | None:
    """Kendall's tau-b of two rankings of the same items (ties allowed); None when undefined."""
    concordant = discordant = tied_x = tied_y = 0
    for i, j in itertools.combinations(range(len(x)), 2):
        sx, sy = _sign(x[i] - x[j]), _sign(y[i] - y[j])
        tied_x += sx == 0
        tied_y += sy == 0
        concordant += sx * sy > 0
        discordant += sx * sy < 0
    n0 = len(x) * (len(x) - 1) // 2
    denom = math.sqrt((n0 - tied_x) * (n0 - tied_y))
    return (concordant - discordant) / denom if denom else None


def pair_agreement(x: list[int], y: list[int]) -> tuple[int, int]:
    """(agreeing, compared) over the response pairs that both rankings order (no tie in either)."""
    agree = compared = 0
    for i, j in itertools.combinations(range(len(x)), 2):
        sx, sy = _sign(x[i] - x[j]), _sign(y[i] - y[j])
        if sx and sy:
            compared += 1
            agree += sx == sy
    return agree, compared


def _rate(k: int, n: int) -> float | None:
    return k / n if n else None


def annotator_stats(labels: list[Label]) -> dict:
    ranked = [lb for lb in labels if not lb.skipped]
    seconds = [lb.seconds for lb in labels if lb.seconds is not None]
    first_best = sum(lb.ranks[lb.shown_order[0]] == 1 for lb in ranked)
    chance = sum(lb.ranks.count(1) / len(lb.ranks) for lb in ranked)
    return {"labels": len(labels), "ranked": len(ranked), "skipped": len(labels) - len(ranked),
            "skip_rate": _rate(len(labels) - len(ranked), len(labels)),
            "tie_rate": _rate(sum(len(set(lb.ranks)) < len(lb.ranks) for lb in ranked), len(ranked)),
            "none_acceptable_rate": _rate(sum(lb.none_acceptable for lb in ranked), len(ranked)),
            "seconds_median": statistics.median(seconds) if seconds else None,
            "seconds_mean": statistics.fmean(seconds) if seconds else None,
            "first_shown_best_rate": _rate(first_best, len(ranked)),
            "first_shown_best_chance": _rate(chance, len(ranked))}


def label_stats(labels: list[Label]) -> dict:
    every = len(labels)
    labels = latest_labels(labels)
    by_annotator: dict[str, list[Label]] = {}
    for lb in labels:
        by_annotator.setdefault(lb.annotator, []).append(lb)
    ranked = {a: {lb.task_id: lb for lb in ls if not lb.skipped} for a, ls in by_annotator.items()}
    agreement = []
    for a, b in itertools.combinations(sorted(by_annotator), 2):
        shared = [t for t in ranked[a] if t in ranked[b] and ranked[a][t].responses == ranked[b][t].responses]
        if not shared:
            continue
        agree = compared = 0
        taus = []
        for t in shared:
            x, y = ranked[a][t].ranks, ranked[b][t].ranks
            g, c = pair_agreement(x, y)
            agree, compared = agree + g, compared + c
            if (tau := kendall_tau_b(x, y)) is not None:
                taus.append(tau)
        agreement.append({"annotators": [a, b], "shared_items": len(shared),
                          "pair_agreement": _rate(agree, compared), "pairs_compared": compared,
                          "kendall_tau": statistics.fmean(taus) if taus else None})
    return {"labels": len(labels), "superseded": every - len(labels),
            "tasks": len({lb.task_id for lb in labels}), "annotators": len(by_annotator),
            "per_annotator": {a: annotator_stats(ls) for a, ls in sorted(by_annotator.items())},
            "agreement": agreement}


def _fmt(x, pct: bool = False) -> str:
    if x is None:
        return "-"
    return f"{x:.0%}" if pct else f"{x:.3g}" if isinstance(x, float) else str(x)


def render_stats(stats: dict) -> str:
    superseded = f" ({stats['superseded']} earlier labels superseded)" if stats["superseded"] else ""
    lines = [f"{stats['labels']} labels on {stats['tasks']} tasks by {stats['annotators']} annotators{superseded}", "",
             "annotator        labels  skip  ties  none-ok  s/item(median)  first-shown-best (chance)"]
    for name, s in stats["per_annotator"].items():
        lines.append(f"{name[:16]:<16} {s['labels']:>6}  {_fmt(s['skip_rate'], True):>4}"
                     f"  {_fmt(s['tie_rate'], True):>4}"
                     f"  {_fmt(s['none_acceptable_rate'], True):>7}  {_fmt(s['seconds_median']):>14}"
                     f"  {_fmt(s['first_shown_best_rate'], True)} ({_fmt(s['first_shown_best_chance'], True)})")
    if stats["agreement"]:
        lines += ["", "annotators                       shared  pair agreement  Kendall tau"]
        for g in stats["agreement"]:
            pair = " / ".join(n[:14] for n in g["annotators"])
            lines.append(f"{pair:<32} {g['shared_items']:>6}  {_fmt(g['pair_agreement'], True):>14}"
                         f"  {_fmt(g['kendall_tau']):>11}")
    else:
        lines += ["", "no item was ranked by two annotators (serve with --overlap 2 to measure agreement)"]
    return "\n".join(lines)


def print_stats(labels_path, *, as_json: bool = False) -> dict:
    stats = label_stats(read_labels(labels_path))
    print(json.dumps(stats, indent=2) if as_json else render_stats(stats))
    return stats
