"""Templates for differencing: coadd patches resampled into a visit's frame.

For each visit, the coadd patches it overlaps are warped onto the visit's
own pixel grid (its fitted WCS) and stitched; pixels with no template get the
``NO_TEMPLATE`` (and ``NO_DATA``) bits and NaN, never zero.  The template's
PSF is the coadd model PSF expressed in visit pixels.

Leave-one-out
-------------
A visit that entered its own template subtracts a fraction ``w_v / S`` of
itself (``S`` the summed weight at that pixel), so a transient loses that
fraction of its flux and the template noise is correlated with the visit's.
:func:`remove_own_contribution` undoes it where the visit contributed::

    T' = (S T - w_v W_v) / (S - w_v)
    V' = (S^2 V - w_v^2 V_v) / (S - w_v)^2

with ``W_v, V_v`` the visit's own warp.  Pixels where the visit was clipped as
an outlier did not contribute; they are detected as ``|W_v - T|`` beyond the
clip threshold and left unchanged.
"""

from __future__ import annotations

import numpy as np

from . import masks
from .exposure import Exposure
from .psf import PsfModel
from .warp import warp_exposure


def remove_own_contribution(coadd: Exposure, weight_sum: np.ndarray, own_warp: Exposure,
                            weight: float, *, clip_sigma: float = 3.0) -> Exposure:
    """The coadd without one input (see module docstring).

    Parameters
    ----------
    coadd : Exposure
        The patch coadd (nJy).
    weight_sum : ndarray
        Summed input weight per coadd pixel.
    own_warp : Exposure
        The visit's warp on the same patch grid (full patch shape).
    weight : float
        The visit's weight in the coadd.

    Returns
    -------
    Exposure
        A copy with the visit removed; pixels where only the visit contributed
        become NO_DATA (NaN).
    """
    out = coadd.copy()
    bad = masks.bits(*masks.BAD_FOR_FIT)
    usable = (np.isfinite(own_warp.image) & ((own_warp.mask & bad) == 0)
              & np.isfinite(coadd.image) & (weight_sum > 0))
    resid = np.abs(own_warp.image - coadd.image)
    usable &= resid <= clip_sigma * np.sqrt(np.maximum(own_warp.variance + coadd.variance, 0))
    rest = weight_sum - weight
    alone = usable & (rest <= 1e-6 * weight)
    ok = usable & ~alone
    s, r = weight_sum[ok], rest[ok]
    out.image[ok] = (s * coadd.image[ok] - weight * own_warp.image[ok]) / r
    out.variance[ok] = np.maximum((s**2 * coadd.variance[ok] - weight**2 * own_warp.variance[ok])
                                  / r**2, 0.0)
    out.image[alone] = np.nan
    out.variance[alone] = np.nan
    out.mask[alone] |= masks.bit("NO_DATA")
    return out


def template_psf(model_fwhm_arcsec: float, pixel_scale_arcsec: float, kernel_size: int,
                 shape) -> PsfModel:
    """The coadd model PSF (circular Gaussian) expressed in visit pixels."""
    return PsfModel.gaussian(model_fwhm_arcsec / pixel_scale_arcsec, kernel_size,
                             width=shape[1], height=shape[0])


def stitch_template(patches: list[Exposure], visit_wcs, visit_shape, psf: PsfModel) -> Exposure:
    """Warp coadd patches into the visit frame and stitch them.

    Earlier patches win where patches overlap (their overlap borders hold the
    same sky); a pixel no patch covers is NaN with ``NO_DATA | NO_TEMPLATE``.
    """
    ny, nx = visit_shape
    image = np.full((ny, nx), np.nan, np.float32)
    variance = np.full((ny, nx), np.nan, np.float32)
    mask = np.full((ny, nx), masks.bits("NO_DATA", "NO_TEMPLATE"), masks.MASK_DTYPE)
    for patch in patches:
        warped = warp_exposure(patch, visit_wcs, visit_shape, smooth_noise=True)
        take = (mask & masks.bit("NO_TEMPLATE")).astype(bool) & np.isfinite(warped.image)
        image[take] = warped.image[take]
        variance[take] = warped.variance[take]
        mask[take] = warped.mask[take]
    meta = {"BUNIT": "nJy", "NPATCHES": len(patches)}
    return Exposure(image=image, variance=variance, mask=mask, wcs=visit_wcs, psf=psf, meta=meta)
