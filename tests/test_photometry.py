"""Tests of diffim.photometry against injected truth."""

import numpy as np
import pytest

from diffim.errors import CalibrationError
from diffim.photometry import fit_zeropoint, njy_per_electron


def test_njy_per_electron_definition():
    # a zero point of 31.4 means 1 e- = 1 nJy; a zero point 2.5 mag brighter
    # means 1 e- comes from a 10x brighter source: 10 nJy per e-
    assert njy_per_electron(31.4) == pytest.approx(1.0, rel=1e-12)
    assert njy_per_electron(28.9) == pytest.approx(10.0, rel=1e-12)
    # consistency with the AB definition: a star of magnitude m gives
    # 10**(-0.4 (m - zp)) e-, i.e. 10**(-0.4 (m - 31.4)) nJy
    zp, mag = 27.3, 21.0
    flux_e = 10 ** (-0.4 * (mag - zp))
    assert flux_e * njy_per_electron(zp) == pytest.approx(10 ** (-0.4 * (mag - 31.4)))
    with pytest.raises(ValueError, match="finite"):
        njy_per_electron(np.nan)


def _synthetic_matches(n=200, zp=28.37, seed=5, outlier_frac=0.1):
    rng = np.random.default_rng(seed)
    mag = rng.uniform(16.0, 22.0, n)
    flux = 10 ** (-0.4 * (mag - zp))
    ferr = np.sqrt(flux + 50.0**2)            # Poisson + sky noise, e-
    meas = flux + rng.normal(0, ferr)
    ref_err = np.full(n, 0.02)
    ref = mag + rng.normal(0, ref_err)
    bad = rng.random(n) < outlier_frac        # variables / blends
    ref[bad] += rng.choice([-1, 1], bad.sum()) * rng.uniform(0.15, 1.0, bad.sum())
    return meas, ferr, ref, ref_err, bad


def test_zeropoint_recovered_with_outliers():
    true_zp = 28.37
    meas, ferr, ref, ref_err, bad = _synthetic_matches(zp=true_zp)
    res = fit_zeropoint(meas, ferr, ref, ref_err)
    # 0.01 mag is the requirement; the statistical error here is ~0.002 mag
    assert abs(res.zeropoint - true_zp) < 0.01
    assert res.zeropoint_err < 0.005
    # most injected outliers (|offset| >= 0.15 mag = 7 sigma) are rejected
    assert res.n_rejected >= 0.8 * bad.sum()
    assert res.n_used >= 0.8 * (~bad).sum()
    assert 0.01 < res.scatter_mag < 0.04      # ~0.02 mag reference errors


def test_zeropoint_without_reference_errors_and_low_snr_cut():
    meas, ferr, ref, _, _ = _synthetic_matches(outlier_frac=0.0, seed=9)
    meas[:5] = -1.0                           # non-positive fluxes are ignored
    res = fit_zeropoint(meas, ferr, ref)
    assert abs(res.zeropoint - 28.37) < 0.01
    assert res.n_used + res.n_rejected <= len(meas) - 5


def test_too_few_stars_raises_clear_error():
    with pytest.raises(CalibrationError, match="only 2 reference stars"):
        fit_zeropoint([1e4, 2e4], [100, 100], [20.0, 19.3])
    # low S/N stars do not count
    with pytest.raises(CalibrationError, match="S/N"):
        fit_zeropoint([1e4, 2e4, 300.0, 10.0], [100, 100, 100, 100], [20, 19, 18, 25])


def test_shape_mismatch_raises():
    with pytest.raises(ValueError, match="same length"):
        fit_zeropoint([1.0, 2.0], [1.0], [20.0, 21.0])
