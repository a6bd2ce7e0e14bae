"""PSF-matched warps: a calexp matched to the model PSF and resampled to a patch.

Match, then warp.  The matching kernel is solved in the detector frame, where
the PSF was measured, so the PSF never has to be resampled; and because the
model PSF is a circular Gaussian and the patch pixel scale is (by default)
the native one, resampling leaves the model PSF unchanged.  The image is
converted from electrons to nJy here, once (:func:`to_njy`).
"""

from __future__ import annotations

import logging
from dataclasses import replace

import numpy as np
from astropy.wcs import WCS

from . import masks
from .calexp import pixel_scale_arcsec
from .errors import NoOverlapError, PsfFitError
from .exposure import Exposure
from .kernel import can_match, match_exposure
from .psf import PsfModel, kernel_size_for, model_psf_kernel
from .warp import footprint_bbox, warp_exposure

logger = logging.getLogger(__name__)

#: Matching kernels broader than this (FWHM, px) correlate the noise enough that
#: resampling does not average it down.
SMOOTH_KERNEL_FWHM_PX = 2.0
#: Margin (in kernel sizes) around the part of a calexp that a patch needs: the
#: convolution and the mask growth reach half a kernel size, the no-data rim of
#: the crop as far, the resampling a few pixels.
CROP_MARGIN_KERNELS = 2


def to_njy(calexp: Exposure) -> Exposure:
    """The calexp in nJy per pixel (image x NJYPERE, variance x NJYPERE^2).

    The one place where electrons become nJy; ``NJYPERE`` comes from the
    calexp's zero point (:func:`diffim.photometry.njy_per_electron`).
    """
    if calexp.meta.get("BUNIT") == "nJy":
        return calexp
    scale = float(calexp.meta["NJYPERE"])
    # new image and variance planes by the products (not copied first, then replaced)
    return replace(calexp, image=calexp.image * np.float32(scale),
                   variance=calexp.variance * np.float32(scale**2), mask=calexp.mask.copy(),
                   meta={**calexp.meta, "BUNIT": "nJy"})


def make_warp(calexp: Exposure, model_fwhm_arcsec: float, patch_wcs: WCS, patch_shape, *,
              regularization: float = 1e-3, crop: bool = True) -> Exposure:
    """PSF-match a calexp to the model PSF and warp it onto a patch.

    Only the part of the calexp that the patch needs is matched (``crop``):
    the patch box mapped back to the detector, plus :data:`CROP_MARGIN_KERNELS`
    kernel sizes, beyond the reach of the convolution, the mask growth and
    the resampling (:func:`diffim.kernel.match_exposure` with ``box``: the
    kernel model is that of the whole detector), so the warp is the one that
    matching the whole calexp gives, to float32 round-off, at the cost of
    the area the patch covers: a 4000 x 4072 visit on four patches was
    matched whole four times before (5.6 of a warp job's 7.8 s).

    Parameters
    ----------
    calexp : Exposure
        Calibrated exposure (electrons, measured PSF, fitted WCS, ``NJYPERE``).
    model_fwhm_arcsec : float
        FWHM of the circular Gaussian model PSF, arcsec.
    patch_wcs, patch_shape
        The patch's WCS and outer shape ``(ny, nx)``.
    regularization : float
        See :func:`diffim.kernel.matching_kernel`.
    crop : bool
        Match only the region the patch needs (default); False matches the
        whole calexp (the reference the crop is tested against).

    Returns
    -------
    Exposure
        The warp in nJy per patch pixel, cropped to the box it covers:
        ``meta["XOFFSET"], meta["YOFFSET"]`` is the patch pixel of its (0, 0).
        Its ``psf`` is the model PSF in patch pixels.

    Raises
    ------
    PsfFitError
        The visit PSF is broader than the model PSF somewhere on the detector
        (matching would need deconvolution).
    NoOverlapError
        The calexp does not reach the patch.
    """
    scale = pixel_scale_arcsec(calexp.wcs)
    patch_scale = pixel_scale_arcsec(patch_wcs)
    # one size for the visit PSF, the model PSF and the kernel: the visit's, widened
    # when the model PSF (in either pixel grid) needs more
    size = kernel_size_for(model_fwhm_arcsec / min(scale, patch_scale), calexp.psf.kernel_size)
    if size > calexp.psf.kernel_size:
        calexp = replace(calexp, psf=calexp.psf.padded(size))
    model = model_psf_kernel(model_fwhm_arcsec / scale, size)
    for x, y in _check_points(calexp.shape):
        ok, reason = can_match(calexp.psf.at(x, y), model)
        if not ok:
            raise PsfFitError(f"at pixel ({x:.0f}, {y:.0f}): {reason}")
    # the patch pixels the calexp covers, and the sub-grid of the patch they make
    box = footprint_bbox(calexp.wcs, calexp.shape, patch_wcs, patch_shape, margin=2)
    if box is None:
        raise NoOverlapError("the exposure does not overlap this patch")
    (y0, y1), (x0, x1) = ((sl.start, sl.stop) for sl in box)
    sub_wcs = patch_wcs[box]
    # noise correlated over more than ~2 px after matching: interpolate variance
    # linearly (see warp_exposure); a near-delta kernel leaves the noise white
    smooth = (model_fwhm_arcsec / scale) ** 2 - calexp.psf.fwhm() ** 2 > SMOOTH_KERNEL_FWHM_PX**2
    region = None
    if crop:  # the calexp pixels that sub-grid needs
        sy, sx = footprint_bbox(sub_wcs, (y1 - y0, x1 - x0), calexp.wcs, calexp.shape,
                                margin=CROP_MARGIN_KERNELS * size)
        region = (sx.start, sy.start, sx.stop, sy.stop)
    matched = match_exposure(to_njy(calexp), model, regularization=regularization, box=region)
    warped = warp_exposure(matched, sub_wcs, (y1 - y0, x1 - x0), smooth_noise=smooth)
    psf = PsfModel.model(model_fwhm_arcsec / patch_scale, size,
                          width=patch_shape[1], height=patch_shape[0])
    meta = {k: calexp.meta[k] for k in ("VISIT", "DETECTOR", "BAND", "MIDMJD", "ZEROPT", "FWHM")
            if k in calexp.meta}
    meta.update(BUNIT="nJy", XOFFSET=x0, YOFFSET=y0, MODELFWH=model_fwhm_arcsec,
                NGOOD=int(np.isfinite(warped.image).sum()))
    return Exposure(image=warped.image, variance=warped.variance, mask=warped.mask,
                    wcs=sub_wcs, psf=psf, meta=meta)


def _check_points(shape):
    ny, nx = shape
    return [(x, y) for x in (0, (nx - 1) / 2, nx - 1) for y in (0, (ny - 1) / 2, ny - 1)]


def has_data(warp: Exposure) -> bool:
    """True when the warp has at least one usable pixel."""
    return bool(np.any(np.isfinite(warp.image) & ((warp.mask & masks.bit("NO_DATA")) == 0)))
