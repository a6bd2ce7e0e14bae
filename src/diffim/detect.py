"""DIASource detection and measurement on a difference image.

Conventions (see :mod:`diffim`): arrays ``[y, x]``, pixel ``(0, 0)`` is the centre
of the first pixel; difference images in nJy per pixel, variance in nJy^2.

Detection
---------
The noise of a difference image is correlated when its template is a
PSF-matched coadd (the unconvolved term of a convolve-science subtraction) or
when the science image was convolved.  Its autocorrelation ``rho`` is measured
on ``D / sqrt(V)`` (:func:`noise_correlation`; a delta for white noise) and the
detection statistic is ZOGY's score for stationary noise of that spectrum:
``D`` correlated with ``h = F^-1[PSF_hat / P]`` (``P`` the Fourier transform of
``rho``; ``h = P`` for white noise), divided by its predicted noise
``sqrt(c (V * h^2))`` with ``c = Var(D * h) / (V sum h^2)`` computed from ``rho``
(:func:`detection_filter`).  ``V`` is the variance plane and ``D * h`` a
correlation.  Unusable pixels -- masked ``CR``, ``BAD``, ``SAT``,
``NO_DATA`` or ``NO_TEMPLATE``, or non-finite -- are left out of both sums (``D``
and ``V`` set to 0 there), and the significance is 0 on them, so such a pixel
can never be the peak of a DIASource: cosmic rays, bad columns and bleed
trails of the science exposure do not produce detections.  PSF-fit flux
errors are multiplied by the analogous factor for the PSF.  Because the
correlation is not the same over the whole image (the kernel varies, and so
does the share of the convolved image in the noise), the significance is then
calibrated locally: divided by a smooth surface fitted to its robust width in
tiles (:mod:`diffim.noisescale`), by which PSF-flux errors are multiplied
too.  An optional
empirical factor ``diff.meta["NOISECOR"]`` (:func:`filtered_noise_scale`,
~1 once the correlation is accounted for) multiplies both.

Footprints are the 8-connected regions with ``S > threshold`` (positive) or
``S < -threshold`` (negative).  Each footprint gives one source per peak: its
local maxima of ``|S|`` kept greedily from the brightest, at least
``min_separation_px`` apart (minimal deblending; the footprint's pixels are not
divided between peaks).

Measurement
-----------
* Centroid: the peak of ``|S|`` refined by a 1-D parabola through the 3 pixels
  along each axis (the maximum of the cross-correlation is the maximum
  likelihood position for a known PSF).  The filter does not renormalise for
  masked pixels, so a source with masked pixels within ``flag_radius_px`` is
  re-centred by a PSF fit to its unmasked pixels (position free within
  ``flag_radius_px``, flux linear).
* ``psfFlux``: linear least-squares amplitude of the PSF model (evaluated at the
  centroid, shifted to it with a cubic spline) over the ``K x K`` stamp with
  weights ``1 / V``; ``psfFluxErr = sqrt(c_psf / sum(P^2 / V))`` (``c_psf`` = 1
  for white noise, see Detection).  Masked pixels get zero weight.
* ``snr``: the detection significance at the peak (contract column);
  ``psfSnr = psfFlux / psfFluxErr``.
* Pixel flags from the mask over the footprint plus a disc of radius
  ``flag_radius_px`` (default one PSF FWHM) around the centroid:
  ``pixelFlags_edge`` if a pixel is within a PSF half-width (``K // 2``) of the
  border or has ``EDGE``; ``pixelFlags_saturated``: ``SAT``;
  ``pixelFlags_bad``: ``BAD``, ``NO_DATA``, ``NO_TEMPLATE`` or ``CR``.
* Dipoles: a positive and a negative source closer than ``dipole_max_sep_px``
  whose PSF fluxes differ by at most a factor ``dipole_flux_ratio`` are merged
  into one row with ``isDipole = True``: two PSFs with free positions and
  fluxes are fitted jointly (non-linear in the positions, started at the lobe
  centroids); ``psfFlux`` / ``psfFluxErr`` are the *positive lobe's* flux and
  error from that fit (``dipoleNegFlux`` / ``dipoleNegFluxErr`` the negative
  lobe's, ``dipoleSeparation`` the fitted lobe distance), ``x, y`` the midpoint
  of the fitted lobes, ``snr`` the larger lobe significance, ``isNegative =
  False``, flags the OR of both lobes.  A pair is merged only if the joint
  fit gives each lobe its sign and at least ``min_fit_fraction`` of its
  peak's significance (the point-like test of single peaks, applied to
  the lobes).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, replace

import numpy as np
import pandas as pd
from scipy import fft as sp_fft
from scipy import ndimage, optimize

from . import masks, noisescale
from .exposure import Exposure
from .noisescale import BlockMap, LocalNoiseScale
from .psf import moments_fwhm
from .kernel import bin_sum, dilate, fft_convolve
from .stats import inverse_variance_weights
from .residuals import (MAX_SOURCES, MIN_SOURCE_SNR, SPARSE_SOURCE_SNR, SPARSE_SOURCES,
                        Systematics, flux_per_filtered, measure_systematics,
                        systematic_variance)

logger = logging.getLogger(__name__)

#: Output columns and dtypes (contract columns first, then extras).
COLUMNS: dict[str, str] = {
    "x": "float64", "y": "float64", "psfFlux": "float64", "psfFluxErr": "float64",
    "snr": "float64", "isNegative": "bool", "isDipole": "bool",
    "pixelFlags_edge": "bool", "pixelFlags_saturated": "bool", "pixelFlags_bad": "bool",
    "psfSnr": "float64", "dipoleNegFlux": "float64", "dipoleNegFluxErr": "float64",
    "dipoleSeparation": "float64", "footprintArea": "int64",
}

#: Pixels that can never be the peak of a DIASource (and are left out of the filter).
NO_PEAK_PLANES = ("CR", "BAD", "SAT", "NO_DATA", "NO_TEMPLATE")
_BAD_FLAG_PLANES = ("BAD", "NO_DATA", "NO_TEMPLATE", "CR")
#: Pixels whose systematic residual variance exceeds this fraction of the
#: statistical one are not used to measure the local noise scale.
SYS_NOISE_FRACTION = 0.1
#: Smallest ``psfSnr / snr`` (PSF-fit S/N of the peak's sign over its detection
#: significance) of a kept DIASource (:func:`_point_like`).
MIN_FIT_FRACTION = 0.5
#: No DIASource is reported within this many FWHM of a saturated core or the
#: edge of the template's coverage (:func:`_saturation_halo`) ...
HALO_FWHM = 1.5
#: ... counting masked regions (``SAT`` or ``NO_TEMPLATE``) of at least this many pixels.
HALO_MIN_AREA = 100


def empty_catalog() -> pd.DataFrame:
    """An empty DIASource table with the columns and dtypes of :data:`COLUMNS`."""
    return pd.DataFrame({c: pd.Series(dtype=t) for c, t in COLUMNS.items()})


def significance_image(image: np.ndarray, variance: np.ndarray, psf: np.ndarray,
                       bad: np.ndarray | None = None, *,
                       extra_variance: np.ndarray | None = None) -> np.ndarray:
    """Matched-filter significance ``(D * P) / sqrt(V * P^2)`` (``*`` = correlation).

    Parameters
    ----------
    image, variance : ndarray (ny, nx)
        Image (any flux unit) and its variance (unit squared).
    psf : ndarray (K, K)
        PSF kernel, centred on ``(K // 2, K // 2)``.
    bad : ndarray of bool, optional
        Pixels left out of both sums; the significance is 0 on them.
    extra_variance : ndarray (ny, nx), optional
        Variance added to the *filtered* image's (``V * P^2``), e.g. the
        systematic terms of :func:`diffim.residuals.systematic_variance`.

    Returns
    -------
    ndarray (ny, nx) float32
        Significance in units of the noise sigma; 0 where undefined.
    """
    num, den, bad = _filtered(image, variance, psf, bad)
    if extra_variance is not None:
        den += extra_variance
    return _ratio(num, den, bad)


def _filtered(image, variance, psf, bad):
    """``D * P`` and ``V * P^2`` with unusable pixels left out (and the bad-pixel mask)."""
    bad = np.zeros(image.shape, bool) if bad is None else bad
    bad = bad | ~np.isfinite(image) | ~np.isfinite(variance) | (variance < 0)
    d = np.where(bad, np.float32(0), image.astype(np.float32, copy=False))
    v = np.where(bad, np.float32(0), variance.astype(np.float32, copy=False))
    p = np.asarray(psf, dtype=np.float32)[::-1, ::-1]
    num = fft_convolve(d, p)
    del d
    den = fft_convolve(v, p * p)
    return num, den, bad


def _ratio_floor(den, bad) -> float:
    """The tiny floor of ``den`` below which :func:`_ratio` gives 0."""
    sample = den[::4, ::4][~bad[::4, ::4]]  # every 16th pixel sets the floor
    return 1e-6 * float(np.median(sample)) if sample.size else 0.0


def _ratio(num, den, bad, floor: float | None = None) -> np.ndarray:
    """``num / sqrt(den)``, 0 on bad pixels and where ``den`` is below a tiny floor."""
    floor = _ratio_floor(den, bad) if floor is None else floor
    ok = (den > floor) & ~bad
    root = np.sqrt(den, where=ok, out=np.zeros_like(den))
    return np.divide(num, root, out=np.zeros(num.shape, dtype=np.float32), where=ok)


def label_peaks(sig: np.ndarray, threshold: float):
    """Regions ``sig > threshold``: peak value, peak (y, x) and bounding-box size each."""
    labels, n = ndimage.label(sig > threshold, structure=np.ones((3, 3)))
    slices = ndimage.find_objects(labels)
    peaks = np.empty(n)
    pos = np.empty((n, 2), dtype=int)
    ext = np.empty(n, dtype=int)
    # a loop over the (few thousand) regions is much faster than ndimage.maximum_position,
    # which sorts the whole label image
    for i, sl in enumerate(slices):
        sub = np.where(labels[sl] == i + 1, sig[sl], -np.inf)
        j = np.unravel_index(np.argmax(sub), sub.shape)
        peaks[i] = sub[j]
        pos[i] = (j[0] + sl[0].start, j[1] + sl[1].start)
        ext[i] = max(sl[0].stop - sl[0].start, sl[1].stop - sl[1].start)
    return peaks, pos, ext


def binned_significance(image: np.ndarray, variance: np.ndarray, psf: np.ndarray,
                        bad: np.ndarray, *, min_size: int = 2048) -> tuple[np.ndarray, int]:
    """:func:`significance_image` on ``f x f`` binned pixels, for finding bright peaks fast.

    ``f = 2`` for images of at least ``min_size`` pixels on a side, else 1;
    peak positions in the result times ``f`` are (to within ``f``) full-resolution
    positions.  ``bad`` pixels and non-finite image values count as 0.
    Returns ``(significance, f)``.
    """
    f = 2 if min(image.shape) >= min_size else 1
    if f > 1:
        psf = bin_sum(np.pad(psf, ((0, 1), (0, 1))), f)
        psf = np.pad(psf, ((0, 1), (0, 1))) if psf.shape[0] % 2 == 0 else psf
    image = np.asarray(image, np.float32)
    img = np.where(bad | ~np.isfinite(image), np.float32(0), image)
    var = np.where(bad, np.float32(0), np.asarray(variance, np.float32))
    return significance_image(bin_sum(img, f), bin_sum(var, f), psf, bin_sum(bad, f)), f


def refine_binned_peak(img: np.ndarray, x: int, y: int, f: int) -> tuple[int, int]:
    """Brightest full-resolution pixel of ``img`` near the peak ``(x, y)`` of ``f``-binned pixels."""
    if f == 1:
        return int(x), int(y)
    y0, x0 = max(y - 1, 0), max(x - 1, 0)
    sub = np.nan_to_num(img[y0:y + f + 1, x0:x + f + 1], nan=-np.inf)
    j = np.unravel_index(np.argmax(sub), sub.shape)
    return int(x0 + j[1]), int(y0 + j[0])


#: Peaks of :func:`bright_peaks` closer than this many PSF FWHMs to a brighter
#: one are the same source (or a blend that no disc fit separates).
PEAK_SEPARATION_FWHM = 2.0


def bright_peaks(scene: np.ndarray, variance: np.ndarray, psf: np.ndarray, bad: np.ndarray, *,
                 min_snr: float = MIN_SOURCE_SNR, max_sources: int = MAX_SOURCES,
                 significance: tuple[np.ndarray, int] | None = None) -> np.ndarray:
    """Integer ``(x, y)`` of the brightest peaks of ``scene``, brightest first.

    Peaks of the matched-filter significance of ``scene`` with ``variance``
    (:func:`binned_significance`; ``bad`` pixels and non-finite scene values
    count as 0; or the ``(map, binning)`` given as ``significance``) of at
    least ``min_snr``, at most ``max_sources`` of them, each at its brightest
    full-resolution pixel.  A peak within :data:`PEAK_SEPARATION_FWHM` PSF
    FWHMs of a brighter one is left out: a bright star whose core is masked
    (saturated) can break into two regions above ``min_snr``, which would
    count the same light twice.  Returns an ``(n, 2)`` int array.
    """
    if significance is None:  # (refine_binned_peak itself skips non-finite values)
        significance = binned_significance(scene, variance, psf, bad)
    sig, f = significance
    peaks, pos, _ = label_peaks(sig, min_snr)
    fwhm = moments_fwhm(psf)
    min_sep2 = (PEAK_SEPARATION_FWHM * fwhm) ** 2 if np.isfinite(fwhm) else 0.0
    xy = []
    for i in np.argsort(-peaks):
        x, y = refine_binned_peak(scene, int(pos[i, 1]) * f, int(pos[i, 0]) * f, f)
        if all((x - u) ** 2 + (y - v) ** 2 >= min_sep2 for u, v in xy):
            xy.append((x, y))
            if len(xy) == max_sources:
                break
    return np.array(xy, int).reshape(-1, 2)


#: Half-size (pixels) of the measured noise autocorrelation; the difference of
#: a visit and a PSF-matched coadd template is correlated over ~8 px (measured:
#: rho = 0.92, 0.51, 0.14, 0.00 at lags 1, 3, 5, 7 px).
NOISE_CORR_RADIUS = 15
#: Relative floor of the noise power in the detection filter: frequencies where
#: the difference has less noise than this (and no PSF power) are not boosted.
_POWER_FLOOR = 1e-2


def _normalised_noise(diff: Exposure, bad, y0: int, x0: int, ty: int, tx: int,
                      clip: float, grow: int = 3):
    """``z = diff / sqrt(variance)`` on one tile, 0 off the usable noise pixels, and that mask.

    Sources (``|z| > clip``) are left out with ``grow`` px around them; the tile
    is cut with that margin so that the result equals the whole-image one.
    Returns ``(z float64, mask float64)`` of shape ``(ty, tx)``.
    """
    ny, nx = diff.image.shape
    ya, yb = max(y0 - grow, 0), min(y0 + ty + grow, ny)
    xa, xb = max(x0 - grow, 0), min(x0 + tx + grow, nx)
    img, var, b = (a[ya:yb, xa:xb] for a in (diff.image, diff.variance, bad))
    with np.errstate(invalid="ignore", divide="ignore"):
        z = np.where(b | ~(var > 0), 0.0, img / np.sqrt(var))
    good = (~b) & (var > 0) & np.isfinite(z)
    good &= ~ndimage.maximum_filter(np.abs(z) > clip, size=2 * grow + 1)
    inner = (slice(y0 - ya, y0 - ya + ty), slice(x0 - xa, x0 - xa + tx))
    return (np.where(good, z, 0.0)[inner].astype(np.float64),
            good[inner].astype(np.float64))


def noise_correlation(diff: Exposure, *, radius: int = NOISE_CORR_RADIUS, clip: float = 4.0,
                      tile: int = 512, max_tiles: int = 16) -> np.ndarray:
    """Measured autocorrelation of the noise of ``z = diff / sqrt(variance)``.

    ``z`` (normalised, so that spatial changes of the noise level do not weigh
    in) is masked on unusable pixels and on sources (``|z| > clip``, grown by
    3 px), and its autocorrelation is estimated with the masked estimator
    ``sum z(x) z(x+l) / sum M(x) M(x+l)`` (FFT, zero padded), summed over up
    to ``max_tiles`` tiles of ``tile`` pixels spread over the image (~0.1 s
    whatever the image size), each at least 10 % usable.  When none of them
    is (a template covering a corner of the visit), every tile of a tiling of
    the whole image with at least :data:`MIN_CORR_TILE_PIXELS` usable pixels
    is summed instead.  On the synthetic convolve-science scene it
    matches the analytic correlation of the difference to 0.01.  The result is
    tapered (cosine over the outer third of ``radius``) so that its Fourier
    transform, the noise power spectrum, is smooth.

    Returns
    -------
    ndarray (2 radius + 1, 2 radius + 1)
        ``rho[l_y + radius, l_x + radius]``, 1 at zero lag; a delta for white
        noise or when no noise can be measured.
    """
    bad = _bad_pixels(diff)
    rho = np.zeros((2 * radius + 1, 2 * radius + 1))
    rho[radius, radius] = 1.0
    ny, nx = diff.image.shape
    ty, tx = min(tile, ny), min(tile, nx)
    nt = max(1, int(np.sqrt(max_tiles)))
    ys = np.unique(np.linspace(0, ny - ty, min(nt, max(1, ny // ty))).astype(int))
    xs = np.unique(np.linspace(0, nx - tx, min(nt, max(1, nx // tx))).astype(int))
    n = (sp_fft.next_fast_len(ty + radius, real=True), sp_fft.next_fast_len(tx + radius, real=True))
    num, den = _masked_autocorrelation(diff, bad, [(y, x) for y in ys for x in xs], (ty, tx), n,
                                       clip, min_usable=0.1 * ty * tx)
    if not den[0, 0] > 0:  # no spread tile is usable enough: every tile with some noise
        ys = np.unique(np.minimum(np.arange(0, ny, ty), ny - ty))
        xs = np.unique(np.minimum(np.arange(0, nx, tx), nx - tx))
        num, den = _masked_autocorrelation(diff, bad, [(y, x) for y in ys for x in xs], (ty, tx),
                                           n, clip, min_usable=MIN_CORR_TILE_PIXELS)
    if not den[0, 0] > 0 or not num[0, 0] > 0.05 * den[0, 0]:
        return rho   # (almost) no noise where the variance plane predicts some
    lags = np.arange(-radius, radius + 1)
    acf = num[np.ix_(lags % n[0], lags % n[1])] / np.maximum(
        den[np.ix_(lags % n[0], lags % n[1])], 1.0)
    acf /= acf[radius, radius]
    a = np.abs(lags) / max(radius, 1)
    w1 = np.where(a <= 2 / 3, 1.0, 0.5 + 0.5 * np.cos(np.pi * (a - 2 / 3) * 3))
    return acf * np.outer(w1, w1)


#: Usable pixels a tile needs for :func:`noise_correlation`'s second pass.
MIN_CORR_TILE_PIXELS = 1000


def _masked_autocorrelation(diff, bad, corners, tile_shape, n, clip, *, min_usable):
    """Sums ``(num, den)`` of the masked autocorrelation estimator over tiles.

    ``corners`` are the tiles' ``(y0, x0)``; a tile with fewer than
    ``min_usable`` usable pixels is skipped.  Arrays of shape ``n`` (FFT grid).
    """
    ty, tx = tile_shape
    num = np.zeros(n)
    den = np.zeros(n)
    with sp_fft.set_workers(2):
        for y0, x0 in corners:
            zz, mm = _normalised_noise(diff, bad, y0, x0, ty, tx, clip)
            if mm.sum() < min_usable:
                continue
            zz = np.where(mm > 0, zz - zz[mm > 0].mean(), 0.0)
            num += sp_fft.irfft2(np.abs(sp_fft.rfft2(zz, s=n)) ** 2, s=n)
            den += sp_fft.irfft2(np.abs(sp_fft.rfft2(mm, s=n)) ** 2, s=n)
    return num, den


def _on_grid(kernel: np.ndarray, n: int) -> np.ndarray:
    """``kernel`` (odd, centred) on an ``n x n`` periodic grid with its centre at [0, 0]."""
    g = np.zeros((n, n))
    h = kernel.shape[0] // 2
    g[:kernel.shape[0], :kernel.shape[1]] = kernel
    return np.roll(g, (-h, -h), axis=(0, 1))


def detection_filter(psf: np.ndarray, rho: np.ndarray) -> tuple[np.ndarray, float, float]:
    """Optimal detection filter for noise with correlation ``rho``, and two noise factors.

    For stationary noise of power spectrum ``P`` (Fourier transform of
    ``rho``), the likelihood-ratio detection statistic of a point source is the
    image correlated with ``h = F^-1[PSF_hat / P]`` (ZOGY's score image; the
    plain matched filter ``h = PSF`` for white noise).  ``P`` is floored at
    ``1e-2 P(0)``: there the PSF has no power left, and the floor only keeps
    the filter finite where ``P`` is poorly measured.

    Returns
    -------
    h : ndarray (K, K)
        The filter, unit sum.
    c_filter : float
        ``Var(D * h) / (var sum h^2)``: the filtered image's noise variance
        relative to the white-noise prediction from the per-pixel variance.
    c_psf : float
        The same for the PSF itself: the factor on the variance of a PSF-fit
        flux with per-pixel weights.
    """
    k = psf.shape[0]
    n = sp_fft.next_fast_len(4 * max(k, rho.shape[0]))
    power = np.real(np.fft.fft2(_on_grid(rho, n)))
    p_hat = np.fft.fft2(_on_grid(psf, n))
    h_hat = p_hat / np.maximum(power, _POWER_FLOOR * power[0, 0])
    h = np.fft.fftshift(np.real(np.fft.ifft2(h_hat)))
    c = n // 2
    h = h[c - k // 2:c + k // 2 + 1, c - k // 2:c + k // 2 + 1]
    h = h / h.sum()
    h2 = np.abs(np.fft.fft2(_on_grid(h, n))) ** 2
    pp2 = np.abs(p_hat) ** 2
    c_filter = float((h2 * power).sum() / h2.sum())
    c_psf = float((pp2 * power).sum() / pp2.sum())
    return h, max(c_filter, 1e-6), max(c_psf, 1e-6)


def filtered_noise_scale(diff: Exposure, *, clip: float = 4.0, n_iter: int = 3) -> float:
    """Ratio of the measured to the predicted noise of the detection significance.

    The significance (:func:`detection_significance`) already accounts for the
    measured noise correlation (:func:`noise_correlation`), so this is ~1; it
    is the robust standard deviation (1.4826 MAD, iteratively clipped at
    ``clip`` sigma, so sources barely matter) of the significance over usable
    pixels, a check and a last empirical correction.  Detection and PSF
    photometry scale their errors by it when the caller stores it in
    ``diff.meta["NOISECOR"]``.
    """
    bad = _bad_pixels(diff)
    sig = detection_significance(diff)
    values = sig[(~bad) & (sig != 0)][::7]  # every 7th pixel: plenty, and fast
    if values.size < 100:
        return 1.0
    scale = noisescale.robust_width(values.astype(np.float64), clip=clip, n_iter=n_iter)
    return scale if np.isfinite(scale) and scale > 0 else 1.0


@dataclass(frozen=True)
class NoiseTerms:
    """The detection filter, noise factors and systematic terms of one difference image.

    Measured once per difference (:func:`noise_terms`, ~0.1-0.3 s) and passed
    to :func:`detection_significance`, :func:`detect_dia_sources` and
    :func:`forced_psf_photometry` so that they agree and do not re-measure.

    Attributes
    ----------
    filter : ndarray (K, K)
        Detection filter ``h`` (unit sum) of :func:`detection_filter`.
    c_filter, c_psf : float
        Variance factors of the filtered image and of PSF fits (including
        ``diff.meta["NOISECOR"]`` squared when set).
    systematics : Systematics
        Residual level at static sources (:mod:`diffim.residuals`); it enters
        wherever a ``scene`` (the template) is given.
    local_scale : LocalNoiseScale or None
        Spatial calibration of the significance (:mod:`diffim.noisescale`):
        measured by :func:`significance_maps` when None, or given (read back
        from a difference image's header) so that forced photometry uses the
        detection's.
    template_share : BlockMap or None
        The template's share of the per-pixel variance
        (:attr:`diffim.subtract.SubtractionResult.template_share`); the local
        scale follows it (:func:`diffim.noisescale.fit_share`).
    """

    filter: np.ndarray
    c_filter: float
    c_psf: float
    systematics: Systematics = Systematics()
    local_scale: LocalNoiseScale | None = None
    template_share: BlockMap | None = None


def noise_terms(diff: Exposure, scene: np.ndarray | None = None, *,
                systematics: Systematics | None = None,
                local_scale: LocalNoiseScale | None = None,
                template_share: BlockMap | None = None) -> NoiseTerms:
    """Measure the noise correlation of ``diff`` and derive its :class:`NoiseTerms`.

    With ``scene`` (the static scene: the template on the difference's pixel
    grid, any flux scale), the systematic residual terms are measured too
    (:func:`diffim.residuals.measure_systematics`) unless ``systematics`` gives
    them (e.g. read back from a difference image's header), on the scene's
    peaks above S/N :data:`~diffim.residuals.MIN_SOURCE_SNR`, or in a sparse
    image with fewer than :data:`~diffim.residuals.SPARSE_SOURCES` of them on
    its brightest ``SPARSE_SOURCES`` above
    :data:`~diffim.residuals.SPARSE_SOURCE_SNR` (with their flux factor,
    :func:`diffim.residuals.flux_factor`).  ``local_scale``
    (read back from such a header) is kept as given; without it
    :func:`significance_maps` measures one, following ``template_share``
    (:attr:`diffim.subtract.SubtractionResult.template_share`) when given.
    """
    _check_diff(diff)
    rho = noise_correlation(diff)
    h, c_filter, c_psf = detection_filter(diff.psf.at(), rho)
    extra = float(diff.meta.get("NOISECOR", 1.0)) ** 2
    terms = NoiseTerms(filter=h, c_filter=c_filter * extra, c_psf=c_psf * extra,
                       local_scale=local_scale, template_share=template_share)
    if systematics is not None:
        return replace(terms, systematics=systematics)
    if scene is None:
        return terms
    _check_scene(diff, scene)
    bad = _bad_pixels(diff)
    scene_sig = binned_significance(scene, diff.variance, diff.psf.at(), bad)
    xy = bright_peaks(scene, diff.variance, diff.psf.at(), bad, significance=scene_sig)
    if len(xy) < SPARSE_SOURCES:
        xy = bright_peaks(scene, diff.variance, diff.psf.at(), bad, min_snr=SPARSE_SOURCE_SNR,
                          max_sources=SPARSE_SOURCES, significance=scene_sig)
    del scene_sig
    radius = int(min(np.ceil(1.5 * diff.psf.fwhm()), diff.psf.kernel_size // 2))
    sys = measure_systematics(diff.image, diff.variance, bad, scene, h, terms.c_filter, rho,
                              xy, radius=radius, wing_sigma=diff.psf.fwhm(),
                              psf=diff.psf.at(), c_psf=terms.c_psf)
    return replace(terms, systematics=sys)


def _check_scene(diff: Exposure, scene) -> None:
    if np.shape(scene) != diff.shape:
        raise ValueError(f"scene {np.shape(scene)} and difference {diff.shape} must be on the "
                         "same pixel grid")


def systematic_variance_map(noise: NoiseTerms, scene: np.ndarray | None) -> np.ndarray | None:
    """Systematic variance of the filtered difference (None without scene or terms)."""
    if scene is None or not noise.systematics.active:
        return None
    return systematic_variance(scene, noise.filter, noise.systematics)


@dataclass(frozen=True)
class Significance:
    """Detection significance of a difference image (sigma units).

    Attributes
    ----------
    image : ndarray (ny, nx) float32
        ``(D * h) / sqrt(c (V * h^2) + V_sys)``: what is thresholded, with the
        systematic residual variance ``V_sys`` at static sources.
    statistical : ndarray (ny, nx) float32
        The same without ``V_sys``.  Peaks and centroids are taken on it: a
        variable star's ``image`` peaks on a ring where ``V_sys`` stops
        dominating, not at the star.
    systematic : ndarray (ny, nx) float32 or None
        ``V_sys`` itself (None without systematic terms); measurement adds
        it to the PSF-flux errors.
    local_scale : LocalNoiseScale
        The spatial noise calibration both images are divided by
        (:mod:`diffim.noisescale`); PSF-flux errors are multiplied by it.
    """

    image: np.ndarray
    statistical: np.ndarray
    systematic: np.ndarray | None = None
    local_scale: LocalNoiseScale | None = None


def significance_maps(diff: Exposure, noise: NoiseTerms | None = None,
                      scene: np.ndarray | None = None, *,
                      sys_variance: np.ndarray | None = None) -> Significance:
    """Both :class:`Significance` images of ``diff`` (one filtering for both).

    ``h`` and ``c`` are the filter and factor of :func:`detection_filter` for
    the measured noise correlation (the plain matched filter for white noise,
    ZOGY's score for a difference with a correlated-noise coadd template);
    ``V_sys`` is the systematic residual variance at static sources
    (:mod:`diffim.residuals`; only with ``scene`` or a precomputed
    ``sys_variance``).  0 on unusable pixels.  ``noise`` (from
    :func:`noise_terms`) is measured here when not given.  The statistical
    variance ``c (V * h^2)`` is multiplied by the square of the local noise
    scale (``noise.local_scale``, else measured here on the statistical
    significance where ``V_sys`` is under :data:`SYS_NOISE_FRACTION` of it).
    """
    noise = noise_terms(diff, scene) if noise is None else noise
    if sys_variance is None:
        sys_variance = systematic_variance_map(noise, scene)
    num, den, bad = _filtered(diff.image, diff.variance * np.float32(noise.c_filter),
                              noise.filter, _bad_pixels(diff))
    scale = noise.local_scale
    if scale is None:  # measured on the sampled pixels only
        grid = noisescale.SampleGrid.for_shape(diff.shape)
        num_s, den_s, bad_s = grid.take(num), grid.take(den), grid.take(bad)
        usable = ~bad_s & (den_s > 0)
        if sys_variance is not None:  # static-source residuals are not noise
            usable &= grid.take(sys_variance) < np.float32(SYS_NOISE_FRACTION) * den_s
        stat_s = _ratio(num_s, den_s, bad_s, _ratio_floor(den, bad))
        scale = noisescale.measure(stat_s, usable, grid, share=noise.template_share)
    den *= scale.image() ** 2
    stat = _ratio(num, den, bad)
    if sys_variance is None:
        return Significance(image=stat, statistical=stat, local_scale=scale)
    den += sys_variance
    return Significance(image=_ratio(num, den, bad), statistical=stat,
                        systematic=sys_variance, local_scale=scale)


def detection_significance(diff: Exposure, noise: NoiseTerms | None = None,
                           scene: np.ndarray | None = None) -> np.ndarray:
    """The thresholded detection significance, :attr:`Significance.image` (sigma units)."""
    return significance_maps(diff, noise, scene).image


def _scaled(diff: Exposure, factor: float) -> Exposure:
    """The difference image with its variance multiplied by ``factor``.

    The scaled variance is used only for PSF-filtered quantities (PSF-fit flux
    errors); the stored variance plane is the per-pixel variance.
    """
    if factor == 1.0:
        return diff
    return Exposure(image=diff.image, variance=diff.variance * np.float32(factor),
                    mask=diff.mask, wcs=diff.wcs, psf=diff.psf, meta=diff.meta)


def _peaks_in_footprints(sig: np.ndarray, peak_sig: np.ndarray, threshold: float,
                         min_sep: float):
    """Footprints of ``sig > threshold`` and their peaks (local maxima of ``peak_sig``).

    Returns ``labels``, ``slices`` and a list of ``(iy, ix, peak_sig value, label)``.
    """
    labels, n = ndimage.label(sig > threshold, structure=np.ones((3, 3), dtype=int))
    slices = ndimage.find_objects(labels)
    peaks = []
    r = max(1, int(np.floor(min_sep)))
    for lab, sl in enumerate(slices, start=1):
        sub = np.where(labels[sl] == lab, peak_sig[sl], -np.inf)
        iy, ix = np.unravel_index(np.argmax(sub), sub.shape)
        if sub.size <= 9 or max(sub.shape) <= min_sep:
            peaks.append((iy + sl[0].start, ix + sl[1].start, float(sub[iy, ix]), lab))
            continue
        mf = ndimage.maximum_filter(sub, size=2 * r + 1, mode="constant", cval=-np.inf)
        ys, xs = np.nonzero((sub == mf) & np.isfinite(sub))
        order = np.argsort(-sub[ys, xs])
        kept = []
        for y, x in zip(ys[order], xs[order]):
            if all((y - ky) ** 2 + (x - kx) ** 2 >= min_sep**2 for ky, kx in kept):
                kept.append((y, x))
        peaks.extend((y + sl[0].start, x + sl[1].start, float(sub[y, x]), lab) for y, x in kept)
    return labels, slices, peaks


def _refine_peak(sig: np.ndarray, iy: int, ix: int) -> tuple[float, float]:
    """Sub-pixel peak of ``sig`` by a parabola through 3 pixels along each axis."""
    ny, nx = sig.shape

    def offset(fm, f0, fp):
        den = fm - 2.0 * f0 + fp
        if den >= 0:
            return 0.0
        return float(np.clip(0.5 * (fm - fp) / den, -0.5, 0.5))

    dx = offset(sig[iy, ix - 1], sig[iy, ix], sig[iy, ix + 1]) if 0 < ix < nx - 1 else 0.0
    dy = offset(sig[iy - 1, ix], sig[iy, ix], sig[iy + 1, ix]) if 0 < iy < ny - 1 else 0.0
    return ix + dx, iy + dy


def _shifted_psf(psf, x: float, y: float) -> tuple[np.ndarray, int, int]:
    """PSF model at ``(x, y)`` shifted to the sub-pixel position; with its integer centre."""
    ix, iy = int(np.round(x)), int(np.round(y))
    k = psf.at(x, y)
    k = ndimage.shift(k, (y - iy, x - ix), order=3, mode="constant")
    return k, ix, iy


def stamp_slices(shape, ix: int, iy: int, h: int):
    """Slices of the image and of a ``2h+1`` stamp centred on ``(ix, iy)``, clipped."""
    ny, nx = shape
    y0, y1 = max(iy - h, 0), min(iy + h + 1, ny)
    x0, x1 = max(ix - h, 0), min(ix + h + 1, nx)
    if y0 >= y1 or x0 >= x1:
        return None
    img = (slice(y0, y1), slice(x0, x1))
    stp = (slice(y0 - iy + h, y1 - iy + h), slice(x0 - ix + h, x1 - ix + h))
    return img, stp


def _psf_fit(image, variance, bad, psf, x: float, y: float) -> tuple[float, float]:
    """Weighted least-squares PSF amplitude at ``(x, y)``: flux and error (image units)."""
    k, ix, iy = _shifted_psf(psf, x, y)
    st = stamp_slices(image.shape, ix, iy, k.shape[0] // 2)
    if st is None:
        return np.nan, np.nan
    img_sl, stp_sl = st
    p = k[stp_sl]
    w = inverse_variance_weights(variance[img_sl], bad[img_sl])
    d = np.where(w > 0, image[img_sl], 0.0)
    spp = float((w * p * p).sum())
    if spp <= 0:
        return np.nan, np.nan
    return float((w * p * d).sum() / spp), float(1.0 / np.sqrt(spp))


def _masked_near(bad: np.ndarray, x: float, y: float, radius: float) -> bool:
    """Whether any masked pixel lies within ``radius`` (pixels) of ``(x, y)``."""
    r = int(np.ceil(radius))
    ix, iy = int(round(x)), int(round(y))
    sub = bad[max(iy - r, 0):iy + r + 1, max(ix - r, 0):ix + r + 1]
    if not sub.any():
        return False
    yy, xx = np.nonzero(sub)
    return bool(((xx + max(ix - r, 0) - x) ** 2 + (yy + max(iy - r, 0) - y) ** 2
                 <= radius**2).any())


def _bounds_in_image(p0: np.ndarray, shift: float, shape) -> tuple | None:
    """Bounds ``p0 +- shift`` on positions ``(x, y, x, y, ...)``, cut to the image.

    None when ``p0`` itself lies outside the image (nothing to fit).
    """
    top = np.resize([shape[1] - 1.0, shape[0] - 1.0], p0.size)
    lo, hi = np.maximum(p0 - shift, 0.0), np.minimum(p0 + shift, top)
    if not np.all((lo <= p0) & (p0 <= hi) & (lo < hi)):
        return None
    return lo, hi


def _fit_position(image, variance, bad, psf, x: float, y: float,
                  max_shift: float) -> tuple[float, float]:
    """Maximum-likelihood position of a single PSF near ``(x, y)`` (unmasked pixels).

    The peak of the significance image is biased away from masked pixels that
    cover part of a source (the masked side adds nothing to the filter), so
    sources with masked pixels in their core are re-centred by a weighted
    least-squares PSF fit with the flux solved linearly at each step
    (``scipy.optimize.least_squares``, within ``max_shift`` pixels and inside
    the image).  Returns the starting position when the fit fails.
    """
    h = psf.kernel_size // 2
    x0, x1 = max(int(x) - h, 0), min(int(x) + h + 2, image.shape[1])
    y0, y1 = max(int(y) - h, 0), min(int(y) + h + 2, image.shape[0])
    sl = (slice(y0, y1), slice(x0, x1))
    sw = np.sqrt(inverse_variance_weights(variance[sl], bad[sl]).ravel())
    d = np.where(sw > 0, image[sl].ravel(), 0.0) * sw

    def resid(p):
        a = _place(psf, p[0], p[1], y0, y1, x0, x1) * sw
        aa = float(a @ a)
        return d - (float(a @ d) / aa) * a if aa > 0 else d

    p0 = np.array([x, y], float)
    bounds = _bounds_in_image(p0, max_shift, image.shape)
    if bounds is None:
        return x, y
    try:
        sol = optimize.least_squares(resid, p0, bounds=bounds, diff_step=1e-3, max_nfev=100)
    except (ValueError, np.linalg.LinAlgError):
        return x, y
    return (float(sol.x[0]), float(sol.x[1])) if np.all(np.isfinite(sol.x)) else (x, y)


def _place(psf, x: float, y: float, y0: int, y1: int, x0: int, x1: int) -> np.ndarray:
    """PSF at ``(x, y)`` (sub-pixel shifted) placed into the region ``[y0:y1, x0:x1]``."""
    k, ix, iy = _shifted_psf(psf, x, y)
    return paste(k, ix, iy, y0, y1, x0, x1)


def paste(k: np.ndarray, ix: int, iy: int, y0: int, y1: int, x0: int, x1: int) -> np.ndarray:
    """Odd kernel ``k`` centred on pixel ``(ix, iy)``, cut to ``[y0:y1, x0:x1]``, flattened."""
    h = k.shape[0] // 2
    m = np.zeros((y1 - y0, x1 - x0))
    ya, xa = iy - h - y0, ix - h - x0
    ys = slice(max(ya, 0), min(ya + k.shape[0], m.shape[0]))
    xs = slice(max(xa, 0), min(xa + k.shape[1], m.shape[1]))
    if ys.start < ys.stop and xs.start < xs.stop:
        m[ys, xs] = k[ys.start - ya:ys.stop - ya, xs.start - xa:xs.stop - xa]
    return m.ravel()


def _dipole_fit(image, variance, bad, psf, xy_pos, xy_neg):
    """Dipole model: two PSFs with free positions and fluxes, fitted jointly.

    The lobe peaks of the matched-filter image lie farther apart than the true
    positions when the PSFs overlap, so the positions are refined by a
    non-linear least-squares fit (``scipy.optimize.least_squares``, positions
    within 3 px of the starting lobe centroids and inside the image) with the
    two fluxes solved linearly at each step.  Returns ``(f_pos, err_pos, f_neg, err_neg, (xp, yp),
    (xn, yn))``; fluxes NaN if the fit is singular.
    """
    h = psf.kernel_size // 2
    xs = (xy_pos[0], xy_neg[0])
    ys = (xy_pos[1], xy_neg[1])
    x0, x1 = max(int(min(xs)) - h, 0), min(int(max(xs)) + h + 2, image.shape[1])
    y0, y1 = max(int(min(ys)) - h, 0), min(int(max(ys)) + h + 2, image.shape[0])
    sl = (slice(y0, y1), slice(x0, x1))
    w = inverse_variance_weights(variance[sl], bad[sl]).ravel()
    d = np.where(w > 0, image[sl].ravel(), 0.0)
    sw = np.sqrt(w)

    def linear(p):
        a = np.array([_place(psf, p[0], p[1], y0, y1, x0, x1),
                      _place(psf, p[2], p[3], y0, y1, x0, x1)])
        mat = (a * w) @ a.T
        cov = np.linalg.pinv(mat)
        f = cov @ ((a * w) @ d)
        return a, f, cov

    def resid(p):
        a, f, _ = linear(p)
        return sw * (d - f @ a)

    p0 = np.array([xy_pos[0], xy_pos[1], xy_neg[0], xy_neg[1]], dtype=float)
    bounds = _bounds_in_image(p0, 3.0, image.shape)
    p = p0
    if bounds is not None:  # (None: a lobe starts outside the image)
        try:
            p = optimize.least_squares(resid, p0, bounds=bounds, diff_step=1e-3,
                                       max_nfev=200).x
        except (ValueError, np.linalg.LinAlgError):
            p = p0
    _, f, cov = linear(p)
    err = np.sqrt(np.clip(np.diag(cov), 0, None))
    if not np.all(np.isfinite(f)):
        return np.nan, np.nan, np.nan, np.nan, (p[0], p[1]), (p[2], p[3])
    return float(f[0]), float(err[0]), float(f[1]), float(err[1]), (p[0], p[1]), (p[2], p[3])


def _flags(mask: np.ndarray, labels: np.ndarray, sl, lab: int, x: float, y: float,
           radius: float, edge_width: int) -> tuple[bool, bool, bool]:
    """(edge, saturated, bad) from the footprint plus a disc around ``(x, y)``.

    ``labels`` None: the disc alone (``sl`` and ``lab`` unused).
    """
    ny, nx = mask.shape
    r = int(np.ceil(radius))
    if labels is None:
        sl = (slice(int(y), int(y) + 1), slice(int(x), int(x) + 1))
    y0 = max(min(sl[0].start, int(y) - r), 0)
    y1 = min(max(sl[0].stop, int(y) + r + 2), ny)
    x0 = max(min(sl[1].start, int(x) - r), 0)
    x1 = min(max(sl[1].stop, int(x) + r + 2), nx)
    yy, xx = np.mgrid[y0:y1, x0:x1]
    region = (xx - x) ** 2 + (yy - y) ** 2 <= radius**2
    if labels is not None:
        region |= labels[y0:y1, x0:x1] == lab
    m = np.bitwise_or.reduce(mask[y0:y1, x0:x1][region]) if region.any() else 0
    near_border = ((xx[region] < edge_width) | (yy[region] < edge_width)
                   | (xx[region] >= nx - edge_width) | (yy[region] >= ny - edge_width)).any()
    edge = bool(near_border or (m & masks.bit("EDGE")))
    sat = bool(m & masks.bit("SAT"))
    bad = bool(m & masks.bits(*_BAD_FLAG_PLANES))
    return edge, sat, bad


def variable_scene_sources(systematics: Systematics, threshold: float) -> np.ndarray:
    """Bright static sources whose flux changed: rows ``x, y, S_f, a, z`` (:class:`Systematics`).

    ``z`` is the significance of the source's flux change, fitted on the
    filtered difference with the shift and width terms beside it and
    compared with the other sources' scatter
    (:func:`diffim.residuals.measure_systematics`).  Rows with ``|z| >=
    threshold``.  The systematic variance that keeps a bright star's
    residuals from being detected also sums the shift, width and wing
    terms, which change no flux; at a variable star they can hide a change
    that its own amplitude shows at 10-25 sigma (7 variable stars missed on
    an independent simulation, at 13-32 sigma statistical and 2.3-4.4
    sigma with those terms).
    """
    src = systematics.sources
    if src is None or len(src) == 0:
        return np.zeros((0, 5))
    return src[np.abs(src[:, 4]) >= threshold]


def _variable_star_rows(diff: Exposure, sig: Significance, bad: np.ndarray,
                        systematics: Systematics, rows: list[dict], threshold: float,
                        min_sep: float, flag_radius: float, per_filtered: float) -> list[dict]:
    """``rows`` with DIASources added at variable static sources not yet found.

    The sources are :func:`variable_scene_sources`.  A row within ``min_sep``
    that is only a weaker piece of the change (:func:`_weaker_lobe`) is
    dropped and the change reported instead; any other row keeps it out.

    Placed at the sub-pixel peak of the statistical significance (of the
    change's sign) within one FWHM of the source.  The flux is the fitted
    change ``a`` times the source's scene flux (``S_f / sum(P h)``) and its
    error ``|flux / z|``: a PSF fit would add the width and shift residuals
    that ``a`` was fitted beside (on a synthetic star with a 0.2 px^2 width
    error, +10,000 nJy on a change of 7,000).  ``snr`` is ``|z|``.
    """
    out = []
    edge_width = diff.psf.kernel_size // 2
    r = int(np.ceil(flag_radius))
    for x0, y0, s_f, a, z in variable_scene_sources(systematics, threshold):
        # the change's own peak within one FWHM: the scene's peak can be a brighter
        # neighbour of the variable star (4 px off in a blend of the independent simulation)
        ix, iy = int(x0), int(y0)
        ya, xa = max(iy - r, 0), max(ix - r, 0)
        win = np.sign(z) * sig.statistical[ya:iy + r + 1, xa:ix + r + 1]
        if win.size == 0:
            continue
        jy, jx = np.unravel_index(np.argmax(win), win.shape)
        iy, ix = ya + int(jy), xa + int(jx)
        if bad[iy, ix]:
            continue
        ya, xa = max(iy - 1, 0), max(ix - 1, 0)
        x, y = _refine_peak(np.sign(z) * sig.statistical[ya:iy + 2, xa:ix + 2], iy - ya, ix - xa)
        x, y = x + xa, y + ya
        if any(np.hypot(q["x"] - x, q["y"] - y) < min_sep for q in out):
            continue
        near = [np.hypot(q["x"] - x, q["y"] - y) < min_sep for q in rows]
        if not all(_weaker_lobe(q, z, x0, y0, flag_radius) for q, n in zip(rows, near) if n):
            continue
        rows = [q for q, n in zip(rows, near) if not n]
        flux = float(a * s_f / per_filtered)
        err = abs(flux / z)
        edge, sat, badf = _flags(diff.mask, None, None, 0, x, y, flag_radius, edge_width)
        out.append({"x": x, "y": y, "psfFlux": flux, "psfFluxErr": err, "snr": abs(float(z)),
                    "isNegative": bool(z < 0), "isDipole": False, "pixelFlags_edge": edge,
                    "pixelFlags_saturated": sat, "pixelFlags_bad": badf,
                    "psfSnr": float(flux / err) if err > 0 else np.nan,
                    "dipoleNegFlux": np.nan, "dipoleNegFluxErr": np.nan,
                    "dipoleSeparation": np.nan, "footprintArea": int(np.pi * flag_radius**2)})
    if out:
        logger.info("%d variable static sources found by their flux change", len(out))
    return rows + out


def _weaker_lobe(row: dict, z: float, x0: float, y0: float, radius: float) -> bool:
    """Whether a DIASource near a variable source is a weaker piece of the same change.

    Of the same sign, not a dipole, of lower S/N than the change's ``|z|`` and
    more than ``radius`` px from the source at ``(x0, y0)`` (a DIASource on
    the source itself is its measurement and stays): the systematic variance
    at the source lowers its own significance, and the change can then be
    found only on its flank (a +9 % change at 10 sigma was detected as a
    5-sigma source 14 px from the star, which then kept the star's own row
    out).
    """
    return (not row["isDipole"] and bool(row["isNegative"]) == bool(z < 0)
            and row["snr"] < abs(z) and np.hypot(row["x"] - x0, row["y"] - y0) > radius)


def _measure_side(diff: Exposure, sig: Significance, sign: int, threshold: float,
                  min_sep: float, bad: np.ndarray, flag_radius: float) -> list[dict]:
    """Detect and measure the sources of one sign (``+1`` or ``-1``)."""
    s, s_stat = (sig.image, sig.statistical) if sign > 0 else (-sig.image, -sig.statistical)
    labels, slices, peaks = _peaks_in_footprints(s, s_stat, threshold, min_sep)
    # footprint areas from each label's bounding box (a bincount over the whole
    # label image would make an int64 copy of it: 134 MB at 4k)
    areas = {lab: int(np.count_nonzero(labels[slices[lab - 1]] == lab))
             for lab in {p[3] for p in peaks}}
    edge_width = diff.psf.kernel_size // 2
    rows = []
    for iy, ix, _, lab in peaks:
        val = float(s[iy, ix])
        x, y = _refine_peak(s_stat, iy, ix)
        if _masked_near(bad, x, y, flag_radius):
            x, y = _fit_position(diff.image, diff.variance, bad, diff.psf, x, y, flag_radius)
        flux, err = _psf_fit(diff.image, diff.variance, bad, diff.psf, x, y)
        edge, sat, badf = _flags(diff.mask, labels, slices[lab - 1], lab, x, y, flag_radius,
                                 edge_width)
        rows.append({"x": x, "y": y, "psfFlux": flux, "psfFluxErr": err, "snr": val,
                     "isNegative": sign < 0, "isDipole": False, "pixelFlags_edge": edge,
                     "pixelFlags_saturated": sat, "pixelFlags_bad": badf,
                     "psfSnr": flux / err if err > 0 else np.nan, "dipoleNegFlux": np.nan,
                     "dipoleNegFluxErr": np.nan, "dipoleSeparation": np.nan,
                     "footprintArea": areas[lab]})
    return rows


def _lobes_confirmed(f_p, e_p, f_n, e_n, snr_p, snr_n, fraction: float) -> bool:
    """Whether a joint two-PSF fit confirms a dipole (the point-like test of its lobes).

    Each lobe must have its sign and a fitted S/N of at least ``fraction`` of
    its peak's significance.  Real dipoles have 0.98-1.84 of the larger
    peak's (lobes 1-8 px apart at FWHM 4 px: the filter sees each lobe partly
    cancelled by the other); ``fraction <= 0`` asks for the signs only.
    """
    if not (e_p > 0 and e_n > 0 and f_p > 0 > f_n):
        return False
    return bool(f_p / e_p >= fraction * snr_p and -f_n / e_n >= fraction * snr_n)


def _merge_dipoles(diff: Exposure, bad: np.ndarray, pos: list[dict], neg: list[dict],
                   max_sep: float, max_ratio: float,
                   min_fit_fraction: float = MIN_FIT_FRACTION) -> list[dict]:
    """Merge close positive/negative pairs of comparable flux into dipole rows.

    A pair is merged only when the joint two-PSF fit confirms both lobes
    (:func:`_lobes_confirmed`).  Otherwise the peaks are not a dipole and stay
    separate rows, each facing the point-like test: around a bright transient
    in a broad-PSF visit, a flank peak of the significance (14 px out, PSF-fit
    S/N 2.5 at significance 24) and a negative side-lobe of the detection
    filter were paired, and the fit put +14,000 nJy of the transient's wing
    into the "negative" lobe; four such rows were false positives (of 45) on
    an LSST-sized independent set.
    """
    pairs = []
    for i, p in enumerate(pos):
        for j, n in enumerate(neg):
            d = np.hypot(p["x"] - n["x"], p["y"] - n["y"])
            if d <= max_sep:
                pairs.append((d, i, j))
    used_p, used_n, out = set(), set(), []
    for d, i, j in sorted(pairs):
        if i in used_p or j in used_n:
            continue
        p, n = pos[i], neg[j]
        fp, fn = abs(p["psfFlux"]), abs(n["psfFlux"])
        if not (np.isfinite(fp) and np.isfinite(fn)) or min(fp, fn) <= 0 \
                or max(fp, fn) / min(fp, fn) > max_ratio:
            continue
        f_p, e_p, f_n, e_n, xy_p, xy_n = _dipole_fit(diff.image, diff.variance, bad, diff.psf,
                                                     (p["x"], p["y"]), (n["x"], n["y"]))
        if not _lobes_confirmed(f_p, e_p, f_n, e_n, p["snr"], n["snr"], min_fit_fraction):
            continue  # not a dipole: both peaks stay single (and face the point-like test)
        used_p.add(i), used_n.add(j)
        sep_fit = float(np.hypot(xy_p[0] - xy_n[0], xy_p[1] - xy_n[1]))
        out.append({**p, "x": 0.5 * (xy_p[0] + xy_n[0]), "y": 0.5 * (xy_p[1] + xy_n[1]),
                    "psfFlux": f_p, "psfFluxErr": e_p, "snr": max(p["snr"], n["snr"]),
                    "isNegative": False, "isDipole": True,
                    "pixelFlags_edge": p["pixelFlags_edge"] or n["pixelFlags_edge"],
                    "pixelFlags_saturated": p["pixelFlags_saturated"] or n["pixelFlags_saturated"],
                    "pixelFlags_bad": p["pixelFlags_bad"] or n["pixelFlags_bad"],
                    "psfSnr": f_p / e_p if e_p > 0 else np.nan, "dipoleNegFlux": f_n,
                    "dipoleNegFluxErr": e_n, "dipoleSeparation": sep_fit,
                    "footprintArea": p["footprintArea"] + n["footprintArea"]})
    rest = [p for i, p in enumerate(pos) if i not in used_p]
    rest += [n for j, n in enumerate(neg) if j not in used_n]
    return out + rest


def _bad_pixels(diff: Exposure) -> np.ndarray:
    return (masks.any_set(diff.mask, *NO_PEAK_PLANES) | ~np.isfinite(diff.image)
            | ~np.isfinite(diff.variance))


def _check_diff(diff: Exposure):
    if diff.psf is None:
        raise ValueError("the difference image needs a PSF model for detection and measurement")


def detect_dia_sources(diff: Exposure, *, threshold: float = 5.0,
                       min_separation_px: float | None = None,
                       dipole_max_sep_px: float | None = None,
                       dipole_flux_ratio: float = 3.0,
                       flag_radius_px: float | None = None,
                       noise: NoiseTerms | None = None,
                       significance: Significance | None = None,
                       scene: np.ndarray | None = None,
                       min_fit_fraction: float = MIN_FIT_FRACTION) -> pd.DataFrame:
    """Detect and measure positive, negative and dipole DIASources.

    Parameters
    ----------
    diff : Exposure
        Difference image (nJy), variance (nJy^2), mask and PSF.
    threshold : float
        Detection threshold on the matched-filter significance (sigma).
    min_separation_px : float, optional
        Minimum distance between two peaks of one footprint (default 2 FWHM of
        the difference PSF).
    dipole_max_sep_px : float, optional
        Maximum lobe separation of a dipole (default 2 FWHM).
    dipole_flux_ratio : float
        Maximum ratio of the lobes' absolute PSF fluxes for a dipole.
    flag_radius_px : float, optional
        Radius of the disc around the centroid added to the footprint for the
        pixel flags (default 1 FWHM).
    noise : NoiseTerms, optional
        From :func:`noise_terms` (measured here when not given).
    significance : Significance, optional
        :func:`significance_maps` of ``diff`` with the same ``noise`` and
        ``scene``, if the caller already has it.
    scene : ndarray, optional
        The static scene (template) on the same grid: with it, the systematic
        residual terms of ``noise`` (measured here when ``noise`` is not
        given) enter the significance, and the PSF-flux errors times their
        :attr:`~diffim.residuals.Systematics.flux_factor`.  With
        ``significance`` given, its :attr:`Significance.systematic` is used
        instead (computed once).
    min_fit_fraction : float
        A (non-dipole) peak is kept only if the PSF fit at its centroid gives
        a flux of its sign with at least this fraction of its detection
        significance (``psfSnr / snr``, :func:`_point_like`); 0 keeps all.
        A positive and a negative peak are merged into a dipole only if the
        joint fit gives each lobe this fraction (:func:`_lobes_confirmed`).

    Returns
    -------
    pandas.DataFrame
        One row per DIASource with the columns of :data:`COLUMNS` (see module
        docstring); empty with those columns when nothing is found.
    """
    _check_diff(diff)
    if threshold <= 0:
        raise ValueError(f"threshold must be positive (sigma), got {threshold}")
    noise = noise_terms(diff, scene) if noise is None else noise
    fwhm = diff.psf.fwhm()
    min_sep = 2.0 * fwhm if min_separation_px is None else float(min_separation_px)
    max_sep = 2.0 * fwhm if dipole_max_sep_px is None else float(dipole_max_sep_px)
    radius = fwhm if flag_radius_px is None else float(flag_radius_px)
    bad = _bad_pixels(diff)
    if significance is None:
        significance = significance_maps(diff, noise, scene)
    sys_var = significance.systematic
    if significance.image.shape != diff.shape:
        raise ValueError(f"significance {significance.image.shape} and difference "
                         f"{diff.shape} differ in shape")
    diff = _scaled(diff, noise.c_psf)
    pos = _measure_side(diff, significance, +1, threshold, min_sep, bad, radius)
    neg = _measure_side(diff, significance, -1, threshold, min_sep, bad, radius)
    rows = _merge_dipoles(diff, bad, pos, neg, max_sep, dipole_flux_ratio, min_fit_fraction)
    if significance.local_scale is not None:
        _scale_errors(rows, significance.local_scale)
    per_filtered = _flux_per_filtered(diff.psf, noise.filter)
    sys_err = (_systematic_flux_error(sys_var, [r["x"] for r in rows], [r["y"] for r in rows],
                                      per_filtered)
               if sys_var is not None and rows else np.zeros(len(rows)))
    # the point-like test compares with the significance, which holds the map's whole term
    keep = [_point_like(r, min_fit_fraction, e) for r, e in zip(rows, sys_err)]
    n_found = len(rows)
    rows, sys_err = [r for r, k in zip(rows, keep) if k], sys_err[np.asarray(keep, bool)]
    n_not_point = n_found - len(rows)
    # a PSF flux sees flux_factor of it
    _add_systematic_errors(rows, noise.systematics.flux_factor * sys_err)
    rows = _variable_star_rows(diff, significance, bad, noise.systematics, rows, threshold,
                               min_sep, radius, per_filtered)
    n_point = len(rows)
    halo = _saturation_halo(diff.mask, int(np.ceil(HALO_FWHM * fwhm))) if rows else None
    if halo is not None:
        rows = [r for r in rows if not halo[int(round(r["y"])), int(round(r["x"]))]]
    logger.info("detected %d positive, %d negative sources -> %d DIASources (%d dipoles; "
                "left out: %d peaks not point-like, %d at saturated cores or the template's "
                "edge)", len(pos), len(neg), len(rows), sum(r["isDipole"] for r in rows),
                n_not_point, n_point - len(rows))
    if not rows:
        return empty_catalog()
    df = pd.DataFrame(rows, columns=list(COLUMNS))
    return df.astype(COLUMNS).sort_values(["y", "x"]).reset_index(drop=True)


def _saturation_halo(mask: np.ndarray, radius: int) -> np.ndarray | None:
    """Pixels within ``radius`` of a large ``SAT`` / ``NO_TEMPLATE`` region (None if there is none).

    Around a saturated star the template has no core (every input was
    saturated there) and the wings of science and template differ beyond
    what the matching kernel and the systematic terms describe: on a static
    2048x2048 scene 16 of the 30 DIASources left sat 1-8 px outside such a
    region, on the rim of mag 11-14 stars.  A transient there could not be
    measured anyway (its PSF is partly masked); such peaks are left out, as
    survey pipelines mask the halos of bright stars.  Regions smaller than
    :data:`HALO_MIN_AREA` pixels (a saturated cosmic ray) do not count.
    """
    core = masks.any_set(mask, "SAT", "NO_TEMPLATE")
    if not core.any():
        return None
    labels, _ = ndimage.label(core)
    area = np.bincount(labels[core])
    big = np.flatnonzero(area >= HALO_MIN_AREA)
    if big.size == 0:
        return None
    return dilate(np.isin(labels, big), radius)


def _point_like(row: dict, fraction: float, sys_err: float = 0.0) -> bool:
    """True when the PSF fit recovers at least ``fraction`` of the peak's significance.

    The matched filter and the PSF fit measure the same thing for a point
    source (detections of the simulated variables: ``psfSnr / snr`` 0.89-1.2).
    A peak of another shape passes the threshold on the filtered image while
    its PSF fit finds little flux of its sign: the negative side-lobes that
    the correlated-noise detection filter leaves around a bright transient
    (0.02-0.36 on an independent simulator's data), or part of a ring
    residual at a bright star.  Dipoles are judged by their lobes' fit, not
    here.  ``sys_err`` (nJy) is added to the PSF-flux error in quadrature, as
    the significance holds the systematic variance.
    """
    if row["isDipole"] or fraction <= 0:
        return True
    err = float(np.hypot(row["psfFluxErr"], sys_err))
    if not err > 0:
        return False
    ratio = row["psfFlux"] / err * (-1.0 if row["isNegative"] else 1.0) / row["snr"]
    return bool(np.isfinite(ratio) and ratio >= fraction)


def _flux_per_filtered(psf, h: np.ndarray) -> float:
    """:func:`diffim.residuals.flux_per_filtered` of the difference's PSF model at its centre."""
    return flux_per_filtered(psf.at(), h)


def _systematic_flux_error(sys_var: np.ndarray, x, y, per_filtered: float) -> np.ndarray:
    """PSF-flux error from the systematic variance map at the nearest pixels of ``(x, y)``."""
    ny, nx = sys_var.shape
    ix = np.clip(np.round(np.asarray(x, float)).astype(int), 0, nx - 1)
    iy = np.clip(np.round(np.asarray(y, float)).astype(int), 0, ny - 1)
    return np.sqrt(np.maximum(sys_var[iy, ix], 0)) / per_filtered


def _scale_errors(rows: list[dict], scale: LocalNoiseScale) -> None:
    """Multiply each row's PSF-flux errors by the local noise scale at its position (in place)."""
    factors = scale.at([r["x"] for r in rows], [r["y"] for r in rows]) if rows else []
    for r, f in zip(rows, factors):
        f = float(f)
        r["psfFluxErr"] *= f
        r["dipoleNegFluxErr"] *= f
        r["psfSnr"] = r["psfFlux"] / r["psfFluxErr"] if r["psfFluxErr"] > 0 else np.nan


def _add_systematic_errors(rows: list[dict], errors) -> None:
    """Add each row's systematic error (nJy) to its PSF-flux errors in quadrature (in place)."""
    for r, e in zip(rows, errors):
        e = float(e)
        r["psfFluxErr"] = float(np.hypot(r["psfFluxErr"], e))
        if np.isfinite(r["dipoleNegFluxErr"]):
            r["dipoleNegFluxErr"] = float(np.hypot(r["dipoleNegFluxErr"], e))
        r["psfSnr"] = r["psfFlux"] / r["psfFluxErr"] if r["psfFluxErr"] > 0 else np.nan


def forced_psf_photometry(diff: Exposure, x, y, *, noise: NoiseTerms | None = None,
                          scene: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """PSF-fit flux and error (nJy) at fixed positions of the difference image.

    Parameters
    ----------
    diff : Exposure
        Difference image with variance, mask and PSF.
    x, y : float or array-like
        0-based pixel positions.
    noise : NoiseTerms, optional
        From :func:`noise_terms` (measured here when not given).
    scene : ndarray, optional
        The static scene (template): its systematic residual terms
        (:mod:`diffim.residuals`) are added to the errors.

    Returns
    -------
    flux, flux_err : ndarray
        Weighted least-squares PSF amplitudes and their errors from the
        variance plane (plus the systematic term times its flux factor); NaN
        where no usable pixel overlaps the PSF.
    """
    noise = noise_terms(diff, scene) if noise is None else noise
    diff = _scaled(diff, noise.c_psf)
    x = np.atleast_1d(np.asarray(x, dtype=float))
    y = np.atleast_1d(np.asarray(y, dtype=float))
    if x.shape != y.shape:
        raise ValueError(f"x and y must have the same shape, got {x.shape} and {y.shape}")
    bad = _bad_pixels(diff)
    out = np.array([_psf_fit(diff.image, diff.variance, bad, diff.psf, xi, yi)
                    for xi, yi in zip(x.ravel(), y.ravel())]).reshape(x.shape + (2,))
    flux, err = out[..., 0], out[..., 1]
    if noise.local_scale is not None:
        err = err * noise.local_scale.at(x.ravel(), y.ravel()).reshape(x.shape)
    sys_var = systematic_variance_map(noise, scene)
    if sys_var is not None:
        err = np.hypot(err, noise.systematics.flux_factor * _systematic_flux_error(
            sys_var, x, y, _flux_per_filtered(diff.psf, noise.filter)))
    return flux, err
