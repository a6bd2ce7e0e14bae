"""Systematic residuals of static sources in a difference image.

No subtraction is perfect at bright static sources.  The matching kernel is a
low-order polynomial over the field while the PSFs vary faster, the visit and
the template are registered to a few hundredths of a pixel, and both PSF
models are approximations.  What is left at a static source is proportional
to it: a fraction of its light (scale and profile errors) and a small shift
(registration errors) and a small change of width (PSF shape errors),
``D_sys ~ a S + b . grad S + c lap S`` with ``S`` the static scene (the
template).  On the default simulated run these residuals, at about
1 % of a star's light, were nearly all of the false detections: a mag-17
star at S/N 700 leaves a 7-14 sigma residual.

Following ZOGY (Zackay, Ofek & Gal-Yam 2016, their flux-scale and
astrometric noise terms), the residuals are treated as noise, but in the
*filtered* image where detection happens::

    Var[F](x) = c (V * h^2)(x) + eps^2 S_f(x)^2 + delta^2 |grad S_f(x)|^2
                + zeta^2 (lap S_f(x))^2 + xi^2 |Q S_f(x)|^2 + omega^2 W_f(x)^2

``F = D * h`` is the filtered difference, ``S_f = S * h`` the filtered
scene, ``W_f`` that blurred by a Gaussian as wide as the PSF (the residual
in the PSF wings, which a kernel of limited size and a truncated PSF model
leave a few FWHM out), ``*`` a correlation with the detection filter ``h``
(:func:`diffim.detect.detection_filter`) and ``c (V * h^2)`` the statistical
variance.  A residual proportional to a star is coherent over the PSF, so it
has to be added after filtering.  Added to each pixel's variance as if it
were independent (``eps^2 S^2``), it would be underestimated, for a
PSF-filtered statistic, by the effective number of pixels of the PSF (about
``4 pi sigma^2``, 60 px at a FWHM of 5 px).

The width term is the residual of a PSF a little broader or sharper than
its model: ``P(sigma^2 + d) ~ P + (d / 2) lap P``, a negative core in a
positive ring (or the reverse) that carries no net flux, so the scale term
cannot describe it, while a matched filter at its centre sees a point
source of the opposite sign.  At mag 16-17 stars it left 5-8 sigma
"detections" on static scenes.

The shear term is the rest of a second-moment error: a PSF a little more
elongated than its model, ``P + (1/2) sum_ij dI_ij d_i d_j P``, whose
trace-free part is ``e1 (d_xx - d_yy) P / 2 + e2 d_xy P`` with ``e1 =
(dI_xx - dI_yy) / 2`` and ``e2 = dI_xy``: four lobes, two positive and two
negative, a PSF-width off the star's centre, so a matched filter sees
them as two pairs of point sources.  ``|Q S_f|^2 = ((d_xx - d_yy) S_f /
2)^2 + (d_xy S_f)^2`` is its variance for isotropic ``(e1, e2)``.  The
independent simulator's visits carry an ellipticity that varies
quadratically over the field, which the kernel's low-order spatial
variation and the PSF models follow only in part: at stars of peak S/N
250-370 the lobes reached 15-38 sigma.

``eps`` (dimensionless), ``delta`` (pixels), ``zeta`` and ``xi``
(pixels^2) and ``omega`` are measured on each difference image itself, at the bright
peaks of the scene (:func:`measure_systematics`).  On a disc around every
such source the amplitudes ``(a, b_x, b_y)`` of ``F ~ a S_f + b . grad
S_f`` and ``c`` of ``F ~ a S_f + b . grad S_f + c lap S_f`` are fitted by
weighted least squares, with their covariance from the filtered noise's own
correlation (``a`` and ``b`` from the first fit: ``lap S_f`` is correlated
with ``S_f``, and on a small image the joint fit left the scale to a few
stars); ``e1, e2`` are fitted with all six columns (for a round source
they are orthogonal to the others).  ``eps^2``, ``delta^2``, ``zeta^2`` and
``xi^2`` are the variances of these amplitudes over the sources beyond
their noise (a random-effects estimate);
sources whose amplitude is more than 3 sigma off (variable stars) are left
out.  ``omega^2`` is then the regression of the remaining excess
``F^2 - Var[F]`` on ``W_f^2`` in an annulus outside the disc.

One value per image describes most sources, not all: a star whose centroid a
neighbour pulls, a binary, or a bright star within a PSF width or two of the
image's edge, where the matching kernel and the PSF models are extrapolated,
leaves a shift, width or shear residual far beyond the image's scatter.  Such
a source (an outlier of a shape term whose flux did not change) keeps its own
measured excess of that term on a disc around it (:func:`_local_terms`),
which the image-wide term, fitted on the others, does not cover.  Discs that
reach over the image's edge are measured on the pixels the image has.

The scene's overall scale does not matter (``eps`` is measured against the
same ``S``), so the template in the visit frame serves in both convolution
directions.  Conventions as in :mod:`diffim`: arrays ``[y, x]``, pixel
``(0, 0)`` is the centre of the first pixel.
"""

from __future__ import annotations

import functools
import logging
import math
from dataclasses import dataclass, field, replace

import numpy as np
from scipy import fft as sp_fft
from scipy import optimize, signal

from .kernel import FFT_WORKERS, fft_convolve
from .stats import inverse_variance_weights

logger = logging.getLogger(__name__)

#: Scene sources used for the measurement: peak S/N of the scene (PSF-filtered,
#: with the difference's variance) at least this.  Fainter ones carry no
#: information about a ~1 % error (their own noise is above 1/SNR).
MIN_SOURCE_SNR = 100.0
#: A sparse image, with fewer than :data:`SPARSE_SOURCES` scene sources above
#: :data:`MIN_SOURCE_SNR`, is measured on its brightest ``SPARSE_SOURCES``
#: above this S/N instead.  They add little to ``eps`` (their weight falls as
#: their noise grows) but they give the clipping more static sources to
#: tell the variable ones from.
SPARSE_SOURCE_SNR = 30.0
SPARSE_SOURCES = 20
#: A source whose amplitude is beyond this many sigma (its noise and the
#: systematic scatter combined) is an outlier (a variable star, or a transient
#: on a star) and is left out of the fit (:func:`random_effect`).
OUTLIER_FACTOR = 3.0
#: Outer radius of the annulus that measures the wing term, in units of the disc radius.
WING_RADII = 2
#: At most this many scene sources (the brightest) are measured.
MAX_SOURCES = 300
#: Fewer measured sources than this: no systematic terms (nothing bright enough
#: to leave a residual that matters either).
MIN_SOURCES = 5


@dataclass(frozen=True)
class Systematics:
    """Measured systematic residual level of one difference image.

    Attributes
    ----------
    scale_error : float
        ``eps``, RMS fractional residual of the filtered scene (dimensionless).
    shift_error : float
        ``delta``, RMS registration residual (pixels, per axis).
    wing_error : float
        ``omega``, RMS residual in the PSF wings relative to the filtered scene
        blurred by a Gaussian of ``wing_sigma`` pixels (``W_f``).
    width_error : float
        ``zeta``, RMS amplitude of the width residual ``c lap S_f`` (pixels^2;
        half the error of the PSF's second moment ``sigma^2``).
    shear_error : float
        ``xi``, RMS amplitude per component of the shear residual ``e1 (d_xx
        - d_yy) S_f / 2 + e2 d_xy S_f`` (pixels^2; ``e1`` is half the error of
        ``I_xx - I_yy``, ``e2`` the error of ``I_xy``).
    wing_sigma : float
        That Gaussian's sigma (pixels).
    n_sources : int
        Scene sources the values were measured on (0: not measured).
    sources : ndarray (n, 5) or None
        Per measured source (:func:`_flux_changes`): integer ``x, y`` of the
        scene peak, the filtered scene there, its flux change ``a`` (a
        fraction of its scene flux) and the significance ``z`` of that
        change.  Not recorded in headers (None when not measured).
    local : ndarray (m, 5) or None
        Sources whose own shape residual is beyond the image's terms
        (:func:`_local_terms`): integer ``x, y`` and the excess variances of
        the shift (pixels^2 per axis), the width and the shear amplitudes
        (pixels^4), added on a disc of ``local_radius`` pixels around them.
        Not recorded in headers: forced photometry, which reads the terms
        back, goes without them on purpose.  It measures DIAObjects, and a
        source's "own shape residual" there is mostly the object's own
        change when it is blended with the scene peak: given these terms, a
        transient 2.7 px from a template peak got a forced error of 809 nJy
        instead of 192 (twenty-seventh session, ``docs/quality.md``).
    local_radius : int
        That disc's radius (pixels).
    flux_factor : float
        The fraction of the map's systematic sigma (:func:`systematic_variance`)
        that a PSF flux at a static source shows, measured on the image's own
        bright sources (:func:`flux_factor`).  PSF-flux errors carry the map's
        term times it; detection uses the whole map.  1 when not measured.
    """

    scale_error: float = 0.0
    shift_error: float = 0.0
    wing_error: float = 0.0
    wing_sigma: float = 0.0
    n_sources: int = 0
    width_error: float = 0.0
    shear_error: float = 0.0
    sources: np.ndarray | None = field(default=None, compare=False, repr=False)
    local: np.ndarray | None = field(default=None, compare=False, repr=False)
    local_radius: int = 0
    flux_factor: float = 1.0

    @property
    def active(self) -> bool:
        """True when any term is nonzero."""
        return (self.scale_error > 0 or self.shift_error > 0 or self.wing_error > 0
                or self.width_error > 0 or self.shear_error > 0
                or (self.local is not None and len(self.local) > 0))

    def header_cards(self) -> dict:
        """FITS keywords of a difference image that record these terms."""
        return {"SYSSCALE": self.scale_error, "SYSSHIFT": self.shift_error,
                "SYSWING": self.wing_error, "SYSWSIG": self.wing_sigma,
                "SYSWIDTH": self.width_error, "SYSSHEAR": self.shear_error,
                "SYSNSRC": self.n_sources, "SYSFLUXF": self.flux_factor}

    @classmethod
    def from_meta(cls, meta) -> "Systematics":
        """The terms recorded by :meth:`header_cards` (zeros when absent)."""
        return cls(scale_error=float(meta.get("SYSSCALE", 0.0)),
                   shift_error=float(meta.get("SYSSHIFT", 0.0)),
                   wing_error=float(meta.get("SYSWING", 0.0)),
                   wing_sigma=float(meta.get("SYSWSIG", 0.0)),
                   n_sources=int(meta.get("SYSNSRC", 0)),
                   width_error=float(meta.get("SYSWIDTH", 0.0)),
                   shear_error=float(meta.get("SYSSHEAR", 0.0)),
                   flux_factor=float(meta.get("SYSFLUXF", 1.0)))


def systematic_variance(scene: np.ndarray, h: np.ndarray, sys: Systematics) -> np.ndarray:
    """``eps^2 S_f^2 + delta^2 |grad S_f|^2 + zeta^2 (lap S_f)^2 + xi^2 |Q S_f|^2 + omega^2 W_f^2``.

    The systematic variance of ``F``.
    ``S_f = S * h`` (non-finite scene pixels count as 0) and ``W_f`` is
    ``S_f`` blurred by a Gaussian of ``sys.wing_sigma``; float32, same shape.
    """
    s = np.where(np.isfinite(scene), scene, 0).astype(np.float32)
    sf = fft_convolve(s, np.asarray(h, np.float32)[::-1, ::-1])
    del s
    gy, gx = np.gradient(sf)
    out = np.float32(sys.shift_error**2) * (gx * gx + gy * gy)
    del gx, gy
    if sys.width_error > 0:
        lap = laplacian(sf)
        lap *= lap
        lap *= np.float32(sys.width_error**2)
        out += lap
        del lap
    if sys.shear_error > 0:
        out += np.float32(sys.shear_error**2) * shear_power(sf)
    if sys.wing_error > 0:
        wf = fft_convolve(sf, _wing_kernel(sys.wing_sigma))
        out += np.float32(sys.wing_error**2) * wf * wf
    out += np.float32(sys.scale_error**2) * sf * sf
    if sys.local is not None:
        _add_local_terms(out, sf, sys.local, sys.local_radius)
    return out


def systematic_variance_at(scene: np.ndarray, h: np.ndarray, sys: Systematics,
                           x, y) -> np.ndarray:
    """:func:`systematic_variance` at the pixels nearest ``(x, y)``, without the map.

    The same terms (not :attr:`Systematics.local`), from the filtered scene on
    a cut-out around each point (:func:`_cutouts`, :func:`_filter_stacks`):
    for a few hundred points much cheaper than the whole map.  On the
    outermost pixel row or column the map's one-sided differences differ.

    Parameters
    ----------
    scene : ndarray (ny, nx)
        The static scene (non-finite pixels count as 0, as does the outside).
    h : ndarray (K, K)
        Detection filter.
    sys : Systematics
        The measured terms.
    x, y : array-like
        0-based pixel positions.

    Returns
    -------
    ndarray
        ``Var[F]`` of the systematic terms at each point (shape of ``x``).
    """
    x = np.atleast_1d(np.asarray(x, float))
    ny, nx = scene.shape
    xy = np.column_stack([np.clip(np.round(x.ravel()), 0, nx - 1),
                          np.clip(np.round(np.asarray(y, float).ravel()), 0, ny - 1)]).astype(int)
    g = _centre_wing_kernel(sys)
    _, (sc,) = _cutouts((scene,), xy, h.shape[0] // 2 + g.shape[0] // 2 + 1, (0.0,))
    sf = _filter_scene(sc, np.asarray(h, float)[::-1, ::-1])
    return _centre_variance(sf, g, sys).reshape(x.shape)


def _centre_wing_kernel(sys: Systematics) -> np.ndarray:
    """The wing term's Gaussian (:func:`_wing_kernel`), or a single pixel without a wing term."""
    return _wing_kernel(sys.wing_sigma).astype(float) if sys.wing_error > 0 else np.ones((1, 1))


def _centre_variance(sf: np.ndarray, g: np.ndarray, sys: Systematics) -> np.ndarray:
    """:func:`systematic_variance` at the centre of each ``S_f`` stamp of a stack.

    The stamps reach the wing kernel ``g``'s half-width plus one pixel beyond
    the centre; the map's own finite differences are taken on the central 3 x 3.
    """
    c = sf.shape[1] // 2
    ctr = sf[:, c - 1:c + 2, c - 1:c + 2]
    gy, gx = (d[:, 1, 1] for d in np.gradient(ctr, axis=(1, 2)))
    v = (sys.scale_error * ctr[:, 1, 1]) ** 2 + sys.shift_error**2 * (gx * gx + gy * gy)
    v += (sys.width_error * laplacian(ctr)[:, 1, 1]) ** 2
    v += sys.shear_error**2 * shear_power(ctr)[:, 1, 1]
    if sys.wing_error > 0:
        m = g.shape[0] // 2
        wf = np.sum(sf[:, c - m:c + m + 1, c - m:c + m + 1] * g[None], axis=(1, 2))
        v += (sys.wing_error * wf) ** 2
    return v


def flux_per_filtered(psf: np.ndarray, h: np.ndarray) -> float:
    """``sum(P h)``: the filtered value of a point source of unit flux (PSF ``P`` at the centre).

    Divides a filtered-units variance into a PSF flux's (``/ sum(P h)^2``).
    """
    return float(np.sum(psf * h))


def _centre_flux_terms(diff_img, diff_var, bad, scene, h, xy, sys: Systematics,
                       psf: np.ndarray, c_psf: float):
    """PSF fluxes, their noise variance and the map's systematic flux variance at ``xy``.

    The flux is a PSF fit at each integer ``(x, y)`` with inverse-variance
    weights (unusable pixels out), its variance ``c_psf / sum(P^2 / V)``, as
    DIASources are measured (:func:`diffim.detect.detect_dia_sources`); the
    map's term (:func:`_centre_variance`, filtered units) is turned into flux
    as theirs is, divided by ``sum(P h)``.  Cut-outs and the scene's
    filtering are batched (:func:`_cutouts`, :func:`_filter_scene`); for
    :func:`flux_factor`.
    """
    if psf.shape != h.shape:
        raise ValueError(f"psf {psf.shape} and filter {h.shape} differ in shape")
    g = _centre_wing_kernel(sys)
    hk = h.shape[0] // 2
    kept, (img, var, sc, b) = _cutouts((diff_img, diff_var, scene, bad), xy,
                                       hk + g.shape[0] // 2 + 1, _CUTOUT_FILLS)
    if len(kept) == 0:
        return np.zeros(0), np.zeros(0), np.zeros(0)
    c = img.shape[1] // 2
    win = (slice(None), slice(c - hk, c + hk + 1), slice(c - hk, c + hk + 1))
    d = img[win]
    w = inverse_variance_weights(var[win], b[win] | ~np.isfinite(d))
    spp = np.sum(w * psf[None] ** 2, axis=(1, 2))
    spp = np.where(spp > 0, spp, np.nan)     # no usable pixel: NaN, left out of the factor
    flux = np.sum(w * psf[None] * np.where(w > 0, d, 0.0), axis=(1, 2)) / spp
    sf = _filter_scene(sc, h[::-1, ::-1])
    return flux, c_psf / spp, _centre_variance(sf, g, sys) / flux_per_filtered(psf, h)**2


#: A source counts in :func:`flux_factor` where the map's systematic variance
#: at its centre is at least this multiple of the filtered noise variance
#: there: fainter sources hardly constrain the factor.
FLUX_FACTOR_MIN_RATIO = 1.0
#: Fewer such sources than this: the factor is not measured (1).
FLUX_FACTOR_MIN_SOURCES = 5
#: The factor is at most this.
FLUX_FACTOR_MAX = 3.0
#: Median of a chi-square variable with one degree of freedom.
_CHI2_1_MEDIAN = 0.45493642311957283


def flux_factor(f, noise_var, sys_var) -> float:
    """How much of the map's systematic variance a PSF flux at a static source shows.

    ``F`` is the PSF flux of each static source's residual, fitted as
    DIASources are (:func:`_centre_flux_terms`).  The factor ``s`` makes ``F / sqrt(
    noise_var + s^2 sys_var)`` unit-normal in the median of its square (so a
    few variable sources do not move it), over the sources where ``sys_var >=``
    :data:`FLUX_FACTOR_MIN_RATIO` ``noise_var``.

    The map bounds the residual over the whole disc around a source, where
    detection looks (rings, lobes); a PSF fit at the centre sees one
    projection of it.  The shape terms are measured as independent per-source
    amplitudes, and where they are not (each source's width error coming
    with a flux error that cancels part of it at the centre) the centre sees
    less: at static sources
    of peak S/N 300-1000 of the independent simulator, the PSF fluxes of the
    difference scattered by 1.5-1.7 times their noise, while the map predicted
    4.6-8.4 times (twenty-eighth session, ``docs/quality.md``).  In
    correlated noise the detection filter is sharper than the PSF and sees
    more of a width residual than a PSF fit does, so ``F`` must be the PSF
    fit itself, not the filter's centre value: on seven independent sets
    the flux pulls of variables with exact truth went from 0.82 to 1.00
    with that change (twenty-ninth session).

    Parameters
    ----------
    f, noise_var, sys_var : array-like
        ``F``, its noise variance and the map's systematic variance at each
        source's centre (same units).

    Returns
    -------
    float
        ``s`` in ``[0, FLUX_FACTOR_MAX]``; 1 with fewer than
        :data:`FLUX_FACTOR_MIN_SOURCES` usable sources.
    """
    f, nv, sv = (np.asarray(a, float).ravel() for a in (f, noise_var, sys_var))
    use = np.isfinite(f) & (nv > 0) & (sv >= FLUX_FACTOR_MIN_RATIO * nv)
    if use.sum() < FLUX_FACTOR_MIN_SOURCES:
        return 1.0
    z2, ratio = f[use] ** 2 / nv[use], sv[use] / nv[use]

    def excess(s):  # decreasing in s
        return float(np.median(z2 / (1.0 + s * s * ratio))) - _CHI2_1_MEDIAN

    if excess(0.0) <= 0:
        return 0.0
    if excess(FLUX_FACTOR_MAX) >= 0:
        return FLUX_FACTOR_MAX
    return float(optimize.brentq(excess, 0.0, FLUX_FACTOR_MAX, xtol=1e-4))


def _add_local_terms(out: np.ndarray, sf: np.ndarray, local: np.ndarray, radius: int) -> None:
    """Add each :attr:`Systematics.local` source's own terms to ``out`` on its disc (in place)."""
    ny, nx = sf.shape
    for x, y, shift2, width2, shear2 in local:
        x, y = int(x), int(y)
        y0, y1 = max(y - radius - 1, 0), min(y + radius + 2, ny)
        x0, x1 = max(x - radius - 1, 0), min(x + radius + 2, nx)
        box = sf[y0:y1, x0:x1]
        if min(box.shape) < 3:
            continue
        gy, gx = np.gradient(box)
        term = shift2 * (gx * gx + gy * gy) + width2 * laplacian(box) ** 2
        term += shear2 * shear_power(box)
        yy, xx = np.ogrid[y0 - y:y1 - y, x0 - x:x1 - x]
        out[y0:y1, x0:x1] += np.where(xx**2 + yy**2 <= radius**2, term, 0).astype(out.dtype)


def laplacian(a: np.ndarray) -> np.ndarray:
    """Five-point Laplacian of the last two axes (pixels^-2); 0 on the border."""
    out = np.zeros_like(a)
    c = out[..., 1:-1, 1:-1]
    np.add(a[..., :-2, 1:-1], a[..., 2:, 1:-1], out=c)
    c += a[..., 1:-1, :-2]
    c += a[..., 1:-1, 2:]
    c -= 4 * a[..., 1:-1, 1:-1]
    return out


def shear_derivatives(a: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``(d_xx - d_yy) a / 2`` and ``d_xy a`` of the last two axes (pixels^-2); 0 on the border.

    Central differences: ``d_xx - d_yy`` from the four nearest neighbours,
    ``d_xy`` from the four diagonal ones.
    """
    q1, q2 = np.zeros_like(a), np.zeros_like(a)
    c1, c2 = q1[..., 1:-1, 1:-1], q2[..., 1:-1, 1:-1]
    np.add(a[..., 1:-1, :-2], a[..., 1:-1, 2:], out=c1)
    c1 -= a[..., :-2, 1:-1]
    c1 -= a[..., 2:, 1:-1]
    c1 *= 0.5
    np.add(a[..., 2:, 2:], a[..., :-2, :-2], out=c2)
    c2 -= a[..., 2:, :-2]
    c2 -= a[..., :-2, 2:]
    c2 *= 0.25
    return q1, q2


def shear_power(a: np.ndarray) -> np.ndarray:
    """``|Q a|^2 = ((d_xx - d_yy) a / 2)^2 + (d_xy a)^2`` (:func:`shear_derivatives`)."""
    q1, q2 = shear_derivatives(a)
    q1 *= q1
    q2 *= q2
    q1 += q2
    return q1


def _wing_kernel(sigma: float) -> np.ndarray:
    """Unit-sum Gaussian of ``sigma`` pixels, cut at 3 sigma."""
    h = max(int(np.ceil(3 * sigma)), 1)
    r2 = np.add.outer(np.arange(-h, h + 1) ** 2, np.arange(-h, h + 1) ** 2)
    g = np.exp(-0.5 * r2 / sigma**2)
    return (g / g.sum()).astype(np.float32)


def filtered_noise_correlation(h: np.ndarray, rho: np.ndarray, half: int) -> np.ndarray:
    """Correlation of the filtered noise ``F = D * h`` at lags up to ``half`` pixels.

    ``rho_F = (h * h * rho) / (h * h * rho)(0)`` for noise of correlation
    ``rho`` (:func:`diffim.detect.noise_correlation`).  Returns an array of
    ``(2 half + 1)^2`` with lag 0 at the centre.
    """
    n = sp_fft.next_fast_len(2 * half + h.shape[0] + rho.shape[0])
    hh = np.abs(sp_fft.fft2(h, s=(n, n))) ** 2
    power = np.abs(sp_fft.fft2(rho, s=(n, n)))  # |.|: rho is centred, not at [0, 0]
    acf = np.real(sp_fft.ifft2(hh * power))
    lags = np.arange(-half, half + 1) % n
    out = acf[np.ix_(lags, lags)]
    return out / out[half, half]


def _cutouts(arrays, xy: np.ndarray, pad: int, fills):
    """Boxes of half-width ``pad`` around the integer ``(x, y)`` rows of ``xy``.

    Boxes that reach over the image's border are filled there with ``fills``
    (one value per array: unusable pixels for the mask), so that a source
    near the edge is measured on the part of its disc the image has (its
    kernel and PSF model are extrapolated there, and its residuals were
    never measured before).  Returns ``(kept, stacks)``: the indices of the
    sources inside the image and, for each of ``arrays``, their pixels
    stacked ``(n, 2 pad + 1, 2 pad + 1)``.
    """
    ny, nx = arrays[0].shape
    x, y = xy[:, 0], xy[:, 1]
    kept = np.flatnonzero((x >= 0) & (y >= 0) & (x < nx) & (y < ny))
    inner = (x[kept] >= pad) & (y[kept] >= pad) & (x[kept] < nx - pad) & (y[kept] < ny - pad)
    off = np.arange(-pad, pad + 1)
    rows = np.clip(y[kept, None, None] + off[None, :, None], 0, ny - 1)
    cols = np.clip(x[kept, None, None] + off[None, None, :], 0, nx - 1)
    stacks = [a[rows, cols] for a in arrays]
    if not inner.all():
        outside = ((y[kept, None, None] + off[None, :, None] < 0)
                   | (y[kept, None, None] + off[None, :, None] >= ny)
                   | (x[kept, None, None] + off[None, None, :] < 0)
                   | (x[kept, None, None] + off[None, None, :] >= nx))
        for st, fill in zip(stacks, fills):
            st[outside] = fill
    return kept, stacks


def _filter_stacks(img, var, scene, b, hr, c_filter):
    """``F``, ``Var_stat F`` and ``S_f`` of stacked cut-outs (``b``: unusable, left out).

    One batched FFT correlation per quantity over axes (1, 2); ``"valid"``
    output, ``hr`` the flipped detection filter.
    """
    conv = functools.partial(signal.fftconvolve, mode="valid", axes=(1, 2))
    with sp_fft.set_workers(FFT_WORKERS):
        f = conv(np.where(b, 0.0, img), hr[None])
        vf = c_filter * conv(np.where(b, 0.0, var), (hr * hr)[None])
    return f, vf, _filter_scene(scene, hr)


def _filter_scene(scene, hr):
    """``S_f`` of stacked scene cut-outs (non-finite pixels 0; as :func:`_filter_stacks`)."""
    with sp_fft.set_workers(FFT_WORKERS):
        return signal.fftconvolve(np.where(np.isfinite(scene), scene, 0.0), hr[None],
                                  mode="valid", axes=(1, 2))


def _stamp_terms(f, vf, s, b, hk, radius):
    """Filtered difference, its variance, the filtered scene and its derivatives in a disc.

    ``f, vf, s`` are one stamp's filtered planes and ``b`` its unusable pixels
    (``hk`` = filter half-width wider).  Returns ``(f, vf, design, yx)`` over
    the usable disc pixels: ``design`` holds the columns ``S_f, dS_f/dx,
    dS_f/dy, lap S_f, (d_xx - d_yy) S_f / 2, d_xy S_f`` and ``yx`` the pixel
    offsets; None when fewer than 80 % of the disc is usable.
    """
    gy, gx = np.gradient(s)
    lap = laplacian(s)
    q1, q2 = shear_derivatives(s)
    inner = (slice(1, -1), slice(1, -1))  # np.gradient is one-sided on the border
    f, vf, s, gx, gy, lap, q1, q2 = (a[inner] for a in (f, vf, s, gx, gy, lap, q1, q2))
    r = f.shape[0] // 2
    yy, xx = np.mgrid[-r:r + 1, -r:r + 1]
    disc = (xx**2 + yy**2 <= radius**2)
    centre_bad = b[hk + 1:hk + 2 + 2 * r, hk + 1:hk + 2 + 2 * r]
    ok = disc & ~centre_bad & (vf > 0)
    if ok.sum() < 0.8 * disc.sum():
        return None
    design = np.stack([s[ok], gx[ok], gy[ok], lap[ok], q1[ok], q2[ok]], axis=1)
    return f[ok], vf[ok], design, np.stack([yy[ok], xx[ok]], axis=1)


#: Beyond the image's border a cut-out holds no difference, no variance, no scene
#: and unusable pixels.
_CUTOUT_FILLS = (0.0, 0.0, 0.0, True)


def _disc_terms(diff_img, diff_var, bad, scene, h, c_filter, xy, radius):
    """:func:`_stamp_terms` of every source of ``xy`` (None where too little of it is usable)."""
    hk = h.shape[0] // 2
    kept, (img, var, sc, b) = _cutouts((diff_img, diff_var, scene, bad), xy, radius + hk + 1,
                                       _CUTOUT_FILLS)
    out = [None] * len(xy)
    if len(kept):
        f, vf, sf = _filter_stacks(img, var, sc, b, h[::-1, ::-1], c_filter)
        for j, i in enumerate(kept):
            out[i] = _stamp_terms(f[j], vf[j], sf[j], b[j], hk, radius)
    return out


def _annulus_terms(f, vf, sf_big, wf, b, hk, hg, r_in, r_out):
    """One stamp's ``F``, ``Var_stat F``, ``S_f``, ``|grad S_f|^2``, ``(lap S_f)^2``, ``|Q S_f|^2``, ``W_f``.

    On the annulus ``r_in < r <= r_out``.

    ``sf_big`` is ``S_f`` ``hg`` (the wing kernel's half-width) wider than
    ``f``; None when under 80 % of the annulus is usable.
    """
    inner = (slice(hg, -hg), slice(hg, -hg))
    sf = sf_big[inner]
    gy, gx = np.gradient(sf)
    lap = laplacian(sf)
    q2 = shear_power(sf)
    crop = (slice(hk + hg, -(hk + hg)), slice(hk + hg, -(hk + hg)))
    one = (slice(1, -1), slice(1, -1))
    f, vf, sf, gx, gy, lap, q2, wf = (a[one] for a in (f[inner], vf[inner], sf, gx, gy, lap,
                                                       q2, wf))
    r = f.shape[0] // 2
    yy, xx = np.mgrid[-r:r + 1, -r:r + 1]
    rr2 = xx**2 + yy**2
    ring = (rr2 > r_in**2) & (rr2 <= r_out**2)
    ok = ring & ~b[crop][one] & (vf > 0)
    if ok.sum() < 0.8 * ring.sum():
        return None
    return f[ok], vf[ok], sf[ok], gx[ok] ** 2 + gy[ok] ** 2, lap[ok] ** 2, q2[ok], wf[ok]


def _wing_terms(diff_img, diff_var, bad, scene, h, g, c_filter, xy, r_in, r_out):
    """:func:`_annulus_terms` around every source of ``xy`` that has them."""
    hk, hg = h.shape[0] // 2, g.shape[0] // 2
    kept, (img, var, sc, b) = _cutouts((diff_img, diff_var, scene, bad), xy,
                                       r_out + hk + hg + 1, _CUTOUT_FILLS)
    if len(kept) == 0:
        return []
    f, vf, sf_big = _filter_stacks(img, var, sc, b, h[::-1, ::-1], c_filter)
    with sp_fft.set_workers(FFT_WORKERS):
        wf = signal.fftconvolve(sf_big, g[None], mode="valid", axes=(1, 2))
    terms = (_annulus_terms(f[j], vf[j], sf_big[j], wf[j], b[j], hk, hg, r_in, r_out)
             for j in range(len(kept)))
    return [t for t in terms if t is not None]


def _wing_variance(stamps, eps2: float, delta2: float, zeta2: float, xi2: float) -> float:
    """``omega^2``: weighted LSQ of the annuli's excess ``F^2 - Var`` on ``W_f^2`` (>= 0).

    The excess is taken after the scale, shift, width and shear terms; weights
    are the inverse squared total variance (its noise is ~ sqrt(2) times it).
    """
    num = den = 0.0
    for f, vf, sf, g2, l2, q2, wf in stamps:
        known = vf + eps2 * sf * sf + delta2 * g2 + zeta2 * l2 + xi2 * q2
        w = 1.0 / known**2
        w4 = wf**2
        num += float(np.sum(w * w4 * (f * f - known)))
        den += float(np.sum(w * w4 * w4))
    return max(num / den, 0.0) if den > 0 else 0.0


def _noise_covariance(vf, yx, rho_f):
    """Covariance of the filtered noise between the disc pixels ``yx`` (variances ``vf``)."""
    half = rho_f.shape[0] // 2
    dy = yx[:, 0][:, None] - yx[:, 0][None, :] + half
    dx = yx[:, 1][:, None] - yx[:, 1][None, :] + half
    sd = np.sqrt(vf)
    return rho_f[dy, dx] * sd[:, None] * sd[None, :]


def _amplitudes(f, vf, design, cov_f):
    """Weighted LSQ amplitudes of ``F ~ design . theta`` and their covariance.

    Weights ``1 / vf``; the covariance is the sandwich estimate with the
    filtered noise's own correlation ``cov_f`` (:func:`_noise_covariance`;
    neighbouring pixels of ``F`` are far from independent).
    """
    aw = design / vf[:, None]
    m = design.T @ aw
    try:
        minv = np.linalg.inv(m)
    except np.linalg.LinAlgError:
        return None
    theta = minv @ (aw.T @ f)
    cov = minv @ (aw.T @ cov_f @ aw) @ minv
    return theta, cov


def scale_amplitudes(diff_img: np.ndarray, diff_var: np.ndarray, bad: np.ndarray,
                     scene: np.ndarray, h: np.ndarray, xy: np.ndarray,
                     radius: int) -> tuple[np.ndarray, np.ndarray]:
    """Flux-scale amplitude of each source, with the shift and width residuals beside it.

    On a disc of ``radius`` pixels around each integer ``(x, y)`` of ``xy``
    the filtered difference ``F = D * h`` is fitted by ``a S_f + b . grad
    S_f + c lap S_f`` (weighted least squares, as in
    :func:`measure_systematics`); ``a`` is the fraction of the source's light
    left in the difference (the shear columns of :func:`_stamp_terms` are left
    out: for a round source they are orthogonal to the others).  A width residual carries no flux but its
    PSF-weighted sum does (``-c / sigma^2`` of the star for a Gaussian PSF of
    ``sigma`` px: 6 % at ``c`` = 0.13 px^2 and a FWHM of 3.4 px), so a
    one-term estimate mistakes it for a scale error; here the ``c`` column
    takes it.  The variance of ``a`` assumes white pixel noise of variance
    ``diff_var`` filtered by ``h``.

    Returns
    -------
    a, var_a : ndarray
        Amplitudes and their variances (dimensionless) of the sources that
        could be measured (discs inside the image and at least 80 % usable).
    """
    xy = np.asarray(xy, int).reshape(-1, 2)
    rho_f = filtered_noise_correlation(h, np.ones((1, 1)), 2 * radius)
    a, var = [], []
    for terms in _disc_terms(diff_img, diff_var, bad, scene, h, 1.0, xy, radius):
        if terms is None:
            continue
        f, vf, design, yx = terms
        fit = _amplitudes(f, vf, design[:, :4], _noise_covariance(vf, yx, rho_f))
        if fit is not None:
            a.append(fit[0][0])
            var.append(fit[1][0, 0])
    return np.array(a, float), np.array(var, float)


def truncated_second_moment(k: float) -> float:
    """``E[z^2 | |z| <= k] `` for a standard normal ``z``: the variance kept by a ``k``-sigma cut."""
    phi = math.exp(-0.5 * k * k) / math.sqrt(2.0 * math.pi)
    return 1.0 - 2.0 * k * phi / math.erf(k / math.sqrt(2.0))


def _mixture_start(values: np.ndarray, noise_var: np.ndarray) -> float:
    """Starting ``tau^2`` for :func:`random_effect` that tolerates many outliers.

    Maximum likelihood, on a grid, of the mixture ``(1 - f) N(0, tau^2 +
    noise_var) + f U(-A, A)`` with ``A = max |values|``: the outliers are
    modelled instead of assumed to be a minority.  ``tau`` runs over 0 and 48
    log steps from 1e-3 to 30 times the median noise, ``f`` over 0-0.9.
    """
    sd = float(np.sqrt(np.median(noise_var)))
    span = float(np.max(np.abs(values)))
    if not (sd > 0 and span > 0):
        return 0.0
    tau2 = np.concatenate([[0.0], (sd * np.geomspace(1e-3, 30.0, 48)) ** 2])[:, None]
    tot = tau2 + noise_var[None, :]
    gauss = np.exp(-0.5 * values[None, :] ** 2 / tot) / np.sqrt(2 * np.pi * tot)
    frac = np.linspace(0.0, 0.9, 19)[:, None, None]
    with np.errstate(divide="ignore"):  # f = 0 with a value far out: log(0) = -inf
        loglike = np.log((1 - frac) * gauss[None] + frac / (2 * span)).sum(axis=2)
    return float(tau2[np.unravel_index(np.argmax(loglike), loglike.shape)[1], 0])


def _clip_from(values, noise_var, tau2: float, factor: float, n_iter: int):
    """Fixed point of the clipped random-effect estimate nearest ``tau2``.

    See :func:`random_effect`; returns ``(tau^2, kept)``.
    """
    c = truncated_second_moment(factor)
    keep = np.zeros(values.size, bool)
    for _ in range(n_iter):
        tot = tau2 + noise_var
        new_keep = values**2 <= factor**2 * tot
        if not new_keep.any():
            return 0.0, new_keep
        w = 1.0 / tot[new_keep] ** 2
        new_tau2 = max(float(np.sum(w * (values[new_keep] ** 2 / c - noise_var[new_keep]))
                             / np.sum(w)), 0.0)
        done = np.array_equal(new_keep, keep) and np.isclose(new_tau2, tau2, rtol=1e-3)
        keep, tau2 = new_keep, new_tau2
        if done:
            break
    return tau2, keep


def random_effect(values: np.ndarray, noise_var: np.ndarray, *, factor: float = OUTLIER_FACTOR,
                  n_iter: int = 20, many_outliers: bool = False) -> tuple[float, np.ndarray]:
    """Variance ``tau^2`` of a random effect seen through noise, with outlier rejection.

    ``values_i = e_i + n_i`` with ``e_i ~ N(0, tau^2)`` and known noise variance
    ``noise_var_i``.  Values beyond ``factor * sqrt(tau^2 + noise_var)`` are
    outliers and left out; ``tau^2`` is the weighted mean (weights ``1 /
    (tau^2 + noise_var)^2``) of ``values^2 / c - noise_var`` over the others,
    with ``c`` (:func:`truncated_second_moment`) correcting for the Gaussian
    tail the cut removes (0.973 at 3 sigma), iterated to convergence from a
    median-based start.  A cut at 3 sigma rather than 5 matters where many
    sources are variable: on a simulated field with 15 % of the bright stars
    variable, the scale error came out 0.034 with a 5-sigma cut, 0.016 with
    3 sigma, against 0.015 on the non-variable stars alone.

    With many outliers the clipping has more than one fixed point, and the
    median start (which assumes most values are inliers) can land on one
    that keeps the moderate outliers.  ``many_outliers=True`` also iterates
    from the maximum-likelihood ``tau^2`` of a Gaussian-plus-uniform mixture
    (:func:`_mixture_start`) and takes that fixed point when it is lower and
    keeps at least half of the values (at most ``2 MIN_SOURCES`` of them) and
    at least :data:`MIN_SOURCES`: on a simulated field where 18 of 42 bright
    stars were variable (amplitudes 5-100 %), the median start gave a scale
    error of 0.051 with three variable stars kept, the mixture start 0.008.
    The half guards the small samples (4-6 stars), where a mixture
    "explains" the spread by calling two or three stars outliers; with many
    sources ten that agree are enough: in an independent-simulator visit
    whose template held 22 of its 42 brightest sources as transients that
    had faded, the 20 static ones agreed to 0.005, and "half" gave 0.40,
    under which none of the transients was reported.  Returns ``(tau^2,
    kept)``.
    """
    values, noise_var = np.asarray(values, float), np.asarray(noise_var, float)
    if values.size == 0:
        return 0.0, np.zeros(0, bool)
    # the median of a chi^2 with 1 degree of freedom is 0.455 of its mean
    start = max(float(np.median(values**2) / 0.4549 - np.median(noise_var)), 0.0)
    tau2, keep = _clip_from(values, noise_var, start, factor, n_iter)
    if many_outliers:
        low_tau2, low_keep = _clip_from(values, noise_var, _mixture_start(values, noise_var),
                                        factor, n_iter)
        if low_tau2 < tau2 and low_keep.sum() >= max(MIN_SOURCES,
                                                      min(0.5 * values.size, 2 * MIN_SOURCES)):
            return low_tau2, low_keep
    return tau2, keep


def _flux_changes(xy: np.ndarray, peak: np.ndarray, a: np.ndarray,
                  a_var: np.ndarray) -> np.ndarray:
    """``(n, 5)`` rows ``x, y, S_f, a, z``: each scene source's flux change and its significance.

    ``S_f`` is the filtered scene at the source's peak (its flux times
    ``sum(P h)``), so ``a S_f / sum(P h)`` is the change in flux units.

    ``a`` is the scale amplitude fitted together with the gradient *and* the
    width term, so that shift and width residuals, which change no flux,
    stay out of it; ``z = a / sqrt(var_a + tau^2)`` with ``tau`` the sources'
    own scatter of that amplitude (:func:`random_effect`, ``many_outliers``).
    A variable star is a source with a large ``|z|``
    (:func:`diffim.detect.variable_scene_sources`).
    """
    tau2, _ = random_effect(a, a_var, many_outliers=True)
    return np.column_stack([xy, peak, a, a / np.sqrt(a_var + tau2)])


#: A source's own shape terms (:func:`_local_terms`) cover a disc of this many
#: times the measuring disc's radius: the filtered residual reaches further
#: than the pixels it was fitted on.
LOCAL_RADII = 2


def _local_terms(theta, var, xy, z_scale, tau2s) -> np.ndarray:
    """Rows ``x, y, shift^2, width^2, shear^2`` of the sources with their own shape residual.

    The image's shift, width and shear terms are random effects over its
    sources; a source whose amplitudes of a term are outliers of it (mean
    ``theta^2 / (var + tau^2)`` over the term's components above
    ``OUTLIER_FACTOR^2``) while its flux did not change (``|z_scale| <
    OUTLIER_FACTOR``, :func:`_flux_changes`) keeps its own excess ``mean(theta^2
    - var) - tau^2`` of that term.  Such residuals are where the models
    are extrapolated (bright stars within a PSF width or two of an image
    edge, where the measuring discs used to be cut off and never counted),
    at a star whose centroid a neighbour pulls, or a binary: one value per
    image covers them only by hiding every other star's neighbourhood.  A
    variable star or a transient on a source changes the flux (``z``) and
    keeps only the image's terms.  Columns of ``theta`` as in
    :func:`measure_systematics`.
    """
    groups = ((slice(1, 3), tau2s[0]), (slice(3, 4), tau2s[1]), (slice(5, 7), tau2s[2]))
    excess = np.zeros((len(theta), 3))
    for k, (cols, tau2) in enumerate(groups):
        t2, v = theta[:, cols] ** 2, var[:, cols]
        outlier = (t2 / (v + tau2)).mean(axis=1) > OUTLIER_FACTOR**2
        excess[:, k] = np.where(outlier, np.maximum((t2 - v).mean(axis=1) - tau2, 0.0), 0.0)
    rows = (np.abs(z_scale) < OUTLIER_FACTOR) & (excess > 0).any(axis=1)
    return np.column_stack([xy[rows], excess[rows]])


def measure_systematics(diff_img: np.ndarray, diff_var: np.ndarray, bad: np.ndarray,
                        scene: np.ndarray, h: np.ndarray, c_filter: float, rho: np.ndarray,
                        sources_xy: np.ndarray, *, radius: int,
                        wing_sigma: float, psf: np.ndarray, c_psf: float) -> Systematics:
    """Measure ``eps``, ``delta``, ``zeta``, ``xi`` and ``omega`` around bright scene sources.

    And the flux factor (:func:`flux_factor`) on those whose own flux change
    is not significant.

    Parameters
    ----------
    diff_img, diff_var : ndarray (ny, nx)
        Difference image and its per-pixel variance.
    bad : ndarray of bool (ny, nx)
        Unusable pixels (left out of the filters, as in detection).
    scene : ndarray (ny, nx)
        The static scene (template in the visit frame), any scale.
    h : ndarray (K, K)
        Detection filter; ``c_filter`` its noise factor.
    rho : ndarray
        Noise correlation of the difference (:func:`diffim.detect.noise_correlation`).
    sources_xy : ndarray (n, 2) int
        Integer ``(x, y)`` of bright scene sources.
    radius : int
        Disc radius (pixels) around each source for ``eps``, ``delta``, ``zeta`` and ``xi``;
        ``omega`` is fitted on the annulus out to :data:`WING_RADII` times it.
    wing_sigma : float
        Blur (pixels) of the wing template ``W_f``.
    psf : ndarray (K, K)
        The difference's PSF (unit sum, centred), of ``h``'s shape: the flux
        factor is measured on PSF fits with it (``c_psf`` their noise factor,
        :func:`diffim.detect.detection_filter`).

    Returns
    -------
    Systematics
    """
    rho_f = filtered_noise_correlation(h, rho, 2 * radius)
    fits, xy_used, peaks = [], [], []
    sources_xy = np.asarray(sources_xy, int).reshape(-1, 2)
    for (x, y), terms in zip(sources_xy, _disc_terms(diff_img, diff_var, bad, scene, h,
                                                     c_filter, sources_xy, radius)):
        if terms is not None:
            f, vf, design, yx = terms
            # scale and shift from (S_f, grad S_f) alone, the width from all four columns:
            # lap S_f is correlated with S_f, and fitting it with the scale would leave the
            # scale to the few brightest stars of a small image (a tiny dataset's eps went
            # from 0 to 0.023 between two encodings of the same pixels)
            cov_f = _noise_covariance(vf, yx, rho_f)
            fit3 = _amplitudes(f, vf, design[:, :3], cov_f)
            fit4 = _amplitudes(f, vf, design[:, :4], cov_f)
            fit6 = _amplitudes(f, vf, design, cov_f)
            if fit3 is not None and fit4 is not None and fit6 is not None:
                # columns: a, b_x, b_y (3-column fit), c, a of the 4-column fit, e1, e2
                fits.append((np.concatenate([fit3[0], [fit4[0][3], fit4[0][0]], fit6[0][4:]]),
                             np.concatenate([np.diag(fit3[1]), [fit4[1][3, 3], fit4[1][0, 0]],
                                             np.diag(fit6[1])[4:]])))
                xy_used.append((x, y))
                peaks.append(float(design[:, 0].max()))
    if len(fits) < MIN_SOURCES:
        return Systematics()
    theta = np.array([t for t, _ in fits])
    var = np.array([v for _, v in fits])
    eps2, keep = random_effect(theta[:, 0], var[:, 0], many_outliers=True)
    # The shape terms from every source, each with its own outlier cut: a variable
    # star (an outlier of the scale) changes its flux, not its position or profile,
    # and its shape amplitudes are fitted beside the scale.  Leaving the scale's
    # outliers out too had left the shift to the few sources of a crowded visit that
    # were neither (26 of 49 on one independent-simulator image) and under-stated it.
    # The shift is isotropic: both axes are draws of one random effect.
    delta2, _ = random_effect(theta[:, 1:3].ravel(), var[:, 1:3].ravel())
    zeta2, _ = random_effect(theta[:, 3], var[:, 3])
    # the shear, like the shift, has two components of one random effect
    xi2, _ = random_effect(theta[:, 5:7].ravel(), var[:, 5:7].ravel())
    changes = _flux_changes(np.asarray(xy_used, float), np.array(peaks), theta[:, 4], var[:, 4])
    local = _local_terms(theta, var, np.asarray(xy_used), changes[:, 4], (delta2, zeta2, xi2))
    g = _wing_kernel(wing_sigma)
    kept_xy = np.asarray(xy_used)[keep]
    wings = _wing_terms(diff_img, diff_var, bad, scene, h, g, c_filter, kept_xy,
                        radius, WING_RADII * radius)
    omega2 = (_wing_variance(wings, eps2, delta2, zeta2, xi2) if len(wings) >= MIN_SOURCES
              else 0.0)
    out = Systematics(scale_error=float(np.sqrt(eps2)), shift_error=float(np.sqrt(delta2)),
                      wing_error=float(np.sqrt(omega2)), wing_sigma=float(wing_sigma),
                      n_sources=int(keep.sum()), width_error=float(np.sqrt(zeta2)),
                      shear_error=float(np.sqrt(xi2)), sources=changes, local=local,
                      local_radius=LOCAL_RADII * radius)
    # the flux factor on the static ones (a variable star's change is not a residual)
    static_xy = np.asarray(xy_used)[np.abs(changes[:, 4]) < OUTLIER_FACTOR]
    out = replace(out, flux_factor=flux_factor(*_centre_flux_terms(
        diff_img, diff_var, bad, scene, h, static_xy, out, psf, c_psf)))
    logger.info("systematic residuals at %d scene sources (%d outliers left out): "
                "scale %.4f, shift %.4f px, width %.4f px^2, shear %.4f px^2, wings %.4f; "
                "%d sources with their own shape terms; flux factor %.3f on %d static sources",
                out.n_sources, int((~keep).sum()), out.scale_error, out.shift_error,
                out.width_error, out.shear_error, out.wing_error, len(local), out.flux_factor,
                len(static_xy))
    return out
