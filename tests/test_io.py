"""diffim.io: atomic writes, eimage reading and the exposure file format."""

import os

import numpy as np
import pytest
from astropy.io import fits
from astropy.wcs import WCS

from diffim import masks
from diffim.errors import InputError
from diffim.exposure import Exposure
from diffim.io import atomic_path, read_eimage, read_exposure, write_exposure, write_json
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
