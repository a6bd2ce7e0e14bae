"""Find detector defects in the data itself: saturation, bleed trails, bad
columns and cosmic rays.

Real exposures come without defect lists, so every defect is recognised from
the pixels.  Images are in electrons, indexed ``[y, x]``; "column" means a
fixed ``x``.  Everything is vectorised with ``scipy.ndimage`` (no Python loop
over pixels) so that a 4k x 4k exposure takes about a second.
"""

from __future__ import annotations

import logging

import numpy as np
from scipy import ndimage

from . import masks
from .psf import gaussian_kernel
from .stats import robust_std

logger = logging.getLogger(__name__)

_CROSS = ndimage.generate_binary_structure(2, 1)
_SQUARE = np.ones((3, 3), bool)


def _check_same_shape(**arrays) -> None:
    shapes = {name: np.shape(a) for name, a in arrays.items() if a is not None}
    if len(set(shapes.values())) > 1:
        raise ValueError(f"arrays must have the same shape, got {shapes}")
    for name, shape in shapes.items():
        if len(shape) != 2:
            raise ValueError(f"{name} must be 2-D, got shape {shape}")


def grow_mask(mask: np.ndarray, n: int = 1) -> np.ndarray:
    """Dilate a boolean mask by ``n`` pixels (8-connected, square).

    Sparse masks (the usual case) are grown by indexing the set pixels,
    ~50x faster than ``binary_dilation`` on a 4k x 4k image.
    """
    mask = np.asarray(mask, bool)
    if n <= 0:
        return mask.copy()
    ys, xs = np.nonzero(mask)
    if ys.size > mask.size // 50:
        return ndimage.binary_dilation(mask, _SQUARE, iterations=n)
    out = mask.copy()
    ny, nx = mask.shape
    for dy in range(-n, n + 1):
        yy = np.clip(ys + dy, 0, ny - 1)
        for dx in range(-n, n + 1):
            out[yy, np.clip(xs + dx, 0, nx - 1)] = True
    return out


def find_saturated(image: np.ndarray, *, saturation: float, grow: int = 1) -> np.ndarray:
    """Saturated pixels, grown by ``grow`` pixels (8-connected).

    Parameters
    ----------
    image : ndarray (ny, nx)
        Image in electrons (with or without sky).
    saturation : float
        Saturation level, electrons.  Pixels at or above
        ``saturation * (1 - 1e-6)`` count as saturated.
    grow : int
        Number of pixels by which the saturated cores are dilated.

    Returns
    -------
    ndarray (ny, nx) bool
    """
    if not np.isfinite(saturation) or saturation <= 0:
        raise ValueError(f"saturation must be a positive number of electrons, got {saturation}")
    with np.errstate(invalid="ignore"):
        sat = np.asarray(image) >= saturation * (1.0 - 1e-6)
    return grow_mask(sat, grow)


def find_bleed_trails(image: np.ndarray, sat_mask: np.ndarray, *,
                      saturation: float, trail_fraction: float = 0.3,
                      grow: int = 1) -> np.ndarray:
    """Bleed trails: column-wise runs of high pixels that touch a saturated core.

    A pixel belongs to a trail when it is above ``trail_fraction *
    saturation`` and is connected *along its column* (no diagonal or
    horizontal steps) to a pixel of ``sat_mask``.  Charge bleeds along
    columns, so a trail is a vertical run; stars' wings that merely touch
    the core horizontally are not included.

    Parameters
    ----------
    image : ndarray (ny, nx)
        Image in electrons.
    sat_mask : ndarray (ny, nx) bool
        Saturated cores (e.g. from :func:`find_saturated`).
    saturation : float
        Saturation level, electrons.
    trail_fraction : float
        Fraction of ``saturation`` above which a pixel can be part of a trail.
    grow : int
        Dilation (pixels, 8-connected) of the result.

    Returns
    -------
    ndarray (ny, nx) bool
        Trail pixels, including the saturated cores they start from.
    """
    _check_same_shape(image=image, sat_mask=sat_mask)
    sat_mask = np.asarray(sat_mask, bool)
    if not sat_mask.any():
        return np.zeros(sat_mask.shape, bool)
    # only columns holding a saturated pixel can hold a trail
    cols = np.nonzero(sat_mask.any(axis=0))[0]
    sub_sat = sat_mask[:, cols]
    with np.errstate(invalid="ignore"):
        high = (np.asarray(image)[:, cols] >= trail_fraction * saturation) | sub_sat
    # label vertical runs only: a structure with neighbours above/below
    labels, _ = ndimage.label(high, structure=np.array([[0, 1, 0]] * 3, bool))
    keep = np.unique(labels[sub_sat & (labels > 0)])
    trail = np.zeros(sat_mask.shape, bool)
    trail[:, cols] = np.isin(labels, keep[keep > 0])
    return grow_mask(trail, grow)


def _column_residual(resid: np.ndarray) -> np.ndarray:
    """Each pixel minus the median of the pixels 2 and 3 columns to either side.

    Smooth structure (sky gradients, stars' and galaxies' profiles) cancels to
    first order; a single deviating column does not.  The immediate
    neighbours are skipped so that a slightly blurred column still stands out.
    """
    out = np.empty_like(resid)
    # blocks of rows keep the temporaries in cache: ~4x faster than whole-image
    # operations on a 4k x 4k image
    step = max(1, ROW_BLOCK_PIXELS // max(resid.shape[1], 1))
    for r0 in range(0, resid.shape[0], step):
        _column_residual_rows(resid[r0:r0 + step], out[r0:r0 + step])
    return out


#: Pixels per block in row-blocked element-wise work (fits in a CPU cache).
ROW_BLOCK_PIXELS = 1 << 17


def _column_residual_rows(resid: np.ndarray, out: np.ndarray) -> None:
    """:func:`_column_residual` of a block of rows, written into ``out``."""
    padded = np.pad(resid, ((0, 0), (3, 3)), mode="reflect")
    nx = resid.shape[1]
    a, b = padded[:, 0:nx], padded[:, 1:nx + 1]
    c, d = padded[:, 5:nx + 5], padded[:, 6:nx + 6]
    # median of four values = (sum - max - min) / 2, without sorting
    hi = np.maximum(np.maximum(a, b), np.maximum(c, d))
    lo = np.minimum(np.minimum(a, b), np.minimum(c, d))
    s = a + b
    s += c
    s += d
    s -= hi
    s -= lo
    s *= 0.5
    np.subtract(resid, s, out=out)


def _source_pixels(img: np.ndarray, variance: np.ndarray, bad: np.ndarray,
                   *, half: int = 2, nsigma: float = 4.0) -> np.ndarray:
    """Pixels inside significant sources, judged *without their own column*.

    The sum over a (2 half + 1)^2 box minus its central column is compared
    with its noise, so a bad column never masks itself while stars and
    galaxies (whose profiles would leave curvature residuals) are excluded.
    """
    size = 2 * half + 1
    ny, nx = img.shape
    out = np.empty(img.shape, bool)
    thresh = np.float32(nsigma**2 * size * (size - 1))
    # row blocks with a `half`-row halo keep the temporaries in cache
    step = max(1, ROW_BLOCK_PIXELS // max(nx, 1))
    for r0 in range(0, ny, step):
        r1 = min(r0 + step, ny)
        h0, h1 = max(r0 - half, 0), min(r1 + half, ny)
        vp = np.zeros((r1 - r0 + 2 * half, nx), np.float32)  # zeros beyond the edge
        vp[h0 - r0 + half:h1 - r0 + half] = np.where(bad[h0:h1], np.float32(0), img[h0:h1])
        col = vp[0:r1 - r0].copy()       # column sums of the size x size box
        for k in range(1, size):
            col += vp[k:k + r1 - r0]
        side = np.zeros_like(col)        # the box minus its central column
        for k in range(1, half + 1):
            side[:, k:] += col[:, :-k]
            side[:, :-k] += col[:, k:]
        with np.errstate(invalid="ignore"):
            out[r0:r1] = (side > 0) & (side * side > thresh * variance[r0:r1])
    return out


def _block_medians(d: np.ndarray, block: int) -> np.ndarray:
    """Median of each column of ``d`` (NaN = ignore) in blocks of ``block`` rows.

    NaNs are replaced by alternately -inf and +inf, which leaves the median of
    the finite values unchanged (to half a rank), so a single
    ``np.partition`` serves every column (``np.nanmedian`` is ~5x slower).
    Blocks with fewer than a quarter of finite values give NaN.
    """
    ny, nx = d.shape
    nb = max(ny // block, 1)
    block = ny // nb
    part = d[:nb * block].reshape(nb, block, nx).transpose(0, 2, 1).copy()
    nan = np.isnan(part)
    n_good = block - nan.sum(axis=2)
    fill = np.where(np.arange(block) % 2 == 0, -np.inf, np.inf).astype(part.dtype)
    part[nan] = np.broadcast_to(fill, part.shape)[nan]
    part.partition(block // 2, axis=2)  # in place: `part` is already a private copy
    med = part[:, :, block // 2]
    med[n_good < block // 4] = np.nan
    return med


def find_bad_columns(image: np.ndarray, variance: np.ndarray,
                     mask: np.ndarray | None = None, *, nsigma: float = 6.0,
                     block: int = 128, window: int = 31, min_length: int = 64
                     ) -> np.ndarray:
    """Hot or dead columns, full or partial.

    Each pixel is compared with the median of the pixels 2 and 3 columns to
    either side (:func:`_column_residual`).  In blocks of ``block`` rows, a
    column whose median residual deviates by more than ``nsigma`` times the
    scatter of block medians is a candidate; along candidate columns a
    running median of ``window`` rows then marks the deviating rows, and runs
    of at least ``min_length`` rows are masked (shorter ones are stars or
    galaxies).

    Parameters
    ----------
    image : ndarray (ny, nx)
        Background-subtracted image, electrons.
    variance : ndarray (ny, nx)
        Per-pixel variance, electrons^2 (used only to reject unusable pixels;
        the noise is measured from the residuals themselves).
    mask : ndarray (ny, nx) int or None
        Pixels with any bit set are ignored (pass SAT/NO_DATA here).
    nsigma : float
        Detection threshold, for block medians and running medians.
    block, window : int
        Rows per block, rows per running median.
    min_length : int
        Shortest partial column (rows) that is masked.

    Returns
    -------
    ndarray (ny, nx) bool
    """
    _check_same_shape(image=image, variance=variance, mask=mask)
    img = np.asarray(image, np.float32)
    variance = np.asarray(variance, np.float32)
    bad = ~np.isfinite(img) | ~np.isfinite(variance)
    if mask is not None:
        bad |= np.asarray(mask) != 0
    out = np.zeros(img.shape, bool)
    if img.shape[1] < 8 or bad.all():
        return out
    d = _column_residual(np.where(bad, np.nan, img))
    d[_source_pixels(img, variance, bad)] = np.nan
    block = int(min(block, img.shape[0]))
    med = _block_medians(d, block)
    dev = med - np.nanmedian(med)
    # scatter of block medians (robust: few columns are bad), floored by the
    # noise expected of a median of `block` residuals (1.2533 sigma / sqrt(n))
    sig_d = robust_std(d[::7, ::7])
    scale = max(robust_std(dev), 1.2533 * sig_d / np.sqrt(block))
    with np.errstate(invalid="ignore"):
        cols = np.nonzero((np.abs(dev) > nsigma * scale).any(axis=0))[0]
    if cols.size == 0:
        return out
    out[:, cols] = _deviating_rows(d[:, cols], sig_d, nsigma, window, min_length)
    logger.info("bad columns: %d of %d candidate columns masked",
                int(out[:, cols].any(axis=0).sum()), cols.size)
    return out


def _deviating_rows(dcols: np.ndarray, sig_d: float, nsigma: float, window: int,
                    min_length: int, margin: int = 2) -> np.ndarray:
    """Rows of the given residual columns inside long deviating runs.

    A running median over ``window`` usable rows finds the runs; each end is
    then located by a CUSUM change point (the row maximising the summed
    ``sign * d - level / 2`` towards the run), plus ``margin`` rows and
    ``10 (sigma / level)^2`` rows for the change point's uncertainty.
    """
    ny = dcols.shape[0]
    rows = np.arange(ny)
    out = np.zeros(dcols.shape, bool)
    thresh = nsigma * 1.2533 * sig_d / np.sqrt(window)
    opening = np.ones(max(min_length - window, 1), bool)
    for j in range(dcols.shape[1]):  # few candidate columns
        d = dcols[:, j]
        ok = np.isfinite(d)
        if ok.sum() < window:
            continue
        # running median over the nearest `window` usable rows, mapped back
        run = np.interp(rows, rows[ok], ndimage.median_filter(d[ok], size=window,
                                                             mode="nearest"))
        for sign in (1.0, -1.0):  # hot and cold segments separately
            hit = ndimage.binary_opening(sign * run > thresh, opening)
            labels, n = ndimage.label(hit)
            for sl, in ndimage.find_objects(labels):
                start, stop, level = _run_ends(sign * np.where(ok, d, np.nan), sl.start,
                                               sl.stop, window)
                # change points of weak steps wander by ~ (sigma / level)^2 rows
                pad = margin + int(np.ceil(10.0 * (sig_d / max(level, 1e-9)) ** 2))
                out[max(start - pad, 0):min(stop + pad, ny), j] = True
    return out


def _run_ends(d: np.ndarray, r0: int, r1: int, window: int) -> tuple[int, int]:
    """CUSUM change points of a positive step found at rows [r0, r1).

    Works on the usable (finite) rows only; an end is extended through any
    adjacent gap of unusable rows.  Returns full-array row indices ``start, stop`` (exclusive)
    and the step level.
    """
    good = np.flatnonzero(np.isfinite(d))
    g0, g1 = np.searchsorted(good, r0), np.searchsorted(good, r1)
    g1 = max(g1, g0 + 1)
    v = d[good]
    level = np.median(v[g0:g1])
    z = v - 0.5 * level
    lo = max(g0 - 2 * window, 0)
    tail = np.cumsum(z[lo:g0 + 1][::-1])[::-1]      # sum_{s..g0} z, s in [lo, g0]
    i_start = lo + int(np.argmax(tail))
    hi = min(g1 + 2 * window, v.size)
    head = np.cumsum(z[g1 - 1:hi])                   # sum_{g1-1..e} z
    i_last = min(g1 - 1 + int(np.argmax(head)), v.size - 1)
    # an end close to unusable rows (a star, a saturated trail) cannot be
    # located: extend through a gap starting within `reach` usable rows
    reach = 3
    j = np.arange(max(i_start - reach, 0), i_start)
    gaps = j[good[j + 1] - good[j] > 1]
    start = good[gaps[0]] + 1 if gaps.size else good[i_start]
    if i_start <= reach and good[0] > 0:
        start = 0
    j = np.arange(i_last, min(i_last + reach, v.size - 1))
    gaps = j[good[j + 1] - good[j] > 1]
    stop = good[gaps[-1] + 1] if gaps.size else good[i_last] + 1
    if i_last >= v.size - 1 - reach and good[-1] < d.size - 1:
        stop = d.size
    return int(start), int(stop), float(level)


def psf_neighbour_ratios(psf_fwhm_px: float, *, margin: float = 0.8) -> tuple[float, float]:
    """Smallest (side, diagonal) neighbour / peak pixel ratios a star can have.

    Evaluated for a circular Gaussian of FWHM ``margin * psf_fwhm_px``
    centred on a pixel (the sharpest case).  ``margin < 1`` allows for a
    Moffat core, ellipticity, PSF variation and an uncertain FWHM.
    """
    if not psf_fwhm_px > 0:
        raise ValueError(f"psf_fwhm_px must be > 0 pixels, got {psf_fwhm_px}")
    k = gaussian_kernel(max(margin * psf_fwhm_px, 0.5), 5)
    return float(k[2, 3] / k[2, 2]), float(k[3, 3] / k[2, 2])


def _sharpness(flat_img, flat_var, usable, idx, nx, ratios):
    """Excess of pixels ``idx`` over the PSF bound, in sigma (see find_cosmic_rays).

    For each of 4 directions with both opposite neighbours usable, a star
    obeys ``v <= mean(pair) / r``; the excess along a direction is
    ``(v - mean(pair) / r)`` in units of its own noise (the pixel's and the
    bound's), and the pixel's excess is the largest over the directions.

    Each direction is judged by its own noise because the directions differ
    in how much they can tell: at a sharp PSF ``1 / r`` of the diagonals is
    large (about 30 at a FWHM of 1.6 px), so their bound is mostly noise.  A
    median of the four bounds with their pooled noise (the earlier rule) let
    that noise drown the side directions and found 50 % of the cosmic-ray
    pixels at FWHM 1.6 px; the largest per-direction excess finds 92 %, with
    no more star cores masked (``tests/test_defects.py``).  A track runs
    along one direction, whose bound its own pixels raise; the directions
    across it still bound it.
    """
    r_side, r_diag = ratios
    best = np.full(idx.size, -np.inf)
    n_dir = np.zeros(idx.size)
    v, v_var = flat_img[idx], flat_var[idx]
    for off, r in ((1, r_side), (nx, r_side), (nx + 1, r_diag), (nx - 1, r_diag)):
        lo, hi = idx - off, idx + off
        ok = usable[lo] & usable[hi]
        bound = 0.5 * (flat_img[lo] + flat_img[hi]) / r
        bound_var = 0.25 * (flat_var[lo] + flat_var[hi]) / r**2
        with np.errstate(invalid="ignore", divide="ignore"):
            excess = (v - bound) / np.sqrt(v_var + bound_var)
        best = np.where(ok, np.maximum(best, excess), best)
        n_dir += ok
    return np.where(n_dir >= 2, best, -np.inf)


def find_cosmic_rays(image: np.ndarray, variance: np.ndarray, psf_fwhm_px: float,
                     mask: np.ndarray | None = None, *, nsigma: float = 5.0,
                     neighbour_nsigma: float = 3.0, margin: float = 0.8,
                     n_iter: int = 4, grow: int = 1) -> np.ndarray:
    """Cosmic rays: pixels sharper than the PSF allows.

    For a star, each pixel value ``v`` is bounded by its neighbours: along
    any direction, ``v <= mean(opposite pair) / r`` with ``r`` the PSF's
    smallest neighbour/peak ratio (:func:`psf_neighbour_ratios`).  A pixel is
    a cosmic ray when it is significant (``v > nsigma * sigma``) *and*
    exceeds the bound along at least one direction whose two neighbours are
    usable by ``nsigma`` times that direction's noise.  This is van Dokkum's
    L.A.Cosmic idea (a Laplacian against the noise and against the image's
    fine structure) with the fine-structure image replaced by the PSF bound:
    only the few significant pixels are examined, so a 4k x 4k image takes
    well under a second.  Hits are removed from their neighbours' pairs and
    the test repeated (``n_iter`` passes) with ``neighbour_nsigma`` next to
    hits, which follows tracks.  The outermost pixel frame is not tested.

    Parameters
    ----------
    image : ndarray (ny, nx)
        Background-subtracted image, electrons.
    variance : ndarray (ny, nx)
        Variance, electrons^2.
    psf_fwhm_px : float
        PSF FWHM in pixels (an underestimate is safe, an overestimate flags
        star cores).
    mask : ndarray (ny, nx) int or None
        Pixels with any bit set are neither tested nor used as neighbours.
    nsigma, neighbour_nsigma : float
        Thresholds for new and for adjacent cosmic-ray pixels.
    margin : float
        The PSF bound uses a Gaussian of ``margin * psf_fwhm_px``.
    n_iter : int
        Maximum number of passes.
    grow : int
        Final dilation of the cosmic-ray mask (pixels, 8-connected).

    Returns
    -------
    ndarray (ny, nx) bool
    """
    _check_same_shape(image=image, variance=variance, mask=mask)
    ratios = psf_neighbour_ratios(psf_fwhm_px, margin=margin)
    img = np.asarray(image, np.float32)
    var = np.asarray(variance, np.float32)
    ny, nx = img.shape
    with np.errstate(invalid="ignore"):
        usable = np.isfinite(img) & (var > 0) & np.isfinite(var)
    if mask is not None:
        usable &= np.asarray(mask) == 0
    with np.errstate(invalid="ignore"):
        cand = usable & (img * img > min(nsigma, neighbour_nsigma) ** 2 * var) & (img > 0)
    cand[[0, -1], :] = False
    cand[:, [0, -1]] = False
    idx = np.flatnonzero(cand)
    f_img, f_var = img.ravel(), var.ravel()
    f_use = usable.ravel().copy()
    signif = f_img[idx] / np.sqrt(f_var[idx])
    hit = np.zeros(idx.size, bool)
    test = signif > nsigma
    thresh = np.full(idx.size, float(nsigma))
    cr = np.zeros(ny * nx, bool)
    for _ in range(n_iter):
        excess = _sharpness(f_img, f_var, f_use, idx[test], nx, ratios)
        new = np.zeros(idx.size, bool)
        new[np.flatnonzero(test)[excess > thresh[test]]] = True
        if not new.any():
            break
        hit |= new
        cr[idx[new]] = True
        f_use[idx[new]] = False
        # only candidates next to a new hit can change; they get the lower
        # threshold
        near = np.zeros(idx.size, bool)
        for off in (1, nx - 1, nx, nx + 1):
            near |= cr[idx - off] | cr[idx + off]
        thresh[near] = float(neighbour_nsigma)
        test = near & ~hit & (signif > thresh)
    n_cr = int(hit.sum())
    cr = grow_mask(cr.reshape(ny, nx), grow)
    logger.debug("cosmic rays: %d pixels before growing", n_cr)
    return cr


def find_defects(image: np.ndarray, variance: np.ndarray, *, saturation: float,
                 psf_fwhm_px: float, existing_mask: np.ndarray | None = None,
                 raw_image: np.ndarray | None = None) -> np.ndarray:
    """All defects as an int32 bit mask with the SAT, BAD and CR planes.

    Parameters
    ----------
    image : ndarray (ny, nx)
        Background-subtracted image, electrons.
    variance : ndarray (ny, nx)
        Variance, electrons^2.
    saturation : float
        Saturation level of the *raw* pixels (with sky), electrons.
    psf_fwhm_px : float
        PSF FWHM (pixels) for the cosmic-ray sharpness bound.
    existing_mask : ndarray int32 or None
        Mask to extend; its bits are kept (OR-ed) and its set pixels are
        ignored by the column and cosmic-ray searches.
    raw_image : ndarray or None
        The image with sky, used for the saturation test; defaults to
        ``image`` (then saturation is tested against sky-subtracted values,
        which misses pixels by the sky level).

    Returns
    -------
    ndarray (ny, nx) int32
    """
    _check_same_shape(image=image, variance=variance, mask=existing_mask, raw=raw_image)
    out = (np.zeros(np.shape(image), masks.MASK_DTYPE) if existing_mask is None
           else np.asarray(existing_mask, masks.MASK_DTYPE).copy())
    raw = image if raw_image is None else raw_image
    sat = find_saturated(raw, saturation=saturation)
    sat |= find_bleed_trails(raw, sat, saturation=saturation)
    out[sat] |= masks.bit("SAT")
    add_column_and_cosmic_ray_defects(out, image, variance, psf_fwhm_px=psf_fwhm_px)
    logger.info("defects: %d saturated/bleed pixels", int(sat.sum()))
    return out


def add_column_and_cosmic_ray_defects(mask: np.ndarray, image: np.ndarray,
                                      variance: np.ndarray, *, psf_fwhm_px: float) -> None:
    """The BAD (bad columns) and CR planes of :func:`find_defects`, in place.

    For callers that have already set the SAT plane (and so need not search
    for saturation twice); pixels with any bit of ``mask`` set are ignored by
    both searches.

    Parameters
    ----------
    mask : ndarray (ny, nx) int32
        Bit mask, updated in place.
    image, variance : ndarray (ny, nx)
        Background-subtracted image (e-) and variance (e-^2).
    psf_fwhm_px : float
        PSF FWHM (pixels) for the cosmic-ray sharpness bound.
    """
    _check_same_shape(image=image, variance=variance, mask=mask)
    bad = find_bad_columns(image, variance, mask)
    mask[bad] |= masks.bit("BAD")
    cr = find_cosmic_rays(image, variance, psf_fwhm_px, mask)
    mask[cr] |= masks.bit("CR")
    logger.info("defects: %d bad-column, %d cosmic-ray pixels", int(bad.sum()), int(cr.sum()))
