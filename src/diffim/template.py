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

with ``W_v, V_v`` the visit's own warp.  Only pixels where the visit actually
entered the coadd are changed.  A sigma-clipped coadd stores the centre
``C`` and its variance ``V_C`` that its last clipping pass tested every input
against (``CLIPCEN``, ``CLIPCVAR``); the visit entered a pixel exactly when
``(W_v - C)^2 <= s^2 (V_v + V_C) + (r C)^2`` (``s, r`` the coadd's
``clip_sigma``, ``clip_rel``), the coadd's own rule.  (Inferring it instead
from ``|W_v - T|`` against the final coadd ``T`` disagreed with the coadd at
the cores of variable stars and left a non-PSF-shaped remnant of the visit's
own flux in its template: -23 % flux bias, pull width 8.7 on the default run.)
Without a clipping record (a plain mean) the visit entered every pixel where
its warp is usable.

The full coadd as template
--------------------------
With ``diff.leave_one_out: false`` the template is the whole coadd, visit
included.  Subtracting it directly leaves the visit's own noise on both sides
of the difference, and a variance plane (the sum of the two) 1.2-3x too large
where the visit has much of the weight: the variance is then wrong in shape,
not only in scale.  Instead the leave-one-out difference is scaled: the
visit's own matched image cancels against itself (the matching kernel and the
warp's both take its PSF to the model PSF), so against the full coadd ::

    D = S - (a S + (1 - a) T')  =  (1 - a) (S - T'),   a = w_v / S_w

per pixel (``S_w`` the summed weight), with variance ``(1 - a)^2`` times the
leave-one-out one.  :func:`own_weight_share` gives ``a``;
:func:`diffim.subtract.with_own_share` applies it.  A transient keeps the
fraction ``1 - a`` of its flux, which is the full-coadd definition of its
difference flux.
"""

from __future__ import annotations

import numpy as np

from . import masks
from .coadd import DEFAULT_BAD_MASK_BITS
from .exposure import Exposure
from .psf import PsfModel
from .warp import footprint_bbox, warp_exposure


def remove_own_contribution(coadd: Exposure, weight_sum: np.ndarray, own_warp: Exposure,
                            weight: float, *, clip_centre: np.ndarray | None = None,
                            clip_centre_variance: np.ndarray | None = None,
                            clip_sigma: float = 3.0, clip_rel: float = 0.0,
                            bad_mask_bits: int = DEFAULT_BAD_MASK_BITS) -> Exposure:
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
    clip_centre, clip_centre_variance : ndarray, optional
        The sigma-clipped coadd's last clipping centre and its variance
        (:attr:`diffim.coadd.CoaddResult.clip_centre`); None for an unclipped coadd.
    clip_sigma, clip_rel : float
        The coadd's clipping parameters.
    bad_mask_bits : int
        The mask bits that kept an input pixel out of the coadd
        (:func:`diffim.coadd.assemble_coadd`'s ``bad_mask_bits``).

    Returns
    -------
    Exposure
        A copy with the visit removed; pixels where only the visit contributed
        become NO_DATA (NaN).
    """
    out = coadd.copy()
    usable = _entered(coadd, weight_sum, own_warp, clip_centre, clip_centre_variance,
                      clip_sigma, clip_rel, bad_mask_bits)
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


def _entered(coadd, weight_sum, own_warp, clip_centre, clip_centre_variance, clip_sigma,
             clip_rel, bad_mask_bits) -> np.ndarray:
    """Pixels where the visit's warp entered the coadd (boolean, patch shape)."""
    var_v = own_warp.variance
    usable = (np.isfinite(own_warp.image) & ((own_warp.mask & bad_mask_bits) == 0) & (var_v > 0)
              & (var_v < np.inf) & np.isfinite(coadd.image) & (weight_sum > 0))
    if (clip_centre is None) != (clip_centre_variance is None):
        raise ValueError("give both clip_centre and clip_centre_variance, or neither")
    if clip_centre is not None:
        dev2 = (own_warp.image - clip_centre) ** 2
        thr = clip_sigma**2 * (var_v + clip_centre_variance) + (clip_rel * clip_centre) ** 2
        usable &= dev2 <= thr   # the coadd's own test (NaN compares False)
    return usable


def own_weight_share(coadd: Exposure, weight_sum: np.ndarray, own_warp: Exposure,
                     weight: float, *, clip_centre: np.ndarray | None = None,
                     clip_centre_variance: np.ndarray | None = None,
                     clip_sigma: float = 3.0, clip_rel: float = 0.0,
                     bad_mask_bits: int = DEFAULT_BAD_MASK_BITS) -> np.ndarray:
    """The visit's share ``a = w_v / S`` of each coadd pixel's weight.

    Parameters are those of :func:`remove_own_contribution`.

    Returns
    -------
    ndarray of float32
        ``weight / weight_sum`` where the visit entered the coadd (the same
        pixels :func:`remove_own_contribution` changes), 0 elsewhere; patch
        shape, dimensionless, in [0, 1].
    """
    usable = _entered(coadd, weight_sum, own_warp, clip_centre, clip_centre_variance,
                      clip_sigma, clip_rel, bad_mask_bits)
    share = np.zeros(coadd.shape, np.float32)
    share[usable] = np.minimum(weight / weight_sum[usable], 1.0)
    return share


#: Patch pixels read around a visit's footprint: the resampling's taps and
#: the growth of the crop's no-data rim (``3 order + 4`` = 13 px for
#: Lanczos-3, :func:`diffim.warp.source_region`) plus room for the
#: registration's correction of the visit's WCS (sub-pixel in practice).
TEMPLATE_MARGIN = 32


def template_box(visit_wcs, visit_shape, patch_wcs, patch_shape) -> tuple[slice, slice] | None:
    """The part of a coadd patch that a visit's template needs.

    Parameters
    ----------
    visit_wcs : astropy.wcs.WCS
        The visit's fitted WCS.
    visit_shape : (int, int)
        The visit's ``(ny, nx)``.
    patch_wcs : astropy.wcs.WCS
        The patch's WCS.
    patch_shape : (int, int)
        The patch's ``(ny, nx)``.

    Returns
    -------
    (slice, slice) or None
        ``(slice_y, slice_x)`` of patch pixels: the visit's footprint grown by
        :data:`TEMPLATE_MARGIN` and clipped to the patch; None when they do not
        overlap.  A 4k visit needs about a quarter of each of the four 4200 x
        4200 patches it straddles, so the diff job reads that much.
    """
    return footprint_bbox(visit_wcs, visit_shape, patch_wcs, patch_shape,
                          margin=TEMPLATE_MARGIN)


def template_psf(model_fwhm_arcsec: float, pixel_scale_arcsec: float, kernel_size: int,
                 shape) -> PsfModel:
    """The coadd model PSF (circular Gaussian) expressed in visit pixels."""
    return PsfModel.model(model_fwhm_arcsec / pixel_scale_arcsec, kernel_size,
                           width=shape[1], height=shape[0])


def stitch_template(patches: list[Exposure], visit_wcs, visit_shape, psf: PsfModel) -> Exposure:
    """Warp coadd patches into the visit frame and stitch them.

    Earlier patches win where patches overlap (their overlap borders hold the
    same sky); a pixel no patch covers is NaN with ``NO_DATA | NO_TEMPLATE``.

    Parameters
    ----------
    patches : list of Exposure
        Coadd patches, or the parts of them the visit needs
        (:func:`template_box`), in nJy, each with its WCS.
    visit_wcs : astropy.wcs.WCS
        The visit's WCS (0-based pixels).
    visit_shape : (int, int)
        The visit's ``(ny, nx)``.
    psf : PsfModel
        The template's PSF in visit pixels (:func:`template_psf`).

    Returns
    -------
    Exposure
        The template on the visit's grid (nJy, variance nJy^2), with ``psf``.
    """
    ny, nx = visit_shape
    image = np.full((ny, nx), np.nan, np.float32)
    variance = np.full((ny, nx), np.nan, np.float32)
    mask = np.full((ny, nx), masks.bits("NO_DATA", "NO_TEMPLATE"), masks.MASK_DTYPE)
    for patch in patches:
        # each patch is resampled only onto the part of the visit it covers
        box = footprint_bbox(patch.wcs, patch.shape, visit_wcs, visit_shape)
        if box is None:
            continue
        sl_y, sl_x = box
        warped = warp_exposure(patch, visit_wcs[box], (sl_y.stop - sl_y.start,
                                                       sl_x.stop - sl_x.start), smooth_noise=True)
        img, var, msk = image[box], variance[box], mask[box]  # views
        take = (msk & masks.bit("NO_TEMPLATE")).astype(bool) & np.isfinite(warped.image)
        img[take] = warped.image[take]
        var[take] = warped.variance[take]
        msk[take] = warped.mask[take]
    meta = {"BUNIT": "nJy", "NPATCHES": len(patches)}
    return Exposure(image=image, variance=variance, mask=mask, wcs=visit_wcs, psf=psf, meta=meta)
