"""diffim.io: atomic writes, eimage reading and the exposure file format."""

import os

import numpy as np
import pytest
from astropy.io import fits
from astropy.wcs import WCS

from diffim import masks
from diffim.errors import InputError
from diffim.exposure import Exposure
from diffim.io import (atomic_path, read_eimage, read_exposure, read_planes, read_warp,
                       write_exposure, write_json)
from diffim.psf import PsfModel


def test_atomic_writes_leave_no_temporary_and_normal_permissions(tmp_path):
    write_json(tmp_path / "a.json", {"x": 1})
    mode = (tmp_path / "a.json").stat().st_mode & 0o777
    assert mode == 0o666 & ~_current_umask()
    with pytest.raises(RuntimeError):
        with atomic_path(tmp_path / "b.json") as tmp:
            tmp.write_text("half")
            raise RuntimeError("killed mid-write")
    assert sorted(os.listdir(tmp_path)) == ["a.json"]  # nothing half-written, no leftovers


def _current_umask():
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _wcs():
    w = WCS(naxis=2)
    w.wcs.ctype = ["RA---TAN", "DEC--TAN"]
    w.wcs.crval = [53.0, -27.4]
    w.wcs.crpix = [10.0, 12.0]
    w.wcs.cd = [[-5.5e-5, 0], [0, 5.5e-5]]
    return w


def test_exposure_round_trip(tmp_path):
    rng = np.random.default_rng(0)
    exp = Exposure(image=rng.normal(size=(20, 30)), variance=np.ones((20, 30)),
                   mask=np.full((20, 30), masks.bit("CR")), wcs=_wcs(),
                   psf=PsfModel.gaussian(3.0, 11, width=30, height=20),
                   meta={"VISIT": 7, "BAND": "r", "BUNIT": "nJy"})
    write_exposure(tmp_path / "e.fits", exp)
    back = read_exposure(tmp_path / "e.fits")
    np.testing.assert_array_equal(back.image, exp.image)
    np.testing.assert_array_equal(back.mask, exp.mask)
    np.testing.assert_allclose(back.psf.at(), exp.psf.at())
    assert back.meta["VISIT"] == 7 and back.meta["BUNIT"] == "nJy"
    np.testing.assert_allclose(back.wcs.pixel_to_world_values(3, 4), exp.wcs.pixel_to_world_values(3, 4))
    with fits.open(tmp_path / "e.fits") as hdul:
        assert hdul["MASK"].header["MSKBIT3"] == "CR" and hdul["IMAGE"].header["BUNIT"] == "nJy"


def test_eimage_in_adu_is_converted_and_extension_is_found(tmp_path):
    data = np.full((8, 9), 10.0, np.float32)
    header = fits.Header({"BUNIT": "ADU", "GAIN": 2.5})
    fits.HDUList([fits.PrimaryHDU(), fits.ImageHDU(data, header=header)]).writeto(tmp_path / "a.fits")
    image, _ = read_eimage(tmp_path / "a.fits")
    np.testing.assert_allclose(image, 25.0)  # electrons = ADU x GAIN


def test_unreadable_eimages_name_the_file(tmp_path):
    (tmp_path / "empty.fits").write_bytes(b"")
    (tmp_path / "text.fits").write_text("not fits")
    for name in ("empty.fits", "text.fits", "missing.fits"):
        with pytest.raises(InputError, match=name):
            read_eimage(tmp_path / name)


def test_a_box_read_equals_the_slice_of_the_whole(tmp_path):
    rng = np.random.default_rng(1)
    exp = Exposure(image=rng.normal(size=(40, 50)).astype(np.float32),
                   variance=rng.uniform(1, 2, (40, 50)).astype(np.float32),
                   mask=rng.integers(0, 8, (40, 50)).astype(masks.MASK_DTYPE), wcs=_wcs(),
                   psf=PsfModel.gaussian(3.0, 11, width=50, height=40), meta={"BUNIT": "nJy"})
    extra = fits.ImageHDU(rng.normal(size=(40, 50)).astype(np.float32), name="WEIGHTSUM")
    write_exposure(tmp_path / "e.fits", exp, extra_hdus=[extra])
    box = (slice(7, 31), slice(12, 45))
    part = read_exposure(tmp_path / "e.fits", box=box)
    whole = read_exposure(tmp_path / "e.fits")
    for name in ("image", "variance", "mask"):
        np.testing.assert_array_equal(getattr(part, name), getattr(whole, name)[box])
        assert getattr(part, name).flags.owndata  # a copy, not a view of the file's map
    # pixel (0, 0) of the part is pixel (12, 7) of the whole, on the sky too
    np.testing.assert_allclose(part.wcs.pixel_to_world_values(0, 0),
                               whole.wcs.pixel_to_world_values(12, 7), rtol=0, atol=1e-12)
    assert part.psf.width == 33 and part.psf.height == 24
    planes = read_planes(tmp_path / "e.fits", ("WEIGHTSUM", "CLIPCEN"), box=box)
    np.testing.assert_array_equal(planes["WEIGHTSUM"], extra.data[box])
    assert "CLIPCEN" not in planes


def test_a_warp_read_into_a_patch_box_keeps_its_offset(tmp_path):
    rng = np.random.default_rng(2)
    stored = Exposure(image=rng.normal(size=(10, 12)).astype(np.float32),
                      variance=np.ones((10, 12), np.float32),
                      mask=np.zeros((10, 12), masks.MASK_DTYPE), wcs=None, psf=None,
                      meta={"XOFFSET": 20, "YOFFSET": 5})
    write_exposure(tmp_path / "w.fits", stored)
    whole = read_warp(tmp_path / "w.fits", (30, 40))
    assert whole.shape == (30, 40)
    np.testing.assert_array_equal(whole.image[5:15, 20:32], stored.image)
    assert np.isnan(whole.image[:5]).all() and (whole.mask[:5] == masks.bit("NO_DATA")).all()
    for box in [(slice(0, 30), slice(0, 40)), (slice(8, 22), slice(25, 40)),
                (slice(0, 4), slice(0, 10))]:  # the last misses the stored box entirely
        part = read_warp(tmp_path / "w.fits", (30, 40), box=box)
        for name in ("image", "variance", "mask"):
            np.testing.assert_array_equal(getattr(part, name), getattr(whole, name)[box])
    with pytest.raises(InputError, match="nowarp.fits"):
        read_warp(tmp_path / "nowarp.fits", (30, 40))
