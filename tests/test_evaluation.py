"""Progressive-validation metrics and the A/B interval."""

import numpy as np

from dimstream.models.evaluation import auc, auc_difference, logloss


def test_auc_matches_the_pairwise_definition_with_ties():
    rng = np.random.default_rng(0)
    y = rng.random(300) < 0.3
    s = np.round(rng.random(300), 1)  # many ties
    pos, neg = s[y], s[~y]
    pairs = (pos[:, None] > neg[None, :]).mean() + 0.5 * (pos[:, None] == neg[None, :]).mean()
    assert auc(y, s) == pytest_approx(pairs)


def pytest_approx(x):
    import pytest

    return pytest.approx(x, abs=1e-12)


def test_logloss():
    assert logloss(np.array([1, 0]), np.array([0.5, 0.5])) == pytest_approx(np.log(2))


def test_delong_interval_covers_the_truth_and_detects_a_real_difference():
    rng = np.random.default_rng(1)
    n = 20_000
    z = rng.normal(size=n)
    y = rng.random(n) < 1 / (1 + np.exp(-(z - 2)))
    good = z + rng.normal(scale=0.5, size=n)
    worse = z + rng.normal(scale=1.5, size=n)
    d = auc_difference(y, good, worse)
    assert d["diff"] == pytest_approx(auc(y, good) - auc(y, worse))
    assert d["ci_low"] > 0  # significantly better
    same = auc_difference(y, good, good + rng.normal(scale=1e-3, size=n))
    assert same["ci_low"] < 0 < same["ci_high"]
    # the interval's coverage: over repeated samples of equally good models, ~95% cover 0
    covered = 0
    for seed in range(40):
        r = np.random.default_rng(100 + seed)
        zz = r.normal(size=4000)
        yy = r.random(4000) < 1 / (1 + np.exp(-(zz - 2)))
        a, b = zz + r.normal(size=4000), zz + r.normal(size=4000)
        dd = auc_difference(yy, a, b)
        covered += dd["ci_low"] <= 0 <= dd["ci_high"]
    assert covered >= 34
