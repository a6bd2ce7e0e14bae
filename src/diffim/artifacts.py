"""DIASources that are not point sources in the science image (cosmic-ray residue).

The calexp stage masks cosmic rays pixel by pixel (:func:`diffim.defects.find_cosmic_rays`),
a test whose noise grows as the PSF gets sharper: at a FWHM below ~2 px a
cosmic-ray track of 7-10 sigma pixels passes it, and so does a faint track
of 2-5 sigma pixels at any sampling.  In the difference image (convolved by
the matching kernel) such a track looks like a faint transient.  In the
*science* image it does not: a track is narrower or longer than the PSF.

:func:`unresolved_artifacts` tests each positive, non-dipole DIASource there,
in two ways:

* goodness of fit: a weighted least-squares fit of the science PSF (free
  flux and position) to a stamp around the source, and the excess of its
  chi^2 over the degrees of freedom.  A real point source leaves an excess
  of order ``sqrt(2 nu)`` plus the PSF model's own error, a small fraction
  of its ``(S/N)^2``; a bright cosmic ray leaves a large fraction.
* likelihood ratio (:func:`sharp_track_preference`): the chi^2 of the best
  PSF model minus that of the best *sharp track* -- a segment 0-16 px long,
  0.5 px wide, at any angle -- each with a free amplitude and a constant.
  Against a specific alternative this has far more power than the
  goodness of fit: a track of 2-5 sigma pixels, invisible to the pixel
  test, prefers the track model by chi^2 = 36-81, while point sources
  prefer the PSF (measured on an independent simulator's images, see
  ``docs/quality.md``).

Both are applied only where the template shows nothing at the science
image's noise level (a variable star or a transient on a galaxy would be
judged against the wrong model) and never to negative sources or dipoles.

Conventions: arrays ``[y, x]``, pixel ``(0, 0)`` is the centre of the first
pixel, the science image and its variance in any one flux unit (and its square).
"""

from __future__ import annotations

import logging

import numpy as np
import pandas as pd
from scipy import ndimage, optimize, special

from . import masks
from .detect import inverse_variance_weights, paste, stamp_slices

logger = logging.getLogger(__name__)

#: Mask planes whose pixels are left out of the fit.
_SKIP_PLANES = ("NO_DATA", "BAD", "SAT", "CR", "EDGE")
#: Track models of :func:`sharp_track_preference`: lengths (px), number of
#: angles over [0, pi), Gaussian width (px) across (a deposit along a
#: cosmic ray's path, with the pixel response), and the trial centres
#: (offsets, px, from the DIASource position in x and in y) of the PSF and
#: of the tracks.  The PSF gets the wider search: the test is conservative.
TRACK_LENGTHS = (0.0, 2.0, 4.0, 7.0, 11.0, 16.0)
TRACK_ANGLES = 12
TRACK_SIGMA = 0.5
PSF_OFFSETS = (-1.0, -0.5, 0.0, 0.5, 1.0)
TRACK_OFFSETS = (-0.5, 0.0, 0.5)


def point_source_misfit(science, x: float, y: float, radius: int) -> tuple[float, float, int]:
    """PSF fit to a stamp: ``(chi2 excess over nu, (S/N)^2 of the fitted flux, nu)``.

    Parameters
    ----------
    science : Exposure
        Background-subtracted image, its variance, mask and PSF; pixels in
        :data:`_SKIP_PLANES` or not finite are left out.
    x, y : float
        Starting position (pixels); the fit moves it by at most 1.5 px.
    radius : int
        Half-size of the square stamp (pixels).

    Returns
    -------
    excess, snr2, nu : float, float, int
        ``chi2 - nu`` at the best position, the squared S/N of the fitted
        flux and the degrees of freedom (usable pixels - 3); NaNs and 0 if
        fewer than 8 pixels are usable.
    """
    sl = _region(science.shape, x, y, radius)
    if sl is None:
        return np.nan, np.nan, 0
    return _misfit(_stamp_data(science, sl), _core(science.psf, x, y, radius + 3), x, y)


def _region(shape, x: float, y: float, radius: int):
    """Image slices of the ``2 radius + 1`` stamp around ``(x, y)``, clipped to ``shape``
    (None if ``(x, y)`` is off the image)."""
    st = stamp_slices(shape, int(round(x)), int(round(y)), radius)
    return None if st is None else st[0]


def _stamp_data(science, sl):
    """Pixels and weights of the stamp ``sl``: ``(d, w, (y0, y1, x0, x1))``, flattened.

    ``w = 1 / variance``, 0 on pixels in :data:`_SKIP_PLANES` or not finite,
    where ``d`` is 0 too.
    """
    img = science.image[sl]
    bad = masks.any_set(science.mask[sl], *_SKIP_PLANES) | ~np.isfinite(img)
    w = inverse_variance_weights(science.variance[sl], bad).ravel()
    d = np.where(w > 0, img.ravel(), 0.0)
    return d, w, (sl[0].start, sl[0].stop, sl[1].start, sl[1].stop)


def _misfit(stamp, core, x: float, y: float) -> tuple[float, float, int]:
    """:func:`point_source_misfit` on a stamp (:func:`_stamp_data`), PSF ``core`` at ``(x, y)``."""
    d, w, (y0, y1, x0, x1) = stamp
    nu = int(np.count_nonzero(w)) - 3
    if nu < 5:
        return np.nan, np.nan, 0

    def fit(p):
        m = _placed(core, p[0], p[1], y0, y1, x0, x1)
        spp = float(np.sum(w * m * m))
        a = float(np.sum(w * m * d)) / spp if spp > 0 else 0.0
        return m, a, spp

    def resid(p):
        m, a, _ = fit(p)
        return np.sqrt(w) * (d - a * m)

    p0 = np.array([x, y], dtype=float)
    try:
        p = optimize.least_squares(resid, p0, bounds=(p0 - 1.5, p0 + 1.5), diff_step=1e-3,
                                   max_nfev=12).x
    except (ValueError, np.linalg.LinAlgError):
        p = p0
    m, a, spp = fit(p)
    chi2 = float(np.sum(w * (d - a * m) ** 2))
    return chi2 - nu, a * a * spp, nu


def _core(psf, x: float, y: float, half: int) -> np.ndarray:
    """Central ``2 half + 1`` pixels of the PSF model at ``(x, y)`` (zero-padded if larger)."""
    k = psf.at(x, y)
    h = k.shape[0] // 2
    if half > h:
        k = np.pad(k, half - h)
        h = half
    return k[h - half:h + half + 1, h - half:h + half + 1]


def _placed(core, x: float, y: float, y0: int, y1: int, x0: int, x1: int) -> np.ndarray:
    """``core`` shifted to ``(x, y)`` (cubic spline) and cut to ``[y0:y1, x0:x1]``, flattened.

    Only the few-pixel core is shifted (a full 41-px model made the test cost
    ~9 ms per source); it must cover the region from any trial position.
    """
    ix, iy = int(np.round(x)), int(np.round(y))
    k = ndimage.shift(core, (y - iy, x - ix), order=3, mode="constant")
    return paste(k, ix, iy, y0, y1, x0, x1)


def sharp_track_preference(science, x: float, y: float, radius: int) -> tuple[float, float]:
    """How much better a sharp track than the PSF fits a stamp of the science image.

    Both models get a free amplitude and a free constant (a local sky
    offset) and are tried at the centres ``(x, y) +`` :data:`PSF_OFFSETS`
    (:data:`TRACK_OFFSETS` for the tracks); the tracks are every length in
    :data:`TRACK_LENGTHS` at :data:`TRACK_ANGLES` angles
    (:func:`track_models`), with a positive amplitude.

    Parameters
    ----------
    science, radius
        As for :func:`point_source_misfit` (the exposure; the stamp's half-size).
    x, y : float
        DIASource position (pixels).

    Returns
    -------
    delta_chi2, snr2 : float
        ``chi2(best PSF) - chi2(best track)`` (positive: the track fits
        better) and the squared S/N of the best PSF fit's flux; NaNs if the
        stamp has fewer than 8 usable pixels.
    """
    sl = _region(science.shape, x, y, radius)
    if sl is None:
        return np.nan, np.nan
    d, w, (y0, y1, x0, x1) = _stamp_data(science, sl)
    if np.count_nonzero(w) < 8:
        return np.nan, np.nan
    core = _core(science.psf, x, y, radius + 3)
    psf = np.array([_placed(core, x + dx, y + dy, y0, y1, x0, x1)
                    for dy in PSF_OFFSETS for dx in PSF_OFFSETS])
    chi_psf, _, snr2 = _linear_fits(psf, d, w)
    yy, xx = np.mgrid[y0:y1, x0:x1]
    tracks = np.concatenate([track_models(xx.ravel() - x - dx, yy.ravel() - y - dy)
                             for dy in TRACK_OFFSETS for dx in TRACK_OFFSETS])
    chi_trk, amp_trk, _ = _linear_fits(tracks, d, w)
    chi_trk = np.where(amp_trk > 0, chi_trk, np.inf)
    best = int(np.argmin(chi_psf))
    return float(chi_psf[best] - chi_trk.min()), float(snr2[best])


def track_models(u: np.ndarray, v: np.ndarray) -> np.ndarray:
    """Straight tracks centred on ``(0, 0)``, sampled at offsets ``(u, v)`` (px).

    A segment of length ``L`` (:data:`TRACK_LENGTHS`; 0 is a point) along
    each of :data:`TRACK_ANGLES` directions, convolved with a circular
    Gaussian of :data:`TRACK_SIGMA` px.  Unnormalised (the fits' amplitudes
    are free).

    Returns
    -------
    ndarray (n_models, u.size)
    """
    theta = np.arange(TRACK_ANGLES) * np.pi / TRACK_ANGLES
    c, s = np.cos(theta)[:, None], np.sin(theta)[:, None]
    along, across = u * c + v * s, v * c - u * s
    sig = TRACK_SIGMA
    out = [np.exp(-0.5 * (u * u + v * v) / sig**2)[None]]
    for length in TRACK_LENGTHS:
        if length > 0:
            box = (special.ndtr((along + length / 2) / sig)
                   - special.ndtr((along - length / 2) / sig))
            out.append(box * np.exp(-0.5 * (across / sig) ** 2))
    return np.concatenate(out)


def _linear_fits(models: np.ndarray, d: np.ndarray, w: np.ndarray):
    """Weighted fits ``d ~ a m + c`` of each row ``m`` of ``models``.

    Returns ``(chi2, a, (S/N)^2 of a)`` per model; chi2 is inf for a
    degenerate model (zero, or constant over the usable pixels).
    """
    sw, swd, swdd = w.sum(), w @ d, w @ (d * d)
    swm = models @ w
    swmm = (models * models) @ w
    swmd = models @ (w * d)
    det = swmm * sw - swm * swm
    ok = det > 1e-12 * np.maximum(swmm * sw, 1e-300)
    det = np.where(ok, det, 1.0)
    a = (swmd * sw - swm * swd) / det
    c = (swmm * swd - swm * swmd) / det
    chi2 = np.where(ok, swdd - a * swmd - c * swd, np.inf)
    return chi2, a, np.where(ok, a * a * det / sw, 0.0)


def unresolved_artifacts(sources: pd.DataFrame, science, template_image: np.ndarray,
                         template_variance: np.ndarray, *, nsigma: float = 5.0,
                         min_fraction: float = 0.1, template_snr: float = 3.0,
                         min_delta_chi2: float = 25.0) -> np.ndarray:
    """Which DIASources are not point sources in the science image.

    Parameters
    ----------
    sources : DataFrame
        DIASources (``x``, ``y``, ``isNegative``, ``isDipole``) on the science
        image's pixel grid.
    science : Exposure
        The science exposure (image, variance, mask, PSF) in the flux unit of
        ``template_image``.
    template_image, template_variance : ndarray (ny, nx)
        The template on the same grid and its variance (NaN = no template).
    nsigma : float
        Goodness of fit: the PSF fit's chi^2 excess must exceed
        ``nsigma * sqrt(2 nu)``...
    min_fraction : float
        ... and ``min_fraction`` of the source's ``(S/N)^2`` in the science
        image (a real source's PSF-model error leaves well under 1 %).  The
        same fraction bounds the likelihood ratio.
    template_snr : float
        Sources where the template's PSF-weighted flux would show in the
        science image above this S/N (in the science image's noise) are not
        tested: there the science stamp holds a static source as well.  In
        the template's own noise a deep coadd's faint galaxy (0.1-0.2 sigma
        of a visit's noise per pixel) passed the cut, and a 47-sigma
        single-pixel hit and a partly masked cosmic-ray track on two
        independent-simulation images went untested.
    min_delta_chi2 : float
        Likelihood ratio: a source is also rejected when a sharp track fits
        it better than the PSF by more than this chi^2
        (:func:`sharp_track_preference`, on a stamp of +-2 FWHM) and by more
        than ``min_fraction`` of its ``(S/N)^2``.  25 is "5 sigma" for one
        parameter; the track model has a few more (length, angle), and a
        point source's own preference is measured below 10 (docs/quality.md).

    Returns
    -------
    ndarray of bool, one per row of ``sources``
    """
    out = np.zeros(len(sources), bool)
    if not len(sources):
        return out
    fwhm = science.psf.fwhm()
    radius = max(2, int(np.ceil(1.5 * fwhm)))
    track_radius = max(4, int(np.ceil(2.0 * fwhm)))
    candidates = ~sources["isNegative"].to_numpy(bool) & ~sources["isDipole"].to_numpy(bool)
    n_track = 0
    for i in np.flatnonzero(candidates):
        x, y = float(sources["x"].iloc[i]), float(sources["y"].iloc[i])
        sl = _region(science.shape, x, y, radius)
        if sl is None:
            continue
        core = _core(science.psf, x, y, radius + 3)
        stamp = _stamp_data(science, sl)
        m = _placed(core, x, y, *stamp[2])
        t_flux = _template_flux(template_image[sl], template_variance[sl], m)
        # the template's flux in the science stamp's noise (S/N^2 = f^2 sum(w P^2))
        if not np.isfinite(t_flux) or (t_flux > 0 and
                                       t_flux**2 * float(np.sum(stamp[1] * m * m))
                                       > template_snr**2):
            continue
        excess, snr2, nu = _misfit(stamp, core, x, y)
        if nu and excess > nsigma * np.sqrt(2.0 * nu) and excess > min_fraction * snr2:
            out[i] = True
            continue
        delta, snr2 = sharp_track_preference(science, x, y, track_radius)
        if delta > min_delta_chi2 and delta > min_fraction * snr2:
            out[i] = True
            n_track += 1
    logger.info("%d of %d positive DIASources are not point sources in the science image "
                "(cosmic-ray residue; %d of them by the track test)", int(out.sum()),
                int(candidates.sum()), n_track)
    return out


def _template_flux(img, var, m) -> float:
    """Template flux of the stamp ``img`` by a fit of the placed PSF ``m`` (flattened,
    :func:`_placed`) weighted by ``1 / var`` (NaN without template)."""
    bad = ~np.isfinite(img)
    w = inverse_variance_weights(var, bad).ravel()
    spp = float(np.sum(w * m * m))
    if spp <= 0:
        return np.nan
    return float(np.sum(w * m * np.where(bad, 0.0, img).ravel())) / spp
