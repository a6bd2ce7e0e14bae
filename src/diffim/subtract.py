"""Image differencing: Alard-Lupton PSF matching, subtraction, noise decorrelation.

Conventions (see :mod:`diffim`): arrays ``[y, x]``, pixel ``(0, 0)`` is the centre
of the first pixel, images in nJy per pixel, variances in nJy^2.

Overview of :func:`subtract_images`
-----------------------------------
1. **Direction.**  The image with the *narrower* PSF (``A``) is convolved with a
   matching kernel ``k`` so that it matches the other one (``B``); nothing is
   ever deconvolved.  Normally the template is sharper (``mode =
   "convolve_template"``, ``DIFF = SCI - k (x) TMPL - bg``).  When the science
   image is sharper (``"convolve_science"``, HOTPANTS style) the science image
   is convolved and the result is divided by the local kernel sum so that the
   difference stays in the science image's photometric scale:
   ``DIFF = (k (x) SCI + bg - TMPL) / sum(k)``.  The sign is always
   science minus template (brightening positive).
2. **Kernel.**  ``k(x, y) = sum_s P_s(u, v) sum_j a_js B_j`` with ``B_j`` the
   Alard-Lupton basis (Gaussians times polynomials, widths scaled to
   ``sqrt(|sigma_sci^2 - sigma_tmpl^2|)``) and ``P_s`` the 2-D monomials of
   :func:`diffim.psf.poly_terms`.  The basis is arranged so that only ``B_0``
   has a nonzero sum: the kernel sum (photometric scale) is ``a_00``, one
   number per image (only the kernel's shape varies in space).  A
   differential background polynomial is fitted jointly.  The fit uses
   stamps around isolated, unmasked, bright template sources spread over a
   grid of cells (found on the template in either direction), with
   iterative clipping of stamps whose residual chi^2 per pixel is an outlier.
   With too few stamps the kernel is fitted to the two PSF *models* instead
   (``kernel_source = "psf_models"``).  The spatial order actually used (0 up
   to ``kernel_spatial_order``) is chosen by 5-fold cross-validation over the
   stamps (few stamps cannot constrain an order-1 kernel).  When the science
   image is convolved, its (white) noise biases a plain least-squares kernel
   towards too much smoothing (errors in variables); 90 % of the expected
   noise term is removed from the normal equations (:func:`_noise_bias`).
3. **Decorrelation** (Reiss & Lupton 2016, ``convolve_template`` only): the
   convolution correlates the noise of ``A``; the difference is convolved with ``phi``,
   ``phi_hat = sqrt((s_B^2 + kappa^2 s_A^2) / (s_B^2 + |k_hat|^2 s_A^2))``
   (mean variances, kernel at the image centre, ``phi_hat(0) = 1`` so fluxes are
   kept), which whitens the noise.  The variance plane is propagated with the
   same kernels and the difference PSF is convolved with ``phi``.  In
   ``convolve_science`` the unconvolved term is the template, a PSF-matched
   coadd whose noise is already correlated: the formula does not apply, the
   per-pixel variance is propagated as is, and detection accounts for the
   measured noise correlation (:func:`diffim.detect.noise_correlation`).

Masked pixels: pixels of ``A`` that are unusable are zero-filled before the
convolution and their mask bits are grown by the kernel's 99 % footprint
radius + 1 (:func:`footprint_radius`); cosmic rays, bad pixels and NaN
pixels inside the image only as far as the light they hide reaches
(:func:`_flux_grown`, :func:`_hidden_flux_reach`).  In the
difference, ``NO_DATA`` / ``NO_TEMPLATE`` pixels (and a border strip of that
width, where the convolution is incomplete, flagged
``NO_DATA | EDGE``) are NaN; ``BAD`` / ``SAT`` / ``CR`` pixels are set to 0 (they
keep their mask bits and must not be measured).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field, replace

import numpy as np
from scipy import fft as sp_fft
from scipy import signal
from scipy.interpolate import RegularGridInterpolator

from . import masks
from .errors import InsufficientKernelSourcesError
from .exposure import Exposure
from .kernel import FourierImage, bin_sum, dilate, fft_convolve, nan_holes
from .psf import FWHM_PER_SIGMA, PsfModel, moments_fwhm, n_poly_terms, poly_terms
from .residuals import random_effect, scale_amplitudes
from .stats import robust_std

logger = logging.getLogger(__name__)

MODES = ("auto", "convolve_template", "convolve_science")
#: Mask planes of the inputs that are not carried into the difference (they
#: describe the input's own detections, not the difference's).
_DROPPED_PLANES = ("DETECTED", "DETECTED_NEGATIVE")
#: Planes that make a pixel unusable; pixels of the convolved image with one of
#: these are zero-filled and the plane is grown by the kernel's footprint
#: (:func:`footprint_radius`; CR and BAD only as far as the flux they hide
#: reaches, :data:`_FLUX_GROWN_PLANES`).
_GROWN_PLANES = ("NO_DATA", "BAD", "SAT", "CR", "NO_TEMPLATE")
_NAN_PLANES = ("NO_DATA", "NO_TEMPLATE")
#: Planes of the convolved image grown only as far as the flux they hide
#: reaches through the kernel (:func:`_hidden_flux_reach`), and at least
#: :data:`MIN_GROW` pixels (a cosmic ray's unmasked wings); the others are
#: grown by the kernel's whole footprint.
_FLUX_GROWN_PLANES = ("BAD", "CR")
MIN_GROW = 2
#: Hidden flux reaching a difference pixel above this fraction of the
#: unconvolved image's noise there makes the pixel unusable.
HIDDEN_FLUX_SIGMA = 0.1
#: A masked pixel hides a source's light, for the kernel fit, where the
#: template's matched-filter significance exceeds this (sigma): zero-filled,
#: such a pixel biases the kernel model of every stamp pixel within the
#: kernel's reach (:func:`hidden_pixels`).
HIDDEN_SOURCE_SIGMA = 5.0
#: The significance of :data:`HIDDEN_SOURCE_SIGMA` is looked for this many
#: (binned) pixels around a masked pixel (it is 0 on masked pixels themselves).
HIDDEN_SEARCH = 2
_ZERO_PLANES = ("BAD", "SAT", "CR")
#: Block size (pixels) of :attr:`SubtractionResult.template_share`.
SHARE_BIN = 8
#: A flux-scale residual of the kernel at its stars is removed when it exceeds
#: its error this many times (:func:`_remove_scale_residual`).
SCALE_RESIDUAL_SIGMA = 3.0
#: The flux-scale check (:func:`scale_residual`) uses at most this many of the
#: template's brightest sources (peak S/N >= 100); the error of the mean is set
#: by the brightest few.
SCALE_SOURCES = 100
#: Fraction of the noise term kept in the de-biased kernel normal equations
#: (:func:`_noise_bias`).  Removing all of it leaves the frequencies where the
#: convolved image has no signal undetermined (kernel sum of squares 0.16
#: instead of 0.03 on the pipeline data, noise-dominated high frequencies);
#: keeping 10 % acts as a ridge on exactly those directions while cutting the
#: core bias tenfold (star core residual -2.6 % -> -0.3 % of the science peak,
#: -0.05 % with 5 %, 1.0 -> 1.06 stamp chi^2).
_DEBIAS_KEEP = 0.1
#: Prior width of the kernel's shape around the PSF-model kernel
#: (:class:`ShapePrior`), per unit-norm basis coefficient and relative to the
#: kernel sum.
SHAPE_PRIOR_SIGMA = 0.01
#: The PSF models' kernel is a shape prior only when it is nearly positive:
#: ``sum |k| <= SHAPE_PRIOR_MAX_L1 * sum k`` at the image centre.  A kernel
#: from a PSF to one only a little broader deconvolves (``sum |k| / sum k`` of
#: 240-280 from a template to a visit 9 % broader, on an independent
#: simulation): there the stamps decide alone.
SHAPE_PRIOR_MAX_L1 = 2.0


# --------------------------------------------------------------------------
# Small helpers
# --------------------------------------------------------------------------

#: Rows per block in :func:`poly_field`.
_POLY_ROWS = 256


def poly_field(coeffs: np.ndarray, order: int, shape: tuple[int, int], *,
               width: int | None = None, height: int | None = None,
               dtype=np.float32) -> np.ndarray:
    """Evaluate ``sum_s coeffs[s] P_s(u, v)`` on every pixel of an image.

    ``u, v`` are scaled as in :meth:`diffim.psf.PsfModel.scaled_uv` with
    ``width, height`` (default: the image shape).
    """
    ny, nx = shape
    width = nx if width is None else width
    height = ny if height is None else height
    u = (2.0 * np.arange(nx) / max(width - 1, 1) - 1.0).astype(dtype)
    v = (2.0 * np.arange(ny) / max(height - 1, 1) - 1.0).astype(dtype)
    out = np.zeros(shape, dtype=dtype)
    for r0 in range(0, ny, _POLY_ROWS):  # in row blocks: no image-sized temporaries
        block, vb = out[r0:r0 + _POLY_ROWS], v[r0:r0 + _POLY_ROWS]
        idx = 0
        for deg in range(order + 1):
            for j in range(deg + 1):
                block += (coeffs[idx] * vb**j)[:, None].astype(dtype) * (u ** (deg - j))[None, :]
                idx += 1
    return out


# --------------------------------------------------------------------------
# Kernel basis and the matching kernel
# --------------------------------------------------------------------------

def basis_sigmas(sigma_a: float, sigma_b: float, n: int = 3, *, beta: float = 2.0,
                 min_sigma: float = 0.7) -> tuple[float, ...]:
    """Widths (pixels) of the ``n`` Alard-Lupton Gaussians.

    ``sigma_m = sqrt(|sigma_b^2 - sigma_a^2|)`` (Gaussian-equivalent sigmas of
    the two PSFs); the widths are ``sigma_m * beta**(i - 1)`` for
    ``i = 0 .. n-1`` (``sigma_m / beta, sigma_m, sigma_m * beta, ...``), the
    first at least ``min_sigma`` and each at least 1.5x the previous one (as
    LSST's ``makeKernelBasisList``, with its minimum-sigma floor).
    """
    sm = np.sqrt(abs(sigma_b**2 - sigma_a**2))
    out = [max(sm / beta, min_sigma)]
    for i in range(1, n):
        out.append(max(sm * beta ** (i - 1), 1.5 * out[-1]))
    return tuple(float(s) for s in out)


def alard_lupton_basis(size: int, sigmas=(0.7, 1.5, 3.0), degrees=(4, 2, 2)) -> np.ndarray:
    """Alard-Lupton basis images, shape ``(n_basis, size, size)``.

    ``exp(-r^2 / 2 s^2) x^i y^j`` for each width ``s`` and ``i + j <= degree``.
    Basis 0 is the first Gaussian with unit sum; every other image has zero
    sum (its sum times basis 0 is subtracted) and unit L2 norm, so the kernel
    sum is the coefficient of basis 0.
    """
    if len(sigmas) != len(degrees):
        raise ValueError(f"need one degree per Gaussian, got sigmas={sigmas}, degrees={degrees}")
    c = size // 2
    y, x = np.mgrid[:size, :size].astype(float) - c
    out = []
    for sig, deg in zip(sigmas, degrees):
        g = np.exp(-0.5 * (x**2 + y**2) / sig**2)
        for d in range(deg + 1):
            for j in range(d + 1):
                out.append(g * x ** (d - j) * y**j)
    b0 = out[0] / out[0].sum()
    basis = [b0]
    for b in out[1:]:
        b = b - b.sum() * b0
        basis.append(b / np.sqrt((b**2).sum()))
    return np.array(basis)


@dataclass(frozen=True)
class MatchingKernel:
    """Spatially varying convolution kernel ``k(x, y) = sum_s P_s(u, v) images[s]``.

    Attributes
    ----------
    images : ndarray (n_spatial, k, k)
        Coefficient images of the spatial monomials (term 0 = value at the image
        centre); ``u, v`` scaled to ``width, height`` as for
        :class:`diffim.psf.PsfModel`.
    order : int
        Spatial polynomial order.
    width, height : int
        Image size (pixels).
    """

    images: np.ndarray
    order: int
    width: int
    height: int

    @property
    def size(self) -> int:
        """Kernel size (odd, pixels)."""
        return self.images.shape[1]

    def at(self, x: float | None = None, y: float | None = None) -> np.ndarray:
        """Kernel image at pixel ``(x, y)`` (default: centre); not normalised."""
        x = (self.width - 1) / 2.0 if x is None else x
        y = (self.height - 1) / 2.0 if y is None else y
        u = 2.0 * x / max(self.width - 1, 1) - 1.0
        v = 2.0 * y / max(self.height - 1, 1) - 1.0
        return np.tensordot(poly_terms(u, v, self.order), self.images, axes=(0, 0))

    def sum_field(self, shape=None) -> np.ndarray:
        """Kernel sum (photometric scale) at every pixel, float32 image."""
        shape = (self.height, self.width) if shape is None else shape
        return poly_field(self.images.sum(axis=(1, 2)), self.order, shape,
                          width=self.width, height=self.height)

    def sum_stats(self, n: int = 11) -> tuple[float, float]:
        """Kernel sum at the centre and its std over an ``n x n`` grid."""
        xs = np.linspace(0, self.width - 1, n)
        ys = np.linspace(0, self.height - 1, n)
        sums = [self.at(x, y).sum() for x in xs for y in ys]
        return float(self.at().sum()), float(np.std(sums))

    def convolve(self, image: np.ndarray) -> np.ndarray:
        """Convolve ``image`` with the spatially varying kernel.

        The kernel is evaluated at the *output* pixel:
        ``out(x) = sum_s P_s(u, v) (images[s] (x) image)(x)``, exact for the
        polynomial kernel model (one FFT convolution per spatial term).
        """
        ny, nx = image.shape
        u = (2.0 * np.arange(nx) / max(self.width - 1, 1) - 1.0).astype(image.dtype)
        v = (2.0 * np.arange(ny) / max(self.height - 1, 1) - 1.0).astype(image.dtype)
        fim = FourierImage(image, self.size)  # one forward FFT for all spatial terms
        out = fim.convolve(self.images[0], last=len(self.images) == 1)
        s = 1
        for deg in range(1, self.order + 1):
            for j in range(deg + 1):
                term = fim.convolve(self.images[s], last=s == len(self.images) - 1)
                if deg - j:
                    term *= (u ** (deg - j))[None, :]
                if j:
                    term *= (v**j)[:, None]
                out += term
                s += 1
        return out


# --------------------------------------------------------------------------
# Kernel candidates
# --------------------------------------------------------------------------

def select_kernel_candidates(reference: Exposure, other: Exposure, *, half: int,
                             margin: int, min_snr: float = 20.0,
                             max_snr: float = 1.0e5, cell_size: int = 512,
                             max_candidates: int = 150, detect_sigma: float = 5.0,
                             bad: np.ndarray | None = None,
                             core: int | None = None,
                             significance: tuple[np.ndarray, int] | None = None,
                             hidden: np.ndarray | None = None) -> np.ndarray:
    """Isolated, unmasked, well-measured sources for the kernel fit.

    Sources are found on ``reference`` (normally the less noisy template) as
    connected regions of its matched-filter significance above
    ``detect_sigma`` (computed on 2 x 2 binned pixels for images of 2048
    pixels or more, for speed); each region is one candidate at its brightest
    pixel.  A candidate is kept when its peak significance is in
    ``[min_snr, max_snr]``, no other region with a brighter peak lies within
    the stamp, it is at least ``half + margin`` pixels from the border, and
    neither image has a :data:`diffim.masks.BAD_FOR_FIT` pixel within ``core +
    margin`` of it (``core`` defaults to ``half``: the whole stamp).  With a
    smaller ``core`` the fit leaves out the stamp pixels that a masked pixel
    can reach through the kernel (:func:`fit_matching_kernel` with ``bad``),
    so a cosmic ray 30 px from a bright star no longer costs the star.  With
    ``hidden`` (:func:`hidden_pixels`) only those masked pixels reach that
    far; any other masked pixel only costs a candidate within ``core +``
    :data:`MIN_GROW`.  On three images of the independent simulator,
    cosmic rays, bad columns and NaN pixels within ``core + margin`` (~35
    px) had refused 29-48 % of the stars that passed the border and
    isolation tests (a fifth to a quarter of those are now kept), among
    them one image's brightest star (for a bad column 35 px away), and the
    fainter stars left could not fix the kernel's outer parts: rings at
    2-4 FWHM around every bright star.  The
    size of a region is not limited: the 5-sigma footprint of a bright star
    in a deep template is wider than a 41-px stamp (with Kolmogorov-like PSF
    wings every star brighter than S/N ~300 was lost), and the stamp need not
    hold all of a source.  The
    image is divided into square cells of ``cell_size`` pixels (at least
    3 x 3) and the brightest point-like candidates of each cell are taken
    (no broader than the stars, :class:`_CandidateSizes`: galaxies are left
    out), at most ``ceil(max_candidates / n_cells)`` per cell, so they
    spread over the field.
    ``bad``, when given, replaces the unusable-pixel image computed from both
    masks (:data:`diffim.masks.BAD_FOR_FIT`) and non-finite values;
    ``significance``, when given, is the ``(map, binning)`` of
    :func:`diffim.detect.binned_significance` of ``reference`` with that
    ``bad`` (computed once when both directions are fitted).  ``hidden``,
    when given, are the masked pixels whose zero-filled value matters
    through the kernel (default: all of ``bad``).

    Returns
    -------
    xy : ndarray (n, 2) int
        Integer pixel positions ``(x, y)`` of the stamp centres.
    """
    from .detect import binned_significance, label_peaks, refine_binned_peak  # (local import)

    ny, nx = reference.shape
    if bad is None:
        bad_any = _unusable(reference, masks.BAD_FOR_FIT) | _unusable(other, masks.BAD_FOR_FIT)
    else:
        bad_any = bad
    img = np.where(bad_any, np.float32(0), reference.image.astype(np.float32, copy=False))
    sig, f = significance if significance is not None else \
        binned_significance(img, reference.variance, reference.psf.at(), bad_any)
    peaks, pos, _ = label_peaks(sig, detect_sigma)
    if len(peaks) == 0:
        return np.zeros((0, 2), dtype=int)
    pos = pos * f
    reach = half + margin
    clear = (half if core is None else int(core)) + margin
    px, py = pos[:, 1], pos[:, 0]
    keep = []
    for i in np.argsort(-peaks):
        if not min_snr <= peaks[i] <= max_snr:
            continue
        x, y = refine_binned_peak(img, px[i], py[i], f)
        if x < reach or y < reach or x >= nx - reach or y >= ny - reach:
            continue
        near = (np.abs(px - x) <= half) & (np.abs(py - y) <= half) & (peaks > peaks[i])
        if near.any() or _masked_near(bad_any, hidden, x, y, clear, clear - margin + MIN_GROW):
            continue
        keep.append((i, x, y))
    if not keep:
        return np.zeros((0, 2), dtype=int)
    xy = np.array([(x, y) for _, x, y in keep])  # sorted by brightness
    snr = peaks[[i for i, _, _ in keep]]
    ncx = max(3, int(np.ceil(nx / cell_size)))
    ncy = max(3, int(np.ceil(ny / cell_size)))
    cell = (xy[:, 1] * ncy // ny) * ncx + (xy[:, 0] * ncx // nx)
    per_cell = int(np.ceil(max_candidates / (ncx * ncy)))
    sizes = _CandidateSizes(img, reference.psf, xy, snr)
    chosen = np.sort(np.concatenate([sizes.first_point_like(np.nonzero(cell == c)[0], per_cell)
                                     for c in np.unique(cell)]))
    return xy[chosen]


def _masked_near(bad: np.ndarray, hidden: np.ndarray | None, x: int, y: int, far: int,
                 near: int) -> bool:
    """Whether a ``hidden`` pixel is within ``far`` of ``(x, y)`` or a ``bad`` one within ``near``.

    Chebyshev distances (square boxes).  Without ``hidden`` every ``bad``
    pixel counts as hidden.
    """
    box = (slice(max(y - far, 0), y + far + 1), slice(max(x - far, 0), x + far + 1))
    if not bad[box].any():
        return False
    if hidden is None:
        return True
    near_box = (slice(max(y - near, 0), y + near + 1), slice(max(x - near, 0), x + near + 1))
    return bool(hidden[box].any() or bad[near_box].any())


def hidden_pixels(bad_a: np.ndarray, bad_b: np.ndarray,
                  significance: tuple[np.ndarray, int],
                  threshold: float = HIDDEN_SOURCE_SIGMA) -> np.ndarray:
    """Masked pixels of the convolved image ``A`` that hide a source's light.

    ``A`` is zero-filled (= sky) on its masked pixels ``bad_a``.  Where the
    scene is empty sky that costs the kernel fit nothing, so such pixels need
    not keep the stamp pixels they reach through the kernel out of the fit.
    Where a source lies under them, every stamp pixel within the kernel's
    half-width is modelled without part of its light.  A pixel hides a
    source where the template's matched-filter ``significance`` (``(map,
    binning)`` of :func:`diffim.detect.binned_significance`, which is 0 on
    masked pixels) exceeds ``threshold`` within :data:`HIDDEN_SEARCH` binned
    pixels, or where ``B`` is masked too (``bad_b``: nothing says what is
    there).

    Returns
    -------
    ndarray of bool
        Same shape as ``bad_a``; a subset of it.
    """
    sig, f = significance
    out = bad_a & bad_b
    ys, xs = np.nonzero(bad_a & ~bad_b)
    if ys.size:
        source_near = dilate(sig > threshold, HIDDEN_SEARCH)
        out[ys, xs] = source_near[np.minimum(ys // f, sig.shape[0] - 1),
                                  np.minimum(xs // f, sig.shape[1] - 1)]
    return out


#: Size noise of a source's adaptive-moment FWHM relative to the stars', times
#: its peak significance: stars on the templates of the independent simulator
#: scatter by about +-3 / S/N (+-0.1 at S/N 30, +-0.01 above S/N 300).
SIZE_NOISE_SNR = 3.0
#: Smallest size excess (fraction of the stars' FWHM) that marks a kernel
#: candidate as extended, however bright.
MIN_SIZE_EXCESS = 0.05
#: The stars' size is the median over the (at most) :data:`SIZE_REFERENCE_COUNT`
#: brightest candidates of peak significance >= :data:`SIZE_REFERENCE_SNR`.
SIZE_REFERENCE_SNR = 50.0
SIZE_REFERENCE_COUNT = 50


class _CandidateSizes:
    """Sizes of kernel candidates, measured when asked, against the stars' size.

    A candidate's size is its adaptive-moment FWHM (:func:`diffim.psf.moments_fwhm`,
    on a stamp of half-size ``2 FWHM``) over the PSF model's at its position
    (from a 4 x 4 grid, interpolated).  The stars' size is the median over
    the brightest candidates (:data:`SIZE_REFERENCE_COUNT` of S/N >=
    :data:`SIZE_REFERENCE_SNR`, or all of the brightest when fewer than 5),
    so that a PSF model a few per cent off does not make every star
    extended.  Extended: an excess above :data:`MIN_SIZE_EXCESS` and ``3
    SIZE_NOISE_SNR / snr``, or no measurable size.  A galaxy constrains the
    kernel's outer parts through its own extent and may host a transient: on
    the independent simulator, where about 40 % of the kernel candidates were
    galaxies, one sharp visit's kernel came out with a sum of 0.91 and about
    30 % of its flux beyond 6 px (stars only: 0.99, compact).  Sizes are
    measured lazily: a crowded 4k image has thousands of candidates (~2.5 ms
    each), of which a few hundred are needed.
    """

    def __init__(self, img, psf: PsfModel, xy: np.ndarray, snr: np.ndarray):
        self.img, self.xy, self.snr = img, xy, snr
        ny, nx = img.shape
        gx, gy = np.linspace(0, nx - 1, 4), np.linspace(0, ny - 1, 4)
        grid = np.array([[moments_fwhm(psf.at(float(x), float(y))) for x in gx] for y in gy])
        self._psf_fwhm = RegularGridInterpolator((gy, gx), grid)
        self._size = np.full(len(xy), np.nan)
        self._done = np.zeros(len(xy), bool)
        bright = np.flatnonzero(snr >= SIZE_REFERENCE_SNR)[:SIZE_REFERENCE_COUNT]
        if bright.size < 5:
            bright = np.arange(min(len(xy), SIZE_REFERENCE_COUNT))
        ref = np.array([self.size(k) for k in bright])
        ref = ref[np.isfinite(ref)]
        self.reference = float(np.median(ref)) if ref.size else float("nan")

    def size(self, k: int) -> float:
        """FWHM of candidate ``k`` over the PSF model's (NaN: not measurable)."""
        if not self._done[k]:
            x, y = self.xy[k]
            f_psf = float(self._psf_fwhm((y, x)))
            h = int(np.ceil(2.0 * f_psf)) if np.isfinite(f_psf) else 0
            img = self.img
            if h >= 2 and h <= y < img.shape[0] - h and h <= x < img.shape[1] - h:
                self._size[k] = moments_fwhm(img[y - h:y + h + 1, x - h:x + h + 1]) / f_psf
            self._done[k] = True
        return self._size[k]

    def point_like(self, k: int) -> bool:
        """Whether candidate ``k`` is no broader than the stars, within its size noise."""
        if not np.isfinite(self.reference):
            return True
        excess = self.size(k) / self.reference - 1.0
        limit = max(MIN_SIZE_EXCESS, 3.0 * SIZE_NOISE_SNR / max(float(self.snr[k]), 1e-3))
        return bool(np.isfinite(excess) and excess <= limit)

    def first_point_like(self, idx: np.ndarray, n: int) -> np.ndarray:
        """The first ``n`` point-like candidates of ``idx`` (in its order)."""
        out = []
        for k in idx:
            if len(out) == n:
                break
            if self.point_like(k):
                out.append(k)
        return np.array(out, dtype=int)


# --------------------------------------------------------------------------
# Kernel fit
# --------------------------------------------------------------------------

@dataclass(frozen=True)
class KernelFit:
    """Result of :func:`fit_matching_kernel`.

    Attributes
    ----------
    kernel : MatchingKernel
    background : ndarray
        Coefficients of the differential background polynomial (units of the
        reference image ``B``; ``k (x) A + bg ~ B``); empty if not fitted.
    background_order : int
        -1 when no background was fitted.
    n_candidates, n_used : int
        Stamps offered and stamps kept after clipping.
    chi2 : ndarray
        Residual chi^2 per pixel of each kept stamp.
    used_xy : ndarray (n_used, 2)
        Stamp centres used.
    """

    kernel: MatchingKernel
    background: np.ndarray
    background_order: int
    n_candidates: int
    n_used: int
    chi2: np.ndarray
    used_xy: np.ndarray


class _BasisFFT:
    """Basis images Fourier-transformed once for the per-stamp convolutions.

    For a cut-out of size ``n`` and kernels of size ``k`` the *valid* part
    (``n - k + 1`` pixels) of a circular convolution of length ``L >= n`` is the
    linear convolution, so ``L = next_fast_len(n)`` suffices.
    """

    def __init__(self, basis: np.ndarray, cut_size: int):
        self.nb, self.k = len(basis), basis.shape[1]
        self.n = cut_size
        self.size = sp_fft.next_fast_len(cut_size, real=True)
        self.fft = sp_fft.rfft2(basis, s=(self.size, self.size))

    def convolve_valid(self, cut: np.ndarray) -> np.ndarray:
        """``(nb, n-k+1, n-k+1)``: every basis image convolved with ``cut`` (valid part)."""
        f = sp_fft.rfft2(cut, s=(self.size, self.size))
        out = sp_fft.irfft2(self.fft * f, s=(self.size, self.size))
        return out[:, self.k - 1:self.n, self.k - 1:self.n]


def _stamp_normal_equations(a_cut, b_stamp, w_stamp, bfft: _BasisFFT, with_bg):
    """Per-stamp normal-equation blocks ``G = C W C^T``, ``h = C W y``, ``yWy``.

    ``C`` holds the basis images convolved with the ``A`` cut-out (valid part,
    the size of the ``B`` stamp), plus a row of ones for the background.
    """
    cols = bfft.convolve_valid(a_cut).reshape(bfft.nb, -1)
    if with_bg:
        cols = np.vstack([cols, np.ones((1, cols.shape[1]))])
    w = w_stamp.ravel()
    y = b_stamp.ravel()
    cw = cols * w
    # einsum rather than ``@``: these small products are slower through a
    # multi-threaded BLAS on a busy machine (measured 5x)
    return (np.einsum("ip,jp->ij", cw, cols), np.einsum("ip,p->i", cw, y),
            float((w * y * y).sum()))


def _noise_bias(basis_flat: np.ndarray, var_cut: np.ndarray, w_stamp: np.ndarray,
                with_bg: bool) -> np.ndarray:
    """Expected contribution of ``A``'s white noise to a stamp's ``G = C W C^T``.

    ``C_ip = sum_d B_i(d) A(p - d)``; white noise of variance ``v`` in ``A``
    adds, on average, ``sum_d B_i(d) B_j(d) M(d)`` to ``G_ij`` with
    ``M(d) = sum_p w_p v(p - d)`` (the weights correlated with the variance
    cut-out).  Subtracting it removes the errors-in-variables bias of the
    least-squares kernel: a noisy ``A`` makes the fitted kernel too smooth.
    On the pipeline data (science sharper than the coadd template, so the
    science is convolved) this bias left static stars with core residuals of
    -2.6 % of the science peak (-0.7 % of their flux).  The background row is
    noise free.  ``basis_flat`` is ``(nb, k * k)``.
    """
    k = int(round(np.sqrt(basis_flat.shape[1])))
    m = signal.fftconvolve(var_cut, w_stamp[::-1, ::-1], mode="valid")[::-1, ::-1]
    if m.shape != (k, k):
        raise RuntimeError("internal error: variance cut-out does not match the stamp")
    # einsum, not ``@``: small products are slower through a multi-threaded BLAS here
    bias = np.einsum("ip,jp->ij", basis_flat * m.ravel(), basis_flat)
    if with_bg:
        bias = np.pad(bias, ((0, 1), (0, 1)))
    return bias


@dataclass(frozen=True)
class ShapePrior:
    """Gaussian prior on the kernel's shape: the kernel computed from the two PSF models.

    Least squares on the stamps leaves some kernel shapes nearly free: a
    broad component far from the core, which a faint star's stamp cannot
    tell from its background, and which the fit then uses to follow the noise.
    On a sharp visit of an independent simulation whose brightest stamps were
    variable stars, the kernel fitted on 16 faint stamps held its expected
    flux within 8 px and -24 % beyond 14 px (kernel sum 0.76; a second fit
    without the noise de-biasing: +8 %): a negative halo 10-30 px around
    every star, 13 false detections and a 6 % flux-scale "systematic" that
    hid a variable star at S/N 13.  The kernel computed from the PSF models
    was as good on those stamps (summed chi^2) and compact.

    Each shape coefficient of the kernel's constant spatial term (unit-norm
    basis image ``i >= 1``) gets the prior ``c_i ~ N(s m_i, (sigma s)^2)``,
    with ``m`` the PSF-model kernel at the image centre
    (:func:`psf_model_coefficients`, sum ``m_0``), ``s = c_0 / m_0`` the
    fitted flux ratio and ``sigma`` relative.  Written as a penalty on ``c_i
    - (m_i / m_0) c_0`` it is linear in the coefficients and leaves the kernel
    sum to the data; ``s`` in the prior's width is the flux ratio that scales
    the model kernel best to the stamps.  A bright star constrains the shape
    far more tightly (a coefficient error of 0.01 at S/N 200 costs of order
    100 in chi^2), so the prior only decides what the stamps leave open.

    The kernel's spatial variation stays free: with the PSF models'
    variation as its prior too, cross-validation chose a spatially varying
    kernel that followed the models' extrapolation into a corner, where a
    bright star then left a -15 sigma core.

    Attributes
    ----------
    coef : ndarray (nb,)
        PSF-model kernel coefficients at the image centre.
    sigma : float
        Relative prior width (:data:`SHAPE_PRIOR_SIGMA`).
    """

    coef: np.ndarray
    sigma: float = SHAPE_PRIOR_SIGMA

    @classmethod
    def from_psf_models(cls, psf_a: PsfModel, psf_b: PsfModel, basis: np.ndarray, *,
                        width: int, height: int) -> "ShapePrior | None":
        """The prior of :func:`psf_model_kernel`, or None when that kernel deconvolves.

        See :data:`SHAPE_PRIOR_MAX_L1`.
        """
        order = 1 if max(psf_a.order, psf_b.order) > 0 else 0
        coef = psf_model_coefficients(psf_a, psf_b, basis, spatial_order=order, width=width,
                                      height=height)[:, 0]  # (term 0: the image centre)
        centre = np.tensordot(coef, basis, axes=(0, 0))
        total = float(centre.sum())
        if not (total > 0 and np.abs(centre).sum() <= SHAPE_PRIOR_MAX_L1 * total):
            return None
        return cls(coef)

    def penalty(self, G, h, nb: int, nq: int) -> np.ndarray:
        """``(nb nq, nb nq)`` matrix added to the kernel block of the normal equations.

        ``G`` (n, m, m) and ``h`` (n, m) are the stamps' normal equations
        (:func:`_solve_global`), ``nq`` the kernel's spatial terms.
        """
        m = self.coef
        if m.shape != (nb,) or not m[0] > 0:
            raise ValueError(f"shape prior of shape {m.shape} does not fit {nb} basis images")
        # the flux ratio that scales the model kernel best to the stamps
        num = float(np.einsum("k,ik->", m, h[:, :nb]))
        den = float(np.einsum("k,ikl,l->", m, G[:, :nb, :nb], m))
        s = num / den * m[0] if den > 0 and num > 0 else m[0]
        d = np.zeros((nb - 1, nb * nq))
        d[np.arange(nb - 1), np.arange(1, nb) * nq] = 1.0  # c_i of the constant term
        d[:, 0] = -m[1:] / m[0]
        return d.T @ d / (self.sigma * s) ** 2


def _solve_global(G, h, p, r, nb, prior: ShapePrior | None = None):
    """Solve the global normal equations for the kernel / background coefficients.

    ``G`` (n, m, m), ``h`` (n, m) per stamp (``m = nb`` or ``nb + 1``); ``p`` (n, nq)
    kernel spatial terms and ``r`` (n, nr) background terms at the stamp centres.
    ``prior`` adds its penalty (:class:`ShapePrior`).
    Returns ``coef`` (nb, nq) and ``bg`` (nr,).

    The kernel *sum* (the coefficient of basis 0) is one number for the whole
    image; only the kernel's shape varies in space.  Both images are
    calibrated, so their flux ratio does not change across a detector, and
    a free spatial sum absorbs noise and variable stars instead: on a sparse
    field with many variables an order-1 sum ran from 0.5 to 0.9 across one
    detector (60 false detections where its neighbour had 2).
    """
    nq, nr = p.shape[1], r.shape[1]
    akk = np.einsum("ikl,is,it->ksl t".replace(" ", ""), G[:, :nb, :nb], p, p)
    akk = akk.reshape(nb * nq, nb * nq)
    if prior is not None:
        akk = akk + prior.penalty(G, h, nb, nq)
    bk = np.einsum("ik,is->ks", h[:, :nb], p).reshape(-1)
    if nr:
        akb = np.einsum("ik,is,ib->ksb", G[:, :nb, nb], p, r).reshape(nb * nq, nr)
        abb = np.einsum("i,ib,ic->bc", G[:, nb, nb], r, r)
        bb = np.einsum("i,ib->b", h[:, nb], r)
        amat = np.block([[akk, akb], [akb.T, abb]])
        bvec = np.concatenate([bk, bb])
    else:
        amat, bvec = akk, bk
    free = np.ones(len(bvec), bool)
    free[1:nq] = False  # basis 0 x the non-constant spatial terms: a spatially varying sum
    amat, bvec = amat[np.ix_(free, free)], bvec[free]
    scale = np.sqrt(np.clip(np.diag(amat), 1e-300, None))
    a_s = amat / scale[:, None] / scale[None, :]
    try:
        # LU solve: ~20x faster than the SVD of lstsq for these ~100 x 100 systems
        sol = np.linalg.solve(a_s, bvec / scale)
        if not np.all(np.isfinite(sol)):
            raise np.linalg.LinAlgError("non-finite solution")
    except np.linalg.LinAlgError:
        sol, *_ = np.linalg.lstsq(a_s, bvec / scale, rcond=1e-12)
    full = np.zeros(len(free))
    full[free] = sol / scale
    return full[:nb * nq].reshape(nb, nq), full[nb * nq:]


def _stamp_products(G, h, coef, bg, p, r, g_signal=None):
    """``<B, M>``, ``<M, M>`` and the de-biased ``<M, M>`` of every stamp for the global solution.

    ``M`` is the stamp's model (``k (x) A + bg``) and ``<.,.>`` the weighted
    inner product of the stamp's normal equations (``h``, ``G``); the third
    uses ``g_signal`` (the de-biased normal matrices) and is the second when
    that is None or ``G`` itself.
    """
    theta = np.einsum("ks,is->ik", coef, p)
    if r.shape[1]:
        theta = np.hstack([theta, (r @ bg)[:, None]])
    mm = np.einsum("ik,ikl,il->i", theta, G, theta)
    mm_signal = (mm if g_signal is None or g_signal is G
                 else np.einsum("ik,ikl,il->i", theta, g_signal, theta))
    return np.einsum("ik,ik->i", theta, h), mm, mm_signal


def _stamp_chi2(G, h, ywy, npix, coef, bg, p, r, nb):
    """Residual chi^2 per pixel of every stamp for the global solution."""
    bm, mm, _ = _stamp_products(G, h, coef, bg, p, r)
    return (ywy - 2.0 * bm + mm) / npix


def _stamp_scale_offsets(bm: np.ndarray, mm: np.ndarray,
                         mm_signal: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Fractional flux mismatch of every stamp against the global solution.

    From :func:`_stamp_products`: ``a = <B - M, M> / <M, M>`` is the stamp's
    own flux ratio minus the fitted one (dimensionless).  ``mm_signal`` is
    ``<M, M>`` from the de-biased normal matrices: when the convolved image
    is a single noisy visit, ``<M, M>`` also holds the power of its noise
    through the kernel, which pulled a faint stamp's ``a`` far below 0 (a
    median of -0.77 over the 66 stamps of an independent-simulation visit,
    most of them faint, which then rejected the bright stars as outliers).
    The noise variance of ``a`` is ``<M, M> / mm_signal^2``.  A chi^2 per
    pixel dilutes a residual shaped like the star over the whole stamp (a
    variable star 5 % off at S/N 200 moves it by ~2 sigma); this projection
    sees it at ~10 sigma.
    """
    with np.errstate(divide="ignore", invalid="ignore"):
        return (bm - mm_signal) / mm_signal, mm / mm_signal**2


def _weighted_centre(values: np.ndarray, noise_var: np.ndarray, n_sigma_clip: float):
    """Centre and random-effect variance ``(c, tau^2)`` of stamp statistics.

    Starts at the median, then takes the mean weighted by ``1 / (noise_var +
    tau^2)`` over the values :func:`diffim.residuals.random_effect` keeps: the
    well-measured (bright) stamps set the centre, the many faint ones cannot
    drag it, and ``tau^2`` stops one very bright stamp from owning it.  The
    scatter allows for many outliers (``many_outliers=True``): a template
    made of the same epochs holds the transients, bright and point-like, and
    on one sharp visit of the independent simulator 4 of its 14 brightest
    stamps were transients with flux ratios 0.35-2.2 times the stars'.
    """
    c = float(np.median(values))
    for _ in range(2):
        tau2, keep = random_effect(values - c, noise_var, factor=n_sigma_clip,
                                   many_outliers=True)
        if not keep.any():
            break
        w = 1.0 / (noise_var[keep] + tau2)
        c = float(np.sum(w * values[keep]) / w.sum())
    tau2, _ = random_effect(values - c, noise_var, factor=n_sigma_clip, many_outliers=True)
    return c, tau2


def _outlier_stamps(chi2, npix, bm, mm, mm_signal, use, n_sigma_clip) -> np.ndarray:
    """Stamps to reject: a residual out of proportion, or a flux ratio off the fit.

    * Residual: chi^2 per pixel above ``median + n_sigma_clip * 1.4826 MAD``
      *and* an excess residual power that is an outlier as a fraction of the
      stamp's own signal power, ``q = (chi^2 - median) npix / <M, M>``
      (noise variance ``2 npix median^2 / <M, M>^2``).  A bright star's PSF
      mismatch leaves a residual in proportion to its flux: by chi^2 alone
      the five brightest stars (S/N 500-2400, chi^2 2-5 against a median of
      0.8) of an independent-simulation visit were rejected, and the kernel
      fitted on the faint rest lacked the PSF wings (kernel sum 0.72 instead
      of 1.00).  A cosmic ray, a blend or a variable star leaves a residual
      out of proportion (``q`` of 0.3-13 against 0.01-0.03 for the bright
      stars).  The stamps' scatter in ``q`` is at least
      :data:`MIN_RESIDUAL_SCATTER`: where it measured ~0, a S/N 1,670 star
      leaving ``q`` = 0.0027 was rejected, the clipping cascaded, and two
      rounds later the visit's S/N 4,660 star went too (kernel sum 0.90).
    * Flux ratio: :func:`_stamp_scale_offsets` off the centre by more than
      ``n_sigma_clip`` times its noise and the stamps' intrinsic scatter
      combined, the scatter at least :data:`MIN_SCALE_SCATTER`.  The
      centre is known no better than that: stamps of S/N 80-150 are biased
      by about 1 % (below), and when four of them (at -0.9 %, -0.9 %,
      -1.4 % and +1.7 %) and one star of S/N 4900 (at 0.0 ± 0.02 %) were
      the bright stamps of an independent-simulation visit, the faint four
      set the centre and rejected the star as a 45-sigma outlier; the
      kernel fitted without it summed to 0.907 instead of 1.003.

    The centres and scatters (:func:`_weighted_centre`) come from the stamps
    of S/N >= :data:`STAMP_SNR_FOR_SCATTER`, when there are at least
    :data:`MIN_STAMPS_FOR_SCATTER` of them.  Fainter stamps scatter more than
    their noise says (the 10 % of ``A``'s noise kept in the normal equations
    biases them low), and with most stamps faint they set a scatter of 0.3
    that let a bright variable star (``a`` = -0.57 at S/N 400) through.
    """
    med = np.median(chi2[use])
    mad = 1.4826 * np.median(np.abs(chi2[use] - med))
    high = chi2 > med + n_sigma_clip * max(mad, 1e-3 * med)
    a, a_var = _stamp_scale_offsets(bm, mm, mm_signal)
    with np.errstate(divide="ignore", invalid="ignore"):
        q = (chi2 - med) * npix / mm_signal
        q_var = 2.0 * npix * med**2 / mm_signal**2
    ok = use & np.isfinite(chi2) & np.isfinite(q) & np.isfinite(a) & (mm_signal > 0) & (a_var > 0)
    bad = use & ~ok
    ref = ok & (mm_signal >= STAMP_SNR_FOR_SCATTER**2)
    if ref.sum() < MIN_STAMPS_FOR_SCATTER:
        ref = ok
    if ref.sum() >= MIN_STAMPS_FOR_SCATTER:
        q0, tau2 = _weighted_centre(q[ref], q_var[ref], n_sigma_clip)
        tau2 = max(tau2, MIN_RESIDUAL_SCATTER**2)
        high &= q - q0 > n_sigma_clip * np.sqrt(tau2 + q_var)
        a0, tau2 = _weighted_centre(a[ref], a_var[ref], n_sigma_clip)
        tau2 = max(tau2, MIN_SCALE_SCATTER**2)
        bad |= ok & ((a - a0) ** 2 > n_sigma_clip**2 * (tau2 + a_var))
    return bad | (ok & high)


#: Smallest intrinsic scatter of the stamps' flux ratios in the flux-ratio test
#: of :func:`_outlier_stamps` (a fraction).
MIN_SCALE_SCATTER = 0.005
#: Smallest intrinsic scatter of the stamps' excess residual power ``q`` (a
#: fraction of the stamp's signal power) in the residual test of
#: :func:`_outlier_stamps`.
MIN_RESIDUAL_SCATTER = 1e-3
#: Fewest stamps for the random-effect tests of :func:`_outlier_stamps`.
MIN_STAMPS_FOR_SCATTER = 5
#: Stamps at least this bright (S/N of the kernel model, de-biased) set the
#: centres and scatters of :func:`_outlier_stamps`.
STAMP_SNR_FOR_SCATTER = 50.0


def _fit_stamps(G, h, ywy, npix, p, r, nb, *, n_sigma_clip, max_iter, min_stamps, g_fit=None,
                prior=None):
    """Global fit with iterative clipping of outlier stamps (:func:`_outlier_stamps`).

    ``g_fit`` (default ``G``) are the normal matrices solved (de-biased when
    the convolved image is a noisy single visit); ``G`` (the data's own)
    gives the residuals.

    Each round judges the stamps still in use, with centres and scatters
    from them alone, and a rejected stamp stays out.  The scatter therefore
    shrinks as outliers leave, which is what a heavily contaminated first
    fit needs: judging all stamps against every fit, with the scatter from
    all of them (rejected stamps free to return), kept the variable stars
    and blends of an independent-simulation visit whose first fit was
    pulled 14 % off (46 of 54 stamps kept, kernel sum 0.934 instead of
    1.000); on three independent-simulation data sets the false positives
    rose from 20 to 34 (twenty-third session, ``docs/quality.md``).  Where
    the survivors' scatter would vanish, the floors of
    :func:`_outlier_stamps` hold it.
    """
    g_fit = G if g_fit is None else g_fit
    use = np.ones(len(G), dtype=bool)
    for _ in range(max_iter + 1):
        if use.sum() < min_stamps:
            raise InsufficientKernelSourcesError(
                f"Only {int(use.sum())} usable kernel stamps remain after rejecting outliers, "
                f"fewer than the {min_stamps} needed for the PSF-matching kernel fit.")
        coef, bg = _solve_global(g_fit[use], h[use], p[use], r[use], nb, prior)
        bm, mm, mm_signal = _stamp_products(G, h, coef, bg, p, r, g_signal=g_fit)
        chi2 = (ywy - 2.0 * bm + mm) / npix
        bad = _outlier_stamps(chi2, npix, bm, mm, mm_signal, use, n_sigma_clip)
        if not bad.any():
            break
        use &= ~bad
    return coef, bg, chi2, use


#: Kernel stamps per spatial polynomial term for an order to be tried.  With
#: the order's own count as the floor (18 for order 2) a visit with 17 stamps
#: fell back to the PSF models' kernel although order 1 fits them (one
#: `badseeing` visit, 0 -> 29 false positives).
MIN_STAMPS_PER_TERM = 3


def _choose_spatial_order(G, g_fit, h, ywy, npix, u, v, r, nb, max_order, *, n_sigma_clip,
                          max_iter, min_stamps, n_folds: int = 5, prior=None) -> int:
    """Spatial order (0 .. ``max_order``) of the kernel with the best cross-validated chi^2.

    The stamps kept by a clipped order-0 fit are split into ``n_folds`` groups;
    each order is fitted without one group and scored by the held-out stamps'
    residual chi^2 (the per-stamp normal equations make this cheap).  With few
    stamps an order-1 kernel (3 x the coefficients) overfits: on the pipeline
    data (36 stamps, 33 basis images) it varied wildly between stamps and left
    halos of +15 nJy (6 sigma per pixel) 10-15 px around mag-17 stars, 14
    false 5-sigma detections per 1k x 1k against 8 with order 0.
    """
    p0 = poly_terms(u, v, 0).T
    _, _, _, use = _fit_stamps(G, h, ywy, npix, p0, r, nb, n_sigma_clip=n_sigma_clip,
                               max_iter=max_iter, min_stamps=min_stamps, g_fit=g_fit,
                               prior=prior)
    idx = np.flatnonzero(use)
    folds = np.arange(idx.size) % n_folds
    scores = []
    for order in range(max_order + 1):
        p = poly_terms(u, v, order).T
        if idx.size - idx.size // n_folds < max(min_stamps, MIN_STAMPS_PER_TERM * p.shape[1]):
            break
        total = 0.0
        for f in range(n_folds):
            train, test = idx[folds != f], idx[folds == f]
            coef, bg = _solve_global(g_fit[train], h[train], p[train], r[train], nb, prior)
            chi2 = _stamp_chi2(G[test], h[test], ywy[test], npix[test], coef, bg, p[test],
                               r[test], nb)
            total += float((chi2 * npix[test]).sum())
        scores.append(total)
    best = int(np.argmin(scores)) if scores else 0
    logger.debug("kernel spatial order cross-validation chi^2: %s -> order %d", scores, best)
    return best


def fit_matching_kernel(to_convolve: Exposure, reference: Exposure, candidates: np.ndarray,
                        basis: np.ndarray, *, spatial_order: int = 1,
                        background_order: int = 1, n_sigma_clip: float = 3.0,
                        max_iter: int = 5, stamp_half: int | None = None,
                        variance_factor: float = 1.0,
                        min_stamps: int | None = None,
                        debias_noise: bool = False,
                        bad: np.ndarray | None = None,
                        hidden: np.ndarray | None = None,
                        prior: ShapePrior | None = None) -> KernelFit:
    """Fit ``k (x) A + bg ~ B`` on stamps around ``candidates``.

    Parameters
    ----------
    to_convolve, reference : Exposure
        ``A`` (the sharper image) and ``B``, same pixel grid.
    candidates : ndarray (n, 2) int
        Stamp centres ``(x, y)``, at least ``stamp_half + k // 2`` from the border.
    basis : ndarray (n_basis, k, k)
        From :func:`alard_lupton_basis`.
    spatial_order, background_order : int
        Polynomial orders of the kernel and of the differential background
        (``background_order = -1``: none).
    n_sigma_clip : float
        Stamps whose chi^2 per pixel exceeds ``median + n_sigma_clip * 1.4826 MAD``
        are rejected, iteratively (at most ``max_iter`` times).
    stamp_half : int
        Half-size of the fitted ``B`` stamp (default ``k // 2``).
    variance_factor : float
        Weight of ``A``'s variance in the pixel weights
        ``1 / (var_B + variance_factor * var_A)`` (``~ sum(k^2)``).
    min_stamps : int
        Minimum number of kept stamps (default 5 for ``spatial_order = 0``, else
        9: :data:`MIN_STAMPS_PER_TERM` per term of an order-1 kernel).  Higher
        orders are tried only where the stamps hold as many per term
        (:func:`_choose_spatial_order`).
    debias_noise : bool
        ``A``'s noise is white (a single visit): subtract 90 % of its expected
        contribution from the normal equations (:func:`_noise_bias`), which
        removes most of the errors-in-variables bias of the kernel (the rest
        regularises the frequencies where ``A`` has no signal).
    bad : ndarray of bool, optional
        Unusable pixels of either image (zeroed in both).  Stamp pixels of
        ``B`` that one of them can reach through the kernel (within ``k // 2``)
        get no weight.
    hidden : ndarray of bool, optional
        With ``bad``: the masked pixels of ``A`` that hide a source's light
        (:func:`hidden_pixels`).  Only these reach ``k // 2``; the rest of
        ``bad`` (zero-filled sky, or masked in ``B`` only) costs the stamp
        pixels within :data:`MIN_GROW` of it.
    prior : ShapePrior, optional
        Prior on the kernel's shape (the PSF models' kernel), for the
        shapes that the stamps leave undetermined.

    Raises
    ------
    InsufficientKernelSourcesError
        Fewer than ``min_stamps`` usable stamps.
    """
    nb, ksize = len(basis), basis.shape[1]
    hk = ksize // 2
    hs = hk if stamp_half is None else int(stamp_half)
    if min_stamps is None:  # what the lowest varying order needs; more are not required
        min_stamps = max(5, MIN_STAMPS_PER_TERM * n_poly_terms(min(spatial_order, 1)))
    cand = np.asarray(candidates, dtype=int).reshape(-1, 2)
    if len(cand) < min_stamps:
        raise InsufficientKernelSourcesError(
            f"Only {len(cand)} kernel candidate stars were found (isolated, unmasked, bright "
            f"enough), fewer than the {min_stamps} needed for the PSF-matching kernel fit.")
    ny, nx = reference.shape
    with_bg = background_order >= 0
    G, h, ywy, npix, bias = [], [], [], [], []
    bfft = _BasisFFT(basis, 2 * (hs + hk) + 1)
    basis_flat = basis.reshape(nb, -1)
    for x, y in cand:
        a_cut = to_convolve.image[y - hs - hk:y + hs + hk + 1, x - hs - hk:x + hs + hk + 1]
        sl = (slice(y - hs, y + hs + 1), slice(x - hs, x + hs + 1))
        var = reference.variance[sl] + variance_factor * to_convolve.variance[sl]
        w = np.where(var > 0, 1.0 / np.where(var > 0, var, 1.0), 0.0)
        if bad is not None:
            big = (slice(y - hs - hk, y + hs + hk + 1), slice(x - hs - hk, x + hs + hk + 1))
            if hidden is None:
                reached = dilate(bad[big], hk)
            else:
                reached = dilate(hidden[big], hk) | dilate(bad[big], MIN_GROW)
            w[reached[hk:-hk, hk:-hk]] = 0.0
        g_i, h_i, y_i = _stamp_normal_equations(a_cut.astype(float),
                                                reference.image[sl].astype(float), w, bfft,
                                                with_bg)
        G.append(g_i), h.append(h_i), ywy.append(y_i), npix.append(w.size)
        if debias_noise:
            v_cut = to_convolve.variance[y - hs - hk:y + hs + hk + 1,
                                         x - hs - hk:x + hs + hk + 1].astype(float)
            bias.append(_noise_bias(basis_flat, v_cut, w, with_bg))
    G, h, ywy, npix = np.array(G), np.array(h), np.array(ywy), np.array(npix)
    g_fit = G - (1.0 - _DEBIAS_KEEP) * np.array(bias) if debias_noise else G
    u = 2.0 * cand[:, 0] / max(nx - 1, 1) - 1.0
    v = 2.0 * cand[:, 1] / max(ny - 1, 1) - 1.0
    r = poly_terms(u, v, background_order).T if with_bg else np.zeros((len(cand), 0))
    if spatial_order > 0:
        spatial_order = _choose_spatial_order(G, g_fit, h, ywy, npix, u, v, r, nb,
                                              spatial_order, n_sigma_clip=n_sigma_clip,
                                              max_iter=max_iter, min_stamps=min_stamps,
                                              prior=prior)
    p = poly_terms(u, v, spatial_order).T
    coef, bg, chi2, use = _fit_stamps(G, h, ywy, npix, p, r, nb, n_sigma_clip=n_sigma_clip,
                                      max_iter=max_iter, min_stamps=min_stamps, g_fit=g_fit,
                                      prior=prior)
    images = np.tensordot(coef.T, basis, axes=(1, 0))  # (nq, k, k)
    kernel = MatchingKernel(images=images, order=spatial_order, width=nx, height=ny)
    return KernelFit(kernel=kernel, background=bg, background_order=background_order if with_bg else -1,
                     n_candidates=len(cand), n_used=int(use.sum()), chi2=chi2[use],
                     used_xy=cand[use])


def psf_model_kernel(psf_a: PsfModel, psf_b: PsfModel, basis: np.ndarray, *,
                     spatial_order: int, width: int, height: int) -> MatchingKernel:
    """Matching kernel ``k (x) psf_a ~ psf_b`` fitted to the two PSF *models*.

    Model-based fallback when the field has too few kernel stars: the same
    Alard-Lupton basis (which regularises the implicit deconvolution) is fitted
    by least squares to the PSF images on a grid of positions.  The kernel sum
    is ~1 (both PSFs have unit sum): no photometric scale is measured.
    """
    coef = psf_model_coefficients(psf_a, psf_b, basis, spatial_order=spatial_order,
                                  width=width, height=height)
    return MatchingKernel(images=np.tensordot(coef.T, basis, axes=(1, 0)), order=spatial_order,
                          width=width, height=height)


def psf_model_coefficients(psf_a: PsfModel, psf_b: PsfModel, basis: np.ndarray, *,
                           spatial_order: int, width: int, height: int) -> np.ndarray:
    """Basis coefficients ``(nb, nq)`` of :func:`psf_model_kernel`."""
    ksize = basis.shape[1]
    hk = ksize // 2
    ps = psf_a.kernel_size
    n = spatial_order + 2
    xs, ys = np.meshgrid(np.linspace(0, width - 1, n), np.linspace(0, height - 1, n))
    G, h = [], []
    bfft = _BasisFFT(basis, ps + 2 * hk)
    for x, y in zip(xs.ravel(), ys.ravel()):
        a = np.pad(psf_a.at(x, y), hk)
        b = _fit_to_size(psf_b.at(x, y), ps)
        g_i, h_i, _ = _stamp_normal_equations(a, b, np.ones_like(b), bfft, False)
        G.append(g_i), h.append(h_i)
    u = 2.0 * xs.ravel() / max(width - 1, 1) - 1.0
    v = 2.0 * ys.ravel() / max(height - 1, 1) - 1.0
    p = poly_terms(u, v, spatial_order).T
    coef, _ = _solve_global(np.array(G), np.array(h), p, np.zeros((len(p), 0)), len(basis))
    return coef


def _fit_to_size(img: np.ndarray, size: int) -> np.ndarray:
    """Centre-crop or zero-pad a square odd image to ``size``."""
    n = img.shape[0]
    if n > size:
        d = (n - size) // 2
        return img[d:d + size, d:d + size]
    d = (size - n) // 2
    return np.pad(img, d)


# --------------------------------------------------------------------------
# Decorrelation and PSF of the difference
# --------------------------------------------------------------------------

def decorrelation_kernel(kernel: np.ndarray, var_a: float, var_b: float, size: int) -> np.ndarray:
    """After-convolution decorrelation kernel ``phi`` (Reiss & Lupton 2016).

    For ``D = B - k (x) A`` with white noises of variance ``var_b`` and
    ``var_a`` the noise power is ``var_b + |k_hat|^2 var_a``;
    ``phi_hat = sqrt((var_b + kappa^2 var_a) / (var_b + |k_hat|^2 var_a))``
    (``kappa = sum(k)``) whitens it to ``var_b + kappa^2 var_a`` while keeping
    ``phi_hat(0) = 1`` (fluxes unchanged).  ``phi`` is computed on a grid of
    ``4 size`` pixels, cropped to ``size`` (odd) and renormalised to unit sum.
    """
    n = 4 * size
    kap = float(kernel.sum())
    kpad = np.zeros((n, n))
    kc = kernel.shape[0] // 2
    kpad[:kernel.shape[0], :kernel.shape[1]] = kernel
    kpad = np.roll(kpad, (-kc, -kc), axis=(0, 1))  # kernel centre at [0, 0]
    khat2 = np.abs(np.fft.fft2(kpad)) ** 2
    phihat = np.sqrt((var_b + kap**2 * var_a) / (var_b + khat2 * var_a))
    phi = np.fft.fftshift(np.real(np.fft.ifft2(phihat)))
    c = n // 2
    h = size // 2
    phi = phi[c - h:c + h + 1, c - h:c + h + 1]
    return phi / phi.sum()


def _sampled_psf_model(fn, order: int, width: int, height: int, size: int) -> PsfModel:
    """Fit a :class:`PsfModel` of ``order`` to kernels ``fn(x, y)`` on a grid."""
    n = order + 2
    xs, ys = np.meshgrid(np.linspace(0, width - 1, n), np.linspace(0, height - 1, n))
    u = 2.0 * xs.ravel() / max(width - 1, 1) - 1.0
    v = 2.0 * ys.ravel() / max(height - 1, 1) - 1.0
    design = poly_terms(u, v, order).T
    stack = np.array([_fit_to_size(fn(x, y), size) for x, y in zip(xs.ravel(), ys.ravel())])
    coef, *_ = np.linalg.lstsq(design, stack.reshape(len(stack), -1), rcond=None)
    return PsfModel(coeffs=coef.reshape(-1, size, size), order=order, width=width, height=height)


def difference_psf(psf_sci: PsfModel, kernel: MatchingKernel | None, phi: np.ndarray | None,
                   mode: str, *, width: int, height: int) -> PsfModel:
    """PSF model of the difference image, same kernel size as ``psf_sci``.

    ``convolve_template``: ``psf_sci (x) phi``; ``convolve_science``:
    ``k (x) psf_sci / sum(k) (x) phi`` (sampled on a grid and refitted).
    """
    size = psf_sci.kernel_size
    if mode == "convolve_template":
        if phi is None:
            return PsfModel(coeffs=psf_sci.coeffs.copy(), order=psf_sci.order, width=width,
                            height=height)
        coeffs = np.array([signal.fftconvolve(c, phi, mode="same") for c in psf_sci.coeffs])
        return PsfModel(coeffs=coeffs, order=psf_sci.order, width=width, height=height)

    def fn(x, y):
        k = kernel.at(x, y)
        out = signal.fftconvolve(psf_sci.at(x, y), k, mode="full")
        if phi is not None:
            out = signal.fftconvolve(out, phi, mode="full")
        return out / out.sum()

    order = max(psf_sci.order, kernel.order)
    return _sampled_psf_model(fn, order, width, height, size)


# --------------------------------------------------------------------------
# Public entry point
# --------------------------------------------------------------------------

@dataclass(frozen=True)
class SubtractionResult:
    """Difference image and the quality record of the subtraction.

    Attributes
    ----------
    difference : Exposure
        ``SCIENCE - matched TEMPLATE`` in nJy per pixel (science photometric
        scale), its variance (nJy^2), mask (OR of both inputs' masks without
        their DETECTED planes, bad planes grown by the kernel half-width) and PSF.
    mode : str
        ``"convolve_template"`` or ``"convolve_science"``.
    kernel_source : str
        ``"sources"`` (fitted on stars) or ``"psf_models"`` (fallback).
    kernel : MatchingKernel
        The matching kernel (``kernel.images`` are the coefficient images of the
        spatial terms, for a summary plot).
    kernel_sum, kernel_sum_std : float
        Kernel sum at the image centre and its std across the field.  It is the
        flux ratio convolved/reference: template-to-science scale in
        ``convolve_template``, science-to-template in ``convolve_science``.
    n_candidates, n_used : int
        Kernel stamps offered / kept (0 / 0 for the fallback).
    chi2_mean, chi2_std : float
        Mean and std of the kept stamps' residual chi^2 per pixel.
    background : ndarray
        Differential background coefficients (``k (x) A + bg ~ B``), units of ``B``.
    background_order : int
    decorrelation_kernel : ndarray or None
    noise_ratio : float
        Robust std (1.4826 MAD) of ``diff / sqrt(variance)`` over unmasked pixels.
    fwhm_science, fwhm_template : float
        Adaptive-moment FWHM (pixels) of the PSF models at the centre.
    scale_correction : float
        Flux-scale residual ``a`` of the fitted kernel at the kernel stars
        that was removed (:func:`scale_residual`; 0 when none was
        significant).  ``kernel`` and ``kernel_sum`` include the correction.
    template_share : ndarray or None
        In ``convolve_template`` (None otherwise): the convolved template's
        share of the difference's per-pixel variance, 0-1, in blocks of
        :data:`SHARE_BIN` x :data:`SHARE_BIN` pixels (block ``[j, i]`` covers
        pixels ``[SHARE_BIN j:, SHARE_BIN i:]``).  The template's noise is
        correlated (a PSF-matched coadd, convolved again by the kernel), so
        where its share is larger -- fewer coadd inputs near the template's
        edges -- the detection significance needs a larger correction
        (:func:`diffim.noisescale.measure`).  With the science image
        convolved, the significance's width did not follow the share (0.95-1.05
        over shares of 0.15-0.70 on two independent-simulator images), and a
        fitted term cost the peer benchmark's science-sharper pair 2 % of
        its detection S/N.
    """

    difference: Exposure
    mode: str
    kernel_source: str
    kernel: MatchingKernel
    kernel_sum: float
    kernel_sum_std: float
    n_candidates: int
    n_used: int
    chi2_mean: float
    chi2_std: float
    background: np.ndarray
    background_order: int
    decorrelation_kernel: np.ndarray | None
    noise_ratio: float
    fwhm_science: float
    fwhm_template: float
    timings: dict = field(default_factory=dict)
    scale_correction: float = 0.0
    template_share: np.ndarray | None = None

    @property
    def share_map(self):
        """:attr:`template_share` as a :class:`diffim.noisescale.BlockMap` (None without it)."""
        from .noisescale import BlockMap  # (noisescale imports this module)

        return None if self.template_share is None else BlockMap(self.template_share, SHARE_BIN)

    @property
    def kernel_images(self) -> np.ndarray:
        """Coefficient images of the matching kernel, ``(n_spatial, k, k)``."""
        return self.kernel.images

    def summary(self) -> dict:
        """Scalar quality record (JSON-friendly)."""
        return {"mode": self.mode, "kernel_source": self.kernel_source,
                "kernel_sum": self.kernel_sum, "kernel_sum_std": self.kernel_sum_std,
                "n_candidates": self.n_candidates, "n_used": self.n_used,
                "chi2_mean": self.chi2_mean, "chi2_std": self.chi2_std,
                "background": [float(b) for b in self.background],
                "noise_ratio": self.noise_ratio,
                "fwhm_science": self.fwhm_science,
                "fwhm_template": self.fwhm_template}


#: :func:`choose_mode` convolves the template when it is narrower at the centre
#: and at most this fraction broader (FWHM) at the corners: there the kernel
#: sharpens by at most ``2 x 5 %`` of sigma^2, a near-delta kernel.
MODE_FWHM_TOLERANCE = 0.05


def choose_mode(psf_sci: PsfModel, psf_tmpl: PsfModel) -> str:
    """``"convolve_template"`` if the template PSF is the narrower one, else ``"convolve_science"``.

    Compared by adaptive-moment FWHM at the centre and the four corners: the
    template is convolved if it is narrower at the centre and nowhere broader
    than the science PSF by more than :data:`MODE_FWHM_TOLERANCE`.  Where the
    two PSFs are nearly equal the kernel is close to a delta function either
    way, and convolving the deep template is the stable choice: convolving a
    single visit's noisy image shrinks a least-squares kernel (errors in
    variables).  A visit whose PSF was 1.6 % broader than the template's at
    the centre and 3.4 % sharper at two corners (a 12 % variation over the
    detector) was differenced with its science image convolved, and the
    kernel sum came out 0.74 instead of ~1.
    """
    if psf_tmpl.fwhm() >= psf_sci.fwhm():
        return "convolve_science"
    corners = [(x, y) for x in (0, psf_sci.width - 1) for y in (0, psf_sci.height - 1)]
    for x, y in corners:
        if psf_tmpl.fwhm(x, y) > (1.0 + MODE_FWHM_TOLERANCE) * psf_sci.fwhm(x, y):
            return "convolve_science"
    return "convolve_template"


#: With ``mode="auto"`` and centre FWHMs within :data:`MODE_FWHM_TOLERANCE`,
#: :func:`subtract_images` fits the kernel both ways and overrides
#: :func:`choose_mode` only if the other direction's kernel sum is closer to a
#: flux ratio by more than this (in ``|ln(sum)|``).
MODE_KERNEL_SUM_MARGIN = 0.01


def candidate_modes(psf_sci: PsfModel, psf_tmpl: PsfModel) -> tuple[str, ...]:
    """The convolution directions ``mode="auto"`` fits: one, or both for nearly equal PSFs.

    The first is :func:`choose_mode`'s.  Where the two centre FWHMs differ by
    at most :data:`MODE_FWHM_TOLERANCE` the FWHM cannot tell which image is
    the broader one: a visit PSF with Kolmogorov-like wings, 2 % sharper than
    the Gaussian template PSF, was convolved to the Gaussian with a kernel
    sum of 0.75-0.90 where the template direction gave 1.006 (rings at bright
    stars in the difference).  Both directions are then fitted and compared
    (:func:`pick_mode`).
    """
    first = choose_mode(psf_sci, psf_tmpl)
    if abs(psf_tmpl.fwhm() / psf_sci.fwhm() - 1.0) > MODE_FWHM_TOLERANCE:
        return (first,)
    other = "convolve_science" if first == "convolve_template" else "convolve_template"
    return (first, other)


#: Largest noise gain ``sum(k^2) / sum(k)^2`` (1 for a delta function, less
#: for a smoothing kernel) of a direction :func:`pick_mode` may choose.  A
#: kernel from the PSF models towards a visit PSF with wings the Gaussian
#: template PSF cannot make had a gain of 3e9 (FWHM 9.85 -> 9.92 px); chosen
#: by its kernel sum, its difference had 29 false positives.  Kernels fitted
#: on stars towards a nearly equal PSF reach 1-40 on the independent
#: simulator's sets and subtract well (their noise is decorrelated); with 1.5
#: as the limit they lost the choice (a `distort` visit then convolved its own
#: image with a kernel sum of 0.932 instead of the template with 1.040).
MAX_NOISE_GAIN = 1000.0


def noise_gain(kernel: MatchingKernel) -> float:
    """``sum(k^2) / sum(k)^2`` of the kernel at the image centre (see :data:`MAX_NOISE_GAIN`)."""
    k = kernel.at()
    total = float(k.sum())
    return float((k**2).sum()) / total**2 if total != 0 else np.inf


def pick_mode(kernel_sums: dict[str, float], sources: dict[str, str], default: str,
              gains: dict[str, float] | None = None) -> str:
    """The direction whose fitted kernel best preserves flux.

    A direction whose kernel's noise gain (``gains``, :func:`noise_gain`)
    exceeds :data:`MAX_NOISE_GAIN` has blown up and is not chosen while the
    other one has not.

    Both directions see the same photometric ratio ``s`` of the two images
    (kernel sum ``s`` one way, ``1 / s`` the other), so a PSF shape that a
    kernel cannot make in one direction shows up as its kernel sum pulled
    away from that ratio.  ``default`` (:func:`choose_mode`'s choice) is kept
    unless the other direction's ``|ln(sum)|`` is smaller by more than
    :data:`MODE_KERNEL_SUM_MARGIN`; a kernel fitted on stars always wins over
    one computed from the PSF models.
    """
    if gains is not None:
        sane = [m for m in kernel_sums if gains[m] <= MAX_NOISE_GAIN]
        if len(sane) == 1:
            return sane[0]
    on_stars = [m for m in kernel_sums if sources[m] == "sources"]
    if len(on_stars) == 1:
        return on_stars[0]
    other = next(m for m in kernel_sums if m != default)
    dev = {m: abs(np.log(v)) if v > 0 else np.inf for m, v in kernel_sums.items()}
    return other if dev[other] < dev[default] - MODE_KERNEL_SUM_MARGIN else default


def default_kernel_size(psf_sci: PsfModel, psf_tmpl: PsfModel) -> int:
    """Matching-kernel size: the PSF size ``K``, enlarged to ``2 ceil(4 FWHM) + 1``.

    FWHM is the larger of the two PSFs' (maximum over the field).  The kernel
    must reach the science PSF's wings: with a Moffat (beta = 3) PSF of FWHM
    4.6 px, a 25-px kernel left wing residuals around bright stars (13 false
    5-sigma detections per 1k x 1k, kernel sum 0.7 % low) which a 41-px one
    removed (0 false, kernel sum within 0.1 %).
    """
    fwhm = max(psf_sci.max_fwhm(3), psf_tmpl.max_fwhm(3))
    return int(max(psf_sci.kernel_size, 2 * int(np.ceil(4.0 * fwhm)) + 1))


def _validate(science: Exposure, template: Exposure, mode: str):
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    if science.shape != template.shape:
        raise ValueError(f"science {science.shape} and template {template.shape} must be on the "
                         "same pixel grid (resample the template to the visit first)")
    if science.psf is None or template.psf is None:
        raise ValueError("both the science image and the template need a PSF model")


def _unusable(exp: Exposure, planes) -> np.ndarray:
    """Boolean image: a ``planes`` mask bit set, or a non-finite image or variance value."""
    bad = (exp.mask & masks.bits(*planes)) != 0
    bad |= ~np.isfinite(exp.image)
    bad |= ~np.isfinite(exp.variance)
    return bad


def _prepare(exp: Exposure, bad: np.ndarray, psf: PsfModel, in_place: bool) -> Exposure:
    """Exposure whose unusable pixels (``bad``) have image and variance 0.

    New arrays, or with ``in_place`` the planes of ``exp`` themselves (float32).
    """
    if not in_place:
        return Exposure(image=np.where(bad, np.float32(0), exp.image),
                        variance=np.where(bad, np.float32(0), exp.variance), mask=exp.mask,
                        psf=psf)
    for plane in (exp.image, exp.variance):
        np.copyto(plane, np.float32(0), where=bad)
    return Exposure(image=exp.image, variance=exp.variance, mask=exp.mask, psf=psf)


def _fit_kernel(a: Exposure, b: Exposure, bad, basis, *, spatial_order, background_order,
                n_sigma_clip, variance_factor, candidate_kw, fallback, psf_a, psf_b,
                shape_prior, hidden, debias_noise=False, template_is_a=False):
    """Kernel from stars, or from the PSF models if stars are too few (and ``fallback``).

    Kernel stars are found on the template (``a`` when ``template_is_a``, else
    ``b``), the deeper image, in either convolution direction: found on a
    single visit, a sparse field had 9-11 of them where the template had 50.
    """
    hk = basis.shape[1] // 2
    # a masked pixel may sit beyond the star's core: the fit leaves out what it reaches
    core = int(np.ceil(2.0 * psf_b.fwhm()))
    deep, other = (a, b) if template_is_a else (b, a)
    cand = select_kernel_candidates(deep, other, half=hk, margin=hk, bad=bad, core=core,
                                    hidden=hidden, **candidate_kw)
    ny, nx = a.shape
    prior = ShapePrior.from_psf_models(psf_a, psf_b, basis, width=nx,
                                       height=ny) if shape_prior else None
    try:
        fit = fit_matching_kernel(a, b, cand, basis, spatial_order=spatial_order,
                                  background_order=background_order, n_sigma_clip=n_sigma_clip,
                                  variance_factor=variance_factor, debias_noise=debias_noise,
                                  bad=bad, hidden=hidden, prior=prior)
        return fit, "sources"
    except InsufficientKernelSourcesError as exc:
        if not fallback:
            raise
        logger.warning("%s Falling back to a kernel computed from the two PSF models "
                       "(no photometric scale fitted; the background is fitted on the whole "
                       "difference image).", exc)
    kernel = psf_model_kernel(psf_a, psf_b, basis, spatial_order=spatial_order, width=nx,
                              height=ny)
    nbg = n_poly_terms(background_order) if background_order >= 0 else 0
    fit = KernelFit(kernel=kernel, background=np.zeros(nbg),
                    background_order=background_order if nbg else -1,
                    n_candidates=len(cand), n_used=0, chi2=np.zeros(0),
                    used_xy=np.zeros((0, 2), int))
    return fit, "psf_models"


def _fit_direction(mode: str, sci: Exposure, tmpl: Exposure, bad: np.ndarray, ksize: int,
                   basis_degrees, wing_degree, **fit_kw) -> tuple[KernelFit, str]:
    """Kernel fit for one convolution direction: ``(fit, kernel_source)``.

    ``sci`` and ``tmpl`` are the prepared images (unusable pixels zeroed),
    ``bad`` their union of unusable pixels (``fit_kw["hidden"]``: those of
    the convolved image that hide a source, :func:`hidden_pixels`).  The
    Alard-Lupton widths follow the two PSFs of this direction
    (:func:`basis_sigmas`), plus the wing Gaussian of sigma = the broader
    FWHM when ``wing_degree`` is given.
    """
    a, b = (tmpl, sci) if mode == "convolve_template" else (sci, tmpl)
    sa, sb = a.psf.fwhm() / FWHM_PER_SIGMA, b.psf.fwhm() / FWHM_PER_SIGMA
    sigmas, degrees = basis_sigmas(sa, sb, len(basis_degrees)), tuple(basis_degrees)
    if wing_degree is not None:
        sigmas, degrees = sigmas + (max(sci.psf.fwhm(), tmpl.psf.fwhm()),), \
            degrees + (int(wing_degree),)
    basis = alard_lupton_basis(ksize, sigmas, degrees)
    var_factor = min(1.0, 1.0 / (4 * np.pi * max(sb**2 - sa**2, 0.25)))
    return _fit_kernel(a, b, bad, basis, variance_factor=var_factor, psf_a=a.psf, psf_b=b.psf,
                       debias_noise=mode == "convolve_science",
                       template_is_a=mode == "convolve_template", **fit_kw)


def footprint_radius(kernel: np.ndarray, frac: float = 0.99) -> int:
    """Half-width of the smallest centred square holding ``frac`` of ``sum |kernel|``.

    Masked pixels of the convolved image are zero-filled (they are
    background-subtracted, so 0 is the sky) and only the kernel's significant
    footprint spreads them: growing their mask by this radius instead of the
    full kernel half-width keeps far more area (on the pipeline data a 57-px
    kernel has a 99 % radius of ~6 px, and the cosmic rays and bad columns of
    a visit, grown by 28 px, hid ~20 % of the difference image).
    """
    a = np.abs(np.asarray(kernel, dtype=float))
    h = a.shape[0] // 2
    total = a.sum()
    for r in range(h + 1):
        if a[h - r:h + r + 1, h - r:h + r + 1].sum() >= frac * total:
            return r
    return h


def _flux_grown(name: str, flag: np.ndarray, holes: np.ndarray | None) -> np.ndarray | None:
    """The pixels of plane ``name`` (``flag``) grown only as far as their hidden flux reaches.

    All of a :data:`_FLUX_GROWN_PLANES` plane, and for ``NO_DATA`` its
    ``holes`` (:func:`diffim.kernel.nan_holes`: NaN pixels, columns and small
    blocks, zero-filled like a bad pixel; a larger no-data area keeps the
    whole footprint beyond its rim).  None when there are none.
    """
    if name in _FLUX_GROWN_PLANES:
        return flag
    if name == "NO_DATA" and holes is not None and holes.any():
        return holes
    return None


def _difference_mask(science: Exposure, template: Exposure, a_mask: np.ndarray, hk: int,
                     reach: np.ndarray | None = None, holes: np.ndarray | None = None):
    """OR of the input masks (DETECTED planes dropped) with ``A``'s bad planes grown.

    :data:`_GROWN_PLANES` are grown by ``hk`` pixels, except that with
    ``reach`` (:func:`_hidden_flux_reach`) the pixels :func:`_flux_grown`
    names are grown by :data:`MIN_GROW` pixels plus, within ``hk``, where
    ``reach`` is True.  Grown by the whole footprint, each NaN pixel of an
    independent simulator's float32 visits (1000 x 1040 px, 43 NaN pixels
    each) hid a 33 x 33 px box, up to 24 % of the difference.
    """
    mask = (science.mask | template.mask) & ~masks.bits(*_DROPPED_PLANES)
    for name in _GROWN_PLANES:
        flag = masks.any_set(a_mask, name)
        if not flag.any():
            continue
        partial = None if reach is None else _flux_grown(name, flag, holes)
        if partial is None:
            grown = dilate(flag, hk)
        else:
            grown = dilate(partial, hk) & reach
            grown |= dilate(partial, MIN_GROW)
            if partial is not flag:
                grown |= dilate(flag & ~partial, hk)
        mask |= np.where(grown, masks.bit(name), 0).astype(mask.dtype)
    ny, nx = mask.shape
    border = np.zeros(mask.shape, dtype=bool)
    border[:hk], border[ny - hk:], border[:, :hk], border[:, nx - hk:] = True, True, True, True
    mask[border] |= masks.bits("NO_DATA", "EDGE")
    return mask


def _hidden_flux_reach(a_mask: np.ndarray, kernel: np.ndarray, b: Exposure,
                       holes: np.ndarray | None = None) -> np.ndarray | None:
    """Where the flux hidden under ``A``'s cosmic rays, bad and NaN pixels reaches through the kernel.

    The convolved image ``A`` is zero-filled (= sky) on its masked pixels, so
    a pixel ``x`` of the difference misses ``sum_p k(x - p) A(p)`` over them.
    On empty sky that is noise; only a source under the mask leaves a
    residual.  ``A(p)`` is estimated by the unconvolved image ``B`` (the same
    scene, registered): its pixels above 2 sigma under the mask, convolved
    with ``|k|``.  True where that exceeds :data:`HIDDEN_FLUX_SIGMA` times
    ``B``'s noise.  Growing every cosmic ray by the kernel's 99 % footprint
    instead (~20 px for a kernel that broadens a 3.3 px PSF to 5.2 px) hid
    8-10 % of seed-7 `small`'s area and some transients at S/N 10-96.
    None when ``A`` has no such pixel.
    """
    flag = masks.any_set(a_mask, *_FLUX_GROWN_PLANES)
    if holes is not None:
        flag |= holes
    if not flag.any():
        return None
    sd = np.sqrt(np.maximum(b.variance, 0), dtype=np.float32)
    lost = np.where(flag & (b.image > 2 * sd), b.image, np.float32(0))
    if not lost.any():
        return np.zeros(flag.shape, bool)
    return fft_convolve(lost, np.abs(kernel).astype(np.float32)) > HIDDEN_FLUX_SIGMA * sd


def subtract_images(science: Exposure, template: Exposure, *, mode: str = "auto",
                    kernel_spatial_order: int = 1, background_order: int = 1,
                    decorrelate: bool = True, n_sigma_clip: float = 3.0,
                    kernel_size: int | None = None, basis_degrees=(4, 2, 2, 2),
                    wing_degree: int | None = 2,
                    fallback: bool = True, candidate_min_snr: float = 20.0,
                    candidate_cell_size: int = 512,
                    max_candidates: int = 150, shape_prior: bool = True,
                    overwrite_inputs: bool = False) -> SubtractionResult:
    """PSF-match and subtract a template from a science exposure.

    Parameters
    ----------
    science : Exposure
        Visit image in nJy per pixel with variance, mask and (measured) PSF.
    template : Exposure
        Template resampled to the same pixel grid (nJy), ``NO_TEMPLATE`` where
        uncovered, with its PSF model.
    mode : {"auto", "convolve_template", "convolve_science"}
        Which image is convolved; ``"auto"`` convolves the one with the narrower
        PSF (:func:`choose_mode`), so that no image is ever deconvolved; for
        nearly equal PSFs it fits both directions and keeps the one whose
        kernel sum shows no shape mismatch (:func:`candidate_modes`,
        :func:`pick_mode`).
    kernel_spatial_order : int
        Polynomial order of the kernel's spatial variation.
    background_order : int
        Order of the fitted differential background (-1: none).
    decorrelate : bool
        Apply the after-convolution decorrelation (recommended).
    n_sigma_clip : float
        Clipping threshold for kernel stamps (see :func:`fit_matching_kernel`).
    kernel_size : int, optional
        Matching-kernel size (odd); default :func:`default_kernel_size`.
    basis_degrees : tuple of int
        Polynomial degrees of the Alard-Lupton Gaussians (one per Gaussian).
        The default adds a fourth, wide Gaussian to LSST's (4, 2, 2): on a
        Moffat (beta = 3) science PSF the three-Gaussian kernel misses the
        wings, which biased the kernel sum by -1.1 % and left halos around
        bright stars (15 false 5-sigma detections per 1k x 1k in the tests,
        against 1 with four Gaussians, kernel-sum error 0.16 %).
    wing_degree : int or None
        Polynomial degree of one more Gaussian, of sigma = the broader PSF's
        FWHM (pixels), for the PSF *wings* (None: none).  The widths above
        scale with the *difference* of the two PSFs, so for two similar PSFs
        the widest is a few pixels and the kernel cannot reshape their wings:
        a Moffat science PSF matched to a coadd's Gaussian-cored template left
        a ring at 2-4 FWHM around every bright star (38 false 5-sigma
        detections on a 2k x 2k visit of a scene without variability, 13 with
        this term).
    fallback : bool
        With too few kernel stars, use the PSF-model kernel (warning logged,
        ``kernel_source = "psf_models"``) instead of raising.
    candidate_min_snr, candidate_cell_size, max_candidates
        Kernel-candidate selection (see :func:`select_kernel_candidates`).
    shape_prior : bool
        Hold the kernel's shape, where the stamps leave it open, to the
        kernel between the two PSF models (:class:`ShapePrior`).
    overwrite_inputs : bool
        Let the function set the unusable pixels of ``science.image``,
        ``.variance``, ``template.image`` and ``.variance`` to 0 in place
        instead of working on copies (four fewer image-sized arrays: ~270 MB
        at 4k).  Only for callers that do not need those planes afterwards.

    Returns
    -------
    SubtractionResult

    Raises
    ------
    InsufficientKernelSourcesError
        Too few kernel stars and ``fallback=False``.
    """
    import time

    # (local import: detect imports this module)
    from .detect import binned_significance, bright_peaks

    _validate(science, template, mode)
    t0 = time.perf_counter()
    timings = {}
    modes = candidate_modes(science.psf, template.psf) if mode == "auto" else (mode,)
    fs, ft = science.psf.fwhm(), template.psf.fwhm()
    ksize = default_kernel_size(science.psf, template.psf) if kernel_size is None \
        else int(kernel_size)
    if ksize < 5 or ksize % 2 == 0:
        raise ValueError(f"kernel_size must be an odd integer >= 5, got {kernel_size}")
    hk = ksize // 2
    bad_s = _unusable(science, _GROWN_PLANES)
    bad_t = _unusable(template, _GROWN_PLANES)
    sci = _prepare(science, bad_s, science.psf, overwrite_inputs)
    tmpl = _prepare(template, bad_t, template.psf, overwrite_inputs)
    bad = bad_s | bad_t  # from here on: unusable in either image
    # the template's significance: kernel stars (either direction) and the bright
    # sources of the flux-scale check are found on it
    tsig = binned_significance(tmpl.image, tmpl.variance, tmpl.psf.at(), bad)
    # masked pixels of the convolved image that hide a source's light (the rest is sky)
    convolved_first = {"convolve_science": (bad_s, bad_t), "convolve_template": (bad_t, bad_s)}
    by_mode = {m: _fit_direction(m, sci, tmpl, bad, ksize, basis_degrees, wing_degree,
                                 hidden=hidden_pixels(*convolved_first[m], tsig),
                                 spatial_order=kernel_spatial_order,
                                 background_order=background_order, n_sigma_clip=n_sigma_clip,
                                 candidate_kw=dict(significance=tsig,
                                                   min_snr=candidate_min_snr,
                                                   cell_size=candidate_cell_size,
                                                   max_candidates=max_candidates),
                                 fallback=fallback, shape_prior=shape_prior)
               for m in modes}
    if len(by_mode) > 1:
        sums = {m: f.kernel.sum_stats()[0] for m, (f, _) in by_mode.items()}
        gains = {m: noise_gain(f.kernel) for m, (f, _) in by_mode.items()}
        mode = pick_mode(sums, {m: src for m, (_, src) in by_mode.items()}, modes[0], gains)
        logger.info("nearly equal PSFs (FWHM %.2f / %.2f px): kernel sums %s (noise gains %s); "
                    "%s chosen", fs, ft, ", ".join(f"{m} {v:.4f}" for m, v in sums.items()),
                    ", ".join(f"{v:.3g}" for v in gains.values()), mode)
    else:
        mode = modes[0]
    fit, source = by_mode[mode]
    a, b = (tmpl, sci) if mode == "convolve_template" else (sci, tmpl)
    bright_xy = bright_peaks(tmpl.image, tmpl.variance, tmpl.psf.at(), bad,
                             max_sources=SCALE_SOURCES, significance=tsig)
    del tsig
    timings["kernel_fit"] = time.perf_counter() - t0
    t1 = time.perf_counter()
    diff, var, mask, phi, background, unusable, share = _apply(a, b, fit, mode, hk, science,
                                                               template, decorrelate)
    fit, correction = _remove_scale_residual(diff, var, unusable, b, fit, mode, bright_xy)
    del unusable
    timings["convolution"] = time.perf_counter() - t1
    psf_diff = difference_psf(science.psf, fit.kernel, phi, mode, width=science.shape[1],
                              height=science.shape[0])
    if psf_diff.kernel_size != science.psf.kernel_size:
        raise RuntimeError("internal error: difference PSF has the wrong kernel size")
    meta = dict(science.meta)
    meta["BUNIT"] = "nJy"
    out = Exposure(image=diff, variance=var, mask=mask, wcs=science.wcs, psf=psf_diff, meta=meta)
    ksum, ksum_std = fit.kernel.sum_stats()
    chi2 = fit.chi2
    ratio = _noise_ratio(out)
    timings["total"] = time.perf_counter() - t0
    logger.info("subtraction: mode=%s kernel=%s sum=%.4f+-%.4f (scale residual %+.4f removed) "
                "stamps %d/%d chi2=%.2f noise_ratio=%.3f", mode, source, ksum, ksum_std,
                correction, fit.n_used, fit.n_candidates,
                float(np.mean(chi2)) if chi2.size else float("nan"), ratio)
    return SubtractionResult(
        difference=out, mode=mode, kernel_source=source, kernel=fit.kernel, kernel_sum=ksum,
        kernel_sum_std=ksum_std, n_candidates=fit.n_candidates, n_used=fit.n_used,
        chi2_mean=float(np.mean(chi2)) if chi2.size else float("nan"),
        chi2_std=float(np.std(chi2)) if chi2.size else float("nan"),
        background=background, background_order=fit.background_order,
        decorrelation_kernel=phi, noise_ratio=ratio, fwhm_science=fs, fwhm_template=ft,
        timings=timings, scale_correction=correction, template_share=share)


def scale_residual(diff: np.ndarray, var: np.ndarray, ref: np.ndarray, bad: np.ndarray,
                   psf: PsfModel, xy, *, min_sources: int = 5,
                   max_error: float = 0.01) -> tuple[float, float, int]:
    """Flux-scale residual ``a`` of a difference at static sources, ``D ~ a ref``.

    For each source at integer ``(x, y)`` (the bright peaks of the scene),
    ``a_i`` is fitted on the PSF-filtered difference beside a shift and a
    width term (:func:`diffim.residuals.scale_amplitudes`, ``bad`` pixels left
    out, on a disc of 1.5 FWHM).  A PSF-weighted ratio ``<P, D> / <P, ref>``
    (used before) also counts the width residual, which carries no flux: on
    an independent simulation with width residuals of 0.1-0.2 px^2 at a
    FWHM of 3.4 px it put -4.6 % into a kernel that had been right, and
    the static stars were left at +4 %.  Variable sources are left out by
    :func:`diffim.residuals.random_effect` (``many_outliers``), which also
    gives the sources' scatter ``tau^2``; ``a`` is the mean of the others
    weighted by ``1 / (var_i + tau^2)``.

    Only sources whose ``a_i`` has an error of at most ``max_error`` count.
    Fainter ones add little and are biased when they were selected on an
    image whose noise is also in ``D`` (a star picked because its flux
    fluctuated up shows a negative ``a_i``: stars at S/N 15-60 had median
    ``a_i`` of -5 to -8 % where the bright ones had 0 to -1 %).

    The estimate is linear in ``D``, so unlike the kernel's least-squares fit it
    is not biased by the convolved image's noise.  Units: dimensionless;
    ``diff``, ``var``, ``ref`` and ``bad`` on one pixel grid.

    Returns
    -------
    a, a_err : float
        The weighted mean and its error (``0, inf`` when fewer than
        ``min_sources`` bright sources are usable or kept).
    n : int
        Sources used.
    """
    radius = int(min(np.ceil(1.5 * psf.fwhm()), psf.kernel_size // 2))
    a, v = scale_amplitudes(diff, var, bad, ref, psf.at(), xy, radius)
    bright = v <= max_error**2
    if bright.sum() < min_sources:
        return 0.0, np.inf, int(bright.sum())
    a, v = a[bright], v[bright]
    tau2, keep = random_effect(a - np.median(a), v, many_outliers=True)
    if keep.sum() < min_sources:
        return 0.0, np.inf, int(keep.sum())
    w = 1.0 / (v[keep] + tau2)
    return float(np.sum(w * a[keep]) / w.sum()), float(1.0 / np.sqrt(w.sum())), int(keep.sum())


def _remove_scale_residual(diff, var, unusable, b: Exposure, fit: KernelFit, mode: str,
                           sources_xy: np.ndarray) -> tuple[KernelFit, float]:
    """Rescale the kernel so that static stars leave no flux in ``diff`` (in place).

    ``unusable`` marks the difference's zero-filled and no-data pixels (as
    :func:`_apply` returns them); they stay 0 (or NaN) after the correction.

    The least-squares kernel is attenuated by the convolved image's noise
    (errors in variables; :func:`_noise_bias` removes most of it when the
    science image is convolved, and nothing does for a shallow coadd
    template).  On 12 visits of an independent simulation the kernel stars
    kept ``a`` = -0.3 to -3.3 % of their flux in ``convolve_science`` and
    +0.3 to +0.8 % in ``convolve_template``, as the attenuation predicts; the
    systematic-residual term then treated the offset as scatter and hid
    variable stars of 15-40 sigma.  When ``|a|`` (:func:`scale_residual`,
    ``ref`` = the unconvolved image ``B``) exceeds
    :data:`SCALE_RESIDUAL_SIGMA` times its error, the kernel is scaled by
    ``s``, which is linear in the difference:

    * ``convolve_science``, ``D = (A (x) k - B) / sum(k)``: ``s = 1 / (1 + a
      sum(k))``, ``D' = D - a B``, and ``B``'s variance term scales by ``(1
      + a sum(k))^2``.  Exact.
    * ``convolve_template``, ``D = phi (x) (B - A (x) k)``: ``s = 1 / (1 -
      a)``, ``D' = (D - a B) / (1 - a)``.  ``phi (x) B`` is approximated by
      ``B`` (an error of ``a`` times the decorrelation's change of a star,
      below 0.1 % of its peak for ``|a| < 1 %``), and the variance is kept
      (the template's share of it changes by ``2 a``).

    Returns the fit with the rescaled kernel and the ``a`` removed (0: none).
    """
    a, a_err, n = scale_residual(diff, var, b.image, unusable, b.psf, sources_xy)
    if not abs(a) > SCALE_RESIDUAL_SIGMA * a_err:
        return fit, 0.0
    zeroed = unusable & np.isfinite(diff)
    ksum = fit.kernel.sum_stats()[0]
    a32 = np.float32(a)
    if mode == "convolve_science":
        scale = 1.0 / (1.0 + a * ksum)
        diff -= a32 * b.image
        var += b.variance * np.float32(((1.0 + a * ksum) ** 2 - 1.0) / ksum**2)
    else:
        scale = 1.0 / (1.0 - a)
        diff -= a32 * b.image
        diff *= np.float32(scale)
    diff[zeroed] = 0.0
    logger.info("kernel flux scale off by %+.4f +- %.4f at %d bright sources: kernel scaled by "
                "%.4f",
                a, a_err, n, scale)
    kernel = replace(fit.kernel, images=fit.kernel.images * scale)
    return replace(fit, kernel=kernel), a


def _apply(a: Exposure, b: Exposure, fit: KernelFit, mode: str, hk: int,
           science: Exposure, template: Exposure, decorrelate: bool):
    """Convolve, subtract, decorrelate; returns image, variance, mask, phi."""
    shape = a.shape
    kern = fit.kernel
    conv = kern.convolve(a.image)
    kc = kern.at()
    sq_c = float((kc**2).sum())
    # local sum(k^2) relative to the centre (kernel sum^2 scales it to first order)
    ksum = kern.sum_field(shape)
    var_a = fft_convolve(a.variance, kc**2)
    var_a *= (ksum / float(kc.sum())) ** 2
    resid = b.image - conv
    del conv
    hg = min(hk, footprint_radius(kc) + 1)
    holes = nan_holes(masks.any_set(a.mask, "NO_DATA"))
    mask = _difference_mask(science, template, a.mask, hg,
                            _hidden_flux_reach(a.mask, kc, b, holes), holes)
    del holes
    nan_pix = masks.any_set(mask, *_NAN_PLANES)
    zero_pix = masks.any_set(mask, *_ZERO_PLANES) | nan_pix | ~np.isfinite(resid)
    background = np.asarray(fit.background, dtype=float)
    if fit.background_order >= 0:
        resid -= poly_field(background, fit.background_order, shape)
        corr = residual_background(resid, ~zero_pix, fit.background_order)
        resid -= poly_field(corr, fit.background_order, shape)
        background = background + corr
    if mode == "convolve_template":
        diff = resid
        norm2 = None
    else:
        diff = -resid / ksum
        norm2 = ksum**2
    del resid, ksum
    diff[zero_pix] = 0.0
    phi = None
    var_b = b.variance
    # Decorrelation (Reiss & Lupton) assumes both inputs have white noise.  When
    # the science image is convolved, the template (a PSF-matched coadd) is the
    # unconvolved term and its noise is already correlated: whitening it as if
    # it were white would make the variance plane wrong.  There the per-pixel
    # variance is propagated as is and detection measures the correlation
    # (diffim.detect.filtered_noise_scale).
    if decorrelate and mode == "convolve_template":
        good = ~zero_pix
        sig_a = float(np.median(a.variance[good]))
        sig_b = float(np.median(var_b[good]))
        del good
        phi = decorrelation_kernel(kc, sig_a, sig_b, 2 * hk + 1)
        fim = FourierImage(diff, phi.shape[0])
        del diff  # (one image less at the peak of the pair subtraction)
        diff = fim.convolve(phi, last=True)
        diff[zero_pix] = 0.0
        # local propagation for slowly varying variances (exact for white noise):
        # var = sum(phi^2) var_B + sum((phi (x) k)^2) / sum(k^2) * (k^2 (x) var_A)
        pk = signal.fftconvolve(phi, kc, mode="full")
        var_a *= np.float32((pk**2).sum() / sq_c)
        var = float((phi**2).sum()) * var_b + var_a
    else:
        var = var_b + var_a
    share = _share_map(var_a, var) if mode == "convolve_template" else None
    del var_a
    if norm2 is not None:
        var = var / norm2
    diff = diff.astype(np.float32)
    var = var.astype(np.float32)
    diff[nan_pix] = np.nan
    var[nan_pix] = np.nan
    return diff, var, mask, phi, background, zero_pix, share


def _share_map(part: np.ndarray, total: np.ndarray) -> np.ndarray:
    """``sum(part) / sum(total)`` over :data:`SHARE_BIN`-px blocks (NaN where the sum is 0).

    Unusable pixels count with the variances they were given (zero-filled
    inputs); their significance is never sampled.
    """
    num = bin_sum(part, SHARE_BIN)
    den = bin_sum(total, SHARE_BIN)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(den > 0, num / den, np.nan).astype(np.float32)


def residual_background(resid: np.ndarray, good: np.ndarray, order: int, *, box: int = 64,
                        step: int = 2) -> np.ndarray:
    """Polynomial (``order``) fitted to box medians of a residual image.

    The differential background fitted on the kernel stamps is biased by
    whatever the kernel leaves around bright stars (it is fitted only there);
    this refits it on the whole image: medians of ``box x box`` boxes (every
    ``step``-th pixel, ``good`` pixels only; boxes with < 25 % good pixels
    ignored), then a least-squares polynomial in the scaled coordinates.
    Returns the coefficients (image units), zeros if too few boxes.
    """
    ny, nx = resid.shape
    nby, nbx = ny // box, nx // box
    ncoef = n_poly_terms(order)
    if nby * nbx < 2 * ncoef:
        return np.zeros(ncoef)
    cut = (slice(0, nby * box, step), slice(0, nbx * box, step))
    sub = np.where(good[cut], resid[cut], np.nan)
    b = box // step
    blocks = sub.reshape(nby, b, nbx, b).transpose(0, 2, 1, 3).reshape(nby, nbx, b * b)
    cnt = np.isfinite(blocks).sum(axis=2)
    ok = cnt >= 0.25 * b * b
    if ok.sum() < 2 * ncoef:
        return np.zeros(ncoef)
    # median of the finite values: sort (NaN last) and take the middle ones;
    # np.nanmedian loops in Python over the boxes and is ~10x slower here
    srt = np.sort(blocks[ok], axis=1)
    c = cnt[ok]
    lo = np.take_along_axis(srt, ((c - 1) // 2)[:, None], axis=1)[:, 0]
    hi = np.take_along_axis(srt, (c // 2)[:, None], axis=1)[:, 0]
    med = 0.5 * (lo + hi)
    yc, xc = np.nonzero(ok)
    u = 2.0 * (xc * box + (box - 1) / 2.0) / max(nx - 1, 1) - 1.0
    v = 2.0 * (yc * box + (box - 1) / 2.0) / max(ny - 1, 1) - 1.0
    coef, *_ = np.linalg.lstsq(poly_terms(u, v, order).T, med, rcond=None)
    return coef


def _noise_ratio(diff: Exposure, step: int = 3) -> float:
    """Robust std of ``diff / sqrt(var)`` over unmasked pixels (every ``step``-th pixel)."""
    img = diff.image[::step, ::step]
    var = diff.variance[::step, ::step]
    bad = masks.any_set(diff.mask[::step, ::step], *masks.BAD_FOR_FIT)
    good = ~bad & np.isfinite(img) & np.isfinite(var) & (var > 0)
    return robust_std(img[good] / np.sqrt(var[good]))


def with_own_share(diff: Exposure, share: np.ndarray) -> Exposure:
    """A leave-one-out difference turned into the difference against the full coadd.

    With the visit's own share ``a`` of the coadd's weight at each pixel, the
    full coadd is ``a S + (1 - a) T'`` once matched, so the difference is
    ``(1 - a)`` times the leave-one-out one and its variance ``(1 - a)^2``
    times (:mod:`diffim.template`, "The full coadd as template").

    Parameters
    ----------
    diff : Exposure
        Difference against the leave-one-out template (nJy, variance nJy^2).
    share : ndarray
        ``a`` on the difference's pixel grid, dimensionless; NaN or values
        outside [0, 1] are read as 0 and 1.

    Returns
    -------
    Exposure
        A copy with image x ``(1 - a)`` and variance x ``(1 - a)^2``; where
        ``a = 1`` (only the visit itself in the coadd) NaN with ``NO_DATA``.
    """
    share = np.asarray(share)
    if share.shape != diff.shape:
        raise ValueError(f"share {share.shape} and difference {diff.shape} differ in shape")
    keep = 1.0 - np.clip(np.nan_to_num(share, nan=0.0), 0.0, 1.0)
    out = diff.copy()
    out.image *= keep
    out.variance *= keep * keep
    alone = keep <= 0
    out.image[alone] = np.nan
    out.variance[alone] = np.nan
    out.mask[alone] |= masks.bit("NO_DATA")
    return out
