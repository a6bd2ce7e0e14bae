# Shared definitions: config validation, paths and the cached readers of the
# two checkpoints (exposure index and sky map).
import functools
import os

import pandas as pd
from snakemake.utils import validate

from diffim.config import check_config
from diffim.index import expand_globs


validate(config, "../../config/schema.yaml")
check_config(config)

OUT = config["outdir"].rstrip("/")
SIMULATE = config["images"] is None
REFCAT = os.path.join(OUT, "sim", "refcat.parquet") if SIMULATE else config["refcat"]
LOGS = os.path.join(OUT, "logs")
BENCH = os.path.join(OUT, "benchmarks")


wildcard_constraints:
    visit=r"\d+",
    detector=r"\d+",
    band=r"[a-z0-9_\-]+",
    patch=r"\d+,\d+",


def mem(base_mb):
    """mem_mb resource growing with the attempt number (SLURM retries)."""
    return lambda wildcards, attempt: int(base_mb * attempt)


def path(*parts):
    return os.path.join(OUT, *parts)


@functools.lru_cache(maxsize=8)
def _read_parquet_cached(file, mtime_ns):
    return pd.read_parquet(file)


def read_cached(file):
    """Read a checkpoint table once per DAG evaluation (cached by mtime)."""
    return _read_parquet_cached(file, os.stat(file).st_mtime_ns)


def exposures():
    """The ok rows of the exposure index (a checkpoint)."""
    table = read_cached(checkpoints.exposure_index.get().output.index)
    return table[table["status"] == "ok"]


@functools.lru_cache(maxsize=4)
def _file_lookup(file, mtime_ns):
    table = read_cached(file)
    ok = table[table["status"] == "ok"]
    return dict(zip(zip(ok["visit"].tolist(), ok["detector"].tolist()), ok["file"].tolist()))


def exposure_file(wildcards):
    """The input file of one (visit, detector): a dict lookup, O(1) per job."""
    file = checkpoints.exposure_index.get().output.index
    lookup = _file_lookup(file, os.stat(file).st_mtime_ns)
    return lookup[(int(wildcards.visit), int(wildcards.detector))]


def calexp_qa_files(wildcards=None):
    return [path("calexp", f"v{v}-d{d}.qa.json")
            for v, d in zip(exposures()["visit"], exposures()["detector"])]


def overlaps():
    """Rows (visit, detector, band, patch, included, reason) of the sky map checkpoint."""
    return read_cached(checkpoints.skymap.get().output.overlaps)


@functools.lru_cache(maxsize=4)
def _overlap_groups(file, mtime_ns):
    """Row indices of the overlap table grouped by (visit, detector) and by (band, patch)."""
    table = read_cached(file)
    by_visit = {(int(v), int(d)): rows for (v, d), rows in
                table.groupby(["visit", "detector"]).indices.items()}
    by_patch = {(b, p): rows for (b, p), rows in table.groupby(["band", "patch"]).indices.items()}
    return by_visit, by_patch


def visit_overlaps(visit, detector):
    """Overlap rows of one (visit, detector), without scanning the table per job."""
    file = checkpoints.skymap.get().output.overlaps
    by_visit, _ = _overlap_groups(file, os.stat(file).st_mtime_ns)
    return read_cached(file).iloc[by_visit.get((int(visit), int(detector)), [])]


def patch_overlaps(band, patch):
    """Overlap rows of one (band, patch)."""
    file = checkpoints.skymap.get().output.overlaps
    _, by_patch = _overlap_groups(file, os.stat(file).st_mtime_ns)
    return read_cached(file).iloc[by_patch.get((band, patch), [])]


@functools.lru_cache(maxsize=4)
def _read_text_cached(file, mtime_ns):
    with open(file) as f:
        return f.read()


def skymap_json(wildcards=None):
    """The sky map as JSON text.

    Passed to rules as a *param*, not an input file: the sky map is rebuilt
    whenever a calexp changes, and an input file's new mtime would then redo
    every warp; as a param, a job reruns only if the sky map really changed.
    """
    file = checkpoints.skymap.get().output.skymap
    return _read_text_cached(file, os.stat(file).st_mtime_ns)


def band_model_fwhm(wildcards):
    """Model PSF FWHM (arcsec) of the band of a warp or coadd job."""
    return float(patch_overlaps(wildcards.band, wildcards.patch)["model_fwhm_arcsec"].iloc[0])


def final_products():
    """The targets of `rule all`: the contract's tables, light curves, the
    report's figures and, when the dataset has truth (simulated), the scores."""
    targets = [path("dia_sources.parquet"), path("visit_status.parquet"),
               path("coadd_inputs.parquet"), path("dia_objects.parquet"),
               path("dia_forced_sources.parquet"), path("visit_quality.parquet"),
               path("report", "coadds.png")]
    if SIMULATE:
        targets.append(path("evaluation", "scores.json"))
    return targets
