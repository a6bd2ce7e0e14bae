"""Robust summary statistics shared by the library modules."""

from __future__ import annotations

import numpy as np
from astropy.stats import mad_std


def robust_std(values) -> float:
    """Robust standard deviation: 1.4826 x the median absolute deviation.

    Parameters
    ----------
    values : array_like
        Any shape; non-finite values (NaN, +-inf) are ignored.

    Returns
    -------
    float
        In the unit of ``values``; NaN when no value is finite.  Equals the
        standard deviation for Gaussian values (to sampling error).
    """
    v = np.asarray(values, float).ravel()
    v = v[np.isfinite(v)]
    return float(mad_std(v)) if v.size else float("nan")


def ridge_solve(a: np.ndarray, b: np.ndarray,
                ridge: float = 1e-12) -> tuple[np.ndarray, np.ndarray]:
    """Solve a stack of normal equations ``a x = b`` with a tiny ridge.

    Parameters
    ----------
    a : ndarray, shape (..., T, T)
        Symmetric positive semi-definite normal matrices.
    b : ndarray, shape (..., T)
        Right-hand sides.
    ridge : float
        ``ridge * trace(a) / T`` is added to the diagonal (plus 1e-300, so that
        an all-zero system gives ``x = 0``): a term with no data gets a
        coefficient of 0 instead of a singular matrix.

    Returns
    -------
    x : ndarray, shape (..., T)
        The solutions.
    cov : ndarray, shape (..., T, T)
        The inverse of the regularised ``a`` (the covariance of ``x`` when
        ``a`` holds inverse-variance weights).
    """
    t = a.shape[-1]
    eye = np.eye(t)
    a = a + (ridge * np.trace(a, axis1=-2, axis2=-1)[..., None, None] / t) * eye + 1e-300 * eye
    return np.linalg.solve(a, b[..., None])[..., 0], np.linalg.inv(a)


def inverse_variance_weights(var: np.ndarray, bad: np.ndarray) -> np.ndarray:
    """Pixel weights ``1 / var``; 0 on ``bad`` pixels and where ``var`` is not positive."""
    ok = ~bad & np.isfinite(var) & (var > 0)
    return np.where(ok, 1.0 / np.where(ok, var, 1.0), 0.0)
