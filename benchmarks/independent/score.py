#!/usr/bin/env python
"""Score diffim products against the truth of the independent simulator.

Usage:  python score.py --data DIR --results OUTDIR [--json out.json]

Reads only the contract products (OUTDIR/dia_sources.parquet,
visit_status.parquet, coadd_inputs.parquet) and the truth written by
simulate.py in this directory (DIR/truth/*.csv).  Does not import diffim.

Definitions (see README.md):

* template flux of a variable in a band = sum_k w_k f_k / sum_k w_k over the
  (visit, detector) images that landed on the variable (truth) and were
  included in that band's coadd.  w_k is the mean `weight` of the image over
  the coadd_inputs rows (patches) where it is `included`.  This ignores which
  patch the variable is in (patch-independent approximation); weights are
  relative within a patch, so images included in several patches with
  different normalisations are averaged.
  With --template loo the image's own contribution is left out of that mean
  (leave-one-out); --template clip also drops, iteratively, images whose true
  flux is more than 3 sigma (model noise) and more than 100 % of the median
  away from the weighted median (a crude, epoch-level stand-in for per-pixel
  outlier clipping in the coadd). All three are printed; the chosen one
  drives the main table and the lists.
* expected difference flux = true flux at the visit - template flux.
* noise: psfFluxErr of the matched DIASource if matched, otherwise a per-image
  model err^2 = a + b * (true flux of the variable in that image), with
  b = 1 / (electrons per nJy) from the truth (the source's own Poisson noise)
  and a = 10th percentile of (psfFluxErr^2 - b |psfFlux|) over that image's
  DIASources (>= 3 of them; DIASources on bright-star residuals carry inflated
  errors), else the truth sky-noise floor (sky + read noise) x Neff of
  the PSF scaled by the band's median ratio of the two. A host galaxy's own
  Poisson noise is not included.
* expected S/N = |expected diff flux| / noise.
* a DIASource matches a variable if it is in the same (visit, detector) and
  within 1.0 arcsec; nearest first, each DIASource used once.
* completeness rows: ok visits, >= 10 px from the detector edge, not within
  8 px of a known defect (NaN, hot pixel, bad/dead column, saturation),
  template flux defined.
* false positive: DIASource of an ok image farther than 1.5 arcsec from every
  variable.
"""
import argparse
import json
import math
import os
import sys

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
from scipy import optimize
from scipy.spatial import cKDTree

sys.dont_write_bytecode = True  # keep the benchmark directory free of __pycache__
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from simulate import CameraWCS, VisitPSF, kolmogorov_mog, render  # noqa: E402  (our own truth models)

MATCH_RADIUS = 1.0  # arcsec
FP_RADIUS = 1.5
BRIGHT_STAR_MAG = 17.0
BRIGHT_STAR_RADIUS = 5.0
MID_STAR_MAG = 19.0  # "elsewhere" sub-class: within 6" of a 17-19 mag star
MID_STAR_RADIUS = 6.0
TEMPLATE_MODES = ("coadd", "loo", "clip")
CLIP_REL = 1.0  # clip template: an epoch must also deviate by > CLIP_REL x |median|

DIA_SCHEMA = {
    "diaSourceId": "int64", "visit": "int64", "detector": "int32", "band": "string",
    "midpointMjdTai": "float64", "ra": "float64", "dec": "float64", "x": "float64", "y": "float64",
    "psfFlux": "float64", "psfFluxErr": "float64", "snr": "float64",
    "isNegative": "bool", "isDipole": "bool",
    "pixelFlags_edge": "bool", "pixelFlags_saturated": "bool", "pixelFlags_bad": "bool",
}
COADD_SCHEMA = {"band": "string", "patch": "string", "visit": "int", "detector": "int",
                "included": "bool", "weight": "float64", "reason": "string"}
STATUS_SCHEMA = {"file": "string", "visit": "int", "detector": "int", "band": "string",
                 "status": "string", "reason": "string"}

VIOLATIONS = []


def violation(msg):
    VIOLATIONS.append(msg)
    print(f"!!! CONTRACT VIOLATION: {msg}")


def _type_ok(pa_type, want):
    import pyarrow as pa
    t = pa_type
    if pa.types.is_dictionary(t):
        t = t.value_type
    if want == "string":
        return pa.types.is_string(t) or pa.types.is_large_string(t) or (
            hasattr(pa.types, "is_string_view") and pa.types.is_string_view(t))
    if want == "int":
        return pa.types.is_integer(t)
    if want == "bool":
        return pa.types.is_boolean(t)
    return t == {"float64": pa.float64(), "int64": pa.int64(), "int32": pa.int32()}[want]


def read_checked(path, schema, name):
    if not os.path.exists(path):
        violation(f"{name}: file missing ({path})")
        return None
    try:
        tab = pq.read_table(path)
    except Exception as exc:  # noqa: BLE001
        violation(f"{name}: unreadable parquet ({exc})")
        return None
    fields = {f.name: f.type for f in tab.schema}
    for col, want in schema.items():
        if col not in fields:
            violation(f"{name}: missing column {col!r}")
        elif not _type_ok(fields[col], want):
            violation(f"{name}: column {col!r} has type {fields[col]}, contract wants {want}")
    df = tab.to_pandas()
    for col, want in schema.items():
        if col in df and want in ("bool",) and df[col].isna().any():
            violation(f"{name}: column {col!r} has nulls")
    return df


def tangent(ra, dec, ra0, dec0):
    """Small-field tangent-plane coordinates in arcsec (east, north)."""
    a, d = np.radians(ra), np.radians(dec)
    a0, d0 = math.radians(ra0), math.radians(dec0)
    cosc = math.sin(d0) * np.sin(d) + math.cos(d0) * np.cos(d) * np.cos(a - a0)
    xi = np.cos(d) * np.sin(a - a0) / cosc
    eta = (math.cos(d0) * np.sin(d) - math.sin(d0) * np.cos(d) * np.cos(a - a0)) / cosc
    return np.degrees(xi) * 3600, np.degrees(eta) * 3600


def sky_noise_floor(v, kolmo):
    """Truth-predicted variance (nJy^2) of a PSF flux on sky: (sky + RN^2) Neff / (e/nJy)^2."""
    psf = VisitPSF(kolmo, v.fwhm_arcsec, float(v.get("pixel_scale", 0.26)), np.random.default_rng(0), 1000.0)
    img = np.zeros((121, 121))
    comps = psf.covariances(0.0, 0.0)
    render(img, 60.0, 60.0, [a for a, _ in comps], [c[0] for _, c in comps], flux_tol=1e-8)
    neff = 1.0 / np.sum(img**2)
    return (v.sky_e + v.rdnoise**2) * neff / v.e_per_njy**2


def noise_models(vis, ds_by_img, kolmo):
    """Per image (a, b): variance of a PSF flux = a + b * (science flux of the source).

    b = 1 / (electrons per nJy) (Poisson noise of the source itself, truth);
    a = 10th percentile of (psfFluxErr^2 - b |psfFlux|) over the image's DIASources
    when it has >= 3 of them, else the truth sky-noise floor scaled by the band's median ratio
    of the two (the pipeline's template noise and PSF matching included that way).
    """
    out, ratio = {}, {}
    for _, v in vis.iterrows():
        key = (int(v.visit), int(v.detector))
        b = 1.0 / v.e_per_njy
        pred = sky_noise_floor(v, kolmo)
        g = ds_by_img.get(key)
        a = None
        if g is not None and len(g) >= 3:
            # low quantile: DIASources on bright-star residuals carry inflated errors
            a = float(np.percentile(g.psfFluxErr.values**2 - b * np.abs(g.psfFlux.values), 10))
            a = max(a, 0.25 * pred)
            ratio.setdefault(v.band, []).append(a / pred)
        out[key] = [a, b, pred, v.band]
    for key, (a, b, pred, band) in out.items():
        if a is None:
            out[key][0] = pred * float(np.median(ratio.get(band, [1.0])))
    return {k: (v[0], v[1]) for k, v in out.items()}


def weighted_median(x, w):
    o = np.argsort(x)
    c = np.cumsum(w[o])
    return float(x[o][np.searchsorted(c, 0.5 * c[-1])])


def logistic_s50(snr, det):
    """MLE of completeness = 1 / (1 + exp(-(ln s - ln s50) / w))."""
    ok = np.isfinite(snr) & (snr > 0)
    s, d = np.log(snr[ok]), det[ok].astype(float)
    if len(s) < 5 or d.sum() == 0 or d.sum() == len(d):
        return float("nan"), float("nan")

    def nll(p):
        mu, lw = p
        z = np.clip((s - mu) / math.exp(lw), -50, 50)
        pr = np.clip(1 / (1 + np.exp(-z)), 1e-9, 1 - 1e-9)
        return -np.sum(d * np.log(pr) + (1 - d) * np.log(1 - pr))

    best = min((optimize.minimize(nll, [mu0, lw0], method="Nelder-Mead")
                for mu0 in (math.log(3), math.log(6), math.log(12)) for lw0 in (-1.5, -0.5)),
               key=lambda r: r.fun)
    return float(math.exp(best.x[0])), float(math.exp(best.x[1]))


def robust_std(x):
    x = np.asarray(x, float)
    x = x[np.isfinite(x)]
    if len(x) == 0:
        return float("nan")
    return float(1.4826 * np.median(np.abs(x - np.median(x))))


def flux_metrics(e, exp_col, snr_col):
    """Completeness and flux accuracy of eligible truth rows e."""
    res = {}
    snr = e[snr_col]
    for thr in (10.0, 5.5):
        s = e[snr >= thr]
        res[f"compl_snr{thr:g}"] = float(s.matched.mean()) if len(s) else float("nan")
        res[f"n_snr{thr:g}"] = len(s)
    res["snr50"], res["snr50_width"] = logistic_s50(snr.values, e.matched.values)
    m20 = e[e.matched & (snr > 20)]
    res["flux_ratio_med_snr20"] = float(np.median(m20.psfFlux / m20[exp_col])) if len(m20) else float("nan")
    res["n_snr20"] = len(m20)
    m10 = e[e.matched & (snr >= 10)]
    pulls = (m10.psfFlux - m10[exp_col]) / m10.psfFluxErr
    res["pull_median_snr10"] = float(np.median(pulls)) if len(pulls) else float("nan")
    res["pull_rstd_snr10"] = robust_std(pulls)
    res["wrong_sign_snr10"] = int(np.sum(np.sign(m10.psfFlux) != np.sign(m10[exp_col])))
    return res


def fmt(v, spec=".3g"):
    if v is None or (isinstance(v, float) and not np.isfinite(v)):
        return "-"
    return format(v, spec) if not isinstance(v, str) else v


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", required=True)
    ap.add_argument("--results", required=True)
    ap.add_argument("--json")
    ap.add_argument("--template", choices=TEMPLATE_MODES, default="coadd",
                    help="template flux for the main table: weighted mean over all included images "
                         "(coadd, default), without the image's own contribution (loo), or loo with "
                         "epoch-level 3-sigma outlier clipping (clip); the others are shown below it")
    a = ap.parse_args()
    T = os.path.join(a.data, "truth")
    vis = pd.read_csv(os.path.join(T, "visits.csv"))
    tv = pd.read_csv(os.path.join(T, "variables.csv"))
    meta = pd.read_csv(os.path.join(T, "variables_meta.csv"))
    stars = pd.read_csv(os.path.join(T, "stars.csv"))
    gals = pd.read_csv(os.path.join(T, "galaxies.csv"))
    arts = pd.read_csv(os.path.join(T, "artifacts.csv"))
    out = {}

    print("=" * 78)
    print(f"independent scorer: data={a.data} results={a.results}")
    print("=" * 78)
    print("\n-- contract checks")
    ds = read_checked(os.path.join(a.results, "dia_sources.parquet"), DIA_SCHEMA, "dia_sources")
    st = read_checked(os.path.join(a.results, "visit_status.parquet"), STATUS_SCHEMA, "visit_status")
    ci = read_checked(os.path.join(a.results, "coadd_inputs.parquet"), COADD_SCHEMA, "coadd_inputs")
    if ds is None:
        ds = pd.DataFrame({c: pd.Series(dtype="float64") for c in DIA_SCHEMA})
    if st is None:
        st = pd.DataFrame(columns=list(STATUS_SCHEMA))
    if ci is None:
        ci = pd.DataFrame(columns=list(COADD_SCHEMA))
    if len(ds) and ds.diaSourceId.duplicated().any():
        violation(f"dia_sources: diaSourceId not unique ({int(ds.diaSourceId.duplicated().sum())} duplicates)")
    for col in ("ra", "dec", "x", "y", "psfFlux", "psfFluxErr", "snr", "midpointMjdTai"):
        if col in ds and len(ds) and (~np.isfinite(ds[col].astype(float))).any():
            print(f"  warning: dia_sources.{col} has {int((~np.isfinite(ds[col].astype(float))).sum())} non-finite values")
    if "psfFluxErr" in ds and len(ds) and (ds.psfFluxErr <= 0).any():
        print(f"  warning: {int((ds.psfFluxErr <= 0).sum())} DIASources with psfFluxErr <= 0")
    ds["band"] = ds["band"].astype(str)
    bands_truth = sorted(vis.band.unique())
    bad_band = set(ds.band.unique()) - set(bands_truth)
    if bad_band:
        violation(f"dia_sources: band values {sorted(bad_band)} are not stripped lower-case bands {bands_truth}")
    # one row per input file
    files = set(os.path.basename(f) for f in vis.file)
    st_files = set(os.path.basename(str(f)) for f in st.file)
    if files - st_files:
        violation(f"visit_status: {len(files - st_files)} input files have no row: {sorted(files - st_files)[:4]}")
    if len(st) != len(files):
        print(f"  warning: visit_status has {len(st)} rows for {len(files)} input files")
    if len(st) and not set(st.status.unique()) <= {"ok", "failed"}:
        violation(f"visit_status: status values {sorted(set(st.status.unique()))}")
    if len(st) and ((st.status == "ok") & (st.reason.astype(str) != "")).any():
        violation("visit_status: ok rows with a non-empty reason")
    if len(st) and ((st.status == "failed") & (st.reason.astype(str) == "")).any():
        violation("visit_status: failed rows with an empty reason")
    if len(ci):
        if ((~ci.included.astype(bool)) & (ci.weight != 0)).any():
            violation("coadd_inputs: excluded rows with non-zero weight")
        if ((ci.included.astype(bool)) & (ci.reason.astype(str) != "")).any():
            violation("coadd_inputs: included rows with a non-empty reason")
    # midpoint times, visit/detector keys
    vkey = vis.set_index(["visit", "detector"])
    if len(ds):
        keys = pd.MultiIndex.from_arrays([ds.visit.astype(int), ds.detector.astype(int)])
        unknown = ~keys.isin(vkey.index)
        if unknown.any():
            violation(f"dia_sources: {int(unknown.sum())} rows with (visit, detector) not in the inputs")
        mid = vkey.reindex(keys).mjd_mid.values
        dt = np.abs(ds.midpointMjdTai.values - mid) * 86400
        print(f"  midpointMjdTai vs truth (MJD-OBS + EXPTIME/2): max |diff| = {np.nanmax(dt):.3f} s")
        if np.nanmax(dt) > 1.0:
            violation(f"dia_sources: midpointMjdTai off by up to {np.nanmax(dt):.1f} s")
        out["midpoint_max_diff_s"] = float(np.nanmax(dt))
    print(f"  dia_sources rows: {len(ds)}; violations so far: {len(VIOLATIONS)}"
          + ("" if VIOLATIONS else " (schema, dtypes, unique ids OK)"))

    # ------------------------------------------------------------ visit status
    print("\n-- visit status")
    st["base"] = [os.path.basename(str(f)) for f in st.file]
    vis["base"] = [os.path.basename(f) for f in vis.file]
    vis = vis.merge(st[["base", "status", "reason"]], on="base", how="left")
    vis["status"] = vis.status.fillna("missing")
    for _, r in vis.iterrows():
        if r.status != "ok":
            print(f"  {r.status.upper()}: visit {r.visit} det {r.detector} band {r.band} "
                  f"(seeing {r.fwhm_arcsec:.2f}\", {r.pixel_type}, {r.layout}, {r.wcs_type}): {r.reason}")
    okimg = set(zip(vis.loc[vis.status == "ok", "visit"], vis.loc[vis.status == "ok", "detector"]))

    # ------------------------------------------------------------ truth geometry
    cams = {(int(r.visit), int(r.detector)): CameraWCS(r.boresight_ra, r.boresight_dec, r.rot_deg, float(r.get("pixel_scale", 0.26)),
                                                        (r.det_ox, r.det_oy), r.k1, r.p1, r.p2)
            for _, r in vis.iterrows()}
    ra0, dec0 = float(meta.ra.mean()), float(meta.dec.mean())

    # ------------------------------------------------------------ template flux
    tv["key"] = list(zip(tv.visit, tv.detector))
    if len(ci):
        cinc = ci[ci.included.astype(bool)]
        wmap = cinc.groupby(["band", "visit", "detector"]).weight.mean()
        ninc = cinc.groupby("band").apply(lambda g: len(set(zip(g.visit, g.detector))))
        print("\n-- coadd inputs: included images per band: "
              + ", ".join(f"{b}={n}" for b, n in ninc.items())
              + f"; excluded rows: {int((~ci.included.astype(bool)).sum())}")
        for _, r in ci[~ci.included.astype(bool)].drop_duplicates(["band", "visit", "detector", "reason"]).iterrows():
            print(f"     excluded {r.band} visit {r.visit} det {r.detector} patch {r.patch}: {r.reason}")
    else:
        wmap = pd.Series(dtype=float)
    tv["w"] = [float(wmap.get((b, v, d), 0.0)) for b, v, d in zip(tv.band, tv.visit, tv.detector)]
    # ------------------------------------------------------------ matching
    tv["matched"] = False
    for c in ("psfFlux", "psfFluxErr", "snr", "ds_ra", "ds_dec", "ds_x", "ds_y", "sep"):
        tv[c] = np.nan
    tv["isNegative"] = False
    tv["isDipole"] = False
    ds["is_fp"] = False
    ds_by_img = {k: g for k, g in ds.groupby([ds.visit.astype(int), ds.detector.astype(int)])} if len(ds) else {}
    for key, g in tv.groupby("key"):
        if key not in ds_by_img:
            continue
        d = ds_by_img[key]
        te, tn = tangent(g.ra.values, g.dec.values, ra0, dec0)
        de, dn = tangent(d.ra.values, d.dec.values, ra0, dec0)
        sep = np.hypot(te[:, None] - de[None, :], tn[:, None] - dn[None, :])
        pairs = sorted((sep[i, j], i, j) for i, j in zip(*np.where(sep < MATCH_RADIUS)))
        used_t, used_d = set(), set()
        for s, i, j in pairs:
            if i in used_t or j in used_d:
                continue
            used_t.add(i)
            used_d.add(j)
            ti, dr = g.index[i], d.iloc[j]
            tv.loc[ti, ["matched", "psfFlux", "psfFluxErr", "snr", "ds_ra", "ds_dec", "ds_x", "ds_y", "sep",
                        "isNegative", "isDipole"]] = [True, dr.psfFlux, dr.psfFluxErr, dr.snr, dr.ra, dr.dec,
                                                      dr.x, dr.y, s, bool(dr.isNegative), bool(dr.isDipole)]

    # ------------------------------------------------------------ noise model
    img_models = noise_models(vis, ds_by_img, kolmogorov_mog())
    tv["img_ok"] = [k in okimg for k in tv.key]
    # noise of an unmatched variable: per-image model at its true flux
    tv["model_noise"] = [math.sqrt(img_models[k][0] + img_models[k][1] * max(f, 0.0)) if k in img_models else np.nan
                         for k, f in zip(tv.key, tv.flux_njy)]

    # ------------------------------------------------------------ template flux
    # coadd: weighted mean over every included image covering the variable;
    # loo:   the same without the image's own contribution (leave-one-out);
    # clip:  loo, after iteratively dropping images whose flux is > 3 sigma
    #        (model noise) and > CLIP_REL x |median| from the weighted median
    #        (epoch-level outlier clip)
    for mode in TEMPLATE_MODES:
        tv[f"template_{mode}"] = np.nan
    for _, g in tv.groupby(["id", "band"]):
        w, f, sg = g.w.values, g.flux_njy.values, g.model_noise.values
        sw, swf = w.sum(), (w * f).sum()
        tv.loc[g.index, "template_coadd"] = swf / sw if sw > 0 else np.nan
        rest = sw - w
        with np.errstate(invalid="ignore", divide="ignore"):
            tv.loc[g.index, "template_loo"] = np.where(rest > 0, (swf - w * f) / rest, np.nan)
        clip = []
        for i in range(len(g)):
            keep = (w > 0) & (np.arange(len(g)) != i)
            if not keep.any():
                clip.append(np.nan)
                continue
            for _ in range(10):
                med = weighted_median(f[keep], w[keep])
                dev = np.abs(f - med)
                new_keep = (w > 0) & (np.arange(len(g)) != i) & (
                    (dev <= 3 * np.nan_to_num(sg, nan=np.inf)) | (dev <= CLIP_REL * abs(med)))
                if not new_keep.any() or (new_keep == keep).all():
                    break
                keep = new_keep
            clip.append(float(np.sum(w[keep] * f[keep]) / w[keep].sum()) if new_keep.any() else float(med))
        tv.loc[g.index, "template_clip"] = clip
    for mode in TEMPLATE_MODES:
        sfx = "" if mode == a.template else f"_{mode}"
        tv["template" + sfx] = tv[f"template_{mode}"]
        tv["expected" + sfx] = tv.flux_njy - tv[f"template_{mode}"]
        tv["noise" + sfx] = np.where(tv.matched & (tv.psfFluxErr > 0), tv.psfFluxErr, tv.model_noise)
        tv["exp_snr" + sfx] = np.abs(tv["expected" + sfx]) / tv["noise" + sfx]
        tv["eligible" + sfx] = tv.img_ok & (tv.edge_dist >= 10) & (~tv.near_defect.astype(bool)) \
            & np.isfinite(tv["template" + sfx]) & np.isfinite(tv["exp_snr" + sfx])
    alt_modes = [m for m in TEMPLATE_MODES if m != a.template]

    # ------------------------------------------------------------ false positives
    var_e, var_n = tangent(meta.ra.values, meta.dec.values, ra0, dec0)
    vtree = cKDTree(np.c_[var_e, var_n])
    gal_e, gal_n = tangent(gals.ra.values, gals.dec.values, ra0, dec0)
    gtree = cKDTree(np.c_[gal_e, gal_n])
    sta_e, sta_n = tangent(stars.ra.values, stars.dec.values, ra0, dec0)
    if len(ds):
        de, dn = tangent(ds.ra.values, ds.dec.values, ra0, dec0)
        dvar, _ = vtree.query(np.c_[de, dn])
        ds["is_fp"] = (dvar > FP_RADIUS) & np.array([k in okimg for k in zip(ds.visit.astype(int), ds.detector.astype(int))])
        ds["fp_class"] = ""
        # true pixel position of each DIASource from its ra/dec (truth WCS)
        ds["tx"], ds["ty"] = np.nan, np.nan
        for key, g in ds_by_img.items():
            if key in cams:
                x, y = cams[key].sky2pix(g.ra.values, g.dec.values)
                ds.loc[g.index, "tx"] = x
                ds.loc[g.index, "ty"] = y
        for b in bands_truth:
            bright = stars[f"{b}_mag"].values < BRIGHT_STAR_MAG
            btree = cKDTree(np.c_[sta_e[bright], sta_n[bright]])
            ftree = cKDTree(np.c_[sta_e[~bright], sta_n[~bright]])
            mid = (~bright) & (stars[f"{b}_mag"].values < MID_STAR_MAG)
            mtree = cKDTree(np.c_[sta_e[mid], sta_n[mid]])
            sel = np.where(ds.is_fp.values & (ds.band.values == b))[0]
            for i in sel:
                p = (de[i], dn[i])
                r = ds.iloc[i]
                cls = None
                if btree.query(p)[0] < BRIGHT_STAR_RADIUS:
                    cls = "bright_star"
                elif mtree.query(p)[0] < MID_STAR_RADIUS:
                    cls = f"star_{BRIGHT_STAR_MAG:g}-{MID_STAR_MAG:g}"
                else:
                    a_ = arts[(arts.visit == r.visit) & (arts.detector == r.detector)]
                    ddx = np.maximum(np.maximum(a_.x0.values - r.tx, r.tx - a_.x1.values), 0)
                    ddy = np.maximum(np.maximum(a_.y0.values - r.ty, r.ty - a_.y1.values), 0)
                    dd = np.hypot(ddx, ddy)
                    if len(dd) and dd.min() < 3.0:
                        cls = "artifact:" + a_.kind.values[int(np.argmin(dd))]
                    elif bool(r.pixelFlags_edge) or min(r.tx, r.ty, vkey.loc[(r.visit, r.detector)].nx - 1 - r.tx,
                                                         vkey.loc[(r.visit, r.detector)].ny - 1 - r.ty) < 5:
                        cls = "edge"
                    else:
                        dg, jg = gtree.query(p)
                        gg = gals.iloc[jg]
                        if dg < max(2.0, 1.5 * gg.re_disk) and gg[f"{b}_mag"] < 23.5:
                            cls = "galaxy"
                        elif ftree.query(p)[0] < 2.0:
                            cls = "faint_star"
                        else:
                            cls = "other"
                ds.iloc[i, ds.columns.get_loc("fp_class")] = cls
        # pixel-grid convention check: pipeline x, y vs truth WCS of pipeline ra, dec
        dxy = np.c_[ds.x - ds.tx, ds.y - ds.ty]
        out["xy_minus_truthwcs_median_px"] = [float(np.nanmedian(dxy[:, 0])), float(np.nanmedian(dxy[:, 1]))]
        out["xy_minus_truthwcs_p95_px"] = float(np.nanpercentile(np.hypot(dxy[:, 0], dxy[:, 1]), 95))

    # ------------------------------------------------------------ summary per band
    rows = []
    for b in bands_truth + ["all"]:
        vb = vis if b == "all" else vis[vis.band == b]
        t = tv if b == "all" else tv[tv.band == b]
        d = ds if b == "all" else ds[ds.band == b]
        e = t[t.eligible]
        res = dict(band=b, images=len(vb), images_ok=int((vb.status == "ok").sum()),
                   images_failed=int((vb.status != "ok").sum()),
                   n_dia=len(d), truth_rows=len(t), eligible=len(e),
                   lost_in_failed=int((~t.img_ok).sum()), no_template=int((~np.isfinite(t.template)).sum()))
        res.update(flux_metrics(e, "expected", "exp_snr"))
        m10 = e[e.matched & (e.exp_snr >= 10)]
        # the same flux metrics with the other template definitions
        for mode in alt_modes:
            altm = flux_metrics(t[t[f"eligible_{mode}"]], f"expected_{mode}", f"exp_snr_{mode}")
            res.update({f"{mode}_{k}": v for k, v in altm.items()})
        cosd = np.cos(np.radians(m10.dec))
        dra = (m10.ds_ra - m10.ra) * cosd * 3.6e6
        ddec = (m10.ds_dec - m10.dec) * 3.6e6
        res["dra_mas"] = float(np.median(dra)) if len(m10) else float("nan")
        res["ddec_mas"] = float(np.median(ddec)) if len(m10) else float("nan")
        res["astrom_rstd_mas"] = robust_std(np.r_[dra - np.median(dra), ddec - np.median(ddec)]) if len(m10) else float("nan")
        res["dx_px"] = float(np.median(m10.ds_x - m10.x)) if len(m10) else float("nan")
        res["dy_px"] = float(np.median(m10.ds_y - m10.y)) if len(m10) else float("nan")
        fp = d[d.is_fp] if len(d) else d
        nok = max(res["images_ok"], 1)
        res["fp_total"] = int(len(fp))
        res["fp_per_image"] = len(fp) / nok
        if len(fp):
            cl = fp.fp_class.value_counts()
            res["fp_bright_star_per_image"] = float(cl.get("bright_star", 0)) / nok
            res["fp_elsewhere_per_image"] = float(len(fp) - cl.get("bright_star", 0)) / nok
            res["fp_classes"] = {k: int(v) for k, v in cl.items()}
            res["fp_negative"] = int(fp.isNegative.sum())
            res["fp_dipole"] = int(fp.isDipole.sum())
        else:
            res["fp_bright_star_per_image"] = res["fp_elsewhere_per_image"] = 0.0
            res["fp_classes"] = {}
        rows.append(res)
    out["summary"] = rows

    print(f"\n-- summary (template = '{a.template}'; expected S/N = |true - template flux| / noise; see README)")
    hdr = ["metric"] + [r["band"] for r in rows]
    lines = [
        ("images ok / failed", [f"{r['images_ok']} / {r['images_failed']}" for r in rows]),
        ("DIASources", [str(r["n_dia"]) for r in rows]),
        ("truth rows / eligible", [f"{r['truth_rows']} / {r['eligible']}" for r in rows]),
        ("  lost in failed images", [str(r["lost_in_failed"]) for r in rows]),
        ("  no template coverage", [str(r["no_template"]) for r in rows]),
        ("completeness S/N>=10 (n)", [f"{fmt(r['compl_snr10'], '.3f')} ({r['n_snr10']})" for r in rows]),
        ("completeness S/N>=5.5 (n)", [f"{fmt(r['compl_snr5.5'], '.3f')} ({r['n_snr5.5']})" for r in rows]),
        ("S/N at 50% completeness", [fmt(r["snr50"], ".2f") for r in rows]),
        ("median psfFlux/expected S/N>20 (n)", [f"{fmt(r['flux_ratio_med_snr20'], '.3f')} ({r['n_snr20']})" for r in rows]),
        ("pull median, S/N>=10", [fmt(r["pull_median_snr10"], ".2f") for r in rows]),
        ("pull robust std, S/N>=10", [fmt(r["pull_rstd_snr10"], ".2f") for r in rows]),
        ("wrong flux sign, S/N>=10", [str(r["wrong_sign_snr10"]) for r in rows]),
    ]
    for m in alt_modes:
        lines += [
            (f"with the '{m}' template:", ["" for r in rows]),
            ("  completeness S/N>=10 (n)", [f"{fmt(r[m + '_compl_snr10'], '.3f')} ({r[m + '_n_snr10']})" for r in rows]),
            ("  completeness S/N>=5.5 (n)", [f"{fmt(r[m + '_compl_snr5.5'], '.3f')} ({r[m + '_n_snr5.5']})" for r in rows]),
            ("  S/N at 50% completeness", [fmt(r[m + "_snr50"], ".2f") for r in rows]),
            ("  median psfFlux/expected S/N>20 (n)", [f"{fmt(r[m + '_flux_ratio_med_snr20'], '.3f')} ({r[m + '_n_snr20']})" for r in rows]),
            ("  pull median / robust std, S/N>=10", [f"{fmt(r[m + '_pull_median_snr10'], '.2f')} / {fmt(r[m + '_pull_rstd_snr10'], '.2f')}" for r in rows]),
        ]
    lines += [
        ("astrometry dRA*cosd / dDec (mas)", [f"{fmt(r['dra_mas'], '.0f')} / {fmt(r['ddec_mas'], '.0f')}" for r in rows]),
        ("astrometry robust scatter (mas)", [fmt(r["astrom_rstd_mas"], ".0f") for r in rows]),
        ("pipeline x-xtrue / y-ytrue (px)", [f"{fmt(r['dx_px'], '.2f')} / {fmt(r['dy_px'], '.2f')}" for r in rows]),
        ("false positives per ok image", [fmt(r["fp_per_image"], ".1f") for r in rows]),
        (f"  near star <{BRIGHT_STAR_MAG:g} mag (5\")", [fmt(r["fp_bright_star_per_image"], ".1f") for r in rows]),
        ("  elsewhere", [fmt(r["fp_elsewhere_per_image"], ".1f") for r in rows]),
    ]
    w0 = max(len(l[0]) for l in lines) + 2
    w1 = max(14, max(len(v) for _, vals in lines for v in vals) + 2)
    print("".join([hdr[0].ljust(w0)] + [h.rjust(w1) for h in hdr[1:]]))
    for name, vals in lines:
        print(name.ljust(w0) + "".join(v.rjust(w1) for v in vals))
    allr = rows[-1]
    if allr["fp_classes"]:
        print("  false-positive classes (all bands): "
              + ", ".join(f"{k}={v}" for k, v in sorted(allr["fp_classes"].items(), key=lambda kv: -kv[1])))
        print(f"  false positives negative: {allr.get('fp_negative', 0)}, dipole: {allr.get('fp_dipole', 0)}")

    # completeness in bins of expected S/N
    e = tv[tv.eligible]
    print("\n-- completeness vs expected S/N (all bands, eligible rows)")
    edges = [0, 2, 3.5, 5.5, 8, 12, 20, 40, 80, 1e9]
    cb = []
    for lo, hi in zip(edges[:-1], edges[1:]):
        s = e[(e.exp_snr >= lo) & (e.exp_snr < hi)]
        frac = s.matched.mean() if len(s) else float("nan")
        cb.append(dict(lo=lo, hi=hi, n=len(s), matched=int(s.matched.sum()), completeness=float(frac)))
        print(f"  S/N [{lo:g}, {hi:g}): n={len(s):3d} matched={int(s.matched.sum()):3d} completeness={fmt(frac, '.2f')}")
    out["completeness_bins"] = cb

    # per image table
    print("\n-- per image")
    print(f"  {'visit':>7} {'det':>3} {'band':>4} {'status':>6} {'seeing':>6} {'nDIA':>5} {'vars':>4} {'det10':>6} "
          f"{'FP':>4} {'FPbright':>8} {'FPelse':>6}  top FP classes")
    per = []
    for _, r in vis.iterrows():
        key = (int(r.visit), int(r.detector))
        d = ds_by_img.get(key)
        d = ds.loc[d.index] if d is not None else ds.iloc[0:0]
        t = tv[(tv.visit == r.visit) & (tv.detector == r.detector) & tv.eligible]
        t10 = t[t.exp_snr >= 10]
        fp = d[d.is_fp] if len(d) else d
        nb = int((fp.fp_class == "bright_star").sum()) if len(fp) else 0
        top = fp.fp_class.value_counts().head(3).to_dict() if len(fp) else {}
        per.append(dict(visit=int(r.visit), detector=int(r.detector), band=r.band, status=r.status,
                        n_dia=len(d), n_var10=len(t10), det10=int(t10.matched.sum()), fp=len(fp),
                        fp_bright=nb, fp_else=len(fp) - nb, fp_top=top))
        print(f"  {r.visit:>7} {r.detector:>3} {r.band:>4} {r.status:>6} {r.fwhm_arcsec:>6.2f} {len(d):>5} "
              f"{len(t):>4} {int(t10.matched.sum()):>2}/{len(t10):<3} {len(fp):>4} {nb:>8} {len(fp) - nb:>6}  "
              + ", ".join(f"{k}={v}" for k, v in top.items()))
    out["per_image"] = per

    # the worst flux outliers
    m = tv[tv.eligible & tv.matched & (tv.exp_snr >= 10)].copy()
    if len(m):
        m["pull"] = (m.psfFlux - m.expected) / m.psfFluxErr
        worst = m.reindex(m.pull.abs().sort_values(ascending=False).index).head(8)
        print("\n-- largest flux pulls among matched S/N>=10")
        for _, r in worst.iterrows():
            print(f"  id {r.id:>5} {r.kind:>9}/{r.subtype:<9} visit {r.visit} det {r.detector}: expected {r.expected:9.0f} "
                  f"psfFlux {r.psfFlux:9.0f} +- {r.psfFluxErr:6.0f} (pull {r.pull:+6.1f}) template {r.template:8.0f}")
    missed = tv[tv.eligible & ~tv.matched & (tv.exp_snr >= 10)]
    if len(missed):
        print("\n-- missed with expected S/N >= 10")
        for _, r in missed.iterrows():
            print(f"  id {r.id:>5} {r.kind:>9}/{r.subtype:<9} visit {r.visit} det {r.detector} x={r.x:7.1f} y={r.y:7.1f}: "
                  f"expected {r.expected:9.0f} nJy, S/N {r.exp_snr:6.1f}")

    out["violations"] = VIOLATIONS
    print("\n-- contract violations: " + ("none" if not VIOLATIONS else f"{len(VIOLATIONS)}"))
    for v in VIOLATIONS:
        print(f"  !!! {v}")
    if a.json:
        tv.drop(columns=["key"]).to_csv(os.path.splitext(a.json)[0] + "_matches.csv", index=False)
        if len(ds):  # the false positives with their class, for inspection
            ds[ds.is_fp].to_csv(os.path.splitext(a.json)[0] + "_false_positives.csv", index=False)
        with open(a.json, "w") as fh:
            json.dump(out, fh, indent=1, default=lambda o: o.item() if hasattr(o, "item") else str(o))


if __name__ == "__main__":
    main()
