"""Synthetic image pairs with truth for the peer benchmark (independent of diffim.simulate).

Conventions: arrays [y, x]; pixel (0, 0) is the centre of the first pixel.
Images are written in ADU (sky NOT subtracted); truth maps are in electrons.

Each pair directory holds::

    sci.fits, ref.fits           input images (ADU, float32) with GAIN, RDNOISE, SATURATE, TAN WCS
    truth/params.json            every simulation parameter (PSF laws, sky laws, gain, flux scale)
    truth/transients.csv         x, y, flux_e, flux_adu, snr_inj, kind, in_cluster
    truth/stars.csv              x, y, flux_sci_e, in_cluster
    truth/sci_stars_e.fits       noiseless static-star light in the science image (e-)
    truth/ref_stars_e.fits       noiseless static-star light in the reference image (e-)
    truth/sci_trans_e.fits       noiseless transient light in the science image (e-)
    truth/psf_sci.fits, psf_ref.fits   true PSFs (cube) on a grid; table HDU with the grid x, y
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import pandas as pd
from astropy.io import fits
from astropy.wcs import WCS

logger = logging.getLogger(__name__)

HALF = 20                 # PSF stamp half-width: stamps are 41 x 41 px
OVERSAMPLE = 3            # sub-pixel integration of the analytic profile
GRID_STEP = 128           # spacing of the true-PSF grid written for the oracle (px)
GAIN = 2.0                # e-/ADU, both images
READ_NOISE = 5.0          # e-, both images
REF_SCALE = 1.3           # reference counts per science count for the same star
PIXEL_SCALE = 0.26        # arcsec/px

DIRECTIONS = {
    # FWHM (px), Moffat beta, ellipticity (e1, e2) at the field centre.
    "ref_sharper": dict(sci=dict(fwhm=3.7, beta=2.5, e1=0.06, e2=0.03),
                        ref=dict(fwhm=2.5, beta=3.0, e1=-0.03, e2=0.05)),
    "sci_sharper": dict(sci=dict(fwhm=2.5, beta=2.5, e1=0.06, e2=0.03),
                        ref=dict(fwhm=4.0, beta=3.0, e1=-0.03, e2=0.05)),
}
# Spatial variation over the field, u, v = 2 x / N - 1, 2 y / N - 1 in [-1, 1].
PSF_VARIATION = dict(sci=dict(dfwhm_u=0.05, dfwhm_v=-0.03, de1_u=0.02, de2_v=0.02),
                     ref=dict(dfwhm_u=-0.03, dfwhm_v=0.04, de1_u=-0.02, de2_v=0.01))
# Sky (e-/px) = level * (1 + gu u + gv v + quv u v).
SKY = dict(sci=dict(level=800.0, gu=0.10, gv=0.05, quv=0.02),
           ref=dict(level=350.0, gu=-0.08, gv=0.10, quv=-0.02))


def psf_params(which: str, direction: str, x, y, n: int) -> tuple:
    """Return (fwhm, beta, e1, e2) of the true PSF of image ``which`` at pixel (x, y)."""
    base, var = DIRECTIONS[direction][which], PSF_VARIATION[which]
    u, v = 2.0 * np.asarray(x) / n - 1.0, 2.0 * np.asarray(y) / n - 1.0
    fwhm = base["fwhm"] * (1.0 + var["dfwhm_u"] * u + var["dfwhm_v"] * v)
    return fwhm, base["beta"], base["e1"] + var["de1_u"] * u, base["e2"] + var["de2_v"] * v


def moffat_stamp(fwhm: float, beta: float, e1: float, e2: float, dx: float, dy: float) -> np.ndarray:
    """Elliptical Moffat integrated over pixels, centred at (dx, dy) from the stamp centre.

    The stamp is (2 HALF + 1)^2 and normalised to unit sum: the truncated profile *is*
    the true PSF of the simulation.  Ellipticity keeps the determinant (area) fixed.
    """
    alpha = fwhm / (2.0 * np.sqrt(2.0 ** (1.0 / beta) - 1.0))
    n = 2 * HALF + 1
    sub = (np.arange(n * OVERSAMPLE) + 0.5) / OVERSAMPLE - 0.5 - HALF
    yy, xx = np.meshgrid(sub - dy, sub - dx, indexing="ij")
    norm = np.sqrt(max(1.0 - e1 * e1 - e2 * e2, 1e-6))
    r2 = ((1.0 - e1) * xx * xx + (1.0 + e1) * yy * yy - 2.0 * e2 * xx * yy) / norm
    prof = (1.0 + r2 / alpha ** 2) ** (-beta)
    stamp = prof.reshape(n, OVERSAMPLE, n, OVERSAMPLE).sum(axis=(1, 3))
    return stamp / stamp.sum()


def true_psf(which: str, direction: str, x: float, y: float, n: int) -> np.ndarray:
    """True PSF stamp of image ``which`` for a source at (x, y), centred at its sub-pixel offset."""
    fwhm, beta, e1, e2 = psf_params(which, direction, x, y, n)
    return moffat_stamp(float(fwhm), beta, float(e1), float(e2), x - np.round(x), y - np.round(y))


def sky_map(which: str, n: int) -> np.ndarray:
    """Sky level (e-/px) of image ``which`` on the n x n grid."""
    s = SKY[which]
    u = 2.0 * np.arange(n) / n - 1.0
    return s["level"] * (1.0 + s["gu"] * u[None, :] + s["gv"] * u[:, None] + s["quv"] * u[None, :] * u[:, None])


def paint(img: np.ndarray, which: str, direction: str, xs, ys, fluxes) -> None:
    """Add point sources (flux in e-) with the true PSF at sub-pixel positions, in place."""
    n = img.shape[0]
    for x, y, f in zip(xs, ys, fluxes):
        ix, iy = int(np.round(x)), int(np.round(y))
        if not (HALF <= ix < n - HALF and HALF <= iy < n - HALF):
            continue   # sources are drawn away from the edges; this guards the slicing only
        img[iy - HALF:iy + HALF + 1, ix - HALF:ix + HALF + 1] += f * true_psf(which, direction, x, y, n)


def luminosity_function(rng, count: int, f_min=300.0, f_max=2.0e6, slope=0.3) -> np.ndarray:
    """Science fluxes (e-) with dN/dm proportional to 10**(slope m) between f_min and f_max."""
    dm = 2.5 * np.log10(f_max / f_min)
    m = np.log10(1.0 + rng.uniform(size=count) * (10.0 ** (slope * dm) - 1.0)) / slope
    return f_max * 10.0 ** (-0.4 * m)


def cluster_positions(rng, count: int, centre, a=90.0, r_max=300.0):
    """Plummer-profile positions truncated at ``r_max`` (projected mass M(<R) = R^2 / (R^2 + a^2))."""
    u = rng.uniform(0.0, r_max ** 2 / (r_max ** 2 + a ** 2), count)
    r = a * np.sqrt(u / (1.0 - u))
    phi = rng.uniform(0.0, 2.0 * np.pi, count)
    return centre[0] + r * np.cos(phi), centre[1] + r * np.sin(phi)


def layout(n: int, seed: int) -> dict:
    """Draw static stars, the cluster and transient positions/S/N (no fluxes for transients yet)."""
    rng = np.random.default_rng(seed)
    margin = HALF + 2
    n_field = int(3000 * (n / 2048) ** 2)
    fx, fy = rng.uniform(margin, n - margin, (2, n_field))
    centre = (0.35 * n, 0.60 * n)
    cx, cy = cluster_positions(rng, 1500, centre)
    stars = pd.DataFrame(dict(x=np.r_[fx, cx], y=np.r_[fy, cy],
                              flux_sci_e=luminosity_function(rng, n_field + 1500),
                              in_cluster=np.r_[np.zeros(n_field, bool), np.ones(1500, bool)]))
    n_tr = 80 if n <= 2048 else 240
    tr = _transient_positions(rng, stars, n, n_tr, centre)
    return dict(stars=stars, transients=tr, centre=centre, r_cluster=300.0, rng=rng)


def _transient_positions(rng, stars, n, n_tr, centre) -> pd.DataFrame:
    """Positions of new sources (90 %, 10 % of them inside the cluster) and brightened stars (10 %)."""
    edge = 80.0
    n_bright = max(6, n_tr // 10)
    field = stars[~stars.in_cluster & stars.flux_sci_e.between(2e3, 5e4)
                  & stars.x.between(edge, n - edge) & stars.y.between(edge, n - edge)]
    pick = field.iloc[rng.choice(len(field), n_bright, replace=False)]
    xs, ys, kinds = list(pick.x), list(pick.y), ["brightening"] * n_bright
    n_cl = max(4, (n_tr - n_bright) // 10)
    while len(xs) < n_tr:
        if len(xs) < n_bright + n_cl:
            r, phi = rng.uniform(30.0, 280.0), rng.uniform(0, 2 * np.pi)
            x, y = centre[0] + r * np.cos(phi), centre[1] + r * np.sin(phi)
        else:
            x, y = rng.uniform(edge, n - edge, 2)
        if np.min(np.hypot(np.array(xs) - x, np.array(ys) - y)) > 25.0:
            xs.append(x); ys.append(y); kinds.append("new")
    snr = np.exp(rng.uniform(np.log(3.0), np.log(50.0), n_tr))
    in_cl = np.hypot(np.array(xs) - centre[0], np.array(ys) - centre[1]) < 300.0
    return pd.DataFrame(dict(x=xs, y=ys, snr_inj=snr, kind=kinds, in_cluster=in_cl))


def transient_fluxes(tr: pd.DataFrame, var0: np.ndarray, direction: str) -> np.ndarray:
    """Fluxes (e-) giving the injected optimal S/N F sqrt(sum P^2 / var) in the science image.

    ``var0`` is the science variance without the transient (sky + stars + read noise, e-^2);
    the transient's own Poisson noise is included by fixed-point iteration.
    """
    n = var0.shape[0]
    out = np.empty(len(tr))
    for i, (x, y, snr) in enumerate(zip(tr.x, tr.y, tr.snr_inj)):
        p = true_psf("sci", direction, x, y, n)
        ix, iy = int(np.round(x)), int(np.round(y))
        v = var0[iy - HALF:iy + HALF + 1, ix - HALF:ix + HALF + 1]
        f = snr * np.sqrt(1.0 / np.sum(p * p / v))
        for _ in range(8):
            f = snr / np.sqrt(np.sum(p * p / (v + f * p)))
        out[i] = f
    return out


def make_wcs(n: int) -> WCS:
    """Simple TAN WCS, north up, PIXEL_SCALE arcsec/px, reference pixel at the centre."""
    w = WCS(naxis=2)
    w.wcs.ctype = ["RA---TAN", "DEC--TAN"]
    w.wcs.crval = [150.0, 2.0]
    w.wcs.crpix = [n / 2 + 0.5, n / 2 + 0.5]
    w.wcs.cdelt = [-PIXEL_SCALE / 3600.0, PIXEL_SCALE / 3600.0]
    w.wcs.cunit = ["deg", "deg"]
    return w


def _header(n: int, which: str, direction: str) -> fits.Header:
    h = make_wcs(n).to_header()
    fwhm = DIRECTIONS[direction][which]["fwhm"]
    for key, val in dict(GAIN=GAIN, RDNOISE=READ_NOISE, SATURATE=1.0e9, BUNIT="ADU",
                         EXPTIME=60.0, FILTER="r", MJD_OBS=60000.0 if which == "ref" else 60100.0,
                         SEEING=fwhm * PIXEL_SCALE, FWHM=fwhm).items():
        h[key.replace("MJD_OBS", "MJD-OBS")] = val
    h["COMMENT"] = "RDNOISE in e-; GAIN in e-/ADU; synthetic peer-benchmark image"
    return h


def simulate_pair(outdir: Path, n: int, direction: str, *, seed: int) -> Path:
    """Write one image pair with truth into ``outdir``; return ``outdir``."""
    outdir = Path(outdir)
    (outdir / "truth").mkdir(parents=True, exist_ok=True)
    lay = layout(n, seed)
    stars, tr, rng = lay["stars"], lay["transients"], lay["rng"]
    sci_st = np.zeros((n, n)); ref_st = np.zeros((n, n))
    paint(sci_st, "sci", direction, stars.x, stars.y, stars.flux_sci_e)
    paint(ref_st, "ref", direction, stars.x, stars.y, REF_SCALE * stars.flux_sci_e)
    sky_s, sky_r = sky_map("sci", n), sky_map("ref", n)
    tr["flux_e"] = transient_fluxes(tr, sky_s + sci_st + READ_NOISE ** 2, direction)
    tr["flux_adu"] = tr.flux_e / GAIN
    sci_tr = np.zeros((n, n))
    paint(sci_tr, "sci", direction, tr.x, tr.y, tr.flux_e)
    for name, model, skym in (("sci", sci_st + sci_tr, sky_s), ("ref", ref_st, sky_r)):
        expected = model + skym
        counts = rng.poisson(expected).astype(np.float64) + rng.normal(0.0, READ_NOISE, expected.shape)
        fits.writeto(outdir / f"{name}.fits", (counts / GAIN).astype(np.float32),
                     _header(n, name, direction), overwrite=True)
    for name, arr in (("sci_stars_e", sci_st), ("ref_stars_e", ref_st), ("sci_trans_e", sci_tr)):
        fits.writeto(outdir / "truth" / f"{name}.fits", arr.astype(np.float32), overwrite=True)
    stars.to_csv(outdir / "truth" / "stars.csv", index=False)
    tr.to_csv(outdir / "truth" / "transients.csv", index=False)
    _write_psf_grids(outdir / "truth", n, direction)
    params = dict(n=n, direction=direction, seed=seed, gain=GAIN, read_noise_e=READ_NOISE,
                  ref_scale=REF_SCALE, half=HALF, grid_step=GRID_STEP, sky=SKY,
                  psf=DIRECTIONS[direction], psf_variation=PSF_VARIATION,
                  cluster_centre=list(lay["centre"]), cluster_radius=lay["r_cluster"])
    (outdir / "truth" / "params.json").write_text(json.dumps(params, indent=1))
    logger.info("wrote pair %s (%d stars, %d transients)", outdir, len(stars), len(tr))
    return outdir


def psf_grid_centres(n: int) -> np.ndarray:
    """Pixel coordinates of the true-PSF grid nodes (centres of GRID_STEP cells)."""
    return np.arange(GRID_STEP / 2, n, GRID_STEP)


def _write_psf_grids(truthdir: Path, n: int, direction: str) -> None:
    g = psf_grid_centres(n)
    gx, gy = np.meshgrid(g, g)
    for which in ("sci", "ref"):
        cube = np.array([true_psf(which, direction, x, y, n) for x, y in zip(gx.ravel(), gy.ravel())])
        tab = fits.BinTableHDU.from_columns([fits.Column("x", "D", array=gx.ravel()),
                                             fits.Column("y", "D", array=gy.ravel())])
        fits.HDUList([fits.PrimaryHDU(cube.astype(np.float64)), tab]).writeto(
            truthdir / f"psf_{which}.fits", overwrite=True)


def pair_seed(n: int, direction: str) -> int:
    """Deterministic seed of a (size, direction) pair."""
    return 1000 * (n // 1024) + (1 if direction == "ref_sharper" else 2)
