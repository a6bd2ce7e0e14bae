"""End to end: the real Snakefile on a tiny simulated dataset, and its contract."""

import json
import shutil

import numpy as np
import pandas as pd
import pytest
from astropy.io import fits

from conftest import ROOT, run_snakemake, tiny_config

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


def test_report_has_the_per_visit_table(tiny_run):
    workdir, config, _ = tiny_run
    run_snakemake(workdir, "--report", "report.html", config=config)
    html = (workdir / "report.html").read_text(errors="replace")
    assert "visit-table" in html  # the per-visit table is embedded
    out = workdir / config["outdir"]
    quality = pd.read_parquet(out / "visit_quality.parquet")
    assert {"fwhm_arcsec", "zeropoint", "astrometry_rms_arcsec", "in_coadd", "noise_ratio",
            "n_dia_sources", "status"} <= set(quality.columns)
    assert len(quality) == config["simulate"]["n_visits"]


def test_light_curves_and_scores(tiny_run):
    workdir, config, _ = tiny_run
    out = workdir / config["outdir"]
    objects = pd.read_parquet(out / "dia_objects.parquet")
    forced = pd.read_parquet(out / "dia_forced_sources.parquet")
    assert forced["diaObjectId"].isin(objects["diaObjectId"]).all()
    # full light curves: every object is measured on (nearly) every visit that covers it
    assert len(forced) >= len(objects)
    scores = json.loads((out / "evaluation" / "scores.json").read_text())
    assert 0.0 <= scores["overall"]["completeness"]["at_snr_ge"]["10"] <= 1.0
    regions = sorted((out / "diff").glob("*.reg"))
    assert len(regions) == config["simulate"]["n_visits"]
    assert regions[0].read_text().startswith("# Region file format: DS9")


def test_wrong_type_is_refused(tmp_path):
    config = tiny_config(psf={"kernel_size": "big"})
    proc = run_snakemake(tmp_path, "-n", config=config, check=False)
    out = proc.stdout + proc.stderr
    assert proc.returncode != 0 and "kernel_size" in out and "big" in out


def test_missing_refcat_is_refused(tmp_path):
    (tmp_path / "img.fits").write_bytes(b"")
    config = {"outdir": "results", "images": "img.fits", "refcat": "nowhere.parquet"}
    proc = run_snakemake(tmp_path, "-n", config=config, check=False)
    out = proc.stdout + proc.stderr
    assert proc.returncode != 0 and "`refcat`" in out and "does not exist" in out
    assert not (tmp_path / "results").exists()


def _declared_mem_mb() -> dict:
    """rule name -> first-attempt mem_mb declared in workflow/rules/*.smk."""
    import re

    declared = {}
    for smk in (ROOT / "workflow" / "rules").glob("*.smk"):
        for block in re.split(r"\n(?=(?:checkpoint|rule) )", smk.read_text()):
            m = re.match(r"(?:checkpoint|rule) (\w+):", block)
            mem = re.search(r"mem_mb=mem\((\d+)\)", block)
            if m and mem:
                declared[m.group(1)] = int(mem.group(1))
    return declared


def test_declared_memory_exceeds_measured_peak(tiny_run):
    """Every benchmarked job's peak RSS is below its rule's declared mem_mb."""
    workdir, config, _ = tiny_run
    declared = _declared_mem_mb()
    bench = workdir / config["outdir"] / "benchmarks"
    files = list(bench.rglob("*.tsv"))
    assert files
    for f in files:
        rule = f.relative_to(bench).parts[0].removesuffix(".tsv")
        peak = pd.read_csv(f, sep="\t")["max_rss"].max()
        assert peak < declared[rule], f"{f}: {peak} MB > declared {declared[rule]} MB"


def test_full_coadd_template_keeps_the_detections(tiny_run, tmp_path):
    """``diff.leave_one_out: false`` on the same products: only the diffs and what
    follows them are redone; every visit in its own coadd reports its share ``a``
    of it, the DIASources are the leave-one-out ones (positions within 0.5 px,
    S/N within 5 %: the significance is unchanged by the scaling) with fluxes
    ``1 - a`` of theirs, and the difference noise stays as predicted."""
    workdir, _, _ = tiny_run
    work = tmp_path / "full"
    shutil.copytree(workdir, work, ignore=shutil.ignore_patterns("test_config.yaml"))
    run_snakemake(work, config=tiny_config(diff={"leave_one_out": False}))
    loo = pd.read_parquet(workdir / "results" / "dia_sources.parquet")
    full = pd.read_parquet(work / "results" / "dia_sources.parquet")
    shares = {}
    for path in sorted((work / "results" / "diff").glob("*.status.json")):
        new, old = json.loads(path.read_text()), json.loads(
            (workdir / "results" / "diff" / path.name).read_text())
        if old["status"] != "ok":
            continue
        assert new["leave_one_out_patches"] == 0
        assert (new["own_share_max"] > 0) == (old["leave_one_out_patches"] > 0)
        assert new["noise_ratio"] == pytest.approx(old["noise_ratio"], abs=0.05)
        shares[(new["visit"], new["detector"])] = new["own_share_max"]
    assert any(a > 0 for a in shares.values())
    assert len(full) == pytest.approx(len(loo), abs=max(2, 0.1 * len(loo)))
    pairs = loo.merge(full, on=["visit", "detector"], suffixes=("_loo", "_full"))
    pairs = pairs[np.hypot(pairs.x_loo - pairs.x_full, pairs.y_loo - pairs.y_full) < 0.5]
    assert len(pairs) >= 0.9 * len(loo)
    a_max = pairs.apply(lambda r: shares[(r.visit, r.detector)], axis=1)
    ratio = pairs.psfFlux_full / pairs.psfFlux_loo
    assert np.all(ratio <= 1 + 1e-3) and np.all(ratio >= 1 - a_max - 1e-3)
    assert np.median(np.abs(pairs.snr_full / pairs.snr_loo - 1)) < 0.05
