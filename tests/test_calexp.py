"""diffim.calexp.validate_pixels: unusable images are refused with the file named."""

import numpy as np
import pytest

from diffim.calexp import validate_pixels
from diffim.errors import InputError


def test_no_data_mask_marks_nan_and_inf():
    img = np.arange(12, dtype=np.float32).reshape(3, 4)
    img[0, 1], img[2, 3] = np.nan, np.inf
    nodata = validate_pixels(img, "v.fits")
    assert nodata.sum() == 2 and nodata[0, 1] and nodata[2, 3]


@pytest.mark.parametrize("fill, other, message", [
    (np.nan, None, "every pixel is NaN"),
    (7.0, None, "same value (7)"),
    (7.0, np.inf, "same value (7)"),      # infinite pixels are no data, not signal
    (7.0, -np.inf, "same value (7)"),
])
def test_unusable_images_are_refused(fill, other, message):
    img = np.full((5, 6), fill, np.float32)
    if other is not None:
        img[2, 2] = other
    with pytest.raises(InputError, match=r"bad\.fits: .*" + message.replace("(", r"\(").replace(")", r"\)")):
        validate_pixels(img, "bad.fits")


def test_broad_seeing_widens_the_psf_model():
    """A FWHM of 14 px does not fit the default 41-px model (4 x FWHM = 56): the calexp
    stage widens the model instead of failing, and the fitted PSF has the true width."""
    from diffim.calexp import CalexpConfig, characterize
    from diffim.psf import gaussian_kernel

    rng = np.random.default_rng(5)
    n, fwhm, size = 1024, 14.0, 121
    image = np.full((n, n), 1000.0)
    h = size // 2
    for _ in range(120):
        x, y = rng.uniform(h + 5, n - h - 5, 2)
        ix, iy = int(round(x)), int(round(y))
        stamp = gaussian_kernel(fwhm, size, dx=x - ix, dy=y - iy)
        image[iy - h:iy + h + 1, ix - h:ix + h + 1] += rng.uniform(2e4, 5e5) * stamp
    image = rng.poisson(image).astype(np.float32)
    ch = characterize(image, config=CalexpConfig(kernel_size=41), read_noise=5.0, path="broad")
    k = ch.psf_fit.psf.kernel_size
    assert k >= 57 and k % 2 == 1                      # holds 4 x FWHM
    # the sampled Gaussian's moments FWHM is the input's; 3 % allows for noise and blends
    assert ch.psf_fit.fwhm_px == pytest.approx(fwhm, rel=0.03)
    assert ch.psf_fit.n_stars >= 8


def test_memory_options_change_nothing_but_memory():
    """``overwrite`` lets characterize reuse the input plane for the sky-subtracted image
    and ``keep_background=False`` drops the sky: every result is bit-identical."""
    from diffim.calexp import CalexpConfig, characterize
    from diffim.psf import gaussian_kernel

    rng = np.random.default_rng(8)
    n = 512
    image = np.full((n, n), 800.0) + np.linspace(0, 50, n)[None]  # a sky gradient
    for _ in range(150):
        x, y = rng.uniform(20, n - 20, 2)
        ix, iy = int(round(x)), int(round(y))
        image[iy - 12:iy + 13, ix - 12:ix + 13] += (rng.uniform(3e3, 3e5)
                                                    * gaussian_kernel(3.5, 25, dx=x - ix,
                                                                      dy=y - iy))
    image = rng.poisson(image).astype(np.float32)
    cfg = CalexpConfig(kernel_size=None)
    plain = characterize(image.copy(), config=cfg, read_noise=5.0)
    mine = image.copy()
    lean = characterize(mine, config=cfg, read_noise=5.0, overwrite=True, keep_background=False)
    assert lean.image is mine  # the input plane now holds the sky-subtracted image
    assert lean.background is None and plain.background.shape == image.shape
    for plane in ("image", "variance", "mask"):
        np.testing.assert_array_equal(getattr(lean, plane), getattr(plain, plane))
    assert lean.sources.equals(plain.sources)
    np.testing.assert_array_equal(lean.psf_fit.psf.at(256, 256), plain.psf_fit.psf.at(256, 256))
    # without `overwrite` a clean float32 input is only read
    untouched = image.copy()
    characterize(untouched, config=cfg, read_noise=5.0)
    np.testing.assert_array_equal(untouched, image)
