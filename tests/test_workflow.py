"""End to end: the real Snakefile on a tiny simulated dataset, and its contract."""

import json

import numpy as np
import pandas as pd
import pytest
from astropy.io import fits

from conftest import run_snakemake, tiny_config

from diffim.tables import COADD_INPUTS_SCHEMA, DIA_SOURCE_SCHEMA, VISIT_STATUS_SCHEMA

pytestmark = pytest.mark.slow


def test_products_follow_the_contract(tiny_run):
    workdir, config, _ = tiny_run
    out = workdir / config["outdir"]
    dia = pd.read_parquet(out / "dia_sources.parquet")
    assert list(dia.columns[:len(DIA_SOURCE_SCHEMA)]) == DIA_SOURCE_SCHEMA.names
    assert dia["diaSourceId"].is_unique
    assert dia["diaSourceId"].dtype == np.int64 and dia["detector"].dtype == np.int32
    status = pd.read_parquet(out / "visit_status.parquet")
    assert list(status.columns[:6]) == VISIT_STATUS_SCHEMA.names
    assert len(status) == config["simulate"]["n_visits"]  # one row per input file
    assert (status["status"] == "ok").all(), status[["file", "reason"]]
    inputs = pd.read_parquet(out / "coadd_inputs.parquet")
    assert list(inputs.columns) == COADD_INPUTS_SCHEMA.names
    assert inputs["patch"].nunique() >= 2  # the tiny sky map has several patches
    assert np.all(inputs.loc[~inputs["included"], "weight"] == 0)
    assert (inputs.loc[~inputs["included"], "reason"] != "").all()


def test_exposures_carry_units_wcs_and_psf(tiny_run):
    workdir, config, _ = tiny_run
    out = workdir / config["outdir"]
    calexp = sorted((out / "calexp").glob("*.fits"))[0]
    with fits.open(calexp) as hdul:
        assert hdul["IMAGE"].header["BUNIT"] == "electron"
        assert hdul["IMAGE"].header["CTYPE1"].startswith("RA---TAN")
        assert hdul["PSF"].data.shape[1] == hdul["PSF"].data.shape[2] == 41
        assert hdul["MASK"].header["MSKBIT3"] == "CR"
    diff = sorted((out / "diff").glob("*.fits"))[0]
    with fits.open(diff) as hdul:
        assert hdul["IMAGE"].header["BUNIT"] == "nJy"
        assert "PSF" in hdul


def test_second_run_does_nothing(tiny_run):
    workdir, config, _ = tiny_run
    proc = run_snakemake(workdir, "-n", config=config)
    assert "Nothing to be done" in proc.stdout + proc.stderr


def test_bad_seeing_config_is_refused(tmp_path):
    config = tiny_config(coadd={"model_fwhm": 1.0, "max_fwhm": 1.2})
    proc = run_snakemake(tmp_path, "-n", config=config, check=False)
    assert proc.returncode != 0
    out = proc.stdout + proc.stderr
    assert "coadd.max_fwhm" in out and "deconvolved" in out
    assert not (tmp_path / "results").exists()  # refused before any job ran


def test_unknown_key_is_refused(tmp_path):
    config = tiny_config(diff={"modee": "auto"})
    proc = run_snakemake(tmp_path, "-n", config=config, check=False)
    assert proc.returncode != 0 and "modee" in proc.stdout + proc.stderr
