"""Scoring DIASources against simulated truth (pure functions on tables).

Conventions: positions in degrees (ICRS), fluxes in nJy, AB magnitude
``31.4 - 2.5 log10(flux / nJy)``; angular offsets reported in milliarcseconds.

Expected difference flux
------------------------
A difference image is the visit minus a template coadd, so a variable's flux
in visit ``v`` is ``f_v - T`` with ``T`` the weighted mean of its flux over the
coadd's inputs: ``T = sum_i w_i f_i / sum_i w_i`` over the visits ``i`` of the
band that were ``included`` in the coadd (weights from ``coadd_inputs``).

* A visit's weight is taken from the patch that contains the source when a
  ``source_patches`` table (``id, patch``) is given; otherwise the visit's
  weights are averaged over the patches it entered (so a single-patch sky map
  needs nothing).  Weights of several detectors of one visit are averaged too
  (a source falls on one detector).
* When a ``coverage`` table (``visit, id``, optionally ``covered``) is given,
  only the visits whose image covers the source enter its template (a
  dithered visit that missed the source added nothing to the coadd there).
* ``leave_one_out=True`` removes the visit itself from its own template (the
  workflow's ``diff.leave_one_out``), renormalising the remaining weights.

Scoring
-------
:func:`evaluate_detections` matches, visit by visit, each observable variable
to the nearest DIASource within ``radius_arcsec`` (one-to-one, closest pairs
first) and labels every DIASource with no variable within the radius a false
positive.  :func:`score` summarises per band and overall: completeness in bins
of the expected S/N (``|expected flux| / noise``) and of the magnitude of
``|expected flux|``, the S/N where completeness crosses 50 % (linear
interpolation in log S/N between bin centres), false positives per visit and
per square degree (split by whether a static star brighter than
``bright_star_mag`` lies within ``bright_star_radius_arcsec``), flux bias,
pull width and astrometric offsets.  No thresholds are applied: it returns
numbers.
"""

from __future__ import annotations

import logging
import math

import numpy as np
import pandas as pd
from scipy.spatial import cKDTree

from .stats import robust_std

logger = logging.getLogger(__name__)

#: Default bin edges of the expected S/N (|expected flux| / noise).
SNR_BINS = (0.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0, 8.0, 10.0, 12.0, 15.0, 20.0, 30.0, 50.0,
            100.0, np.inf)
#: Default bin edges of the magnitude of |expected difference flux| (AB).
MAG_BINS = tuple(np.arange(16.0, 27.01, 0.5))
AB_ZERO_NJY = 31.4


def _require(table: pd.DataFrame, columns, name: str) -> None:
    missing = [c for c in columns if c not in table.columns]
    if missing:
        raise ValueError(f"the {name} table lacks the column(s) {missing}; it has "
                         f"{list(table.columns)}")


def unit_vectors(ra, dec) -> np.ndarray:
    """Unit vectors (n, 3) of positions in degrees."""
    ra = np.radians(np.asarray(ra, dtype=float))
    dec = np.radians(np.asarray(dec, dtype=float))
    return np.column_stack([np.cos(dec) * np.cos(ra), np.cos(dec) * np.sin(ra), np.sin(dec)])


def chord(radius_arcsec: float) -> float:
    """Chord length on the unit sphere of an angle given in arcsec."""
    return 2.0 * math.sin(math.radians(radius_arcsec / 3600.0) / 2.0)


def chord_to_arcsec(d) -> np.ndarray:
    """Inverse of :func:`chord` (arrays allowed)."""
    return np.degrees(2.0 * np.arcsin(np.clip(np.asarray(d, float) / 2.0, 0, 1))) * 3600.0


def visit_area_deg2(shape, pixel_scale_arcsec: float) -> float:
    """Sky area (deg^2) of an image of ``shape = (ny, nx)`` pixels."""
    ny, nx = shape
    return float(ny * nx * (pixel_scale_arcsec / 3600.0) ** 2)


def flux_to_mag(flux_njy) -> np.ndarray:
    """AB magnitude of ``|flux|`` (nJy); NaN for zero flux."""
    f = np.abs(np.asarray(flux_njy, dtype=float))
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(f > 0, AB_ZERO_NJY - 2.5 * np.log10(np.where(f > 0, f, 1.0)), np.nan)


# --------------------------------------------------------------------------
# expected difference flux
# --------------------------------------------------------------------------

def template_weights(coadd_inputs: pd.DataFrame, source_patches) -> pd.DataFrame:
    """Rows (band, visit, weight[, id]) of the included coadd inputs."""
    _require(coadd_inputs, ["band", "patch", "visit", "included", "weight"], "coadd_inputs")
    inc = coadd_inputs[coadd_inputs["included"].astype(bool) & (coadd_inputs["weight"] > 0)]
    per_patch = inc.groupby(["band", "patch", "visit"], as_index=False)["weight"].mean()
    if source_patches is None:
        return per_patch.groupby(["band", "visit"], as_index=False)["weight"].mean()
    _require(source_patches, ["id", "patch"], "source_patches")
    return per_patch.merge(source_patches[["id", "patch"]], on="patch")[
        ["band", "visit", "id", "weight"]]


def expected_difference_flux(variable_fluxes: pd.DataFrame, coadd_inputs: pd.DataFrame,
                             coverage: pd.DataFrame | None = None, *,
                             source_patches: pd.DataFrame | None = None,
                             leave_one_out: bool = False) -> pd.DataFrame:
    """Expected flux of every variable in every visit's difference image.

    Parameters
    ----------
    variable_fluxes : DataFrame
        Truth: ``visit, band, id, flux_njy`` (true flux, nJy) for every variable
        at every visit (extra columns such as ``mjd`` are kept).
    coadd_inputs : DataFrame
        ``band, patch, visit, included, weight`` (CONTRACT.md).
    coverage : DataFrame, optional
        ``visit, id`` pairs whose image covers the source (rows with a false
        ``covered`` column are ignored); restricts each source's template to
        the visits that saw it.
    source_patches : DataFrame, optional
        ``id, patch``: the patch whose coadd is the source's template.
    leave_one_out : bool
        Leave a visit out of its own template.

    Returns
    -------
    DataFrame
        ``variable_fluxes`` plus ``template_flux_njy`` and
        ``expected_flux_njy = flux_njy - template_flux_njy`` (NaN where no
        template input is left).
    """
    _require(variable_fluxes, ["visit", "band", "id", "flux_njy"], "variable_fluxes")
    w = template_weights(coadd_inputs, source_patches)
    keys = ["band", "visit"] + (["id"] if "id" in w.columns else [])
    inputs = variable_fluxes.merge(w, on=keys, how="inner")
    if coverage is not None:
        _require(coverage, ["visit", "id"], "coverage")
        cov = coverage[coverage["covered"].astype(bool)] if "covered" in coverage else coverage
        inputs = inputs.merge(cov[["visit", "id"]].drop_duplicates(), on=["visit", "id"])
    inputs = inputs.assign(wf=inputs["weight"] * inputs["flux_njy"])
    sums = inputs.groupby(["band", "id"])[["weight", "wf"]].sum().rename(
        columns={"weight": "sw", "wf": "swf"})
    out = variable_fluxes.merge(sums, left_on=["band", "id"], right_index=True, how="left")
    own = inputs[["visit", "id", "weight", "wf"]].rename(columns={"weight": "ow", "wf": "owf"})
    out = out.merge(own, on=["visit", "id"], how="left").fillna({"ow": 0.0, "owf": 0.0})
    sw, swf = out["sw"].fillna(0.0), out["swf"].fillna(0.0)
    if leave_one_out:
        sw, swf = sw - out["ow"], swf - out["owf"]
    total = out["sw"].fillna(0.0)
    ok = (total > 0) & (sw > 1e-9 * total)      # some template weight is left
    out["template_flux_njy"] = np.where(ok, swf / np.where(ok, sw, 1.0), np.nan)
    out["expected_flux_njy"] = out["flux_njy"] - out["template_flux_njy"]
    return out.drop(columns=["sw", "swf", "ow", "owf"])


def box_weight_sum(weight_sum: np.ndarray, x, y, *, radius: int,
                   rtol: float = 1e-3) -> np.ndarray:
    """The coadd's input weight sum around each source, where it is uniform.

    Parameters
    ----------
    weight_sum : ndarray (ny, nx)
        Sum of the weights of the inputs used in each coadd pixel.
    x, y : array-like
        0-based pixel positions of the sources in the coadd.
    radius : int
        Half-width of the box (pixels), about the PSF's FWHM.
    rtol : float
        Largest spread of the weight sum over the box, relative to its maximum.

    Returns
    -------
    ndarray of float
        The box's largest weight sum; NaN where it varies across the box (the
        template is a mixture of input sets across the PSF) or where the box
        leaves the coadd.
    """
    x, y = np.asarray(x, float), np.asarray(y, float)
    ny, nx = weight_sum.shape
    out = np.full(x.shape, np.nan)
    for i, (xi, yi) in enumerate(zip(x, y)):
        if not (np.isfinite(xi) and np.isfinite(yi)):
            continue
        ix, iy = int(round(xi)), int(round(yi))
        if ix < radius or iy < radius or ix >= nx - radius or iy >= ny - radius:
            continue
        box = weight_sum[iy - radius:iy + radius + 1, ix - radius:ix + radius + 1]
        lo, hi = float(np.nanmin(box)), float(np.nanmax(box))
        if hi > 0 and hi - lo <= rtol * hi:
            out[i] = hi
    return out


def inputs_from_weight_sum(total: float, weights, *, rtol: float = 1e-3,
                           max_inputs: int = 16) -> np.ndarray | None:
    """The one subset of the inputs whose weights add up to a coadd pixel's weight sum.

    A coadd pixel's ``WEIGHTSUM`` is the sum of the weights of the inputs it
    used.  When exactly one subset of the candidate inputs matches it (to
    ``rtol`` of ``total``), that subset is the set of inputs the pixel used.

    Parameters
    ----------
    total : float
        The pixel's weight sum.
    weights : array-like
        Weights of the candidate inputs (the included inputs covering it).
    rtol : float
        Relative tolerance of the match.
    max_inputs : int
        More candidates than this are not searched (2**n subsets); None is
        returned.

    Returns
    -------
    ndarray of bool or None
        Which candidates were used; None when no subset, or more than one,
        matches.
    """
    w = np.asarray(weights, float)
    if not (np.isfinite(total) and total > 0) or w.size == 0 or w.size > max_inputs:
        return None
    members = (np.arange(1 << w.size)[:, None] >> np.arange(w.size)) & 1
    hit = np.flatnonzero(np.abs(members @ w - total) <= rtol * total)
    return members[hit[0]].astype(bool) if hit.size == 1 else None


def restrict_coverage(coverage: pd.DataFrame, box_sums: pd.DataFrame,
                      coadd_inputs: pd.DataFrame, *, rtol: float = 1e-3):
    """Coverage reduced to the inputs each source's template really holds.

    Parameters
    ----------
    coverage : DataFrame
        ``visit, id, covered``: which visits' images cover which variables.
    box_sums : DataFrame
        ``band, id, weight_sum``: the coadd's uniform weight sum around each
        variable (:func:`box_weight_sum`; NaN where it is not uniform).
    coadd_inputs : DataFrame
        ``band, patch, visit, included, weight`` (CONTRACT.md).
    rtol : float
        Relative tolerance of the weight comparisons.

    Returns
    -------
    coverage : DataFrame
        The input with ``covered`` false for the visits that the coadd
        dropped at a source, where the dropped set is known: the weight sum is
        uniform around the source and exactly one subset of the covering
        inputs adds up to it (:func:`inputs_from_weight_sum`).
    known : DataFrame
        ``band, id, template_known``: the template of the source is the
        weighted mean over its (restricted) covering inputs.
    """
    _require(coverage, ["visit", "id", "covered"], "coverage")
    _require(box_sums, ["band", "id", "weight_sum"], "box_sums")
    weights = template_weights(coadd_inputs, None)          # band, visit, weight
    cov = coverage[coverage["covered"].astype(bool)][["visit", "id"]].drop_duplicates()
    cand = cov.merge(weights, on="visit")
    dropped, known = [], []
    groups = {k: g for k, g in cand.groupby(["band", "id"])}
    for band, sid, total in box_sums[["band", "id", "weight_sum"]].itertuples(index=False):
        g = groups.get((band, sid))
        if g is None or not np.isfinite(total):
            known.append(False)
            continue
        w = g["weight"].to_numpy(float)
        if abs(w.sum() - total) <= rtol * w.sum():
            known.append(True)
            continue
        used = inputs_from_weight_sum(total, w, rtol=rtol)
        known.append(used is not None)
        if used is not None:
            dropped += [(v, sid) for v in g["visit"].to_numpy()[~used]]
    out = coverage.copy()
    if dropped:
        gone = pd.MultiIndex.from_tuples(dropped, names=["visit", "id"])
        hit = pd.MultiIndex.from_frame(out[["visit", "id"]]).isin(gone)
        out["covered"] = out["covered"].astype(bool) & ~hit
    return out, box_sums[["band", "id"]].assign(template_known=known)


# --------------------------------------------------------------------------
# matching
# --------------------------------------------------------------------------

def _pairs_within(ra1, dec1, ra2, dec2, radius_arcsec: float):
    """All pairs (i, j, sep_arcsec) with separation <= radius, sorted by separation."""
    if len(ra1) == 0 or len(ra2) == 0:
        return np.zeros(0, int), np.zeros(0, int), np.zeros(0)
    t1, t2 = cKDTree(unit_vectors(ra1, dec1)), cKDTree(unit_vectors(ra2, dec2))
    sdm = t1.sparse_distance_matrix(t2, chord(radius_arcsec), output_type="ndarray")
    order = np.lexsort((sdm["j"], sdm["i"], sdm["v"]))
    return sdm["i"][order], sdm["j"][order], chord_to_arcsec(sdm["v"][order])


def isolated(ra, dec, radius_arcsec: float) -> np.ndarray:
    """True for the positions with no other position within ``radius_arcsec``.

    A variable blended with another one has a difference flux that is the
    sum of both changes, which the per-source truth model does not predict.
    """
    ra, dec = np.asarray(ra, float), np.asarray(dec, float)
    i, j, _ = _pairs_within(ra, dec, ra, dec, radius_arcsec)
    out = np.ones(ra.size, bool)
    out[i[i != j]] = False
    return out


def greedy_one_to_one(i, j, n_i: int) -> np.ndarray:
    """Greedy matching of sorted candidate pairs: ``match[i] = j`` or -1.

    Pairs must be sorted by distance; each ``i`` and each ``j`` is used at most
    once, closest pairs first.
    """
    match = np.full(n_i, -1, dtype=np.int64)
    used = set()
    for a, b in zip(i, j):
        if match[a] < 0 and b not in used:
            match[a] = b
            used.add(b)
    return match


def match_to_truth(dia: pd.DataFrame, truth: pd.DataFrame, *,
                   radius_arcsec: float = 1.0) -> pd.DataFrame:
    """Match truth positions to DIASources of the same visit, one to one.

    Parameters
    ----------
    dia : DataFrame
        DIASources: ``diaSourceId, visit, ra, dec`` (degrees).
    truth : DataFrame
        Truth positions per visit: ``visit, id, ra, dec``.
    radius_arcsec : float
        Match radius.

    Returns
    -------
    DataFrame
        ``truth`` (same row order) plus ``diaSourceId`` (-1 when unmatched)
        and ``sep_arcsec`` (NaN when unmatched).
    """
    _require(dia, ["diaSourceId", "visit", "ra", "dec"], "DIASource")
    _require(truth, ["visit", "id", "ra", "dec"], "truth")
    if not radius_arcsec > 0:
        raise ValueError(f"radius_arcsec must be positive, got {radius_arcsec}")
    out = truth.reset_index(drop=True).copy()
    ids = np.full(len(out), -1, dtype=np.int64)
    sep = np.full(len(out), np.nan)
    dia_by_visit = {v: g for v, g in dia.groupby("visit")}
    for visit, t in out.groupby("visit"):
        d = dia_by_visit.get(visit)
        if d is None:
            continue
        i, j, s = _pairs_within(t["ra"], t["dec"], d["ra"], d["dec"], radius_arcsec)
        m = greedy_one_to_one(i, j, len(t))
        hit = m >= 0
        rows = t.index.to_numpy()[hit]
        ids[rows] = d["diaSourceId"].to_numpy()[m[hit]]
        sep_of = {(a, b): c for a, b, c in zip(i, j, s)}
        sep[rows] = [sep_of[(a, m[a])] for a in np.flatnonzero(hit)]
    out["diaSourceId"] = ids
    out["sep_arcsec"] = sep
    return out


def near_any(ra, dec, ref_ra, ref_dec, radius_arcsec: float) -> np.ndarray:
    """True where a position has a reference position within ``radius_arcsec``."""
    ra = np.asarray(ra, float)
    if len(ra) == 0 or len(ref_ra) == 0:
        return np.zeros(len(ra), dtype=bool)
    tree = cKDTree(unit_vectors(ref_ra, ref_dec))
    d, _ = tree.query(unit_vectors(ra, dec), k=1, distance_upper_bound=chord(radius_arcsec))
    return np.isfinite(d)


# --------------------------------------------------------------------------
# per-source evaluation
# --------------------------------------------------------------------------

def _noise_per_row(expected: pd.DataFrame, dia: pd.DataFrame, visit_noise) -> np.ndarray:
    """1-sigma difference-flux noise (nJy) of each expected row.

    ``expected["noise_njy"]`` when present, else ``visit_noise`` (``visit,
    noise_njy``), else the median ``psfFluxErr`` of the visit's DIASources.
    """
    if "noise_njy" in expected.columns:
        return expected["noise_njy"].to_numpy(float)
    if visit_noise is None:
        visit_noise = (dia.groupby("visit")["psfFluxErr"].median().rename("noise_njy")
                       .reset_index())
        logger.info("expected S/N uses the median psfFluxErr of each visit's DIASources")
    _require(visit_noise, ["visit", "noise_njy"], "visit_noise")
    m = expected[["visit"]].merge(visit_noise[["visit", "noise_njy"]], on="visit", how="left")
    return m["noise_njy"].to_numpy(float)


def _bright_stars(static_sources, band: str, mag: float):
    """(ra, dec) arrays of static stars brighter than ``mag`` in ``band``."""
    if static_sources is None or f"{band}_mag" not in static_sources.columns:
        return np.zeros(0), np.zeros(0)
    s = static_sources
    if "kind" in s.columns:
        s = s[s["kind"] == "star"]
    s = s[s[f"{band}_mag"] < mag]
    return s["ra"].to_numpy(float), s["dec"].to_numpy(float)


def _label_dia(dia, expected, static_sources, radius_arcsec, bright_mag, bright_radius):
    """DIASources with ``isFalsePositive`` and ``nearBrightStar`` columns."""
    d = dia.reset_index(drop=True).copy()
    fp = np.ones(len(d), dtype=bool)
    bright = np.zeros(len(d), dtype=bool)
    exp_by_visit = {v: g for v, g in expected.groupby("visit")}
    for visit, g in d.groupby("visit"):
        t = exp_by_visit.get(visit)
        if t is not None:
            fp[g.index] = ~near_any(g["ra"], g["dec"], t["ra"], t["dec"], radius_arcsec)
    for band, g in d.groupby("band"):
        sra, sdec = _bright_stars(static_sources, band, bright_mag)
        bright[g.index] = near_any(g["ra"], g["dec"], sra, sdec, bright_radius)
    d["isFalsePositive"] = fp
    d["nearBrightStar"] = bright
    return d


def evaluate_detections(dia: pd.DataFrame, expected: pd.DataFrame,
                        static_sources: pd.DataFrame | None = None, *,
                        radius_arcsec: float = 1.0, visit_noise: pd.DataFrame | None = None,
                        bright_star_mag: float = 18.0, bright_star_radius_arcsec: float = 5.0
                        ) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Per-source truth table and labelled DIASources.

    Parameters
    ----------
    dia : DataFrame
        DIASources (CONTRACT.md columns).
    expected : DataFrame
        One row per (visit, variable): ``visit, band, id, ra, dec,
        expected_flux_njy``; optional ``noise_njy`` (1-sigma noise of a PSF
        flux at that position, nJy), ``observable`` (bool: the position has
        usable difference pixels; rows with False are not counted in
        completeness but still protect nearby DIASources from being called
        false positives), ``forcedFlux``/``forcedFluxErr`` (forced photometry
        at the true position, nJy).
    static_sources : DataFrame, optional
        ``ra, dec, kind, {band}_mag`` of the static sky (for ``nearBrightStar``).
    radius_arcsec : float
        Match radius.
    visit_noise : DataFrame, optional
        ``visit, noise_njy`` used when ``expected`` has no ``noise_njy``.
    bright_star_mag, bright_star_radius_arcsec : float
        A DIASource is near a bright star when a static star brighter than
        ``bright_star_mag`` (AB, same band) is within this radius.

    Returns
    -------
    truth : DataFrame
        Observable rows of ``expected`` with ``expected_snr``, ``expected_mag``,
        ``detected``, ``diaSourceId``, ``sep_arcsec``, ``psfFlux``,
        ``psfFluxErr``, ``dra_mas``, ``ddec_mas`` (DIASource minus truth;
        ``dra`` includes ``cos(dec)``).
    dia : DataFrame
        ``dia`` plus ``isFalsePositive`` and ``nearBrightStar``.
    """
    _require(expected, ["visit", "band", "id", "ra", "dec", "expected_flux_njy"], "expected")
    _require(dia, ["diaSourceId", "visit", "band", "ra", "dec", "psfFlux", "psfFluxErr"],
             "DIASource")
    exp = expected.reset_index(drop=True).copy()
    exp["noise_njy"] = _noise_per_row(exp, dia, visit_noise)
    labelled = _label_dia(dia, exp, static_sources, radius_arcsec, bright_star_mag,
                          bright_star_radius_arcsec)
    obs = exp["observable"].astype(bool) if "observable" in exp else np.ones(len(exp), bool)
    obs &= np.isfinite(exp["expected_flux_njy"].to_numpy(float))
    truth = match_to_truth(dia, exp[obs].reset_index(drop=True), radius_arcsec=radius_arcsec)
    with np.errstate(divide="ignore", invalid="ignore"):
        truth["expected_snr"] = np.abs(truth["expected_flux_njy"]) / truth["noise_njy"]
    truth["expected_mag"] = flux_to_mag(truth["expected_flux_njy"])
    truth["detected"] = truth["diaSourceId"] >= 0
    cols = ["diaSourceId", "psfFlux", "psfFluxErr", "ra", "dec"]
    m = truth[["diaSourceId"]].merge(dia[cols], on="diaSourceId", how="left",
                                     suffixes=("", "_dia"))
    truth["psfFlux"] = m["psfFlux"].to_numpy()
    truth["psfFluxErr"] = m["psfFluxErr"].to_numpy()
    cosd = np.cos(np.radians(truth["dec"].to_numpy(float)))
    dra = ((m["ra"].to_numpy(float) - truth["ra"].to_numpy(float) + 180.0) % 360.0) - 180.0
    truth["dra_mas"] = dra * cosd * 3.6e6
    truth["ddec_mas"] = (m["dec"].to_numpy(float) - truth["dec"].to_numpy(float)) * 3.6e6
    return truth, labelled


# --------------------------------------------------------------------------
# summaries
# --------------------------------------------------------------------------

def _num(x):
    """A JSON-safe float: None for NaN or infinity."""
    x = float(x)
    return x if math.isfinite(x) else None


#: Sampling error of :func:`robust_std` for n Gaussian values: this / sqrt(n)
#: times the value (the MAD's asymptotic efficiency is 37 %).
ROBUST_STD_ERROR = 1.1664


def robust_std_error(values) -> float:
    """Standard error of :func:`robust_std` of the finite values, Gaussian case."""
    v = np.asarray(values, float)
    v = v[np.isfinite(v)]
    return float(ROBUST_STD_ERROR * robust_std(v) / np.sqrt(v.size)) if v.size else float("nan")


def completeness_curve(values, detected, edges) -> dict:
    """Completeness in bins of ``values`` (e.g. expected S/N or magnitude).

    Returns lists ``edges``, ``n``, ``n_detected``, ``completeness`` (None for
    an empty bin) and ``centre`` (median value in the bin, None if empty).
    """
    v = np.asarray(values, float)
    det = np.asarray(detected, bool)
    edges = np.asarray(edges, float)
    idx = np.digitize(v, edges) - 1
    n, nd, comp, centre = [], [], [], []
    for k in range(len(edges) - 1):
        sel = (idx == k) & np.isfinite(v)
        n.append(int(sel.sum()))
        nd.append(int(det[sel].sum()))
        comp.append(nd[-1] / n[-1] if n[-1] else None)
        centre.append(float(np.median(v[sel])) if n[-1] else None)
    return {"edges": [_num(e) for e in edges], "n": n, "n_detected": nd,
            "completeness": comp, "centre": centre}


def crossing_snr(curve: dict, level: float = 0.5) -> float | None:
    """S/N where a completeness-vs-S/N curve first rises through ``level``.

    Linear interpolation in log S/N between the median S/N of adjacent
    non-empty bins; the first bin's centre if it is already above ``level``;
    None if the curve never reaches it.
    """
    pts = [(c, x) for c, x in zip(curve["completeness"], curve["centre"])
           if c is not None and x is not None and x > 0]
    for k, (c, x) in enumerate(pts):
        if c >= level:
            if k == 0:
                return x
            c0, x0 = pts[k - 1]
            f = (level - c0) / (c - c0)
            return float(np.exp(np.log(x0) + f * (np.log(x) - np.log(x0))))
    return None


def _completeness(truth: pd.DataFrame, snr_bins, mag_bins, snr_thresholds) -> dict:
    snr = truth["expected_snr"].to_numpy(float)
    det = truth["detected"].to_numpy(bool)
    curve = completeness_curve(snr, det, snr_bins)
    ge = {}
    for t in snr_thresholds:
        sel = snr >= t
        ge[f"{t:g}"] = _num(det[sel].mean()) if sel.any() else None
    return {"n_truth": int(len(truth)), "n_detected": int(det.sum()),
            "vs_snr": curve, "vs_mag": completeness_curve(truth["expected_mag"], det, mag_bins),
            "snr50": crossing_snr(curve), "at_snr_ge": ge}


def _fp_block(fp: pd.DataFrame, visits: pd.DataFrame) -> dict:
    n_vis = len(visits)
    area = float(visits["area_deg2"].sum())
    per_visit = fp.groupby("visit").size().reindex(visits["visit"], fill_value=0)
    return {"n": int(len(fp)), "per_visit": _num(len(fp) / n_vis) if n_vis else None,
            "per_deg2": _num(len(fp) / area) if area > 0 else None,
            "max_per_visit": int(per_visit.max()) if n_vis else 0}


def _false_positives(dia: pd.DataFrame, visits: pd.DataFrame) -> dict:
    fp = dia[dia["isFalsePositive"]]
    flags = [c for c in ("pixelFlags_edge", "pixelFlags_saturated", "pixelFlags_bad")
             if c in fp.columns]
    clean = ~fp[flags].any(axis=1) if flags else np.ones(len(fp), bool)
    per_visit = fp.groupby("visit").size().reindex(visits["visit"], fill_value=0)
    out = _fp_block(fp, visits)
    out.update({"near_bright_stars": _fp_block(fp[fp["nearBrightStar"]], visits),
                "elsewhere": _fp_block(fp[~fp["nearBrightStar"]], visits),
                "unflagged": _fp_block(fp[clean], visits),
                "n_dia_sources": int(len(dia)),
                "by_visit": {str(int(v)): int(n) for v, n in per_visit.items()}})
    return out


def _flux(truth: pd.DataFrame, bias_min_snr: float, pull_min_snr: float) -> dict:
    t = truth[truth["detected"]]
    exp_f, snr = t["expected_flux_njy"].to_numpy(float), t["expected_snr"].to_numpy(float)
    with np.errstate(divide="ignore", invalid="ignore"):
        frac = (t["psfFlux"].to_numpy(float) - exp_f) / exp_f
        pull = (t["psfFlux"].to_numpy(float) - exp_f) / t["psfFluxErr"].to_numpy(float)
    b, p = snr > bias_min_snr, snr >= pull_min_snr
    out = {"bias_min_snr": bias_min_snr, "n_bias": int(b.sum()),
           "bias_median": _num(np.median(frac[b])) if b.any() else None,
           "pull_min_snr": pull_min_snr, "n_pull": int(p.sum()),
           "pull_median": _num(np.nanmedian(pull[p])) if p.any() else None,
           "pull_robust_std": _num(robust_std(pull[p])) if p.any() else None,
           "pull_robust_std_err": _num(robust_std_error(pull[p])) if p.any() else None}
    if {"forcedFlux", "forcedFluxErr"} <= set(truth.columns):
        with np.errstate(divide="ignore", invalid="ignore"):
            fpull = ((truth["forcedFlux"] - truth["expected_flux_njy"])
                     / truth["forcedFluxErr"]).to_numpy(float)
        out["forced_pull_median"] = _num(np.nanmedian(fpull)) if np.isfinite(fpull).any() else None
        out["forced_pull_robust_std"] = _num(robust_std(fpull))
        out["forced_pull_robust_std_err"] = _num(robust_std_error(fpull))
        out["n_forced"] = int(np.isfinite(fpull).sum())
    return out


def _astrometry(truth: pd.DataFrame, min_snr: float) -> dict:
    t = truth[truth["detected"] & (truth["expected_snr"] >= min_snr)]
    dra, ddec = t["dra_mas"].to_numpy(float), t["ddec_mas"].to_numpy(float)
    if len(t) == 0:
        return {"min_snr": min_snr, "n": 0, "median_dra_mas": None, "median_ddec_mas": None,
                "rms_mas": None}
    return {"min_snr": min_snr, "n": int(len(t)), "median_dra_mas": _num(np.median(dra)),
            "median_ddec_mas": _num(np.median(ddec)),
            "rms_mas": _num(np.sqrt(np.mean(dra**2 + ddec**2)))}


def _visit_areas(visit_table: pd.DataFrame) -> pd.DataFrame:
    _require(visit_table, ["visit", "band"], "visit")
    v = visit_table.copy()
    if "area_deg2" not in v.columns:
        _require(v, ["ny", "nx", "pixel_scale"], "visit (needs area_deg2 or ny, nx, pixel_scale)")
        v["area_deg2"] = [visit_area_deg2((a, b), s) for a, b, s in
                          zip(v["ny"], v["nx"], v["pixel_scale"])]
    return v.groupby(["visit", "band"], as_index=False)["area_deg2"].sum()


def summarise(truth: pd.DataFrame, dia: pd.DataFrame, visits: pd.DataFrame, *,
              snr_bins=SNR_BINS, mag_bins=MAG_BINS, snr_thresholds=(5.5, 10.0),
              bias_min_snr: float = 20.0, pull_min_snr: float = 10.0,
              astrometry_min_snr: float = 10.0) -> dict:
    """Scores of one subset (outputs of :func:`evaluate_detections`).

    With a ``clean`` column in ``truth`` (rows whose expected flux the truth
    model gets right: :func:`restrict_coverage` and :func:`isolated`),
    ``flux_clean`` repeats the flux scores on those rows alone.
    """
    out = {"n_visits": int(len(visits)),
           "completeness": _completeness(truth, snr_bins, mag_bins, snr_thresholds),
           "false_positives": _false_positives(dia, visits),
           "flux": _flux(truth, bias_min_snr, pull_min_snr),
           "astrometry": _astrometry(truth, astrometry_min_snr)}
    if "clean" in truth.columns:
        clean = truth[truth["clean"].astype(bool)]
        out["flux_clean"] = dict(_flux(clean, bias_min_snr, pull_min_snr),
                                 n_rows=int(len(clean)), n_rows_all=int(len(truth)))
    return out


def score(dia: pd.DataFrame, expected: pd.DataFrame, static_sources: pd.DataFrame | None,
          visit_table: pd.DataFrame, *, radius_arcsec: float = 1.0,
          visit_noise: pd.DataFrame | None = None, bright_star_mag: float = 18.0,
          bright_star_radius_arcsec: float = 5.0, **summary_options) -> dict:
    """Score DIASources against truth, per band and overall (JSON-serializable).

    Parameters
    ----------
    dia, expected, static_sources, radius_arcsec, visit_noise, bright_star_mag,
    bright_star_radius_arcsec
        As in :func:`evaluate_detections`.
    visit_table : DataFrame
        The processed visits: ``visit, band`` and either ``area_deg2`` or
        ``ny, nx, pixel_scale`` (pixels, arcsec/pixel), one row per
        (visit, detector).  DIASources and truth of other visits are ignored.
    **summary_options
        ``snr_bins``, ``mag_bins``, ``snr_thresholds`` (completeness for
        expected S/N >= each), ``bias_min_snr`` (flux bias uses expected S/N
        above it), ``pull_min_snr`` and ``astrometry_min_snr`` (to limit the
        detection-selection bias of faint matches); see :func:`summarise`.

    Returns
    -------
    dict
        ``{"overall": {...}, "bands": {band: {...}}, "settings": {...}}``; each
        block holds ``completeness`` (``vs_snr``, ``vs_mag``, ``snr50``,
        ``at_snr_ge``), ``false_positives``, ``flux``, ``astrometry``.
    """
    visits = _visit_areas(visit_table)
    keep = set(visits["visit"].tolist())
    dia = dia[dia["visit"].isin(keep)]
    expected = expected[expected["visit"].isin(keep)]
    truth, labelled = evaluate_detections(
        dia, expected, static_sources, radius_arcsec=radius_arcsec, visit_noise=visit_noise,
        bright_star_mag=bright_star_mag, bright_star_radius_arcsec=bright_star_radius_arcsec)
    out = {"settings": {"radius_arcsec": radius_arcsec, "bright_star_mag": bright_star_mag,
                        "bright_star_radius_arcsec": bright_star_radius_arcsec},
           "overall": summarise(truth, labelled, visits, **summary_options), "bands": {}}
    for band in sorted(visits["band"].unique()):
        out["bands"][str(band)] = summarise(truth[truth["band"] == band],
                                            labelled[labelled["band"] == band],
                                            visits[visits["band"] == band], **summary_options)
    return out
