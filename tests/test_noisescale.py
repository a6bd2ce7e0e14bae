"""diffim.noisescale: local calibration of the significance, against known truth.

Tolerances: a 256 px tile of independent unit-normal pixels sampled every
3rd pixel (7400 values) gives its robust width to ~1.4 % (the MAD's 37 %
efficiency); a plane through 16 tiles (a quadratic through 36) averages that
to <= 1 % on average and ~2 % at the extrapolated corners, so the recovered
scale is asked to be within 1 % on average and 3 % everywhere.
"""

import numpy as np
import pytest

from diffim import detect as det
from diffim import noisescale as ns
from diffim.exposure import Exposure
from diffim.psf import PsfModel, moffat_kernel


def _uv(shape):
    ny, nx = shape
    v, u = np.meshgrid(2 * np.arange(ny) / (ny - 1) - 1, 2 * np.arange(nx) / (nx - 1) - 1,
                       indexing="ij")
    return u, v


@pytest.mark.parametrize("n, truth, order", [
    (1024, lambda u, v: 1.0 + 0.08 * u - 0.05 * v, 1),
    (3072, lambda u, v: 1.0 + 0.05 * u + 0.04 * v - 0.06 * u * u + 0.03 * u * v, 2),
])
def test_recovers_a_known_smooth_scale(n, truth, order):
    rng = np.random.default_rng(n)
    u, v = _uv((n, n))
    s_true = truth(u, v)
    sig = (rng.normal(size=(n, n)) * s_true).astype(np.float32)
    scale = ns.measure(sig, np.ones((n, n), bool))
    assert scale.order == order
    got = scale.image()
    err = np.abs(got / s_true - 1)
    assert err.mean() < 0.01 and err.max() < 0.03
    # ... and the same values at points
    xs, ys = np.array([0.0, n / 3, n - 1.0]), np.array([n - 1.0, n / 2, 0.0])
    np.testing.assert_allclose(scale.at(xs, ys), got[ys.astype(int), xs.astype(int)], rtol=1e-3)


def test_unit_noise_with_sources_and_masked_pixels_stays_one():
    rng = np.random.default_rng(3)
    n = 1024
    sig = rng.normal(size=(n, n)).astype(np.float32)
    hot = rng.random((n, n)) < 0.03            # 3 % of pixels in sources, 5-50 sigma
    sig[hot] += rng.uniform(5, 50, hot.sum()).astype(np.float32)
    usable = rng.random((n, n)) > 0.3          # 30 % of pixels masked
    sig[~usable] = 1e4                          # would dominate if they were used
    got = ns.measure(sig, usable).image()
    assert np.abs(got - 1).max() < 0.03


def test_nothing_measurable_means_no_correction():
    n = 512
    assert np.all(ns.measure(np.zeros((n, n), np.float32), np.ones((n, n), bool)).image() == 1)
    assert np.all(ns.measure(np.ones((n, n), np.float32), np.zeros((n, n), bool)).image() == 1)


def test_header_round_trip():
    s = ns.LocalNoiseScale(coeffs=np.array([1.01, 0.02, -0.03]), order=1, shape=(300, 400))
    back = ns.LocalNoiseScale.from_meta(s.header_cards(), (300, 400))
    np.testing.assert_allclose(back.image(), s.image(), atol=1e-6)
    assert ns.LocalNoiseScale.from_meta({}, (300, 400)) is None


def test_detection_calibrated_where_the_variance_plane_is_wrong():
    """The variance plane says sigma = 10 everywhere; the true noise rises to 13.5 at
    the right-hand edge.  The local scale brings the false 4-sigma peaks down to what
    pure noise gives and the PSF-flux pulls of injected sources to width 1."""
    n = 1024
    rng = np.random.default_rng(7)
    u, _ = _uv((n, n))
    true_sigma = 10.0 * (1.0 + 0.175 * (u + 1))          # 10 ... 13.5
    psf = PsfModel.constant(moffat_kernel(4.0, 41, beta=3.0), n, n)
    noise = (rng.normal(size=(n, n)) * true_sigma).astype(np.float32)
    diff = Exposure(noise.copy(), np.full((n, n), 100.0, np.float32),
                    np.zeros((n, n), np.int32), psf=psf)
    sig = det.significance_maps(diff)
    assert sig.local_scale is not None
    assert sig.local_scale.at(n - 1, n // 2)[0] == pytest.approx(1.35, rel=0.03)
    right = sig.image[:, 3 * n // 4:]
    assert 1.4826 * np.median(np.abs(right)) == pytest.approx(1.0, abs=0.03)
    # PSF-flux pulls of sources injected on a grid in the noisy half
    k = psf.at()
    xs, ys = np.meshgrid(np.arange(560, 1000, 48), np.arange(40, 1000, 48))
    flux = 3000.0
    for x, y in zip(xs.ravel(), ys.ravel()):
        diff.image[y - 20:y + 21, x - 20:x + 21] += flux * k
    cat = det.detect_dia_sources(diff, significance=det.significance_maps(diff))
    near = np.hypot(cat["x"].to_numpy()[:, None] - xs.ravel()[None],
                    cat["y"].to_numpy()[:, None] - ys.ravel()[None]).min(axis=1) < 2
    pulls = (cat["psfFlux"][near] - flux) / cat["psfFluxErr"][near]
    assert near.sum() >= 0.95 * xs.size
    assert 1.4826 * np.median(np.abs(pulls - np.median(pulls))) == pytest.approx(1.0, abs=0.2)
