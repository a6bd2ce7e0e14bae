"""Tests of diffim.warp: resampling an exposure onto a patch grid."""

from __future__ import annotations

import numpy as np
import pytest
from astropy.wcs import WCS, Sip

from diffim.exposure import Exposure
from diffim.kernel import match_exposure
from diffim.masks import MASK_DTYPE, bit
from diffim.psf import PsfModel, gaussian_kernel, moffat_kernel
from diffim.warp import (footprint_bbox, footprint_overlaps, lanczos_table, pixel_mapping,
                         warp_exposure)

SCALE = 0.2 / 3600.0     # degrees per pixel
RA0, DEC0 = 150.0, 2.0


def tan_wcs(crpix, rot_deg=0.0, scale=SCALE, sip=False):
    """TAN (optionally TAN-SIP) WCS at (RA0, DEC0); crpix is 1-based (FITS)."""
    wcs = WCS(naxis=2)
    wcs.wcs.ctype = ["RA---TAN-SIP", "DEC--TAN-SIP"] if sip else ["RA---TAN", "DEC--TAN"]
    wcs.wcs.crval = [RA0, DEC0]
    wcs.wcs.crpix = list(crpix)
    t = np.deg2rad(rot_deg)
    wcs.wcs.cd = scale * np.array([[-np.cos(t), np.sin(t)], [np.sin(t), np.cos(t)]])
    if sip:
        a = np.zeros((4, 4))
        b = np.zeros((4, 4))
        a[2, 0], a[0, 2], a[3, 0] = 2e-6, -1e-6, 3e-10     # ~2-6 px at the corners
        b[1, 1], b[0, 3] = 1.5e-6, -2e-10
        wcs.sip = Sip(a, b, None, None, wcs.wcs.crpix)
    return wcs


def exposure(image, wcs, **kw) -> Exposure:
    image = np.asarray(image, float)
    return Exposure(image=image, variance=kw.pop("variance", np.ones_like(image)),
                    mask=kw.pop("mask", np.zeros(image.shape, MASK_DTYPE)), wcs=wcs, **kw)


def render_blobs(wcs, shape, ra, dec, sigma=2.0):
    """Sum of unit-peak circular Gaussians (sigma in pixels) at sky positions."""
    yy, xx = np.mgrid[:shape[0], :shape[1]]
    px, py = wcs.world_to_pixel_values(ra, dec)
    image = np.zeros(shape)
    for x, y in zip(px, py):
        image += np.exp(-((xx - x) ** 2 + (yy - y) ** 2) / (2 * sigma**2))
    return image


# ----------------------------------------------------------------------------
# mapping and footprint
# ----------------------------------------------------------------------------

def test_mapping_interpolation_error_below_001_px():
    """Coarse-grid bicubic mapping between a rotated TAN-SIP and a TAN grid."""
    src = tan_wcs((1000.5, 1000.5), 0.0, sip=True)
    dst = tan_wcs((1100.5, 900.5), 30.0)
    bbox = footprint_bbox(src, (2000, 2000), dst, (2000, 2000))
    mapping = pixel_mapping(src, dst, bbox, grid_step=32)
    assert mapping.grid_step == 32 and mapping.max_error < 0.01
    # independent check at random target pixels against the exact WCS chain
    rng = np.random.default_rng(0)
    ty, tx = rng.uniform(0, 1999, (2, 2000))
    ra, dec = dst.pixel_to_world_values(tx, ty)
    ex, ey = src.world_to_pixel_values(ra, dec)
    gx = mapping.x_spline(ty, tx, grid=False)
    gy = mapping.y_spline(ty, tx, grid=False)
    # the brief's requirement; measured 2e-9 px (the SIP terms move the corners
    # by ~2 px but are smooth on 32 px scales)
    assert max(np.abs(gx - ex).max(), np.abs(gy - ey).max()) < 0.01
    # the fast row evaluator is the same spline
    rows, cols = np.arange(100, 110), np.arange(bbox[1].start, bbox[1].stop)
    fx, fy, _ = mapping.row_evaluator(cols)(rows)
    np.testing.assert_allclose(fx, mapping.x_spline(rows, cols), atol=1e-9)
    np.testing.assert_allclose(fy, mapping.y_spline(rows, cols), atol=1e-9)


def test_footprint_overlap_and_disjoint():
    src = tan_wcs((50.5, 50.5))
    assert footprint_overlaps(src, (100, 100), tan_wcs((80.5, 60.5), 45.0), (100, 100))
    far = tan_wcs((5000.5, 50.5))              # 5000 px away
    assert footprint_bbox(src, (100, 100), far, (100, 100)) is None
    assert not footprint_overlaps(src, (100, 100), far, (100, 100))
    out = warp_exposure(exposure(np.ones((100, 100)), src), far, (100, 100))
    assert np.isnan(out.image).all() and (out.mask == bit("NO_DATA")).all()


def test_lanczos_table():
    table = lanczos_table(3)
    np.testing.assert_allclose(table.sum(axis=0), 1.0, atol=1e-6)
    np.testing.assert_allclose(table[:, 0], [0, 0, 1, 0, 0, 0], atol=1e-7)
    np.testing.assert_allclose(table[:, -1], [0, 0, 0, 1, 0, 0], atol=1e-7)
    # exact for cubics: sum w d^n = 1, 0, 0, 0 with d the tap's offset from x
    offset = np.arange(-2, 4)[:, None] - np.arange(table.shape[1])[None, :] / (table.shape[1] - 1)
    for n in range(4):
        np.testing.assert_allclose((table * offset**n).sum(axis=0), float(n == 0), atol=1e-6)
    with pytest.raises(ValueError, match="unknown resampling kernel"):
        warp_exposure(exposure(np.ones((10, 10)), tan_wcs((5, 5))), tan_wcs((5, 5)),
                      (10, 10), kernel="cubic")


# ----------------------------------------------------------------------------
# image quality
# ----------------------------------------------------------------------------

def test_rotated_subpixel_warp_reproduces_band_limited_image():
    rng = np.random.default_rng(1)
    ra = RA0 + rng.uniform(-70, 70, 40) * SCALE
    dec = DEC0 + rng.uniform(-70, 70, 40) * SCALE
    src = tan_wcs((100.5, 100.5))
    dst = tan_wcs((100.5 + 3.37, 100.5 - 7.81), 30.0)    # rotated 30 deg, sub-pixel dither
    out = warp_exposure(exposure(render_blobs(src, (200, 200), ra, dec), src), dst, (200, 200))
    truth = render_blobs(dst, (200, 200), ra, dec)
    interior = np.isfinite(out.image)
    assert interior.mean() > 0.5
    # sigma = 2 px blobs are band-limited to ~1e-4; measured 0.30 % of the peak
    # (Lanczos-3's passband ripple; 0.39 % before its weights were made exact
    # for cubics), brief: < 1 %
    assert np.abs(out.image - truth)[interior].max() < 0.01 * truth[interior].max()


def _x_shift_derivative(wcs, shape, ra, dec, sigma=2.0):
    """d/ds of :func:`render_blobs` for a common shift ``s`` of all blobs along x (px)."""
    yy, xx = np.mgrid[:shape[0], :shape[1]]
    out = np.zeros(shape)
    for x, y in zip(*wcs.world_to_pixel_values(ra, dec)):
        out += np.exp(-((xx - x) ** 2 + (yy - y) ** 2) / (2 * sigma**2)) * (xx - x) / sigma**2
    return out


def _common_shift(image, reference, d_dx, good):
    """Least-squares shift (px along x) that takes ``reference`` to ``image``."""
    return np.sum(((image - reference) * d_dx)[good]) / np.sum((d_dx**2)[good])


@pytest.mark.parametrize("phase", [0.125, 0.25, 0.375, 0.625, 0.75])
def test_resampling_moves_no_star(phase):
    # A pure sub-pixel translation: every output pixel has the same phase, so a
    # kernel whose weights have a first moment moves every star by it.  Lanczos-3
    # normalised to unit sum moved sigma = 2 px stars by up to 0.010 px (phase
    # 0.25); the cubic-exact weights of lanczos_table by 1e-4 px.
    shape, sigma = (120, 120), 2.0
    src = tan_wcs((60.5, 60.5))
    dst = tan_wcs((60.5 + phase, 60.5 + phase))
    gx, gy = np.meshgrid(np.arange(20, 101, 20), np.arange(20, 101, 20))
    ra, dec = src.pixel_to_world_values(gx.ravel() + 0.0, gy.ravel() + 0.0)
    out = warp_exposure(exposure(render_blobs(src, shape, ra, dec, sigma), src), dst, shape).image
    truth = render_blobs(dst, shape, ra, dec, sigma)
    d_dx = _x_shift_derivative(dst, shape, ra, dec, sigma)
    assert abs(_common_shift(out, truth, d_dx, np.isfinite(out))) < 1e-3


def test_warp_agrees_with_reproject():
    """Cross-check of the whole pixel -> sky -> pixel chain (TAN-SIP source,
    rotated and dithered target) against reproject, an independent
    implementation; reproject's bicubic spline interpolation is the more
    accurate one on these smooth images (0.07 % of the peak against our
    0.3 %), but it is ~15x slower and resamples no variance or mask
    (``benchmarks/bench_warp.py``)."""
    from reproject import reproject_interp

    rng = np.random.default_rng(3)
    ra = RA0 + rng.uniform(-70, 70, 40) * SCALE
    dec = DEC0 + rng.uniform(-70, 70, 40) * SCALE
    shape = (200, 200)
    src = tan_wcs((100.5, 100.5), sip=True)
    dst = tan_wcs((100.5 + 3.37, 100.5 - 7.81), 30.0)
    image = render_blobs(src, shape, ra, dec)
    ours = warp_exposure(exposure(image, src), dst, shape).image
    theirs, footprint = reproject_interp((image, src), dst, shape_out=shape, order="bicubic")
    truth = render_blobs(dst, shape, ra, dec)
    d_dx = _x_shift_derivative(dst, shape, ra, dec)
    both = np.isfinite(ours) & np.isfinite(theirs) & (footprint > 0)
    assert both.mean() > 0.75
    peak = truth[both].max()
    # measured 0.36 % (ours) and 0.07 % (reproject) of the peak against the truth
    assert np.abs(ours - truth)[both].max() < 0.005 * peak
    assert np.abs(theirs - truth)[both].max() < 0.002 * peak
    assert np.abs(ours - theirs)[both].max() < 0.006 * peak
    # no relative shift: a pixel-convention or SIP error would show here
    assert abs(_common_shift(ours, theirs, d_dx, both)) < 2e-3


def test_flux_conserved_through_matching_and_warping():
    size = 31
    shape = (160, 180)
    src = tan_wcs((90.5, 80.5))
    psf = PsfModel.constant(moffat_kernel(3.2, size, beta=3.0, e1=0.05), shape[1], shape[0])
    image = np.zeros(shape)
    image[80 - 15:80 + 16, 90 - 15:90 + 16] = 5000.0 * moffat_kernel(
        3.2, size, beta=3.0, e1=0.05, dx=0.37, dy=-0.21)
    target = gaussian_kernel(4.5, size)
    matched = match_exposure(exposure(image, src, psf=psf), target)
    dst = tan_wcs((100.5 + 0.43, 100.5 + 0.71), 30.0)
    warped = warp_exposure(matched, dst, (200, 200))
    ra, dec = src.pixel_to_world_values(90.37, 79.79)
    x, y = (int(round(float(v))) for v in dst.world_to_pixel_values(ra, dec))
    box = warped.image[y - 20:y + 21, x - 20:x + 21]
    assert np.isfinite(box).all()
    # brief: 0.5 %; measured 0.001 % (matched) and 0.005 % (warped)
    assert matched.image[60:101, 70:111].sum() == pytest.approx(5000.0, rel=0.005)
    assert box.sum() == pytest.approx(5000.0, rel=0.005)
    # the warp's PSF is the (circular) model PSF
    assert warped.psf is not None and warped.psf.width == 200
    np.testing.assert_allclose(warped.psf.at(), target)


def test_surface_brightness_scales_with_pixel_area():
    src = tan_wcs((60.5, 60.5))
    dst = tan_wcs((50.5, 50.5), 10.0, scale=1.1 * SCALE)   # pixels 1.21 x larger
    out = warp_exposure(exposure(np.full((120, 120), 2.0), src,
                                 variance=np.full((120, 120), 3.0)), dst, (100, 100))
    good = np.isfinite(out.image)
    assert good.sum() > 5000
    # a constant surface brightness gives flux per pixel x area ratio 1.21
    # (TAN distortion over 60 px: < 1e-6); variance scales with its square, times
    # sum(w^2) <= 1.0007 per axis (the cubic-exact weights of lanczos_table)
    np.testing.assert_allclose(out.image[good], 2.0 * 1.21, rtol=1e-4)
    assert np.all(out.variance[good] <= 3.0 * 1.21**2 * 1.0007**2)


# ----------------------------------------------------------------------------
# variance and masks
# ----------------------------------------------------------------------------

def test_variance_of_warped_white_noise():
    rng = np.random.default_rng(2)
    sigma2 = 4.0
    src = tan_wcs((150.5, 150.5))
    dst = tan_wcs((150.5 + 0.31, 150.5 - 0.44), 30.0)
    noise = rng.normal(0.0, np.sqrt(sigma2), (300, 300))
    out = warp_exposure(exposure(noise, src, variance=np.full(noise.shape, sigma2)),
                        dst, (300, 300))
    good = np.isfinite(out.image)
    # sum w^2 V is the exact per-pixel variance: Lanczos-3 gives 0.6 - 1.0014 x V
    # depending on the sub-pixel phase (sum(w^2) <= 1.0007 per axis).  Measured / propagated, over ~50k
    # pixels (correlated over ~2 px): statistical 1-sigma ~1 %; allow 3 %.
    ratio = out.image[good].var() / out.variance[good].mean()
    assert ratio == pytest.approx(1.0, abs=0.03)
    assert 0.5 * sigma2 < out.variance[good].min() <= out.variance[good].max() <= sigma2 * 1.0015
    # neglected covariance: a 2x2 sum has more variance than the sum of the
    # propagated variances (positive neighbour correlation); measured 1.22 x
    img = np.where(good, out.image, 0.0)[:300, :300].reshape(150, 2, 150, 2)
    var = np.where(good, out.variance, 0.0)[:300, :300].reshape(150, 2, 150, 2)
    full = good.reshape(150, 2, 150, 2).all(axis=(1, 3))
    factor = img.sum(axis=(1, 3))[full].var() / var.sum(axis=(1, 3))[full].mean()
    assert 1.1 < factor < 1.4


def test_no_data_outside_and_around_nan():
    src = tan_wcs((50.5, 50.5))
    dst = tan_wcs((60.5, 55.5), 30.0)
    image = np.ones((100, 100))
    image[40, 60] = np.nan
    mask = np.zeros((100, 100), MASK_DTYPE)
    mask[70, 30] = bit("BAD")
    out = warp_exposure(exposure(image, src, mask=mask), dst, (120, 120))
    nodata = (out.mask & bit("NO_DATA")) != 0
    np.testing.assert_array_equal(np.isnan(out.image), nodata)
    np.testing.assert_array_equal(np.isnan(out.variance), nodata)
    assert not np.any(out.image[~nodata] == 0.0)
    np.testing.assert_allclose(out.image[~nodata], 1.0, atol=1e-5)
    # every target pixel mapping outside the source is NO_DATA
    ty, tx = np.mgrid[:120, :120]
    sx, sy = src.world_to_pixel_values(*dst.pixel_to_world_values(tx, ty))
    outside = (sx < -0.5) | (sx > 99.5) | (sy < -0.5) | (sy > 99.5)
    assert nodata[outside].all()
    # ... and so is the Lanczos support (6x6 source px, rotated: ~40 target px)
    # around the NaN source pixel, but nothing far from it inside the footprint
    ra, dec = src.pixel_to_world_values(60, 40)
    x, y = (int(round(float(v))) for v in dst.world_to_pixel_values(ra, dec))
    assert nodata[y, x] and 25 <= nodata[y - 6:y + 7, x - 6:x + 7].sum() <= 45  # 35
    # the BAD bit is OR-ed over the nearest 2x2 source pixels: an area of 4
    # source pixels, i.e. ~4 target pixels (measured 5)
    bad = (out.mask & bit("BAD")) != 0
    assert 2 <= bad.sum() <= 7


def test_only_the_needed_source_region_is_resampled(monkeypatch):
    """A target that needs a corner of the source: the warp of the source's region
    (``source_region``) is the warp of the whole source."""
    import diffim.warp as warp_module

    rng = np.random.default_rng(11)
    src = tan_wcs((300.5, 250.5), sip=True)
    shape = (500, 600)
    ra, dec = src.pixel_to_world_values(rng.uniform(0, 600, 80), rng.uniform(0, 500, 80))
    image = render_blobs(src, shape, ra, dec) * 100.0 + rng.normal(0, 1, shape)
    image[430:434, 520:523] = np.nan
    mask = np.zeros(shape, MASK_DTYPE)
    mask[420, 500] = bit("CR")
    mask[380:480, 450] = bit("BAD")
    exp = exposure(image, src, mask=mask, variance=np.full(shape, 2.0))
    dst = tan_wcs((-100.5, -80.5), 25.0)            # holds the source's upper right part
    bbox = footprint_bbox(src, shape, dst, (300, 300))
    part = warp_module.source_region(exp, dst, bbox, margin=13)
    assert part.image.size < 0.5 * exp.image.size
    out = warp_exposure(exp, dst, (300, 300))
    monkeypatch.setattr(warp_module, "source_region", lambda exposure, *a, **k: exposure)
    ref = warp_exposure(exp, dst, (300, 300))
    np.testing.assert_array_equal(out.mask, ref.mask)
    good = np.isfinite(ref.image)
    np.testing.assert_array_equal(np.isfinite(out.image), good)
    assert good.sum() > 20000 and ((out.mask & bit("BAD")) != 0).sum() > 50
    np.testing.assert_allclose(out.image[good], ref.image[good], rtol=0, atol=1e-4)
    np.testing.assert_allclose(out.variance[good], ref.variance[good], rtol=1e-6)
