"""Tests of diffim.kernel: PSF-matching kernels and spatially varying convolution."""

from __future__ import annotations

import numpy as np
import pytest
from scipy.signal import convolve2d

from diffim.exposure import Exposure
from diffim.kernel import (can_match, convolve_spatially_varying, convolve_variance,
                           fit_kernel_polynomial, grow_mask, inpaint, kernel_envelope,
                           kernel_footprint_halfwidth, match_exposure, matching_kernel,
                           matching_kernel_model, or_window, spread_by_influence)
from diffim.masks import MASK_DTYPE, bit
from diffim.psf import (FWHM_PER_SIGMA, PsfModel, gaussian_kernel, moffat_kernel,
                        moments_fwhm, poly_terms)

K = 31            # kernel size used throughout
MODEL_FWHM = 5.0  # model PSF FWHM, pixels


def visit_psf(fwhm_moments: float, *, dx: float = 0.0, dy: float = 0.0) -> np.ndarray:
    """Slightly elliptical Moffat (beta 3) whose adaptive-moment FWHM is ``fwhm_moments``."""
    trial = moffat_kernel(fwhm_moments, K, beta=3.0, e1=0.05, e2=0.03)
    nominal = fwhm_moments**2 / moments_fwhm(trial)
    return moffat_kernel(nominal, K, beta=3.0, e1=0.05, e2=0.03, dx=dx, dy=dy)


def stamp(image, x, y, size=K):
    c = size // 2
    return image[y - c:y + c + 1, x - c:x + c + 1]


def exposure_with_stars(psf: PsfModel, positions, flux=1000.0) -> Exposure:
    image = np.zeros((psf.height, psf.width))
    for x, y in positions:
        stamp(image, x, y)[...] += flux * psf.at(x, y)
    return Exposure(image=image, variance=np.ones_like(image),
                    mask=np.zeros(image.shape, MASK_DTYPE), psf=psf)


# ----------------------------------------------------------------------------
# single kernel
# ----------------------------------------------------------------------------

def test_gaussian_to_gaussian_kernel_is_analytic_gaussian():
    # sigma 1.5 -> 2.5 px needs a Gaussian of sigma sqrt(2.5^2 - 1.5^2) = 2.0 px
    s1, s2 = 1.5, 2.5
    kernel = matching_kernel(gaussian_kernel(s1 * FWHM_PER_SIGMA, K),
                             gaussian_kernel(s2 * FWHM_PER_SIGMA, K))
    expected = gaussian_kernel(2.0 * FWHM_PER_SIGMA, K)
    # measured: FWHM 0.03 %, residual 0.07 % of the peak; the sampled Gaussians
    # and the lambda = 1e-3 damping bias the result slightly, hence 1 % / 1 %
    assert moments_fwhm(kernel) == pytest.approx(2.0 * FWHM_PER_SIGMA, rel=0.01)
    assert np.abs(kernel - expected).max() < 0.01 * expected.max()
    assert kernel.sum() == pytest.approx(1.0, abs=1e-12)


def test_matching_kernel_rejects_different_shapes():
    with pytest.raises(ValueError, match="same shape"):
        matching_kernel(gaussian_kernel(3.0, 21), gaussian_kernel(5.0, 23))


@pytest.mark.parametrize("ratio", [0.5, 0.7, 0.85, 1.0])
def test_star_matched_to_model_psf(ratio):
    """A sub-pixel-centred star with a Moffat PSF comes out with the model PSF."""
    psf = visit_psf(ratio * MODEL_FWHM)
    target = gaussian_kernel(MODEL_FWHM, K)
    x0, y0, dx, dy = 60, 50, 0.3, -0.2
    image = np.zeros((100, 120))
    stamp(image, x0, y0)[...] = 1000.0 * visit_psf(ratio * MODEL_FWHM, dx=dx, dy=dy)
    kernel = PsfModel.constant(matching_kernel(psf, target))
    out = stamp(convolve_spatially_varying(image, kernel), x0, y0) / 1000.0
    expected = gaussian_kernel(MODEL_FWHM, K, dx=dx, dy=dy)
    # brief's tolerances; measured: FWHM <= 0.02 %, residual <= 0.2 % of the peak,
    # flux in the stamp within 0.2 % (the rest is outside the stamp)
    assert moments_fwhm(out) == pytest.approx(MODEL_FWHM, rel=0.02)
    assert np.abs(out - expected).max() < 0.01 * expected.max()
    assert out.sum() == pytest.approx(1.0, rel=0.005)


def test_can_match_reports_broader_psf():
    target = gaussian_kernel(MODEL_FWHM, K)
    ok, reason = can_match(visit_psf(0.9 * MODEL_FWHM), target)
    assert ok and reason == ""
    ok, reason = can_match(visit_psf(1.2 * MODEL_FWHM), target)
    assert not ok
    assert reason.startswith("PSF FWHM 6.0")       # visit_psf is 1.2 x 5 px to ~0.2 %
    assert "broader than the model PSF FWHM 5.00 px" in reason
    ok, _ = can_match(visit_psf(1.04 * MODEL_FWHM), target, tolerance=0.05)
    assert ok


# ----------------------------------------------------------------------------
# convolution
# ----------------------------------------------------------------------------

def test_fft_convolution_matches_convolve2d():
    rng = np.random.default_rng(1)
    image = rng.normal(size=(40, 53))
    kernel = rng.normal(size=(7, 7))
    out = convolve_spatially_varying(image, PsfModel(coeffs=kernel[None], order=0,
                                                     width=1, height=1))
    # float64 FFT round-off only
    np.testing.assert_allclose(out, convolve2d(image, kernel, mode="same"), atol=1e-10)


def test_spatially_varying_convolution_is_kernel_at_input_pixel():
    """Brute force: every input pixel is spread by the kernel of its own position."""
    rng = np.random.default_rng(2)
    ny, nx, size = 19, 23, 5
    model = PsfModel(coeffs=rng.normal(size=(6, size, size)), order=2, width=nx, height=ny)
    image = rng.normal(size=(ny, nx))
    expected = np.zeros((ny + size - 1, nx + size - 1))
    for y in range(ny):
        for x in range(nx):
            u, v = model.scaled_uv(x, y)
            k = np.tensordot(poly_terms(u, v, 2), model.coeffs, axes=(0, 0))
            expected[y:y + size, x:x + size] += image[y, x] * k
    c = size // 2
    np.testing.assert_allclose(convolve_spatially_varying(image, model),
                               expected[c:c + ny, c:c + nx], atol=1e-10)


def test_fit_kernel_polynomial_recovers_coefficients():
    rng = np.random.default_rng(3)
    truth = PsfModel(coeffs=rng.normal(size=(3, 7, 7)), order=1, width=100, height=80)
    xs, ys = np.meshgrid([0, 40, 99], [0, 50, 79])
    kernels = [np.tensordot(np.array([1, *truth.scaled_uv(x, y)]), truth.coeffs, 1)
               for x, y in zip(xs.ravel(), ys.ravel())]
    fit = fit_kernel_polynomial(kernels, xs.ravel(), ys.ravel(), order=1, width=100,
                                height=80)
    np.testing.assert_allclose(fit.coeffs, truth.coeffs, atol=1e-12)


def linear_fwhm_psf(width, height, lo, hi, order=1):
    """PSF model whose FWHM goes from lo (x=0) to hi (x=width-1) * MODEL_FWHM."""
    xs, ys = np.meshgrid(np.linspace(0, width - 1, 3), np.linspace(0, height - 1, 3))
    xs, ys = xs.ravel(), ys.ravel()
    kernels = [visit_psf(MODEL_FWHM * (lo + (hi - lo) * x / (width - 1))) for x in xs]
    return fit_kernel_polynomial(kernels, xs, ys, order=order, width=width, height=height)


CORNERS_AND_CENTRE = [(40, 40), (983, 40), (40, 983), (983, 983), (512, 512)]


@pytest.mark.parametrize("lo, hi, order, max_resid", [
    (0.8, 0.9, 1, 0.01),    # realistic 12 % variation, order-1 kernel: measured 0.67 %
    (0.5, 1.0, 2, 0.04),    # 2x variation needs an order-2 kernel: measured 3.0 %
])
def test_spatially_varying_psf_matched_everywhere(lo, hi, order, max_resid):
    psf = linear_fwhm_psf(1024, 1024, lo, hi)
    exposure = exposure_with_stars(psf, CORNERS_AND_CENTRE)
    target = gaussian_kernel(MODEL_FWHM, K)
    kernel = matching_kernel_model(psf, target, order=order)
    matched = match_exposure(exposure, target, kernel_model=kernel)
    for x, y in CORNERS_AND_CENTRE:
        out = stamp(matched.image, x, y) / 1000.0
        # brief: FWHM within 2 % everywhere (measured <= 0.34 % / 1.2 %)
        assert moments_fwhm(out) == pytest.approx(MODEL_FWHM, rel=0.02), (x, y)
        assert np.abs(out - target).max() < max_resid * target.max(), (x, y)
        # kernel at the input pixel conserves flux; stamp truncation < 0.2 %
        assert out.sum() == pytest.approx(1.0, rel=0.005), (x, y)
    assert matched.psf.order == 0
    np.testing.assert_allclose(matched.psf.at(), target)


def test_variance_propagation_of_white_noise():
    rng = np.random.default_rng(4)
    sigma2 = 4.0
    noise = rng.normal(0.0, np.sqrt(sigma2), (600, 600))
    kernel = matching_kernel(visit_psf(3.0), gaussian_kernel(MODEL_FWHM, K))
    model = PsfModel.constant(kernel)
    out = convolve_spatially_varying(noise, model)[K:-K, K:-K]
    var = convolve_variance(np.full(noise.shape, sigma2), model)[K:-K, K:-K]
    expected = sigma2 * (kernel**2).sum()
    np.testing.assert_allclose(var, expected, rtol=1e-9)
    # the convolved noise is correlated over ~the kernel's width (~4 px), so the
    # ~290k pixels are ~290k/16 independent ones: 1-sigma ~1 %; allow 4 %
    assert out.var() == pytest.approx(expected, rel=0.04)


# ----------------------------------------------------------------------------
# masks
# ----------------------------------------------------------------------------

def test_or_window_with_fill():
    m = np.array([0, 1, 0, 0, 4, 0], dtype=MASK_DTYPE)
    np.testing.assert_array_equal(or_window(m, -1, 1, axis=0, fill=8),
                                  [9, 1, 1, 4, 4, 12])
    np.testing.assert_array_equal(or_window(m, 0, 1, axis=0), [1, 1, 0, 4, 4, 0])


def test_match_exposure_masks_and_nan():
    from diffim.kernel import HOLE_DEPTH

    psf = PsfModel.constant(visit_psf(3.0), width=120, height=100)
    target = gaussian_kernel(MODEL_FWHM, K)
    stars = [(60, 50), (95, 30), (48, 80)]
    exposure = exposure_with_stars(psf, stars)
    exposure.image[20, 30] = np.nan                   # NaN without a mask bit
    exposure.mask[70, 90] |= bit("BAD")               # on empty sky
    exposure.image[70, 90] = 5e4                      # garbage under BAD
    exposure.mask[30, 95] |= bit("BAD")               # at the centre of a star
    exposure.image[30, 95] = 0.0
    exposure.mask[80, 20] |= bit("NO_DATA")
    exposure.image[80, 20] = 1e30                     # garbage under NO_DATA
    exposure.image[80, 50] = np.nan                   # NaN 2 px from a star's centre
    exposure.image[:, 110:] = np.nan                  # no data along the right edge
    exposure.image[1, 60] = 1e4                       # a bright pixel in the border strip
    kernel = matching_kernel_model(psf, target)
    h = kernel_footprint_halfwidth(kernel)
    assert 2 <= h <= 6      # 1 % of sum|K| for a ~4 px FWHM kernel
    matched = match_exposure(exposure, target, kernel_model=kernel)
    nodata = (matched.mask & bit("NO_DATA")) != 0
    bad = (matched.mask & bit("BAD")) != 0
    # a BAD pixel is inpainted, not grown by the footprint: on empty sky its
    # estimate (0) is exact and only the pixel itself keeps the bit ...
    assert bad[60:81, 80:101].sum() == 1 and bad[70, 90]
    assert np.abs(matched.image[65:76, 85:96]).max() < 1e-4      # garbage (5e4) did not leak
    # ... on a star the estimate is off (the peak pixel lost 6 % of the flux):
    # the bit covers every pixel that error moved by more than 0.1 sigma
    clean = exposure_with_stars(psf, stars)
    clean.image[1, 60] = 1e4
    truth = match_exposure(clean, target, kernel_model=kernel)
    sigma = np.sqrt(truth.variance)
    moved = np.abs(np.nan_to_num(matched.image - truth.image)) > 0.1 * sigma
    moved[60:81, 80:101] = False                   # (the sky pixel, checked above)
    moved[:, 110 - h:] = False                     # (the no-data edge, below)
    assert moved.sum() > 5 and (bad | nodata)[moved].all()
    # NaN / NO_DATA pixels within HOLE_DEPTH of data are inpainted in the same way:
    # on empty sky only the pixel itself has no data, on a star as far as the error reaches
    assert nodata[15:26, 25:36].sum() == 1 and nodata[20, 30]
    assert nodata[75:86, 15:26].sum() == 1 and nodata[80, 20]
    assert nodata[75:86, 43:54].sum() > 5 and nodata[80, 50]
    # a wider no-data area is grown by the kernel footprint beyond its rim, and no
    # farther: the grown pixels hold data, which does not spread the bit as doubt
    deep = 110 + HOLE_DEPTH
    assert nodata[:, 110:].all() and nodata[:, deep - h:].all()
    assert not nodata[30:70, h:deep - h - 1].any()   # (rows without a hole)
    assert nodata[:h, 50:71].all() and not nodata[h:h + 6, 50:71].any()   # nor from the
    # image's border strip, where a bright pixel holds data, not doubt
    assert nodata[:h].all()
    # NaN exactly where NO_DATA; the garbage value did not leak
    np.testing.assert_array_equal(np.isnan(matched.image), nodata)
    assert np.nanmax(np.abs(matched.image)) < 1000.0
    # the star away from the masked pixels is intact
    assert stamp(matched.image, 60, 50).sum() == pytest.approx(1000.0, rel=0.005)


def test_nan_holes_and_the_inpainting_bound_of_a_block():
    """No-data pixels within HOLE_DEPTH of data are holes to inpaint; a block's
    interior takes its error bound from the nearest ring of good pixels."""
    from diffim.kernel import HOLE_DEPTH, inpaint_error, nan_holes

    nd = np.zeros((60, 60), bool)
    nd[:, :5] = True                     # along the border: a hole along its rim
    nd[10, 20] = True                    # one pixel
    nd[:, 50] = True                     # a column through the image
    nd[30:39, 30:39] = True              # a 9 x 9 block: its centre is 4 px from data
    holes = nan_holes(nd)
    assert holes[:, 2:5].all() and not holes[:, :2].any()
    assert holes[10, 20] and holes[:, 50].all()
    yy, xx = np.mgrid[:9, :9]
    depth = np.minimum.reduce([yy, xx, 8 - yy, 8 - xx]) + 1     # px to the nearest data
    np.testing.assert_array_equal(holes[30:39, 30:39], depth <= HOLE_DEPTH)
    image = np.zeros((60, 60))
    image[34, 39] = 100.0                # the good pixel right of the block's row 34
    err = inpaint_error(image, nd)
    assert err[34, 38] == pytest.approx(200.0)            # next to it (3 x 3)
    assert err[34, 37] == pytest.approx(200.0)            # 2 px away, no good 3 x 3 neighbour
    assert HOLE_DEPTH == 3 and err[34, 36] == pytest.approx(200.0)
    assert err[34, 35] == 0.0                             # 4 px: beyond HOLE_DEPTH
    assert err[34, 31] == 0.0 and err[~nd].max() == 0.0


def test_grow_mask_box():
    mask = np.zeros((9, 9), MASK_DTYPE)
    mask[4, 4] = bit("SAT")
    grown = grow_mask(mask, 2)
    assert ((grown & bit("SAT")) != 0).sum() == 25
    assert ((grown & bit("NO_DATA")) != 0).sum() == 81 - 25


def test_fourier_image_matches_convolve2d_for_several_kernels():
    from diffim.kernel import FourierImage, fft_convolve

    rng = np.random.default_rng(2)
    image = rng.normal(size=(61, 47))
    fim = FourierImage(image, 9)
    for size in (3, 9):
        kernel = rng.normal(size=(size, size))
        # float64 FFT round-off only
        np.testing.assert_allclose(fim.convolve(kernel), convolve2d(image, kernel, mode="same"),
                                   atol=1e-10)
    out32 = fft_convolve(image.astype(np.float32), np.ones((5, 5), np.float32))
    assert out32.dtype == np.float32
    # complex64 round-off: ~1e-6 relative to the largest partial sums (|sum| ~ 10)
    np.testing.assert_allclose(out32, convolve2d(image, np.ones((5, 5)), mode="same"), atol=1e-4)
    with pytest.raises(ValueError, match="at most 9"):
        fim.convolve(np.ones((11, 11)))


def test_inpaint_reproduces_smooth_field_and_keeps_good_pixels():
    # normalized convolution: exact for a constant, and for a plane where the
    # good neighbours are symmetric about the bad pixel
    yy, xx = np.mgrid[:60, :80].astype(float)
    plane = 100.0 + 0.5 * xx - 0.25 * yy
    bad = np.zeros(plane.shape, bool)
    bad[30, 10:70] = True          # a bad row
    bad[10:13, 40:42] = True       # a small blob
    image = plane.copy()
    image[bad] = 1e6               # garbage under the mask
    image[5, 5] = np.nan           # NaN counts as bad
    out = inpaint(image, bad)
    np.testing.assert_array_equal(out[~bad & np.isfinite(image)], plane[~bad & np.isfinite(image)])
    # a bad row has good pixels symmetric about it: the plane is exact there
    np.testing.assert_allclose(out[30, 15:65], plane[30, 15:65], rtol=0, atol=1e-6)
    # at the blob the good neighbours are lopsided: bias below one pixel's gradient
    np.testing.assert_allclose(out[bad], plane[bad], rtol=0, atol=0.5)
    assert out[5, 5] == pytest.approx(plane[5, 5], abs=0.5)
    # a constant is reproduced everywhere
    np.testing.assert_allclose(inpaint(np.where(bad, 1e6, 7.0), bad)[bad], 7.0, rtol=1e-6)
    # a pixel with no good neighbour at all becomes 0, not NaN
    hole = np.zeros(plane.shape, bool)
    hole[20:50, 20:50] = True
    assert inpaint(plane, hole)[35, 35] == 0.0


def test_spread_by_influence_scales_with_the_masked_value():
    """A bright masked pixel spreads its bit farther than a faint one, as far as
    value * |K| exceeds the threshold (analytic for a Gaussian envelope)."""
    sigma_k = 2.0
    env = gaussian_kernel(sigma_k * FWHM_PER_SIGMA, K)
    env = env / env.max()                      # peak 1: influence(r) = v exp(-r^2 / 2 s^2)
    mask = np.zeros((101, 101), MASK_DTYPE)
    mask[50, 50] = bit("SAT")
    noise = np.ones(mask.shape)
    radii = {}
    for value in (0.5, 10.0, 1000.0):
        values = np.zeros(mask.shape)
        values[50, 50] = value
        out = spread_by_influence(mask, values, noise, env, fraction=0.1)
        flagged = (out & bit("SAT")) != 0
        radii[value] = flagged[50, 50:].sum() - 1   # flagged pixels right of the centre
        # expected radius: v exp(-r^2 / 2 s^2) > 0.1  ->  r < s sqrt(2 ln(10 v))
        r_true = sigma_k * np.sqrt(2 * np.log(value / 0.1))
        assert radii[value] == min(int(np.floor(r_true)), K // 2), (value, radii[value])
        # no other plane is touched
        assert not (out & bit("BAD")).any()
    assert radii[0.5] < radii[10.0] < radii[1000.0]


def test_match_exposure_inpaints_cosmic_rays_before_convolving():
    """A cosmic ray under CR is not smeared into its neighbours: outside the
    grown CR mask the matched image equals the matched clean image."""
    psf = PsfModel.constant(visit_psf(3.0), width=120, height=100)
    target = gaussian_kernel(MODEL_FWHM, K)
    clean = exposure_with_stars(psf, [(60, 50)])
    hit = exposure_with_stars(psf, [(60, 50)])
    hit.image[30, 30] += 5e4
    hit.mask[30, 30] |= bit("CR")
    kernel = matching_kernel_model(psf, target)
    env = kernel_envelope(kernel)
    assert env.shape == (K, K) and env.max() > 0
    m_clean = match_exposure(clean, target, kernel_model=kernel)
    m_hit = match_exposure(hit, target, kernel_model=kernel)
    cr = (m_hit.mask & bit("CR")) != 0
    assert cr[30, 30] and not cr[50, 60]
    ok = ~cr & np.isfinite(m_clean.image)
    sigma = np.sqrt(m_hit.variance[ok])
    assert np.max(np.abs(m_hit.image[ok] - m_clean.image[ok]) / sigma) < 0.1
