"""Spatial variation of a PSF model as smooth fields of size and shear.

With few PSF stars a pixelized model cannot follow the PSF across the image:
every coefficient image of :class:`diffim.psf.PsfModel` is fitted pixel by
pixel, so a spatial order beyond what the stars constrain turns into pixel
noise, and a lower order misses the curvature of the seeing and optics
pattern.  Here the variation is described by what the atmosphere and the
optics actually change -- the PSF's size and its two shears -- each a
low-order polynomial of the position, applied to the mean PSF ``c0`` by its
first-order deformation images:

    PSF(x, y) = c0 + sum_k a_k(u, v) D_k[c0],

    D_size = -(2 + x d/dx + y d/dy) c0      (``d/ds`` of ``s^-2 c0(r / s)``)
    D_e1   = -(x d/dx - y d/dy) c0
    D_e2   = -(y d/dx + x d/dy) c0

(``x, y`` are kernel pixel offsets from the centre).  Each star measures
``a_k`` at its position by weighted least squares on its normalised stamp;
the fields are polynomials fitted to those measurements.  Because ``D_k``
are fixed images, the model is again a :class:`~diffim.psf.PsfModel` (its
coefficient image ``t`` is ``delta_t0 c0 + sum_k a_kt D_k``).

Units: the deformations are dimensionless (``a_size = 0.01`` is a PSF 1 %
larger); positions are scaled to ``u, v`` in [-1, 1] as in
:func:`diffim.psf.poly_terms`.
"""

from __future__ import annotations

import numpy as np

from .psf import n_poly_terms, poly_terms
from .stats import ridge_solve


def deformation_images(c0: np.ndarray) -> np.ndarray:
    """Images ``(3, K, K)``: size, e1 and e2 deformations of the PSF ``c0``.

    Derivatives are spectral (zero-padded FFT), so they hold for PSFs down to
    the Nyquist sampling.  Each image integrates to zero to first order in
    the deformation (flux is conserved by a shear or a dilation at fixed
    total).
    """
    k = c0.shape[0]
    n = 2 * k
    spec = np.fft.rfft2(c0, s=(n, n))
    fy = np.fft.fftfreq(n)[:, None]
    fx = np.fft.rfftfreq(n)[None, :]
    dx = np.fft.irfft2(2j * np.pi * fx * spec, s=(n, n))[:k, :k]
    dy = np.fft.irfft2(2j * np.pi * fy * spec, s=(n, n))[:k, :k]
    y, x = np.mgrid[:k, :k] - k // 2
    size = -(2.0 * c0 + x * dx + y * dy)
    e1 = -(x * dx - y * dy)
    e2 = -(y * dx + x * dy)
    return np.stack([size, e1, e2])


def star_deformations(data, weight, c0, basis):
    """Each star's deformations ``a`` (N, 3) and their variances (N, 3).

    ``data`` (N, P) are the stars' stamps divided by their flux, ``weight``
    (N, P) their inverse variances (0 = unused pixel), ``c0`` (P,) the mean
    PSF and ``basis`` (3, P) its deformation images.  An amplitude term
    (``c0`` itself) takes up each star's flux error.
    """
    x = np.vstack([c0[None], basis])                          # (4, P)
    a = np.einsum("kp,np,lp->nkl", x, weight, x)
    b = np.einsum("kp,np,np->nk", x, weight, data - c0[None])
    sol, cov = ridge_solve(a, b)
    return sol[:, 1:], np.diagonal(cov, axis1=1, axis2=2)[:, 1:]


def fit_field(values, variances, u, v, order: int, n_iter: int = 10):
    """Polynomial coefficients (T,) of one deformation over the stars.

    Weighted least squares with weights ``1 / (variance + tau^2)``, where the
    stars' scatter beyond their noise, ``tau^2``, is found by the
    Paule-Mandel condition ``chi^2 = degrees of freedom`` (a star's shape
    also carries what no smooth field describes: a blend, a galaxy).

    Returns
    -------
    coef : ndarray (T,)
    loo : float
        Weighted mean square of the leave-one-out residuals: how well the
        field predicts a star it was not fitted to.
    """
    terms = poly_terms(u, v, order)                           # (T, N)
    ok = np.isfinite(values) & np.isfinite(variances) & (variances > 0)
    t, y, var = terms[:, ok], values[ok], variances[ok]
    if y.size < t.shape[0] + 2:
        return np.zeros(t.shape[0]), np.inf
    dof = max(y.size - t.shape[0], 1)
    tau2 = 0.0
    for _ in range(n_iter):
        w = 1.0 / (var + tau2)
        coef, cov = ridge_solve((t * w) @ t.T, (t * w) @ y)
        q = float(np.sum(w * (y - coef @ t) ** 2))
        step = (q - dof) / float(np.sum(w))        # Newton step towards Q(tau^2) = dof
        if abs(step) <= 1e-3 * (tau2 + float(np.median(var))) or (tau2 == 0.0 and step <= 0):
            break
        tau2 = max(tau2 + step, 0.0)
    hat = np.einsum("kn,kl,ln->n", t, cov, t) * w
    r = (y - coef @ t) / np.maximum(1.0 - hat, 1e-3)
    return coef, float(np.sum(w * r * r) / np.sum(w))


def fit_field_cv(values, variances, u, v, max_order: int) -> tuple[np.ndarray, int]:
    """The field of the order (0..``max_order``) that predicts left-out stars
    best, as coefficients of ``n_poly_terms(max_order)`` terms (zero-padded)."""
    best = (np.zeros(1), np.inf, 0)          # too few stars: no deformation
    for order in range(max_order + 1):
        coef, loo = fit_field(values, variances, u, v, order)
        if loo < best[1]:
            best = (coef, loo, order)
    out = np.zeros(n_poly_terms(max_order))
    out[:best[0].size] = best[0]
    return out, best[2]


def shape_field_model(data, weight, u, v, c0, max_order: int):
    """Coefficient images ``(T, P)`` of the size-and-shear model and its order.

    Parameters
    ----------
    data, weight : ndarray (N, P)
        Normalised, recentred stamps of the stars used and their inverse
        variances (flattened ``K x K``).
    u, v : ndarray (N,)
        Scaled star positions.
    c0 : ndarray (P,)
        Mean PSF (unit sum) of the stars.
    max_order : int
        Largest polynomial order of the fields.
    """
    k = int(round(np.sqrt(c0.size)))
    basis = deformation_images(c0.reshape(k, k)).reshape(3, -1)
    a, var = star_deformations(data, weight, c0, basis)
    fits = [fit_field_cv(a[:, j], var[:, j], u, v, max_order) for j in range(3)]
    order = max(o for _, o in fits)
    coef = np.stack([c[:n_poly_terms(order)] for c, _ in fits])   # (3, T)
    coeffs = coef.T @ basis                                   # (T, P)
    coeffs[0] += c0
    return coeffs, order
