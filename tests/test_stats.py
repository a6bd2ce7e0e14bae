"""diffim.stats: the shared robust standard deviation."""

import math

import numpy as np
import pytest

from diffim.stats import robust_std


def test_robust_std_analytic_and_gaussian():
    # median 0, absolute deviations (1, 0, 1, 2, 2): MAD = 1
    assert robust_std([-1.0, 0.0, 1.0, 2.0, -2.0]) == pytest.approx(1.4826, rel=1e-4)
    x = np.random.default_rng(3).normal(5.0, 2.5, 200_000)
    # sampling error of the MAD-based std: 1.166 sigma / sqrt(n) ~ 0.0065; allow 3x
    assert robust_std(x) == pytest.approx(2.5, abs=0.02)


def test_robust_std_ignores_non_finite_and_outliers():
    x = np.random.default_rng(4).normal(0.0, 1.0, (300, 300))
    clean = robust_std(x)
    x[:5] = np.nan
    x[5:8] = np.inf
    x[8:10] = 1e6  # 0.7 % huge outliers move the MAD by well under 1 %
    assert robust_std(x) == pytest.approx(clean, rel=0.02)
    assert math.isnan(robust_std([np.nan, np.inf]))
    assert math.isnan(robust_std([]))
