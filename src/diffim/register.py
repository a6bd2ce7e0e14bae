"""Registration of a visit to its template, star by star.

The calexp's WCS is fitted to a reference catalog; the template in the visit
frame is the mean of other visits, each resampled through its own fitted WCS.
Where few stars hold a fit, it is good to a few hundredths of a pixel at
best and worse near the edges, and the template can be off where it comes
from one or two visits (on the independent simulator's 1000 x 1040 images,
before the astrometric fit was weighted by the stars' centroid errors, a
bright star 30 rows from an edge sat 0.3 px from where the template had it,
from one other visit whose fit had clipped that star, and its residual was
detected as a dipole at S/N 21).

So the visit is registered to the template directly.  At bright stars of
the template (in the visit frame, resampled with the calexp's WCS) the
windowed centroids of the science image and of the template are compared;
their offsets ``d = x_science - x_template`` are fitted by a polynomial in
the pixel position (order 0-3, chosen by leave-one-out residuals, with
iterative clipping of variable, blended or moving stars), and the visit's
WCS is replaced by ``W'(x) = W(x - d(x))`` (:func:`diffim.astrometry.
shifted_wcs`), under which the template, resampled again, lands on the
science image's stars.  The centroids of two images with different PSFs
are compared: for a symmetric PSF a windowed centroid is its centre, and a
constant offset between two asymmetric PSFs is absorbed by the matching
kernel anyway.

Everything here is arrays in and arrays out.  Conventions as in
:mod:`diffim`: arrays ``[y, x]``, pixel ``(0, 0)`` is the centre of the
first pixel, offsets in pixels of the visit.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, replace

import numpy as np
import sep

from . import masks
from .detect import bright_peaks
from .exposure import Exposure
from .astrometry import shifted_wcs
from .psf import FWHM_PER_SIGMA, centroid_error, poly_terms
from .residuals import random_effect
from .stats import ridge_solve, robust_std

logger = logging.getLogger(__name__)

#: Stars used: matched-filter S/N of the template's source in the *science*
#: image's noise at least this (a windowed centroid is good to about
#: ``1.4 sigma_PSF / SNR``: 0.07 px at 20 for a FWHM of 2.35 px per sigma).
MIN_STAR_SNR = 20.0
#: At most this many stars (the brightest).
MAX_STARS = 400
#: Fewer usable pairs than this: no registration (the WCS is kept).
MIN_PAIRS = 8
#: Pairs per polynomial coefficient (per axis) needed to consider an order.
PAIRS_PER_TERM = 3
#: Highest polynomial order of the offset field.
MAX_ORDER = 3
#: A higher order must lower the leave-one-out scatter by more than this fraction.
ORDER_GAIN = 0.05
#: Centroid error floor added in quadrature (pixels): PSF-shape differences
#: between the two images move centroids by a few thousandths of a pixel,
#: which the brightest stars' statistical errors would otherwise ignore.
ERROR_FLOOR = 0.01
#: Clipping threshold (normalised residuals, robust sigma).
CLIP = 4.0


@dataclass(frozen=True)
class OffsetField:
    """Polynomial field of science-minus-template offsets.

    Attributes
    ----------
    coef : ndarray (2, n_terms)
        Coefficients of ``d_x`` and ``d_y`` (pixels) on the monomials of
        :func:`_design`.
    order : int
        Polynomial order (0 = a constant shift).
    centre, norm : float tuple, float
        Pixel coordinates are ``(x - centre) / norm``.
    n_pairs, n_used : int
        Star pairs measured, and kept by the clipping.
    scatter_before, scatter_after : float
        Robust per-axis scatter (pixels) of the kept pairs' offsets about
        their median before the fit and of their leave-one-out residuals
        after it.
    largest : float
        Largest ``|d|`` (pixels) over the image the field was fitted on
        (:meth:`max_offset`).
    """

    coef: np.ndarray
    order: int
    centre: tuple[float, float]
    norm: float
    n_pairs: int
    n_used: int
    scatter_before: float
    scatter_after: float
    largest: float = 0.0

    def __call__(self, x, y) -> tuple[np.ndarray, np.ndarray]:
        """``(d_x, d_y)`` in pixels at pixel positions ``(x, y)``."""
        design = _design(np.asarray(x, float), np.asarray(y, float), self.order,
                         self.centre, self.norm)
        return design @ self.coef[0], design @ self.coef[1]

    def max_offset(self, shape, n_grid: int = 33) -> float:
        """Largest ``|d|`` (pixels) over a grid covering an image of ``shape``."""
        ny, nx = shape
        gx, gy = np.meshgrid(np.linspace(0, nx - 1, n_grid), np.linspace(0, ny - 1, n_grid))
        dx, dy = self(gx.ravel(), gy.ravel())
        return float(np.max(np.hypot(dx, dy)))


def _design(x, y, order, centre, norm):
    """Columns :func:`diffim.psf.poly_terms` of ``(u, v) = ((x, y) - centre) / norm``."""
    return poly_terms((x - centre[0]) / norm, (y - centre[1]) / norm, order).T


def _snr(img, var, bad, psf, x, y):
    """Matched-filter S/N of ``img`` at the integer pixels ``(x, y)`` (0 where unusable)."""
    h = psf.shape[0] // 2
    ny, nx = img.shape
    out = np.zeros(len(x))
    ok = (x >= h) & (y >= h) & (x < nx - h) & (y < ny - h)
    for i in np.flatnonzero(ok):
        sl = (slice(y[i] - h, y[i] + h + 1), slice(x[i] - h, x[i] + h + 1))
        if bad[sl].any():
            continue
        num = float(np.sum(psf * img[sl]))
        den = float(np.sum(psf * psf * var[sl]))
        out[i] = num / np.sqrt(den) if den > 0 else 0.0
    return out


def _centroids(img, bad, x, y, sigma):
    """sep windowed centroids at starting positions ``(x, y)``; NaN where they fail or wander."""
    data = np.ascontiguousarray(np.where(bad | ~np.isfinite(img), 0, img), dtype=np.float64)
    xw, yw, flag = sep.winpos(data, np.asarray(x, float), np.asarray(y, float),
                              np.full(len(x), sigma), mask=np.ascontiguousarray(bad))
    lost = (flag != 0) | (np.hypot(xw - x, yw - y) > 2.0 * sigma)
    return np.where(lost, np.nan, xw), np.where(lost, np.nan, yw)


def star_pairs(science: np.ndarray, science_var: np.ndarray, template: np.ndarray,
               template_var: np.ndarray, bad: np.ndarray, psf: np.ndarray, fwhm: float,
               xy: np.ndarray) -> dict:
    """Windowed centroids of the same stars in the science image and the template.

    Parameters
    ----------
    science, science_var : ndarray (ny, nx)
        Science image and its variance (any flux unit, the template's).
    template, template_var : ndarray (ny, nx)
        Template in the science image's frame and its variance.
    bad : ndarray of bool (ny, nx)
        Pixels unusable in either image (saturated, masked, no template).
    psf : ndarray (K, K)
        Science PSF image (unit sum), for the S/N.
    fwhm : float
        Science PSF FWHM (pixels); the centroid window's sigma is ``fwhm / 2.355``.
    xy : ndarray (n, 2) int
        Candidate star positions (bright peaks of the template).

    Returns
    -------
    dict of ndarray
        ``xs, ys`` (science), ``xt, yt`` (template) and ``err`` (the
        per-axis error of ``xs - xt``, pixels) of the stars whose centroids
        succeeded in both images and whose S/N in the science image is at
        least :data:`MIN_STAR_SNR`.
    """
    xy = np.asarray(xy, int).reshape(-1, 2)
    x, y = xy[:, 0], xy[:, 1]
    snr_s = _snr(science, science_var, bad, psf, x, y)
    snr_t = _snr(template, template_var, bad, psf, x, y)
    keep = (snr_s >= MIN_STAR_SNR) & (snr_t > 0)
    x, y, snr_s, snr_t = x[keep], y[keep], snr_s[keep], snr_t[keep]
    sigma = fwhm / FWHM_PER_SIGMA
    xs, ys = _centroids(science, bad, x.astype(float), y.astype(float), sigma)
    xt, yt = _centroids(template, bad, x.astype(float), y.astype(float), sigma)
    ok = np.isfinite(xs) & np.isfinite(xt)
    err = np.sqrt(centroid_error(fwhm, snr_s)**2 + centroid_error(fwhm, snr_t)**2
                  + ERROR_FLOOR**2)
    return {"xs": xs[ok], "ys": ys[ok], "xt": xt[ok], "yt": yt[ok], "err": err[ok]}


def _fit_order(x, y, d, w, order, centre, norm, keep):
    """Weighted LSQ of both offset axes at one order; leave-one-out normalised residuals."""
    a = _design(x, y, order, centre, norm) * np.sqrt(w)[:, None]
    b = d * np.sqrt(w)[:, None]
    normal = a[keep].T @ a[keep]
    # one system per axis, the same matrix
    coef, cov = ridge_solve(np.stack([normal, normal]), (a[keep].T @ b[keep]).T)
    cov = cov[0]
    resid = b - a @ coef.T                      # normalised residuals, every pair
    lev = np.einsum("ij,jk,ik->i", a, cov, a)   # leverage (in-fit pairs only meaningful)
    loo = np.where(keep[:, None], resid / np.clip(1.0 - lev, 1e-3, None)[:, None], resid)
    return coef, resid, loo


def _clipped_fit(x, y, d, w, order, centre, norm, n_iter=5):
    """Fit at ``order`` with iterative clipping at :data:`CLIP` robust sigma."""
    keep = np.ones(len(x), bool)
    for _ in range(n_iter):
        if keep.sum() < PAIRS_PER_TERM * (order + 1) * (order + 2) // 2:
            return None
        coef, resid, loo = _fit_order(x, y, d, w, order, centre, norm, keep)
        scale = max(robust_std(resid[keep].ravel()), 1e-6)
        new_keep = np.all(np.abs(resid) <= CLIP * scale, axis=1)
        if np.array_equal(new_keep, keep):
            break
        keep = new_keep
    return coef, keep, loo


def star_scatter(d: np.ndarray, err: np.ndarray) -> float:
    """``tau^2`` (pixels^2): the stars' own scatter of ``d`` about their mean beyond ``err``.

    Star pairs disagree by more than their centroid errors: a star's colour
    moves it by differential refraction, a proper motion between the epochs,
    a faint neighbour that pulls the windowed centroid differently under two
    PSFs.  On the independent simulator's `small` images the brightest
    stars (errors 0.015-0.04 px) disagreed by 0.1-0.2 px.  Weighted by their
    errors alone the brightest few would decide the field, and its
    extrapolation.  ``tau^2`` is the random-effect variance of the
    offsets about their weighted mean, per axis pooled
    (:func:`diffim.residuals.random_effect`, outliers left out); the fit
    then weights each pair by ``1 / (err^2 + tau^2)``.  A smooth field
    counts in ``tau`` here, which only makes the order choice more cautious.
    """
    w = 1.0 / err**2
    mean = (w[:, None] * d).sum(axis=0) / w.sum()
    tau2, _ = random_effect((d - mean).ravel(), np.repeat(err**2, 2), many_outliers=True)
    return tau2


def _order_scores(fits, union) -> list[float]:
    """R.m.s. normalised leave-one-out residual of each ``(coef, keep, loo)`` fit.

    Every fit is scored on the same pairs, ``union``: those that any of them kept.  A
    pair an order clipped counts with its residual from that order (capped at
    :data:`CLIP`, as a clipped pair is an outlier to it); scored on its own
    kept pairs only, a low order that clipped the pairs a gradient explains
    looked as good as the order that fits them (on the tiny test set, 20 of 23
    pairs at order 0: 1.46 against order 2's 1.41 on all 23, and one of two
    encodings of the same image chose order 0, 1.6 px off at a bright star).
    """
    return [float(np.sqrt(np.mean(np.minimum(loo[union] ** 2, CLIP ** 2)))) for _, _, loo in fits]


def fit_offset_field(pairs: dict, shape) -> OffsetField | None:
    """Polynomial field of the pairs' offsets ``x_science - x_template`` (pixels).

    Orders 0 to :data:`MAX_ORDER` are fitted (weights ``1 / (err^2 +
    tau^2)``, :func:`star_scatter`; clipped); the lowest order whose
    leave-one-out scatter (the r.m.s. of the error-normalised leave-one-out
    residuals, every order on the same pairs: :func:`_order_scores`) is within
    :data:`ORDER_GAIN` of the best wins.  (A robust scatter, 1.48 MAD, was
    tried first: on 40 pairs of a constant shift it chose order 1, on 80 of
    a quadratic field order 3; the overfitted terms then extrapolate to
    several tenths of a pixel at the image corners.)  None with fewer than
    :data:`MIN_PAIRS` pairs.
    """
    n = len(pairs["xs"])
    if n < MIN_PAIRS:
        return None
    ny, nx = shape
    centre, norm = ((nx - 1) / 2.0, (ny - 1) / 2.0), max(nx, ny) / 2.0
    x, y = pairs["xs"], pairs["ys"]
    d = np.column_stack([pairs["xs"] - pairs["xt"], pairs["ys"] - pairs["yt"]])
    tau2 = star_scatter(d, pairs["err"])
    w = 1.0 / (pairs["err"] ** 2 + tau2)
    fits = [(order, fit) for order in range(MAX_ORDER + 1)
            if (fit := _clipped_fit(x, y, d, w, order, centre, norm)) is not None]
    if not fits:
        return None
    union = np.any([keep for _, (_, keep, _) in fits], axis=0)
    scores = _order_scores([fit for _, fit in fits], union)
    best = min(scores)
    i = next(k for k, score in enumerate(scores) if score <= (1 + ORDER_GAIN) * best)
    order, (coef, keep, loo) = fits[i]
    logger.info("registration orders (leave-one-out scatter on %d pairs; pairs kept): %s",
                int(union.sum()),
                ", ".join(f"{o}: {s:.3f} ({f[1].sum()})" for (o, f), s in zip(fits, scores)))
    err = np.sqrt(pairs["err"][keep] ** 2 + tau2)
    field = OffsetField(coef=coef, order=order, centre=centre, norm=norm, n_pairs=n,
                        n_used=int(keep.sum()),
                        scatter_before=robust_std((d[keep] - np.median(d[keep], axis=0)).ravel()),
                        scatter_after=robust_std((loo[keep] * err[:, None]).ravel()))
    return replace(field, largest=field.max_offset(shape))


def register_to_template(science: Exposure, template: Exposure) -> OffsetField | None:
    """The science-minus-template offset field of two exposures on the same pixel grid.

    Candidate stars are the bright peaks of the template whose S/N in the
    *science* image's noise is at least :data:`MIN_STAR_SNR`
    (:func:`diffim.detect.bright_peaks`); pixels masked in either image
    (:data:`diffim.masks.BAD_FOR_FIT`) or non-finite are left out.  Returns
    None when too few stars are usable (:func:`fit_offset_field`).
    """
    if science.shape != template.shape:
        raise ValueError(f"science {science.shape} and template {template.shape} must be on "
                         "the same pixel grid")
    bad = (masks.any_set(science.mask, *masks.BAD_FOR_FIT)
           | masks.any_set(template.mask, *masks.BAD_FOR_FIT)
           | ~np.isfinite(science.image) | ~np.isfinite(template.image)
           | ~np.isfinite(science.variance) | ~np.isfinite(template.variance))
    psf = science.psf.at()
    xy = bright_peaks(template.image, science.variance, psf, bad, min_snr=MIN_STAR_SNR,
                      max_sources=MAX_STARS)
    pairs = star_pairs(science.image, science.variance, template.image, template.variance,
                       bad, psf, science.psf.fwhm(), xy)
    field = fit_offset_field(pairs, science.shape)
    if field is None:
        logger.info("registration to the template: %d star pairs, too few (need %d)",
                    len(pairs["xs"]), MIN_PAIRS)
    else:
        logger.info("registration to the template: %d of %d star pairs, order %d, offsets "
                    "%.3f px r.m.s. per axis before, %.3f after (leave-one-out), largest "
                    "correction %.3f px", field.n_used, field.n_pairs, field.order,
                    field.scatter_before, field.scatter_after, field.largest)
    return field


#: A field whose largest offset over the image is below this (pixels) is not applied.
MIN_CORRECTION = 0.005


def registered_wcs(science: Exposure, template: Exposure):
    """The science image's WCS corrected by :func:`register_to_template`.

    Returns ``(wcs, field)``: ``wcs`` is None when there is nothing to apply
    (too few stars, a field below :data:`MIN_CORRECTION` everywhere, or a
    composition :func:`diffim.astrometry.shifted_wcs` cannot represent), and
    ``field`` (or None) is what was measured.
    """
    field = register_to_template(science, template)
    if field is None or field.largest < MIN_CORRECTION:
        return None, field
    wcs = shifted_wcs(science.wcs, science.shape, field, min_order=field.order)
    if wcs is None:
        logger.warning("registration to the template: the corrected WCS is not representable "
                       "as TAN-SIP; the calexp's WCS is kept")
    return wcs, field


def header_cards(field: OffsetField | None, applied: bool) -> dict:
    """FITS keywords recording the registration (zeros when none was measured)."""
    if field is None:
        return {"REGAPPL": False, "REGNPAIR": 0, "REGORDER": -1, "REGRMS0": 0.0,
                "REGRMS": 0.0, "REGMAX": 0.0}
    return {"REGAPPL": bool(applied), "REGNPAIR": field.n_used, "REGORDER": field.order,
            "REGRMS0": field.scatter_before, "REGRMS": field.scatter_after,
            "REGMAX": field.largest}
