"""Run ONE subtraction method on ONE pair in a fresh process (so its peak RSS is its own).

    python worker.py METHOD PAIRDIR OUTDIR

Writes into OUTDIR: diff.fits (science photometric scale, ADU; for properimage: its unit-noise D),
significance.fits (the detection S/N image the method thresholds), optionally sigma.fits (the
method's own per-pixel noise of diff), psf.fits (difference-image PSF on a grid) or a meta
'psf' entry naming the true PSF of the difference ('sci' or 'ref'), sources.csv (the method's
catalogue), and meta.json (timed seconds of the method call only, options, notes).
"""

from __future__ import annotations

import json
import logging
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from astropy.io import fits

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import common  # noqa: E402
import simulate  # noqa: E402

logger = logging.getLogger("peers.worker")


def rss_mb() -> float:
    """Peak RSS so far (MB): the larger of this process and its waited-for children."""
    own = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    kids = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    return max(own, kids) / 1024.0


_PEAK = {}


def _stop(t0: float) -> float:
    """Seconds since ``t0``; also records the peak RSS at the end of the timed call."""
    dt = time.perf_counter() - t0
    _PEAK["method_end_mb"] = rss_mb()
    return dt


def matched_filter_significance(diff, sigma, psf) -> np.ndarray:
    """PSF matched filter of ``diff`` normalised by the propagated per-pixel variance.

    S = (D (x) P~) / sqrt(sigma^2 (x) P~^2), P~ the flipped PSF.  It ignores pixel-to-pixel
    noise correlation of the difference (the renormalised column of the table shows its effect).
    """
    from scipy.signal import fftconvolve
    pf = psf[::-1, ::-1]
    d = np.nan_to_num(diff)
    num = fftconvolve(d, pf, mode="same")
    den = fftconvolve(np.nan_to_num(sigma ** 2, nan=np.nanmedian(sigma ** 2)), pf ** 2, mode="same")
    return num / np.sqrt(np.maximum(den, 1e-30))


def centre_psf(pairdir: Path, which: str) -> np.ndarray:
    p = common.load_params(pairdir)
    n = p["n"]
    return simulate.true_psf(which, p["direction"], n / 2.0, n / 2.0, n)


def true_propagated_sigma(pairdir: Path, convolved: str, scale: float) -> np.ndarray:
    """Per-pixel std of a science-scale difference made by convolving one image with the
    TRUE matching kernel K (from the true PSFs at the field centre).

    convolved='ref':  D = N - K (x) R,  K (x) (F_r P_r) = P_n  ->  var = V_n + sum(K^2) V_r
    convolved='sci':  D = (K (x) N - R / F_r),  K (x) P_n = P_r  ->  var = sum(K^2) V_n + V_r / F_r^2
    """
    t = common.load_truth(pairdir)
    pn, pr = centre_psf(pairdir, "sci"), centre_psf(pairdir, "ref")
    if convolved == "ref":
        k2 = common.matching_kernel_sumsq(pn, pr, scale)
        return np.sqrt(t["var_sci"] + k2 * t["var_ref"])
    k2 = common.matching_kernel_sumsq(pr, pn, 1.0)
    return np.sqrt(k2 * t["var_sci"] + t["var_ref"] / scale ** 2)


# --------------------------------------------------------------------------- methods


def run_oracle(pairdir: Path, sci, ref, out: Path) -> dict:
    import oracle
    t = common.load_truth(pairdir)
    p = t["params"]
    pn, grid = common.psf_grid(pairdir, "sci")
    pr, _ = common.psf_grid(pairdir, "ref")
    N, R = sci - t["sky_sci"], ref - t["sky_ref"]
    t0 = time.perf_counter()
    res = oracle.run_oracle(N, R, t["var_sci"], t["var_ref"], pn, pr, grid, p["ref_scale"])
    dt = _stop(t0)
    common.write_image(out / "sigma.fits", res["sigma"])
    _write_psf_grid(out, res["psf"], grid)
    return dict(diff=res["diff"], significance=res["scorr"], seconds=dt,
                notes="ZOGY with true PSFs, flux scale, sky and variances; S_corr as significance")


def run_diffim(pairdir: Path, sci, ref, out: Path) -> dict:
    import pandas as pd
    from diffim.pair import subtract_pair
    p = common.load_params(pairdir)
    t0 = time.perf_counter()
    res = subtract_pair(sci, ref, gain=p["gain"], read_noise=p["read_noise_e"], saturation=None,
                        threshold=5.0)
    dt = _stop(t0)
    d = res.difference
    common.write_image(out / "sigma.fits", np.sqrt(np.where(d.variance > 0, d.variance, np.nan)))
    g = simulate.psf_grid_centres(p["n"])
    gx, gy = np.meshgrid(g, g)
    grid = np.c_[gx.ravel(), gy.ravel()]
    _write_psf_grid(out, np.array([d.psf.at(x, y) for x, y in grid]), grid)
    src = pd.DataFrame(res.sources)
    src.to_csv(out / "sources.csv", index=False)
    timings = {k: float(v) for k, v in dict(res.timings).items()}
    return dict(diff=d.image, significance=res.significance, seconds=dt, timings=timings,
                notes="diffim.pair.subtract_pair defaults; significance = res.significance")


def run_stdpipe(pairdir: Path, sci, ref, out: Path) -> dict:
    from stdpipe import subtraction
    p = common.load_params(pairdir)
    hs, hr = fits.getheader(pairdir / "sci.fits"), fits.getheader(pairdir / "ref.fits")
    t0 = time.perf_counter()
    D, scorr, psf_d = subtraction.run_zogy(sci, ref, image_gain=p["gain"], template_gain=p["gain"],
                                           image_fwhm=hs["FWHM"], template_fwhm=hr["FWHM"],
                                           get_psf=True, nthreads=2, verbose=False)
    dt = _stop(t0)
    psf_d = _crop_centre(np.asarray(psf_d, dtype=np.float64), 2 * simulate.HALF + 1)
    g = simulate.psf_grid_centres(p["n"])
    gx, gy = np.meshgrid(g, g)
    _write_psf_grid(out, np.repeat(psf_d[None], gx.size, axis=0), np.c_[gx.ravel(), gy.ravel()])
    return dict(diff=D, significance=scorr, seconds=dt,
                notes="stdpipe.subtraction.run_zogy (PSFEx PSFs, fitted scale/shift, nx=ny=1); "
                      "S_corr as significance; D is on the science scale")


def run_properimage(pairdir: Path, sci, ref, out: Path) -> dict:
    from properimage import operations
    t0 = time.perf_counter()
    D, P, scorr, mask = operations.subtract(ref=ref, new=sci, align=False, smooth_psf=False,
                                            fitted_psf=True, iterative=False, beta=True, shift=False)
    dt = _stop(t0)
    D, scorr = np.real(np.asarray(D)), np.real(np.asarray(scorr))
    m = np.asarray(np.ma.getmaskarray(mask) if np.ma.isMaskedArray(mask) else mask, dtype=bool)
    if m.shape == D.shape:
        D = np.where(m, np.nan, D); scorr = np.where(m, np.nan, scorr)
    return dict(diff=D, significance=scorr, seconds=dt, unit_noise_diff=True,
                notes="properimage.operations.subtract (Gaussian-fitted PSFs, beta fitted, no shift); "
                      "D is unit-noise (not on a flux scale), S_corr as significance")


def _sex_path() -> str:
    """A directory with a `sex` symlink to Debian's source-extractor, for sfft."""
    exe = shutil.which("sex") or shutil.which("sextractor") or shutil.which("source-extractor")
    if exe is None:
        raise RuntimeError("sfft needs SExtractor, and none of sex, sextractor or source-extractor is on PATH.")
    d = tempfile.mkdtemp(prefix="sexlink")
    os.symlink(exe, os.path.join(d, "sex"))
    return d


def run_sfft(pairdir: Path, sci, ref, out: Path) -> dict:
    np.in1d = np.isin            # sfft 1.7 still calls np.in1d (removed in numpy 2.4)
    os.environ["PATH"] = _sex_path() + os.pathsep + os.environ["PATH"]
    from sfft.EasyCrowdedPacket import Easy_CrowdedPacket
    work = Path(tempfile.mkdtemp(prefix="sfft", dir=out))
    t0 = time.perf_counter()
    diffT, prep, sol, fscal, _ = Easy_CrowdedPacket.ECP(
        FITS_REF=str(pairdir / "ref.fits"), FITS_SCI=str(pairdir / "sci.fits"),
        FITS_DIFF=str(work / "diff.fits"), ForceConv="AUTO", KerPolyOrder=0, BGPolyOrder=2,
        ConstPhotRatio=True, GAIN_KEY="GAIN", SATUR_KEY="SATURATE", BACKEND_4SUBTRACT="Numpy",
        NUM_CPU_THREADS_4SUBTRACT=2, VERBOSE_LEVEL=0)
    dt = _stop(t0)
    convolved = "ref" if prep["FWHM_SCI"] >= prep["FWHM_REF"] else "sci"
    diff = np.asarray(diffT, dtype=np.float64).T
    if convolved == "sci":
        diff = diff / fscal     # Conv(SCI) - REF is on the reference scale: back to science scale
    shutil.rmtree(work, ignore_errors=True)
    sigma = true_propagated_sigma(pairdir, convolved, common.load_params(pairdir)["ref_scale"])
    common.write_image(out / "sigma_true.fits", sigma)
    psf_which = "sci" if convolved == "ref" else "ref"
    sig = matched_filter_significance(diff, sigma, centre_psf(pairdir, psf_which))
    return dict(diff=diff, significance=sig, seconds=dt, psf=psf_which, convolved=convolved,
                notes=f"sfft crowded flavour (ECP), numpy backend, KerPolyOrder=0, BGPolyOrder=2, "
                      f"ConstPhotRatio; convolved {convolved.upper()} (flux scaling {fscal:.4f}); "
                      f"significance = true-PSF matched filter / true-propagated noise")


def run_hotpants(pairdir: Path, sci, ref, out: Path) -> dict:
    exe = shutil.which("hotpants")
    if exe is None:
        raise FileNotFoundError("absent (no hotpants on PATH)")
    p = common.load_params(pairdir)
    hs, hr = fits.getheader(pairdir / "sci.fits"), fits.getheader(pairdir / "ref.fits")
    convolved = "ref" if hs["FWHM"] >= hr["FWHM"] else "sci"
    s = np.sqrt(max(hs["FWHM"], hr["FWHM"]) ** 2 - min(hs["FWHM"], hr["FWHM"]) ** 2) / 2.355
    g, rn = p["gain"], p["read_noise_e"] / p["gain"]
    cmd = [exe, "-inim", str(pairdir / "sci.fits"), "-tmplim", str(pairdir / "ref.fits"),
           "-outim", str(out / "hp_diff.fits"), "-oni", str(out / "hp_noise.fits"),
           "-c", "t" if convolved == "ref" else "i", "-n", "i",
           "-ig", str(g), "-tg", str(g), "-ir", str(rn), "-tr", str(rn),
           "-iu", "1e9", "-tu", "1e9", "-il", "-1e5", "-tl", "-1e5",
           "-ng", "3", "6", f"{0.5 * s:.3f}", "4", f"{s:.3f}", "2", f"{2 * s:.3f}",
           "-r", str(int(2.5 * max(hs["FWHM"], hr["FWHM"]))), "-rss", str(int(4 * max(hs["FWHM"], hr["FWHM"]))),
           "-ko", "1", "-bgo", "2", "-v", "0"]
    t0 = time.perf_counter()
    subprocess.run(cmd, check=True, capture_output=True)
    dt = _stop(t0)
    diff, sigma = common.read_image(out / "hp_diff.fits"), common.read_image(out / "hp_noise.fits")
    for f in ("hp_diff.fits",):
        (out / f).unlink()
    (out / "hp_noise.fits").rename(out / "sigma.fits")
    psf_which = "sci" if convolved == "ref" else "ref"
    sig = matched_filter_significance(diff, sigma, centre_psf(pairdir, psf_which))
    return dict(diff=diff, significance=sig, seconds=dt, psf=psf_which, convolved=convolved,
                notes=f"hotpants -c {'t' if convolved == 'ref' else 'i'} -n i -ko 1 -bgo 2; "
                      "significance = true-PSF matched filter / its noise image")


METHODS = dict(oracle=run_oracle, diffim=run_diffim, stdpipe=run_stdpipe, sfft=run_sfft,
               properimage=run_properimage, hotpants=run_hotpants)


def _crop_centre(img: np.ndarray, size: int) -> np.ndarray:
    """Centred size x size cut of a PSF image around its peak, normalised to unit sum."""
    cy, cx = np.unravel_index(np.argmax(img), img.shape)
    h = size // 2
    pad = np.pad(img, h)
    cut = pad[cy:cy + size, cx:cx + size]
    return cut / cut.sum()


def _write_psf_grid(out: Path, cube: np.ndarray, grid: np.ndarray) -> None:
    tab = fits.BinTableHDU.from_columns([fits.Column("x", "D", array=grid[:, 0]),
                                         fits.Column("y", "D", array=grid[:, 1])])
    fits.HDUList([fits.PrimaryHDU(np.asarray(cube, np.float64)), tab]).writeto(out / "psf.fits", overwrite=True)


def main(argv=None) -> int:
    method, pairdir, out = (argv or sys.argv[1:])[:3]
    pairdir, out = Path(pairdir).resolve(), Path(out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    logging.basicConfig(level=logging.WARNING)
    sci, ref = common.read_image(pairdir / "sci.fits"), common.read_image(pairdir / "ref.fits")
    rss_inputs = rss_mb()
    res = METHODS[method](pairdir, sci, ref, out)
    rss_method = _PEAK.get("method_end_mb", rss_mb())
    common.write_image(out / "diff.fits", res.pop("diff"))
    common.write_image(out / "significance.fits", res.pop("significance"))
    res.update(method=method, rss_after_inputs_mb=rss_inputs, rss_after_method_mb=rss_method)
    (out / "meta.json").write_text(json.dumps(res, indent=1, default=float))
    return 0


if __name__ == "__main__":
    sys.exit(main())
