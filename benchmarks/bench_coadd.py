"""Benchmark of diffim.coadd.assemble_coadd on memory-mapped FITS warps.

Writes ``--distinct`` synthetic warps (IMAGE float32, VARIANCE float32, MASK
int32; uncompressed, so they can be memory-mapped) of ``--size`` x ``--size``
pixels into a temporary directory, then coadds 10, 20 and 40 "inputs" (input
``i`` reads file ``i % distinct``, to save disk and time) with the default
``meanclip`` method.  Each coadd runs in a fresh subprocess so its memory
figures are its own:

* ``tracemalloc``: peak of Python/numpy heap allocations during the assembly;
* ``peak RssAnon``: anonymous resident memory, sampled every 20 ms (excludes
  the file-backed memmap pages, which are page cache the kernel can drop);
* ``ru_maxrss``: the whole process's peak RSS, *including* touched memmap
  pages (which scales with the number of distinct files read, not with the
  coadd's own memory).

Targets: 40 inputs of 4000 x 4000 in <= 20 s; peak memory independent of the
number of inputs.  Usage::

    python benchmarks/bench_coadd.py [--size 4000] [--distinct 10] [--inputs 10 20 40]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import threading
import time
import tracemalloc
from pathlib import Path

import numpy as np
from astropy.io import fits

from diffim.coadd import assemble_coadd, typical_variance, visit_weights
from diffim.masks import bit


def write_warps(directory: Path, n_files: int, size: int, seed: int = 1) -> list[Path]:
    """Synthetic warps: Gaussian noise, a NO_DATA strip, a few cosmic rays."""
    rng = np.random.default_rng(seed)
    paths = []
    for k in range(n_files):
        sigma = np.float32(rng.uniform(5.0, 15.0))  # nJy
        image = rng.standard_normal((size, size), dtype=np.float32) * sigma
        variance = np.full((size, size), sigma * sigma, np.float32)
        mask = np.zeros((size, size), np.int32)
        edge = int(rng.integers(0, size // 10))          # dither: no data on one side
        image[:, :edge] = np.nan
        mask[:, :edge] = bit("NO_DATA")
        ys, xs = rng.integers(0, size, (2, 200))
        image[ys, xs] += 1000 * sigma                    # cosmic rays, not masked
        hdus = fits.HDUList([fits.PrimaryHDU(),
                             fits.ImageHDU(image, name="IMAGE"),
                             fits.ImageHDU(variance, name="VARIANCE"),
                             fits.ImageHDU(mask, name="MASK")])
        path = directory / f"warp_{k:02d}.fits"
        hdus.writeto(path)
        paths.append(path)
    return paths


def _peak_rss_anon(stop: threading.Event, out: list) -> None:
    peak = 0
    while not stop.is_set():
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith("RssAnon:"):
                    peak = max(peak, int(line.split()[1]) * 1024)
        stop.wait(0.02)
    out.append(peak)


def run_one(paths: list[Path], n_inputs: int) -> dict:
    """Coadd ``n_inputs`` memory-mapped warps; returns timings and memory peaks."""
    hduls = [fits.open(p, memmap=True) for p in paths]
    planes = [(h["IMAGE"].data, h["VARIANCE"].data, h["MASK"].data) for h in hduls]
    shape = planes[0][0].shape

    def read_block(i, rows):
        img, var, msk = planes[i % len(planes)]
        return img[rows], var[rows], msk[rows]

    t0 = time.perf_counter()
    weights = visit_weights([typical_variance(planes[i % len(planes)][1],
                                              planes[i % len(planes)][2])
                             for i in range(n_inputs)])
    t_weights = time.perf_counter() - t0
    stop, rss = threading.Event(), []
    sampler = threading.Thread(target=_peak_rss_anon, args=(stop, rss))
    rss_before = _current_rss_anon()
    sampler.start()
    tracemalloc.start()
    t0 = time.perf_counter()
    result = assemble_coadd(read_block, n_inputs, shape, weights)
    wall = time.perf_counter() - t0
    traced_peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    stop.set()
    sampler.join()
    good = np.isfinite(result.image)
    out = {"n_inputs": n_inputs, "wall_s": wall, "weights_s": t_weights,
           "block_rows": result.block_rows, "tracemalloc_mb": traced_peak / 1e6,
           "rss_anon_mb": (rss[0] - rss_before) / 1e6,
           "maxrss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e3,
           "clipped_frac": float(result.n_clipped.sum() / max(1, result.n_inputs_image.sum())),
           "good_frac": float(good.mean())}
    for h in hduls:
        h.close()
    return out


def _current_rss_anon() -> int:
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith("RssAnon:"):
                return int(line.split()[1]) * 1024
    return 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=4000)
    parser.add_argument("--distinct", type=int, default=10)
    parser.add_argument("--inputs", type=int, nargs="+", default=[10, 20, 40])
    parser.add_argument("--worker", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--dir", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        paths = sorted(Path(args.dir).glob("warp_*.fits"))
        sys.stdout.write(json.dumps(run_one(paths, args.worker)) + "\n")
        return 0
    with tempfile.TemporaryDirectory(prefix="bench_coadd_") as tmp:
        t0 = time.perf_counter()
        write_warps(Path(tmp), args.distinct, args.size)
        os.sync()  # finish write-back now, so it does not slow the first timed run
        sys.stdout.write(f"wrote {args.distinct} warps of {args.size}x{args.size} "
                         f"in {time.perf_counter() - t0:.1f} s\n")
        header = (f"{'n_inputs':>8} {'wall s':>7} {'rows/blk':>8} {'tracemalloc MB':>14} "
                  f"{'peak RssAnon MB':>15} {'ru_maxrss MB':>12} {'clipped':>8}")
        sys.stdout.write(header + "\n")
        for n in args.inputs:
            proc = subprocess.run([sys.executable, __file__, "--worker", str(n), "--dir", tmp],
                                  capture_output=True, text=True, check=True)
            r = json.loads(proc.stdout.strip().splitlines()[-1])
            sys.stdout.write(f"{r['n_inputs']:>8d} {r['wall_s']:>7.1f} {r['block_rows']:>8d} "
                             f"{r['tracemalloc_mb']:>14.0f} {r['rss_anon_mb']:>15.0f} "
                             f"{r['maxrss_mb']:>12.0f} {r['clipped_frac']:>8.2%}\n")
            sys.stdout.flush()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
