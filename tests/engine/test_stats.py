"""engine/stats.py against known values: scipy where it has the same statistic, else hand-computed."""

from __future__ import annotations

import math
import random

import pytest

from rlfuse.engine.stats import auc, mcnemar_exact, mean_se, paired_bootstrap_ci, wilson_interval


def test_wilson_interval_known_values():
    # hand-computed: k=50, n=100, z=1.96 -> 0.5 +- 1.96 * sqrt(0.0025 + 0.00009604) / 1.038416 = 0.5 +- 0.096170
    lo, hi = wilson_interval(50, 100)
    assert lo == pytest.approx(0.403830, abs=1e-6) and hi == pytest.approx(0.596170, abs=1e-6)
    lo, hi = wilson_interval(0, 10)  # never negative, unlike the normal approximation
    assert lo == 0.0 and hi == pytest.approx(0.277540, abs=1e-6)
    assert wilson_interval(10, 10)[1] == 1.0
    assert all(math.isnan(x) for x in wilson_interval(0, 0))


def test_wilson_interval_matches_scipy():
    stats = pytest.importorskip("scipy.stats")
    for k, n in [(3, 17), (96, 192), (110, 192), (1, 200)]:
        ci = stats.binomtest(k, n).proportion_ci(confidence_level=0.95, method="wilson")
        ours = wilson_interval(k, n, z=stats.norm.ppf(0.975))
        assert ours == pytest.approx((ci.low, ci.high), abs=1e-9)


def test_mean_se():
    m, se = mean_se([1.0, 2.0, 3.0, 4.0])
    assert m == 2.5 and se == pytest.approx(math.sqrt(5 / 3 / 4))
    assert math.isnan(mean_se([1.0])[1]) and math.isnan(mean_se([])[0])


def test_mcnemar_exact_matches_binomial_test():
    assert mcnemar_exact([False] * 10, [True] * 10) == (10, 0, pytest.approx(2 / 1024))
    assert mcnemar_exact([True, False], [True, False]) == (0, 0, 1.0)
    stats = pytest.importorskip("scipy.stats")
    rng = random.Random(0)
    a = [rng.random() < 0.5 for _ in range(150)]
    b = [x if rng.random() < 0.8 else rng.random() < 0.7 for x in a]
    gained, lost, p = mcnemar_exact(a, b)
    assert gained == sum(y and not x for x, y in zip(a, b)) and lost == sum(x and not y for x, y in zip(a, b))
    assert p == pytest.approx(stats.binomtest(gained, gained + lost, 0.5).pvalue, rel=1e-9)
    with pytest.raises(ValueError, match="paired"):
        mcnemar_exact([True], [True, False])


def test_paired_bootstrap_ci():
    m, lo, hi = paired_bootstrap_ci([0.0] * 50, [1.0] * 50)
    assert m == lo == hi == 1.0
    # a constant shift hidden under large between-item variance: pairing sees through it
    rng = random.Random(1)
    a = [rng.gauss(0, 10) for _ in range(100)]
    b = [x + 0.5 + rng.gauss(0, 0.1) for x in a]
    m, lo, hi = paired_bootstrap_ci(a, b)
    assert 0.45 < lo < m < hi < 0.55
    # reproducible for a seed; no real difference -> the CI covers 0
    assert paired_bootstrap_ci(a, a[::-1], seed=3) == paired_bootstrap_ci(a, a[::-1], seed=3)
    _, lo, hi = paired_bootstrap_ci([1.0, 0.0] * 30, [0.0, 1.0] * 30)
    assert lo < 0 < hi
    with pytest.raises(ValueError, match="paired"):
        paired_bootstrap_ci([1.0], [1.0, 2.0])


def test_auc():
    assert auc([3, 2, 1, 0], [True, True, False, False]) == 1.0
    assert auc([0, 1, 2, 3], [True, True, False, False]) == 0.0
    assert auc([1, 1], [True, False]) == 0.5  # ties count half
    assert math.isnan(auc([1, 2], [True, True]))
    metrics = pytest.importorskip("sklearn.metrics")
    rng = random.Random(2)
    labels = [rng.random() < 0.4 for _ in range(80)]
    scores = [round(rng.gauss(float(y), 1.0), 1) for y in labels]  # rounding makes ties
    assert auc(scores, labels) == pytest.approx(metrics.roc_auc_score(labels, scores))
