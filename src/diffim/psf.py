"""PSF models: pixelized, spatially varying, one kernel size for every stage.

A :class:`PsfModel` is a stack of ``n_terms`` pixel images (``coeffs``, shape
``(n_terms, K, K)``) multiplied by a 2-D polynomial of order ``order`` in the
scaled detector position::

    PSF(x, y) = sum_k  P_k(u, v) * coeffs[k]
    u = 2 x / (width - 1) - 1,   v = 2 y / (height - 1) - 1      (u, v in [-1, 1])

with ``P_k`` the monomials ``u**i * v**j`` ordered by :func:`poly_terms`.  The
kernel is centred on pixel ``(K // 2, K // 2)`` and ``K`` is odd.  A PSF
evaluated with :meth:`PsfModel.at` is normalised to unit sum.

The kernel size ``K`` is a single config value (``psf.kernel_size``): the
calexp PSF, the coadd model PSF, the warps' PSF and every matching kernel
are built with it, so the cookbook's "model PSF size must equal the
measurement kernel size" failure cannot happen.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

FWHM_PER_SIGMA = 2.0 * np.sqrt(2.0 * np.log(2.0))


def centroid_error(fwhm, snr):
    """Per-axis error (pixels) of a point source's windowed centroid.

    ``sqrt(2) sigma / SNR`` with ``sigma = fwhm / 2.355``: the Cramer-Rao
    bound of a Gaussian source's position on a flat background, which a
    window of the PSF's own size nearly reaches.  ``fwhm`` in pixels;
    ``snr`` the source's flux S/N (non-positive gives ``inf``).
    """
    snr = np.asarray(snr, float)
    with np.errstate(divide="ignore"):
        return np.where(snr > 0, np.sqrt(2.0) * fwhm / FWHM_PER_SIGMA / snr, np.inf)


def poly_terms(u, v, order: int) -> np.ndarray:
    """Monomials ``u**i v**j`` with ``i + j <= order``.

    Parameters
    ----------
    u, v : float or array
        Scaled coordinates in [-1, 1].
    order : int
        Polynomial order (0: constant).

    Returns
    -------
    terms : ndarray, shape ``(n_terms,) + shape(u)``
        Ordered by total degree, then by decreasing power of ``u``:
        ``1, u, v, u^2, uv, v^2, ...``.
    """
    u = np.asarray(u, dtype=float)
    v = np.asarray(v, dtype=float)
    out = []
    for deg in range(order + 1):
        for j in range(deg + 1):
            i = deg - j
            out.append(u**i * v**j)
    return np.array(out)


def n_poly_terms(order: int) -> int:
    """Number of monomials of a 2-D polynomial of the given order."""
    return (order + 1) * (order + 2) // 2


#: A ``K x K`` PSF kernel holds a PSF of FWHM up to ``MAX_FWHM_FRACTION * K``
#: (4 FWHM across): the fit refuses broader PSFs, and every stage that builds
#: a kernel for a given FWHM widens it to this (:func:`kernel_size_for`).
MAX_FWHM_FRACTION = 0.25
#: Largest kernel chosen automatically (a PSF of FWHM ~60 px); broader means
#: an out-of-focus image or a failed seeing estimate, not seeing.
MAX_AUTO_KERNEL_SIZE = 255


def kernel_size_for(fwhm_px: float, minimum: int, *, margin: float = 1.0) -> int:
    """Smallest odd kernel size, at least ``minimum``, that holds a PSF of ``fwhm_px``.

    Parameters
    ----------
    fwhm_px : float
        FWHM (pixels) the kernel must hold, times ``margin``.
    minimum : int
        Odd size (pixels) never gone below (the configured ``psf.kernel_size``).
    margin : float
        Safety factor on ``fwhm_px`` (e.g. for a first seeing estimate).

    Returns
    -------
    int
        ``max(minimum, K)`` with ``K`` the smallest odd size with
        ``margin * fwhm_px <= MAX_FWHM_FRACTION * K``.
    """
    if not (np.isfinite(fwhm_px) and fwhm_px > 0):
        raise ValueError(f"fwhm_px must be a positive number of pixels, got {fwhm_px}")
    need = int(np.ceil(margin * fwhm_px / MAX_FWHM_FRACTION)) | 1
    return max(check_kernel_size(minimum), need)


def check_kernel_size(size: int) -> int:
    """Validate a kernel size: an odd integer >= 5.  Returns it as ``int``."""
    size = int(size)
    if size < 5 or size % 2 == 0:
        raise ValueError(f"PSF kernel size must be an odd integer >= 5, got {size}")
    return size


def gaussian_kernel(fwhm: float, size: int, *, e1: float = 0.0, e2: float = 0.0,
                    dx: float = 0.0, dy: float = 0.0) -> np.ndarray:
    """Pixel-integrated-free (sampled) elliptical Gaussian, unit sum.

    Parameters
    ----------
    fwhm : float
        Full width at half maximum in pixels (geometric mean of the axes).
    size : int
        Odd kernel size K; centre at pixel ``(K//2, K//2)``.
    e1, e2 : float
        Ellipticity components (|e| < 1) of the second-moment matrix.
    dx, dy : float
        Sub-pixel offset of the centre, pixels.
    """
    size = check_kernel_size(size)
    sigma = fwhm / FWHM_PER_SIGMA
    c = size // 2
    y, x = np.mgrid[:size, :size].astype(float)
    x -= c + dx
    y -= c + dy
    k = np.exp(-0.5 * _elliptical_r2(x, y, sigma**2, e1, e2))
    return k / k.sum()


def _elliptical_r2(x, y, scale2: float, e1: float, e2: float):
    """``r^2`` in units of an elliptical scale whose matrix has determinant ``scale2^2``.

    The shape matrix is ``scale2 / sqrt(1 - e^2) [[1 + e1, e2], [e2, 1 - e1]]``
    (``e = |(e1, e2)| < 1``), so the geometric-mean size is ``sqrt(scale2)``.
    """
    e = np.hypot(e1, e2)
    if e >= 1:
        raise ValueError("ellipticity must be < 1")
    s2 = scale2 / np.sqrt(1 - e**2)
    cxx, cyy, cxy = s2 * (1 + e1), s2 * (1 - e1), s2 * e2
    det = cxx * cyy - cxy**2
    return (cyy * x**2 - 2 * cxy * x * y + cxx * y**2) / det


def moffat_kernel(fwhm: float, size: int, *, beta: float = 3.5, e1: float = 0.0,
                  e2: float = 0.0, dx: float = 0.0, dy: float = 0.0,
                  oversample: int = 5) -> np.ndarray:
    """Pixel-integrated elliptical Moffat profile, unit sum.

    ``I(r) ~ (1 + (r/alpha)^2)^-beta`` with ``alpha = fwhm / (2 sqrt(2^(1/beta) - 1))``,
    integrated over pixels by ``oversample``-fold sub-sampling.
    """
    size = check_kernel_size(size)
    alpha = fwhm / (2.0 * np.sqrt(2.0 ** (1.0 / beta) - 1.0))
    c = size // 2
    n = size * oversample
    grid = (np.arange(n) + 0.5) / oversample - 0.5 - c
    x = grid[None, :] - dx
    y = grid[:, None] - dy
    k = (1.0 + _elliptical_r2(x, y, alpha**2, e1, e2)) ** (-beta)
    k = k.reshape(size, oversample, size, oversample).sum(axis=(1, 3))
    return k / k.sum()


def model_psf_kernel(fwhm: float, size: int) -> np.ndarray:
    """The coadd's model PSF: a circular Gaussian of FWHM ``fwhm`` (pixels), unit sum.

    The one definition used by the warps, the coadds and the templates.  (A
    Moffat, beta = 3, of the same adaptive-moment FWHM was tried: on the default
    run its false positives per visit rose from 12.5 to 20.6 and the noise ratio
    of the differences from 1.02 to 1.04; the Gaussian stays.)
    """
    return gaussian_kernel(fwhm, size)


#: Smallest weight variance (px^2) of the de-weighted moments that size
#: undersampled kernels (:func:`moments_fwhm`).
MIN_WEIGHT_VARIANCE = 1.0


def moments_fwhm(kernel: np.ndarray) -> float:
    """FWHM (pixels) of the Gaussian with the same adaptive second moments.

    Uses Gaussian-weighted adaptive moments (iterated), so that broad wings do
    not dominate; for a Gaussian kernel it returns its FWHM exactly (up to
    sampling).  The size is ``sqrt(det(M))**0.5`` of the moment matrix, i.e. the
    geometric mean of the two axes.

    Below a FWHM of about 2 px the adaptive weight shrinks towards a single
    pixel and the iteration collapses (FWHM 0 or undefined).  Such kernels are
    sized by :func:`_deweighted_moments` instead, whose weight is kept at
    least :data:`MIN_WEIGHT_VARIANCE` wide.  Returns NaN when neither gives a
    size (a noisy or blended stamp).
    """
    k = np.asarray(kernel, dtype=float)
    m = _adaptive_moments(k)
    if m is None or min(m[0], m[1]) < MIN_WEIGHT_VARIANCE:
        m = _deweighted_moments(k)  # (a collapsed adaptive size is no size)
    if m is None:
        return float("nan")
    mxx, myy, mxy = m
    sigma = (mxx * myy - mxy**2) ** 0.25
    return float(sigma * FWHM_PER_SIGMA)


def _centroid_grid(k):
    ny, nx = k.shape
    y, x = np.mgrid[:ny, :nx].astype(float)
    tot = k.sum()
    return x, y, (k * x).sum() / tot, (k * y).sum() / tot


def _weighted(k, x, y, xc, yc, mxx, myy, mxy):
    """Centroid and second moments of ``k`` under the Gaussian weight ``(mxx, myy, mxy)``."""
    det = mxx * myy - mxy**2
    if not (np.isfinite(det) and det > 0 and mxx > 0 and myy > 0):
        return None
    dx, dy = x - xc, y - yc
    kw = k * np.exp(-0.5 * (myy * dx**2 - 2 * mxy * dx * dy + mxx * dy**2) / det)
    s = kw.sum()
    if not (np.isfinite(s) and s > 0):
        return None
    xn, yn = (kw * x).sum() / s, (kw * y).sum() / s
    return (xn, yn, (kw * dx**2).sum() / s, (kw * dy**2).sum() / s,
            (kw * dx * dy).sum() / s)


def _adaptive_moments(k):
    """Adaptive moments ``(mxx, myy, mxy)`` (px^2), or None if the iteration diverges."""
    x, y, xc, yc = _centroid_grid(k)
    mxx = myy = (min(k.shape) / 8.0) ** 2
    mxy = 0.0
    for _ in range(100):
        w = _weighted(k, x, y, xc, yc, mxx, myy, mxy)
        if w is None:
            return None  # diverged (noise, neighbours): no meaningful size
        xc, yc, qxx, qyy, qxy = w
        # weighted moments of a Gaussian are half its moments (weight = same shape)
        nxx, nyy, nxy = 2 * qxx, 2 * qyy, 2 * qxy
        done = abs(nxx - mxx) < 1e-8 * mxx and abs(nyy - myy) < 1e-8 * myy
        mxx, myy, mxy = nxx, nyy, nxy
        if done:
            break
    return (mxx, myy, mxy) if mxx * myy - mxy**2 > 0 else None


def _deweighted_moments(k, n_iter: int = 50):
    """Second moments of ``k`` from a weight kept wider than :data:`MIN_WEIGHT_VARIANCE`.

    For a Gaussian of moments ``C`` under a Gaussian weight of moments ``W``
    the weighted moments are ``Q = (C^-1 + W^-1)^-1``, so ``C = (Q^-1 -
    W^-1)^-1`` exactly, whatever ``W``.  The weight follows ``C`` but never
    gets narrower than ``MIN_WEIGHT_VARIANCE`` on either axis, so it never
    shrinks onto one pixel.  Returns None if ``C`` is not positive definite.
    """
    x, y, xc, yc = _centroid_grid(k)
    wm = np.eye(2) * MIN_WEIGHT_VARIANCE
    c = None
    for _ in range(n_iter):
        w = _weighted(k, x, y, xc, yc, wm[0, 0], wm[1, 1], wm[0, 1])
        if w is None:
            return None
        xc, yc, qxx, qyy, qxy = w
        q = np.array([[qxx, qxy], [qxy, qyy]])
        try:
            inv_c = np.linalg.inv(q) - np.linalg.inv(wm)
            if not np.all(np.linalg.eigvalsh(inv_c) > 0):
                return None
            c_new = np.linalg.inv(inv_c)
        except np.linalg.LinAlgError:
            return None
        lam = np.linalg.eigvalsh(c_new).min()
        wm = c_new + max(MIN_WEIGHT_VARIANCE - lam, 0.0) * np.eye(2)
        converged = c is not None and np.allclose(c_new, c, rtol=1e-8, atol=0)
        c = c_new
        if converged:
            break
    return float(c[0, 0]), float(c[1, 1]), float(c[0, 1])


@dataclass(frozen=True)
class PsfModel:
    """Spatially varying pixelized PSF (see module docstring).

    Attributes
    ----------
    coeffs : ndarray, shape (n_terms, K, K)
        Polynomial coefficient images; term 0 is the PSF at the image centre.
    order : int
        Polynomial order of the spatial variation (0 = constant).
    width, height : int
        Size (pixels) of the image the model describes; sets the scaling of
        ``x, y`` to ``u, v``.
    """

    coeffs: np.ndarray
    order: int
    width: int
    height: int

    def __post_init__(self):
        c = np.asarray(self.coeffs, dtype=np.float64)
        if c.ndim != 3 or c.shape[1] != c.shape[2]:
            raise ValueError(f"coeffs must have shape (n_terms, K, K), got {c.shape}")
        check_kernel_size(c.shape[1])
        if c.shape[0] != n_poly_terms(self.order):
            raise ValueError(f"order {self.order} needs {n_poly_terms(self.order)} "
                             f"coefficient images, got {c.shape[0]}")
        object.__setattr__(self, "coeffs", c)

    @property
    def kernel_size(self) -> int:
        """Odd kernel size K (pixels)."""
        return self.coeffs.shape[1]

    @classmethod
    def constant(cls, kernel: np.ndarray, width: int = 1, height: int = 1) -> "PsfModel":
        """A spatially constant model from one kernel (normalised to unit sum)."""
        k = np.asarray(kernel, dtype=float)
        return cls(coeffs=(k / k.sum())[None], order=0, width=width, height=height)

    @classmethod
    def gaussian(cls, fwhm: float, size: int, width: int = 1, height: int = 1) -> "PsfModel":
        """A constant circular Gaussian model PSF of the given FWHM (pixels)."""
        return cls.constant(gaussian_kernel(fwhm, size), width, height)

    @classmethod
    def model(cls, fwhm: float, size: int, width: int = 1, height: int = 1) -> "PsfModel":
        """The coadd model PSF (:func:`model_psf_kernel`), constant over the image."""
        return cls.constant(model_psf_kernel(fwhm, size), width, height)

    def scaled_uv(self, x, y):
        """Scaled coordinates ``(u, v)`` in [-1, 1] of pixel position ``(x, y)``."""
        u = 2.0 * np.asarray(x, float) / max(self.width - 1, 1) - 1.0
        v = 2.0 * np.asarray(y, float) / max(self.height - 1, 1) - 1.0
        return u, v

    def at(self, x: float | None = None, y: float | None = None) -> np.ndarray:
        """PSF kernel (K, K), unit sum, at pixel ``(x, y)`` (default: centre)."""
        if x is None:
            x = (self.width - 1) / 2.0
        if y is None:
            y = (self.height - 1) / 2.0
        u, v = self.scaled_uv(x, y)
        w = poly_terms(u, v, self.order)
        k = np.tensordot(w, self.coeffs, axes=(0, 0))
        return k / k.sum()

    def fwhm(self, x: float | None = None, y: float | None = None) -> float:
        """Adaptive-moment FWHM (pixels) at ``(x, y)`` (default: centre)."""
        return moments_fwhm(self.at(x, y))

    def max_fwhm(self, n: int = 5) -> float:
        """Largest FWHM (pixels) over an ``n x n`` grid spanning the image."""
        xs = np.linspace(0, self.width - 1, n)
        ys = np.linspace(0, self.height - 1, n)
        return max(self.fwhm(x, y) for x in xs for y in ys)

    def cropped(self, x0: int, y0: int, width: int, height: int) -> "PsfModel":
        """The model of the sub-image ``[y0:y0 + height, x0:x0 + width]``, in its pixels.

        Exact: the polynomial in the full image's scaled coordinates is
        re-expressed in the sub-image's (an affine change of variables keeps
        the order), so ``cropped(...).at(x, y) == at(x + x0, y + y0)``.
        """
        if width < 1 or height < 1:
            raise ValueError(f"a crop needs a positive size, got {width} x {height}")
        crop = PsfModel(coeffs=self.coeffs, order=self.order, width=width, height=height)
        if self.order == 0:
            return crop
        # (order + 2)^2 points determine a 2-D polynomial of this total degree
        g = np.linspace(0.0, 1.0, self.order + 2)
        xs, ys = np.meshgrid(g * (width - 1), g * (height - 1))
        xs, ys = xs.ravel(), ys.ravel()
        old = poly_terms(*self.scaled_uv(xs + x0, ys + y0), self.order)
        new = poly_terms(*crop.scaled_uv(xs, ys), self.order)
        # old terms = M @ new terms at every position, so sum_k old_k C_k = sum_j new_j C'_j
        m = np.linalg.lstsq(new.T, old.T, rcond=None)[0].T
        coeffs = np.tensordot(m.T, self.coeffs, axes=(1, 0))
        return PsfModel(coeffs=coeffs, order=self.order, width=width, height=height)

    def padded(self, size: int) -> "PsfModel":
        """The same model on a larger odd kernel size (zero-padded, centre kept).

        The model is zero outside its original ``K x K`` support either way, so
        padding changes nothing but the array size.
        """
        size = check_kernel_size(size)
        pad = (size - self.kernel_size) // 2
        if pad < 0:
            raise ValueError(f"cannot pad a {self.kernel_size}-px PSF model to {size} px")
        if pad == 0:
            return self
        return PsfModel(coeffs=np.pad(self.coeffs, ((0, 0), (pad, pad), (pad, pad))),
                        order=self.order, width=self.width, height=self.height)
