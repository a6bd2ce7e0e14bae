"""Shared fixtures: run the real Snakemake workflow on tiny simulated data."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
SNAKEMAKE = shutil.which("snakemake", path=os.path.dirname(sys.executable)) or "snakemake"

#: A dataset small enough for a test run of the whole chain in about a minute.
TINY_SIMULATION = {
    "seed": 7, "n_visits": 5, "bands": ["r"], "shape": [512, 512], "n_stars": 500,
    "n_galaxies": 80, "n_variable_stars": 3, "n_transients": 4, "n_saturated": 1,
}


def run_snakemake(workdir, *args, config: dict | None = None, check=True, timeout=900):
    """Run the real ``snakemake`` CLI on the repo's Snakefile in ``workdir``."""
    cmd = [SNAKEMAKE, "--snakefile", str(ROOT / "Snakefile"), "--cores", "2", *args]
    if config is not None:
        cfg = Path(workdir) / "test_config.yaml"
        cfg.write_text(yaml.safe_dump(config))
        cmd += ["--configfile", str(cfg)]
    proc = subprocess.run(cmd, cwd=workdir, capture_output=True, text=True, timeout=timeout,
                          stdin=subprocess.DEVNULL)
    if check and proc.returncode != 0:
        raise AssertionError(f"snakemake failed ({proc.returncode}):\n{proc.stdout[-4000:]}\n"
                             f"{proc.stderr[-8000:]}")
    return proc


def tiny_config(outdir="results", **overrides) -> dict:
    # warps kept: with temporary warps, redoing one visit's diff (leave-one-out needs
    # its own warps) regenerates its warps in every patch and so redoes those coadds
    config = {"outdir": outdir, "simulate": dict(TINY_SIMULATION),
              "skymap": {"patch_inner": 300, "patch_border": 20},
              "coadd": {"keep_warps": True}}
    for key, value in overrides.items():
        if isinstance(value, dict) and isinstance(config.get(key), dict):
            config[key] = {**config[key], **value}
        else:
            config[key] = value
    return config


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory):
    """The whole workflow run once on the tiny simulated dataset."""
    workdir = tmp_path_factory.mktemp("tiny_run")
    config = tiny_config()
    proc = run_snakemake(workdir, config=config)
    return workdir, config, proc
