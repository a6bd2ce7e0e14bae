"""Benchmark: the calexp stage on one 4000 x 4072 simulated visit.

    python benchmarks/bench_calexp.py [--repeat N]

Simulates one Twinkles-like visit (config/twinkles40.yaml settings, one visit)
into a temporary directory, then times diffim.calexp.process_exposure on it
(read excluded) and prints a table: wall time, CPU time and peak memory
(resident set of this process, which also holds the input image).
Target (issue 2): at most 5 s and 1.5 GB on 2 cores.
"""

from __future__ import annotations

import argparse
import resource
import sys
import tempfile
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]


def simulate_one(outdir: Path) -> tuple[Path, Path]:
    from diffim.simulate import simulate_dataset

    settings = yaml.safe_load((ROOT / "config" / "twinkles40.yaml").read_text())["simulate"]
    paths = simulate_dataset(outdir, {**settings, "n_visits": 1})
    return Path(paths["images"][0]), Path(paths["refcat"])


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=2, help="timed repetitions (best is shown)")
    args = parser.parse_args(argv)
    from diffim.calexp import CalexpConfig, process_exposure
    from diffim.io import header_meta, header_wcs, read_eimage, read_refcat

    with tempfile.TemporaryDirectory() as tmp:
        image_path, refcat_path = simulate_one(Path(tmp))
        image, header = read_eimage(image_path)
        meta = header_meta(header, image_path)
        wcs = header_wcs(header, image_path)
        refcat = read_refcat(refcat_path, [meta["band"]])
        rows = []
        for _ in range(args.repeat):
            t0, c0 = time.perf_counter(), time.process_time()
            result = process_exposure(image, meta, wcs, refcat, config=CalexpConfig())
            rows.append((time.perf_counter() - t0, time.process_time() - c0))
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    wall, cpu = min(rows)
    qa = result.qa
    print(f"calexp of one {image.shape[1]} x {image.shape[0]} visit "
          f"({qa['n_sources']} sources, {qa['psf_n_stars']} PSF stars)")
    print(f"| {'quantity':24s} | {'value':>10s} | {'target':>8s} |")
    print(f"|{'-' * 26}|{'-' * 12}|{'-' * 10}|")
    print(f"| {'wall time (s), best':24s} | {wall:10.2f} | {'<= 5':>8s} |")
    print(f"| {'CPU time (s)':24s} | {cpu:10.2f} | {'':>8s} |")
    print(f"| {'peak RSS (MB)':24s} | {peak_mb:10.0f} | {'<= 1536':>8s} |")
    print(f"| {'FWHM (px)':24s} | {qa['fwhm_px']:10.3f} | {'':>8s} |")
    print(f"| {'astrometric RMS (mas)':24s} | {1000 * qa['astrometry_rms_arcsec']:10.1f} | {'':>8s} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
