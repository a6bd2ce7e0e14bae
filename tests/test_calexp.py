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
