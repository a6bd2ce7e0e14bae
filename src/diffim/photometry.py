"""Photometric calibration: the zero point and the electron -> nJy conversion.

Convention: an exposure's zero point ``ZEROPT`` is the AB magnitude of a
source yielding 1 electron in total in that exposure, so
``mag = ZEROPT - 2.5 log10(flux_e)`` and ``flux_nJy = flux_e *
njy_per_electron(ZEROPT)`` (AB: ``mag = 31.4 - 2.5 log10(flux / nJy)``).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np

from .errors import CalibrationError
from .stats import robust_std

logger = logging.getLogger(__name__)

#: AB magnitude of 1 nJy.
AB_NJY_ZEROPOINT = 31.4
_MAG_PER_FRAC = 2.5 / np.log(10.0)  # d(mag) / d(flux/flux)


def njy_per_electron(zeropoint: float) -> float:
    """nJy per electron for an exposure with the given zero point (AB mag).

    The single unit conversion of the package: ``10**(-0.4 (zeropoint - 31.4))``.
    """
    zeropoint = float(zeropoint)
    if not np.isfinite(zeropoint):
        raise ValueError(f"zero point must be a finite AB magnitude, got {zeropoint}")
    return float(10.0 ** (-0.4 * (zeropoint - AB_NJY_ZEROPOINT)))


@dataclass(frozen=True)
class ZeropointResult:
    """Result of :func:`fit_zeropoint`.

    Attributes
    ----------
    zeropoint : float
        AB magnitude of 1 electron.
    zeropoint_err : float
        Its 1-sigma uncertainty, mag.
    n_used, n_rejected : int
        Stars used in the final mean / rejected as outliers (stars cut for low
        S/N or invalid values are in neither).
    scatter_mag : float
        Robust RMS (1.4826 MAD) of the used stars' residuals, mag.
    """

    zeropoint: float
    zeropoint_err: float
    n_used: int
    n_rejected: int
    scatter_mag: float


def fit_zeropoint(inst_flux_e, inst_flux_err, ref_mag, ref_mag_err=None, *,
                  clip: float = 3.0, min_snr: float = 10.0, min_stars: int = 3,
                  max_iter: int = 10, floor_mag: float = 0.005) -> ZeropointResult:
    """Zero point from matched instrumental fluxes and reference magnitudes.

    Each star gives ``zp_i = ref_mag + 2.5 log10(flux_e)`` with error
    ``sigma_i^2 = (1.0857 flux_err / flux)^2 + ref_mag_err^2 + floor_mag^2``.
    The weighted mean is iterated with ``clip``-sigma rejection, where sigma
    is the star's error scaled up by the robust scatter of the normalised
    residuals when that exceeds 1 (errors underestimated, e.g. by PSF-model
    or aperture-correction scatter).  Variables and blends are thus
    rejected.

    Parameters
    ----------
    inst_flux_e, inst_flux_err : array_like
        Instrumental fluxes and errors, electrons.
    ref_mag, ref_mag_err : array_like
        Reference AB magnitudes (and errors; 0 if not given).
    clip : float
        Rejection threshold, sigma.
    min_snr : float
        Stars with ``flux / flux_err`` below this are not used.
    min_stars : int
        Fewest stars that must survive.

    Returns
    -------
    ZeropointResult

    Raises
    ------
    CalibrationError
        If fewer than ``min_stars`` usable stars remain.
    """
    flux = np.asarray(inst_flux_e, float)
    ferr = np.asarray(inst_flux_err, float)
    ref = np.asarray(ref_mag, float)
    rerr = np.zeros_like(ref) if ref_mag_err is None else np.asarray(ref_mag_err, float)
    if not (flux.shape == ferr.shape == ref.shape == rerr.shape) or flux.ndim != 1:
        raise ValueError("inst_flux_e, inst_flux_err, ref_mag and ref_mag_err must be 1-D "
                         f"arrays of the same length, got shapes {flux.shape}, {ferr.shape}, "
                         f"{ref.shape}, {rerr.shape}")
    with np.errstate(invalid="ignore", divide="ignore"):
        ok = (np.isfinite(flux) & np.isfinite(ferr) & np.isfinite(ref) & (flux > 0)
              & (ferr > 0) & (flux / ferr >= min_snr))
        ok &= np.isfinite(rerr) & (rerr >= 0)
    n_ok = int(ok.sum())
    if n_ok < min_stars:
        raise CalibrationError(
            f"only {n_ok} reference stars with S/N >= {min_snr:g} were matched "
            f"(at least {min_stars} needed) to determine the photometric zero point")
    zp_i = ref[ok] + 2.5 * np.log10(flux[ok])
    sig_i = np.sqrt((_MAG_PER_FRAC * ferr[ok] / flux[ok]) ** 2 + rerr[ok] ** 2 + floor_mag**2)
    zp, zp_err, keep, scale = _clipped_mean(zp_i, sig_i, clip, min_stars, max_iter)
    resid = zp_i[keep] - zp
    scatter = robust_std(resid)
    result = ZeropointResult(zeropoint=float(zp), zeropoint_err=float(zp_err),
                             n_used=int(keep.sum()), n_rejected=int(n_ok - keep.sum()),
                             scatter_mag=scatter)
    logger.info("zero point %.4f +- %.4f from %d stars (%d rejected), scatter %.3f mag",
                result.zeropoint, result.zeropoint_err, result.n_used, result.n_rejected,
                scatter)
    return result


def _clipped_mean(values, sigma, clip, min_keep, max_iter):
    """Iteratively clipped weighted mean; returns (mean, err, keep, scale)."""
    keep = np.ones(values.size, bool)
    # start from the median, robust to a majority-free minority of outliers
    mean = float(np.median(values))
    scale = 1.0
    for _ in range(max_iter):
        norm = (values - mean) / sigma
        scale = max(1.0, 1.4826 * float(np.median(np.abs(norm[keep]))))
        new_keep = np.abs(norm) <= clip * scale
        if new_keep.sum() < min_keep:
            raise CalibrationError(
                f"only {int(new_keep.sum())} stars agree on the zero point within "
                f"{clip:g} sigma (at least {min_keep} needed); the matches to the "
                "reference catalog may be wrong")
        w = 1.0 / sigma[new_keep] ** 2
        mean = float(np.sum(w * values[new_keep]) / np.sum(w))
        if (new_keep == keep).all():
            break
        keep = new_keep
    w = 1.0 / sigma[keep] ** 2
    chi2 = np.sum(w * (values[keep] - mean) ** 2) / max(keep.sum() - 1, 1)
    err = np.sqrt(1.0 / np.sum(w)) * max(1.0, np.sqrt(chi2))
    return mean, err, keep, scale
