"""Small-sample statistics for comparing evaluations of the same prompts.

    wilson_interval      95% interval of a proportion (k right out of n), sound near 0 and 1
    mean_se              mean and its standard error
    paired_bootstrap_ci  percentile CI of mean(b - a), resampling the SAME items for a and b
    mcnemar_exact        exact two-sided test on the items where exactly one side is right
    auc                  P(score of a positive > score of a negative), ties counting half

The demo evaluates every stage greedily on one fixed prompt set, so stage-to-stage changes
are paired: pairing removes the between-prompt variance an unpaired test would carry.
"""

from __future__ import annotations

import math


def wilson_interval(k: int, n: int, z: float = 1.96) -> tuple[float, float]:
    """Wilson score interval of k successes in n trials (nan, nan for n = 0)."""
    if n == 0:
        return float("nan"), float("nan")
    p = k / n
    den = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / den
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / den
    return max(0.0, centre - half), min(1.0, centre + half)


def mean_se(xs: list[float]) -> tuple[float, float]:
    """(mean, standard error with the n-1 variance); se is nan below two values."""
    n = len(xs)
    if n == 0:
        return float("nan"), float("nan")
    m = sum(xs) / n
    if n < 2:
        return m, float("nan")
    var = sum((x - m) ** 2 for x in xs) / (n - 1)
    return m, math.sqrt(var / n)


def paired_bootstrap_ci(a: list[float], b: list[float], *, n_boot: int = 10000, seed: int = 0,
                        level: float = 0.95) -> tuple[float, float, float]:
    """(mean(b - a), lower, upper): percentile CI from resampling the same items for both."""
    import numpy as np

    if len(a) != len(b):
        raise ValueError(f"paired_bootstrap_ci: the two samples must be paired, got {len(a)} and {len(b)} values")
    d = np.asarray(b, dtype=float) - np.asarray(a, dtype=float)
    if d.size == 0:
        return float("nan"), float("nan"), float("nan")
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, d.size, size=(n_boot, d.size))
    means = d[idx].mean(axis=1)
    lo, hi = np.quantile(means, [(1 - level) / 2, 1 - (1 - level) / 2])
    return float(d.mean()), float(lo), float(hi)


def mcnemar_exact(a: list[bool], b: list[bool]) -> tuple[int, int, float]:
    """(items only b got right, items only a got right, two-sided exact p): a binomial test
    of the discordant items against 1/2."""
    if len(a) != len(b):
        raise ValueError(f"mcnemar_exact: the two samples must be paired, got {len(a)} and {len(b)} values")
    only_b = sum(1 for x, y in zip(a, b) if y and not x)
    only_a = sum(1 for x, y in zip(a, b) if x and not y)
    n = only_a + only_b
    if n == 0:
        return only_b, only_a, 1.0
    k = min(only_a, only_b)
    tail = sum(math.comb(n, i) for i in range(k + 1)) / 2 ** n
    return only_b, only_a, min(1.0, 2 * tail)


def auc(scores: list[float], labels: list[bool]) -> float:
    """Area under the ROC curve: how well ``scores`` rank the True labels above the False
    ones (0.5 = chance; nan when one class is missing)."""
    pos = [s for s, y in zip(scores, labels) if y]
    neg = [s for s, y in zip(scores, labels) if not y]
    if not pos or not neg:
        return float("nan")
    wins = sum((p > n) + 0.5 * (p == n) for p in pos for n in neg)
    return wins / (len(pos) * len(neg))
