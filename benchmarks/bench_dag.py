"""Benchmark: DAG build (``snakemake -n``) for 100, 1,000 and 10,000 visits.

    python benchmarks/bench_dag.py [--visits 100 1000 10000] [--variants skymap full]
        [--profile N [--profile-variant full]] [--snakefile PATH]
        [--snakemake-args '...'] [--keep DIR] [--json FILE]

No pixels are made.  For each size a temporary working directory gets N empty
placeholder files ``img/eimage_v{n}.fits`` (the DAG build only globs them), a
tiny refcat and, written directly, the exposure index checkpoint
``results/index/exposures.parquet`` (+ its header cache) with N ok rows, all
newer than the images so the checkpoint is complete.  Two variants:

``skymap``
    Up to the sky map: the calexp jobs, the sky map checkpoint, merge_tables
    and all (merge_tables waits on the sky map checkpoint).
``full``
    The calexp outputs (empty placeholders) and the sky map checkpoint outputs
    (``skymap.json`` from :class:`diffim.skymap.SkyMap`, ``overlaps.parquet``)
    exist too, so the whole DAG is expanded: warps, coadds, diffs, merge_tables.

The real CLI (``/work/venv/bin/snakemake -n --quiet rules``) runs in a
fresh process; the table gives the number of jobs of the dry-run, its wall
time, its CPU time (user + system: robust to other load on the machine) and
the peak resident memory of that process (``os.wait4``'s rusage,
i.e. what ``/usr/bin/time -v`` reports).  The CLI runs under an audit hook
that counts the input images the process opens ("img opened": must be 0).
A dry-run never calls the job selector, so ``--scheduler`` has no effect on
it and is not passed.  ``--profile N`` reruns one variant with N visits under
cProfile and prints where the time goes (the workflow's own functions
separately).  ``--snakefile`` benchmarks another copy of the workflow (e.g. a
``git archive`` of an older commit) for before/after comparisons.

Target (issue "DAG scale"): 10,000 visits in at most 20 s, reading no header
at DAG build time (only the cached exposure index).  Snakemake itself costs
about 3 ms of CPU per job, so the 10,000-visit full DAG (~28,000 jobs) takes
most of the ~4 min this benchmark needs on 2 idle cores.
"""

from __future__ import annotations

import argparse
import dataclasses
import io
import json
import os
import pstats
import re
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
SNAKEMAKE = shutil.which("snakemake", path=str(BIN)) or "snakemake"

#: Synthetic sky map: 4 x 4 patches, each visit overlapping two neighbours.
N_PATCHES = 4
#: Every 10th visit is left out of the template (as a seeing cut would).
EXCLUDE_EVERY = 10
BANDS = ("g", "r")
MODEL_FWHM_ARCSEC = {"g": 0.85, "r": 0.80}

#: Placeholder mtimes, seconds before the moment each file is written: inputs <
#: index < calexps < sky map, all newer than the workflow's scripts (a script
#: newer than a rule's outputs reruns the rule).
AGE = {"inputs": 4.0, "index": 3.0, "calexp": 2.0, "skymap": 1.0}

VARIANTS = ("skymap", "full")


# -- synthetic dataset ---------------------------------------------------------
def _touch(path: Path, age_s: float, text: str = "") -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    t = time.time() - age_s
    os.utime(path, (t, t))


def _set_age(path: Path, age_s: float) -> None:
    t = time.time() - age_s
    os.utime(path, (t, t))


def index_table(image_files: list[str]) -> pd.DataFrame:
    """Exposure index rows (diffim.index.INDEX_SCHEMA) for placeholder files.

    Visit ``n`` is file ``n`` (1-based), detector 0, bands alternating g/r,
    one visit every 0.01 day; size and mtime are the files' own, as
    :func:`diffim.index.build_index` would record them.
    """
    visits = np.arange(1, len(image_files) + 1)
    stats = [os.stat(f) for f in image_files]
    mjd = 60000.0 + 0.01 * visits
    return pd.DataFrame({
        "file": image_files, "visit": visits.astype(np.int64),
        "detector": np.zeros(len(visits), np.int32),
        "band": [BANDS[v % 2] for v in visits], "mjd_obs": mjd,
        "exptime": np.full(len(visits), 30.0), "midpoint_mjd": mjd + 15.0 / 86400.0,
        "status": "ok", "reason": "", "size": [s.st_size for s in stats],
        "mtime_ns": [s.st_mtime_ns for s in stats]})


def overlaps_table(index: pd.DataFrame) -> pd.DataFrame:
    """Sky-map overlaps: visit ``n`` touches patches ``(n%4, n//4%4)`` and its east neighbour."""
    rows = []
    for q in index.itertuples(index=False):
        v = int(q.visit)
        ix, iy = v % N_PATCHES, (v // N_PATCHES) % N_PATCHES
        included = v % EXCLUDE_EVERY != 0
        model = MODEL_FWHM_ARCSEC[q.band]
        for patch in (f"{ix}x{iy}", f"{(ix + 1) % N_PATCHES}x{iy}"):
            rows.append(dict(visit=v, detector=int(q.detector), band=q.band, patch=patch,
                             included=included,
                             reason="" if included else "FWHM above the seeing cut",
                             fwhm_px=3.5, model_fwhm_arcsec=model, max_fwhm_arcsec=model))
    return pd.DataFrame(rows)


def expected_counts(overlaps: pd.DataFrame) -> dict[str, int]:
    """Jobs per rule of the full-variant dry-run, derived from the overlap table."""
    return {"warp": int(overlaps["included"].sum()),
            "coadd": len(overlaps[["band", "patch"]].drop_duplicates()),
            "diff": len(overlaps[["visit", "detector"]].drop_duplicates()),
            "merge_tables": 1, "all": 1}


def make_dataset(workdir: Path, n_visits: int, *, variant: str = "full",
                 simulated: bool = False) -> list[str]:
    """Write the synthetic dataset into ``workdir``; return the ``--config`` arguments.

    With ``simulated``, the placeholders stand where the built-in simulator
    would have written its images (``results/sim``) and ``images`` is not set,
    so the ``simulate`` rule is part of the DAG too (as an up-to-date job).
    """
    from diffim.index import INDEX_SCHEMA
    from diffim.io import write_table
    from diffim.skymap import SkyMap

    if variant not in VARIANTS:
        raise ValueError(f"variant must be one of {VARIANTS}, got {variant!r}")
    workdir = Path(workdir)
    out = workdir / "results"
    image_dir = "results/sim/images" if simulated else "img"
    images = [f"{image_dir}/eimage_v{n}.fits" for n in range(1, n_visits + 1)]
    for name in images:
        _touch(workdir / name, AGE["inputs"])
    refcat = "results/sim/refcat.parquet" if simulated else "refcat.csv"
    _touch(workdir / refcat, AGE["inputs"], "ra,dec,g_mag,r_mag\n150.0,2.0,18.0,17.5\n")
    if simulated:
        _touch(out / "sim" / "dataset.yaml", AGE["inputs"], "placeholder: true\n")
    cwd = os.getcwd()
    os.chdir(workdir)  # index paths are relative, as the glob returns them
    try:
        index = index_table(images)
    finally:
        os.chdir(cwd)
    for name in ("exposures.parquet", ".header_cache.parquet"):
        (out / "index").mkdir(parents=True, exist_ok=True)
        write_table(out / "index" / name, index, schema=INDEX_SCHEMA)
        _set_age(out / "index" / name, AGE["index"])
    if variant == "full":
        for v, d in zip(index["visit"], index["detector"]):
            for suffix in ("fits", "sources.parquet", "qa.json"):
                _touch(out / "calexp" / f"v{v}-d{d}.{suffix}", AGE["calexp"])
        skymap = SkyMap(ra=150.0, dec=2.0, pixel_scale=0.2, patch_inner=4000,
                        patch_border=100, n_patches_x=N_PATCHES, n_patches_y=N_PATCHES)
        _touch(out / "skymap" / "skymap.json", AGE["skymap"], skymap.to_json())
        write_table(out / "skymap" / "overlaps.parquet", overlaps_table(index))
        _set_age(out / "skymap" / "overlaps.parquet", AGE["skymap"])
    if simulated:
        return ["outdir=results"]
    return [f"images={image_dir}/*.fits", f"refcat={refcat}", "outdir=results"]


# -- dry-run ---------------------------------------------------------------------
#: Runs the snakemake CLI (as its console script does) under an audit hook that
#: counts the input images opened by the process (``open`` audit events), to
#: check that building the DAG reads no image header.  Only a few sensitive
#: operations raise audit events (not ``os.stat``), so the hook costs little.
AUDIT_BOOTSTRAP = """
import atexit, os, sys
_opened = set()
def _hook(event, args):
    if event == "open" and args and isinstance(args[0], (str, bytes, os.PathLike)):
        name = os.fsdecode(args[0])
        if "eimage_v" in name:
            _opened.add(name)
sys.addaudithook(_hook)
atexit.register(lambda: print(f"AUDIT images opened: {len(_opened)}", file=sys.stderr))
sys.argv[0] = "snakemake"
from snakemake.cli import main
sys.exit(main())
"""
_AUDIT_LINE = re.compile(r"^AUDIT images opened: (\d+)$", re.MULTILINE)


@dataclasses.dataclass
class DryRun:
    n_jobs: int
    counts: dict[str, int]
    wall_s: float
    cpu_s: float
    max_rss_mb: float
    images_opened: int
    output: str


_STATS_ROW = re.compile(r"^\s*([A-Za-z_][\w]*)\s+(\d+)\s*$")


def parse_job_stats(text: str) -> dict[str, int]:
    """``{rule: count}`` from the "Job stats" table of a dry-run (without "total")."""
    counts, inside = {}, False
    for line in text.splitlines():
        if line.startswith("Job stats"):
            inside, counts = True, {}
            continue
        if inside:
            match = _STATS_ROW.match(line)
            if match:
                counts[match.group(1)] = int(match.group(2))
            elif counts and not line.strip():
                inside = False
    counts.pop("total", None)
    counts.pop("job", None)
    return counts


def dry_run(workdir: Path, config_args: list[str], *, snakefile: Path = ROOT / "Snakefile",
            extra: tuple[str, ...] = (), prefix: tuple[str, ...] = (),
            timeout: float = 300.0) -> DryRun:
    """Run ``snakemake -n`` in ``workdir``; time it and read its peak RSS (os.wait4).

    ``prefix`` replaces the audited snakemake CLI (e.g. by a cProfile run).
    """
    cmd = [*(prefix or (sys.executable, "-c", AUDIT_BOOTSTRAP)), "-n", "--cores", "2", "--snakefile", str(snakefile),
           "--quiet", "rules", *extra]
    if config_args:
        cmd += ["--config", *config_args]
    with tempfile.TemporaryFile("w+") as log:
        start = time.perf_counter()
        proc = subprocess.Popen(cmd, cwd=workdir, stdout=log, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, text=True)
        try:
            _, status, usage = _wait4(proc.pid, timeout)
        except TimeoutError:
            proc.kill()
            proc.wait()
            raise
        wall = time.perf_counter() - start
        proc.returncode = os.waitstatus_to_exitcode(status)
        log.seek(0)
        output = log.read()
    if proc.returncode != 0:
        raise RuntimeError(f"snakemake -n failed ({proc.returncode}) in {workdir}:\n"
                           f"{output[-6000:]}")
    counts = parse_job_stats(output)
    # ru_maxrss is in kilobytes on Linux
    cpu = usage.ru_utime + usage.ru_stime
    audit = _AUDIT_LINE.search(output)
    return DryRun(sum(counts.values()), counts, wall, cpu, usage.ru_maxrss / 1024.0,
                  int(audit.group(1)) if audit else -1, output)


def _wait4(pid: int, timeout: float):
    deadline = time.monotonic() + timeout
    while True:
        got, status, usage = os.wait4(pid, os.WNOHANG)
        if got == pid:
            return got, status, usage
        if time.monotonic() > deadline:
            raise TimeoutError(f"snakemake -n did not finish within {timeout:.0f} s")
        time.sleep(0.02)


# -- profile ---------------------------------------------------------------------
def profile(workdir: Path, config_args, *, snakefile: Path, extra: tuple[str, ...] = (),
            top: int = 15) -> str:
    """cProfile one dry-run; report the top cumulative entries and the workflow's functions."""
    prof = Path(workdir) / "dag.prof"
    prefix = (sys.executable, "-m", "cProfile", "-o", str(prof), "-m", "snakemake")
    run = dry_run(workdir, config_args, snakefile=snakefile, prefix=prefix, extra=extra)
    buf = io.StringIO()
    stats = pstats.Stats(str(prof), stream=buf)
    buf.write(f"profiled dry-run: {run.n_jobs} jobs, {run.wall_s:.1f} s under cProfile\n")
    stats.sort_stats("cumulative").print_stats(top)
    # functions defined in the workflow's .smk files (input functions, params)
    stats.sort_stats("cumulative").print_stats(r"\.smk|Snakefile", top)
    return buf.getvalue()


# -- main ------------------------------------------------------------------------
def bench(n_visits: int, variant: str, snakefile: Path, keep: Path | None,
          extra: tuple[str, ...] = ()) -> DryRun:
    workdir = Path(tempfile.mkdtemp(prefix=f"bench_dag_{variant}_{n_visits}_",
                                    dir=keep))
    try:
        config_args = make_dataset(workdir, n_visits, variant=variant)
        run = dry_run(workdir, config_args, snakefile=snakefile, extra=extra)
        if "exposure_index" in run.counts or ("skymap" in run.counts and variant == "full"):
            raise RuntimeError(f"a checkpoint was not considered complete:\n{run.output[-3000:]}")
        return run
    finally:
        if keep is None:
            shutil.rmtree(workdir, ignore_errors=True)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--visits", type=int, nargs="+", default=[100, 1000, 10000])
    parser.add_argument("--variants", nargs="+", choices=VARIANTS, default=list(VARIANTS))
    parser.add_argument("--profile", type=int, default=0, metavar="N",
                        help="also profile a dry-run with N visits (0: no)")
    parser.add_argument("--profile-variant", choices=VARIANTS, default="full")
    parser.add_argument("--snakefile", type=Path, default=ROOT / "Snakefile")
    parser.add_argument("--keep", type=Path, default=None,
                        help="create the work directories here and keep them")
    parser.add_argument("--json", type=Path, default=None, help="also write the rows as JSON")
    parser.add_argument("--snakemake-args", default="",
                        help="extra snakemake arguments, one string (e.g. '--groups diff=d')")
    args = parser.parse_args(argv)
    extra = tuple(shlex.split(args.snakemake_args))

    header = (f"{'variant':8s} {'visits':>7s} {'jobs':>7s} {'wall s':>8s} {'CPU s':>7s} "
              f"{'max RSS MB':>11s} {'img opened':>10s}  jobs per rule")
    print(f"snakefile: {args.snakefile}")
    print(header)
    print("-" * len(header))
    rows = []
    for variant in args.variants:
        for n in args.visits:
            run = bench(n, variant, args.snakefile, args.keep, extra)
            per_rule = " ".join(f"{k}={v}" for k, v in sorted(run.counts.items()))
            print(f"{variant:8s} {n:7d} {run.n_jobs:7d} {run.wall_s:8.2f} {run.cpu_s:7.2f} "
                  f"{run.max_rss_mb:11.0f} {run.images_opened:10d}  {per_rule}", flush=True)
            rows.append(dict(variant=variant, visits=n, jobs=run.n_jobs, wall_s=run.wall_s,
                             cpu_s=run.cpu_s, max_rss_mb=run.max_rss_mb,
                             images_opened=run.images_opened, counts=run.counts))
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1))
    if args.profile:
        workdir = Path(tempfile.mkdtemp(prefix="bench_dag_profile_", dir=args.keep))
        try:
            config_args = make_dataset(workdir, args.profile, variant=args.profile_variant)
            print()
            print(profile(workdir, config_args, snakefile=args.snakefile, extra=extra))
        finally:
            if args.keep is None:
                shutil.rmtree(workdir, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
