"""Tests of matching only the part of a calexp that a patch needs.

:func:`diffim.psfmatch.make_warp` crops the calexp to the region a patch
needs before matching (:meth:`PsfModel.cropped`, :meth:`Exposure.cropped`,
``match_exposure(..., box=...)``); the warp must be the one that matching
the whole calexp gives.
"""

from __future__ import annotations

import numpy as np
import pytest

from diffim.exposure import Exposure
from diffim.kernel import fit_kernel_polynomial, match_exposure
from diffim.masks import MASK_DTYPE, bit
from diffim.psf import moffat_kernel
from diffim.psfmatch import CROP_MARGIN_KERNELS, make_warp
from diffim.warp import footprint_bbox

from test_warp import tan_wcs

K = 25


def varying_psf(width, height, order=2):
    """Moffat PSF whose FWHM grows 2.6 -> 3.4 px along x and whose ellipticity changes along y."""
    xs, ys = np.meshgrid(np.linspace(0, width - 1, 4), np.linspace(0, height - 1, 4))
    xs, ys = xs.ravel(), ys.ravel()
    kernels = [moffat_kernel(2.6 + 0.8 * x / (width - 1), K, beta=3.0,
                             e1=0.08 * (y / (height - 1) - 0.5), e2=0.03) for x, y in zip(xs, ys)]
    return fit_kernel_polynomial(kernels, xs, ys, order=order, width=width, height=height)


def calexp_like(shape=(300, 340), seed=0):
    """A calexp-like exposure: stars, noise, a varying PSF, a TAN-SIP WCS and defects."""
    rng = np.random.default_rng(seed)
    ny, nx = shape
    psf = varying_psf(nx, ny)
    image = rng.normal(0.0, 5.0, shape)
    c = K // 2
    for _ in range(60):
        x, y = rng.integers(c, nx - c), rng.integers(c, ny - c)
        image[y - c:y + c + 1, x - c:x + c + 1] += rng.uniform(200, 2e4) * psf.at(x, y)
    mask = np.zeros(shape, MASK_DTYPE)
    image[150, 200] = 4e4                               # a cosmic ray, masked
    mask[150, 200] |= bit("CR")
    image[100:180, 150] = 3e4                           # a bleed trail
    mask[100:180, 150] |= bit("SAT")
    image[200:206, 250:256] = np.nan                    # a small no-data block
    image[:, :3] = np.nan                               # a dead rim
    wcs = tan_wcs((nx / 2 + 0.5, ny / 2 + 0.5), rot_deg=20.0, sip=True)
    return Exposure(image=image, variance=np.full(shape, 25.0), mask=mask, wcs=wcs, psf=psf,
                    meta={"NJYPERE": 0.8, "BUNIT": "electron", "VISIT": 7, "BAND": "r"})


def test_cropped_psf_model_is_the_same_psf():
    psf = varying_psf(340, 300)
    crop = psf.cropped(37, 81, 150, 120)
    assert (crop.width, crop.height, crop.order) == (150, 120, psf.order)
    for x, y in [(0, 0), (149, 119), (12.5, 100.25), (75, 60)]:
        np.testing.assert_allclose(crop.at(x, y), psf.at(x + 37, y + 81), rtol=0, atol=1e-14)
    # an order-0 model is the same kernel anywhere
    const = psf.cropped(0, 0, 340, 300)
    np.testing.assert_allclose(const.coeffs, psf.coeffs, atol=1e-15)
    with pytest.raises(ValueError, match="positive size"):
        psf.cropped(0, 0, 0, 10)


def test_cropped_exposure_keeps_pixels_wcs_and_psf():
    exp = calexp_like()
    sub = exp.cropped(30, 50, 230, 170)
    assert sub.shape == (120, 200)
    assert np.shares_memory(sub.image, exp.image)
    np.testing.assert_array_equal(sub.mask, exp.mask[50:170, 30:230])
    xs, ys = np.array([0.0, 57.3, 199.0]), np.array([0.0, 88.8, 119.0])
    np.testing.assert_allclose(sub.wcs.pixel_to_world_values(xs, ys),
                               exp.wcs.pixel_to_world_values(xs + 30, ys + 50), rtol=0, atol=1e-12)
    np.testing.assert_allclose(sub.psf.at(57.3, 88.8), exp.psf.at(87.3, 138.8), atol=1e-14)
    with pytest.raises(ValueError, match="not inside"):
        exp.cropped(30, 50, 400, 170)


def test_match_exposure_of_a_box_is_the_whole_match_cropped():
    exp = calexp_like()
    target = moffat_kernel(4.5, K, beta=4.0)
    whole = match_exposure(exp, target)
    box = (60, 20, 300, 260)
    part = match_exposure(exp, target, box=box)
    assert part.shape == (240, 240) and part.psf.width == 240
    m = 2 * K                           # the box's own rim is not compared
    inner = (slice(m, 240 - m), slice(m, 240 - m))
    ref = (slice(20 + m, 260 - m), slice(60 + m, 300 - m))
    np.testing.assert_array_equal(part.mask[inner], whole.mask[ref])
    good = np.isfinite(whole.image[ref])
    np.testing.assert_array_equal(np.isfinite(part.image[inner]), good)
    # float32 FFTs of different sizes: round-off ~1e-7 of the largest value
    scale = np.nanmax(np.abs(whole.image))
    assert np.abs(part.image[inner][good] - whole.image[ref][good]).max() < 1e-6 * scale
    np.testing.assert_allclose(part.variance[inner][good], whole.variance[ref][good], rtol=1e-4)
    # the defects' masks reached into the compared area
    assert ((part.mask[inner] & bit("SAT")) != 0).any() and ((part.mask[inner] & bit("CR")) != 0).any()


def test_make_warp_of_a_cropped_calexp_is_the_whole_one():
    exp = calexp_like(shape=(300, 340), seed=3)
    # a patch that holds only the calexp's upper right part, rotated against it
    patch_wcs = tan_wcs((-60.5, -40.5), rot_deg=-15.0)
    shape = (400, 400)
    full = make_warp(exp, 1.0, patch_wcs, shape, crop=False)
    crop = make_warp(exp, 1.0, patch_wcs, shape)
    x0, y0 = full.meta["XOFFSET"], full.meta["YOFFSET"]
    sy, sx = footprint_bbox(patch_wcs[y0:y0 + full.shape[0], x0:x0 + full.shape[1]], full.shape,
                            exp.wcs, exp.shape, margin=CROP_MARGIN_KERNELS * K)
    assert (sy.stop - sy.start) * (sx.stop - sx.start) < 0.8 * exp.image.size  # a real crop
    assert crop.shape == full.shape and crop.meta == full.meta
    np.testing.assert_array_equal(crop.mask, full.mask)
    good = np.isfinite(full.image)
    np.testing.assert_array_equal(np.isfinite(crop.image), good)
    assert good.sum() > 5000
    # round-off of float32 FFTs of different sizes, carried through the resampling:
    # measured 1.1e-6 of the largest value, 1e-4 of the pixel noise
    scale = np.nanmax(np.abs(full.image))
    err = np.abs(crop.image[good] - full.image[good])
    assert err.max() < 1e-5 * scale
    assert (err / np.sqrt(full.variance[good])).max() < 1e-3
    np.testing.assert_allclose(crop.variance[good], full.variance[good], rtol=1e-4)
