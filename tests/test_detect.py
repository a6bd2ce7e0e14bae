"""Tests of diffim.detect: detection completeness, photometry, false rate, flags.

Synthetic pairs come from ``test_subtract.make_pair`` (Moffat elliptical,
spatially varying science PSF; Gaussian template PSF; 4 % photometric scale;
sky gradient; hundreds of static stars; transients with known flux).
"""

from __future__ import annotations

import numpy as np
import pytest
from scipy.spatial import cKDTree

from diffim import masks
from diffim import detect as det
from diffim import subtract as sub
from diffim.exposure import Exposure
from diffim.psf import PsfModel, moffat_kernel

from test_subtract import _add, make_pair  # shared synthetic-pair generator

CONTRACT = ["x", "y", "psfFlux", "psfFluxErr", "snr", "isNegative", "isDipole",
            "pixelFlags_edge", "pixelFlags_saturated", "pixelFlags_bad"]


def _robust_std(v):
    return 1.4826 * np.median(np.abs(v - np.median(v)))


@pytest.fixture(scope="module", params=["convolve_template", "convolve_science"])
def scene(request):
    """(difference, truth, catalogue) for a normal and a science-sharper pair."""
    if request.param == "convolve_template":
        sci, tmpl, truth = make_pair(seed=3)
    else:
        sci, tmpl, truth = make_pair(seed=5, sci_fwhm=3.0, dfwhm=0.3, tmpl_fwhm=4.0)
    res = sub.subtract_images(sci, tmpl)
    assert res.mode == request.param
    cat = det.detect_dia_sources(res.difference)
    return res.difference, truth, cat


def _match(cat, truth, radius=2.0):
    d, i = cKDTree(np.c_[truth["x"], truth["y"]]).query(np.c_[cat.x, cat.y])
    return d < radius, i


def test_completeness(scene):
    diff, truth, cat = scene
    _, err = det.forced_psf_photometry(diff, truth["x"], truth["y"])
    snr = np.abs(truth["flux"]) / err          # true S/N in the difference image
    ok, idx = _match(cat, truth)
    found = np.isin(np.arange(len(snr)), idx[ok])
    hi = snr >= 10
    mid = (snr >= 5) & (snr < 6)               # around S/N 5.5
    assert hi.sum() > 100 and mid.sum() > 20
    assert found[hi].mean() >= 0.95            # requirement
    assert found[mid].mean() >= 0.50           # requirement (expected ~69 % at 5.5 sigma)
    # the sign is right: fading transients are negative detections
    neg_true = truth["flux"][idx[ok]] < 0
    assert np.array_equal(cat.isNegative[ok].to_numpy(), neg_true)


def test_flux_accuracy_and_centroids(scene):
    diff, truth, cat = scene
    ok, idx = _match(cat, truth)
    m = cat[ok]
    tf = truth["flux"][idx[ok]]
    bright = np.abs(tf) / m.psfFluxErr > 20
    assert bright.sum() > 50
    assert abs(np.median(m.psfFlux[bright] / tf[bright]) - 1) < 0.02     # requirement
    # forced photometry at the true positions: no background offset
    f, e = det.forced_psf_photometry(diff, truth["x"], truth["y"])
    assert abs(np.median((f - truth["flux"]) / e)) < 0.25   # background residual ~0.1 sigma
    # centroids: detected positions within 0.3 px (rms) of the truth for S/N > 20
    dx = m.x[bright] - truth["x"][idx[ok]][bright]
    dy = m.y[bright] - truth["y"][idx[ok]][bright]
    assert np.sqrt(np.mean(dx**2 + dy**2)) < 0.3


@pytest.mark.parametrize("mode", ["convolve_template", "convolve_science"])
def test_pulls_pooled_over_pairs(mode):
    """Flux errors are right: pull robust std 1.0 +- 0.1, on ~480 detections.

    One pair holds only ~135 transients at S/N >= 10, and the MAD-based
    robust std of that many pulls scatters by 1.17 / sqrt(n) ~ 0.10 from pair
    to pair (0.85-1.19 over seeds 3-10 of the science-sharper pair, pooled
    1.03): a single pair cannot resolve the +-0.1 requirement.  Four pairs
    (seeds 11-14, not the fixture's) bring the scatter to 0.05 for the robust
    std and 0.035 for the 4-sigma-clipped std, which is held to the same bound.
    Measured: detection pulls 1.05 / 1.05 (robust), 0.97 / 1.03 (clipped);
    forced pulls 1.04 / 1.06 and 0.97 / 1.02 (template / science convolved).
    """
    from astropy.stats import sigma_clipped_stats
    det_pulls, forced_pulls = [], []
    for seed in (11, 12, 13, 14):
        if mode == "convolve_template":
            sci, tmpl, truth = make_pair(seed=seed)
        else:
            sci, tmpl, truth = make_pair(seed=seed, sci_fwhm=3.0, dfwhm=0.3, tmpl_fwhm=4.0)
        res = sub.subtract_images(sci, tmpl)
        assert res.mode == mode
        noise = det.noise_terms(res.difference)
        cat = det.detect_dia_sources(res.difference, noise=noise)
        ok, idx = _match(cat, truth)
        m, tf = cat[ok], truth["flux"][idx[ok]]
        hi = np.abs(tf) / m.psfFluxErr >= 10        # no selection bias at S/N >= 10
        det_pulls.append(((m.psfFlux - tf) / m.psfFluxErr)[hi])
        f, e = det.forced_psf_photometry(res.difference, truth["x"], truth["y"], noise=noise)
        forced_pulls.append((f - truth["flux"]) / e)
    for pulls in (np.concatenate(det_pulls), np.concatenate(forced_pulls)):
        assert pulls.size > 400
        assert _robust_std(pulls) == pytest.approx(1.0, abs=0.1)           # requirement
        assert sigma_clipped_stats(pulls, sigma=4)[2] == pytest.approx(1.0, abs=0.1)


def _noise_counts(diff, thresholds):
    """Detections on pure Gaussian noise with the same variance plane and PSF."""
    rng = np.random.default_rng(99)
    img = (rng.standard_normal(diff.shape) * np.sqrt(np.nan_to_num(diff.variance))).astype(np.float32)
    img[np.isnan(diff.image)] = np.nan
    noise = Exposure(img, diff.variance, diff.mask, psf=diff.psf)
    return [len(det.detect_dia_sources(noise, threshold=t)) for t in thresholds]


def test_false_detections_static_scene():
    """A scene with no variability has no more detections than pure noise.

    Pure Gaussian noise itself gives ~3.5 (FWHM 4.6 px) to 4.5 (FWHM 3.5 px)
    5-sigma peaks per 4k x 4k (measured on 2 x 4096^2 noise images, consistent
    with the Euler-characteristic density of a smoothed Gaussian field), i.e.
    ~0.2-0.3 per 1k x 1k.
    """
    sci, tmpl, _ = make_pair(seed=7, transients=False)
    diff = sub.subtract_images(sci, tmpl).difference
    n5 = len(det.detect_dia_sources(diff, threshold=5.0))
    n4 = len(det.detect_dia_sources(diff, threshold=4.0))
    noise4, = _noise_counts(diff, [4.0])
    assert n5 <= 1            # expected from noise alone: ~0.3 in 1024^2
    # at 4 sigma there are enough peaks (~15-20) to compare with pure noise; 1.5x + 3
    # allows Poisson scatter of both counts (a subtraction artefact at bright stars
    # would add dozens)
    assert n4 <= 1.5 * noise4 + 3, (n4, noise4)


def _noise_diff(n=256, seed=0, fwhm=4.0):
    rng = np.random.default_rng(seed)
    img = rng.normal(size=(n, n)).astype(np.float32) * 10.0
    psf = PsfModel.constant(moffat_kernel(fwhm, 41, beta=3.0), n, n)
    return Exposure(img, np.full((n, n), 100.0, np.float32), np.zeros((n, n), np.int32), psf=psf)


def _add_psf(exp, x, y, flux):
    k = exp.psf.at(x, y)
    from scipy import ndimage
    ix, iy = int(round(x)), int(round(y))
    k = ndimage.shift(k, (y - iy, x - ix), order=3)
    _add(exp.image, k, ix, iy, flux)


def test_masked_pixels_never_detected():
    """Spikes on CR / BAD / SAT pixels (science calexp masks) give no DIASource."""
    d = _noise_diff(seed=1)
    for (x, y), plane in zip([(60, 60), (128, 200), (200, 90)], ["CR", "BAD", "SAT"]):
        d.image[y, x] += 5000.0                       # 500 sigma single-pixel spike
        d.mask[y, x] |= masks.bit(plane)
    d.image[150:160, 30] += 3000.0                    # a bad column
    d.mask[150:160, 30] |= masks.bit("BAD")
    cat = det.detect_dia_sources(d)
    assert len(cat) == 0
    # the same spikes without the mask bits are detected (the test can fail)
    d.mask[:] = 0
    assert len(det.detect_dia_sources(d)) >= 4


def test_partly_masked_source_is_recentred():
    """A source whose left half is masked: the PSF fit re-centres a biased start.

    The detection filter is not the PSF when the difference's noise is
    correlated, and its peak then moves away from masked pixels (1.4 px on a
    variable star of the default run, with a flux 22 % low).  The fit over the
    unmasked pixels must bring a start 1.4 px off back to the truth.
    """
    d = _noise_diff(seed=4)
    x, y = 128.1, 128.3
    _add_psf(d, x, y, -3000.0)                        # S/N ~ 50
    d.mask[:, 112:128] |= masks.bit("BAD")             # up to the pixel left of the centre
    d.image[:, 112:128] = 0.0
    bad = d.mask != 0
    assert det._masked_near(bad, x + 1.4, y, 4.0) and not det._masked_near(bad, x + 3.5, y, 4.0)
    fx, fy = det._fit_position(d.image, d.variance, bad, d.psf, x + 1.4, y - 0.3, 4.0)
    assert np.hypot(fx - x, fy - y) < 0.15, (fx, fy)
    flux, err = det._psf_fit(d.image, d.variance, bad, d.psf, fx, fy)
    assert abs(flux + 3000.0) < 3 * err
    # the control: measured at the biased start, the flux is far off
    off, err_off = det._psf_fit(d.image, d.variance, bad, d.psf, x + 1.4, y - 0.3)
    assert abs(off + 3000.0) > 5 * err_off
    # a source at the image's edge (NO_DATA beyond it) is never moved off the image
    edge = det._fit_position(d.image, d.variance, bad, d.psf, 255.0, 40.0, 4.0)
    assert 0.0 <= edge[0] <= 255.0 and 0.0 <= edge[1] <= 255.0
    # and the detection itself is measured at the truth
    cat = det.detect_dia_sources(d)
    assert len(cat) == 1 and abs(cat.x[0] - x) < 0.3 and abs(cat.psfFlux[0] + 3000.0) < 3 * err


def test_dipole_and_flags():
    d = _noise_diff(seed=2)
    _add_psf(d, 100.3, 100.6, 3000.0)                 # dipole: +/- lobes 2 px apart
    _add_psf(d, 102.3, 100.6, -3000.0)
    _add_psf(d, 180.0, 60.0, 2000.0)                  # isolated positive
    _add_psf(d, 60.0, 190.0, -2000.0)                 # isolated negative
    _add_psf(d, 7.0, 150.0, 3000.0)                   # near the edge
    _add_psf(d, 200.0, 200.0, 3000.0)
    d.mask[201, 202] |= masks.bit("SAT")              # saturated pixel in the footprint
    d.mask[197, 197] |= masks.bit("NO_TEMPLATE")
    cat = det.detect_dia_sources(d)
    assert list(cat.columns[:len(CONTRACT)]) == CONTRACT
    assert len(cat) == 5
    dip = cat[cat.isDipole]
    assert len(dip) == 1
    row = dip.iloc[0]
    assert row.x == pytest.approx(101.3, abs=0.3) and row.y == pytest.approx(100.6, abs=0.3)
    # positive-lobe flux from the joint two-PSF fit: 3000 within 4 sigma
    assert abs(row.psfFlux - 3000.0) < 4 * row.psfFluxErr
    assert row.dipoleNegFlux == pytest.approx(-3000.0, abs=4 * row.dipoleNegFluxErr)
    neg = cat[cat.isNegative]
    assert len(neg) == 1 and neg.iloc[0].psfFlux < 0
    assert neg.iloc[0].x == pytest.approx(60.0, abs=0.3)
    edge = cat[cat.x < 20]
    assert len(edge) == 1 and edge.iloc[0].pixelFlags_edge
    sat = cat[(cat.x > 190) & (cat.y > 190)].iloc[0]
    assert sat.pixelFlags_saturated and sat.pixelFlags_bad and not sat.pixelFlags_edge
    iso = cat[(cat.x > 170) & (cat.y < 70)].iloc[0]
    assert not (iso.pixelFlags_edge or iso.pixelFlags_saturated or iso.pixelFlags_bad)
    assert iso.snr > 5 and iso.psfSnr == pytest.approx(iso.psfFlux / iso.psfFluxErr)


def _row(x, y, flux, negative):
    return {"x": x, "y": y, "psfFlux": flux, "psfFluxErr": 100.0, "snr": 20.0,
            "isNegative": negative, "isDipole": False, "pixelFlags_edge": False,
            "pixelFlags_saturated": False, "pixelFlags_bad": False, "psfSnr": flux / 100.0,
            "dipoleNegFlux": np.nan, "dipoleNegFluxErr": np.nan, "dipoleSeparation": np.nan,
            "footprintArea": 50}


def test_peaks_on_a_bright_wing_are_not_merged_into_a_dipole():
    """A positive and a negative peak in the wing of a bright transient: the joint fit
    gives both lobes positive flux, so they are no dipole (before: one dipole row with a
    "negative" lobe of thousands of nJy, a false positive that skipped the point-like test)."""
    d = _noise_diff(seed=4, fwhm=6.0)
    _add_psf(d, 128.0, 128.0, 2.0e5)                  # S/N ~2000 transient
    bad = np.zeros(d.shape, bool)
    pos, neg = _row(141.0, 137.0, 1500.0, False), _row(139.0, 128.0, -1500.0, True)
    rows = det._merge_dipoles(d, bad, [pos], [neg], max_sep=12.0, max_ratio=3.0)
    assert len(rows) == 2 and not any(r["isDipole"] for r in rows)
    assert {r["isNegative"] for r in rows} == {False, True}
    # the same two peaks on an empty background, with real lobes, are one dipole
    e = _noise_diff(seed=4, fwhm=6.0)
    _add_psf(e, 141.0, 137.0, 1500.0)
    _add_psf(e, 139.0, 128.0, -1500.0)
    (row,) = det._merge_dipoles(e, bad, [pos], [neg], max_sep=12.0, max_ratio=3.0)
    assert row["isDipole"] and row["psfFlux"] > 0 > row["dipoleNegFlux"]
    assert abs(row["psfFlux"] - 1500.0) < 4 * row["psfFluxErr"]


def test_empty_catalogue_has_schema():
    cat = det.detect_dia_sources(_noise_diff(seed=3), threshold=50.0)
    assert len(cat) == 0
    assert list(cat.columns) == list(det.COLUMNS)
    assert dict(cat.dtypes.astype(str)) == det.COLUMNS
    with pytest.raises(ValueError, match="threshold"):
        det.detect_dia_sources(_noise_diff(), threshold=-1)


def test_forced_photometry_analytic():
    """Noise-free PSF of known flux: flux exact (spline-shift error < 0.3 %) and the
    error is 1 / sqrt(sum P^2 / V)."""
    d = _noise_diff(seed=4)
    d.image[:] = 0.0
    _add_psf(d, 120.4, 130.7, 5000.0)
    f, e = det.forced_psf_photometry(d, [120.4], [130.7])
    assert f[0] == pytest.approx(5000.0, rel=0.003)
    p = d.psf.at()
    assert e[0] == pytest.approx(1.0 / np.sqrt((p**2).sum() / 100.0), rel=0.01)
    f2, _ = det.forced_psf_photometry(d, np.array([50.0, 120.4]), np.array([50.0, 130.7]))
    assert abs(f2[0]) < 1e-6 * 5000 and f2[1] == pytest.approx(f[0])


def test_peaks_the_psf_fit_does_not_see_are_left_out():
    """A peak of the filtered image with no point source under it is not a DIASource.

    Stands for the side-lobes that a correlated-noise detection filter leaves
    around a bright transient: significance without PSF-shaped flux.
    """
    from dataclasses import replace

    d = _noise_diff(seed=2)
    _add_psf(d, 100.3, 90.6, 4000.0)                   # a point source, S/N ~ 25
    sig = det.significance_maps(d)
    yy, xx = np.mgrid[:256, :256]
    lobe = (8.0 * np.exp(-((xx - 180) ** 2 + (yy - 60) ** 2) / (2 * 2.0**2))).astype(np.float32)
    fake = replace(sig, image=sig.image - lobe, statistical=sig.statistical - lobe)
    every = det.detect_dia_sources(d, significance=fake, min_fit_fraction=0.0)
    kept = det.detect_dia_sources(d, significance=fake)
    assert len(every) == 2 and every["isNegative"].sum() == 1
    assert len(kept) == 1 and not kept["isNegative"].iloc[0]
    assert abs(kept["x"].iloc[0] - 100.3) < 0.3 and abs(kept["y"].iloc[0] - 90.6) < 0.3
    # a real point source's PSF fit recovers its significance
    assert kept["psfSnr"].iloc[0] / kept["snr"].iloc[0] == pytest.approx(1.0, abs=0.1)


def test_no_sources_on_the_rim_of_saturated_cores():
    """Peaks just outside a large SAT region (a saturated star's core) are not reported;
    the same peak next to a small one (a saturated cosmic ray) or far away is."""
    d = _noise_diff(seed=3)
    d.mask[100:116, 100:116] |= masks.bit("SAT")       # 256 px: a saturated star's core
    d.mask[200:203, 60:63] |= masks.bit("SAT")         # 9 px
    d.image[d.mask != 0] = 0.0
    for x, y in [(121.0, 108.0), (61.0, 208.0), (200.0, 50.0)]:   # 5-6 px off the masks; far
        _add_psf(d, x, y, 3000.0)
    cat = det.detect_dia_sources(d)
    xy = sorted(zip(cat["x"].round(), cat["y"].round()))
    assert xy == [(61.0, 208.0), (200.0, 50.0)]
    # without the large region the first one is found too (the test can fail)
    d.mask[100:116, 100:116] = 0
    assert len(det.detect_dia_sources(d)) == 3


def test_noise_correlation_is_measured_where_only_a_corner_has_a_template():
    """A template covering a corner of the visit (few visits, large dithers): no spread
    tile is 10 % usable, and the correlation must still be measured there, not taken as
    white (which made the significance noise 3.4x too large and gave 44 false positives
    in one image of a 3-visit set)."""
    from scipy import ndimage
    rng = np.random.default_rng(4)
    ny, nx, s = 1040, 1000, 1.5
    noise = ndimage.gaussian_filter(rng.normal(size=(ny, nx)), s, mode="wrap")
    noise /= noise.std()        # unit variance per pixel, correlated over ~2 s px
    psf = PsfModel.gaussian(4.0, 31, width=nx, height=ny)
    whole = Exposure(noise.astype(np.float32), np.ones((ny, nx), np.float32),
                     np.zeros((ny, nx), np.int32), psf=psf)
    corner = np.full((ny, nx), masks.bits("NO_DATA", "NO_TEMPLATE"), np.int32)
    corner[840:, 800:] = 0      # 200 x 200 px: 4 % of the image, < 10 % of any 512 tile
    image = np.where(corner == 0, noise, np.nan).astype(np.float32)
    part = Exposure(image, whole.variance, corner, psf=psf)
    r = det.NOISE_CORR_RADIUS
    expected = det.noise_correlation(whole)
    got = det.noise_correlation(part)
    assert expected[r, r + 1] > 0.7                                  # strongly correlated
    np.testing.assert_allclose(got[r, r - 4:r + 5], expected[r, r - 4:r + 5], atol=0.05)
    sig = det.significance_maps(part, det.noise_terms(part))
    z = sig.statistical[corner == 0]
    assert _robust_std(z[z != 0]) == pytest.approx(1.0, abs=0.1)
    assert len(det.detect_dia_sources(part, threshold=5.0)) <= 2   # noise: ~0.01 expected
