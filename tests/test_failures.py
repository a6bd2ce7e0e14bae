"""Bad input never stops the workflow: each bad file gets a visit_status row with
a reason a person understands, and every good visit is processed."""


import numpy as np
import pandas as pd
import pytest
from astropy.io import fits

from conftest import TINY_SIMULATION, run_snakemake

from diffim.simulate import simulate_dataset

pytestmark = pytest.mark.slow


def _copy_with(src, dst, *, data=None, drop=(), update=None):
    with fits.open(src) as hdul:
        header = hdul[0].header.copy()
        image = hdul[0].data.copy() if data is None else data
    for key in drop:
        header.remove(key, ignore_missing=True, remove_all=True)
    for key, value in (update or {}).items():
        header[key] = value
    fits.PrimaryHDU(image, header=header).writeto(dst)


@pytest.fixture(scope="module")
def bad_input_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("bad_input")
    sim = simulate_dataset(root / "sim", {**TINY_SIMULATION, "n_visits": 4})
    images = root / "sim" / "images"
    good = sorted(images.glob("*.fits"))
    src = good[0]
    with fits.open(src) as hdul:
        shape = hdul[0].data.shape
    bad = {
        "eimage_v0000101_truncated.fits": None,
        "eimage_v0000102_empty.fits": None,
        "eimage_v0000103_notfits.fits": None,
    }
    (images / "eimage_v0000101_truncated.fits").write_bytes(src.read_bytes()[:20000])
    (images / "eimage_v0000102_empty.fits").write_bytes(b"")
    (images / "eimage_v0000103_notfits.fits").write_text("this is not a FITS file\n")
    wcs_keys = [k for k in fits.getheader(src) if k.startswith(("CTYPE", "CRVAL", "CRPIX", "CD", "CUNIT", "PC", "CDELT"))]
    _copy_with(src, images / "eimage_v0000104_nowcs.fits", drop=wcs_keys, update={"VISIT": 104})
    _copy_with(src, images / "eimage_v0000105_nomjd.fits", drop=["MJD-OBS"], update={"VISIT": 105})
    _copy_with(src, images / "eimage_v0000111_noexptime.fits", drop=["EXPTIME"], update={"VISIT": 111})
    _copy_with(src, images / "eimage_v0000112_nofilter.fits", drop=["FILTER"], update={"VISIT": 112})
    # pixels of another field (other stars), under this field's header WCS
    other = simulate_dataset(root / "other", {**TINY_SIMULATION, "n_visits": 1, "seed": 99,
                                              "ra": 150.0, "dec": 2.0})
    with fits.open(other["images"][0]) as hdul:
        _copy_with(src, images / "eimage_v0000113_otherfield.fits", data=hdul[0].data.copy(),
                   update={"VISIT": 113})
    _copy_with(src, images / "eimage_v0000106_nan.fits", data=np.full(shape, np.nan, np.float32),
               update={"VISIT": 106})
    _copy_with(src, images / "eimage_v0000107_zero.fits", data=np.zeros(shape, np.float32),
               update={"VISIT": 107})
    hdr = fits.getheader(src)
    _copy_with(src, images / "eimage_v0000108_faroff.fits",
               update={"VISIT": 108, "CRVAL1": hdr["CRVAL1"] + 1.0})
    rng = np.random.default_rng(1)
    cloudy = rng.normal(1000.0, 32.0, shape).astype(np.float32)  # sky only: no stars at all
    _copy_with(src, images / "eimage_v0000109_cloudy.fits", data=cloudy, update={"VISIT": 109})
    (images / "odd name; $(touch INJECTED) 'q'.fits").write_bytes(src.read_bytes())
    with fits.open(images / "odd name; $(touch INJECTED) 'q'.fits", mode="update") as hdul:
        hdul[0].header["VISIT"] = 110
    config = {"outdir": "out put", "images": str(images / "*.fits"), "refcat": str(sim["refcat"]),
              "skymap": {"patch_inner": 300, "patch_border": 20}}
    proc = run_snakemake(root, config=config)
    status = pd.read_parquet(root / "out put" / "visit_status.parquet")
    return root, status, proc, len(good)


@pytest.mark.parametrize("name, words", [
    ("truncated", "FITS"), ("empty", "empty"), ("notfits", "FITS"), ("nowcs", "WCS"),
    ("nomjd", "MJD-OBS"), ("nan", "NaN"), ("zero", "same value"),
    ("faroff", "reference stars"), ("cloudy", "sources"), ("noexptime", "EXPTIME"),
    ("nofilter", "FILTER"), ("otherfield", "match"),
])
def test_each_bad_file_has_a_failed_row_with_a_reason(bad_input_run, name, words):
    _, status, _, _ = bad_input_run
    row = status[status["file"].str.contains(f"_{name}.fits", regex=False)]
    assert len(row) == 1
    assert row["status"].iloc[0] == "failed"
    assert words.lower() in row["reason"].iloc[0].lower(), row["reason"].iloc[0]


def test_good_visits_are_processed(bad_input_run):
    root, status, _, n_good = bad_input_run
    ok = status[status["status"] == "ok"]
    assert len(ok) == n_good + 1  # + the file with the hostile name
    assert (status.loc[status["status"] == "ok", "reason"] == "").all()
    dia = pd.read_parquet(root / "out put" / "dia_sources.parquet")
    assert set(dia["visit"]) <= set(ok["visit"])


def test_file_names_are_data_not_shell(bad_input_run):
    root, status, _, _ = bad_input_run
    assert not list(root.rglob("INJECTED"))
    row = status[status["visit"] == 110]
    assert row["status"].iloc[0] == "ok"


def test_a_dataset_where_no_file_calibrates_still_gets_its_tables(tmp_path):
    """Every file fails (sky only, no stars; all NaN): no sky map, coadd or difference can
    be made, but the workflow ends normally with the contract's tables, every file a
    ``failed`` row with its reason and an empty DIASource table with its schema.  (Before,
    the sky map rule stopped the workflow and no table was written.)"""
    sim = simulate_dataset(tmp_path / "sim", {**TINY_SIMULATION, "n_visits": 1})
    src = sim["images"][0]
    with fits.open(src) as hdul:
        shape = hdul[0].data.shape
    images = tmp_path / "bad"
    images.mkdir()
    rng = np.random.default_rng(2)
    for visit in (201, 202):
        _copy_with(src, images / f"eimage_v{visit}_cloudy.fits", update={"VISIT": visit},
                   data=rng.normal(1000.0, 32.0, shape).astype(np.float32))
    _copy_with(src, images / "eimage_v203_nan.fits", update={"VISIT": 203},
               data=np.full(shape, np.nan, np.float32))
    config = {"outdir": "out", "images": str(images / "*.fits"), "refcat": str(sim["refcat"])}
    run_snakemake(tmp_path, config=config)
    out = tmp_path / "out"
    status = pd.read_parquet(out / "visit_status.parquet")
    assert sorted(status["visit"]) == [201, 202, 203]
    assert (status["status"] == "failed").all() and status["reason"].str.len().gt(0).all()
    dia = pd.read_parquet(out / "dia_sources.parquet")
    assert len(dia) == 0 and {"diaSourceId", "psfFlux", "isDipole"} <= set(dia.columns)
    assert len(pd.read_parquet(out / "coadd_inputs.parquet")) == 0
    assert "no exposure was calibrated" in (out / "logs" / "skymap.log").read_text()
