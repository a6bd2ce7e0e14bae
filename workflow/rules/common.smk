# Shared definitions: config validation, paths and the cached readers of the
# two checkpoints (exposure index and sky map).
import collections
import functools
import os

import pandas as pd
from snakemake.utils import validate

from diffim.config import check_config
from diffim.index import expand_globs
from diffim.malloc import ENVIRONMENT as MALLOC_ENVIRONMENT


validate(config, "../../config/schema.yaml")
check_config(config)

OUT = config["outdir"].rstrip("/")
SIMULATE = config["images"] is None
REFCAT = os.path.join(OUT, "sim", "refcat.parquet") if SIMULATE else config["refcat"]
LOGS = os.path.join(OUT, "logs")
BENCH = os.path.join(OUT, "benchmarks")

# glibc: keep freed memory inside each job process instead of unmapping it.
# The image stages allocate many short-lived 30-130 MB arrays, and touching
# fresh pages cost ~2 ms per MB on the 2-core virtual machine measured here
# (4k subtraction + detection: 6.1 s -> 4.9 s).  Jobs inherit this process's
# environment (locally and through sbatch); a user's own setting wins.  One
# malloc arena, so that the memory kept by one thread serves the others
# (diffim.malloc explains both).
for _name, _value in MALLOC_ENVIRONMENT.items():
    os.environ.setdefault(_name, _value)


wildcard_constraints:
    visit=r"\d+",
    detector=r"\d+",
    band=r"[a-z0-9_\-]+",
    patch=r"\d+x\d+",


def mem(base_mb):
    """mem_mb resource growing with the attempt number (SLURM retries)."""
    return lambda wildcards, attempt: int(base_mb * attempt)


def path(*parts):
    return os.path.join(OUT, *parts)


#: One row of the sky map checkpoint's overlap table, as plain Python values.
Overlap = collections.namedtuple("Overlap", "visit detector band patch included reason")


@functools.lru_cache(maxsize=4)
def _index_lookup(file, mtime_ns):
    """{(visit, detector): file} of the ok rows of the exposure index, in index order.

    Built once per index version (keyed by mtime): input functions run once per
    job, so they must not scan or filter a table (O(N) per job, O(N^2) in all).
    """
    table = pd.read_parquet(file, columns=["file", "visit", "detector", "status"])
    ok = table[table["status"] == "ok"]
    return dict(zip(zip(ok["visit"].tolist(), ok["detector"].tolist()), ok["file"].tolist()))


def exposure_lookup():
    """{(visit, detector): file} of the usable exposures (the exposure index checkpoint)."""
    file = checkpoints.exposure_index.get().output.index
    return _index_lookup(file, os.stat(file).st_mtime_ns)


def exposure_file(wildcards):
    return exposure_lookup()[(int(wildcards.visit), int(wildcards.detector))]


def calexp_qa_files(wildcards=None):
    return [path("calexp", f"v{v}-d{d}.qa.json") for v, d in exposure_lookup()]


@functools.lru_cache(maxsize=4)
def _overlap_lookup(file, mtime_ns):
    """Overlap rows grouped by (visit, detector) and by (band, patch); model FWHM per band."""
    table = pd.read_parquet(file)
    by_visit, by_patch = {}, {}
    for row in zip(*(table[c].tolist() for c in Overlap._fields)):
        row = Overlap(int(row[0]), int(row[1]), row[2], row[3], bool(row[4]), row[5])
        by_visit.setdefault((row.visit, row.detector), []).append(row)
        by_patch.setdefault((row.band, row.patch), []).append(row)
    fwhm = dict(zip(table["band"].tolist(), table["model_fwhm_arcsec"].astype(float).tolist()))
    return by_visit, by_patch, fwhm


def overlap_lookup():
    """(by_visit, by_patch, model_fwhm_by_band) of the sky map checkpoint."""
    file = checkpoints.skymap.get().output.overlaps
    return _overlap_lookup(file, os.stat(file).st_mtime_ns)


def visit_overlaps(visit, detector):
    """Overlap rows (list of Overlap) of one (visit, detector)."""
    return overlap_lookup()[0].get((int(visit), int(detector)), [])


def patch_overlaps(band, patch):
    """Overlap rows (list of Overlap) of one (band, patch)."""
    return overlap_lookup()[1].get((band, patch), [])


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
    return overlap_lookup()[2][wildcards.band]


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
