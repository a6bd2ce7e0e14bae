"""The calibrated-exposure stage (LSST's processEimage), on arrays.

:func:`process_exposure` turns one input exposure (electrons, sky not
subtracted) into a calexp: background-subtracted image in electrons,
variance, mask with named defect bits, a pixelized PSF model of the one
configured kernel size, a fitted TAN-SIP WCS and a zero point.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field, replace

import numpy as np
import pandas as pd
from astropy.wcs import WCS
from scipy.spatial import cKDTree

from . import masks
from .astrometry import fit_wcs
from .background import object_mask, sep_background, variance_plane
from .defects import add_column_and_cosmic_ray_defects, find_bleed_trails, find_saturated
from .errors import (CalibrationError, InputError, NoUsableStarsError, PsfFitError,
                     PsfKernelTooSmallError)
from .exposure import Exposure
from .photometry import fit_zeropoint, njy_per_electron
from .psf import MAX_AUTO_KERNEL_SIZE, centroid_error, kernel_size_for
from .psffit import fit_psf, measure_psf_flux
from .sources import detect_sources, estimate_psf_fwhm, select_psf_stars, stamp_is_clean

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class CalexpConfig:
    """Knobs of the calexp stage (the workflow's ``psf`` and ``calexp`` config).

    Attributes are documented in ``config/schema.yaml``.  ``kernel_size=None``
    (stand-alone use, :mod:`diffim.pair`) sizes the PSF model from the
    image's first seeing estimate (:func:`auto_kernel_size`); the workflow
    always fixes one size for every stage.
    """

    kernel_size: int | None = 41
    psf_max_order: int = 2
    psf_min_stars: int = 8
    detect_threshold: float = 5.0
    background_box: int = 128
    read_noise: float = 5.0
    saturation: float | None = None
    sip_order: int = 3
    max_shift_arcsec: float = 10.0
    max_rot_deg: float = 0.2
    max_scale_error: float = 0.01
    max_astrometry_rms_arcsec: float = 0.15

    @classmethod
    def from_workflow(cls, psf: dict, calexp: dict) -> "CalexpConfig":
        """Build from the workflow config's ``psf`` and ``calexp`` sections."""
        return cls(kernel_size=psf["kernel_size"], psf_max_order=psf["max_order"],
                   psf_min_stars=psf["min_stars"], **calexp)


@dataclass
class CalexpResult:
    """Output of :func:`process_exposure`.

    Attributes
    ----------
    exposure : Exposure
        The calexp (electrons, background subtracted; fitted WCS; PSF model).
    sources : pandas.DataFrame
        Detected sources with ``ra``, ``dec``, ``psf_star``, ``ref_mag`` columns.
    qa : dict
        FWHM, zero point, sky, astrometric RMS, star counts, footprint.
    """

    exposure: Exposure
    sources: pd.DataFrame
    qa: dict = field(default_factory=dict)


def validate_pixels(image: np.ndarray, path: str = "") -> np.ndarray:
    """No-data mask of an input image; refuse images with no usable pixels."""
    nodata = ~np.isfinite(image)
    if nodata.all():
        raise InputError(f"{path}: every pixel is NaN (no data)")
    lo, hi = np.nanmin(image), np.nanmax(image)
    if not (np.isfinite(lo) and np.isfinite(hi)):  # +-inf pixels: range of the finite ones
        good = image[~nodata]
        lo, hi = good.min(), good.max()
    if lo == hi:
        raise InputError(f"{path}: every pixel has the same value ({lo:g}): no signal")
    return nodata


@dataclass
class Characterization:
    """Output of :func:`characterize`: an image with its noise, defects and PSF.

    Attributes
    ----------
    image : ndarray float32 (ny, nx)
        Background-subtracted pixels (input units; NaN input -> 0, ``NO_DATA``).
    variance : ndarray float32 (ny, nx)
        Per-pixel variance (input units squared).
    mask : ndarray int32 (ny, nx)
        ``NO_DATA``, ``SAT``, ``BAD``, ``CR`` and ``EDGE`` (half a kernel from the border).
    background : ndarray float32 (ny, nx) or None
        The subtracted sky (None from ``characterize(..., keep_background=False)``).
    sources : pandas.DataFrame
        Detected sources (:func:`diffim.sources.detect_sources`).
    stars : pandas.DataFrame
        PSF-star candidates offered to the PSF fit.
    psf_fit : PsfFitResult
        The PSF model (``psf_fit.psf``) and its fit record.
    saturation : float
        Saturation level used (input units).
    """

    image: np.ndarray
    variance: np.ndarray
    mask: np.ndarray
    background: np.ndarray
    sources: pd.DataFrame
    stars: pd.DataFrame
    psf_fit: object
    saturation: float


def characterize(image: np.ndarray, *, config: CalexpConfig, read_noise: float,
                 saturation: float | None = None, path: str = "", overwrite: bool = False,
                 keep_background: bool = True) -> Characterization:
    """Sky, variance, defects, sources and PSF model of one image (no astrometry).

    Parameters
    ----------
    image : ndarray (ny, nx)
        Pixels in electrons (gain 1: the variance is ``image + read_noise^2``),
        sky not subtracted; NaN = no data.
    config : CalexpConfig
        Only the PSF and detection knobs are used here.
    read_noise : float
        Read noise (electrons).
    saturation : float, optional
        Saturation level (electrons); default just above the image maximum
        (nothing saturated).
    path : str
        File name, for error messages.
    overwrite : bool
        ``image`` may be overwritten (with the sky-subtracted pixels, returned
        as ``Characterization.image``).  Each of these two options lowers the
        peak memory by one image plane (67 MB at 4k x 4k), which matters when
        two images are characterised at once (:func:`diffim.pair.subtract_pair`).
    keep_background : bool
        Return the sky plane in ``Characterization.background`` (else None).

    Raises
    ------
    InputError, NoUsableStarsError
        With a reason a person understands.
    """
    nodata = validate_pixels(image, path)
    mask = np.zeros(image.shape, masks.MASK_DTYPE)
    mask[nodata] = masks.bit("NO_DATA")
    if image.dtype == np.float32 and not nodata.any():
        raw = image  # (only read from here on: no copy of a clean float32 image)
    else:
        raw = np.where(nodata, np.float32(0), image).astype(np.float32, copy=False)
    own = overwrite or raw is not image  # (`raw` may become the sky-subtracted image)
    saturation = saturation or float(np.nanmax(image)) * 1.001
    sat = find_saturated(raw, saturation=saturation)
    sat |= find_bleed_trails(raw, sat, saturation=saturation)
    mask[sat] |= masks.bit("SAT")
    bkg = sep_background(raw, mask, box=config.background_box).back(dtype=np.float32)
    variance = variance_plane(raw, read_noise=read_noise, background=bkg, mask=mask)
    sub = raw - bkg  # float32
    fwhm0 = _first_fwhm(sub, variance, mask, config, path)
    # second pass: the sky again with the sources and their wings left out
    objects = object_mask(sub, variance, fwhm0)
    if objects.mean() < MAX_OBJECT_FRACTION:
        objects |= mask != 0  # (a bool mask for the sky: no second int32 plane)
        del variance, bkg  # both are recomputed: not kept through the second sky fit
        if own:  # `raw` is not needed after the sky: the first pass's `sub` is freed
            del sub
        bkg = sep_background(raw, objects, box=config.background_box).back(dtype=np.float32)
        del objects
        variance = variance_plane(raw, read_noise=read_noise, background=bkg, mask=mask)
        sub = np.subtract(raw, bkg, out=raw if own else sub)
    else:  # too crowded for a sky between the sources: keep the first pass
        logger.warning("%s: sources cover %.0f%% of the image; sky from the first pass only",
                       path, 100 * objects.mean())
    del raw
    if not keep_background:
        bkg = None
    # SAT is already set (from `raw`, as find_defects would): add BAD and CR
    add_column_and_cosmic_ray_defects(mask, sub, variance, psf_fwhm_px=fwhm0)
    sources = detect_sources(sub, variance, mask, nsigma=config.detect_threshold,
                             psf_fwhm_px=fwhm0)
    if len(sources) < 3:
        raise NoUsableStarsError(f"{path}: only {len(sources)} sources detected above "
                                 f"{config.detect_threshold} sigma (cloudy, empty or broken image)")
    if config.kernel_size is None:
        config = replace(config, kernel_size=auto_kernel_size(fwhm0))
    else:  # the configured size is a minimum: broad seeing widens it
        config = _kernel_for_seeing(config, kernel_size_for(fwhm0, config.kernel_size,
                                                            margin=SEEING_MARGIN), fwhm0, path)
    try:
        stars, psf_fit = _fit_psf_model(sources, sub, variance, mask, config, saturation, path)
    except PsfKernelTooSmallError as exc:  # the fitted PSF is broader than the first estimate
        config = _kernel_for_seeing(config, exc.needed, fwhm0, path)
        stars, psf_fit = _fit_psf_model(sources, sub, variance, mask, config, saturation, path)
    _add_edge_mask(mask, config.kernel_size)
    return Characterization(image=sub, variance=variance, mask=mask, background=bkg,
                            sources=sources, stars=stars, psf_fit=psf_fit,
                            saturation=float(saturation))


#: Safety factor on the first seeing estimate (a central cut-out) when the
#: PSF-model size is widened for it; a fit that is broader still is refitted.
SEEING_MARGIN = 1.2


def _kernel_for_seeing(config: CalexpConfig, size: int, fwhm: float, path: str) -> CalexpConfig:
    """``config`` with ``kernel_size`` raised to ``size`` (logged), or a clear error."""
    if size > MAX_AUTO_KERNEL_SIZE:
        raise PsfFitError(f"{path}: the PSF (FWHM about {fwhm:.1f} px) would need a {size}-px "
                          f"model, more than {MAX_AUTO_KERNEL_SIZE} px: out of focus or trailed?")
    if size > config.kernel_size:
        logger.info("%s: PSF FWHM %.1f px: PSF model widened from %d to %d px", path, fwhm,
                    config.kernel_size, size)
        config = replace(config, kernel_size=int(size))
    return config


def _fit_psf_model(sources, sub, variance, mask, config, saturation, path, allowed=None):
    """PSF stars for ``config.kernel_size`` and the PSF model fitted to them: ``(stars, fit)``.

    ``allowed``: see :func:`_psf_stars`.
    """
    stars = _psf_stars(sources, sub, mask, config, saturation, allowed)
    if len(stars) < config.psf_min_stars:
        raise NoUsableStarsError(
            f"{path}: only {len(stars)} isolated, unsaturated bright stars for the PSF model "
            f"(psf.min_stars = {config.psf_min_stars})")
    return stars, fit_psf(sub, variance, mask, stars, kernel_size=config.kernel_size,
                          order=config.psf_max_order, min_stars=config.psf_min_stars,
                          neighbours=sources)


def auto_kernel_size(fwhm: float, *, n_fwhm: float = 4.5, minimum: int = 21) -> int:
    """Odd PSF-model size (pixels) reaching ``n_fwhm`` FWHM from the centre.

    At 4.5 FWHM a Moffat (beta = 3) PSF keeps ~99 % of its flux inside the
    model; the minimum keeps enough sky around sharp PSFs for the fit.
    """
    if not (np.isfinite(fwhm) and fwhm > 0):
        raise ValueError(f"fwhm must be a positive number of pixels, got {fwhm}")
    return max(int(minimum) | 1, 2 * int(np.ceil(n_fwhm * fwhm)) + 1)


def process_exposure(image: np.ndarray, meta: dict, approx_wcs: WCS, refcat: pd.DataFrame,
                     *, config: CalexpConfig, path: str = "") -> CalexpResult:
    """Calibrate one exposure: :func:`characterize`, then astrometry and zero point.

    Parameters
    ----------
    image : ndarray (ny, nx)
        Pixels in electrons, sky not subtracted; NaN = no data.
    meta : dict
        From :func:`diffim.io.header_meta` (visit, detector, band, ...).
    approx_wcs : astropy.wcs.WCS
        The header WCS (only approximate).
    refcat : DataFrame
        Reference catalog with ``ra``, ``dec``, ``{band}_mag``.
    config : CalexpConfig
    path : str
        File name, for error messages.

    Raises
    ------
    DiffimError subclasses with a reason a person understands.
    """
    read_noise = meta.get("rdnoise") or config.read_noise
    ch = characterize(image, config=config, read_noise=read_noise,
                      saturation=meta.get("saturate") or config.saturation, path=path)
    band = meta["band"]
    ref = _refcat_for_band(refcat, band, path)
    sources = ch.sources
    psf_fit = ch.psf_fit
    # Every source was detected at detect_threshold sigma or more, so its centroid has
    # at least that S/N even where its Kron flux is blended, small or negative (45 of
    # 120 sources of a crowded image with an 8.6 px PSF had a Kron S/N below 5 and
    # would have claimed centroid errors up to 5 px).  On the independent simulator's
    # seven sets this floor (instead of 1) took false positives from 63 to 57.
    snr = np.maximum(sources["snr"].to_numpy(), config.detect_threshold)
    err = _astrometric_errors(sources, ch.mask, psf_fit.psf.fwhm(), snr)
    astro = fit_wcs(sources["x"].to_numpy(), sources["y"].to_numpy(), sources["flux"].to_numpy(),
                    ref["ra"].to_numpy(), ref["dec"].to_numpy(), ref[f"{band}_mag"].to_numpy(),
                    approx_wcs, shape=image.shape, max_shift_arcsec=config.max_shift_arcsec,
                    max_rot_deg=config.max_rot_deg, max_scale=config.max_scale_error,
                    sip_order=config.sip_order, max_rms_arcsec=config.max_astrometry_rms_arcsec,
                    position_err=err)
    psf_fit = _psf_on_catalog_stars(ch, _catalog_stars(sources, ref, astro.wcs, psf_fit.fwhm_px),
                                    config, path)
    zp, phot = _calibrate(ch.image, ch.variance, ch.mask, psf_fit.psf, sources, astro, ref, band)
    sources = _annotate_sources(sources, astro, psf_fit.stars, phot)
    exposure = Exposure(image=ch.image, variance=ch.variance, mask=ch.mask, wcs=astro.wcs,
                        psf=psf_fit.psf, meta=_calexp_meta(meta, zp, psf_fit, astro, ch.background,
                                                           ch.saturation, read_noise))
    qa = _qa(meta, exposure, psf_fit, astro, zp, ch.background, len(sources), len(psf_fit.stars))
    return CalexpResult(exposure=exposure, sources=sources, qa=qa)


#: PSF-star selections tried in turn until enough stars are found, as
#: (minimum S/N, crowded rules): isolated clean stars first; crowded, small or
#: defect-rich images fall back to the relaxed rules and fainter stars.
PSF_STAR_TIERS = ((50.0, False), (50.0, True), (25.0, True), (15.0, True))


def _psf_stars(sources, sub, mask, config, saturation, allowed=None):
    """PSF stars of the first tier that gives enough; ``allowed`` (bool per source,
    optional) limits them to those sources, the size cut included (isolation is still
    judged against all)."""
    for min_snr, crowded in PSF_STAR_TIERS:
        stars = select_psf_stars(sources, sub, mask, kernel_size=config.kernel_size,
                                 saturation=saturation, min_snr=min_snr, crowded=crowded,
                                 neighbour_flux_ratio=0.05 if crowded else 0.01,
                                 allowed=allowed)
        if len(stars) >= 2 * config.psf_min_stars:
            break
    return stars


def _catalog_stars(sources, ref, wcs, fwhm) -> np.ndarray:
    """True for each source within half a FWHM (at least 1 px) of a reference star."""
    rx, ry = wcs.all_world2pix(ref["ra"].to_numpy(), ref["dec"].to_numpy(), 0)
    ok = np.isfinite(rx) & np.isfinite(ry)
    if not ok.any() or len(sources) == 0:
        return np.zeros(len(sources), bool)
    d, _ = cKDTree(np.c_[rx[ok], ry[ok]]).query(sources[["x", "y"]].to_numpy())
    return d <= max(0.5 * fwhm, 1.0)


def _psf_on_catalog_stars(ch, matched, config, path):
    """The PSF model refitted on stars the reference catalog confirms, or ``ch.psf_fit``.

    The reference catalog holds point sources only (CONTRACT.md), so a PSF
    star without a catalog star under it is a galaxy, a blend or a transient.
    Sizes alone cannot tell compact galaxies from stars when stars are few:
    on the independent simulator's `bigdither` set 15 of 20 images had such
    "stars" (1 to 10 of 11-22), and with the refit its completeness at S/N
    >= 10 went from 0.71 to 0.80.

    ``matched`` (one bool per source, :func:`_catalog_stars`) marks the
    catalog stars.  The first model is kept when every star it used is one,
    or when fewer than ``psf.min_stars`` catalog stars qualify.  (On the
    image with 10 galaxies of 17 only 6 did, and its zero point stays 86
    mmag off.  With 5 as the floor it came right, but the narrower model let
    the image into the coadd, where it gave another image's template an 8 %
    scale term: completeness 0.80 -> 0.73.)
    """
    first = ch.psf_fit.stars
    used = ch.sources.index.get_indexer(first.index[first["used"].to_numpy()])
    unmatched = int((~matched[used]).sum())
    if unmatched == 0:
        return ch.psf_fit
    config = replace(config, kernel_size=ch.psf_fit.psf.kernel_size)
    try:
        _, fit = _fit_psf_model(ch.sources, ch.image, ch.variance, ch.mask, config,
                                ch.saturation, path, allowed=matched)
    except (NoUsableStarsError, PsfFitError) as exc:
        logger.info("%s: %d of the PSF model's %d stars are not in the reference catalog, and "
                    "no model on catalog stars alone (%s): the first is kept", path, unmatched,
                    len(used), exc)
        return ch.psf_fit
    logger.info("%s: PSF model refitted on %d catalog stars (%d of the first %d stars were not "
                "in the catalog): FWHM %.2f -> %.2f px", path, fit.n_stars, unmatched, len(used),
                ch.psf_fit.fwhm_px, fit.fwhm_px)
    return fit


#: Largest fraction of the image that the sources may cover for the second,
#: source-masked background pass (above it the sky meshes would be empty).
MAX_OBJECT_FRACTION = 0.6
#: Side (px) of the central cut-out used for the first seeing estimate.
FIRST_FWHM_BOX = 1536
#: Stamp size (px) of that estimate when the PSF-model size is not fixed yet.
FIRST_FWHM_STAMP = 41


def _first_fwhm(sub, variance, mask, config, path) -> float:
    """FWHM guess (px) from bright isolated detections, for cosmic-ray finding.

    Measured on a central cut-out: the seeing estimate needs tens of stars,
    not all of them, and a full-image detection pass costs seconds at 4k.
    """
    ny, nx = sub.shape
    y0, x0 = max(0, (ny - FIRST_FWHM_BOX) // 2), max(0, (nx - FIRST_FWHM_BOX) // 2)
    cut = (slice(y0, y0 + FIRST_FWHM_BOX), slice(x0, x0 + FIRST_FWHM_BOX))
    catalog = detect_sources(sub[cut], variance[cut], mask[cut],
                             nsigma=max(config.detect_threshold, 10.0))
    if len(catalog) < 3:
        raise NoUsableStarsError(f"{path}: only {len(catalog)} sources detected above 10 sigma "
                                 "(cloudy, empty or broken image)")
    fwhm = estimate_psf_fwhm(sub[cut], catalog, mask[cut],
                             kernel_size=config.kernel_size or FIRST_FWHM_STAMP)
    if not np.isfinite(fwhm):
        raise NoUsableStarsError(f"{path}: no star bright and isolated enough to measure the seeing")
    return float(fwhm)


#: Radius (in PSF FWHM) around a source that must be inside the image and free of
#: NO_DATA pixels for its centroid to enter the astrometric fit.  A windowed
#: centroid whose window is cut moves away from the cut: at 2.3" seeing (9.6 px)
#: three bright stars 5-7 px from an edge were 1-2.6 px off, yet weighted as the
#: best matches, and they bent the WCS of an independent-simulator image to 0.31"
#: RMS (the visit failed; 29 mas without them).  Masked pixels inside the image
#: (SAT, CR, BAD) are skipped by the centroid symmetrically enough: leaving out
#: the stars near them too took the median WCS error against the truth of a
#: 12-visit set from 5.5 to 7.4 mas (the saturated stars are good anchors).
#: 1.0 FWHM: the window times the PSF has sigma 0.3 FWHM, so a cut beyond 1 FWHM
#: moves a centroid by little; 1.5 left too few edge stars on 768 x 768 images
#: with a 14 px PSF (a difference's noise ratio 1.38 -> 1.59).
CENTROID_CLEAR_FWHM = 1.0


def _astrometric_errors(sources, mask, fwhm, snr) -> np.ndarray:
    """Per-axis centroid errors (pixels) for :func:`diffim.astrometry.fit_wcs`.

    :func:`diffim.psf.centroid_error` of ``fwhm`` (pixels) and ``snr``, and
    ``inf`` (left out of the fit) for sources whose window of
    :data:`CENTROID_CLEAR_FWHM` x FWHM is cut by the image edge or holds a
    NO_DATA pixel.
    """
    err = centroid_error(fwhm, snr)
    clear = stamp_is_clean(masks.any_set(mask, "NO_DATA"), sources["x"].to_numpy(),
                           sources["y"].to_numpy(), int(np.ceil(CENTROID_CLEAR_FWHM * fwhm)))
    return np.where(clear, err, np.inf)


def _refcat_for_band(refcat, band, path):
    col = f"{band}_mag"
    if col not in refcat.columns:
        raise CalibrationError(f"{path}: the reference catalog has no column {col} for band {band}")
    ref = refcat[np.isfinite(refcat[col]) & np.isfinite(refcat["ra"]) & np.isfinite(refcat["dec"])]
    return ref.reset_index(drop=True)


def _add_edge_mask(mask, kernel_size) -> None:
    """Set EDGE (in place) within half a kernel of the border."""
    half = kernel_size // 2
    if half == 0:
        return
    edge = masks.MASK_DTYPE(masks.bit("EDGE"))
    for border in (mask[:half, :], mask[-half:, :], mask[:, :half], mask[:, -half:]):
        border |= edge


#: Most matched stars used for the zero point (brightest first; the clipped
#: mean of a few hundred is already far more precise than 0.01 mag).
MAX_CALIBRATION_STARS = 400


def _calibrate(sub, variance, mask, psf, sources, astro, ref, band):
    """Zero point from PSF fluxes of the astrometric matches with reference magnitudes."""
    order = np.argsort(-sources["flux"].to_numpy()[astro.matches["src_index"].to_numpy()])
    best = astro.matches.iloc[order[:MAX_CALIBRATION_STARS]]  # brightest matches suffice
    i_src = best["src_index"].to_numpy()
    i_ref = best["ref_index"].to_numpy()
    x = sources["x"].to_numpy()[i_src]
    y = sources["y"].to_numpy()[i_src]
    flux, err, flag = measure_psf_flux(sub, variance, psf, x, y, mask=mask)
    flux = np.where(flag, np.nan, flux)
    mag_err_col = f"{band}_magErr"
    mag_err = ref[mag_err_col].to_numpy()[i_ref] if mag_err_col in ref.columns else None
    zp = fit_zeropoint(flux, err, ref[f"{band}_mag"].to_numpy()[i_ref], mag_err)
    return zp, dict(i_src=i_src, psf_flux=flux, psf_flux_err=err)


def _annotate_sources(sources, astro, stars, phot):
    out = sources.copy()
    ra, dec = astro.wcs.pixel_to_world_values(out["x"].to_numpy(), out["y"].to_numpy())
    out["ra"], out["dec"] = ra, dec
    used = stars.index[stars["used"]] if "used" in stars.columns else stars.index
    out["psf_star"] = out.index.isin(used)
    out["astrometry_match"] = out.index.isin(out.index[astro.matches["src_index"].to_numpy()])
    out["calib_star"] = out.index.isin(out.index[phot["i_src"]])
    return out


def _calexp_meta(meta, zp, psf_fit, astro, bkg, saturation, read_noise) -> dict:
    scale = pixel_scale_arcsec(astro.wcs)
    return {
        "VISIT": int(meta["visit"]), "DETECTOR": int(meta["detector"]), "BAND": meta["band"],
        "MJD-OBS": meta["mjd_obs"], "EXPTIME": meta["exptime"], "MIDMJD": meta["midpoint_mjd"],
        "BUNIT": "electron", "ZEROPT": zp.zeropoint, "ZEROPTER": zp.zeropoint_err,
        "NJYPERE": njy_per_electron(zp.zeropoint), "FWHM": psf_fit.fwhm_px,
        "FWHMASEC": psf_fit.fwhm_px * scale, "PIXSCALE": scale, "SKYLEVEL": float(np.median(bkg)),
        "ASTRMS": astro.rms_arcsec, "NASTRO": astro.n_matched, "NPSFSTAR": psf_fit.n_stars,
        "SATURATE": float(saturation), "RDNOISE": float(read_noise),
    }


def pixel_scale_arcsec(wcs: WCS) -> float:
    """Mean pixel scale (arcsec/px) at the reference pixel."""
    return float(np.sqrt(abs(np.linalg.det(wcs.pixel_scale_matrix))) * 3600.0)


def footprint(wcs: WCS, shape, n_per_side: int = 4) -> tuple[list, list]:
    """Sky polygon (ra, dec lists, deg) around the image border, counter-clockwise."""
    ny, nx = shape
    t = np.linspace(0, 1, n_per_side, endpoint=False)
    xs = np.concatenate([t * (nx - 1), np.full_like(t, nx - 1), (1 - t) * (nx - 1), np.zeros_like(t)])
    ys = np.concatenate([np.zeros_like(t), t * (ny - 1), np.full_like(t, ny - 1), (1 - t) * (ny - 1)])
    ra, dec = wcs.pixel_to_world_values(xs - 0.5 * np.sign(xs - nx / 2), ys - 0.5 * np.sign(ys - ny / 2))
    return [float(v) for v in ra], [float(v) for v in dec]


def _qa(meta, exposure, psf_fit, astro, zp, bkg, n_sources, n_stars) -> dict:
    ra, dec = footprint(exposure.wcs, exposure.shape)
    m = exposure.meta
    return {
        "status": "ok", "reason": "", "visit": int(meta["visit"]),
        "detector": int(meta["detector"]), "band": meta["band"],
        "midpoint_mjd": meta["midpoint_mjd"], "shape": list(exposure.shape),
        "fwhm_px": m["FWHM"], "fwhm_arcsec": m["FWHMASEC"], "pixel_scale": m["PIXSCALE"],
        "zeropoint": zp.zeropoint, "zeropoint_err": zp.zeropoint_err,
        "zeropoint_n_stars": zp.n_used, "njy_per_electron": m["NJYPERE"],
        "sky_electrons": float(np.median(bkg)), "astrometry_rms_arcsec": astro.rms_arcsec,
        "astrometry_n_stars": astro.n_matched, "psf_n_stars": psf_fit.n_stars,
        "psf_order": exposure.psf.order, "n_sources": n_sources, "n_psf_candidates": n_stars,
        "footprint_ra": ra, "footprint_dec": dec,
    }
