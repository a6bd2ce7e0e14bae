"""Header fuzzing: mutated eimage headers never crash the index or the calexp stage.

Any outcome is allowed except an unexpected exception: a file is either
indexed and calibrated, or refused with a :class:`DiffimError` whose message
names the file.
"""

import warnings

import pytest
from astropy.io import fits
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from diffim.calexp import CalexpConfig, process_exposure
from diffim.errors import DiffimError
from diffim.index import index_row
from diffim.io import header_meta, header_wcs, read_eimage, read_refcat
from diffim.simulate import simulate_dataset

KEYS = ["MJD-OBS", "EXPTIME", "FILTER", "VISIT", "DETECTOR", "SATURATE", "RDNOISE", "GAIN",
        "BUNIT", "CTYPE1", "CTYPE2", "CRVAL1", "CRVAL2", "CRPIX1", "CRPIX2", "CD1_1", "CD1_2",
        "CD2_1", "CD2_2", "NAXIS1"]
VALUES = st.one_of(st.none(), st.integers(-10**6, 10**6), st.floats(allow_nan=True, allow_infinity=True),
                   st.text(max_size=12), st.sampled_from(["ADU", "RA---TAN", "DEC--TAN", "r", " R ",
                                                           "", "nan", "RA---XYZ"]))
MUTATION = st.tuples(st.sampled_from(KEYS), st.sampled_from(["delete", "set"]), VALUES)


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    root = tmp_path_factory.mktemp("fuzz")
    paths = simulate_dataset(root, {"seed": 3, "n_visits": 1, "bands": ["r"], "shape": [384, 384],
                                    "n_stars": 400, "n_galaxies": 40, "n_variable_stars": 0,
                                    "n_transients": 0, "defects": False})
    return paths["images"][0], read_refcat(paths["refcat"], ["r"])


def _mutate(src, dst, mutations):
    with fits.open(src) as hdul:
        data, header = hdul[0].data, hdul[0].header.copy()
    for key, action, value in mutations:
        if action == "delete":
            header.remove(key, ignore_missing=True)
        else:
            try:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    header[key] = value if value is not None else ""
            except (ValueError, TypeError):
                continue  # astropy itself refuses this card: not a file anyone can write
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        fits.PrimaryHDU(data, header=header).writeto(dst, overwrite=True, output_verify="silentfix")


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(mutations=st.lists(MUTATION, min_size=1, max_size=4))
def test_mutated_headers_are_indexed_or_refused(dataset, tmp_path, mutations):
    src, refcat = dataset
    dst = tmp_path / "eimage_v0000001_fuzz.fits"
    _mutate(src, dst, mutations)
    row = index_row(dst)  # never raises
    assert row["status"] in ("ok", "failed")
    if row["status"] == "failed":
        assert str(dst) in row["reason"]
        return
    try:
        image, header = read_eimage(dst)
        meta = header_meta(header, dst)
        wcs = header_wcs(header, dst)
        process_exposure(image, meta, wcs, refcat, config=CalexpConfig(kernel_size=31), path=str(dst))
    except DiffimError as exc:
        assert str(exc)
