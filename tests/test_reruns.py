"""Reruns: kill and resume, bit-identical products, and nothing redone needlessly.

Each test runs the real workflow on the tiny simulated dataset.
"""

import os
import signal
import subprocess
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from astropy.io import fits

from conftest import ROOT, SNAKEMAKE, run_snakemake

pytestmark = pytest.mark.slow

#: Header cards that may differ between two runs of the same inputs: none of
#: the pixel data may.  (We write no dates; this list is empty on purpose and
#: documents the promise.)
VOLATILE_CARDS: tuple[str, ...] = ()
#: Table columns that may differ: the exposure index records each input file's
#: modification time (its cache key), which differs between two copies.
VOLATILE_COLUMNS: tuple[str, ...] = ("mtime_ns",)


def _products(outdir: Path):
    """Products to compare: everything but the inputs (sim/) and the temporary
    warps (a killed run may leave some behind; Snakemake does not remove a
    temp file made by an earlier, interrupted invocation)."""
    fits_files = sorted(p.relative_to(outdir) for p in outdir.rglob("*.fits")
                        if "sim" not in p.parts and "warp" not in p.parts)
    tables = sorted(p.relative_to(outdir) for p in outdir.rglob("*.parquet")
                    if "sim" not in p.parts and not p.name.startswith("."))
    return fits_files, tables


def _assert_same_fits(a: Path, b: Path):
    with fits.open(a) as ha, fits.open(b) as hb:
        assert [h.name for h in ha] == [h.name for h in hb], a
        for x, y in zip(ha, hb):
            if x.data is None:
                assert y.data is None
            else:
                np.testing.assert_array_equal(x.data, y.data, err_msg=str(a))
            keys = [k for k in x.header if k not in VOLATILE_CARDS]
            assert [(k, x.header[k]) for k in keys] == [(k, y.header.get(k)) for k in keys], a


def _assert_same_products(out_a: Path, out_b: Path):
    fits_a, tables_a = _products(out_a)
    fits_b, tables_b = _products(out_b)
    assert fits_a == fits_b and tables_a == tables_b
    for rel in fits_a:
        _assert_same_fits(out_a / rel, out_b / rel)
    for rel in tables_a:
        a, b = (pd.read_parquet(o / rel) for o in (out_a, out_b))
        drop = [c for c in VOLATILE_COLUMNS if c in a.columns]
        pd.testing.assert_frame_equal(a.drop(columns=drop), b.drop(columns=drop))


#: Kill points: a file whose appearance means the run is inside that stage.
KILL_POINTS = {"calexp": "calexp/*.qa.json", "warp": "warp/*/*/*.fits",
               "coadd": "coadd/*/*/coadd.fits", "diff": "diff/*.status.json"}


@pytest.mark.parametrize("stage", ["calexp", "warp", "coadd", "diff"])
def test_killed_run_resumes_to_identical_products(tiny_run, tmp_path, stage):
    """SIGKILL the whole run (Snakemake and its jobs) inside a stage, resume with
    the README's commands, and compare with the uninterrupted run."""
    import yaml

    workdir, config, _ = tiny_run
    cfg = tmp_path / "test_config.yaml"
    cfg.write_text(yaml.safe_dump(config))
    cmd = [SNAKEMAKE, "--snakefile", str(ROOT / "Snakefile"), "--cores", "2", "--configfile", str(cfg)]
    log = (tmp_path / "killed.log").open("w")
    proc = subprocess.Popen(cmd, cwd=tmp_path, stdout=log, stderr=subprocess.STDOUT,
                            stdin=subprocess.DEVNULL, start_new_session=True)
    out = tmp_path / config["outdir"]
    deadline = time.monotonic() + 600
    while not list(out.glob(KILL_POINTS[stage])):
        assert proc.poll() is None, (tmp_path / "killed.log").read_text()[-3000:]
        assert time.monotonic() < deadline, f"the run never reached the {stage} stage"
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    log.close()
    # no half-written file under a product's final name: every FITS opens whole
    for path in out.rglob("*.fits"):
        with fits.open(path) as hdul:
            hdul.verify("exception")
    run_snakemake(tmp_path, "--unlock", config=config)
    run_snakemake(tmp_path, "--rerun-incomplete", config=config)
    _assert_same_products(workdir / config["outdir"], out)


def test_touching_one_input_redoes_only_what_depends_on_it(tiny_run):
    workdir, config, _ = tiny_run
    out = workdir / config["outdir"]
    images = sorted((out / "sim" / "images").glob("*.fits"))
    before = {p: p.stat().st_mtime_ns for p in out.rglob("*") if p.is_file()}
    time.sleep(0.05)
    images[0].touch()
    run_snakemake(workdir, config=config)
    changed = {p.relative_to(out).as_posix() for p, t in before.items()
               if p.exists() and p.stat().st_mtime_ns != t}
    visit = int(images[0].name.split("_v")[1][:7])
    calexps = {c for c in changed if c.startswith("calexp/") and c.endswith(".fits")}
    assert calexps == {f"calexp/v{visit}-d0.fits"}
    # the other visits' calexps and sources are untouched
    assert not any(c.startswith("calexp/") and f"v{visit}-" not in c for c in changed)
    # redone: the coadds whose inputs include one of this visit's warps (every patch
    # it overlaps and is selected for, even where its warp turned out empty)
    overlaps = pd.read_parquet(out / "skymap" / "overlaps.parquet")
    entered = overlaps[(overlaps["visit"] == visit) & overlaps["included"]][["band", "patch"]]
    redone_coadds = {c for c in changed if c.startswith("coadd/") and c.endswith("coadd.fits")}
    assert redone_coadds == {f"coadd/{b}/{p}/coadd.fits" for b, p in zip(entered["band"], entered["patch"])}
