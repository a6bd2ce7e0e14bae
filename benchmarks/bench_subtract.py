"""Benchmark: one 4000 x 4072 visit through subtraction, detection and measurement.

Run with ``python benchmarks/bench_subtract.py``.  Builds a synthetic pair
(Moffat science PSF, Gaussian template PSF, 8000 static stars, 400
transients, K = 41; the template on a coadd-patch grid offset by a fraction
of a pixel), then times the template resampling into the visit frame
(:func:`diffim.template.stitch_template`), the kernel fit, the convolution +
decorrelation, the difference PSF, detection and measurement, and prints the
process peak resident memory.  Takes ~30 s on 2 cores (most of it building the
synthetic images).  Target: <= 8 s and <= 2 GB for the pipeline steps.
Freed memory is retained as in the workflow's jobs
(:func:`diffim.malloc.retain_freed_memory`); ``DIFFIM_SYSTEM_MALLOC=1`` turns
that off for a comparison.
"""

from __future__ import annotations

import resource
import sys
import time
from pathlib import Path

import numpy as np
import yaml

from diffim import detect, subtract
from diffim.exposure import Exposure
from diffim.malloc import retain_freed_memory
from diffim.psf import PsfModel, moffat_kernel, gaussian_kernel
from diffim.simulate import tan_wcs
from diffim.template import stitch_template

NX, NY, K = 4000, 4072, 41
SKY_VAR = 1000.0
#: The template is a coadd patch on its own grid: visit pixel + this offset.
OFF_X, OFF_Y, PAD = 50.25, 49.75, 100  # multiples of the 1/4-px painting grid
VISIT_WCS = tan_wcs((150.0, 2.0), (NX / 2, NY / 2), np.diag([-0.2, 0.2]) / 3600)


def _stamps(fn, n_sub=4):
    """PSF stamps on an ``n_sub x n_sub`` grid of sub-pixel offsets."""
    offs = (np.arange(n_sub) + 0.5) / n_sub - 0.5
    return offs, {(i, j): fn(dx, dy) for i, dx in enumerate(offs) for j, dy in enumerate(offs)}


def _paint(img, stamps, offs, xs, ys, fluxes):
    h = next(iter(stamps.values())).shape[0] // 2
    ny, nx = img.shape
    for x, y, f in zip(xs, ys, fluxes):
        ix, iy = int(np.round(x)), int(np.round(y))
        i = int(np.argmin(np.abs(offs - (x - ix))))
        j = int(np.argmin(np.abs(offs - (y - iy))))
        if h <= ix < nx - h and h <= iy < ny - h:
            img[iy - h:iy + h + 1, ix - h:ix + h + 1] += f * stamps[(i, j)]


def make_visit(seed=1):
    rng = np.random.default_rng(seed)
    offs, s_sci = _stamps(lambda dx, dy: moffat_kernel(4.2, 61, beta=3.0, e1=0.05, e2=0.03,
                                                       dx=dx, dy=dy, oversample=3))
    _, s_tmp = _stamps(lambda dx, dy: gaussian_kernel(3.2, 61, dx=dx, dy=dy))
    n_st, n_tr = 8000, 400
    # stars whole inside the visit (the painter skips stamps crossing the border)
    sx, sy = rng.uniform(31, NX - 31, n_st), rng.uniform(31, NY - 31, n_st)
    sf = np.exp(rng.uniform(np.log(1e3), np.log(5e5), n_st))
    tx, ty = rng.uniform(0, NX, n_tr), rng.uniform(0, NY, n_tr)
    tf = np.exp(rng.uniform(np.log(1.5e3), np.log(5e4), n_tr))
    sci = np.zeros((NY, NX), np.float32)
    tmp = np.zeros((NY + PAD, NX + PAD), np.float32)
    _paint(sci, s_sci, offs, np.r_[sx, tx], np.r_[sy, ty], np.r_[sf, tf])
    _paint(tmp, s_tmp, offs, sx + OFF_X, sy + OFF_Y, 0.97 * sf)
    sci_var = (SKY_VAR + sci).astype(np.float32)
    tmp_var = (SKY_VAR / 10 + tmp / 10).astype(np.float32)
    sci += rng.standard_normal((NY, NX), dtype=np.float32) * np.sqrt(sci_var)
    tmp += rng.standard_normal(tmp.shape, dtype=np.float32) * np.sqrt(tmp_var)
    psf_s = PsfModel.constant(moffat_kernel(4.2, K, beta=3.0, e1=0.05, e2=0.03), NX, NY)
    psf_t = PsfModel.gaussian(3.2, K, NX, NY)
    patch_wcs = tan_wcs((150.0, 2.0), (NX / 2 + OFF_X, NY / 2 + OFF_Y),
                        np.diag([-0.2, 0.2]) / 3600)
    # positions rounded to the painted sub-pixel grid
    tx = np.round(tx) + offs[np.argmin(np.abs(offs[None] - (tx - np.round(tx))[:, None]), axis=1)]
    ty = np.round(ty) + offs[np.argmin(np.abs(offs[None] - (ty - np.round(ty))[:, None]), axis=1)]
    return (Exposure(sci, sci_var, np.zeros((NY, NX), np.int32), wcs=VISIT_WCS, psf=psf_s),
            Exposure(tmp, tmp_var, np.zeros(tmp.shape, np.int32), wcs=patch_wcs, psf=psf_t),
            (tx, ty, tf, sx, sy, sf))


def workflow_default(section: str, key: str):
    """A knob's default in ``config/schema.yaml``: what the workflow runs with."""
    schema = yaml.safe_load((Path(__file__).parents[1] / "config" / "schema.yaml").read_text())
    return schema["properties"][section]["properties"][key]["default"]


def main() -> int:
    retained = retain_freed_memory()
    t0 = time.perf_counter()
    science, patch, truth = make_visit()
    t_gen = time.perf_counter() - t0
    t5 = time.perf_counter()
    template = stitch_template([patch], science.wcs, science.shape, patch.psf)
    t_stitch = time.perf_counter() - t5
    del patch
    t1 = time.perf_counter()
    res = subtract.subtract_images(
        science, template, kernel_spatial_order=workflow_default("diff", "kernel_spatial_order"))
    t_sub = time.perf_counter() - t1
    t2 = time.perf_counter()
    cat = detect.detect_dia_sources(res.difference)
    t_det = time.perf_counter() - t2
    t3 = time.perf_counter()
    detect.forced_psf_photometry(res.difference, truth[0], truth[1])
    t_forced = time.perf_counter() - t3
    peak_gb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024**2
    tm = res.timings
    rows = [("synthetic data (not counted)", t_gen),
            ("template resampling (Lanczos-3 patch -> visit)", t_stitch),
            ("kernel candidates + fit", tm["kernel_fit"]),
            ("convolution + subtraction + decorrelation", tm["convolution"]),
            ("difference PSF + noise ratio", tm["total"] - tm["kernel_fit"] - tm["convolution"]),
            ("subtract_images total", t_sub),
            (f"detection + measurement ({len(cat)} DIASources)", t_det),
            (f"forced photometry ({len(truth[0])} positions)", t_forced),
            ("PIPELINE TOTAL (resample + subtract + detect)", t_stitch + t_sub + t_det)]
    out = sys.stdout
    out.write(f"image {NX} x {NY}, K = {K}, mode = {res.mode}, kernel sum = {res.kernel_sum:.4f}, "
              f"stamps {res.n_used}/{res.n_candidates}, noise ratio = {res.noise_ratio:.3f}, "
              f"freed memory retained = {retained}\n")
    out.write(f"{'step':<48s}{'seconds':>9s}\n")
    for name, t in rows:
        out.write(f"{name:<48s}{t:9.2f}\n")
    out.write(f"{'peak resident memory of the process (GB)':<48s}{peak_gb:9.2f}\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
