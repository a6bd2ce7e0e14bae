"""Stand-alone pair subtraction (:mod:`diffim.pair`) on simulated image pairs.

Each pair is rendered with the package simulator: Moffat PSFs, Poisson sky +
sources, read noise; the reference has a different flux scale, sky level and
PSF; transients are point sources present only in the science image.
"""

import numpy as np
import pytest

from diffim.calexp import auto_kernel_size
from diffim.pair import subtract_pair
from diffim.simulate import make_exposure, tan_wcs

SHAPE = (1024, 1024)
GAIN = 2.0  # electrons per ADU
SCALE = 1.3  # reference flux scale relative to the science image


def _pair(fwhm_sci, fwhm_ref, seed=3, n_stars=700, n_transients=25):
    rng = np.random.default_rng(seed)
    wcs = tan_wcs((150.0, 2.0), (512.0, 512.0), np.diag([-0.2, 0.2]) / 3600)
    ny, nx = SHAPE
    stars = {"x": rng.uniform(30, nx - 30, n_stars), "y": rng.uniform(30, ny - 30, n_stars),
             "flux": 10 ** rng.uniform(3.0, 5.5, n_stars)}
    tx, ty = rng.uniform(80, nx - 80, n_transients), rng.uniform(80, ny - 80, n_transients)
    tflux = 10 ** rng.uniform(3.3, 4.3, n_transients)  # S/N ~ 10-80 at sky 800 e-
    sci_src = {k: np.r_[stars[k], v] for k, v in (("x", tx), ("y", ty), ("flux", tflux))}
    ref_src = dict(stars, flux=stars["flux"] * SCALE)
    psf_s = {"fwhm": fwhm_sci, "beta": 3.0, "e1": 0.04, "e2": -0.02}
    psf_r = {"fwhm": fwhm_ref, "beta": 2.5, "e1": -0.02, "e2": 0.03}
    sci, _ = make_exposure(SHAPE, wcs, psf_s, sci_src, sky=800.0, read_noise=5.0,
                           saturation=1e7, seed=seed + 1, psf_size=51)
    ref, _ = make_exposure(SHAPE, wcs, psf_r, ref_src, sky=1500.0, read_noise=5.0,
                           saturation=1e7, seed=seed + 2, psf_size=51)
    return sci / GAIN, ref / GAIN, (tx, ty, tflux / GAIN)


def _matched(sources, tx, ty, radius=2.0):
    if len(sources) == 0:
        return np.zeros(len(tx), bool), np.zeros(0, bool)
    d = np.hypot(sources["x"].to_numpy()[:, None] - tx[None], sources["y"].to_numpy()[:, None]
                 - ty[None])
    return (d < radius).any(axis=0), (d < radius).any(axis=1)


@pytest.mark.parametrize("fwhm_sci, fwhm_ref, mode", [(4.0, 2.8, "convolve_template"),
                                                      (2.8, 4.0, "convolve_science")])
def test_pair_finds_transients_and_nothing_else(fwhm_sci, fwhm_ref, mode):
    sci, ref, (tx, ty, tflux) = _pair(fwhm_sci, fwhm_ref)
    res = subtract_pair(sci, ref, gain=GAIN, read_noise=5.0)
    assert res.subtraction.mode == mode  # the sharper image is convolved, never deconvolved
    # kernel sum = flux ratio convolved / other: 1.3 (ref -> sci) or 1 / 1.3; PSF-model
    # truncation and the fitted sky leave < 2 %
    expected = 1 / SCALE if mode == "convolve_template" else SCALE
    assert res.subtraction.kernel_sum == pytest.approx(expected, rel=0.02)
    src = res.sources
    found, is_transient = _matched(src, tx, ty)
    positive = src[is_transient & ~src["isNegative"].to_numpy()]
    assert found.all(), f"missed transients at S/N >= 10: {np.flatnonzero(~found)}"
    # no static star leaves a residual: every DIASource is a transient, except at most
    # one pure-noise peak just above threshold (a 1k x 1k Gaussian noise field has
    # ~0.4 matched-filter peaks beyond +-5 sigma)
    others = src[~is_transient]
    assert len(others) <= 1 and (others["snr"].abs() < 5.5).all(), others[["x", "y", "snr"]]
    # fluxes in science ADU: median ratio to truth within 3 % (PSF truncation at
    # 4.5 FWHM loses ~1 % of a beta = 2.5-3 Moffat; the median of 25 pulls ~1 %)
    ratio = np.median(_flux_ratios(positive, tx, ty, tflux))
    assert ratio == pytest.approx(1.0, abs=0.03)
    # difference noise in source-free pixels matches the variance plane within 5 %
    assert res.subtraction.noise_ratio == pytest.approx(1.0, abs=0.05)
    assert res.significance.shape == SHAPE
    assert set(res.timings) == {"characterize", "subtract", "detect", "total"}


def test_pair_releases_planes_without_changing_results():
    """The default frees (and overwrites) the inputs' planes; ``keep_images`` keeps them.

    Both must give bit-identical outputs: the memory saving changes nothing else; nor
    does characterising the two images one after the other instead of in two threads.
    """
    sci, ref, _ = _pair(2.8, 4.0, seed=5, n_stars=300, n_transients=5)
    sci[100:110, 200:203] = np.nan  # no-data pixels that the subtraction zero-fills
    sci_in, ref_in = sci.copy(), ref.copy()
    lean = subtract_pair(sci, ref, gain=GAIN, read_noise=5.0)
    full = subtract_pair(sci, ref, gain=GAIN, read_noise=5.0, keep_images=True)
    serial = subtract_pair(sci, ref, gain=GAIN, read_noise=5.0, threads=1)
    np.testing.assert_array_equal(sci, sci_in)  # the caller's arrays are never touched
    np.testing.assert_array_equal(ref, ref_in)
    for plane in ("image", "variance", "mask"):
        np.testing.assert_array_equal(getattr(lean.difference, plane),
                                      getattr(full.difference, plane))
        np.testing.assert_array_equal(getattr(lean.difference, plane),
                                      getattr(serial.difference, plane))
    np.testing.assert_array_equal(lean.significance, full.significance)
    assert lean.sources.equals(full.sources) and lean.sources.equals(serial.sources)
    assert lean.subtraction.difference is lean.difference
    for ch in (lean.science, lean.reference):
        assert ch.image is None and ch.variance is None and ch.background is None
        assert len(ch.stars) > 0
    for ch in (full.science, full.reference):
        assert ch.image.shape == ch.background.shape == SHAPE
    # the kept science image is not overwritten: its no-data pixels hold 0 - sky (the
    # subtraction's working copy sets them to 0)
    assert (full.science.image[100:110, 200:203] < -100).all()


def _flux_ratios(sources, tx, ty, tflux):
    d = np.hypot(sources["x"].to_numpy()[:, None] - tx[None], sources["y"].to_numpy()[:, None]
                 - ty[None])
    j = np.argmin(d, axis=1)
    return sources["psfFlux"].to_numpy() / tflux[j]


def test_pair_rejects_bad_input():
    img = np.zeros((64, 64))
    with pytest.raises(ValueError, match="same pixel grid"):
        subtract_pair(img, np.zeros((64, 65)))
    with pytest.raises(ValueError, match="gain"):
        subtract_pair(img, img, gain=0.0)


@pytest.mark.parametrize("fwhm, size", [(1.0, 21), (2.5, 25), (4.0, 37), (8.7, 81)])
def test_auto_kernel_size_reaches_four_and_a_half_fwhm(fwhm, size):
    k = auto_kernel_size(fwhm)
    assert k == size and k % 2 == 1 and k // 2 >= min(4.5 * fwhm, k // 2)


def test_cli_subtract_writes_difference_and_sources(tmp_path, caplog):
    from astropy.io import fits

    from diffim.cli import main
    from diffim.io import read_exposure, read_table

    sci, ref, (tx, ty, _) = _pair(4.0, 2.8, seed=5)
    for name, img in (("sci.fits", sci), ("ref.fits", ref)):
        hdu = fits.PrimaryHDU(img.astype(np.float32))
        hdu.header["GAIN"] = GAIN
        hdu.writeto(tmp_path / name)
    out, table = tmp_path / "diff.fits", tmp_path / "dia.parquet"
    assert main(["subtract", str(tmp_path / "sci.fits"), str(tmp_path / "ref.fits"),
                 "--out", str(out), "--sources", str(table), "--read-noise", "5",
                 "--threads", "1"]) == 0
    diff = read_exposure(out)
    assert diff.psf is not None and diff.meta["MODE"] == "convolve_template"
    with fits.open(out) as hdul:
        assert hdul["SIGNIF"].data.shape == SHAPE
    found, is_transient = _matched(read_table(table), tx, ty)
    assert found.all() and is_transient.all()
    # a broken input is a clear error naming the file, exit status 2, nothing written
    (tmp_path / "broken.fits").write_bytes(b"SIMPLE  =   not fits")
    assert main(["subtract", str(tmp_path / "broken.fits"), str(tmp_path / "ref.fits"),
                 "--out", str(tmp_path / "x.fits")]) == 2
    assert "broken.fits" in caplog.text and not (tmp_path / "x.fits").exists()
    assert main(["subtract", str(tmp_path / "sci.fits"), str(tmp_path / "ref.fits"),
                 "--out", str(tmp_path / "x.fits"), "--threads", "0"]) == 2
    assert "--threads" in caplog.text and not (tmp_path / "x.fits").exists()
