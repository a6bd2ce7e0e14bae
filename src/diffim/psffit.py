"""Fit a pixelized, spatially varying PSF model to stars, and PSF photometry.

The model is a :class:`diffim.psf.PsfModel`: ``K x K`` coefficient images times
the monomials of :func:`diffim.psf.poly_terms` in the scaled position.  Stars
are recentred on the kernel centre pixel by Fourier (sinc) shifts,
normalised by their flux and fitted pixel by pixel by weighted least squares;
stars with outlying residuals are rejected iteratively.  Other sources in a
star's stamp, catalogued or found in its residual, get zero weight, and the
stars' centroids follow the model's centre of light, so that neither a
neighbour nor a drifting centroid becomes part of the PSF.  With too few
stars for the pixelized spatial terms, the variation is fitted as fields of
size and shear (:mod:`diffim.psfshape`).  Images are
background-subtracted, in electrons, ``[y, x]``, positions 0-based.
"""

from __future__ import annotations

import logging
import warnings
from dataclasses import dataclass, field

import numpy as np
import pandas as pd
from scipy import ndimage
from scipy.spatial import cKDTree

from . import masks
from .errors import NoUsableStarsError, PsfFitError, PsfKernelTooSmallError
from .psf import (FWHM_PER_SIGMA, MAX_FWHM_FRACTION, PsfModel, check_kernel_size, moments_fwhm,
                  poly_terms)
from .psfshape import shape_field_model
from .stats import ridge_solve

logger = logging.getLogger(__name__)

_MARGIN = 8  # extra pixels around a K x K stamp, so that shifting it by FFT
#              wraps only the margin around

#: Neighbours of a PSF star are masked out to the radius where their light
#: (a Moffat profile, ``beta`` = :data:`NEIGHBOUR_BETA`, of the stars' FWHM)
#: falls below this fraction of the sky noise per pixel.
NEIGHBOUR_MASK_SIGMA = 0.3
#: Moffat ``beta`` of that profile: wings heavier than most seeing-limited PSFs
#: (beta 2.5-4.5), so the mask errs on the large side.
NEIGHBOUR_BETA = 2.5
#: Smallest neighbour mask radius, in FWHM.
NEIGHBOUR_MIN_RADIUS_FWHM = 1.5
#: Significance (sigma, PSF-filtered) of a positive residual clump that is
#: masked as a neighbour (:func:`_mask_residual_clumps`).
CLUMP_SIGMA = 5.0
#: The fit iterates (up to ``max_iter``) until no star's centroid moves by more
#: than this (pixels) to the centre of light of its model.
CENTRE_TOLERANCE = 0.01
#: Pixels within this many FWHM of the PSF star itself are never masked for a
#: neighbour, and a residual clump that peaks there is left alone: a neighbour
#: that close is a blend, which the chi^2 clip judges.  (Measured against the
#: truth PSFs of both simulators, peaks allowed from 1 FWHM on gave a better
#: model than from 2 FWHM: core error 1.25 % vs 1.29 % of the peak, wing error
#: 0.016 vs 0.018 of the flux on the default run; 4.2 % vs 4.5 % and 0.045 vs
#: 0.047 on ``benchmarks/independent`` ``small``.)
STAR_CORE_FWHM = 1.0

@dataclass
class PsfFitResult:
    """Result of :func:`fit_psf`.

    Attributes
    ----------
    psf : PsfModel
        The fitted model (kernel size = the requested ``kernel_size``).
    fwhm_px : float
        Adaptive-moment FWHM (pixels) of the model at the image centre.
    n_stars : int
        Stars used in the final fit.
    n_rejected : int
        Stars rejected (unusable stamps or outlying residuals).
    chi2 : float
        Median reduced chi^2 of the used stars' residuals.
    order : int
        Polynomial order actually fitted.
    stars : DataFrame
        Input stars with ``used`` (bool), ``chi2``, ``x_fit``, ``y_fit``,
        ``flux_fit`` (e-, within the K x K kernel).
    """

    psf: PsfModel
    fwhm_px: float
    n_stars: int
    n_rejected: int
    chi2: float
    order: int
    stars: pd.DataFrame = field(repr=False, default=None)


def choose_order(n_stars: int, max_order: int) -> int:
    """Polynomial order for ``n_stars`` stars: 0 below 10, 1 below 40, else 2,
    never above ``max_order``."""
    order = 0 if n_stars < 10 else 1 if n_stars < 40 else 2
    return int(min(order, max_order))


def full_order(max_order: int) -> int:
    """The order :func:`choose_order` gives with any number of stars (``min(max_order, 2)``)."""
    return choose_order(np.iinfo(np.int32).max, max_order)


def fourier_shift(stamps: np.ndarray, sx, sy, out_size: int) -> np.ndarray:
    """Sample stamps at sub-pixel-shifted positions by Fourier (sinc) shift.

    ``out[n, i, j] = stamps[n]`` interpolated at ``(y, x) = (i + m + sy[n],
    j + m + sx[n])``, with ``m = (S - out_size) // 2`` for stamps of size S;
    the periodic wrap-around only affects the discarded margin.  For a
    pixel-integrated Moffat of FWHM >= 4 px the error is < 0.01 % of the
    peak (0.4 % at FWHM 3), against 0.5-0.9 % for Lanczos-3.
    """
    stamps = np.asarray(stamps, float)
    n, size, _ = stamps.shape
    m = (size - out_size) // 2
    sx = np.broadcast_to(np.asarray(sx, float), (n,))[:, None, None]
    sy = np.broadcast_to(np.asarray(sy, float), (n,))[:, None, None]
    fy = np.fft.fftfreq(size)[None, :, None]
    fx = np.fft.rfftfreq(size)[None, None, :]
    spec = np.fft.rfft2(stamps) * np.exp(2j * np.pi * (fx * sx + fy * sy))
    out = np.fft.irfft2(spec, s=(size, size))
    return out[:, m:m + out_size, m:m + out_size]


def _extract_stamps(arrays, xs, ys, size):
    """Stamps (N, size, size) of each array around the rounded positions."""
    half = size // 2
    ix, iy = np.rint(xs).astype(int), np.rint(ys).astype(int)
    oy = iy[:, None, None] + np.arange(-half, half + 1)[None, :, None]
    ox = ix[:, None, None] + np.arange(-half, half + 1)[None, None, :]
    return [a[oy, ox] for a in arrays], ix, iy


def _solve_pixels(data, weight, terms, ridge=1e-12):
    """Per-pixel weighted least squares of data (N, P) = terms.T (N, T) @ c (T, P)."""
    a = np.einsum("np,kn,ln->pkl", weight, terms, terms)
    b = np.einsum("np,kn,np->pk", weight, terms, data)
    coeffs, cov = ridge_solve(a, b, ridge)
    return coeffs.T, cov[:, 0, 0]


@dataclass
class _Stamps:
    """Stars' big stamps (with a shifting margin) and their fit state."""

    img: np.ndarray      # (N, S, S)
    var: np.ndarray
    bad: np.ndarray
    x: np.ndarray        # current centroid estimates
    y: np.ndarray
    ix: np.ndarray
    iy: np.ndarray
    sky_var: np.ndarray  # (N,)


def _prepare_stars(image, variance, mask, stars, kernel_size):
    """Extract the stamps of usable stars; returns (_Stamps, keep index)."""
    ny, nx = image.shape
    size = kernel_size + 2 * _MARGIN
    half = size // 2
    xs, ys = stars["x"].to_numpy(float), stars["y"].to_numpy(float)
    ix, iy = np.rint(xs).astype(int), np.rint(ys).astype(int)
    inside = (ix - half >= 0) & (iy - half >= 0) & (ix + half < nx) & (iy + half < ny)
    inside &= np.isfinite(xs) & np.isfinite(ys)
    keep = np.flatnonzero(inside)
    # stamps first, then the bad-pixel test on them only (not the whole image)
    arrays = [image, variance] + ([] if mask is None else [np.asarray(mask)])
    stamps, ix, iy = _extract_stamps(arrays, xs[keep], ys[keep], size)
    img, var = stamps[0].astype(float), stamps[1].astype(float)
    with np.errstate(invalid="ignore"):
        bd = ~np.isfinite(img) | ~np.isfinite(var) | ~(var > 0)
    if mask is not None:
        bd |= masks.any_set(stamps[2], *masks.BAD_FOR_FIT)
    img = np.where(bd, 0.0, img)
    var = np.where(bd, np.inf, var).astype(float)
    r = np.hypot(*np.meshgrid(np.arange(size) - half, np.arange(size) - half))
    ring = r >= half - 2
    sky_var = np.nanmedian(np.where(bd[:, ring], np.nan, var[:, ring]), axis=1) \
        if keep.size else np.zeros(0)
    return _Stamps(img, var, bd, xs[keep], ys[keep], ix, iy, sky_var), keep


def neighbour_mask_radius(flux, fwhm: float, sky_sigma: float) -> np.ndarray:
    """Radius (pixels) inside which a neighbour of ``flux`` is masked.

    The radius at which a Moffat profile (``beta`` :data:`NEIGHBOUR_BETA`,
    FWHM ``fwhm`` px, total ``flux`` e-) falls to :data:`NEIGHBOUR_MASK_SIGMA`
    times ``sky_sigma`` (e- per pixel), and at least
    :data:`NEIGHBOUR_MIN_RADIUS_FWHM` FWHM.  Non-finite fluxes get the minimum.
    """
    beta = NEIGHBOUR_BETA
    alpha = fwhm / (2.0 * np.sqrt(2.0 ** (1.0 / beta) - 1.0))
    flux = np.nan_to_num(np.abs(np.asarray(flux, float)), nan=0.0, posinf=0.0)
    peak = flux * (beta - 1.0) / (np.pi * alpha**2)
    ratio = peak / (NEIGHBOUR_MASK_SIGMA * max(sky_sigma, 1e-30))
    r = alpha * np.sqrt(np.maximum(ratio ** (1.0 / beta) - 1.0, 0.0))
    return np.maximum(r, NEIGHBOUR_MIN_RADIUS_FWHM * fwhm)


def _stamp_fwhm(st: _Stamps, k: int) -> float:
    """FWHM (px) of the median flux-normalised star (before any model)."""
    m = (st.img.shape[1] - k) // 2
    core = np.where(st.bad, 0.0, st.img)[:, m:m + k, m:m + k]
    total = core.sum(axis=(1, 2))
    ok = total > 0
    if not ok.any():
        return float("nan")
    return moments_fwhm(np.median(core[ok] / total[ok, None, None], axis=0))


def _mask_neighbours(st: _Stamps, neighbours: pd.DataFrame, fwhm: float) -> int:
    """Give zero weight to the light of other sources in each star's stamp.

    A pixelized PSF fit weights each star by ``flux^2 / variance``, so on the
    sky-limited wings the brightest star dominates the model, and a faint
    neighbour in its stamp becomes a bump of the PSF itself: every matching
    kernel built from that PSF then subtracts a copy of the neighbour next to
    every bright star (measured on the default run: 80 % of a mag-21.7 star
    18 px from a mag-16.8 star removed from a warp).  Returns the number of
    (star, neighbour) pairs masked.
    """
    if neighbours is None or len(neighbours) == 0 or len(st.x) == 0:
        return 0
    if not np.isfinite(fwhm) or fwhm <= 0:
        return 0
    nxy = neighbours[["x", "y"]].to_numpy(float)
    finite = np.all(np.isfinite(nxy), axis=1)
    nxy = nxy[finite]
    radius = neighbour_mask_radius(neighbours["flux"].to_numpy(float)[finite], fwhm,
                                   float(np.sqrt(np.median(st.sky_var))))
    size = st.img.shape[1]
    half = size // 2
    reach = half * np.sqrt(2.0) + radius.max(initial=0.0)
    tree = cKDTree(nxy)
    gy, gx = np.mgrid[:size, :size] - half      # stamp pixels, from its centre pixel
    n_pairs = 0
    for i, cand in enumerate(tree.query_ball_point(np.c_[st.x, st.y], reach)):
        cand = np.asarray(cand, int)
        cand = cand[np.hypot(*(nxy[cand] - [st.x[i], st.y[i]]).T) > 1.0]   # not the star
        core = (gx - (st.x[i] - st.ix[i])) ** 2 + (gy - (st.y[i] - st.iy[i])) ** 2 \
            <= (STAR_CORE_FWHM * fwhm) ** 2
        for c in cand:
            ox, oy = nxy[c, 0] - st.ix[i], nxy[c, 1] - st.iy[i]
            r = radius[c]
            if abs(ox) > half + r or abs(oy) > half + r:
                continue
            st.bad[i] |= ((gx - ox) ** 2 + (gy - oy) ** 2 <= r * r) & ~core
            n_pairs += 1
    st.img[st.bad] = 0.0
    st.var[st.bad] = np.inf
    return n_pairs


def _mask_residual_clumps(st: _Stamps, data, bad, model, flux, var, k: int,
                          fwhm: float) -> np.ndarray:
    """Mask positive residual clumps (undetected or unseparated neighbours).

    A neighbour inside a bright star's detection footprint is not in the
    catalog.  After a fit it stands out in that star's residual
    ``data - flux * model`` filtered with a Gaussian of the PSF's FWHM: its
    significance exceeds both the median of its ring (same distance from the
    star) and the value at the mirrored position by :data:`CLUMP_SIGMA`.
    Clumps that peak outside the star's core (:data:`STAR_CORE_FWHM`), grown
    by one FWHM, are masked outside the core.
    Only positive clumps: the negative residual that a bump of the model
    leaves in the other stars is the model's error, not theirs.

    Returns
    -------
    ndarray (N, K * K) bool
        The masked pixels in the recentred stamps (also set in ``st.bad``).
    """
    n = len(flux)
    s = fwhm / FWHM_PER_SIGMA
    res = np.where(bad, 0.0, data - flux[:, None] * model).reshape(n, k, k)
    v = np.where(bad, 0.0, var).reshape(n, k, k)
    num = ndimage.gaussian_filter(res, (0, s, s), mode="constant")
    den = ndimage.gaussian_filter(v, (0, s / np.sqrt(2.0), s / np.sqrt(2.0)),
                                  mode="constant") / (4.0 * np.pi * s * s)
    with np.errstate(divide="ignore", invalid="ignore"):
        sig = np.where(den > 0, num / np.sqrt(den), np.nan)
    c = k // 2
    yy, xx = np.mgrid[:k, :k] - c
    outside = yy**2 + xx**2 > (STAR_CORE_FWHM * fwhm) ** 2
    excess = np.nan_to_num(sig - _ring_medians(sig, np.rint(np.hypot(yy, xx)).astype(int)))
    # ... and not mirrored through the star: an elliptical mismatch of the
    # model leaves symmetric lobes, which are the model's business
    clump = (excess > CLUMP_SIGMA) & (excess - excess[:, ::-1, ::-1] > CLUMP_SIGMA)
    r = max(int(np.ceil(fwhm)), 1)
    disc = (np.mgrid[-r:r + 1, -r:r + 1] ** 2).sum(axis=0) <= r * r
    m = (st.img.shape[1] - k) // 2
    for i in np.flatnonzero((clump & outside[None]).any(axis=(1, 2))):
        # a clump that peaks in the core is a blend, not a neighbour: it is left
        # for the chi^2 clip
        labels, n_labels = ndimage.label(clump[i])
        peaks = ndimage.maximum_position(excess[i], labels, np.arange(1, n_labels + 1))
        apart = [j + 1 for j, (py, px) in enumerate(peaks) if outside[py, px]]
        clump[i] = np.isin(labels, apart)
        clump[i] = ndimage.binary_dilation(clump[i], structure=disc) & outside
        st.bad[i, m:m + k, m:m + k] |= clump[i]
    clump &= outside[None]
    st.img[st.bad] = 0.0
    st.var[st.bad] = np.inf
    return clump.reshape(n, -1)


def _ring_medians(values: np.ndarray, ring: np.ndarray) -> np.ndarray:
    """Per stamp, the NaN-median of ``values`` (N, K, K) over each ring
    ``ring`` (K, K integer radius), broadcast back onto the pixels.

    Subtracting it leaves what is not azimuthally symmetric: a neighbour, but
    not an error of the model's radial profile or of the local sky."""
    out = np.zeros_like(values)
    for j in np.unique(ring):
        sel = ring == j
        with warnings.catch_warnings():   # (all-NaN rings: fully masked)
            warnings.simplefilter("ignore", RuntimeWarning)
            med = np.nanmedian(values[:, sel], axis=1)
        out[:, sel] = np.nan_to_num(med)[:, None]
    return out


def _recentre(st: _Stamps, k: int):
    """Stamps (N, K, K) resampled so each star is centred on the centre pixel.

    Returns data, bad (a masked pixel within 1 px of the sampled point)."""
    sx, sy = st.x - st.ix, st.y - st.iy
    data = fourier_shift(st.img, sx, sy, k)
    m = (st.img.shape[1] - k) // 2
    bad = np.zeros((len(sx), k, k), bool)
    for dy in (-1, 0, 1):  # masked pixels, grown by one, at the rounded shift
        for dx in (-1, 0, 1):
            bad |= st.bad[:, m + dy:m + dy + k, m + dx:m + dx + k]
    return data, bad


def _model_stamps(coeffs, terms):
    """Model PSF (N, P) of each star from coefficient images (T, P)."""
    return terms.T @ coeffs


def fit_psf(image: np.ndarray, variance: np.ndarray, mask: np.ndarray | None,
            stars: pd.DataFrame, *, kernel_size: int, order: int = 2,
            min_stars: int = 5, clip: float = 4.0, max_iter: int = 6,
            max_fwhm_fraction: float = MAX_FWHM_FRACTION,
            neighbours: pd.DataFrame | None = None) -> PsfFitResult:
    """Fit a spatially varying pixelized PSF model to the given stars.

    Parameters
    ----------
    image : ndarray (ny, nx)
        Background-subtracted image, electrons.
    variance : ndarray (ny, nx)
        Variance, electrons^2.
    mask : ndarray int32 or None
        Bit mask; pixels with :data:`diffim.masks.BAD_FOR_FIT` planes get zero
        weight.
    stars : DataFrame
        Columns ``x, y`` (0-based centroids), e.g. from
        :func:`diffim.sources.select_psf_stars`.
    kernel_size : int
        Odd model size K (pixels), the ``psf.kernel_size`` config value.
    order : int
        Maximum polynomial order of the spatial variation.  The pixelized
        model's order is :func:`choose_order` of the number of stars; when
        the stars are too few for the order it would reach with many (fewer
        than 40 for order 2), the spatial variation is instead smooth size
        and shear fields of up to ``order`` on the stars' mean PSF
        (:func:`diffim.psfshape.shape_field_model`).
    min_stars : int
        Fewest usable stars accepted.
    clip : float
        Stars whose reduced chi^2 exceeds the median by ``clip`` robust sigma
        are rejected (iteratively, up to ``max_iter`` fits).
    max_fwhm_fraction : float
        The fitted FWHM must not exceed this fraction of K.
    neighbours : DataFrame, optional
        Every detected source (``x, y, flux`` in e-, e.g. the whole
        :func:`diffim.sources.detect_sources` catalog, which may include the
        stars themselves).  The pixels of each star's stamp within
        :func:`neighbour_mask_radius` of another source get zero weight.

    Returns
    -------
    PsfFitResult

    Raises
    ------
    NoUsableStarsError
        Fewer than ``min_stars`` usable stars.
    PsfFitError
        The PSF is too broad for the kernel, or the fit is degenerate.
    """
    k = check_kernel_size(kernel_size)
    image = np.asarray(image)  # stamps are converted to float64, not the image
    variance = np.asarray(variance)
    if image.shape != variance.shape or image.ndim != 2:
        raise ValueError(f"image {image.shape} and variance {variance.shape} must be "
                         "2-D arrays of the same shape")
    ny, nx = image.shape
    st, keep = _prepare_stars(image, variance, mask, stars, k)
    if keep.size < min_stars:
        raise NoUsableStarsError(
            f"only {keep.size} PSF stars have a full {k}x{k} stamp inside the image "
            f"(at least {min_stars} needed); the exposure has too few isolated, "
            "unsaturated bright stars")
    fwhm0 = _stamp_fwhm(st, k)
    n_masked = _mask_neighbours(st, neighbours, fwhm0)
    n_clumps = 0
    clumps = np.zeros((keep.size, k * k), bool)
    u = 2.0 * st.x / max(nx - 1, 1) - 1.0
    v = 2.0 * st.y / max(ny - 1, 1) - 1.0
    used = np.ones(keep.size, bool)
    flux = None
    coeffs = None
    chi2 = np.zeros(keep.size)
    for it in range(max_iter):
        n_used = int(used.sum())
        if n_used < min_stars:
            raise NoUsableStarsError(
                f"only {n_used} PSF stars remain after rejecting outliers (at least "
                f"{min_stars} needed)")
        fit_order = choose_order(n_used, order)
        terms = poly_terms(u, v, fit_order)                    # (T, N)
        data, bad = _recentre(st, k)
        data = data.reshape(keep.size, -1)
        bad = bad.reshape(keep.size, -1)
        if flux is None:
            flux = data.sum(axis=1)
        model = None if coeffs is None or coeffs.shape[0] != terms.shape[0] else \
            _model_stamps(coeffs, terms)
        if model is not None:
            flux = _fit_amplitudes(data, bad, model, st.sky_var, flux)
        var = _model_variance(st.sky_var, flux, model, data)
        w = np.where(bad, 0.0, flux[:, None] ** 2 / var)
        w[~used] = 0.0
        coeffs, inv00 = _solve_pixels(data / flux[:, None], w, terms[:, :])
        model = _model_stamps(coeffs, terms)
        if it < 2 and np.isfinite(fwhm0):   # (before the chi^2 clip judges the stars)
            clumps = _mask_residual_clumps(st, data, bad, model, flux, var, k, fwhm0)
            n_clumps += int(clumps.any(axis=1).sum())
            w[clumps] = 0.0
        resid2 = (data / flux[:, None] - model) ** 2 * w
        npix = np.maximum((w > 0).sum(axis=1), 1)
        chi2 = np.where(used, resid2.sum(axis=1) / npix, np.nan)
        _refine_centroids(st, data, bad | clumps, model, flux, var, k)
        moved = _centre_on_model(st, model, k, fwhm0) if np.isfinite(fwhm0) else 0.0
        # no verdict on the first pass: its fluxes are plain sums, a neighbour's
        # light included
        new_used = used & _chi2_inliers(chi2, used, clip) if it > 0 else used
        if it >= 2 and (new_used == used).all() and moved < CENTRE_TOLERANCE:
            break
        used = new_used
    if fit_order < full_order(order):
        # too few stars for a pixelized model of full order: smooth size and
        # shear fields on the mean PSF instead (diffim.psfshape)
        wu = w * used[:, None]
        c0 = _solve_pixels(data / flux[:, None], wu, poly_terms(u, v, 0))[0][0]
        coeffs, fit_order = shape_field_model(data[used] / flux[used, None], wu[used],
                                              u[used], v[used], c0, order)
    coeffs = _taper(coeffs, inv00, k)
    psf = PsfModel(coeffs=coeffs.reshape(-1, k, k), order=fit_order, width=nx, height=ny)
    fwhm = moments_fwhm(psf.at())
    _check_fwhm(fwhm, k, max_fwhm_fraction)
    table = stars.copy()
    table["used"] = False
    table["chi2"] = np.nan
    for col in ("x_fit", "y_fit", "flux_fit"):
        table[col] = np.nan
    pos = table.index[keep]
    table.loc[pos, "used"] = used
    table.loc[pos, "chi2"] = chi2
    table.loc[pos, "x_fit"], table.loc[pos, "y_fit"] = st.x, st.y
    table.loc[pos, "flux_fit"] = flux
    n_used = int(used.sum())
    logger.info("PSF fit: %d stars (%d rejected), order %d, FWHM %.2f px, median chi2 %.2f, "
                "%d neighbours and %d residual clumps masked", n_used, len(stars) - n_used,
                fit_order, fwhm, np.nanmedian(chi2[used]), n_masked, n_clumps)
    return PsfFitResult(psf=psf, fwhm_px=float(fwhm), n_stars=n_used,
                        n_rejected=len(stars) - n_used,
                        chi2=float(np.nanmedian(chi2[used])), order=fit_order, stars=table)


def _model_variance(sky_var, flux, model, data):
    """Per-pixel variance from sky + Poisson of the *model* (noise-free), so
    that pixel noise does not bias its own weight; the first pass uses the
    data smoothed to the mean normalised star."""
    if model is None:
        mean = np.median(data / flux[:, None], axis=0)
        model = np.broadcast_to(mean, data.shape)
    return sky_var[:, None] + np.maximum(flux[:, None] * model, 0.0)


def _fit_amplitudes(data, bad, model, sky_var, flux):
    """Least-squares amplitude of each star given its model (unit sum)."""
    var = sky_var[:, None] + np.maximum(flux[:, None] * model, 0.0)
    w = np.where(bad, 0.0, 1.0 / var)
    num = (w * model * data).sum(axis=1)
    den = (w * model * model).sum(axis=1)
    return np.where(den > 0, num / np.where(den > 0, den, 1.0), flux)


def _refine_centroids(st, data, bad, model, flux, var, k):
    """Linearised least-squares shift of each star against its model.

    ``data ~ F (M - dx dM/dx - dy dM/dy)``; the centroid moves by (dx, dy)
    (capped at 0.5 px per pass).
    """
    m = model.reshape(-1, k, k)
    gx = np.gradient(m, axis=2).reshape(len(m), -1)
    gy = np.gradient(m, axis=1).reshape(len(m), -1)
    w = np.where(bad, 0.0, 1.0 / var)
    basis = np.stack([model, -gx, -gy], axis=1) * flux[:, None, None]   # (N, 3, P)
    a = np.einsum("nkp,nlp,np->nkl", basis, basis, w) + 1e-12 * np.eye(3)
    b = np.einsum("nkp,np,np->nk", basis, data, w)
    sol = np.linalg.solve(a, b[..., None])[..., 0]
    dx = np.clip(sol[:, 1] / np.maximum(sol[:, 0], 1e-3), -0.5, 0.5)
    dy = np.clip(sol[:, 2] / np.maximum(sol[:, 0], 1e-3), -0.5, 0.5)
    ok = np.isfinite(dx) & np.isfinite(dy)
    st.x = np.where(ok, st.x + dx, st.x)
    st.y = np.where(ok, st.y + dy, st.y)


def _centre_on_model(st, model, k: int, fwhm: float) -> float:
    """Move each star's centroid to the centre of light of its model.

    The star centroids are refined against the model while the model is
    fitted to stamps centred on them, so a shift that varies linearly over
    the image is free to drift between the two (a degenerate mode of the
    joint fit).  With 15 stars and an order-1 model it drifted to 0.8 px
    across a 768-px detector, and the warps and templates built from that
    PSF were misregistered by as much (64 dipoles on one difference).
    Putting each star where its model's Gaussian-weighted centroid (weight
    of the PSF's FWHM) falls keeps that centroid on the kernel's centre pixel.
    Returns the largest move (pixels).
    """
    c = k // 2
    yy, xx = np.mgrid[:k, :k] - c
    w = np.exp(-0.5 * (xx**2 + yy**2) / (fwhm / FWHM_PER_SIGMA) ** 2).ravel()
    mw = model * w
    norm = mw.sum(axis=1)
    ok = norm > 0
    dx = np.where(ok, (mw * xx.ravel()).sum(axis=1) / np.where(ok, norm, 1.0), 0.0)
    dy = np.where(ok, (mw * yy.ravel()).sum(axis=1) / np.where(ok, norm, 1.0), 0.0)
    dx, dy = np.clip(dx, -0.5, 0.5), np.clip(dy, -0.5, 0.5)
    st.x = st.x + dx
    st.y = st.y + dy
    return float(np.max(np.hypot(dx, dy), initial=0.0))


def _chi2_inliers(chi2, used, clip):
    """Stars whose chi^2 is not above median + clip robust sigma."""
    c = chi2[used]
    med = np.median(c)
    sig = max(1.4826 * np.median(np.abs(c - med)), 0.05 * med)
    return ~(chi2 > med + clip * sig)


def _taper(coeffs, inv00, k, snr_min=3.0, width=3.0):
    """Zero the kernel smoothly where the model is noise-dominated.

    From the first radius at which the annulus mean of the central (term 0)
    image has S/N below ``snr_min``, a cosine taper falls to zero over
    ``width`` pixels.  The same window multiplies every term, keeping the
    polynomial structure.  A model that is significant out to the corners is
    left untouched (tapering signal would bias the normalisation).
    """
    c = k // 2
    yy, xx = np.mgrid[:k, :k]
    r = np.hypot(xx - c, yy - c).ravel()
    # S/N of the annulus mean (not the mean per-pixel S/N): sum / sqrt(sum var)
    rbin = np.rint(r).astype(int)
    signal = np.bincount(rbin, coeffs[0])
    noise = np.sqrt(np.bincount(rbin, np.maximum(inv00, 0.0)))
    prof = np.abs(signal) / np.maximum(noise, 1e-300)
    low = np.flatnonzero((prof < snr_min) & (np.arange(prof.size) >= 3))
    if low.size == 0:
        return coeffs
    r_in = float(low[0]) - 0.5
    logger.debug("PSF taper: model noise-dominated beyond r = %.1f px", r_in)
    t = np.clip((r - r_in) / width, 0.0, 1.0)
    window = 0.5 * (1.0 + np.cos(np.pi * t))
    return coeffs * window[None, :]


def _check_fwhm(fwhm, k, fraction):
    """Raise PsfFitError if the FWHM is too large for the kernel."""
    if not np.isfinite(fwhm) or fwhm <= 0:
        raise PsfFitError("the fitted PSF model is degenerate (its FWHM could not be "
                          "measured); the PSF stars may be contaminated")
    if fwhm > fraction * k:
        need = int(np.ceil(fwhm / fraction)) | 1
        raise PsfKernelTooSmallError(
            f"PSF FWHM {fwhm:.1f} px is too large for a {k}-px PSF model (needs at least "
            f"{need} px)", need)


def measure_psf_flux(image: np.ndarray, variance: np.ndarray, psf_kernel, x, y, *,
                     mask: np.ndarray | None = None
                     ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Linear PSF-fit flux at fixed positions.

    ``flux = sum(P d) / sum(P^2)`` over usable pixels, with ``P`` the unit-sum
    PSF shifted (Fourier) to the sub-pixel position; this unweighted
    estimator is unbiased for bright stars, where a variance-weighted one
    would be biased by the star's own Poisson noise.  The error is
    ``sqrt(sum(P^2 var)) / sum(P^2)``.

    Parameters
    ----------
    image, variance : ndarray (ny, nx)
        Background-subtracted image (e-) and variance (e-^2).
    psf_kernel : PsfModel or ndarray (K, K)
        The PSF (evaluated at each position if a model).
    x, y : array_like
        0-based positions.
    mask : ndarray int32 or None
        Pixels with :data:`diffim.masks.BAD_FOR_FIT` planes are excluded.

    Returns
    -------
    flux, flux_err : ndarray
        Electrons (NaN where no usable pixel).
    flag : ndarray bool
        True where the K x K footprint touched a masked pixel or the edge.
    """
    image = np.asarray(image)  # only the stamps are converted to float64
    variance = np.asarray(variance)
    x = np.atleast_1d(np.asarray(x, float))
    y = np.atleast_1d(np.asarray(y, float))
    kernels = _kernels_at(psf_kernel, x, y)
    k = kernels.shape[1]
    ix, iy = np.rint(x).astype(int), np.rint(y).astype(int)
    padded = np.pad(kernels, ((0, 0), (_MARGIN, _MARGIN), (_MARGIN, _MARGIN)))
    prof = fourier_shift(padded, -(x - ix), -(y - iy), k)
    prof /= prof.sum(axis=(1, 2), keepdims=True)
    ny, nx = image.shape
    h = k // 2
    oy = iy[:, None, None] + np.arange(-h, h + 1)[None, :, None]
    ox = ix[:, None, None] + np.arange(-h, h + 1)[None, None, :]
    inside = (oy >= 0) & (oy < ny) & (ox >= 0) & (ox < nx)
    oyc, oxc = np.clip(oy, 0, ny - 1), np.clip(ox, 0, nx - 1)
    d, var = image[oyc, oxc].astype(float), variance[oyc, oxc].astype(float)
    good = inside & np.isfinite(d) & np.isfinite(var)
    if mask is not None:
        good &= ~masks.any_set(np.asarray(mask)[oyc, oxc], *masks.BAD_FOR_FIT)
    p = np.where(good, prof, 0.0)
    d, var = np.where(good, d, 0.0), np.where(good, var, 0.0)
    den = (p * p).sum(axis=(1, 2))
    with np.errstate(invalid="ignore", divide="ignore"):
        flux = np.where(den > 0, (p * d).sum(axis=(1, 2)) / den, np.nan)
        err = np.where(den > 0, np.sqrt((p * p * var).sum(axis=(1, 2))) / den, np.nan)
    flag = ~good.all(axis=(1, 2))
    return flux, err, flag


def _kernels_at(psf, x, y) -> np.ndarray:
    """PSF kernels (N, K, K), unit sum, at the positions."""
    if isinstance(psf, PsfModel):
        u, v = psf.scaled_uv(x, y)
        w = poly_terms(u, v, psf.order)                            # (T, N)
        kern = np.tensordot(w.T, psf.coeffs, axes=(1, 0))          # (N, K, K)
        return kern / kern.sum(axis=(1, 2), keepdims=True)
    kern = np.asarray(psf, float)
    if kern.ndim != 2 or kern.shape[0] != kern.shape[1] or kern.shape[0] % 2 == 0:
        raise ValueError(f"psf_kernel must be a PsfModel or an odd square array, "
                         f"got shape {kern.shape}")
    return np.broadcast_to(kern / kern.sum(), (len(x),) + kern.shape)
