"""Synthetic DIA datasets: PhoSim-like eimages, a reference catalog and truth.

The simulator is the workflow's embedded default dataset and the test bed of
every other module.  Its output follows ``CONTRACT.md``:

``{outdir}/images/eimage_v{visit:07d}_d{det:02d}_{band}.fits``
    One float32 image per (visit, detector), electrons, sky not subtracted,
    with an approximate (deliberately perturbed) TAN WCS and the contract
    header keywords.
``{outdir}/refcat.parquet``
    Non-variable point sources brighter than ``refcat_mag_limit``.
``{outdir}/truth/``
    ``static_sources.parquet``, ``variables.parquet``,
    ``variable_fluxes.parquet``, ``visits.parquet`` and, with defects on,
    ``defects_v{visit:07d}_d{det:02d}.fits`` (bits :data:`DEFECT_BITS`).
``{outdir}/dataset.yaml``
    The full settings used.

Two layers:

* :func:`make_exposure` is a pure renderer (arrays and a WCS in, an image and
  its truth out) used by :func:`simulate_dataset` and by other modules' tests;
  :func:`true_psf_kernel` gives the exact truth PSF at any position.
* :func:`simulate_dataset` draws the sky, the visits and writes the files (the
  one place in the library where file I/O is part of the job).

Pixel conventions follow :mod:`diffim`: arrays ``[y, x]``, pixel ``(0, 0)`` is
the centre of the first pixel.  Photometry: ``ZEROPT`` is the AB magnitude
giving 1 electron in the exposure, so ``electrons = flux_nJy *
10**(0.4 * (ZEROPT - 31.4))``.

Truth PSF
---------
An elliptical Moffat profile (same parametrisation as
:func:`diffim.psf.moffat_kernel`) normalised to unit integral over the whole
plane and integrated over pixels (5x5 sub-sampling in the core, pixel-centre
sampling in the smooth wings).  Its FWHM and ellipticity vary smoothly over the
focal plane (see :func:`psf_params_at`).  Each star is drawn in a stamp whose
half-size grows with its brightness so that the flux left outside is below
``max(5e-4, min(0.02, sigma_sky / flux))`` of the star's flux and the wing
left out is below half the sky noise per pixel; the flux actually rendered is
recorded per source (``flux_rendered``).
"""

from __future__ import annotations

import copy
import logging
import math
import os
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

import numpy as np
import pandas as pd
from astropy.io import fits
from astropy.time import Time
from astropy.wcs import WCS
from scipy import fft, ndimage, special

from .errors import ConfigError
from .psf import PsfModel, moments_fwhm

logger = logging.getLogger(__name__)

#: AB magnitude of the flux that gives 1 electron per second (LSST-like).
BAND_ZP_1S = {"u": 26.9, "g": 28.5, "r": 28.3, "i": 28.1, "z": 27.8, "y": 26.8}
#: Dark-sky brightness of each band minus the r-band one, mag/arcsec^2.
BAND_SKY_OFFSET = {"u": 1.8, "g": 1.1, "r": 0.0, "i": -0.8, "z": -1.6, "y": -2.3}
#: Extinction coefficient, mag per airmass.
BAND_EXTINCTION = {"u": 0.45, "g": 0.2, "r": 0.12, "i": 0.09, "z": 0.07, "y": 0.06}
#: Band magnitude = r magnitude + colour * coefficient (colour ~ g - r).
BAND_COLOUR_COEF = {"u": 2.2, "g": 1.0, "r": 0.0, "i": -0.4, "z": -0.6, "y": -0.7}
#: Seeing relative to r (FWHM ~ wavelength^-0.2).
BAND_SEEING_FACTOR = {"u": 1.12, "g": 1.06, "r": 1.0, "i": 0.96, "z": 0.93, "y": 0.91}

#: Bit values of the truth defect masks.
DEFECT_BITS = {"COSMIC_RAY": 1, "BAD_COLUMN": 2, "BLEED": 4, "SAT_CORE": 8}
DEFECT_KINDS = ("cosmic_rays", "bad_columns", "bleed")

DEFAULT_SETTINGS: dict = {
    "seed": 42,                    # master seed; every RNG derives from (seed, tag, visit, detector)
    "n_visits": 10,                # number of visits
    "first_visit": 1,              # visit number of the first visit (then +1 each)
    "bands": ["g", "r"],           # visits cycle through these bands (u g r i z y)
    "shape": [1024, 1024],         # detector size [ny, nx], pixels
    "n_detectors": 1,              # detectors per visit, laid out on a near-square grid
    "detector_gap_px": 40,         # gap between neighbouring detectors, pixels
    "pixel_scale": 0.2,            # arcsec per pixel
    "ra": 53.0091,                 # field centre RA, deg (Twinkles field)
    "dec": -27.4389,               # field centre Dec, deg
    "exptime": 30.0,               # exposure time, s
    "mjd_start": 60000.0,          # MJD (TAI) of the first visit's night
    "cadence_days": 3.0,           # days between consecutive visits (+ up to 0.2 d jitter)
    "fwhm_range_arcsec": [0.6, 1.6],   # seeing FWHM limits, arcsec
    "fwhm_median_arcsec": 0.9,     # median of the lognormal seeing distribution (r band)
    "fwhm_log_sigma": 0.25,        # sigma of ln(FWHM)
    "psf_beta_range": [2.5, 4.5],  # Moffat beta per visit, uniform in this range
    "psf_e_max": 0.06,             # max |e| of the PSF ellipticity at the field centre
    "psf_fwhm_variation": 0.03,    # max fractional FWHM change across the focal plane
    "n_stars": 1500,               # mean number of stars per detector image (sets the density)
    "star_mag_range": [16.0, 25.0],    # r magnitudes of stars
    "star_count_slope": 0.25,      # dlog10 N / dm of star counts
    "n_galaxies": 600,             # mean number of galaxies per detector image
    "galaxy_mag_range": [18.0, 25.0],  # r magnitudes of galaxies
    "galaxy_count_slope": 0.33,    # dlog10 N / dm of galaxy counts
    "n_saturated": 2,              # mean number of very bright (saturated) stars per detector image
    "saturated_mag_range": [11.5, 14.5],  # r magnitudes of those
    "n_variable_stars": 7,         # periodic variable stars in the whole field
    "variable_mag_range": [19.0, 22.5],   # their mean r magnitude
    "variable_amp_range": [0.15, 1.0],    # peak-to-peak amplitude, mag
    "n_transients": 8,             # supernova-like transients in the whole field
    "transient_peak_mag_range": [20.5, 24.0],  # peak r magnitude
    "host_fraction": 0.75,         # fraction of transients placed in a host galaxy
    "defects": True,               # cosmic rays, bad columns and bleed trails
    "cosmic_rays_per_mpix": 20.0,  # cosmic-ray events per 10^6 pixels per exposure
    "dither_fraction": 0.25,       # max pointing offset as a fraction of the field width
    "rotate": True,                # arbitrary sky rotation angle per visit
    "wcs_error": {"shift_arcsec": 5.0, "rot_deg": 0.1, "scale": 0.005},  # header WCS error limits
    "sky_mag_range": [20.6, 21.4],  # per-visit r-band sky, mag/arcsec^2 (other bands offset)
    "transparency_range": [0.0, 0.3],  # per-visit cloud extinction, mag
    "airmass_range": [1.0, 1.6],   # per-visit airmass
    "read_noise": 8.0,             # electrons rms
    "gain": 1.0,                   # e-/ADU; pixels are written in ADU when != 1
    "saturation": 100000.0,        # full well, electrons (SATURATE)
    "refcat_mag_limit": 22.5,      # refcat keeps stars brighter than this (r, or the first band)
    "refcat_missing_fraction": 0.02,  # random fraction of refcat stars left out
}


# --------------------------------------------------------------------------
# settings
# --------------------------------------------------------------------------

def merge_settings(settings: Mapping | None = None) -> dict:
    """Return :data:`DEFAULT_SETTINGS` updated with ``settings``, validated.

    Raises
    ------
    ConfigError
        For an unknown key or a value of the wrong kind.
    """
    merged = copy.deepcopy(DEFAULT_SETTINGS)
    for key, value in dict(settings or {}).items():
        if key not in DEFAULT_SETTINGS:
            raise ConfigError(f"Unknown simulate setting {key!r}; known settings are: "
                              f"{', '.join(sorted(DEFAULT_SETTINGS))}.")
        if key == "wcs_error":
            if not isinstance(value, Mapping) or set(value) - set(merged["wcs_error"]):
                raise ConfigError("Setting 'wcs_error' must be a mapping with keys "
                                  "shift_arcsec, rot_deg and scale.")
            merged["wcs_error"].update({k: float(v) for k, v in value.items()})
        else:
            merged[key] = copy.deepcopy(value)
    _validate_settings(merged)
    return merged


def _validate_settings(s: dict) -> None:
    """Check kinds and ranges of merged settings (raises ConfigError)."""
    if isinstance(s["bands"], str):
        s["bands"] = [s["bands"]]
    bad = [b for b in s["bands"] if str(b).strip().lower() not in BAND_ZP_1S]
    if not s["bands"] or bad:
        raise ConfigError(f"Setting 'bands' must list bands among {list(BAND_ZP_1S)}; got {s['bands']}.")
    s["bands"] = [str(b).strip().lower() for b in s["bands"]]
    shape = s["shape"]
    if (not isinstance(shape, Sequence) or len(shape) != 2
            or any(int(v) != v or v < 32 for v in shape)):
        raise ConfigError(f"Setting 'shape' must be [ny, nx] with integers >= 32; got {shape}.")
    s["shape"] = [int(shape[0]), int(shape[1])]
    for key in ("n_visits", "n_detectors"):
        if int(s[key]) != s[key] or s[key] < 1:
            raise ConfigError(f"Setting {key!r} must be a positive integer; got {s[key]}.")
    for key in ("n_stars", "n_galaxies", "n_saturated", "n_variable_stars", "n_transients"):
        if s[key] < 0:
            raise ConfigError(f"Setting {key!r} must be >= 0; got {s[key]}.")
    for key in ("fwhm_range_arcsec", "star_mag_range", "galaxy_mag_range", "sky_mag_range",
                "transparency_range", "airmass_range", "psf_beta_range", "saturated_mag_range",
                "variable_mag_range", "variable_amp_range", "transient_peak_mag_range"):
        v = s[key]
        if not isinstance(v, Sequence) or len(v) != 2 or float(v[0]) > float(v[1]):
            raise ConfigError(f"Setting {key!r} must be a [low, high] pair; got {v}.")
        s[key] = [float(v[0]), float(v[1])]
    if s["psf_beta_range"][0] <= 1.5:
        raise ConfigError("Setting 'psf_beta_range' must stay above 1.5 (finite PSF flux).")
    for key in ("pixel_scale", "exptime", "saturation", "gain"):
        if not s[key] > 0:
            raise ConfigError(f"Setting {key!r} must be positive; got {s[key]}.")
    try:
        _defect_set(s["defects"])
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"Setting 'defects' must be true, false or a list of {list(DEFECT_KINDS)}"
                          f": {exc}") from None
    if not 0 <= s["dither_fraction"] <= 0.5:
        raise ConfigError("Setting 'dither_fraction' must be between 0 and 0.5.")


# --------------------------------------------------------------------------
# truth PSF: spatially varying, elliptical, pixel-integrated Moffat
# --------------------------------------------------------------------------

#: Stamp half-sizes are rounded up to one of these (fewer batch shapes).
_HALF_LADDER = np.array([3, 4, 5, 6, 7, 8, 10, 12, 14, 16, 18, 20, 24, 28, 32, 40, 48, 56, 64,
                         80, 96, 112, 128, 160, 192, 224, 256, 320, 384, 448, 512])
_CHUNK_ELEMENTS = 3_000_000  # max elements of one batched evaluation array


def psf_params_at(params: Mapping, x, y):
    """Local Moffat FWHM (pixels) and ellipticity ``(e1, e2)`` at pixel ``(x, y)``.

    ``params`` keys: ``fwhm`` (pixels, at the focal-plane centre), ``beta``,
    ``e1``, ``e2``; optional field variation ``fwhm_gx``, ``fwhm_gy``,
    ``fwhm_r2``, ``e1_gx``, ``e2_gy`` (defaults 0) in the scaled focal-plane
    coordinates ``u = (x - x0) / scale``, ``v = (y - y0) / scale`` with ``x0``,
    ``y0`` (the focal-plane centre in this detector's pixels, default 0) and
    ``scale`` (pixels, default 1)::

        fwhm(x, y) = fwhm * (1 + fwhm_gx u + fwhm_gy v + fwhm_r2 (u^2 + v^2))
        e1(x, y) = e1 + e1_gx u,    e2(x, y) = e2 + e2_gy v
    """
    g = params.get
    u = (np.asarray(x, float) - g("x0", 0.0)) / g("scale", 1.0)
    v = (np.asarray(y, float) - g("y0", 0.0)) / g("scale", 1.0)
    fwhm = params["fwhm"] * (1.0 + g("fwhm_gx", 0.0) * u + g("fwhm_gy", 0.0) * v
                             + g("fwhm_r2", 0.0) * (u * u + v * v))
    e1 = g("e1", 0.0) + g("e1_gx", 0.0) * u
    e2 = g("e2", 0.0) + g("e2_gy", 0.0) * v
    return fwhm, e1, e2


def moffat_alpha(fwhm, beta):
    """Moffat scale ``alpha`` (pixels) of a profile with the given FWHM and beta."""
    return np.asarray(fwhm, float) / (2.0 * np.sqrt(2.0 ** (1.0 / np.asarray(beta, float)) - 1.0))


def _moffat_values(xo, yo, alpha, e1, e2, beta):
    """Unit-integral elliptical Moffat at offsets ``xo, yo`` (arrays (n, a, b)).

    Per-object parameters are arrays of shape (n,).  Same quadratic form as
    :func:`diffim.psf.moffat_kernel`; the integral over the plane is 1.
    """
    col = (slice(None), None, None)
    e = np.hypot(e1, e2)
    a2 = alpha**2 / np.sqrt(1.0 - e**2)
    det = alpha**4
    qxx = (a2 * (1 - e1) / det)[col]
    qyy = (a2 * (1 + e1) / det)[col]
    qxy = (-2.0 * a2 * e2 / det)[col]
    r2 = qxx * xo * xo + qxy * xo * yo + qyy * yo * yo
    norm = ((beta - 1.0) / (np.pi * alpha**2))[col]
    return norm * (1.0 + r2) ** (-np.asarray(beta, float)[col])


def _gl_nodes(order: int):
    """Gauss-Legendre nodes (pixel units, centred on 0) and weights for one pixel."""
    nodes, weights = np.polynomial.legendre.leggauss(order)
    return nodes / 2.0, weights / 2.0


def moffat_stamps(dx, dy, fwhm, e1, e2, beta, half: int) -> np.ndarray:
    """Pixel-integrated Moffat stamps, one per object.

    Parameters
    ----------
    dx, dy : array (n,)
        Sub-pixel offset of each centre from the stamp's central pixel.
    fwhm, e1, e2, beta : array (n,) or scalar
        Profile parameters (FWHM in pixels).
    half : int
        Stamp half-size; stamps are ``(2 half + 1)`` square.

    Returns
    -------
    stamps : ndarray (n, 2 half + 1, 2 half + 1)
        Flux fractions per pixel; the sum is 1 minus the flux outside.

    Notes
    -----
    Pixel integrals use Gauss-Legendre quadrature: 3x3 points within
    ``FWHM + 1`` pixels of the centre, 2x2 out to 3 FWHM and the pixel centre
    beyond, where the profile is smooth.  Against a 15x15 sub-sampled
    reference the stamps agree to < 3e-4 of the flux (L1) for FWHM >= 3 px,
    at a fraction of the cost of uniform sub-sampling.
    """
    n = np.size(dx)
    dx, dy, fwhm, e1, e2, beta = (np.broadcast_to(np.asarray(a, float), (n,))
                                  for a in (dx, dy, fwhm, e1, e2, beta))
    alpha = moffat_alpha(fwhm, beta)
    fmax = float(np.max(fwhm, initial=1.0))
    h2 = min(half, int(math.ceil(3 * fmax)))
    h3 = min(h2, int(math.ceil(fmax)) + 1)
    # outer zones are skipped when an inner zone overwrites them entirely
    zones = [z for z, nxt in (((half, 1), h2), ((h2, 2), h3), ((h3, 3), -1)) if z[0] > nxt]
    size = 2 * half + 1
    out = np.empty((n, size, size))
    step = max(1, _CHUNK_ELEMENTS // (4 * size * size))
    for s in range(0, n, step):
        sl = slice(s, s + step)
        args = (alpha[sl], e1[sl], e2[sl], beta[sl])
        for zhalf, order in zones:
            nodes, wts = _gl_nodes(order)
            g = (np.arange(-zhalf, zhalf + 1)[:, None] + nodes[None, :]).ravel()
            v = _moffat_values(g[None, None, :] - dx[sl, None, None],
                               g[None, :, None] - dy[sl, None, None], *args)
            nz = 2 * zhalf + 1
            v = v.reshape(-1, nz, order, nz, order)
            v = np.einsum("aibjc,b,c->aij", v, wts, wts) if order > 1 else v[:, :, 0, :, 0]
            c0 = half - zhalf
            out[sl, c0:c0 + nz, c0:c0 + nz] = v
    return out


def true_psf_kernel(params: Mapping, x: float, y: float, size: int, *, dx: float = 0.0,
                    dy: float = 0.0, normalize: bool = True) -> np.ndarray:
    """The truth PSF at detector pixel ``(x, y)`` as a ``size x size`` kernel.

    Parameters
    ----------
    params : mapping
        Moffat parameters (see :func:`psf_params_at`), e.g. from
        :func:`psf_params_from_row` of ``truth/visits.parquet``.
    x, y : float
        Detector position (0-based pixels) where the PSF is evaluated.
    size : int
        Odd kernel size; the centre is pixel ``(size // 2, size // 2)``.
    dx, dy : float
        Sub-pixel offset of the point source from the kernel centre.
    normalize : bool
        If True (default) the kernel sums to 1 (like :meth:`PsfModel.at`);
        otherwise pixel values are flux fractions of the untruncated profile.
    """
    if size < 3 or size % 2 == 0:
        raise ValueError(f"PSF kernel size must be an odd integer >= 3, got {size}.")
    fwhm, e1, e2 = psf_params_at(params, x, y)
    k = moffat_stamps([dx], [dy], fwhm, e1, e2, params["beta"], size // 2)[0]
    return k / k.sum() if normalize else k


def psf_params_from_row(row: Mapping) -> dict:
    """Truth PSF parameters from a ``truth/visits.parquet`` row (``psf_*`` columns)."""
    return {k[4:]: float(row[k]) for k in row.keys() if str(k).startswith("psf_")}


def star_half_size(flux, fwhm, e, beta, sigma_sky: float, *, max_half: int = 512) -> np.ndarray:
    """Stamp half-size (pixels) for point sources of the given flux (electrons).

    Large enough that (a) the flux outside is below ``max(5e-4, min(0.02,
    sigma_sky / flux))`` of the total and (b) the profile outside is below
    half the per-pixel sky noise; at least 2 FWHM; rounded up to a ladder of
    sizes so that stars can be rendered in batches.
    """
    flux = np.maximum(np.asarray(flux, float), 1e-9)
    beta = np.broadcast_to(np.asarray(beta, float), flux.shape)
    alpha = moffat_alpha(fwhm, beta)
    e = np.asarray(e, float)
    alpha_major = alpha * np.sqrt((1 + e) / np.sqrt(1 - e**2))
    sigma = max(float(sigma_sky), 1e-3)
    f_max = np.clip(sigma / flux, 5e-4, 0.02)
    t_flux = f_max ** (1.0 / (1.0 - beta))
    t_sb = ((beta - 1.0) * flux / (np.pi * alpha**2 * 0.5 * sigma)) ** (1.0 / beta)
    half = alpha_major * np.sqrt(np.maximum(np.maximum(t_flux, t_sb) - 1.0, 0.0))
    half = np.clip(np.maximum(np.ceil(half), np.ceil(2 * np.asarray(fwhm))), 3, max_half)
    idx = np.minimum(np.searchsorted(_HALF_LADDER, half), len(_HALF_LADDER) - 1)
    return np.minimum(_HALF_LADDER[idx], max_half).astype(int)


# --------------------------------------------------------------------------
# galaxies: Sersic profiles
# --------------------------------------------------------------------------

#: Profiles of a larger Sersic index (bulges, n = 4) have a cusp that sampling
#: cannot follow.  Sampled on the pixel grid, the PSF-weighted core of a
#: r_e = 0.3-0.6" bulge at 0.2"/px changed by up to 22-33% with its sub-pixel
#: position (a sample on the cusp or not): a point-like false "variable" at
#: every bulge.  Their central pixels are integrated exactly
#: (:func:`_exact_core`), and they are convolved with the PSF on a finer grid
#: (:func:`_cuspy_galaxies`): the rendered core then changes by < 2e-4.
_CUSPY_SERSIC_N = 1.5
#: Half-size (pixels of the stamp's grid) of the exactly integrated block.
_EXACT_CORE_HALF = 3
#: Gauss-Legendre nodes of the angular integrals of that block.
_GL_X, _GL_W = np.polynomial.legendre.leggauss(48)
#: Sub-pixels per pixel (odd) of the grid on which cuspy galaxies are convolved.
_GALAXY_OVERSAMPLE = 3
#: Galaxies per batch of that convolution (memory: ~1 MB each at 0.2"/px).
_CUSPY_BATCH = 64


def sersic_b(n):
    """Sersic ``b_n`` (half-light radius constant), Ciotti & Bertin expansion."""
    n = np.asarray(n, float)
    return 2 * n - 1.0 / 3 + 4.0 / (405 * n) + 46.0 / (25515 * n**2)


def _sersic_root(r2: np.ndarray, ns: np.ndarray) -> np.ndarray:
    """``r ** (1 / n)`` from ``r2 = r**2``, with fast paths for n = 1 and n = 4."""
    if np.all(ns == 1.0):
        return np.sqrt(r2)
    if np.all(ns == 4.0):
        return np.sqrt(np.sqrt(np.sqrt(r2)))
    return r2 ** (0.5 / ns[:, None, None])


def sersic_stamps(dx, dy, jac, r_e, n_sersic, q, pa_deg, half: int, *,
                  oversample: int = 3) -> np.ndarray:
    """Pixel-integrated Sersic stamps, each normalised to unit sum.

    Parameters
    ----------
    dx, dy : array (n,)
        Sub-pixel offset of each centre from the stamp's central pixel.
    jac : array (2, 2)
        Pixel offset ``(dx, dy)`` -> sky offset ``(east, north)`` in arcsec
        (``3600 * CD`` of a TAN WCS).
    r_e : array (n,)
        Half-light radius along the major axis, arcsec.
    n_sersic, q, pa_deg : array (n,)
        Sersic index, axis ratio b/a, position angle of the major axis
        (degrees east of north).
    half, oversample : int
        Stamp half-size (pixels) and sub-sampling per axis.

    Returns
    -------
    stamps : ndarray (n, 2 half + 1, 2 half + 1)
        The profile truncated at the stamp edge, unit sum.  Pixels are
        sampled on ``oversample^2`` sub-pixel centres, except the central
        ``2 * _EXACT_CORE_HALF + 1`` pixels of profiles with ``n > 1.5``,
        which are integrated exactly (:func:`_exact_core`).
    """
    n = np.size(dx)
    col = (slice(None), None, None)
    size = 2 * half + 1
    sub = (np.arange(oversample) + 0.5) / oversample - 0.5
    g = (np.arange(-half, half + 1)[:, None] + sub[None, :]).ravel()
    out = np.empty((n, size, size))
    step = max(1, _CHUNK_ELEMENTS // (size * oversample) ** 2)
    pa = np.deg2rad(np.asarray(pa_deg, float))
    ns = np.broadcast_to(np.asarray(n_sersic, float), (n,))
    for s in range(0, n, step):
        sl = slice(s, s + step)
        xo = g[None, None, :] - np.asarray(dx, float)[sl][col]
        yo = g[None, :, None] - np.asarray(dy, float)[sl][col]
        east = jac[0, 0] * xo + jac[0, 1] * yo
        north = jac[1, 0] * xo + jac[1, 1] * yo
        sp, cp = np.sin(pa[sl])[col], np.cos(pa[sl])[col]
        major = east * sp + north * cp
        minor = (east * cp - north * sp) / np.asarray(q, float)[sl][col]
        r2 = (major**2 + minor**2) / np.asarray(r_e, float)[sl][col] ** 2
        img = np.exp(-sersic_b(ns[sl][col]) * (_sersic_root(r2, ns[sl]) - 1.0))
        img = img.reshape(-1, size, oversample, size, oversample).sum(axis=(2, 4))
        img /= oversample**2  # (pixel integrals, I_e px^2)
        cusp = np.arange(n)[sl][ns[sl] > _CUSPY_SERSIC_N]  # (n <= 1.5 samples to < 1e-3)
        if cusp.size:
            to_norm = _profile_frame(jac, np.asarray(r_e, float)[cusp], np.asarray(q, float)[cusp],
                                     pa[cusp])
            hb = min(_EXACT_CORE_HALF, half)
            core = slice(half - hb, half + hb + 1)
            img[cusp - sl.start, core, core] = _exact_core(
                np.asarray(dx, float)[cusp], np.asarray(dy, float)[cusp], to_norm, ns[cusp], hb)
        out[sl] = img / img.sum(axis=(1, 2), keepdims=True)
    return out


def _profile_frame(jac, r_e, q, pa) -> np.ndarray:
    """Matrices (n, 2, 2) from pixel offsets (dx, dy) to the profile frame.

    In that frame the profile is circular and radii are in units of ``r_e``
    (major axis along the first coordinate, the minor one divided by ``q``).
    """
    sp, cp = np.sin(pa), np.cos(pa)
    rot = np.stack([np.stack([sp, cp], -1), np.stack([cp / q, -sp / q], -1)], -2)
    return rot @ np.asarray(jac, float) / r_e[:, None, None]


def sersic_enclosed(radius, n) -> np.ndarray:
    """``int_0^R I(r) r dr`` of ``I = exp(-b_n (r^(1/n) - 1))`` (radii in units of r_e).

    The flux within radius ``R`` of a circular Sersic profile is ``2 pi`` times
    this (in units of the surface brightness at r_e times r_e^2).
    """
    n = np.asarray(n, float)
    b = sersic_b(n)
    norm = np.exp(b) * n * b ** (-2.0 * n) * special.gamma(2.0 * n)
    return norm * special.gammainc(2.0 * n, b * np.asarray(radius, float) ** (1.0 / n))


def _triangle_flux(pa: np.ndarray, pb: np.ndarray, n: np.ndarray) -> np.ndarray:
    """Integral of the circular profile over the triangles (0, pa, pb), profile frame.

    In polar coordinates about the vertex at the origin the integral is
    ``int C(rho(theta)) d theta`` with ``C`` = :func:`sersic_enclosed` and
    ``rho`` the distance to the edge ``pa -> pb``; Gauss-Legendre in theta.
    ``pa``, ``pb``: (..., 2); ``n`` broadcasts against (...).
    """
    cross = pa[..., 0] * pb[..., 1] - pa[..., 1] * pb[..., 0]
    span = np.arctan2(cross, np.sum(pa * pb, axis=-1))
    theta = np.arctan2(pa[..., 1], pa[..., 0])[..., None] + 0.5 * span[..., None] * (_GL_X + 1)
    edge = pb - pa
    denom = np.cos(theta) * edge[..., 1, None] - np.sin(theta) * edge[..., 0, None]
    with np.errstate(divide="ignore", invalid="ignore"):
        rho = np.abs(cross[..., None] / denom)
    vals = np.nan_to_num(sersic_enclosed(rho, np.asarray(n)[..., None]), nan=0.0, posinf=0.0)
    return 0.5 * np.abs(span) * (vals @ _GL_W)


def _exact_core(dx, dy, to_norm, ns, hb: int) -> np.ndarray:
    """Exact integrals (n, 2 hb + 1, 2 hb + 1) of the central pixels of Sersic stamps.

    Units of I_e px^2; the profiles are centred at ``(dx, dy)`` from the
    central pixel, ``to_norm`` maps pixel offsets to their frames
    (:func:`_profile_frame`).  Each
    pixel's integral is a difference of the profile's integral over the
    rectangles between its centre and the pixel corners (a 2-D cumulative
    sum anchored at the centre), each rectangle two triangles with a vertex
    at the centre (:func:`_triangle_flux`).
    """
    k = np.arange(2 * hb + 2) - hb - 0.5
    cx = k[None, None, :] - dx[:, None, None]  # (n, 1, K) corner x offsets
    cy = k[None, :, None] - dy[:, None, None]  # (n, K, 1)
    cx, cy = np.broadcast_arrays(cx, cy)
    zero = np.zeros_like(cx)

    def to_frame(x, y):
        return np.einsum("nij,nabj->nabi", to_norm, np.stack([x, y], -1))

    p1, p2, p3 = to_frame(cx, zero), to_frame(cx, cy), to_frame(zero, cy)
    nn = ns[:, None, None]
    rect = _triangle_flux(p1, p2, nn) + _triangle_flux(p2, p3, nn)
    cum = np.sign(cx) * np.sign(cy) * rect / np.abs(np.linalg.det(to_norm))[:, None, None]
    return cum[:, 1:, 1:] - cum[:, :-1, 1:] - cum[:, 1:, :-1] + cum[:, :-1, :-1]


# --------------------------------------------------------------------------
# rendering sources
# --------------------------------------------------------------------------

PsfSpec = Mapping | PsfModel | Callable


def _add_stamps(image: np.ndarray, stamps: np.ndarray, ix, iy, weights) -> None:
    """Add ``weights[i] * stamps[i]`` centred on integer pixel ``(ix[i], iy[i])`` in place."""
    ny, nx = image.shape
    half = stamps.shape[1] // 2
    for s, cx, cy, w in zip(stamps, ix, iy, weights):
        x0, y0 = cx - half, cy - half
        xa, ya = max(x0, 0), max(y0, 0)
        xb, yb = min(x0 + 2 * half + 1, nx), min(y0 + 2 * half + 1, ny)
        if xa < xb and ya < yb:
            image[ya:yb, xa:xb] += w * s[ya - y0:yb - y0, xa - x0:xb - x0]


def _split(x):
    """Nearest integer pixel and sub-pixel offset of positions ``x``."""
    x = np.asarray(x, float)
    ix = np.floor(x + 0.5)
    return ix.astype(int), x - ix


def _psf_from_spec(psf: PsfSpec, x: float, y: float, size: int, dx: float, dy: float):
    """Unit-sum PSF stamp of a point at sub-pixel offset (dx, dy) from a generic PSF spec."""
    if isinstance(psf, PsfModel):
        k = psf.at(x, y)
        if k.shape[0] != size:
            raise ValueError("internal: PsfModel stamps use the model's kernel size")
        # Cubic-spline shift: the model is pixelized, so sub-pixel placement
        # needs interpolation (a Fourier shift would ring on truncated kernels).
        k = ndimage.shift(k, (dy, dx), order=3, mode="constant")
        return k / k.sum()
    return np.asarray(psf(x, y, size), float)


def _render_point_sources(image, x, y, flux, psf: PsfSpec, sigma_sky: float,
                          psf_size: int) -> np.ndarray:
    """Add point sources; return the flux rendered per source (electrons)."""
    ix, dx = _split(x)
    iy, dy = _split(y)
    rendered = np.zeros(len(x))
    if not isinstance(psf, Mapping):
        size = psf.kernel_size if isinstance(psf, PsfModel) else psf_size
        for i in range(len(x)):
            k = _psf_from_spec(psf, x[i], y[i], size, dx[i], dy[i])
            _add_stamps(image, k[None], ix[i:i + 1], iy[i:i + 1], flux[i:i + 1])
            rendered[i] = flux[i] * k.sum()
        return rendered
    fwhm, e1, e2 = psf_params_at(psf, x, y)
    halves = star_half_size(flux, fwhm, np.hypot(e1, e2), psf["beta"], sigma_sky)
    for half in np.unique(halves):
        sel = np.flatnonzero(halves == half)
        stamps = moffat_stamps(dx[sel], dy[sel], fwhm[sel], e1[sel], e2[sel], psf["beta"],
                               int(half))
        _add_stamps(image, stamps, ix[sel], iy[sel], flux[sel])
        rendered[sel] = flux[sel] * stamps.sum(axis=(1, 2))
    return rendered


def _galaxy_psf(psf: PsfSpec, x, y, half: int, psf_size: int) -> np.ndarray:
    """Unit-sum local PSF kernels (n, K, K) at galaxy centres (no sub-pixel shift)."""
    if isinstance(psf, Mapping):
        fwhm, e1, e2 = psf_params_at(psf, x, y)
        k = moffat_stamps(np.zeros(len(x)), np.zeros(len(x)), fwhm, e1, e2, psf["beta"], half)
    else:
        size = psf.kernel_size if isinstance(psf, PsfModel) else psf_size
        k = np.array([_psf_from_spec(psf, xi, yi, size, 0.0, 0.0) for xi, yi in zip(x, y)])
    return k / k.sum(axis=(1, 2), keepdims=True)


def _batch_convolve(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Full 2-D convolution of stacks ``a`` (n, A, A) and ``b`` (n, B, B) by FFT."""
    size = a.shape[1] + b.shape[1] - 1
    n = fft.next_fast_len(size, real=True)
    prod = fft.rfft2(a, s=(n, n)) * fft.rfft2(b, s=(n, n))
    return fft.irfft2(prod, s=(n, n))[:, :size, :size]


def _cuspy_galaxies(dx, dy, jac, cols, half: int, psf: Mapping, x, y, hp: int) -> np.ndarray:
    """PSF-convolved, pixel-integrated stamps of cuspy Sersic galaxies.

    Profile and Moffat PSF are integrated over sub-pixels of a grid
    :data:`_GALAXY_OVERSAMPLE` times finer, convolved there and summed into
    pixels: the observed image (profile convolved with the PSF, integrated
    over pixels) up to aliasing on the fine grid.  Returns unit-sum stamps
    (n, 2 (half + hp) + 1, 2 (half + hp) + 1) centred like ``half + hp``.
    """
    o = _GALAXY_OVERSAMPLE
    hs, ps = o * half + o // 2, o * hp + o // 2  # (the central pixel's sub-pixels are centred)
    m = 2 * (half + hp) + 1
    start = hs + ps - (o * m) // 2
    fwhm, e1, e2 = psf_params_at(psf, x, y)
    out = np.empty((len(x), m, m))
    for b in range(0, len(x), _CUSPY_BATCH):
        sl = slice(b, b + _CUSPY_BATCH)
        gal = sersic_stamps(dx[sl] * o, dy[sl] * o, jac / o, *(c[sl] for c in cols), hs,
                            oversample=1)
        zero = np.zeros(len(gal))
        ker = moffat_stamps(zero, zero, fwhm[sl] * o, e1[sl], e2[sl], psf["beta"], ps)
        conv = _batch_convolve(gal, ker / ker.sum(axis=(1, 2), keepdims=True))
        conv = conv[:, start:start + o * m, start:start + o * m]
        out[sl] = conv.reshape(-1, m, o, m, o).sum(axis=(2, 4))
    return out


def _render_galaxies(image, src: pd.DataFrame, psf: PsfSpec, jac: np.ndarray,
                     pixel_scale: float, psf_size: int) -> np.ndarray:
    """Add Sersic galaxies convolved with the local PSF; return rendered flux."""
    n = len(src)
    if n == 0:
        return np.zeros(0)
    ix, dx = _split(src["x"])
    iy, dy = _split(src["y"])
    r_e_pix = src["r_e_arcsec"].to_numpy(float) / pixel_scale
    trunc = np.where(src["sersic_n"].to_numpy(float) > 1.5, 8.0, 5.0)
    hg = np.clip(np.ceil(trunc * r_e_pix), 3, 64)
    hg = _HALF_LADDER[np.searchsorted(_HALF_LADDER, hg)]
    oversample = np.where(r_e_pix < 3.0, 3, 2)  # the PSF (FWHM >= 3 px) smooths the rest
    if isinstance(psf, Mapping):
        fwhm_max = float(np.max(psf_params_at(psf, src["x"], src["y"])[0]))
        hp = int(math.ceil(3.0 * fwhm_max))
    else:
        hp = (psf.kernel_size if isinstance(psf, PsfModel) else psf_size) // 2
    rendered = np.zeros(n)
    flux = src["flux"].to_numpy(float)
    nser = src["sersic_n"].to_numpy(float)
    for half, os_, ns in sorted(set(zip(hg.tolist(), oversample.tolist(), nser.tolist()))):
        sel = np.flatnonzero((hg == half) & (oversample == os_) & (nser == ns))
        cols = [src[c].to_numpy(float)[sel] for c in ("r_e_arcsec", "sersic_n", "axis_ratio",
                                                        "pa_deg")]
        xs, ys = src["x"].to_numpy(float)[sel], src["y"].to_numpy(float)[sel]
        if isinstance(psf, Mapping) and ns > _CUSPY_SERSIC_N:
            conv = _cuspy_galaxies(dx[sel], dy[sel], jac, cols, int(half), psf, xs, ys, hp)
        else:
            gal = sersic_stamps(dx[sel], dy[sel], jac, *cols, int(half), oversample=int(os_))
            conv = _batch_convolve(gal, _galaxy_psf(psf, xs, ys, hp, psf_size))
        _add_stamps(image, conv, ix[sel], iy[sel], flux[sel])
        rendered[sel] = flux[sel] * conv.sum(axis=(1, 2))
    return rendered


def render_sources(shape, wcs: WCS, psf: PsfSpec, sources, *, sigma_sky: float = 30.0,
                   psf_size: int = 31):
    """Noiseless image (electrons, no sky) of point sources and galaxies.

    Parameters
    ----------
    shape : (ny, nx)
        Image shape.
    wcs : astropy.wcs.WCS
        True WCS; only its local pixel-scale matrix is used (galaxy shapes are
        given on the sky).
    psf : mapping, PsfModel or callable
        Truth PSF: Moffat parameters (see :func:`psf_params_at`), a
        :class:`~diffim.psf.PsfModel`, or ``f(x, y, size) -> (size, size)``
        giving the unit-sum image of a point at exact position ``(x, y)`` on
        the pixel grid centred at ``(round(x), round(y))``.
    sources : DataFrame or mapping of arrays
        Columns ``x``, ``y`` (0-based pixels), ``flux`` (electrons); optional
        galaxy columns ``r_e_arcsec`` (> 0 marks a galaxy), ``sersic_n``,
        ``axis_ratio``, ``pa_deg`` (east of north).
    sigma_sky : float
        Per-pixel sky noise (electrons), sets the point-source stamp sizes.
    psf_size : int
        Stamp size for callable PSFs.

    Returns
    -------
    image : ndarray (ny, nx) float64
    flux_rendered : ndarray (n,)
        Flux actually drawn per source (electrons; < ``flux`` by the profile
        wing outside its stamp).
    """
    src = _source_frame(sources)
    _check_psf(psf)
    image = np.zeros(tuple(int(v) for v in shape))
    rendered = np.zeros(len(src))
    is_gal = src["r_e_arcsec"].to_numpy(float) > 0
    jac = 3600.0 * wcs.pixel_scale_matrix
    pixel_scale = float(np.sqrt(abs(np.linalg.det(jac))))
    pts = np.flatnonzero(~is_gal)
    rendered[pts] = _render_point_sources(image, src["x"].to_numpy(float)[pts],
                                          src["y"].to_numpy(float)[pts],
                                          src["flux"].to_numpy(float)[pts], psf, sigma_sky,
                                          psf_size)
    gals = np.flatnonzero(is_gal)
    rendered[gals] = _render_galaxies(image, src.iloc[gals], psf, jac, pixel_scale, psf_size)
    return image, rendered


def _check_psf(psf) -> None:
    """Reject PSF specs the renderer cannot use (specific messages)."""
    if isinstance(psf, Mapping):
        missing = {"fwhm", "beta"} - set(psf)
        if missing:
            raise ValueError(f"Moffat PSF parameters need {sorted(missing)}; got {sorted(psf)}.")
        if not (psf["fwhm"] > 0 and psf["beta"] > 1):
            raise ValueError("Moffat PSF needs fwhm > 0 pixels and beta > 1.")
    elif not (isinstance(psf, PsfModel) or callable(psf)):
        raise TypeError("psf must be a mapping of Moffat parameters, a PsfModel or a callable "
                        "f(x, y, size).")


def _source_frame(sources) -> pd.DataFrame:
    """Validated copy of a source list with the optional galaxy columns filled."""
    src = pd.DataFrame(sources).reset_index(drop=True) if sources is not None else pd.DataFrame()
    for col in ("x", "y", "flux"):
        if col not in src.columns and len(src):
            raise ValueError(f"The source list needs columns x, y and flux; {col!r} is missing.")
        if col not in src.columns:
            src[col] = np.zeros(0)
    defaults = {"r_e_arcsec": 0.0, "sersic_n": 1.0, "axis_ratio": 1.0, "pa_deg": 0.0}
    for col, val in defaults.items():
        src[col] = src[col].fillna(val) if col in src.columns else val
    bad = ~np.isfinite(src[["x", "y", "flux"]].to_numpy(float)).all(axis=1)
    if bad.any():
        raise ValueError(f"{int(bad.sum())} sources have non-finite x, y or flux.")
    if (src["flux"] < 0).any():
        raise ValueError("Source fluxes must be >= 0 electrons.")
    gal = src["r_e_arcsec"] > 0
    if ((src.loc[gal, "axis_ratio"] <= 0) | (src.loc[gal, "axis_ratio"] > 1)).any():
        raise ValueError("Galaxy axis_ratio must be in (0, 1].")
    if (src.loc[gal, "sersic_n"] <= 0.2).any():
        raise ValueError("Galaxy sersic_n must be > 0.2.")
    return src


# --------------------------------------------------------------------------
# detector effects
# --------------------------------------------------------------------------

def add_cosmic_rays(charge: np.ndarray, n_events: int, rng: np.random.Generator) -> np.ndarray:
    """Deposit cosmic rays in ``charge`` (in place); return their boolean mask.

    Each event is a single pixel (40 %) or a straight track of 2-15 pixels at
    a random angle, depositing 300-3000 electrons per pixel (log-uniform,
    +-30 % pixel to pixel): sharp, unlike any PSF.
    """
    ny, nx = charge.shape
    mask = np.zeros(charge.shape, bool)
    for _ in range(int(n_events)):
        length = 1 if rng.random() < 0.4 else int(rng.integers(2, 16))
        x0, y0 = rng.uniform(0, nx - 1), rng.uniform(0, ny - 1)
        ang = rng.uniform(0, np.pi)
        t = np.arange(length)
        xs = np.clip(np.rint(x0 + t * np.cos(ang)), 0, nx - 1).astype(int)
        ys = np.clip(np.rint(y0 + t * np.sin(ang)), 0, ny - 1).astype(int)
        amp = np.exp(rng.uniform(np.log(300), np.log(3000)))
        charge[ys, xs] += amp * rng.uniform(0.7, 1.3, size=length)
        mask[ys, xs] = True
    return mask


def add_bad_columns(charge: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Make 1-3 hot or dead columns (full or partial length) in place; return their mask."""
    ny, nx = charge.shape
    mask = np.zeros(charge.shape, bool)
    for _ in range(int(rng.integers(1, 4))):
        col = int(rng.integers(0, nx))
        y0, y1 = 0, ny
        if rng.random() < 0.5:  # partial: from a charge trap to one end
            cut = int(rng.integers(ny // 8, ny - ny // 8))
            y0, y1 = (cut, ny) if rng.random() < 0.5 else (0, cut)
        if rng.random() < 0.5:
            charge[y0:y1, col] += rng.uniform(3000, 30000)
        else:
            charge[y0:y1, col] *= rng.uniform(0.0, 0.05)
        mask[y0:y1, col] = True
    return mask


def _runs(flags: np.ndarray):
    """Start and end (exclusive) indices of the True runs of a 1-D boolean array."""
    d = np.diff(np.concatenate(([0], flags.astype(np.int8), [0])))
    return np.flatnonzero(d == 1), np.flatnonzero(d == -1)


def _spill(col: np.ndarray, start: int, step: int, amount: float, saturation: float,
           trail: np.ndarray) -> float:
    """Fill pixels of ``col`` from ``start`` in direction ``step`` up to saturation.

    Returns the charge that ran off the end of the column.
    """
    idx = np.arange(start, len(col)) if step > 0 else np.arange(start, -1, -1)
    if amount <= 0 or idx.size == 0:
        return max(amount, 0.0)
    room = np.maximum(saturation - col[idx], 0.0)
    cum = np.cumsum(room)
    k = int(np.searchsorted(cum, amount))
    if k >= idx.size:
        col[idx] = np.maximum(col[idx], saturation)
        trail[idx] = True
        return amount - cum[-1]
    col[idx[:k]] = np.maximum(col[idx[:k]], saturation)
    col[idx[k]] += amount - (cum[k - 1] if k else 0.0)
    trail[idx[:k + 1]] = True
    return 0.0


def bleed_saturation(charge: np.ndarray, saturation: float):
    """Clip pixels at ``saturation`` and bleed the excess charge along columns.

    For every run of pixels above ``saturation`` in a column, the excess is
    shared equally between the two directions and fills the following pixels
    up to ``saturation``, like a CCD bleed trail.  Charge is conserved except
    what runs off the top or bottom of the column.

    Returns
    -------
    out : ndarray
        The bled charge image (a copy).
    core : ndarray bool
        Pixels originally above saturation.
    trail : ndarray bool
        Pixels that received bled charge (not in ``core``).
    lost : float
        Electrons that ran off the detector.
    """
    out = np.array(charge, dtype=float, copy=True)
    core = out > saturation
    trail = np.zeros(out.shape, bool)
    lost = 0.0
    for c in np.flatnonzero(core.any(axis=0)):
        col = out[:, c].copy()
        tcol = np.zeros(col.shape, bool)
        starts, ends = _runs(col > saturation)
        for s, e in zip(starts, ends):
            excess = float(np.sum(col[s:e] - saturation))
            if excess <= 0:
                continue
            col[s:e] = saturation
            lost += _spill(col, e, 1, excess / 2, saturation, tcol)
            lost += _spill(col, s - 1, -1, excess / 2, saturation, tcol)
        out[:, c] = col
        trail[:, c] = tcol & ~core[:, c]
    return out, core, trail, lost


def _defect_set(defects) -> set:
    """Normalise the ``defects`` argument (bool or iterable of kinds) to a set."""
    if defects is True:
        return set(DEFECT_KINDS)
    if not defects:
        return set()
    kinds = set(defects)
    if kinds - set(DEFECT_KINDS):
        raise ValueError(f"Unknown defect kinds {sorted(kinds - set(DEFECT_KINDS))}; "
                         f"known: {list(DEFECT_KINDS)}.")
    return kinds


# --------------------------------------------------------------------------
# the exposure renderer
# --------------------------------------------------------------------------

def make_exposure(shape, wcs: WCS, psf: PsfSpec, sources, *, sky: float,
                  read_noise: float = 8.0, saturation: float = 1e5, defects=False,
                  seed=0, cosmic_rays_per_mpix: float = 20.0, psf_size: int = 31):
    """Render one exposure in electrons (pure: no file I/O).

    Parameters
    ----------
    shape : (ny, nx)
        Image shape, pixels.
    wcs : astropy.wcs.WCS
        True WCS (galaxy shapes are on the sky; its pixel-scale matrix maps
        them to pixels).
    psf : mapping, PsfModel or callable
        Truth PSF, see :func:`render_sources`.  A mapping of Moffat parameters
        (:func:`psf_params_at`) gives exact pixel-integrated sub-pixel stamps.
    sources : DataFrame or mapping of arrays
        ``x``, ``y`` (0-based pixels), ``flux`` (electrons) and optional galaxy
        shape columns, see :func:`render_sources`.
    sky : float
        Sky level, electrons per pixel (not subtracted).
    read_noise : float
        Gaussian read noise, electrons rms.
    saturation : float
        Full well (electrons): pixels above it are clipped; with the
        ``bleed`` defect the excess runs along the column.
    defects : bool or iterable of {"cosmic_rays", "bad_columns", "bleed"}
        Which detector defects to add (True: all).
    seed : int or sequence of int
        Seed of ``numpy.random.default_rng`` for noise and defects.
    cosmic_rays_per_mpix : float
        Mean number of cosmic-ray events per 10^6 pixels.
    psf_size : int
        Stamp size used when ``psf`` is a plain callable.

    Returns
    -------
    image : ndarray (ny, nx) float32
        Electrons: Poisson(sky + sources) + cosmic rays, saturated/bled, bad
        columns, + read noise, clipped at ``saturation``.
    truth : dict
        ``noiseless`` (float64 sky + sources), ``sky``, ``defect_mask``
        (int16, bits :data:`DEFECT_BITS`), ``flux_rendered`` (per source),
        ``bleed_lost`` (electrons run off the detector), ``n_cosmic_rays``.
    """
    shape = tuple(int(v) for v in shape)
    if len(shape) != 2 or min(shape) < 1:
        raise ValueError(f"shape must be (ny, nx) with positive sizes, got {shape}.")
    if not (np.isfinite(sky) and sky >= 0 and read_noise >= 0 and saturation > 0):
        raise ValueError("sky and read_noise must be >= 0 and saturation > 0 electrons.")
    kinds = _defect_set(defects)
    rng = np.random.default_rng(seed)
    sigma_sky = math.sqrt(sky + read_noise**2)
    signal_img, rendered = render_sources(shape, wcs, psf, sources, sigma_sky=sigma_sky,
                                          psf_size=psf_size)
    noiseless = signal_img + sky
    charge = rng.poisson(np.maximum(noiseless, 0.0)).astype(float)  # pixelized PSFs may dip < 0
    mask = np.zeros(shape, np.int16)
    n_cr = 0
    if "cosmic_rays" in kinds:
        n_cr = int(rng.poisson(cosmic_rays_per_mpix * shape[0] * shape[1] / 1e6))
        mask[add_cosmic_rays(charge, n_cr, rng)] |= DEFECT_BITS["COSMIC_RAY"]
    lost = 0.0
    if "bleed" in kinds:
        charge, core, trail, lost = bleed_saturation(charge, saturation)
        mask[trail] |= DEFECT_BITS["BLEED"]
    else:
        core = charge > saturation
    mask[core] |= DEFECT_BITS["SAT_CORE"]
    if "bad_columns" in kinds:
        mask[add_bad_columns(charge, rng)] |= DEFECT_BITS["BAD_COLUMN"]
    image = charge + rng.normal(0.0, read_noise, size=shape) if read_noise > 0 else charge
    full = core | (((mask & DEFECT_BITS["BLEED"]) != 0) & (charge >= saturation))
    image[full] = saturation
    np.minimum(image, saturation, out=image)
    truth = {"noiseless": noiseless, "sky": float(sky), "defect_mask": mask,
             "flux_rendered": rendered, "bleed_lost": float(lost), "n_cosmic_rays": n_cr}
    return image.astype(np.float32), truth


# --------------------------------------------------------------------------
# geometry and WCS
# --------------------------------------------------------------------------

VARIABLE_ID_OFFSET = 1_000_000_000  # ids of variables start here (static ids start at 0)


def mosaic_layout(shape, n_detectors: int, gap: int) -> dict:
    """Focal-plane layout of ``n_detectors`` detectors on a near-square grid.

    Returns a dict with ``width``, ``height`` (focal plane, pixels),
    ``centre`` (focal-plane centre ``(X, Y)``) and ``origins`` (per detector,
    the focal-plane position of its pixel (0, 0)).
    """
    ny, nx = shape
    ncol = int(math.ceil(math.sqrt(n_detectors)))
    nrow = int(math.ceil(n_detectors / ncol))
    width = ncol * nx + (ncol - 1) * gap
    height = nrow * ny + (nrow - 1) * gap
    origins = [((d % ncol) * (nx + gap), (d // ncol) * (ny + gap)) for d in range(n_detectors)]
    return {"width": width, "height": height, "centre": ((width - 1) / 2.0, (height - 1) / 2.0),
            "origins": origins}


def tan_wcs(crval, crpix0, cd) -> WCS:
    """A TAN WCS from CRVAL (deg), the 0-based reference pixel and the CD matrix (deg/px)."""
    w = WCS(naxis=2)
    w.wcs.ctype = ["RA---TAN", "DEC--TAN"]
    w.wcs.cunit = ["deg", "deg"]
    w.wcs.crval = [float(crval[0]), float(crval[1])]
    w.wcs.crpix = [float(crpix0[0]) + 1.0, float(crpix0[1]) + 1.0]
    w.wcs.cd = np.asarray(cd, float)
    w.wcs.radesys = "ICRS"
    w.wcs.equinox = 2000.0
    w.wcs.set()
    return w


def rotation_cd(pixel_scale: float, angle_deg: float) -> np.ndarray:
    """CD matrix (deg/px) of a north-up east-left frame rotated by ``angle_deg``."""
    s = pixel_scale / 3600.0
    c, n = math.cos(math.radians(angle_deg)), math.sin(math.radians(angle_deg))
    return s * np.array([[-c, n], [n, c]])


def wcs_header_cards(w: WCS) -> list[tuple[str, object, str]]:
    """Plain TAN + CD header cards of ``w`` (no date or other extra keywords)."""
    cd = w.wcs.cd
    return [("CTYPE1", "RA---TAN", ""), ("CTYPE2", "DEC--TAN", ""),
            ("CUNIT1", "deg", ""), ("CUNIT2", "deg", ""),
            ("CRVAL1", float(w.wcs.crval[0]), "[deg]"), ("CRVAL2", float(w.wcs.crval[1]), "[deg]"),
            ("CRPIX1", float(w.wcs.crpix[0]), "1-based"), ("CRPIX2", float(w.wcs.crpix[1]), "1-based"),
            ("CD1_1", float(cd[0, 0]), ""), ("CD1_2", float(cd[0, 1]), ""),
            ("CD2_1", float(cd[1, 0]), ""), ("CD2_2", float(cd[1, 1]), ""),
            ("RADESYS", "ICRS", ""), ("EQUINOX", 2000.0, "")]


def wcs_header_string(w: WCS) -> str:
    """FITS header string (80-character cards) of a TAN WCS; read it back with
    ``WCS(fits.Header.fromstring(s))``."""
    return fits.Header(wcs_header_cards(w)).tostring()


def perturb_wcs(w: WCS, shape, rng: np.random.Generator, *, shift_arcsec: float,
                rot_deg: float, scale: float):
    """An approximate TAN WCS: ``w`` off by a shift, rotation and scale error.

    The error is an affine map of pixel space about the detector centre ``c``:
    the header WCS maps pixel ``p`` where the true one maps
    ``c + (1 + s) R(phi) (p - c) + t``.  Each error has a random sign and a
    magnitude uniform in [0.3, 1] of its limit (so never zero).

    Returns
    -------
    header_wcs : astropy.wcs.WCS
    errors : dict
        ``shift_arcsec``, ``rot_deg`` and ``scale`` actually applied.
    """
    ny, nx = shape
    ps = float(np.sqrt(abs(np.linalg.det(w.wcs.cd)))) * 3600.0
    t_as = shift_arcsec * rng.uniform(0.3, 1.0)
    ang = rng.uniform(0, 2 * np.pi)
    t = np.array([math.cos(ang), math.sin(ang)]) * t_as / ps
    phi = math.radians(rot_deg * rng.uniform(0.3, 1.0) * rng.choice([-1.0, 1.0]))
    s = scale * rng.uniform(0.3, 1.0) * rng.choice([-1.0, 1.0])
    m = (1 + s) * np.array([[math.cos(phi), -math.sin(phi)], [math.sin(phi), math.cos(phi)]])
    c = np.array([(nx - 1) / 2.0, (ny - 1) / 2.0])
    crpix0 = np.asarray(w.wcs.crpix) - 1.0
    new_crpix0 = c - np.linalg.solve(m, c + t - crpix0)
    hw = tan_wcs(w.wcs.crval, new_crpix0, w.wcs.cd @ m)
    return hw, {"shift_arcsec": t_as, "rot_deg": math.degrees(phi), "scale": s}


def field_frame(settings: Mapping) -> WCS:
    """TAN frame at the field centre whose 0-based 'pixels' are (east, north) arcsec."""
    return tan_wcs((settings["ra"], settings["dec"]), (0.0, 0.0),
                   np.diag([1.0 / 3600.0, 1.0 / 3600.0]))


def _field_radii(settings: Mapping) -> dict:
    """Radii (arcsec) of the simulated sky disc and of the always-covered disc."""
    lay = mosaic_layout(settings["shape"], settings["n_detectors"], settings["detector_gap_px"])
    ps = settings["pixel_scale"]
    short = min(lay["width"], lay["height"]) * ps
    dither = settings["dither_fraction"] * short
    sky = 0.5 * math.hypot(lay["width"], lay["height"]) * ps + dither + 30.0
    covered = max(0.5 * short - dither - 10.0, 0.15 * short)
    return {"sky": sky, "covered": covered, "dither": dither}


# --------------------------------------------------------------------------
# the sky: static sources and variables
# --------------------------------------------------------------------------

def _power_law_mags(rng, n: int, lo: float, hi: float, slope: float) -> np.ndarray:
    """Magnitudes with dN/dm ~ 10**(slope m) between ``lo`` and ``hi``."""
    if slope <= 0:
        return rng.uniform(lo, hi, n)
    a, b = 10 ** (slope * lo), 10 ** (slope * hi)
    return np.log10(a + rng.random(n) * (b - a)) / slope


def _disc(rng, n: int, radius: float):
    """``n`` points uniform in a disc of the given radius (east, north)."""
    r = radius * np.sqrt(rng.random(n))
    t = rng.uniform(0, 2 * np.pi, n)
    return r * np.cos(t), r * np.sin(t)


def _band_mags(ref_mag, colour, bands) -> dict:
    """``{band}_mag`` columns from the r magnitude and a g-r-like colour."""
    return {f"{b}_mag": np.asarray(ref_mag) + np.asarray(colour) * BAND_COLOUR_COEF[b]
            for b in bands}


def _to_sky(settings, east, north):
    """(ra, dec) deg of tangent-plane offsets (arcsec) from the field centre."""
    ra, dec = field_frame(settings).wcs_pix2world(np.asarray(east, float),
                                                   np.asarray(north, float), 0)
    return np.mod(ra, 360.0), dec


def _stars(settings, rng, n: int, mag_range, slope) -> pd.DataFrame:
    """Star table (no id) with positions over the simulated sky disc."""
    east, north = _disc(rng, n, _field_radii(settings)["sky"])
    mags = _power_law_mags(rng, n, *mag_range, slope)
    colour = rng.uniform(0.2, 1.4, n)
    ra, dec = _to_sky(settings, east, north)
    df = pd.DataFrame({"ra": ra, "dec": dec, "kind": "star",
                       **_band_mags(mags, colour, settings["bands"])})
    for col in ("sersic_n", "r_e_arcsec", "axis_ratio", "pa_deg"):
        df[col] = np.nan
    df["east"], df["north"] = east, north
    return df


def _galaxies(settings, rng, n: int) -> pd.DataFrame:
    """Galaxy table: exponential (70 %) or de Vaucouleurs discs/bulges."""
    east, north = _disc(rng, n, _field_radii(settings)["sky"])
    mags = _power_law_mags(rng, n, *settings["galaxy_mag_range"], settings["galaxy_count_slope"])
    colour = rng.uniform(0.3, 1.2, n)
    r_e = np.clip(0.6 * 10 ** (-0.1 * (mags - 22.0)) * np.exp(rng.normal(0, 0.3, n)), 0.15, 3.0)
    ra, dec = _to_sky(settings, east, north)
    return pd.DataFrame({"ra": ra, "dec": dec, "kind": "galaxy",
                         **_band_mags(mags, colour, settings["bands"]),
                         "sersic_n": np.where(rng.random(n) < 0.7, 1.0, 4.0), "r_e_arcsec": r_e,
                         "axis_ratio": rng.uniform(0.3, 1.0, n), "pa_deg": rng.uniform(0, 180, n),
                         "east": east, "north": north})


def make_static_sources(settings: Mapping) -> pd.DataFrame:
    """Stars, bright (saturating) stars and galaxies over the simulated sky.

    Densities: ``n_stars``, ``n_saturated`` and ``n_galaxies`` are the mean
    numbers per detector image.  Columns: ``id``, ``ra``, ``dec``, ``kind``,
    ``{band}_mag``, ``sersic_n``, ``r_e_arcsec``, ``axis_ratio``, ``pa_deg``,
    ``east``, ``north`` (arcsec from the field centre).
    """
    seed = int(settings["seed"])
    ny, nx = settings["shape"]
    per_det = math.pi * _field_radii(settings)["sky"] ** 2 / (nx * ny * settings["pixel_scale"] ** 2)
    parts = []
    for tag, key, mags, slope in ((1, "n_stars", "star_mag_range", settings["star_count_slope"]),
                                  (3, "n_saturated", "saturated_mag_range", 0.0)):
        rng = np.random.default_rng([seed, tag])
        n = int(rng.poisson(settings[key] * per_det))
        parts.append(_stars(settings, rng, n, settings[mags], slope))
    rng = np.random.default_rng([seed, 2])
    parts.append(_galaxies(settings, rng, int(rng.poisson(settings["n_galaxies"] * per_det))))
    df = pd.concat(parts, ignore_index=True)
    df.insert(0, "id", np.arange(len(df), dtype=np.int64))
    return df


def _bazin_offset(tau_rise, tau_fall):
    """Time from t0 to the maximum of exp(-t/tf) / (1 + exp(-t/tr))."""
    return tau_rise * np.log(tau_fall / tau_rise - 1.0)


def make_variables(settings: Mapping, static: pd.DataFrame) -> pd.DataFrame:
    """Periodic variable stars and supernova-like transients (many in hosts).

    All lie in the disc covered by every visit.  Columns: ``id``, ``ra``,
    ``dec``, ``kind`` (``variable_star`` / ``transient``), ``host_id`` (-1 if
    none), ``{band}_mag`` (mean magnitude of a variable star, peak magnitude
    of a transient), ``amplitude_mag`` (peak to peak), ``period_days``,
    ``phase``, ``t_peak_mjd``, ``tau_rise_days``, ``tau_fall_days``.
    """
    rng = np.random.default_rng([int(settings["seed"]), 4])
    bands = settings["bands"]
    rcov = _field_radii(settings)["covered"]
    nv, nt = int(settings["n_variable_stars"]), int(settings["n_transients"])
    east, north = _disc(rng, nv, rcov)
    vs = pd.DataFrame({"kind": "variable_star", "host_id": -1, "east": east, "north": north,
                       **_band_mags(rng.uniform(*settings["variable_mag_range"], nv),
                                    rng.uniform(0.2, 1.2, nv), bands),
                       "amplitude_mag": rng.uniform(*settings["variable_amp_range"], nv),
                       "period_days": np.exp(rng.uniform(np.log(0.3), np.log(20.0), nv)),
                       "phase": rng.random(nv)})
    tr = _transients(settings, rng, static, nt, rcov)
    df = pd.concat([vs, tr], ignore_index=True)
    df["ra"], df["dec"] = _to_sky(settings, df["east"], df["north"])
    df.insert(0, "id", VARIABLE_ID_OFFSET + np.arange(len(df), dtype=np.int64))
    df["host_id"] = df["host_id"].astype(np.int64)
    cols = ["id", "ra", "dec", "kind", "host_id"] + [f"{b}_mag" for b in bands] + [
        "amplitude_mag", "period_days", "phase", "t_peak_mjd", "tau_rise_days", "tau_fall_days",
        "east", "north"]
    return df.reindex(columns=cols)


def _transients(settings, rng, static, n: int, rcov: float) -> pd.DataFrame:
    """Transient table: Bazin light curves, ``host_fraction`` of them in galaxies."""
    span = (settings["n_visits"] - 1) * settings["cadence_days"]
    t0 = settings["mjd_start"]
    gal = static[(static["kind"] == "galaxy") & (np.hypot(static["east"], static["north"]) < rcov)
                 & (static[f"{_ref_band(settings)}_mag"] < 23.5)]
    n_host = min(int(round(settings["host_fraction"] * n)), len(gal))
    hosts = gal.iloc[rng.choice(len(gal), n_host, replace=False)] if n_host else gal.iloc[:0]
    east, north = _disc(rng, n, rcov)
    host_id = np.full(n, -1, np.int64)
    for i, (_, h) in enumerate(hosts.iterrows()):
        rho = h["r_e_arcsec"] * rng.uniform(0.1, 1.5)
        phi = rng.uniform(0, 2 * np.pi)
        major, minor = rho * math.cos(phi), h["axis_ratio"] * rho * math.sin(phi)
        pa = math.radians(h["pa_deg"])
        east[i] = h["east"] + major * math.sin(pa) + minor * math.cos(pa)
        north[i] = h["north"] + major * math.cos(pa) - minor * math.sin(pa)
        host_id[i] = int(h["id"])
    return pd.DataFrame({"kind": "transient", "host_id": host_id, "east": east, "north": north,
                         **_band_mags(rng.uniform(*settings["transient_peak_mag_range"], n),
                                      rng.uniform(-0.2, 0.6, n), settings["bands"]),
                         "t_peak_mjd": t0 + rng.uniform(-0.1 * span, span, n),
                         "tau_rise_days": rng.uniform(2.0, 6.0, n),
                         "tau_fall_days": rng.uniform(12.0, 40.0, n)})


def variable_flux_njy(variables: pd.DataFrame, band: str, mjd: float) -> np.ndarray:
    """True flux (nJy) of every variable in ``band`` at time ``mjd`` (TAI).

    Variable stars: ``mag = mean + amplitude / 2 * sin(2 pi ((mjd - 60000) / P + phase))``.
    Transients: Bazin profile ``exp(-(t - t0)/tf) / (1 + exp(-(t - t0)/tr))``
    scaled to the peak magnitude at ``t_peak_mjd``.
    """
    mag = variables[f"{band}_mag"].to_numpy(float)
    out = np.zeros(len(variables))
    vs = (variables["kind"] == "variable_star").to_numpy()
    ph = (mjd - 60000.0) / variables["period_days"].to_numpy(float)[vs] + variables["phase"].to_numpy(float)[vs]
    m = mag[vs] + 0.5 * variables["amplitude_mag"].to_numpy(float)[vs] * np.sin(2 * np.pi * ph)
    out[vs] = 10 ** (-0.4 * (m - 31.4))
    tr = ~vs
    tr_rise = variables["tau_rise_days"].to_numpy(float)[tr]
    tr_fall = variables["tau_fall_days"].to_numpy(float)[tr]
    t0 = variables["t_peak_mjd"].to_numpy(float)[tr] - _bazin_offset(tr_rise, tr_fall)

    def shape(dt):
        return np.exp(-dt / tr_fall - np.logaddexp(0.0, -dt / tr_rise))

    peak = shape(_bazin_offset(tr_rise, tr_fall))
    out[tr] = 10 ** (-0.4 * (mag[tr] - 31.4)) * shape(mjd - t0) / peak
    return out


def _ref_band(settings: Mapping) -> str:
    """Band whose magnitude limits the refcat and selects hosts ('r' if simulated)."""
    return "r" if "r" in settings["bands"] else settings["bands"][0]


def make_refcat(settings: Mapping, static: pd.DataFrame) -> pd.DataFrame:
    """Reference catalog: stars brighter than ``refcat_mag_limit`` (reference band).

    A random ``refcat_missing_fraction`` is left out; magnitudes carry
    Gaussian errors ``{band}_magErr = 0.003 + 0.015 * 10**(0.4 (mag - limit))``.
    """
    rng = np.random.default_rng([int(settings["seed"]), 5])
    lim = settings["refcat_mag_limit"]
    stars = static[(static["kind"] == "star") & (static[f"{_ref_band(settings)}_mag"] < lim)]
    stars = stars[rng.random(len(stars)) >= settings["refcat_missing_fraction"]]
    out = {"ra": stars["ra"].to_numpy(), "dec": stars["dec"].to_numpy()}
    for b in settings["bands"]:
        true = stars[f"{b}_mag"].to_numpy(float)
        err = 0.003 + 0.015 * 10 ** (0.4 * (true - lim))
        out[f"{b}_mag"] = true + rng.normal(0.0, 1.0, len(true)) * err
        out[f"{b}_magErr"] = err
    return pd.DataFrame(out)


# --------------------------------------------------------------------------
# visits
# --------------------------------------------------------------------------

def plan_visit(settings: Mapping, index: int) -> dict:
    """Observing conditions of visit number ``first_visit + index``.

    Drawn from ``default_rng([seed, 6, visit])`` so a visit does not depend
    on how many visits are simulated.  Returns band, times, airmass,
    transparency, sky, zero point (ZEROPT), pointing, rotation and the truth
    PSF parameters at the focal-plane centre.
    """
    visit = int(settings["first_visit"]) + index
    rng = np.random.default_rng([int(settings["seed"]), 6, visit])
    band = settings["bands"][index % len(settings["bands"])]
    airmass = rng.uniform(*settings["airmass_range"])
    transparency = rng.uniform(*settings["transparency_range"])
    lo, hi = settings["fwhm_range_arcsec"]
    fwhm = settings["fwhm_median_arcsec"] * np.exp(rng.normal(0, settings["fwhm_log_sigma"]))
    fwhm = float(np.clip(fwhm * BAND_SEEING_FACTOR[band] * airmass**0.6, lo, hi))
    e_mag, e_ang = rng.uniform(0, settings["psf_e_max"]), rng.uniform(0, np.pi)
    var = settings["psf_fwhm_variation"]
    zp = (BAND_ZP_1S[band] + 2.5 * math.log10(settings["exptime"])
          - BAND_EXTINCTION[band] * (airmass - 1.0) - transparency)
    sky_mag = rng.uniform(*settings["sky_mag_range"]) + BAND_SKY_OFFSET[band]
    sky_e = 10 ** (0.4 * (zp - (sky_mag - 5.0 * math.log10(settings["pixel_scale"]))))
    east, north = _disc(rng, 1, _field_radii(settings)["dither"])
    ra, dec = _to_sky(settings, east, north)
    return {
        "visit": visit, "band": band,
        "mjd_obs": settings["mjd_start"] + index * settings["cadence_days"] + rng.uniform(0, 0.2),
        "exptime": float(settings["exptime"]), "airmass": airmass, "transparency": transparency,
        "fwhm_arcsec": fwhm, "sky_mag": sky_mag, "sky_e": sky_e, "zeropoint": zp,
        "ra_pointing": float(ra[0]), "dec_pointing": float(dec[0]),
        "rotation_deg": rng.uniform(0, 360.0) if settings["rotate"] else 0.0,
        "psf": {"fwhm": fwhm / settings["pixel_scale"], "beta": rng.uniform(*settings["psf_beta_range"]),
                "e1": e_mag * math.cos(2 * e_ang), "e2": e_mag * math.sin(2 * e_ang),
                "fwhm_gx": rng.uniform(-0.5, 0.5) * var, "fwhm_gy": rng.uniform(-0.5, 0.5) * var,
                "fwhm_r2": rng.uniform(0.0, 0.5) * var,
                "e1_gx": rng.uniform(-0.01, 0.01), "e2_gy": rng.uniform(-0.01, 0.01)},
    }


def detector_wcs_psf(settings: Mapping, plan: Mapping, detector: int):
    """True WCS, header WCS (+ its errors) and truth PSF parameters of one detector."""
    lay = mosaic_layout(settings["shape"], settings["n_detectors"], settings["detector_gap_px"])
    x0, y0 = lay["origins"][detector]
    cx, cy = lay["centre"][0] - x0, lay["centre"][1] - y0
    cd = rotation_cd(settings["pixel_scale"], plan["rotation_deg"])
    true = tan_wcs((plan["ra_pointing"], plan["dec_pointing"]), (cx, cy), cd)
    rng = np.random.default_rng([int(settings["seed"]), 8, plan["visit"], detector])
    header, errors = perturb_wcs(true, settings["shape"], rng, **settings["wcs_error"])
    psf = dict(plan["psf"], x0=cx, y0=cy, scale=0.5 * max(lay["width"], lay["height"]))
    return true, header, errors, psf


def _exposure_sources(settings, plan, wcs: WCS, static, variables, var_flux) -> pd.DataFrame:
    """Sources (electrons, detector pixels) near one detector for one visit."""
    band, ny, nx = plan["band"], *settings["shape"]
    to_e = 10 ** (0.4 * (plan["zeropoint"] - 31.4))
    cols = ["id", "r_e_arcsec", "sersic_n", "axis_ratio", "pa_deg"]
    stat = static[cols].copy()
    stat["flux"] = 10 ** (0.4 * (plan["zeropoint"] - static[f"{band}_mag"].to_numpy(float)))
    var = variables[["id"]].copy()
    var["flux"] = var_flux * to_e
    both = pd.concat([stat, var], ignore_index=True)
    ra = np.concatenate([static["ra"].to_numpy(), variables["ra"].to_numpy()])
    dec = np.concatenate([static["dec"].to_numpy(), variables["dec"].to_numpy()])
    both["x"], both["y"] = wcs.wcs_world2pix(ra, dec, 0)
    margin = np.where(both["flux"] > 0.05 * settings["saturation"] * plan["psf"]["fwhm"] ** 2,
                      600.0, 100.0)
    keep = ((both["x"] > -margin) & (both["x"] < nx - 1 + margin) & (both["y"] > -margin)
            & (both["y"] < ny - 1 + margin) & (both["flux"] > 1e-3))
    return both[keep].reset_index(drop=True)


def _fits_header(settings, plan, detector: int, header_wcs: WCS) -> fits.Header:
    """Primary header of an eimage: approximate WCS + contract keywords, no date stamps."""
    gain = float(settings["gain"])
    mjd = float(plan["mjd_obs"])
    cards = wcs_header_cards(header_wcs) + [
        ("TIMESYS", "TAI", "time scale of MJD-OBS"),
        ("MJD-OBS", mjd, "exposure start, MJD (TAI)"),
        ("DATE-OBS", Time(mjd, format="mjd", scale="tai").isot, "exposure start (TAI)"),
        ("EXPTIME", float(plan["exptime"]), "exposure time [s]"),
        ("FILTER", plan["band"], "band"),
        ("VISIT", int(plan["visit"]), "visit number"),
        ("DETECTOR", int(detector), "detector number"),
        ("SATURATE", float(settings["saturation"]), "saturation level [electron]"),
        ("RDNOISE", float(settings["read_noise"]), "read noise [electron]"),
        ("GAIN", gain, "[electron/adu]"),
        ("AIRMASS", float(plan["airmass"]), "airmass"),
        ("BUNIT", "electron" if gain == 1.0 else "adu", "pixel unit"),
        ("ORIGIN", "diffim.simulate", "synthetic exposure")]
    return fits.Header(cards)


def _atomic_target(path: Path) -> Path:
    """Temporary name next to ``path`` for an atomic write."""
    return path.with_name(f".{path.name}.{os.getpid()}.tmp")


def _write_fits(path: Path, hdu: fits.PrimaryHDU) -> None:
    tmp = _atomic_target(path)
    hdu.writeto(tmp, overwrite=True)
    os.replace(tmp, path)


def _write_parquet(path: Path, df: pd.DataFrame) -> None:
    tmp = _atomic_target(path)
    df.to_parquet(tmp, index=False)
    os.replace(tmp, path)


def _write_text(path: Path, text: str) -> None:
    tmp = _atomic_target(path)
    tmp.write_text(text)
    os.replace(tmp, path)


def image_name(visit: int, detector: int, band: str) -> str:
    """File name of an eimage (the visit is the first integer in it)."""
    return f"eimage_v{visit:07d}_d{detector:02d}_{band}.fits"


def simulate_exposure(settings: Mapping, plan: Mapping, detector: int, static: pd.DataFrame,
                      variables: pd.DataFrame, var_flux: np.ndarray):
    """Render one (visit, detector) exposure in memory.

    Returns ``(image, header, truth, row)``: the float32 pixels as written
    (electrons, or ADU if ``gain != 1``), the FITS header, the
    :func:`make_exposure` truth dict and the ``truth/visits.parquet`` row.
    """
    true, header_wcs, errors, psf = detector_wcs_psf(settings, plan, detector)
    src = _exposure_sources(settings, plan, true, static, variables, var_flux)
    image, truth = make_exposure(
        settings["shape"], true, psf, src, sky=plan["sky_e"], read_noise=settings["read_noise"],
        saturation=settings["saturation"], defects=settings["defects"],
        seed=[int(settings["seed"]), 7, plan["visit"], detector],
        cosmic_rays_per_mpix=settings["cosmic_rays_per_mpix"])
    if settings["gain"] != 1.0:
        image = (image / np.float32(settings["gain"])).astype(np.float32)
    truth["sources"] = src.assign(flux_rendered=truth["flux_rendered"])
    ny, nx = settings["shape"]
    xc, yc = (nx - 1) / 2.0, (ny - 1) / 2.0
    fwhm_c = float(psf_params_at(psf, xc, yc)[0])
    size = 2 * int(math.ceil(4 * fwhm_c)) + 1
    row = {"visit": plan["visit"], "detector": detector, "band": plan["band"],
           "file": f"images/{image_name(plan['visit'], detector, plan['band'])}",
           **{k: plan[k] for k in ("mjd_obs", "exptime", "airmass", "transparency", "sky_mag",
                                   "sky_e", "zeropoint", "ra_pointing", "dec_pointing",
                                   "rotation_deg")},
           "mjd_mid": plan["mjd_obs"] + plan["exptime"] / 2.0 / 86400.0,
           "fwhm_px": fwhm_c, "fwhm_arcsec": fwhm_c * settings["pixel_scale"],
           "fwhm_moments_px": moments_fwhm(true_psf_kernel(psf, xc, yc, size)),
           **{f"psf_{k}": float(v) for k, v in psf.items()},
           "wcs_true": wcs_header_string(true),
           "wcs_error_shift_arcsec": errors["shift_arcsec"],
           "wcs_error_rot_deg": errors["rot_deg"], "wcs_error_scale": errors["scale"],
           "n_sources": len(src), "n_cosmic_rays": truth["n_cosmic_rays"],
           "bleed_lost_e": truth["bleed_lost"]}
    return image, _fits_header(settings, plan, detector, header_wcs), truth, row


def _simulate_and_write(args) -> dict:
    """Worker: render one exposure, write its eimage (and defect mask); return its row."""
    settings, plan, detector, static, variables, var_flux, outdir = args
    t0 = time.perf_counter()
    image, header, truth, row = simulate_exposure(settings, plan, detector, static, variables,
                                                  var_flux)
    outdir = Path(outdir)
    _write_fits(outdir / row["file"], fits.PrimaryHDU(data=image, header=header))
    if settings["defects"]:
        name = f"defects_v{plan['visit']:07d}_d{detector:02d}.fits"
        hdr = fits.Header([(f"DEFBIT{i}", k, "defect bit value 2**i") for i, k in
                           enumerate(DEFECT_BITS)])
        _write_fits(outdir / "truth" / name, fits.PrimaryHDU(truth["defect_mask"], header=hdr))
    logger.info("visit %d detector %d (%s): %d sources, %.1f s", plan["visit"], detector,
                plan["band"], row["n_sources"], time.perf_counter() - t0)
    return row


# --------------------------------------------------------------------------
# the dataset
# --------------------------------------------------------------------------

def _variable_flux_table(variables: pd.DataFrame, plans) -> pd.DataFrame:
    """``truth/variable_fluxes.parquet``: one row per (visit, variable)."""
    rows = []
    for plan in plans:
        mjd = plan["mjd_obs"] + plan["exptime"] / 2.0 / 86400.0
        rows.append(pd.DataFrame({"visit": np.int64(plan["visit"]), "band": plan["band"],
                                  "mjd": mjd, "id": variables["id"].to_numpy(np.int64),
                                  "flux_njy": variable_flux_njy(variables, plan["band"], mjd)}))
    return pd.concat(rows, ignore_index=True) if rows else pd.DataFrame(
        {"visit": [], "band": [], "mjd": [], "id": [], "flux_njy": []})


def _run_exposures(tasks, processes: int):
    """Run the exposure workers serially or in a process pool (same results)."""
    if processes <= 1 or len(tasks) <= 1:
        return [_simulate_and_write(t) for t in tasks]
    from concurrent.futures import ProcessPoolExecutor
    with ProcessPoolExecutor(max_workers=processes) as pool:
        return list(pool.map(_simulate_and_write, tasks))


def simulate_dataset(outdir, settings: Mapping | None = None, *, processes: int = 1) -> dict:
    """Simulate and write a complete dataset (eimages, refcat, truth).

    Parameters
    ----------
    outdir : str or Path
        Output directory (created).  Existing files of the same names are
        replaced atomically.
    settings : mapping, optional
        Overrides of :data:`DEFAULT_SETTINGS`.
    processes : int
        Worker processes for the exposures (results are identical for any
        number).

    Returns
    -------
    paths : dict
        ``images`` (list of eimage paths, sorted by visit and detector),
        ``refcat``, ``static_sources``, ``variables``, ``variable_fluxes``,
        ``visits``, ``defects`` (list, empty without defects), ``dataset``
        (the settings YAML), ``outdir``.
    """
    import yaml

    s = merge_settings(settings)
    out = Path(outdir)
    (out / "images").mkdir(parents=True, exist_ok=True)
    (out / "truth").mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    static = make_static_sources(s)
    variables = make_variables(s, static)
    plans = [plan_visit(s, i) for i in range(int(s["n_visits"]))]
    var_fluxes = _variable_flux_table(variables, plans)
    logger.info("simulating %d visits x %d detectors: %d static sources, %d variables",
                len(plans), s["n_detectors"], len(static), len(variables))
    tasks = []
    for plan in plans:
        flux = var_fluxes.loc[var_fluxes["visit"] == plan["visit"], "flux_njy"].to_numpy()
        tasks += [(s, plan, d, static, variables, flux, str(out)) for d in range(s["n_detectors"])]
    rows = _run_exposures(tasks, int(processes))
    visits = pd.DataFrame(rows).sort_values(["visit", "detector"], ignore_index=True)
    paths = {"outdir": out, "refcat": out / "refcat.parquet", "dataset": out / "dataset.yaml",
             **{k: out / "truth" / f"{k}.parquet" for k in
                ("static_sources", "variables", "variable_fluxes", "visits")}}
    _write_parquet(paths["refcat"], make_refcat(s, static))
    _write_parquet(paths["static_sources"], static)
    _write_parquet(paths["variables"], variables)
    _write_parquet(paths["variable_fluxes"], var_fluxes)
    _write_parquet(paths["visits"], visits)
    _write_text(paths["dataset"], yaml.safe_dump({"simulate": s}, sort_keys=True))
    paths["images"] = [out / f for f in visits["file"]]
    paths["defects"] = ([out / "truth" / f"defects_v{v:07d}_d{d:02d}.fits"
                         for v, d in zip(visits["visit"], visits["detector"])]
                        if s["defects"] else [])
    logger.info("dataset written to %s in %.1f s", out, time.perf_counter() - t0)
    return paths


def read_visit_wcs(row: Mapping) -> WCS:
    """True WCS of a ``truth/visits.parquet`` row (plain TAN)."""
    return WCS(fits.Header.fromstring(row["wcs_true"]))
