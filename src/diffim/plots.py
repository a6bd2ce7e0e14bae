"""Quality-assessment figures (matplotlib, no pyplot state).

Every function takes tables or arrays and returns a
:class:`matplotlib.figure.Figure` built without ``pyplot`` (Agg canvas), so it
is safe in worker processes; the caller saves it (``fig.savefig(path)``).
Fluxes in nJy, MJD in days (TAI), image arrays ``[y, x]`` with pixel
``(0, 0)`` the centre of the first pixel.
"""

from __future__ import annotations

import logging

import numpy as np
import pandas as pd
from matplotlib.figure import Figure

from .evaluate import MAG_BINS, SNR_BINS, completeness_curve

logger = logging.getLogger(__name__)

BAND_COLORS = {"u": "tab:purple", "g": "tab:green", "r": "tab:red", "i": "tab:orange",
               "z": "tab:brown", "y": "black"}

#: (column, axis label) of the per-visit quality panels, in order.
QUALITY_PANELS = (
    ("fwhm_arcsec", "seeing FWHM (arcsec)"), ("zeropoint", "zero point (AB mag, 1 e-)"),
    ("sky_electrons", "sky (electrons / pixel)"),
    ("astrometry_rms_arcsec", "astrometric RMS (arcsec)"),
    ("n_dia_sources", "DIASources per visit"), ("noise_ratio", "diff noise ratio (meas./pred.)"),
)


def _color(band) -> str:
    return BAND_COLORS.get(str(band), "tab:blue")


def _time_column(table: pd.DataFrame) -> str:
    for col in ("midpointMjdTai", "midpoint_mjd", "mjd"):
        if col in table.columns:
            return col
    return "visit"


def plot_visit_quality(visits: pd.DataFrame) -> Figure:
    """Per-visit quality vs time: one panel per column of :data:`QUALITY_PANELS` present.

    ``visits`` has a time column (``midpointMjdTai``, ``midpoint_mjd`` or
    ``mjd``; else ``visit``), ``band`` and optionally ``status``; failed
    visits are marked with a red cross at the bottom of every panel.
    """
    panels = [p for p in QUALITY_PANELS if p[0] in visits.columns] or [("visit", "visit")]
    t = _time_column(visits)
    fig = Figure(figsize=(9, 2.0 * len(panels) + 0.5), layout="constrained")
    axes = fig.subplots(len(panels), 1, sharex=True, squeeze=False)[:, 0]
    failed = (visits["status"] != "ok") if "status" in visits.columns else \
        pd.Series(False, index=visits.index)
    for ax, (col, label) in zip(axes, panels):
        for band, g in visits[~failed].groupby("band"):
            ax.plot(g[t], g[col], "o", color=_color(band), label=f"{band}")
        if failed.any():
            ax.plot(visits.loc[failed, t], np.zeros(failed.sum()), "x", color="red", ms=9,
                    transform=ax.get_xaxis_transform(), clip_on=False, label="failed")
        ax.set_ylabel(label, fontsize=8)
    axes[0].legend(fontsize=8, ncol=6, loc="best")
    axes[-1].set_xlabel("MJD (TAI, days)" if t != "visit" else "visit")
    return fig


def _binomial_err(k: np.ndarray, n: np.ndarray) -> np.ndarray:
    """1-sigma binomial error of k/n (Wilson-like: never zero for 0 < n)."""
    p = (k + 0.5) / (n + 1.0)
    return np.sqrt(p * (1 - p) / np.maximum(n, 1))


def _completeness_panel(ax, truth, col, edges, label, log=False):
    for band, g in truth.groupby("band"):
        c = completeness_curve(g[col], g["detected"], edges)
        n, k = np.array(c["n"]), np.array(c["n_detected"])
        keep = n > 0
        x = np.array([v if v is not None else np.nan for v in c["centre"]])[keep]
        ax.errorbar(x, k[keep] / n[keep], yerr=_binomial_err(k[keep], n[keep]), fmt="o-",
                    color=_color(band), label=f"{band} ({int(n.sum())})", ms=4, capsize=2)
    ax.axhline(0.5, color="grey", lw=0.8, ls=":")
    ax.set_ylim(-0.05, 1.05)
    ax.set_xlabel(label)
    ax.set_ylabel("completeness")
    if log:
        ax.set_xscale("log")


def plot_completeness(truth: pd.DataFrame, *, snr_bins=SNR_BINS, mag_bins=MAG_BINS) -> Figure:
    """Completeness vs expected S/N and vs magnitude of |expected flux|, per band.

    ``truth``: the first output of :func:`diffim.evaluate.evaluate_detections`
    (``band, expected_snr, expected_mag, detected``).
    """
    fig = Figure(figsize=(10, 4), layout="constrained")
    a1, a2 = fig.subplots(1, 2)
    t = truth[truth["expected_snr"] > 0]
    _completeness_panel(a1, t, "expected_snr", snr_bins, "expected S/N of |difference flux|",
                        log=True)
    _completeness_panel(a2, truth, "expected_mag", mag_bins, "|expected difference flux| (AB mag)")
    a1.legend(fontsize=8, title="band (N)")
    return fig


def plot_flux_pull(truth: pd.DataFrame, *, min_snr: float = 10.0) -> Figure:
    """Histogram of ``(psfFlux - expected) / psfFluxErr`` of matched sources.

    Uses detected truth rows with expected S/N >= ``min_snr`` (fewer selection
    effects); forced-photometry pulls (``forcedFlux``, ``forcedFluxErr``) of all
    rows are overlaid when present.  A unit Gaussian is drawn for reference.
    """
    fig = Figure(figsize=(6, 4), layout="constrained")
    ax = fig.subplots()
    t = truth[truth["detected"] & (truth["expected_snr"] >= min_snr)]
    bins = np.linspace(-6, 6, 49)
    pull = ((t["psfFlux"] - t["expected_flux_njy"]) / t["psfFluxErr"]).clip(-6, 6)
    ax.hist(pull, bins=bins, density=True, histtype="stepfilled", alpha=0.5,
            label=f"DIASources, S/N >= {min_snr:g} ({len(pull)})")
    if {"forcedFlux", "forcedFluxErr"} <= set(truth.columns):
        fp = ((truth["forcedFlux"] - truth["expected_flux_njy"]) / truth["forcedFluxErr"])
        fp = fp[np.isfinite(fp)].clip(-6, 6)
        ax.hist(fp, bins=bins, density=True, histtype="step", lw=1.5,
                label=f"forced at true position ({len(fp)})")
    x = np.linspace(-6, 6, 200)
    ax.plot(x, np.exp(-x**2 / 2) / np.sqrt(2 * np.pi), "k--", lw=1, label="N(0, 1)")
    ax.set_xlabel("(measured - expected flux) / error")
    ax.set_ylabel("density")
    ax.legend(fontsize=8)
    return fig


def plot_false_positives(dia: pd.DataFrame, visits: pd.DataFrame) -> Figure:
    """False positives per visit, split near bright stars / elsewhere.

    ``dia``: labelled DIASources (second output of
    :func:`diffim.evaluate.evaluate_detections`); ``visits``: ``visit``
    (and ``band``) of every processed visit, so visits with none show zero.
    """
    fp = dia[dia["isFalsePositive"]]
    order = visits.drop_duplicates("visit").sort_values("visit")
    near = fp[fp["nearBrightStar"]].groupby("visit").size().reindex(order["visit"], fill_value=0)
    far = fp[~fp["nearBrightStar"]].groupby("visit").size().reindex(order["visit"], fill_value=0)
    fig = Figure(figsize=(max(6, 0.35 * len(order) + 2), 4), layout="constrained")
    ax = fig.subplots()
    pos = np.arange(len(order))
    ax.bar(pos, far.to_numpy(), color="tab:blue", label="elsewhere")
    ax.bar(pos, near.to_numpy(), bottom=far.to_numpy(), color="tab:orange",
           label="near bright stars")
    ax.set_xticks(pos, [str(v) for v in order["visit"]], rotation=90, fontsize=7)
    ax.set_xlabel("visit")
    ax.set_ylabel("false positives (DIASources with no variable)")
    ax.legend(fontsize=8)
    return fig


def _flux_limits(ax, lc: pd.DataFrame) -> None:
    """Y range from the fluxes and their typical error (huge errors near bad pixels are cut)."""
    f = lc["psfFlux"].to_numpy(float)
    if not np.isfinite(f).any():
        return
    pad = 3.0 * float(np.nanmedian(lc["psfFluxErr"])) + 0.05 * float(np.ptp(f) or abs(f).max())
    ax.set_ylim(min(f.min(), 0.0) - pad, max(f.max(), 0.0) + pad)


def plot_light_curves(forced: pd.DataFrame, objects: pd.DataFrame, *, n: int = 6) -> Figure:
    """Forced-photometry light curves of the ``n`` DIAObjects of largest ``maxAbsSnr``.

    ``forced``: ``diaObjectId, band, midpointMjdTai, psfFlux, psfFluxErr`` and
    optionally ``detected`` (from :func:`diffim.lightcurves.mark_detections`);
    detections are filled markers, non-detections open ones.
    """
    top = objects.sort_values(["maxAbsSnr", "diaObjectId"], ascending=[False, True]).head(n)
    ncol = 2 if len(top) > 1 else 1
    nrow = max(1, int(np.ceil(len(top) / ncol)))
    fig = Figure(figsize=(5 * ncol, 2.4 * nrow), layout="constrained")
    axes = np.atleast_1d(fig.subplots(nrow, ncol, squeeze=False).ravel())
    t0 = float(np.floor(forced["midpointMjdTai"].min())) if len(forced) else 0.0
    for ax, (_, obj) in zip(axes, top.iterrows()):
        lc = forced[forced["diaObjectId"] == obj["diaObjectId"]]
        det = lc["detected"].astype(bool) if "detected" in lc else \
            pd.Series(False, index=lc.index)
        for band, g in lc.groupby("band"):
            for sel, face in ((det[g.index], _color(band)), (~det[g.index], "none")):
                ax.errorbar(g.loc[sel, "midpointMjdTai"] - t0, g.loc[sel, "psfFlux"],
                            yerr=g.loc[sel, "psfFluxErr"], fmt="o", color=_color(band),
                            mfc=face, ms=4, capsize=2)
        ax.axhline(0, color="grey", lw=0.7)
        _flux_limits(ax, lc)
        ax.set_title(f"DIAObject {int(obj['diaObjectId'])} ({obj['ra']:.5f}, "
                     f"{obj['dec']:.5f})", fontsize=8)
        ax.set_xlabel(f"MJD - {t0:.0f} (TAI, days)", fontsize=8)
        ax.set_ylabel("difference flux (nJy)", fontsize=8)
    for ax in axes[len(top):]:
        ax.set_visible(False)
    return fig


def _cutout(image: np.ndarray, x: float, y: float, half: int) -> np.ndarray:
    """A ``(2 half + 1)^2`` cutout centred on the pixel nearest ``(x, y)``, NaN-padded."""
    ix, iy = int(np.round(x)), int(np.round(y))
    out = np.full((2 * half + 1, 2 * half + 1), np.nan)
    ny, nx = image.shape
    y0, y1, x0, x1 = max(iy - half, 0), min(iy + half + 1, ny), max(ix - half, 0), \
        min(ix + half + 1, nx)
    if y0 < y1 and x0 < x1:
        out[y0 - iy + half:y1 - iy + half, x0 - ix + half:x1 - ix + half] = image[y0:y1, x0:x1]
    return out


def _limits(a: np.ndarray, symmetric: bool) -> tuple[float, float]:
    v = a[np.isfinite(a)]
    if v.size == 0:
        return -1.0, 1.0
    if symmetric:
        m = float(np.percentile(np.abs(v), 99)) or 1.0
        return -m, m
    lo, hi = np.percentile(v, [1, 99.5])
    return float(lo), float(hi if hi > lo else lo + 1)


def plot_cutouts(science: np.ndarray, template: np.ndarray, difference: np.ndarray,
                 positions, *, size: int = 31, labels=None) -> Figure:
    """Science / template / difference cutout triplets around pixel ``positions``.

    The three arrays share one pixel grid (nJy per pixel); ``positions`` is a
    sequence of ``(x, y)``; ``size`` the cutout side (pixels, made odd).
    Science and template share one linear scale, the difference a symmetric one.
    """
    positions = list(positions)
    half = int(size) // 2
    fig = Figure(figsize=(6.5, 2.2 * max(len(positions), 1)), layout="constrained")
    axes = fig.subplots(max(len(positions), 1), 3, squeeze=False)
    for row, (x, y) in enumerate(positions):
        cuts = [_cutout(a, x, y, half) for a in (science, template, difference)]
        lo, hi = _limits(np.concatenate([cuts[0].ravel(), cuts[1].ravel()]), False)
        dlo, dhi = _limits(cuts[2], True)
        for col, (cut, name) in enumerate(zip(cuts, ("science", "template", "difference"))):
            ax = axes[row, col]
            vmin, vmax = (dlo, dhi) if col == 2 else (lo, hi)
            ax.imshow(cut, origin="lower", cmap="gray", vmin=vmin, vmax=vmax,
                      interpolation="nearest")
            ax.set_xticks([])
            ax.set_yticks([])
            if row == 0:
                ax.set_title(f"{name} (nJy/px)", fontsize=8)
        tag = labels[row] if labels is not None else f"x={x:.1f}, y={y:.1f}"
        axes[row, 0].set_ylabel(str(tag), fontsize=8)
    return fig


def _crop_finite(img: np.ndarray) -> np.ndarray:
    """The smallest box of ``img`` holding all its finite pixels (``img`` if none)."""
    ok = np.isfinite(img)
    if not ok.any():
        return img
    rows, cols = np.flatnonzero(ok.any(axis=1)), np.flatnonzero(ok.any(axis=0))
    return img[rows[0]:rows[-1] + 1, cols[0]:cols[-1] + 1]


def plot_coadd(image: np.ndarray, *, title: str = "", max_pixels: int = 800) -> Figure:
    """Thumbnail of a coadd (nJy per pixel) with an asinh stretch.

    Cropped to the box holding finite pixels, binned by block averaging
    (NaN-aware) to at most ``max_pixels`` on a side;
    the stretch is ``asinh(I / s)`` with ``s`` 3x the robust sky noise, shown
    between the 1st and 99.8th percentiles.
    """
    img = _crop_finite(np.asarray(image, dtype=float))
    b = max(1, int(np.ceil(max(img.shape) / max_pixels)))
    ny, nx = (img.shape[0] // b) * b, (img.shape[1] // b) * b
    blocks = img[:ny, :nx].reshape(ny // b, b, nx // b, b)
    finite = np.isfinite(blocks).sum(axis=(1, 3))
    sums = np.where(np.isfinite(blocks), blocks, 0.0).sum(axis=(1, 3))
    thumb = np.where(finite > 0, sums / np.maximum(finite, 1), np.nan)
    v = thumb[np.isfinite(thumb)]
    sky = float(np.median(v)) if v.size else 0.0
    noise = 1.4826 * float(np.median(np.abs(v - sky))) if v.size else 1.0
    stretched = np.arcsinh((thumb - sky) / (3 * noise if noise > 0 else 1.0))
    fig = Figure(figsize=(6, 6 * thumb.shape[0] / max(thumb.shape[1], 1) + 0.4),
                 layout="constrained")
    ax = fig.subplots()
    lo, hi = _limits(stretched, False)
    ax.imshow(stretched, origin="lower", cmap="gray_r", vmin=lo, vmax=hi,
              interpolation="nearest")
    ax.set_xlabel(f"x (binned {b}x{b} pixels, cropped)")
    ax.set_ylabel(f"y (binned {b}x{b} pixels, cropped)")
    ax.set_title(title or "coadd (asinh stretch)", fontsize=9)
    return fig
