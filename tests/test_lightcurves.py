"""Tests of diffim.lightcurves: forced photometry of injected PSFs."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from astropy.wcs import WCS

from diffim import masks
from diffim.exposure import Exposure
from diffim.lightcurves import forced_photometry, mark_detections
from diffim.psf import PsfModel

FWHM, K, SIGMA_PIX = 3.0, 21, 10.0     # px, kernel size, per-pixel noise (nJy)
SPACING = 25                            # px between injections (> K: independent fits)


def _wcs(shape):
    w = WCS(naxis=2)
    w.wcs.ctype = ["RA---TAN", "DEC--TAN"]
    w.wcs.crval = [53.0, -27.4]
    w.wcs.crpix = [shape[1] / 2 + 0.5, shape[0] / 2 + 0.5]
    w.wcs.cd = np.array([[-0.2, 0.0], [0.0, 0.2]]) / 3600.0
    return w


def _gaussian_source(shape, x, y, flux):
    """A circular Gaussian of FWHM ``FWHM`` sampled at pixel centres, total ``flux``."""
    s = FWHM / 2.3548200450309493
    yy, xx = np.mgrid[:shape[0], :shape[1]]
    return flux * np.exp(-((xx - x) ** 2 + (yy - y) ** 2) / (2 * s * s)) / (2 * np.pi * s * s)


def _injected(flux=900.0, n_side=14, seed=11):
    rng = np.random.default_rng(seed)
    ny = nx = SPACING * (n_side + 1)
    shape = (ny, nx)
    g = SPACING * (1 + np.arange(n_side))
    x, y = (a.ravel() + rng.uniform(-0.5, 0.5, a.size) for a in np.meshgrid(g, g))
    image = rng.normal(0.0, SIGMA_PIX, shape)
    for xi, yi in zip(x, y):
        sl = (slice(int(yi) - 12, int(yi) + 13), slice(int(xi) - 12, int(xi) + 13))
        image[sl] += _gaussian_source(shape, xi, yi, flux)[sl]
    wcs = _wcs(shape)
    exp = Exposure(image=image, variance=np.full(shape, SIGMA_PIX**2), mask=np.zeros(shape),
                   wcs=wcs, psf=PsfModel.gaussian(FWHM, K, width=nx, height=ny),
                   meta={"BUNIT": "nJy"})
    ra, dec = wcs.pixel_to_world_values(x, y)
    objects = pd.DataFrame({"diaObjectId": np.arange(1, x.size + 1), "ra": ra, "dec": dec})
    return exp, objects, x, y


def test_forced_flux_of_injections_has_unit_pulls():
    flux = 900.0
    exp, objects, x, y = _injected(flux)
    lc = forced_photometry(exp, objects, visit=3, detector=1, band="r", mjd=60001.5)
    assert len(lc) == len(objects) == 196
    np.testing.assert_allclose(lc["x"], x, atol=1e-6)       # WCS round trip
    # white noise: error = sigma / sqrt(sum P^2) = sigma * sqrt(4 pi s^2) ~ 45 nJy (S/N 20)
    s = FWHM / 2.3548200450309493
    assert lc["psfFluxErr"].median() == pytest.approx(SIGMA_PIX * np.sqrt(4 * np.pi) * s,
                                                      rel=0.05)   # measured noise-corr. factor
    pull = (lc["psfFlux"] - flux) / lc["psfFluxErr"]
    # 196 independent fits: std of the pull std ~ 0.05, of its mean ~ 0.07; 3-sigma bounds
    assert pull.std() == pytest.approx(1.0, abs=0.15)
    assert abs(pull.mean()) < 0.25
    one = lc.iloc[0]
    assert abs(one["psfFlux"] - flux) < 3 * one["psfFluxErr"]
    assert (lc["visit"] == 3).all() and (lc["band"] == "r").all()
    assert lc["midpointMjdTai"].iloc[0] == 60001.5 and lc["detector"].dtype == np.int32


def test_off_image_and_no_data_positions_are_skipped():
    exp, objects, x, y = _injected(n_side=4)
    exp.mask[:, : SPACING + 15] = masks.bit("NO_DATA")      # first column of sources
    exp.image[:, : SPACING + 15] = np.nan
    far = pd.DataFrame({"diaObjectId": [999], "ra": [54.0], "dec": [-27.4]})
    lc = forced_photometry(exp, pd.concat([objects, far], ignore_index=True), 1, 0, "g", 1.0)
    assert 999 not in set(lc["diaObjectId"])
    assert len(lc) == 12 and (lc["x"] > SPACING + 10).all()
    none = forced_photometry(exp, far, 1, 0, "g", 1.0)
    assert len(none) == 0 and "psfFlux" in none.columns


def test_mark_detections():
    forced = pd.DataFrame({"diaObjectId": [1, 1, 2], "visit": [1, 2, 1],
                           "detector": np.int32(0), "psfFlux": [1.0, 2.0, 3.0]})
    dia = pd.DataFrame({"diaObjectId": [1], "visit": [2], "detector": [0]})
    assert mark_detections(forced, dia)["detected"].tolist() == [False, True, False]


def test_missing_wcs_is_an_error():
    exp, objects, _, _ = _injected(n_side=2)
    with pytest.raises(ValueError, match="no WCS"):
        forced_photometry(exp.copy(wcs=None), objects, 1, 0, "g", 1.0)


def test_light_curve_and_cutout_plots_save_pngs(tmp_path):
    """Smoke test: light curves of associated objects and cutout triplets as PNGs."""
    from matplotlib.figure import Figure

    from diffim import plots
    from diffim.associate import associate

    exp, objects, x, y = _injected(n_side=3)
    rows = []
    for v in range(1, 5):
        lc = forced_photometry(exp, objects, v, 0, "gr"[v % 2], 60000.0 + v)
        rows.append(lc)
    forced = pd.concat(rows, ignore_index=True)
    dia = objects.iloc[:4].assign(diaSourceId=np.arange(4), visit=[1, 1, 2, 3], detector=0,
                                  band="g", midpointMjdTai=[60001.0, 60001.0, 60002.0, 60003.0],
                                  psfFlux=900.0, psfFluxErr=45.0, snr=20.0)
    dia_ids, objs = associate(dia.drop(columns="diaObjectId"))
    forced = forced[forced["diaObjectId"] <= len(objs)]     # ids coincide by construction
    forced = mark_detections(forced, dia_ids)
    fig = plots.plot_light_curves(forced, objs, n=4)
    cut = plots.plot_cutouts(exp.image + 5.0, np.full(exp.shape, 5.0), exp.image,
                             list(zip(x[:2], y[:2])) + [(-3.0, 2.0)], size=21)
    for name, f in {"lc": fig, "cut": cut}.items():
        assert isinstance(f, Figure)
        f.savefig(tmp_path / f"{name}.png")
        assert (tmp_path / f"{name}.png").stat().st_size > 1000
