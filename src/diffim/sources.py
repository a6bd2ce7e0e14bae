"""Source detection, aperture photometry and PSF-star selection on calexps.

Images are background-subtracted, in electrons, indexed ``[y, x]``; catalog
positions ``x, y`` are 0-based pixel coordinates (pixel centre = integer).
Detection and measurement use ``sep`` (SExtractor's algorithms in C).
"""

from __future__ import annotations

import logging

import numpy as np
import pandas as pd
import sep
from scipy.spatial import cKDTree

from . import masks
from .errors import NoUsableStarsError
from .psf import FWHM_PER_SIGMA, moments_fwhm

logger = logging.getLogger(__name__)

#: Mask planes ignored by detection (their pixels count as empty sky).
DETECTION_IGNORE = ("NO_DATA", "BAD", "CR")

#: Deblending sub-thresholds per object (sep's default is 32): 16 costs 0.35 %
#: of the detections in a crowded 4k x 4k field (13,263 instead of 13,310;
#: the faintest blended components) and saves ~20 % of the extraction time.
DEBLEND_NTHRESH = 16

#: Columns of the catalog returned by :func:`detect_sources`.
CATALOG_COLUMNS = ("x", "y", "flux", "flux_err", "flux_aper", "flux_aper_err",
                   "kron_radius", "peak", "a", "b", "theta", "npix", "flag",
                   "mask_flags", "snr")


def _prepare(image, variance, mask, ignore):
    """Contiguous float32 data/variance and a uint8 'ignore' mask for sep."""
    image = np.asarray(image)
    variance = np.asarray(variance)
    if image.ndim != 2 or image.shape != variance.shape:
        raise ValueError(f"image {image.shape} and variance {variance.shape} must be "
                         f"2-D arrays of the same shape")
    if mask is not None and np.shape(mask) != image.shape:
        raise ValueError(f"mask shape {np.shape(mask)} differs from image shape {image.shape}")
    with np.errstate(invalid="ignore"):
        skip = ~np.isfinite(image) | ~((variance > 0) & (variance < np.inf))
    if mask is not None and ignore:
        skip |= masks.any_set(np.asarray(mask), *ignore)
    data = np.array(image, dtype=np.float32, order="C")
    data[skip] = 0.0
    # sep reads the variance only at unmasked pixels: a clean float32 plane is
    # passed as it is (one 67 MB copy less per 4k image)
    with np.errstate(invalid="ignore"):
        var_ok = bool(((variance > 0) & (variance < np.inf)).all())
    if var_ok:
        var = np.ascontiguousarray(variance, dtype=np.float32)
    else:
        var = np.array(variance, dtype=np.float32, order="C")
        var[skip] = 1.0
    return data, var, skip.view(np.uint8)


def _footprint_mask_flags(segmap: np.ndarray, mask: np.ndarray | None, n: int) -> np.ndarray:
    """OR of the mask bits over each object's footprint (grown by 1 pixel)."""
    out = np.zeros(n, np.int32)
    if mask is None or n == 0:
        return out
    # masked pixels ignored by detection are not in the segmentation map: a
    # masked pixel counts for every object that owns it or a neighbour of it
    ys, xs = np.nonzero(mask)
    vals = mask[ys, xs].astype(np.int32)
    ny, nx = segmap.shape
    for dy in (-1, 0, 1):
        yy = np.clip(ys + dy, 0, ny - 1)
        for dx in (-1, 0, 1):
            lab = segmap[yy, np.clip(xs + dx, 0, nx - 1)]
            hit = lab > 0
            np.bitwise_or.at(out, lab[hit] - 1, vals[hit])
    return out


def detect_sources(image_bkgsub: np.ndarray, variance: np.ndarray,
                   mask: np.ndarray | None = None, *, nsigma: float = 5.0,
                   minarea: int = 5, psf_fwhm_px: float | None = None,
                   aper_radius: float | None = None,
                   ignore: tuple[str, ...] = DETECTION_IGNORE,
                   deblend_cont: float = 0.005) -> pd.DataFrame:
    """Detect sources with ``sep.extract`` and measure positions and fluxes.

    Parameters
    ----------
    image_bkgsub : ndarray (ny, nx)
        Background-subtracted image, electrons.
    variance : ndarray (ny, nx)
        Variance, electrons^2; the threshold is ``nsigma`` (per pixel of the
        matched-filtered image).
    mask : ndarray (ny, nx) int32 or None
        Bit mask (:mod:`diffim.masks`); pixels with planes in ``ignore`` are
        treated as empty, and every footprint's OR of bits is reported.
    nsigma : float
        Detection threshold: significance in the PSF-filtered image.
    minarea : int
        Minimum number of pixels above threshold.
    psf_fwhm_px : float or None
        Detection filters the image with a Gaussian of this FWHM (default 2
        px) and thresholds the filtered image at ``nsigma``; also sets the
        windowed-centroid weight and the default aperture radius.
    aper_radius : float or None
        Radius (pixels) of the circular aperture flux ``flux_aper``; default
        ``2 * psf_fwhm_px`` or 6 pixels.
    ignore : tuple of str
        Mask planes treated as empty sky during detection.
    deblend_cont : float
        sep deblending contrast.

    Returns
    -------
    pandas.DataFrame
        One row per source, columns :data:`CATALOG_COLUMNS`: ``x, y``
        (0-based windowed centroid), ``flux, flux_err`` (Kron "auto" flux,
        e-), ``flux_aper, flux_aper_err`` (circular aperture, e-),
        ``kron_radius``, ``peak`` (e-), ``a, b, theta`` (isophotal second
        moments, pixels / radians), ``npix``, ``flag`` (sep object and
        aperture flags, e.g. 0x20: aperture touched an ignored pixel, 0x10:
        truncated by the edge), ``mask_flags`` (OR of
        mask bits in the footprint) and ``snr = flux / flux_err``.
    """
    data, var, skip = _prepare(image_bkgsub, variance, mask, ignore)
    kernel = sep_kernel(psf_fwhm_px or 2.0)
    # sep's "matched" filter with a variance map is ~7x slower than plain
    # convolution; convolve instead and scale the threshold so that nsigma is
    # the significance in the filtered image (noise of a unit-sum kernel:
    # sigma * sqrt(sum k^2) / sum k, for locally constant variance)
    thresh = nsigma * np.sqrt((kernel**2).sum()) / kernel.sum()
    sep.set_extract_pixstack(max(300000, data.size // 10))
    sep.set_sub_object_limit(4096)
    objs, segmap = sep.extract(data, thresh, var=var, mask=skip, minarea=minarea,
                               filter_kernel=kernel, filter_type="conv",
                               deblend_cont=deblend_cont, deblend_nthresh=DEBLEND_NTHRESH,
                               segmentation_map=True)
    cat = pd.DataFrame({"x": objs["x"], "y": objs["y"], "peak": objs["peak"],
                        "a": objs["a"], "b": objs["b"], "theta": objs["theta"],
                        "npix": objs["npix"].astype(np.int64),
                        "flag": objs["flag"].astype(np.int64)})
    cat["mask_flags"] = _footprint_mask_flags(segmap, None if mask is None else np.asarray(mask),
                                              len(cat))
    if len(cat) == 0:
        return _empty_catalog()
    if aper_radius is None:
        aper_radius = 2.0 * psf_fwhm_px if psf_fwhm_px else 6.0
    _add_fluxes(cat, objs, data, var, skip, segmap, aper_radius, psf_fwhm_px)
    logger.info("detected %d sources above %.1f sigma", len(cat), nsigma)
    return cat[list(CATALOG_COLUMNS)]


def _empty_catalog() -> pd.DataFrame:
    cols = {c: pd.Series(dtype=np.int64 if c in ("npix", "flag", "mask_flags") else float)
            for c in CATALOG_COLUMNS}
    return pd.DataFrame(cols)


def sep_kernel(fwhm_px: float) -> np.ndarray:
    """Gaussian matched-filter kernel (odd size, +-2 sigma) for ``sep.extract``.

    sep convolves directly (cost ~ kernel area); truncating at 2 sigma rather
    than 2.5 keeps 99.5 % of the matched filter's S/N for a Gaussian PSF and
    makes a 4k x 4k extraction ~25 % faster.
    """
    if not fwhm_px > 0:
        raise ValueError(f"psf_fwhm_px must be > 0 pixels, got {fwhm_px}")
    sigma = fwhm_px / FWHM_PER_SIGMA
    h = max(int(np.ceil(2.0 * sigma)), 1)
    y, x = np.mgrid[-h:h + 1, -h:h + 1]
    return np.exp(-0.5 * (x**2 + y**2) / sigma**2).astype(np.float32)


def _add_fluxes(cat, objs, data, var, skip, segmap, aper_radius, psf_fwhm_px):
    """Windowed centroids, Kron and aperture fluxes (in place)."""
    x, y = objs["x"], objs["y"]
    seg_id = np.arange(1, len(x) + 1, dtype=np.int32)
    a = np.where(np.isfinite(objs["a"]) & (objs["a"] > 0.5), objs["a"], 0.5)
    b = np.where(np.isfinite(objs["b"]) & (objs["b"] > 0.5), objs["b"], 0.5)
    b = np.minimum(a, b)
    theta = np.where(np.isfinite(objs["theta"]), objs["theta"], 0.0)
    theta = np.clip(theta, -np.pi / 2 + 1e-6, np.pi / 2 - 1e-6)
    kr, kflag = sep.kron_radius(data, x, y, a, b, theta, 6.0,
                                mask=skip, seg_id=seg_id, segmap=segmap)
    kr = np.where(np.isfinite(kr) & (kr > 0), kr, 3.5)
    # SExtractor's MAG_AUTO: 2.5 Kron radii, at least 3.5 (in units of a, b)
    r = np.maximum(2.5 * kr, 3.5)
    flux, ferr, fflag = sep.sum_ellipse(data, x, y, a, b, theta, r,
                                        var=var, mask=skip, subpix=1, seg_id=seg_id,
                                        segmap=segmap)
    with np.errstate(divide="ignore", invalid="ignore"):
        snr = np.where(ferr > 0, flux / ferr, 0.0)
    cat["x"], cat["y"] = _windowed_centroids(data, skip, objs, snr, psf_fwhm_px)
    fa, fea, faflag = sep.sum_circle(data, cat["x"].to_numpy(float, copy=True),
                                     cat["y"].to_numpy(float, copy=True), aper_radius,
                                     var=var, mask=skip, subpix=5)
    cat["flux"], cat["flux_err"] = flux, ferr
    cat["flux_aper"], cat["flux_aper_err"] = fa, fea
    cat["kron_radius"] = kr
    cat["flag"] = cat["flag"] | kflag | fflag | faflag
    cat["snr"] = snr


#: Sources with Kron S/N at least this (PSF, astrometric and calibration
#: stars) get windowed centroids with sep's default 11 x 11 sub-pixel sampling
#: of the window edge; the fainter majority of a dense catalog gets 1 x 1,
#: which moves centroids by 1.4e-4 px (median; 99th percentile 1.4e-3 px, far
#: below their own noise) and makes ``sep.winpos`` ~3.5x faster.
FINE_CENTROID_SNR = 50.0


def _windowed_centroids(data, skip, objs, snr, psf_fwhm_px):
    """sep's windowed centroids (x, y), falling back to the isophotal ones
    where the window iteration fails or wanders more than 2 pixels."""
    x, y = objs["x"], objs["y"]
    sig = np.full(len(x), (psf_fwhm_px or 2.0 * np.sqrt(np.median(objs["a"] * objs["b"]))
                           * FWHM_PER_SIGMA / 2.0) / FWHM_PER_SIGMA)
    xw, yw = x.astype(float), y.astype(float)
    wflag = np.zeros(len(x), np.int64)
    for sel, subpix in ((snr >= FINE_CENTROID_SNR, 11), (~(snr >= FINE_CENTROID_SNR), 1)):
        if sel.any():
            xw[sel], yw[sel], wflag[sel] = sep.winpos(
                data, np.ascontiguousarray(x[sel]), np.ascontiguousarray(y[sel]), sig[sel],
                mask=skip, subpix=subpix)
    moved = (wflag != 0) | (np.hypot(xw - x, yw - y) > 2.0)  # windowed centroid failed
    return np.where(moved, x, xw), np.where(moved, y, yw)


def measure_fluxes(image_bkgsub: np.ndarray, variance: np.ndarray, x, y, *,
                   radius: float, mask: np.ndarray | None = None,
                   ignore: tuple[str, ...] = masks.BAD_FOR_FIT
                   ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Circular-aperture fluxes at given positions (``sep.sum_circle``).

    Parameters
    ----------
    image_bkgsub, variance : ndarray (ny, nx)
        Background-subtracted image (e-) and variance (e-^2).
    x, y : array_like
        0-based pixel positions.
    radius : float
        Aperture radius, pixels.
    mask : ndarray int32 or None
        Bit mask; pixels with planes in ``ignore`` are excluded (not
        corrected for) and flagged.

    Returns
    -------
    flux, flux_err : ndarray
        Electrons.
    flag : ndarray int
        sep flags; nonzero if the aperture touched an ignored pixel or the
        image edge.
    """
    data, var, skip = _prepare(image_bkgsub, variance, mask, ignore)
    x = np.atleast_1d(np.asarray(x, float))
    y = np.atleast_1d(np.asarray(y, float))
    if x.shape != y.shape:
        raise ValueError(f"x and y must have the same shape, got {x.shape} and {y.shape}")
    flux, err, flag = sep.sum_circle(data, x, y, radius, var=var, mask=skip, subpix=5)
    return flux, err, flag.astype(np.int64)


def stamp_is_clean(bad: np.ndarray, x, y, half: int) -> np.ndarray:
    """True where the ``(2 half + 1)^2`` stamp around ``(x, y)`` has no bad pixel
    and lies inside the image.

    Parameters
    ----------
    bad : bool ndarray (ny, nx)
        Pixels that spoil a stamp.
    x, y : array_like
        0-based pixel positions (rounded to the nearest pixel centre).
    half : int
        Half-size of the stamp, pixels.
    """
    ny, nx = bad.shape
    ix, iy = np.rint(x).astype(int), np.rint(y).astype(int)
    inside = (ix - half >= 0) & (iy - half >= 0) & (ix + half < nx) & (iy + half < ny)
    off = np.arange(-half, half + 1)
    oy = np.clip(iy[:, None, None] + off[None, :, None], 0, ny - 1)
    ox = np.clip(ix[:, None, None] + off[None, None, :], 0, nx - 1)
    return inside & ~bad[oy, ox].any(axis=(1, 2))


def _inside(cat: pd.DataFrame, shape, margin: int) -> np.ndarray:
    """True for sources at least ``margin`` pixels from every image edge."""
    x, y = cat["x"].to_numpy(), cat["y"].to_numpy()
    return ((x >= margin) & (y >= margin) & (x <= shape[1] - 1 - margin)
            & (y <= shape[0] - 1 - margin))


def _isolated(cat: pd.DataFrame, radius: float, flux_ratio: float) -> np.ndarray:
    """True for sources with no neighbour brighter than ``flux_ratio`` times
    their flux within ``radius`` pixels."""
    xy = cat[["x", "y"]].to_numpy()
    flux = np.abs(cat["flux"].to_numpy())
    ok = np.ones(len(cat), bool)
    pairs = cKDTree(xy).query_pairs(radius, output_type="ndarray")
    for i, j in ((pairs[:, 0], pairs[:, 1]), (pairs[:, 1], pairs[:, 0])):
        spoil = flux[j] > flux_ratio * flux[i]
        ok[i[spoil]] = False
    return ok


def _stellar_locus(size: np.ndarray, clip: float = 3.0, floor: float = 0.05) -> np.ndarray:
    """True for sizes within ``clip`` robust sigma (at least ``floor`` x median)
    of the sigma-clipped median size (the stellar locus)."""
    ok = np.isfinite(size)
    for _ in range(5):
        med = np.median(size[ok])
        sig = max(1.4826 * np.median(np.abs(size[ok] - med)), floor * med)
        new = np.isfinite(size) & (np.abs(size - med) < clip * sig)
        if (new == ok).all():
            break
        ok = new
    return ok


def _spread_over_image(cat: pd.DataFrame, width: int, height: int, max_stars: int,
                       n_cells: int = 4) -> pd.DataFrame:
    """At most ``max_stars`` rows, the highest-S/N ones of each of
    ``n_cells x n_cells`` cells taken in turn, so every region is sampled."""
    if len(cat) <= max_stars:
        return cat
    cx = np.minimum((cat["x"].to_numpy() * n_cells / width).astype(int), n_cells - 1)
    cy = np.minimum((cat["y"].to_numpy() * n_cells / height).astype(int), n_cells - 1)
    ranked = cat.assign(_cell=cy * n_cells + cx).sort_values("snr", ascending=False)
    ranked["_rank"] = ranked.groupby("_cell").cumcount()
    return ranked.sort_values(["_rank", "snr"], ascending=[True, False]).head(max_stars) \
        .drop(columns=["_cell", "_rank"])


#: sep flags that disqualify a PSF star: OBJ_TRUNC (2), OBJ_SINGU (8),
#: APER_ALLMASKED (64), APER_NONPOSITIVE (128).  Merged objects (1) are judged
#: by the isolation test; masked or edge-truncated Kron apertures (32, 16) by
#: the stamp tests, which look at the pixels that matter for the fit.
SEP_REJECT_FLAGS = 2 | 8 | 64 | 128


def select_psf_stars(catalog: pd.DataFrame, image: np.ndarray, mask: np.ndarray | None,
                     *, kernel_size: int, min_snr: float = 50.0,
                     max_stars: int = 200, neighbour_flux_ratio: float = 0.01,
                     saturation: float | None = None, max_peak_fraction: float = 0.8,
                     size_clip: float = 3.0, crowded: bool = False,
                     allowed: np.ndarray | None = None) -> pd.DataFrame:
    """Choose isolated, clean, unsaturated, star-like sources for PSF modelling.

    Parameters
    ----------
    catalog : DataFrame
        From :func:`detect_sources` (needs x, y, flux, snr, peak, flag,
        mask_flags).
    image : ndarray (ny, nx)
        Background-subtracted image (e-), used for the half-light radius.
    mask : ndarray int32 or None
        Bit mask; any of :data:`diffim.masks.BAD_FOR_FIT` in the
        ``kernel_size`` stamp rejects a star.
    kernel_size : int
        PSF kernel size K (pixels); stamps must be inside the image, no
        neighbour brighter than ``neighbour_flux_ratio`` times the star may
        lie within K pixels, and the whole stamp must be free of masked pixels.
    crowded : bool
        Relaxed rules for crowded or defect-rich images, where the strict ones
        leave too few stars: neighbours only count within the stamp (K/2
        pixels), and only the core (K/4 pixels) must be unmasked (the fit gives
        masked pixels elsewhere zero weight; its chi^2 clip rejects the stars
        a neighbour spoils).  Use with ``neighbour_flux_ratio`` ~0.05.
    min_snr : float
        Minimum ``snr`` (Kron flux / error).
    max_stars : int
        Cap; the brightest per cell of a 4 x 4 grid are kept first.
    saturation : float or None
        If given, stars with peak above ``max_peak_fraction * saturation``
        (non-linear regime; sky-subtracted) are rejected.
    size_clip : float
        Stars are those whose half-light radius is within ``size_clip`` robust
        sigma of the clipped median (rejects galaxies, blends, cosmic rays).
    allowed : ndarray of bool, optional
        One per catalog row: only these rows may be chosen (e.g. the sources
        matched to a point-source reference catalog).  Every row still counts
        as a neighbour for the isolation rule.

    Returns
    -------
    DataFrame
        The selected rows (original index kept) plus ``r50`` (half-light
        radius, pixels).
    """
    image = np.asarray(image)
    half = int(kernel_size) // 2
    if len(catalog) == 0:
        return catalog.assign(r50=pd.Series(dtype=float))
    cat = catalog.copy()
    good = (cat["snr"] >= min_snr) & (cat["flux"] > 0) & ((cat["flag"] & SEP_REJECT_FLAGS) == 0)
    bad_bits = masks.bits(*masks.BAD_FOR_FIT)
    good &= (cat["mask_flags"] & bad_bits) == 0
    if saturation is not None:
        good &= cat["peak"] < max_peak_fraction * saturation
    isolation, clean = (half, half // 2) if crowded else (2 * half + 1, half + 2)
    good &= _isolated(cat, float(isolation), neighbour_flux_ratio)
    if allowed is not None:
        good &= np.asarray(allowed, bool)
    cat = cat[good.to_numpy()]
    bad = np.zeros(image.shape, bool) if mask is None else masks.any_set(mask, *masks.BAD_FOR_FIT)
    bad |= ~np.isfinite(image)
    cat = cat[stamp_is_clean(bad, cat["x"].to_numpy(), cat["y"].to_numpy(), clean)]
    cat = cat[_inside(cat, image.shape, half + 2)]
    if len(cat) == 0:
        return cat.assign(r50=pd.Series(dtype=float))
    data = np.ascontiguousarray(image, dtype=np.float32)  # masked pixels are skipped
    r50, _ = sep.flux_radius(data, cat["x"].to_numpy(float, copy=True), cat["y"].to_numpy(float, copy=True),
                             np.full(len(cat), float(half)), 0.5,
                             mask=bad.view(np.uint8), subpix=5)
    cat = cat.assign(r50=r50)
    cat = cat[_stellar_locus(r50, clip=size_clip)]
    cat = _spread_over_image(cat, image.shape[1], image.shape[0], max_stars)
    logger.info("selected %d PSF stars of %d sources", len(cat), len(catalog))
    return cat


def estimate_psf_fwhm(image: np.ndarray, catalog: pd.DataFrame, mask: np.ndarray | None,
                      *, kernel_size: int, min_snr: float = 30.0,
                      max_stars: int = 50) -> float:
    """Quick PSF FWHM (pixels) before any PSF model exists.

    Median adaptive-moment FWHM (:func:`diffim.psf.moments_fwhm`) of stamps of
    up to ``max_stars`` bright, isolated, star-like sources, e.g. for the
    cosmic-ray sharpness bound.

    Raises
    ------
    NoUsableStarsError
        If no suitable star is found.
    """
    stars = select_psf_stars(catalog, image, mask, kernel_size=kernel_size,
                             min_snr=min_snr, max_stars=max_stars)
    if len(stars) < 5:  # crowded or small image: relaxed isolation rules
        stars = select_psf_stars(catalog, image, mask, kernel_size=kernel_size, min_snr=min_snr,
                                 max_stars=max_stars, crowded=True, neighbour_flux_ratio=0.05)
    if len(stars) == 0:
        raise NoUsableStarsError("no isolated, unsaturated star with S/N >= "
                                 f"{min_snr:g} was found to estimate the PSF size")
    half = int(kernel_size) // 2
    fwhms = []
    for x, y in zip(np.rint(stars["x"]).astype(int), np.rint(stars["y"]).astype(int)):
        fwhms.append(moments_fwhm(image[y - half:y + half + 1, x - half:x + half + 1]))
    fwhms = np.asarray(fwhms)
    if not np.isfinite(fwhms).any():
        raise NoUsableStarsError("no star gave a measurable PSF size")
    return float(np.nanmedian(fwhms))
