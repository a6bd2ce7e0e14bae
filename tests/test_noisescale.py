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


def _template_share_field(n=1024, band=160, seed=11):
    """A difference whose noise is white (science) plus a correlated part (template)
    whose per-pixel variance is 0.02 of the total inside and rises to 0.33 across a
    band along the left edge (fewer coadd inputs), with a variance plane that is right
    per pixel."""
    from scipy import ndimage

    rng = np.random.default_rng(seed)
    v_t = np.full((n, n), 0.02 / 0.98, np.float32)
    v_t[:, :band] = np.linspace(0.5, 0.02 / 0.98, band, dtype=np.float32)[None, :]
    smooth = ndimage.gaussian_filter(rng.normal(size=(n, n)), 2.5)
    smooth /= smooth.std()
    image = rng.normal(size=(n, n)) + smooth * np.sqrt(v_t)
    var = (1.0 + v_t).astype(np.float32)
    psf = PsfModel.constant(moffat_kernel(3.5, 41, beta=3.0), n, n)
    diff = Exposure(image.astype(np.float32), var, np.zeros((n, n), np.int32), psf=psf)
    share = (v_t / var)[::8, ::8]
    return diff, ns.BlockMap(share.astype(np.float32), 8), band


def test_share_term_calibrates_where_the_template_share_rises():
    """The template's correlated noise adds far more to the filtered noise than to the
    per-pixel variance: in the band (share up to 0.33) the significance is ~1.3 sigma wide
    with the tile surface alone, 1.00 +- 0.05 with the share term, and the interior
    stays at 1.00 +- 0.03."""
    diff, share, band = _template_share_field()
    plain = det.significance_maps(diff)
    terms = det.noise_terms(diff, template_share=share)
    fixed = det.significance_maps(diff, terms)
    assert fixed.local_scale.share_term is not None and fixed.local_scale.share_term.b > 0

    def width(a):
        return 1.4826 * np.median(np.abs(a - np.median(a)))

    edge = (slice(20, -20), slice(20, band - 10))
    inner = (slice(20, -20), slice(band + 60, -20))
    assert width(plain.image[edge]) > 1.15
    assert width(fixed.image[edge]) == pytest.approx(1.0, abs=0.05)
    assert width(fixed.image[inner]) == pytest.approx(1.0, abs=0.03)
    # false 5-sigma peaks in the band: pure noise gives ~0 on this area
    n_plain = (np.abs(plain.image[edge]) > 4.5).sum()
    n_fixed = (np.abs(fixed.image[edge]) > 4.5).sum()
    assert n_fixed < 0.1 * max(n_plain, 1) and n_plain > 20


def test_share_term_only_when_the_width_follows_the_share():
    rng = np.random.default_rng(3)
    n = 600
    z = rng.normal(size=(n, n)).astype(np.float32)
    usable = np.ones((n, n), bool)
    flat = np.full((n, n), 0.05, np.float32)
    assert ns.fit_share(z, usable, flat) is None                        # no spread
    ramp = np.tile(np.linspace(0.0, 0.3, n, dtype=np.float32), (n, 1))
    assert ns.fit_share(z, usable, ramp) is None                        # no dependence
    term = ns.fit_share(z * np.sqrt(1.0 + 4.0 * ramp), usable, ramp)   # width^2 = 1 + 4 f
    assert term is not None
    assert term.b / term.a == pytest.approx(4.0, rel=0.15)


def test_header_round_trip_with_a_share_term():
    share = ns.BlockMap(np.linspace(0, 0.2, 50 * 38, dtype=np.float32).reshape(38, 50), 8)
    term = ns.ShareTerm(a=0.8, b=6.0, ref=0.02, share=share)
    s = ns.LocalNoiseScale(coeffs=np.array([1.01, 0.02, -0.03]), order=1, shape=(300, 400),
                           share_term=term)
    back = ns.LocalNoiseScale.from_meta(s.header_cards(), (300, 400), share=share)
    np.testing.assert_allclose(back.image(), s.image(), atol=1e-6)
    np.testing.assert_allclose(back.at([10.0, 390.0], [5.0, 290.0]), s.at([10.0, 390.0], [5.0, 290.0]),
                               atol=1e-6)
    assert s.image()[290, 390] > s.image()[5, 10]        # the share rises along the map
    # without the map, the term is left out
    assert ns.LocalNoiseScale.from_meta(s.header_cards(), (300, 400)).share_term is None
