"""Score one method's outputs on one pair, identically for every method (definitions in README.md).

Conventions: arrays [y, x]; pixel (0, 0) is the centre of the first pixel; fluxes in science ADU.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
from astropy.io import fits
from scipy import ndimage
from scipy.spatial import cKDTree

import common
import oracle
import simulate

EDGE = 64            # px ignored at every image edge (kernels / tiles wrap or are truncated there)
TRANSIENT_MASK = 15  # px around each transient excluded from the noise statistics
MATCH = 2.0          # px, detection-to-transient match radius
THRESH = 5.0         # detection threshold (sigma)
CORE_SIGMA = 20.0    # bright-star core: noiseless star light > 20 x the sky noise (either image)
FREE_SIGMA = 0.1     # star-free: noiseless star light < 0.1 x the sky noise (both images)
FLUX_HALF = 10       # forced-photometry stamp half-width (21 x 21 px)
N_BOOT = 1000        # bootstrap resamples for the uncertainty of a median
BOOT_SEED = 7        # fixed: the same scores on every run


def robust_std(x: np.ndarray) -> float:
    """1.4826 x median absolute deviation of the finite values."""
    x = x[np.isfinite(x)]
    if x.size == 0:
        return float("nan")
    return float(1.4826 * np.median(np.abs(x - np.median(x))))


def bootstrap_median_std(x: np.ndarray, n_boot: int = N_BOOT, seed: int = BOOT_SEED) -> float | None:
    """Standard deviation of the median of ``x`` over ``n_boot`` bootstrap resamples (seeded)."""
    x = np.asarray(x, float)
    x = x[np.isfinite(x)]
    if x.size < 2:
        return None
    idx = np.random.default_rng(seed).integers(0, x.size, (n_boot, x.size))
    return float(np.std(np.median(x[idx], axis=1)))


def pixel_classes(t: dict) -> dict:
    """Boolean masks: star_free, star_rich (cluster minus cores), bright_core; edges and
    transient surroundings removed from all three."""
    n = t["n"]
    p = t["params"]
    yy, xx = np.mgrid[0:n, 0:n]
    ok = (xx >= EDGE) & (xx < n - EDGE) & (yy >= EDGE) & (yy < n - EDGE)
    near = np.zeros((n, n), bool)
    for x, y in zip(t["transients"].x, t["transients"].y):
        ix, iy = int(round(x)), int(round(y))
        near[max(iy - TRANSIENT_MASK, 0):iy + TRANSIENT_MASK + 1,
             max(ix - TRANSIENT_MASK, 0):ix + TRANSIENT_MASK + 1] = True
    inner = ok.copy()
    ok &= ~near
    ss, sr = np.sqrt(t["bgvar_sci"]), np.sqrt(t["bgvar_ref"])
    core = (t["star_sci"] > CORE_SIGMA * ss) | (t["star_ref"] > CORE_SIGMA * sr)
    cx, cy = p["cluster_centre"]
    rc = np.hypot(xx - cx, yy - cy)
    free = (t["star_sci"] < FREE_SIGMA * ss) & (t["star_ref"] < FREE_SIGMA * sr) & (rc > p["cluster_radius"] + 20)
    rich = (rc < p["cluster_radius"]) & ~core
    return dict(star_free=free & ok, star_rich=rich & ok, bright_core=core & ok, valid=ok, inner=inner)


def zogy_expected_sigma(pairdir: Path, t: dict) -> tuple[np.ndarray, np.ndarray]:
    """Per-pixel std of an ideal (true-PSF) ZOGY D' (science scale) and of the unit-noise D.

    Cached in the pair's truth directory; computed by propagating the true variances through
    the true-PSF ZOGY kernels (oracle.run_oracle)."""
    f1, f2 = pairdir / "truth" / "zogy_sigma.fits", pairdir / "truth" / "zogy_sigma_unit.fits"
    if not (f1.exists() and f2.exists()):
        pn, grid = common.psf_grid(pairdir, "sci")
        pr, _ = common.psf_grid(pairdir, "ref")
        z = np.zeros((t["n"], t["n"]))
        res = oracle.run_oracle(z, z, t["var_sci"], t["var_ref"], pn, pr, grid, t["params"]["ref_scale"])
        common.write_image(f1, res["sigma"]); common.write_image(f2, res["sigma_unit"])
    return common.read_image(f1), common.read_image(f2)


def expected_sigma(pairdir: Path, rundir: Path, meta: dict, t: dict) -> tuple[np.ndarray, str]:
    """Expected per-pixel noise of the method's diff and where it comes from."""
    if (rundir / "sigma.fits").exists():
        return common.read_image(rundir / "sigma.fits"), "method's own noise image"
    if (rundir / "sigma_true.fits").exists():
        return common.read_image(rundir / "sigma_true.fits"), "true variances through the true matching kernel"
    zs, zu = zogy_expected_sigma(pairdir, t)
    if meta.get("unit_noise_diff"):
        return zu, "true variances through true-PSF ZOGY (unit-noise D)"
    return zs, "true variances through true-PSF ZOGY (science-scale D)"


def detections(sig: np.ndarray, valid: np.ndarray, tr: pd.DataFrame) -> dict:
    """Connected components of |sig| >= THRESH, matched to transients through their local maxima."""
    s = np.where(np.isfinite(sig), sig, 0.0)
    found = np.zeros(len(tr), bool)
    fps = []
    tree = cKDTree(np.c_[tr.x, tr.y])
    for sign in (1.0, -1.0):
        a = sign * s
        lab, nlab = ndimage.label(a >= THRESH)
        if nlab == 0:
            continue
        peaks = (a == ndimage.maximum_filter(a, size=3)) & (a >= THRESH) & valid
        py, px = np.nonzero(peaks)
        matched = set()
        if sign > 0 and len(px):
            d, j = tree.query(np.c_[px, py])
            hit = d <= MATCH
            found[np.unique(j[hit])] = True
            matched = set(lab[py[hit], px[hit]])
        comp_peak = ndimage.maximum_position(a, lab, index=np.arange(1, nlab + 1))
        for k, (cy, cx) in enumerate(comp_peak, start=1):
            if k in matched or not valid[cy, cx]:
                continue
            fps.append(dict(x=int(cx), y=int(cy), sig=float(sign * a[cy, cx])))
    return dict(found=found, fps=fps)


def measured_snr(sig: np.ndarray, tr: pd.DataFrame) -> np.ndarray:
    """Max of the significance image in the 3 x 3 pixels around each true position."""
    out = np.empty(len(tr))
    for i, (x, y) in enumerate(zip(tr.x, tr.y)):
        ix, iy = int(round(x)), int(round(y))
        out[i] = np.nanmax(sig[iy - 1:iy + 2, ix - 1:ix + 2])
    return out


def forced_flux(diff: np.ndarray, tr: pd.DataFrame, psf_at) -> np.ndarray:
    """Unweighted least-squares PSF flux at each true position: sum(D P) / sum(P^2) over 21 x 21."""
    h = FLUX_HALF
    out = np.empty(len(tr))
    for i, (x, y) in enumerate(zip(tr.x, tr.y)):
        ix, iy = int(round(x)), int(round(y))
        p = psf_at(x, y)
        c = p.shape[0] // 2
        p = p[c - h:c + h + 1, c - h:c + h + 1]
        d = diff[iy - h:iy + h + 1, ix - h:ix + h + 1]
        good = np.isfinite(d)
        out[i] = np.sum(d[good] * p[good]) / np.sum(p[good] ** 2)
    return out


def psf_provider(pairdir: Path, rundir: Path, meta: dict, t: dict):
    """Function (x, y) -> difference-image PSF stamp centred at the true sub-pixel position."""
    p = t["params"]
    if "psf" in meta:
        which = meta["psf"]
        return lambda x, y: simulate.true_psf(which, p["direction"], x, y, p["n"]), f"true {which} PSF"
    with fits.open(rundir / "psf.fits") as hdul:
        cube = np.asarray(hdul[0].data, np.float64)
        grid = np.c_[hdul[1].data["x"], hdul[1].data["y"]]

    def at(x, y):
        st = cube[common.nearest_node(grid, x, y)]
        return common.shift_stamp(st / st.sum(), x - round(x), y - round(y))
    return at, "method's difference PSF, Fourier-shifted to the true position"


def catalogue_scores(rundir: Path, tr: pd.DataFrame, n: int) -> dict | None:
    """diffim-style catalogue (sources.csv): found, false positives, psfFlux ratio."""
    f = rundir / "sources.csv"
    if not f.exists():
        return None
    src = pd.read_csv(f)
    if len(src) == 0:
        return dict(n_sources=0, found=0, fp=0, flux_ratio=None, fp_list=[])
    inside = src.x.between(EDGE, n - EDGE) & src.y.between(EDGE, n - EDGE)
    src = src[inside].reset_index(drop=True)
    d, j = cKDTree(np.c_[tr.x, tr.y]).query(np.c_[src.x, src.y])
    hit = d <= MATCH
    found = np.zeros(len(tr), bool); found[j[hit]] = True
    ratio = src.psfFlux[hit].to_numpy() / tr.flux_adu.to_numpy()[j[hit]]
    strong = tr.snr_inj.to_numpy()[j[hit]] >= 10
    fp = src[~hit]
    cols = [c for c in ("x", "y", "psfFlux", "snr", "isDipole") if c in fp.columns]
    return dict(n_sources=int(len(src)), found=int(found.sum()), fp=int(len(fp)),
                fn=int(np.sum(~found & (tr.snr_inj >= 8))),
                flux_ratio=float(np.median(ratio[strong])) if strong.any() else None,
                fp_list=fp[cols].head(50).to_dict("records"))


def _pixel_class_at(classes: dict, t: dict, x: int, y: int) -> str:
    for name in ("bright_core", "star_rich", "star_free"):
        if classes[name][y, x]:
            return name
    return "other"


def score(pairdir: Path, rundir: Path, t: dict | None = None, classes: dict | None = None) -> dict:
    """All scores of one method run (see README.md for the definitions)."""
    pairdir, rundir = Path(pairdir), Path(rundir)
    t = t or common.load_truth(pairdir)
    classes = classes or pixel_classes(t)
    meta = json.loads((rundir / "meta.json").read_text())
    diff = common.read_image(rundir / "diff.fits")
    sig = common.read_image(rundir / "significance.fits")
    tr = t["transients"]
    sigma, sigma_src = expected_sigma(pairdir, rundir, meta, t)
    ratio = diff / sigma
    noise = {c: robust_std(ratio[classes[c]]) for c in ("star_free", "star_rich", "bright_core")}
    det = detections(sig, classes["inner"], tr)
    snr_meas = measured_snr(sig, tr)
    renorm = robust_std(sig[classes["star_free"]])
    strong = (tr.snr_inj >= 10).to_numpy()
    eff = snr_meas[strong] / tr.snr_inj[strong].to_numpy()
    out = dict(noise_ratio=noise, noise_expected_from=sigma_src,
               found=int(det["found"].sum()), n_transients=int(len(tr)),
               fn=int(np.sum(~det["found"] & (tr.snr_inj >= 8).to_numpy())),
               fp=len(det["fps"]),
               snr_eff=float(np.median(eff)), snr_eff_err=bootstrap_median_std(eff),
               snr_eff_renorm=float(np.median(snr_meas[strong] / renorm / tr.snr_inj[strong])),
               sig_star_free_std=renorm)
    out["fp_list"] = [dict(fp, pixel_class=_pixel_class_at(classes, t, fp["x"], fp["y"]))
                      for fp in det["fps"][:50]]
    missed = tr[~det["found"] & (tr.snr_inj >= 8).to_numpy()]
    out["fn_list"] = missed[["x", "y", "snr_inj", "kind", "in_cluster"]].head(50).to_dict("records")
    if meta.get("unit_noise_diff"):
        out.update(flux_ratio=None, flux_note="D not on a flux scale")
    else:
        at, src = psf_provider(pairdir, rundir, meta, t)
        ratios = forced_flux(diff, tr, at)[strong] / tr.flux_adu.to_numpy()[strong]
        # per transient (S/N >= 10, in transient order): the table pairs them with the oracle's
        out.update(flux_ratio=float(np.median(ratios)), flux_ratio_err=bootstrap_median_std(ratios),
                   flux_ratios=[float(r) for r in ratios], flux_psf=src)
    cat = catalogue_scores(rundir, tr, t["n"])
    if cat is not None:
        out["catalogue"] = cat
    return out
