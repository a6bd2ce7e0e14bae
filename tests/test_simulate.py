"""Tests of the simulator (diffim.simulate) and the ``diffim simulate`` CLI."""

from __future__ import annotations

import re
import warnings
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml
from astropy.coordinates import SkyCoord
from astropy.io import fits
from astropy.wcs import WCS
from scipy import ndimage

from diffim import cli
from diffim import simulate as sim
from diffim.errors import ConfigError
from diffim.psf import moffat_kernel, moments_fwhm

SMALL = {"seed": 7, "n_visits": 3, "bands": ["g", "r"], "shape": [256, 256], "n_stars": 150,
         "n_galaxies": 60, "n_saturated": 1, "n_variable_stars": 2, "n_transients": 3}
REQUIRED_KEYS = ("MJD-OBS", "EXPTIME", "FILTER", "VISIT", "DETECTOR", "SATURATE", "RDNOISE",
                 "GAIN", "AIRMASS", "BUNIT")


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    out = tmp_path_factory.mktemp("sim")
    return sim.simulate_dataset(out, SMALL)


def _wcs(header) -> WCS:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        w = WCS(header)
    assert not caught, [str(c.message) for c in caught]
    return w


def _tan_frame(shape=(200, 200)) -> WCS:
    return sim.tan_wcs((53.0, -27.4), ((shape[1] - 1) / 2, (shape[0] - 1) / 2),
                       sim.rotation_cd(0.2, 30.0))


# ---------------------------------------------------------------- contract

def test_files_follow_contract(dataset):
    s = sim.merge_settings(SMALL)
    assert len(dataset["images"]) == s["n_visits"]
    for path in dataset["images"]:
        with fits.open(path) as hdul:
            hdr, data = hdul[0].header, hdul[0].data
        assert hdr["BITPIX"] == -32 and data.shape == tuple(s["shape"])
        for key in REQUIRED_KEYS:
            assert key in hdr, key
        assert hdr["BUNIT"] == "electron" and hdr["GAIN"] == 1.0
        assert int(re.search(r"\d+", Path(path).name).group()) == hdr["VISIT"]
        assert hdr["FILTER"] in s["bands"] and Path(path).stem.endswith(hdr["FILTER"])
        assert "DATE" not in hdr  # no file-creation stamps (reruns are byte-identical)
        w = _wcs(hdr)
        assert w.wcs.ctype[0] == "RA---TAN" and w.has_celestial
        # sky not subtracted, no NaN, clipped at SATURATE
        assert np.isfinite(data).all() and data.max() <= hdr["SATURATE"]
        assert np.median(data) > 100
    ref = pd.read_parquet(dataset["refcat"])
    for col in ("ra", "dec", "g_mag", "g_magErr", "r_mag", "r_magErr"):
        assert col in ref.columns
    visits = pd.read_parquet(dataset["visits"])
    assert list(visits["band"]) == ["g", "r", "g"]  # bands alternate
    for col in ("visit", "detector", "band", "file", "mjd_obs", "exptime", "fwhm_arcsec",
                "fwhm_px", "fwhm_moments_px", "psf_beta", "psf_e1", "psf_e2", "sky_e",
                "zeropoint", "wcs_true"):
        assert col in visits.columns, col
    assert yaml.safe_load(Path(dataset["dataset"]).read_text())["simulate"]["seed"] == 7
    assert len(dataset["defects"]) == s["n_visits"]


def test_truth_tables(dataset):
    static = pd.read_parquet(dataset["static_sources"])
    variables = pd.read_parquet(dataset["variables"])
    fluxes = pd.read_parquet(dataset["variable_fluxes"])
    ref = pd.read_parquet(dataset["refcat"])
    assert set(static["kind"]) == {"star", "galaxy"}
    assert set(variables["kind"]) == {"variable_star", "transient"}
    assert static["id"].is_unique and not set(static["id"]) & set(variables["id"])
    assert len(fluxes) == 3 * len(variables)
    # every host id is a galaxy
    hosts = variables.loc[variables["host_id"] >= 0, "host_id"]
    assert set(hosts) <= set(static.loc[static["kind"] == "galaxy", "id"])
    # refcat: only non-variable point sources (each matches a truth star within 1 mas)
    stars = static[static["kind"] == "star"]
    sc = SkyCoord(stars["ra"], stars["dec"], unit="deg")
    _, sep, _ = SkyCoord(ref["ra"], ref["dec"], unit="deg").match_to_catalog_sky(sc)
    assert sep.arcsec.max() < 1e-3
    assert ref["r_mag"].max() < sim.DEFAULT_SETTINGS["refcat_mag_limit"] + 0.2


def test_header_wcs_is_off_within_contract_limits(dataset):
    visits = pd.read_parquet(dataset["visits"])
    ny, nx = SMALL["shape"]
    for _, row in visits.iterrows():
        true = sim.read_visit_wcs(row)
        head = _wcs(fits.getheader(Path(dataset["outdir"]) / row["file"]))
        c = ((nx - 1) / 2, (ny - 1) / 2)
        a = SkyCoord(*true.wcs_pix2world([c[0]], [c[1]], 0), unit="deg")
        b = SkyCoord(*head.wcs_pix2world([c[0]], [c[1]], 0), unit="deg")
        shift = a.separation(b).arcsec[0]
        # drawn in [0.3, 1] x limit: never zero, never beyond the contract
        assert 0.3 * 5.0 - 1e-6 < shift <= 5.0 + 1e-6
        ratio = np.linalg.solve(true.wcs.cd, head.wcs.cd)  # pixel-space error map M
        scale = np.sqrt(abs(np.linalg.det(ratio))) - 1
        rot = np.degrees(np.arctan2(ratio[1, 0], ratio[0, 0]))
        assert 0.3 * 0.005 - 1e-9 < abs(scale) <= 0.005 + 1e-9
        assert 0.3 * 0.1 - 1e-9 < abs(rot) <= 0.1 + 1e-9


def test_reruns_are_byte_identical(tmp_path):
    settings = dict(SMALL, n_visits=2, shape=[96, 128])
    a = sim.simulate_dataset(tmp_path / "a", settings)
    b = sim.simulate_dataset(tmp_path / "b", settings, processes=2)
    for fa, fb in zip(a["images"] + a["defects"], b["images"] + b["defects"]):
        assert Path(fa).read_bytes() == Path(fb).read_bytes()
    for key in ("refcat", "static_sources", "variables", "variable_fluxes", "visits"):
        pd.testing.assert_frame_equal(pd.read_parquet(a[key]), pd.read_parquet(b[key]))
    c = sim.simulate_dataset(tmp_path / "c", dict(settings, seed=8))
    assert Path(c["images"][0]).read_bytes() != Path(a["images"][0]).read_bytes()


# ---------------------------------------------------------------- rendering

PSF = {"fwhm": 4.2, "beta": 3.0, "e1": 0.04, "e2": -0.03, "fwhm_gx": 0.02, "x0": 100, "y0": 100,
       "scale": 100}


def test_isolated_star_flux_and_centroid():
    x, y, flux = 97.37, 103.81, 1e6
    _, truth = sim.make_exposure((200, 200), _tan_frame(), PSF, {"x": [x], "y": [y],
                                 "flux": [flux]}, sky=800.0, saturation=1e9, seed=1)
    star = truth["noiseless"] - 800.0
    # the stamp rule leaves < 5e-4 of a bright star's flux outside: 0.1 % holds
    assert abs(star.sum() / flux - 1) < 1e-3
    assert truth["flux_rendered"][0] == pytest.approx(star.sum(), rel=1e-9)
    yy, xx = np.mgrid[:200, :200]
    win = (abs(xx - 97) <= 30) & (abs(yy - 104) <= 30)
    cx = (star * xx)[win].sum() / star[win].sum()
    cy = (star * yy)[win].sum() / star[win].sum()
    # symmetric profile in a near-symmetric window: centroid exact to ~1e-3 px
    assert abs(cx - x) < 0.01 and abs(cy - y) < 0.01


def test_galaxy_flux_is_conserved_and_extended():
    src = {"x": [90.3], "y": [110.6], "flux": [5e4], "r_e_arcsec": [1.2], "sersic_n": [1.0],
           "axis_ratio": [0.5], "pa_deg": [30.0]}
    _, gal = sim.make_exposure((200, 200), _tan_frame(), PSF, src, sky=0.0, seed=1)
    _, pt = sim.make_exposure((200, 200), _tan_frame(), PSF, dict(src, r_e_arcsec=[0.0]),
                              sky=0.0, seed=1)
    # galaxy and PSF stamps are unit-sum, so the image holds the flux to rounding
    assert gal["noiseless"].sum() == pytest.approx(5e4, rel=1e-9)
    assert moments_fwhm(gal["noiseless"][80:141, 60:121]) > 1.5 * moments_fwhm(
        pt["noiseless"][80:141, 60:121])


def test_sersic_enclosed_flux_matches_quadrature():
    from scipy import integrate

    for n in (0.5, 1.0, 4.0):
        b = sim.sersic_b(n)
        for radius in (0.01, 0.3, 1.0, 3.0):
            ref, _ = integrate.quad(lambda r: np.exp(-b * (r ** (1 / n) - 1)) * r, 0, radius,
                                    epsabs=0, epsrel=1e-10, limit=200)
            assert sim.sersic_enclosed(radius, n) == pytest.approx(ref, rel=1e-8)
        # r_e encloses half the light (b_n's definition; the expansion is good to 1e-5 at n >= 0.5)
        # r_e encloses half the light: b_n's asymptotic expansion is good to 2.4e-4 at
        # n = 0.5 and to 1e-5 at n >= 1
        assert sim.sersic_enclosed(1.0, n) / sim.sersic_enclosed(np.inf, n) == pytest.approx(
            0.5, abs=3e-4)


def _profile(x, y, jac, r_e, n, q, pa_deg):
    """Sersic surface brightness (units of I_e) at pixel offsets (x, y) from the centre."""
    east, north = jac[0, 0] * x + jac[0, 1] * y, jac[1, 0] * x + jac[1, 1] * y
    pa = np.deg2rad(pa_deg)
    major = east * np.sin(pa) + north * np.cos(pa)
    minor = (east * np.cos(pa) - north * np.sin(pa)) / q
    return np.exp(-sim.sersic_b(n) * ((np.hypot(major, minor) / r_e) ** (1 / n) - 1))


@pytest.mark.parametrize("n", [2.0, 4.0])
@pytest.mark.parametrize("offset", [(0.1, -0.3), (0.49, 0.0), (-0.2, 0.45)])
def test_sersic_stamps_integrate_the_core_exactly(n, offset):
    from scipy import integrate

    jac = np.array([[-0.2, 0.03], [0.01, 0.2]])  # arcsec per pixel, slightly sheared
    dx, dy = offset
    fast = sim.sersic_stamps(np.array([dx]), np.array([dy]), jac, np.array([0.3]),
                             np.array([n]), np.array([0.6]), np.array([30.0]), 10,
                             oversample=3)[0][9:12, 9:12]
    # adaptive quadrature of the 3 x 3 central pixels (the cusp is bounded: I(0) = e^b I_e)
    ref = np.array([[integrate.dblquad(lambda y, x: _profile(x - dx, y - dy, jac, 0.3, n, 0.6,
                                                              30.0),
                                       j - 0.5, j + 0.5, i - 0.5, i + 0.5,
                                       epsabs=1e-9, epsrel=1e-7)[0]
                     for j in (-1, 0, 1)] for i in (-1, 0, 1)])
    # compared within the 3 x 3 block (the stamp's normalisation is tested elsewhere):
    # plain 3x3 sub-sampling is off by up to 6% of the block's light at n = 4
    assert np.abs(fast / fast.sum() - ref / ref.sum()).max() < 1e-5


@pytest.mark.parametrize("r_e", [0.3, 1.0])
def test_galaxy_core_does_not_depend_on_the_sub_pixel_position(r_e):
    """A static galaxy must render the same light wherever it falls on the pixel grid.

    Sampling an n = 4 cusp on the pixel grid made the PSF-weighted core of a
    r_e = 0.3-0.6" bulge change by up to 22-33% with the sub-pixel position (a
    sample on the cusp): a point-like false "variable" at every bulge.
    """
    psf = {"fwhm": 4.5, "beta": 3.0, "e1": 0.03, "e2": 0.0}
    wcs = sim.tan_wcs((53.0, -27.4), (99.5, 99.5), sim.rotation_cd(0.2, 10.0))
    k = moffat_kernel(4.5, 31, beta=3.0, e1=0.03)
    wts = k / (k**2).sum()
    cores = []
    for dx, dy in [(0.0, 0.0), (0.17, 0.17), (0.5, 0.5), (0.33, -0.1), (-0.25, 0.4)]:
        src = {"x": [100 + dx], "y": [100 + dy], "flux": [1.0], "r_e_arcsec": [r_e],
               "sersic_n": [4.0], "axis_ratio": [0.7], "pa_deg": [30.0]}
        _, truth = sim.make_exposure((200, 200), wcs, psf, src, sky=0.0, seed=1)
        # back onto a common centre: exact for the smooth, PSF-convolved image
        img = np.fft.ifft2(ndimage.fourier_shift(np.fft.fft2(truth["noiseless"]), (-dy, -dx))).real
        cores.append((img[85:116, 85:116] * wts).sum())
    # measured: a spread of 1e-4 of the core flux
    assert np.ptp(cores) / np.mean(cores) < 1e-3


def test_true_psf_kernel_matches_reference_moffat():
    k = sim.true_psf_kernel({"fwhm": 3.5, "beta": 2.8, "e1": 0.05, "e2": 0.02}, 0, 0, 31,
                            dx=0.3, dy=-0.2)
    ref = moffat_kernel(3.5, 31, beta=2.8, e1=0.05, e2=0.02, dx=0.3, dy=-0.2, oversample=15)
    # Gauss-Legendre pixel integration vs 15x15 sub-sampling: L1 difference 3e-4 at most
    assert np.abs(k - ref).sum() < 3e-4
    assert k.sum() == pytest.approx(1.0)


def test_recorded_fwhm_matches_rendered_psf(dataset):
    visits = pd.read_parquet(dataset["visits"])
    ny, nx = SMALL["shape"]
    xc, yc = (nx - 1) / 2, (ny - 1) / 2
    for _, row in visits.iterrows():
        params = sim.psf_params_from_row(row)
        assert row["fwhm_px"] == pytest.approx(sim.psf_params_at(params, xc, yc)[0])
        assert row["fwhm_arcsec"] == pytest.approx(row["fwhm_px"] * 0.2)
        assert 0.6 <= row["fwhm_arcsec"] <= 1.6
        assert 2.5 <= row["psf_beta"] <= 4.5 and np.hypot(row["psf_e1"], row["psf_e2"]) <= 0.06
        _, truth = sim.make_exposure((ny, nx), sim.read_visit_wcs(row), params,
                                     {"x": [xc], "y": [yc], "flux": [1e6]}, sky=0.0,
                                     saturation=1e12, seed=0)
        h = int(np.ceil(4 * row["fwhm_px"]))
        stamp = truth["noiseless"][int(yc) - h:int(yc) + h + 2, int(xc) - h:int(xc) + h + 2]
        # star at the centre, in a window holding its stamp: the same Moffat with the same
        # pixel quadrature -> moments agree to rounding (measured 5e-8)
        assert moments_fwhm(stamp) == pytest.approx(row["fwhm_moments_px"], rel=1e-4)
        # Moffat: moment FWHM exceeds the profile FWHM (wings), by < 25 % for beta >= 2.5
        assert 1.0 < row["fwhm_moments_px"] / row["fwhm_px"] < 1.25


def test_psf_varies_mildly_across_field(dataset):
    row = pd.read_parquet(dataset["visits"]).iloc[0]
    params = sim.psf_params_from_row(row)
    xs = np.array([0, 255, 0, 255, 128])
    fwhm, e1, e2 = sim.psf_params_at(params, xs, np.array([0, 0, 255, 255, 128]))
    spread = fwhm.max() / fwhm.min() - 1
    assert 0 < spread < 0.05


# ---------------------------------------------------------------- defects

def test_bleed_conserves_charge():
    rng = np.random.default_rng(3)
    charge = rng.uniform(500, 1500, (200, 30))
    charge[95:105, 10] = 4e5
    charge[100, 11] = 2.5e5
    out, core, trail, lost = sim.bleed_saturation(charge, 1e5)
    assert lost == 0.0
    assert out.sum() == pytest.approx(charge.sum(), rel=1e-12)
    assert out.max() <= 1e5 and core.sum() == 11
    assert set(np.flatnonzero(trail.any(axis=0))) == {10, 11}
    # excess 10 x 3e5 + 1.5e5 -> about 30 + 1.5 pixels of trail
    assert 28 <= trail.sum() <= 36
    # a trail running off the detector loses charge, accounted for in ``lost``
    edge = charge.copy()
    edge[0:3, 20] = 1e7
    out, _, _, lost = sim.bleed_saturation(edge, 1e5)
    assert lost > 0 and out.sum() + lost == pytest.approx(edge.sum(), rel=1e-12)


def test_saturated_star_bleeds_along_column():
    src = {"x": [100.2], "y": [100.7], "flux": [5e7]}
    img, truth = sim.make_exposure((200, 200), _tan_frame(), PSF, src, sky=900.0, read_noise=0.0,
                                   saturation=1e5, defects={"bleed"}, seed=2)
    mask = truth["defect_mask"]
    core = (mask & sim.DEFECT_BITS["SAT_CORE"]) != 0
    trail = (mask & sim.DEFECT_BITS["BLEED"]) != 0
    assert img.max() == 1e5 and core.any() and trail.any()
    assert set(np.flatnonzero(trail.any(axis=0))) <= set(np.flatnonzero(core.any(axis=0)))
    # charge conserved up to the Poisson draw: 5 sigma of the total
    total = truth["noiseless"].sum()
    assert abs(img.astype(float).sum() + truth["bleed_lost"] - total) < 5 * np.sqrt(total)
    clipped, t2 = sim.make_exposure((200, 200), _tan_frame(), PSF, src, sky=900.0,
                                    read_noise=0.0, saturation=1e5, defects=False, seed=2)
    assert clipped.max() == 1e5 and not (t2["defect_mask"] & sim.DEFECT_BITS["BLEED"]).any()
    assert clipped.astype(float).sum() < total - 1e6  # excess charge is lost when clipped


def test_cosmic_rays_and_bad_columns_are_sharp():
    img, truth = sim.make_exposure((300, 300), _tan_frame((300, 300)), PSF, None, sky=1000.0,
                                   defects={"cosmic_rays", "bad_columns"}, seed=5,
                                   cosmic_rays_per_mpix=300)
    mask = truth["defect_mask"]
    cr = (mask & sim.DEFECT_BITS["COSMIC_RAY"]) != 0
    bad_cols = np.flatnonzero(((mask & sim.DEFECT_BITS["BAD_COLUMN"]) != 0).any(axis=0))
    assert truth["n_cosmic_rays"] > 5 and 1 <= len(bad_cols) <= 3
    ok = cr & ~((mask & sim.DEFECT_BITS["BAD_COLUMN"]) != 0)
    # deposits of >= 300 x 0.7 e-: far above the 33 e- sky noise
    assert (img[ok] - 1000.0).min() > 100


# ---------------------------------------------------------------- mosaic, variables

def test_mosaic_writes_one_file_per_detector(tmp_path):
    settings = dict(SMALL, n_visits=1, n_detectors=3, shape=[96, 128], n_stars=40, n_galaxies=10)
    paths = sim.simulate_dataset(tmp_path, settings)
    assert len(paths["images"]) == 3
    heads = [fits.getheader(p) for p in paths["images"]]
    assert sorted(h["DETECTOR"] for h in heads) == [0, 1, 2]
    assert len({h["VISIT"] for h in heads}) == 1
    centres = SkyCoord([_wcs(h).pixel_to_world(63.5, 47.5) for h in heads])
    sep = centres[0].separation(centres[1]).arcsec
    # neighbouring detectors: (128 + 40 gap) px apart, or (96 + 40) for the next row
    assert sep == pytest.approx(168 * 0.2, abs=6.0) or sep == pytest.approx(136 * 0.2, abs=6.0)


def test_variable_fluxes_match_light_curves_and_exposure(dataset):
    variables = pd.read_parquet(dataset["variables"])
    tr = variables[variables["kind"] == "transient"]
    peak = sim.variable_flux_njy(tr.iloc[:1], "r", float(tr["t_peak_mjd"].iloc[0]))
    assert peak[0] == pytest.approx(10 ** (-0.4 * (tr["r_mag"].iloc[0] - 31.4)), rel=1e-9)
    s = sim.merge_settings(SMALL)
    static = sim.make_static_sources(s)
    plan = sim.plan_visit(s, 1)
    fluxes = pd.read_parquet(dataset["variable_fluxes"])
    fl = fluxes[fluxes["visit"] == plan["visit"]].set_index("id")["flux_njy"]
    _, _, truth, _ = sim.simulate_exposure(s, plan, 0, static, variables, fl.to_numpy())
    src = truth["sources"].set_index("id")
    on = src.index.intersection(variables["id"])
    assert len(on) == len(variables)  # all variables lie in the always-covered disc
    expected = fl.loc[on] * 10 ** (0.4 * (plan["zeropoint"] - 31.4))
    np.testing.assert_allclose(src.loc[on, "flux"], expected, rtol=1e-12)


# ---------------------------------------------------------------- settings and CLI

def test_unknown_setting_is_rejected():
    with pytest.raises(ConfigError, match="n_starz"):
        sim.merge_settings({"n_starz": 3})
    with pytest.raises(ConfigError, match="bands"):
        sim.merge_settings({"bands": ["q"]})


def test_twinkles_config():
    path = Path(__file__).resolve().parents[1] / "config" / "twinkles40.yaml"
    cfg = yaml.safe_load(path.read_text())
    assert set(cfg) == {"simulate", "outdir"} and cfg["outdir"] == "results_twinkles40"
    s = sim.merge_settings(cfg["simulate"])
    assert s["shape"] == [4072, 4000] and s["n_visits"] == 40 and s["bands"] == ["r"]


def test_cli_simulate(tmp_path):
    cfg = tmp_path / "cfg.yaml"
    cfg.write_text(yaml.safe_dump({"simulate": dict(SMALL, n_stars=30), "outdir": "x"}))
    out = tmp_path / "data"
    rc = cli.main(["-q", "simulate", "--config", str(cfg), "--outdir", str(out),
                   "--n-visits", "1", "--shape", "64", "80", "--set", "n_galaxies=5",
                   "--no-defects"])
    assert rc == 0
    files = sorted((out / "images").glob("eimage_*.fits"))
    assert len(files) == 1 and fits.getdata(files[0]).shape == (64, 80)
    used = yaml.safe_load((out / "dataset.yaml").read_text())["simulate"]
    assert used["n_galaxies"] == 5 and used["defects"] is False and used["n_stars"] == 30
    assert not list((out / "truth").glob("defects_*"))
    assert cli.main(["-q", "simulate", "--outdir", str(out), "--set", "bogus=1"]) == 2


def test_make_exposure_accepts_a_psf_model():
    from diffim.psf import PsfModel

    model = PsfModel.gaussian(4.0, 25, 200, 200)
    src = {"x": [97.37, 50.2], "y": [103.81, 60.7], "flux": [1e5, 1e4],
           "r_e_arcsec": [0.0, 0.8], "sersic_n": [1.0, 4.0], "axis_ratio": [1.0, 0.6],
           "pa_deg": [0.0, 10.0]}
    _, truth = sim.make_exposure((200, 200), _tan_frame(), model, src, sky=0.0, seed=1)
    img = truth["noiseless"]
    # unit-sum kernels and galaxy stamps, both sources fully inside: flux to rounding
    assert img.sum() == pytest.approx(1.1e5, rel=1e-9)
    yy, xx = np.mgrid[:200, :200]
    win = (abs(xx - 97) <= 15) & (abs(yy - 104) <= 15)
    # cubic-spline sub-pixel shift of the pixelized model: centroid within 0.01 px (4e-4 seen)
    assert abs((img * xx)[win].sum() / img[win].sum() - 97.37) < 0.01
    assert abs((img * yy)[win].sum() / img[win].sum() - 103.81) < 0.01
