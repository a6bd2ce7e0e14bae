"""diffim.stats: the shared robust standard deviation and the batched ridge solve."""

import math

import numpy as np
import pytest

from diffim.stats import ridge_solve, robust_std


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


def test_ridge_solve_matches_the_exact_solution_and_zeroes_empty_terms():
    rng = np.random.default_rng(5)
    x = rng.normal(size=(6, 40, 3))                       # 6 systems, 40 rows, 3 terms
    truth = rng.normal(size=(6, 3))
    a = np.einsum("nik,nil->nkl", x, x)
    b = np.einsum("nik,ni->nk", x, np.einsum("nik,nk->ni", x, truth))
    sol, cov = ridge_solve(a, b)
    # the ridge is 1e-12 of the mean diagonal: the error is ~1e-12 relative
    assert np.allclose(sol, truth, rtol=1e-9, atol=1e-9)
    assert np.allclose(cov, np.linalg.inv(a), rtol=1e-8)
    # a term with no data (an all-zero row and column) gets 0, not a singular matrix
    a0, b0 = a[0].copy(), b[0].copy()
    a0[2, :] = a0[:, 2] = 0.0
    b0[2] = 0.0
    sol0, _ = ridge_solve(a0, b0)
    assert sol0[2] == 0.0 and np.all(np.isfinite(sol0))
    assert np.all(ridge_solve(np.zeros((2, 2)), np.zeros(2))[0] == 0.0)
