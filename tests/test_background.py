"""Tests of diffim.background on synthetic images with known sky and noise."""

import numpy as np
import pytest

from diffim.background import estimate_background, variance_plane
from diffim.psf import moffat_kernel

READ_NOISE = 5.0


def _sky(ny=768, nx=1024):
    y, x = np.mgrid[:ny, :nx]
    return 600.0 + 0.2 * x + 0.1 * y + 50 * np.sin(x / 300.0)   # smooth, e-


def _image_with_stars(seed=0, n_stars=150):
    rng = np.random.default_rng(seed)
    sky = _sky()
    stars = np.zeros_like(sky)
    k = 41
    for _ in range(n_stars):
        x, y = rng.integers(20, sky.shape[1] - 21), rng.integers(20, sky.shape[0] - 21)
        stars[y - 20:y + 21, x - 20:x + 21] += 10 ** rng.uniform(3, 5.5) * moffat_kernel(4.0, k)
    truth = sky + stars
    img = rng.poisson(truth) + rng.normal(0, READ_NOISE, sky.shape)
    return img.astype(np.float32), sky, stars


def test_background_recovers_smooth_sky():
    img, sky, stars = _image_with_stars()
    bkg, rms = estimate_background(img, None, box=64)
    sigma = np.sqrt(sky + READ_NOISE**2)
    err = (bkg - sky) / sigma
    # box-mode noise is ~0.03 sigma for 64x64 boxes; stars bias the mode up a
    # little: allow 0.1 sigma typical, 0.3 sigma worst (edges, bright stars)
    assert abs(np.median(err)) < 0.1
    assert np.percentile(np.abs(err), 99) < 0.3
    assert np.median(rms / sigma) == pytest.approx(1.0, abs=0.05)


def test_background_respects_mask_and_nans():
    img, sky, _ = _image_with_stars(n_stars=0, seed=1)
    img[300:420, 400:560] += 5000.0          # a huge masked artefact
    img[:10] = np.nan                        # no-data rows
    mask = np.zeros(img.shape, np.int32)
    mask[300:420, 400:560] = 1
    bkg, _ = estimate_background(img, mask, box=64)
    sigma = np.sqrt(sky + READ_NOISE**2)
    # masked pixels are interpolated over a ~3-box hole in a curved sky: within
    # 0.5 sigma (unmasked, the +5000 e- artefact would bias it by >> 10 sigma)
    assert np.abs((bkg - sky) / sigma)[280:440, 380:580].max() < 0.5
    assert np.isfinite(bkg).all()
    with pytest.raises(ValueError, match="every pixel"):
        estimate_background(np.full((64, 64), np.nan), None)


def test_variance_plane_sky_and_stars():
    img, sky, stars = _image_with_stars(seed=2)
    bkg, _ = estimate_background(img, None, box=64)
    var = variance_plane(img, read_noise=READ_NOISE, background=bkg)
    truth = sky + stars + READ_NOISE**2
    ratio = var / truth
    faint = stars < 1.0
    # sky pixels get the smooth background variance: unbiased to < 1 %
    assert np.median(ratio[faint]) == pytest.approx(1.0, abs=0.01)
    assert np.percentile(np.abs(ratio[faint] - 1), 99) < 0.05
    # bright star pixels get their own Poisson variance (noisy pixel values:
    # median within 2 %)
    bright = stars > 10 * np.sqrt(sky)
    assert bright.sum() > 500
    assert np.median(ratio[bright]) == pytest.approx(1.0, abs=0.02)
    # empirical check: the variance describes the actual scatter on the sky
    resid = (img - sky - stars)[faint] / np.sqrt(var[faint])
    assert np.std(resid) == pytest.approx(1.0, abs=0.02)


def test_variance_plane_gain_nan_and_validation():
    img = np.full((64, 64), 1000.0, np.float32)
    img[0, 0] = np.nan
    bkg = np.full(img.shape, 1000.0, np.float32)
    var = variance_plane(img, read_noise=4.0, gain=2.0, background=bkg)
    # ADU image with gain 2 e-/ADU: var = S/g + (rn/g)^2
    assert var[5, 5] == pytest.approx(1000 / 2 + (4 / 2) ** 2)
    assert np.isnan(var[0, 0])
    with pytest.raises(ValueError, match="read_noise"):
        variance_plane(img, read_noise=-1.0, background=bkg)
    with pytest.raises(ValueError, match="gain"):
        variance_plane(img, read_noise=1.0, gain=0.0, background=bkg)


def test_object_mask_removes_the_sky_bias_of_a_crowded_field():
    """Star wings bias 128-px mesh medians upward; leaving out the object mask's
    pixels removes most of that bias (measured: mean sky error 2.5 e- -> 0.1 e-,
    largest 6.4 e- -> 0.5 e-; a mesh median's own noise is ~0.3 e-)."""
    from diffim.background import object_mask, sep_background

    rng = np.random.default_rng(4)
    sky, shape = 1000.0, (512, 512)
    truth = np.full(shape, sky)
    truth[156:357, 156:357] += 3e7 * moffat_kernel(4.0, 201, beta=2.5)
    k = moffat_kernel(4.0, 21, beta=2.5)
    for x, y, f in zip(rng.integers(10, 502, 300), rng.integers(10, 502, 300),
                       10 ** rng.uniform(3, 5, 300)):
        truth[y - 10:y + 11, x - 10:x + 11] += f * k
    image = rng.poisson(truth).astype(np.float32)
    first = sep_background(image, None, box=128).back()
    objects = object_mask(image - first, truth.astype(np.float32), 4.0)
    assert objects[256, 256] and objects.mean() < 0.6
    second = sep_background(image, objects.view(np.uint8), box=128).back()
    assert np.mean(first - sky) > 1.5          # the bias to remove
    assert abs(np.mean(second - sky)) < 0.5    # mesh-median noise ~0.3 e-
    assert np.abs(second - sky).max() < 0.3 * np.abs(first - sky).max()


def test_object_mask_treats_non_finite_and_negative_values_as_empty():
    """NaN/inf pixels count as 0 and negative variances as 0: the mask equals the
    one of a cleaned copy, and a clean input is used as is (never modified)."""
    from diffim.background import object_mask

    rng = np.random.default_rng(8)
    image = rng.normal(0.0, 10.0, (256, 256)).astype(np.float32)
    image[100:104, 100:104] += 2000.0
    var = np.full(image.shape, 100.0, np.float32)
    dirty, dirty_var = image.copy(), var.copy()
    dirty[10:12, 30:40], dirty[200, 5] = np.nan, np.inf
    dirty_var[50:52, 60:70], dirty_var[70, 70] = -5.0, np.nan
    clean, clean_var = dirty.copy(), dirty_var.copy()
    clean[~np.isfinite(clean)] = 0.0
    clean_var[~np.isfinite(clean_var) | (clean_var < 0)] = 0.0
    expected = object_mask(clean, clean_var, 3.0, bin_factor=1)
    np.testing.assert_array_equal(object_mask(dirty, dirty_var, 3.0, bin_factor=1), expected)
    assert expected[102, 102] and expected.mean() < 0.1
    before = clean.copy()
    object_mask(clean, clean_var, 3.0, bin_factor=1)
    np.testing.assert_array_equal(clean, before)
