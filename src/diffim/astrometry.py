"""Astrometric calibration: fit a TAN-SIP WCS against the reference catalog.

The header WCS of an input exposure is only approximate (the data contract
allows 5 arcsec in position, 0.1 degree in rotation and 0.5 % in scale), so
:func:`fit_wcs` finds its own solution in three steps:

1. *Pattern search.*  Reference stars are projected to pixels through the
   header WCS.  For a grid of small rotation / scale trials about the image
   centre, the pairwise offsets between the brightest detections and the
   brightest reference stars are voted into a 2-D histogram; the true shift
   shows up as a peak.  The trial with the strongest peak wins, provided the
   peak is significant against the Poisson noise of the vote histogram
   (false-alarm probability over all cells of all trials) and unambiguous.
2. *Iterative matching.*  Unique nearest-neighbour matching with a radius that
   shrinks as the fit improves, with clipping of the residuals.  Given the
   sources' centroid errors, each match is weighted by ``1 / (err^2 +
   tau^2)``, ``tau`` the matches' own scatter beyond their errors, and
   clipped in those units (:func:`_clip_at_order`).
3. *TAN-SIP fit.*  With the tangent point fixed, the intermediate world
   coordinates of a TAN-SIP WCS are a polynomial in pixel coordinates that is
   *linear* in its coefficients, so the fit is a single linear least-squares
   solve (repeated twice to move the tangent point onto CRPIX).  We write this
   ourselves instead of calling ``astropy.wcs.utils.fit_wcs_from_points``
   because that routine runs a non-linear optimiser with a numerical Jacobian
   (measured 240 ms against ~10 ms for 1100 matches with SIP order 2, same
   accuracy), fits no inverse (AP/BP) coefficients and cannot keep a header
   distortion; the result is an ordinary
   :class:`astropy.wcs.WCS` (with :class:`astropy.wcs.Sip` when the order is
   >= 2) that round-trips through a FITS header.

Pixel convention: 0-based ``(x, y)``, ``(0, 0)`` is the centre of the first
pixel, as everywhere in :mod:`diffim`; arrays are ``[y, x]``.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np
import pandas as pd
from astropy.wcs import WCS, Sip
from scipy.spatial import cKDTree
from scipy.stats import poisson

from .errors import AstrometryError
from .residuals import random_effect
from .stats import robust_std

logger = logging.getLogger(__name__)

__all__ = ["AstrometryResult", "fit_wcs", "match_catalogs"]

#: Size of a bin of the offset-vote histogram, pixels.  Peaks are summed over
#: 2x2 bins, so a cluster narrower than one bin is never split.
_VOTE_BIN_PX = 4.0
#: Largest pattern mismatch (pixels, at the farthest star) left by the
#: rotation/scale grid spacing; a quarter of a bin keeps clusters compact.
_GRID_TOLERANCE_PX = 1.0
#: Accept a vote peak only if the expected number of equally high random
#: peaks over all cells of all trials is below this.
_FALSE_ALARM = 1e-3
#: A second peak this close (in excess votes) to the best one is ambiguous.
_AMBIGUITY_RATIO = 0.5
#: Matches per polynomial coefficient (per axis) needed to use a SIP order.
#: 4 lets 40 matches try order 3, and the leave-one-out comparison decides: on
#: an independent simulator's images with 40-49 matches and 3-15 px of radial
#: distortion, order 2 (all that 5 allowed) left 52-220 mas against the truth,
#: order 3 10-26 mas; with 3 per term one image with 32 matches got worse.
_MATCHES_PER_TERM = 4
#: Fewest clipped matches per coefficient for an order to be considered.
_KEPT_PER_TERM = 2
#: A higher SIP order must lower the leave-one-out scatter by more than this
#: fraction to be chosen (:func:`_fit_clipped`).
_ORDER_GAIN = 0.05
#: Smallest matching radius, pixels (centroid noise is ~0.05 px; 1 px keeps
#: every real pair while excluding almost all chance neighbours).
_MIN_RADIUS_PX = 1.0
_ARCSEC_PER_DEG = 3600.0


@dataclass(frozen=True, eq=False)
class AstrometryResult:
    """The fitted WCS and its diagnostics.

    Attributes
    ----------
    wcs : astropy.wcs.WCS
        Fitted celestial WCS (``RA---TAN-SIP`` when a SIP order >= 2 was
        fitted, else ``RA---TAN``), 0-based pixel ``(x, y)`` <-> ``(ra, dec)``
        in degrees, ICRS.
    rms_arcsec : float
        RMS on-sky distance between matched sources and reference stars,
        ``sqrt(mean(dra_cosdec**2 + ddec**2))``, arcsec, each match weighted
        as in the fit (``1 / (err^2 + tau^2)``; all the same without
        ``position_err``), so that it measures the fit, not how many faint
        stars were matched.
    n_matched : int
        Number of matches used in the final fit (after clipping).
    n_ref_in_field : int
        Reference stars inside the image footprint of the header WCS.
    shift_arcsec : float
        Distance on the sky between the header's and the fitted WCS's
        position of the image centre, arcsec.
    rotation_deg : float
        Rotation of the star pattern on the detector relative to where the
        header WCS puts it, degrees, counter-clockwise in the pixel ``x-y``
        plane (a similarity fit about the image centre).
    scale_change : float
        Fitted pixel scale divided by the header's pixel scale, minus one.
    sip_order : int
        SIP order used (``1`` means a pure TAN solution).
    search_votes : int
        Votes in the winning peak of the offset search.
    search_background : float
        Mean votes per (2x2-bin) cell in the winning trial, away from the peak.
    matches : pandas.DataFrame
        One row per used match: ``src_index`` / ``ref_index`` (indices into
        the input arrays), ``x``, ``y`` (source pixel), ``ref_x``, ``ref_y``
        (reference star through the fitted WCS, pixels), ``dx_px``, ``dy_px``
        (source minus reference, pixels), ``dra_arcsec`` (times cos dec) and
        ``ddec_arcsec`` (source minus reference on the sky, arcsec).
    """

    wcs: WCS
    rms_arcsec: float
    n_matched: int
    n_ref_in_field: int
    shift_arcsec: float
    rotation_deg: float
    scale_change: float
    sip_order: int
    search_votes: int
    search_background: float
    matches: pd.DataFrame


@dataclass(frozen=True)
class _Similarity:
    """``p' = centre + k R(theta) (p - centre) + shift`` in pixels."""

    theta: float
    k: float
    shift: np.ndarray
    centre: np.ndarray

    def apply(self, x, y):
        c, s = np.cos(self.theta), np.sin(self.theta)
        u, v = x - self.centre[0], y - self.centre[1]
        return (self.centre[0] + self.k * (c * u - s * v) + self.shift[0],
                self.centre[1] + self.k * (s * u + c * v) + self.shift[1])


@dataclass
class _PolyModel:
    """Intermediate world coordinates (deg) as a polynomial of pixel offsets.

    ``xi, eta = sum_ij coef[:, n] * (u / norm)**i * (v / norm)**j`` with
    ``u = x - crpix[0]``, ``v = y - crpix[1]`` (0-based pixels) and the
    gnomonic projection about ``crval``.  This is exactly a TAN-SIP WCS.
    When ``distortion`` (a header WCS with SIP) is set, its SIP polynomial
    maps pixels to focal-plane coordinates first, and ``crpix`` refers to
    those.
    """

    crval: np.ndarray
    crpix: np.ndarray
    norm: float
    order: int
    coef: np.ndarray  # (2, n_terms)
    distortion: WCS | None = None


# ----------------------------------------------------------------------------
# matching


def match_catalogs(x, y, ref_x, ref_y, *, radius_px):
    """Unique nearest-neighbour matching of two point lists.

    A source and a reference are paired when each is the other's nearest
    neighbour and they are closer than ``radius_px``, so every source and
    every reference appears in at most one pair.

    Parameters
    ----------
    x, y : array_like
        Source positions, pixels (any planar coordinates in the same units as
        the reference positions and the radius).
    ref_x, ref_y : array_like
        Reference positions, pixels.
    radius_px : float
        Largest accepted distance, pixels.

    Returns
    -------
    i_src, i_ref : ndarray of int
        Indices of matched sources and references, sorted by ``i_src``.
    dist : ndarray of float
        Distances of the pairs, pixels.
    """
    src = _as_points(x, y, "x, y")
    ref = _as_points(ref_x, ref_y, "ref_x, ref_y")
    if not np.isfinite(radius_px) or radius_px <= 0:
        raise ValueError(f"radius_px must be a positive number, got {radius_px}")
    empty = (np.zeros(0, int), np.zeros(0, int), np.zeros(0))
    if len(src) == 0 or len(ref) == 0:
        return empty
    dist, i_ref = cKDTree(ref).query(src, distance_upper_bound=radius_px)
    _, i_back = cKDTree(src).query(ref, distance_upper_bound=radius_px)
    i_src = np.flatnonzero(np.isfinite(dist))
    i_ref = i_ref[i_src]
    mutual = i_back[i_ref] == i_src
    return i_src[mutual], i_ref[mutual], dist[i_src[mutual]]


def _as_points(x, y, what):
    x = np.asarray(x, dtype=float)
    y = np.asarray(y, dtype=float)
    if x.ndim != 1 or x.shape != y.shape:
        raise ValueError(f"{what} must be 1-D arrays of equal length, got "
                         f"shapes {x.shape} and {y.shape}")
    if not (np.all(np.isfinite(x)) and np.all(np.isfinite(y))):
        raise ValueError(f"{what} contain NaN or infinite values")
    return np.column_stack([x, y])


# ----------------------------------------------------------------------------
# public entry point


def fit_wcs(x, y, flux, ref_ra, ref_dec, ref_mag, approx_wcs, *, shape,
            max_shift_arcsec=10.0, max_rot_deg=0.2, max_scale=0.01,
            sip_order=2, min_matches=6, clip=3.0, max_rms_arcsec=0.5,
            n_search=300, position_err=None):
    """Fit a TAN-SIP WCS of an exposure against a reference catalog.

    Parameters
    ----------
    x, y : array_like
        0-based pixel centroids of detected sources (``(0, 0)`` is the centre
        of the first pixel).  Non-finite rows are ignored.
    flux : array_like
        Instrumental fluxes of the sources (any unit); only their order is
        used, to pick the brightest sources for the pattern search.
    ref_ra, ref_dec : array_like
        Reference star positions, degrees (ICRS).
    ref_mag : array_like
        Reference star magnitudes (smaller is brighter); only their order is
        used.
    approx_wcs : astropy.wcs.WCS
        Approximate celestial WCS from the exposure header.
    shape : tuple of int
        ``(ny, nx)`` of the image.
    max_shift_arcsec : float
        Largest header position error searched, arcsec.
    max_rot_deg : float
        Largest header rotation error searched, degrees.
    max_scale : float
        Largest fractional header scale error searched.
    sip_order : int
        Largest SIP order of the final fit; lowered automatically when there
        are fewer than ``_MATCHES_PER_TERM * (order + 1) * (order + 2) / 2``
        matches, and to the order whose leave-one-out residuals are smallest
        (:func:`_fit_clipped`).  ``< 2`` fits a pure TAN WCS.  When the
        header WCS has SIP terms, fits on top of its distortion compete with
        the plain ones; when the matches support only a linear fit, only the
        linear part is refitted on top of it.
    min_matches : int
        Fewest matches (and reference stars in the field) accepted.
    clip : float
        Residual clipping threshold, in robust standard deviations per axis.
    max_rms_arcsec : float
        Largest accepted RMS of the matched residuals, arcsec.
    n_search : int
        Number of brightest sources used by the pattern search (twice as
        many reference stars are used).
    position_err : array_like, optional
        Per-axis centroid error of each source, pixels (for a windowed
        centroid about ``sqrt(2) sigma_PSF / SNR``, :func:`diffim.psf.
        centroid_error`; a source with a non-finite error is left out, as
        one with a non-finite position).  Each match is then
        weighted by ``1 / (err^2 + tau^2)``, ``tau^2`` being the matches'
        own scatter beyond their errors (:func:`_match_scatter`), and
        clipped on its residual in units of ``sqrt(err^2 + tau^2)``, never
        at fewer of those units than ``clip``.
        Without it every match counts the same; then the faint stars,
        whose centroids are 10-50x noisier than the bright ones, decide
        the distortion where they are the only matches, and the bright
        stars there are clipped as outliers (see :func:`_clip_at_order`).

    Returns
    -------
    AstrometryResult

    Raises
    ------
    AstrometryError
        Too few reference stars in the header footprint, no significant or
        an ambiguous peak in the offset search, too few matches, or a fit RMS
        above ``max_rms_arcsec``.
    ValueError
        Inconsistent or invalid inputs.
    """
    src, order_src, ref = _validate(x, y, flux, ref_ra, ref_dec, ref_mag,
                                    approx_wcs, shape, min_matches, clip, n_search,
                                    max_shift_arcsec, max_rot_deg, max_scale, position_err)
    ny, nx = shape
    centre = np.array([(nx - 1) / 2.0, (ny - 1) / 2.0])
    scale_as = _pixel_scale_arcsec(approx_wcs, centre)
    if not (np.isfinite(scale_as) and scale_as > 0):
        raise AstrometryError("the header WCS is degenerate at the image centre (pixel scale "
                              f"{scale_as!r} arcsec); check CRPIX, CRVAL and the CD matrix")
    max_shift_px = max_shift_arcsec / scale_as
    margin_px = (max_shift_px + np.hypot(nx, ny) / 2
                 * (np.radians(max_rot_deg) + max_scale) + 2 * _VOTE_BIN_PX)
    i_ref, rx, ry, n_in = _refs_near_field(approx_wcs, ref, shape, margin_px)
    if n_in < min_matches:
        raise AstrometryError(
            f"Only {n_in} reference stars fall within the image footprint of "
            f"the header WCS (at least {min_matches} are needed); is the WCS "
            "far off, or is this another field?")
    if len(src["x"]) < min_matches:
        raise AstrometryError(
            f"Only {len(src['x'])} sources were detected on the image (at least "
            f"{min_matches} are needed to fit a WCS).")
    bright_src = order_src[:n_search]
    bright_ref = np.argsort(ref["mag"][i_ref], kind="stable")[:2 * n_search]
    sim, votes, bkg = _search_offset(
        src["x"][bright_src], src["y"][bright_src], rx[bright_ref], ry[bright_ref],
        centre, max_shift_px=max_shift_px, max_rot=np.radians(max_rot_deg),
        max_scale=max_scale, min_votes=min_matches, n_ref_in_field=n_in)
    px, py = sim.apply(rx, ry)
    m_src, m_ref, _ = match_catalogs(src["x"], src["y"], px, py,
                                     radius_px=_VOTE_BIN_PX)
    model, keep, tau2, m_src, m_ref = _iterate_fit(
        src, ref, i_ref, m_src, m_ref, centre, approx_wcs, scale_as,
        sip_order=sip_order, clip=clip, min_matches=min_matches, shape=shape)
    wcs = _to_astropy(model, shape)
    weights = 1.0 / (src["err"][m_src[keep]] ** 2 + tau2)
    return _make_result(wcs, approx_wcs, src, ref, i_ref, m_src[keep],
                        m_ref[keep], n_in, model.order, votes, bkg, shape,
                        max_rms_arcsec, weights)


#: Largest error (pixels) of :func:`shifted_wcs`'s TAN-SIP against the exact
#: composition on its grid; the order is raised (up to 5) until it is met.
SHIFTED_WCS_TOLERANCE = 2e-3


def shifted_wcs(wcs: WCS, shape, offset, *, min_order: int = 1,
                n_grid: int = 41) -> WCS | None:
    """The TAN-SIP WCS ``W'(x) = W(x - d(x))``: ``wcs`` moved by a pixel offset field.

    A star that ``wcs`` puts at pixel ``x - d(x)`` is at ``x`` under the
    result; :mod:`diffim.register` uses it to carry the template onto the
    science image's stars.

    Parameters
    ----------
    wcs : astropy.wcs.WCS
        Celestial WCS (TAN or TAN-SIP, or anything astropy evaluates).
    shape : tuple of int
        ``(ny, nx)`` of the image.
    offset : callable
        ``offset(x, y) -> (d_x, d_y)``, pixels, at 0-based pixel positions.
    min_order : int
        Polynomial order of ``offset`` (the fit starts at the larger of it
        and ``wcs``'s SIP order).
    n_grid : int
        The composition is sampled on ``n_grid x n_grid`` points spanning the
        image (and 5 % beyond it) and fitted by a TAN-SIP polynomial whose
        order is raised until it reproduces the samples to
        :data:`SHIFTED_WCS_TOLERANCE`.

    Returns
    -------
    astropy.wcs.WCS or None
        None when no order up to 5 reproduces the composition (an exotic
        input WCS): the caller keeps ``wcs``.
    """
    ny, nx = shape
    gx, gy = np.meshgrid(np.linspace(-0.05 * nx, 1.05 * (nx - 1), n_grid),
                         np.linspace(-0.05 * ny, 1.05 * (ny - 1), n_grid))
    gx, gy = gx.ravel(), gy.ravel()
    dx, dy = offset(gx, gy)
    ra, dec = (np.asarray(a, float) for a in wcs.all_pix2world(gx - dx, gy - dy, 0))
    centre = np.array([(nx - 1) / 2.0, (ny - 1) / 2.0])
    crval = np.asarray(wcs.all_pix2world([centre[0]], [centre[1]], 0), float).ravel()
    sip_order = max(wcs.sip.a_order, wcs.sip.b_order) if wcs.sip is not None else 1
    for order in range(max(sip_order, min_order, 1), 6):
        model = _fit_poly(gx, gy, ra, dec, centre, crval, order)
        rx, ry = _residuals_px(model, gx, gy, ra, dec)
        if float(np.max(np.hypot(rx, ry))) <= SHIFTED_WCS_TOLERANCE:
            return _to_astropy(model, shape)
    return None


def _validate(x, y, flux, ref_ra, ref_dec, ref_mag, approx_wcs, shape,
              min_matches, clip, n_search, max_shift_arcsec, max_rot_deg,
              max_scale, position_err=None):
    """Check inputs; return source table, brightness order and reference table."""
    if not isinstance(approx_wcs, WCS) or approx_wcs.naxis != 2 \
            or not approx_wcs.has_celestial:
        raise ValueError("approx_wcs must be a 2-axis celestial astropy WCS")
    if len(shape) != 2 or min(shape) < 1:
        raise ValueError(f"shape must be (ny, nx) with positive sizes, got {shape}")
    arrays = [np.asarray(a, dtype=float) for a in (x, y, flux)]
    if any(a.ndim != 1 or a.shape != arrays[0].shape for a in arrays):
        raise ValueError("x, y and flux must be 1-D arrays of equal length")
    if position_err is None:
        err = np.zeros_like(arrays[0])
    else:
        err = np.asarray(position_err, dtype=float)
        if err.shape != arrays[0].shape:
            raise ValueError("position_err must be a 1-D array as long as x")
        if np.any(err[np.isfinite(err)] < 0):
            raise ValueError("position_err must not be negative")
    refs = [np.asarray(a, dtype=float) for a in (ref_ra, ref_dec, ref_mag)]
    if any(a.ndim != 1 or a.shape != refs[0].shape for a in refs):
        raise ValueError("ref_ra, ref_dec and ref_mag must be 1-D arrays of "
                         "equal length")
    limits = (max_shift_arcsec, max_rot_deg, max_scale)
    if not (np.all(np.isfinite(limits)) and max_shift_arcsec > 0
            and max_rot_deg >= 0 and 0 <= max_scale < 0.5):
        raise ValueError("max_shift_arcsec must be > 0, max_rot_deg >= 0 and "
                         f"0 <= max_scale < 0.5 (got {limits})")
    if min_matches < 3 or clip <= 0 or n_search < min_matches:
        raise ValueError("min_matches must be >= 3, clip > 0 and n_search >= "
                         f"min_matches (got {min_matches}, {clip}, {n_search})")
    good = np.isfinite(arrays[0]) & np.isfinite(arrays[1]) & np.isfinite(err)
    idx = np.flatnonzero(good)
    src = {"x": arrays[0][good], "y": arrays[1][good], "err": err[good], "index": idx}
    bright = np.where(np.isfinite(arrays[2][good]), arrays[2][good], -np.inf)
    order_src = np.argsort(-bright, kind="stable")
    rgood = np.isfinite(refs[0]) & np.isfinite(refs[1])
    mag = np.where(np.isfinite(refs[2]), refs[2], np.inf)
    ref = {"ra": refs[0], "dec": refs[1], "mag": mag, "good": rgood}
    return src, order_src, ref


# ----------------------------------------------------------------------------
# reference stars in the field


def _pixel_scale_arcsec(wcs, centre):
    """Mean pixel scale at the image centre, arcsec per pixel."""
    cx, cy = centre
    pts = np.array([[cx, cy], [cx + 1, cy], [cx, cy + 1]])
    ra, dec = wcs.all_pix2world(pts[:, 0], pts[:, 1], 0)
    xi, eta = _gnomonic(ra, dec, np.array([ra[0], dec[0]]))
    jac = np.array([[xi[1] - xi[0], xi[2] - xi[0]], [eta[1] - eta[0], eta[2] - eta[0]]])
    return float(np.sqrt(abs(np.linalg.det(jac)))) * _ARCSEC_PER_DEG


def _refs_near_field(approx_wcs, ref, shape, margin_px):
    """Reference stars projected through the header WCS near the image.

    Returns indices (into the reference arrays) of stars within
    ``margin_px`` of the image, their header pixel positions, and the number
    strictly inside the image.
    """
    ny, nx = shape
    cx, cy = (nx - 1) / 2.0, (ny - 1) / 2.0
    corners_x = np.array([cx, -0.5, nx - 0.5, -0.5, nx - 0.5])
    corners_y = np.array([cy, -0.5, -0.5, ny - 0.5, ny - 0.5])
    cra, cdec = approx_wcs.all_pix2world(corners_x, corners_y, 0)
    radius = np.max(_separation_deg(cra[0], cdec[0], cra[1:], cdec[1:]))
    scale_deg = _pixel_scale_arcsec(approx_wcs, np.array([cx, cy])) / _ARCSEC_PER_DEG
    radius += 1.5 * margin_px * scale_deg
    near = ref["good"] & (_separation_deg(cra[0], cdec[0], ref["ra"], ref["dec"])
                          < radius)
    idx = np.flatnonzero(near)
    rx, ry = _sky_to_pixel(approx_wcs, ref["ra"][idx], ref["dec"][idx])
    inside = np.isfinite(rx) & np.isfinite(ry)
    close = inside & (rx > -0.5 - margin_px) & (rx < nx - 0.5 + margin_px) \
        & (ry > -0.5 - margin_px) & (ry < ny - 0.5 + margin_px)
    n_in = int(np.sum(inside & (rx > -0.5) & (rx < nx - 0.5)
                      & (ry > -0.5) & (ry < ny - 0.5)))
    return idx[close], rx[close], ry[close], n_in


def _separation_deg(ra0, dec0, ra, dec):
    """Great-circle distance (haversine), degrees."""
    ra0, dec0, ra, dec = (np.radians(a) for a in (ra0, dec0, ra, dec))
    h = (np.sin((dec - dec0) / 2) ** 2
         + np.cos(dec) * np.cos(dec0) * np.sin((ra - ra0) / 2) ** 2)
    return np.degrees(2 * np.arcsin(np.sqrt(np.clip(h, 0, 1))))


def _sky_to_pixel(wcs, ra, dec):
    """World to 0-based pixel; NaN where the inversion fails."""
    if len(ra) == 0:
        return np.zeros(0), np.zeros(0)
    with np.errstate(invalid="ignore", divide="ignore"):
        px, py = wcs.all_world2pix(ra, dec, 0, quiet=True)
    return np.asarray(px, float), np.asarray(py, float)


def _gnomonic(ra, dec, crval):
    """Gnomonic (TAN) projection about ``crval`` as a WCS sees it, degrees.

    Uses astropy's own TAN projection (unit CDELT, CRPIX at 1) so the
    intermediate coordinates are exactly those of the fitted WCS.
    """
    w = WCS(naxis=2)
    w.wcs.ctype = ["RA---TAN", "DEC--TAN"]
    w.wcs.crval = crval
    w.wcs.crpix = [1.0, 1.0]
    w.wcs.cdelt = [1.0, 1.0]
    w.wcs.radesys = "ICRS"
    p, q = w.wcs_world2pix(np.atleast_1d(ra), np.atleast_1d(dec), 1)
    return p - 1.0, q - 1.0


def _gnomonic_inverse(xi, eta, crval):
    """Inverse of :func:`_gnomonic`: intermediate coordinates (deg) to sky."""
    w = WCS(naxis=2)
    w.wcs.ctype = ["RA---TAN", "DEC--TAN"]
    w.wcs.crval = crval
    w.wcs.crpix = [1.0, 1.0]
    w.wcs.cdelt = [1.0, 1.0]
    w.wcs.radesys = "ICRS"
    return w.wcs_pix2world(np.atleast_1d(xi) + 1.0, np.atleast_1d(eta) + 1.0, 1)


# ----------------------------------------------------------------------------
# pattern search


def _trial_grid(max_rot, max_scale, r_max):
    """Rotation (rad) and scale-factor trials, nearest to the header first.

    The spacing keeps the pattern mismatch at radius ``r_max`` (pixels)
    below ``_GRID_TOLERANCE_PX``.
    """
    step = np.sqrt(2.0) * _GRID_TOLERANCE_PX / max(r_max, 1.0)
    n_rot = 2 * int(np.ceil(max_rot / step)) + 1
    n_scl = 2 * int(np.ceil(max_scale / step)) + 1
    if n_rot * n_scl > 200_000:
        raise ValueError(f"max_rot_deg and max_scale span {n_rot * n_scl} trials "
                         "for this image size; reduce them")
    rot, scl = np.meshgrid(np.linspace(-max_rot, max_rot, n_rot),
                           np.linspace(-max_scale, max_scale, n_scl), indexing="ij")
    rot, scl = rot.ravel(), scl.ravel()
    first = np.argsort(np.hypot(rot / max(max_rot, 1e-12),
                                scl / max(max_scale, 1e-12)), kind="stable")
    return rot[first], 1.0 + scl[first]


def _vote_maps(dx_rel, dy_rel, pairs, sx, sy, trials, half_width):
    """2x2-bin summed vote maps of pair offsets, shape (n_trials, nb, nb).

    ``sx, sy`` (sources) and ``dx_rel, dy_rel`` (references) are relative to
    the rotation centre; ``pairs`` index them (fields ``i`` and ``j``).
    """
    rot, k = trials
    nb = int(np.ceil(2 * half_width / _VOTE_BIN_PX))
    c, s = np.cos(rot)[:, None], np.sin(rot)[:, None]
    u, v = dx_rel[pairs["j"]][None, :], dy_rel[pairs["j"]][None, :]
    offx = sx[pairs["i"]][None, :] - k[:, None] * (c * u - s * v)
    offy = sy[pairs["i"]][None, :] - k[:, None] * (s * u + c * v)
    ix = np.floor((offx + half_width) / _VOTE_BIN_PX).astype(np.int64)
    iy = np.floor((offy + half_width) / _VOTE_BIN_PX).astype(np.int64)
    ok = (ix >= 0) & (ix < nb) & (iy >= 0) & (iy < nb)
    trial = np.broadcast_to(np.arange(len(rot))[:, None], ix.shape)
    flat = (trial[ok] * nb + iy[ok]) * nb + ix[ok]
    hist = np.bincount(flat, minlength=len(rot) * nb * nb).reshape(len(rot), nb, nb)
    return hist[:, :-1, :-1] + hist[:, 1:, :-1] + hist[:, :-1, 1:] + hist[:, 1:, 1:]


def _best_vote_map(dx_rel, dy_rel, pairs, sx, sy, trials, half_width):
    """Index of the trial with the highest vote peak, and its vote map.

    Trials are processed in chunks to bound memory (~1e6 pair offsets).
    """
    n_trials = len(trials[0])
    chunk = max(1, int(1_000_000 // max(len(pairs), 1)))
    best, best_map = -1, None
    for lo in range(0, n_trials, chunk):
        sub = (trials[0][lo:lo + chunk], trials[1][lo:lo + chunk])
        maps = _vote_maps(dx_rel, dy_rel, pairs, sx, sy, sub, half_width)
        peaks = maps.reshape(len(maps), -1).max(axis=1)
        i = int(np.argmax(peaks))
        if best_map is None or peaks[i] > best_map.max():
            best, best_map = lo + i, maps[i]
    return best, best_map


def _search_offset(sx, sy, rx, ry, centre, *, max_shift_px, max_rot, max_scale,
                   min_votes, n_ref_in_field):
    """Find rotation, scale and shift of the reference pattern by voting.

    Returns the best :class:`_Similarity` (reference header pixels to source
    pixels), the votes in its peak and the mean background votes per cell.
    """
    dx_rel, dy_rel = rx - centre[0], ry - centre[1]
    sx_rel, sy_rel = sx - centre[0], sy - centre[1]
    r_max = max(np.max(np.hypot(dx_rel, dy_rel), initial=1.0),
                np.max(np.hypot(sx_rel, sy_rel), initial=1.0))
    trials = _trial_grid(max_rot, max_scale, r_max)
    half_width = max_shift_px + 2 * _VOTE_BIN_PX
    # candidate pairs: any pair that can fall in the histogram in some trial
    reach = half_width * np.sqrt(2) + r_max * (max_rot + max_scale) * 1.05 + 1.0
    pairs = cKDTree(np.column_stack([sx, sy])).sparse_distance_matrix(
        cKDTree(np.column_stack([rx, ry])), reach, output_type="ndarray")
    if len(pairs) == 0:
        _raise_no_peak(0, 0.0, n_ref_in_field)
    best, peak_map = _best_vote_map(dx_rel, dy_rel, pairs, sx_rel, sy_rel,
                                    trials, half_width)
    iy, ix = np.unravel_index(np.argmax(peak_map), peak_map.shape)
    votes, bkg = _check_peak(peak_map, iy, ix, len(trials[0]) * peak_map.size,
                             min_votes, n_ref_in_field)
    sim = _peak_similarity(trials, best, ix, iy, half_width, centre,
                           dx_rel, dy_rel, pairs, np.column_stack([sx_rel, sy_rel]))
    return sim, votes, bkg


def _check_peak(peak_map, iy, ix, n_cells, min_votes, n_ref_in_field):
    """Raise unless the peak is significant and unambiguous.

    The background is the mean of the map away from the peak; a peak is
    significant when the expected number of chance (Poisson) peaks at least
    as high, over all ``n_cells`` cells of all trials, is below
    ``_FALSE_ALARM``.  Returns the peak votes and the background.
    """
    votes = int(peak_map[iy, ix])
    away = np.ones(peak_map.shape, bool)
    away[max(iy - 2, 0):iy + 3, max(ix - 2, 0):ix + 3] = False
    bkg = max(float(peak_map[away].mean()) if away.any() else 0.0,
              1.0 / peak_map.size)
    false_alarm = n_cells * poisson.sf(votes - 1, bkg)
    logger.debug("offset search: peak %d votes over %.2f background, "
                 "false-alarm %.2g", votes, bkg, false_alarm)
    if votes < min_votes or false_alarm > _FALSE_ALARM:
        _raise_no_peak(votes, bkg, n_ref_in_field)
    second = int(peak_map[away].max()) if away.any() else 0
    if second - bkg > _AMBIGUITY_RATIO * (votes - bkg) and \
            n_cells * poisson.sf(second - 1, bkg) < _FALSE_ALARM:
        raise AstrometryError(
            f"The offset search against the reference catalog is ambiguous: two "
            f"candidate positions have {votes} and {second} matching stars. "
            "The field may be too crowded or repetitive for the header WCS "
            "tolerance; check the header WCS.")
    return votes, bkg


def _peak_similarity(trials, best, ix, iy, half_width, centre, dx_rel, dy_rel,
                     pairs, shifted):
    """Similarity transform of the winning trial and vote cell.

    The shift is the median offset of the pairs voting in the cell (its
    2x2 bins), which is more precise than the cell centre.
    """
    theta, k = float(trials[0][best]), float(trials[1][best])
    c, s = np.cos(theta), np.sin(theta)
    u, v = dx_rel[pairs["j"]], dy_rel[pairs["j"]]
    offx = shifted[pairs["i"], 0] - k * (c * u - s * v)
    offy = shifted[pairs["i"], 1] - k * (s * u + c * v)
    lo_x, lo_y = ix * _VOTE_BIN_PX - half_width, iy * _VOTE_BIN_PX - half_width
    inside = ((offx >= lo_x) & (offx < lo_x + 2 * _VOTE_BIN_PX)
              & (offy >= lo_y) & (offy < lo_y + 2 * _VOTE_BIN_PX))
    shift = np.array([np.median(offx[inside]), np.median(offy[inside])])
    return _Similarity(theta=theta, k=k, shift=shift, centre=centre)


def _raise_no_peak(votes, bkg, n_ref_in_field):
    raise AstrometryError(
        "No significant match between the detected sources and the reference "
        f"catalog was found near the header WCS (best candidate: {votes} "
        f"coincident stars where {bkg:.1f} are expected by chance, "
        f"{n_ref_in_field} reference stars in the field). The header WCS may "
        "be further off than the search allows, or the image may show "
        "another field.")


# ----------------------------------------------------------------------------
# iterative fit


def _usable_order(n, sip_order):
    """Highest polynomial order <= max(sip_order, 1) that n matches support."""
    order = max(int(sip_order), 1)
    while order > 1 and n < _MATCHES_PER_TERM * (order + 1) * (order + 2) // 2:
        order -= 1
    return order


def _iterate_fit(src, ref, i_ref, m_src, m_ref, centre, approx_wcs, scale_as, *,
                 sip_order, clip, min_matches, shape, n_iter=6):
    """Alternate fitting, clipping and re-matching with a shrinking radius.

    ``m_ref`` indexes ``i_ref``.  When the header has SIP distortion, fits on
    top of it compete with the plain ones (:func:`_fit_clipped`); when the
    matches support only a linear fit, only the linear part is fitted on top
    of it.  Returns the model, the clipping mask and the final match index
    arrays.
    """
    header_sip = approx_wcs if approx_wcs.sip is not None else None
    crval = np.asarray(approx_wcs.all_pix2world([centre[0]], [centre[1]], 0),
                       float).ravel()
    ra_f, dec_f = ref["ra"][i_ref], ref["dec"][i_ref]
    order = 1  # the first fit is linear: the search leaves ~1 px errors
    for it in range(n_iter):
        _check_count(len(m_src), min_matches, "matched")
        model, keep, sigma_px, tau2 = _fit_clipped(
            src["x"][m_src], src["y"][m_src], ra_f[m_ref], dec_f[m_ref], src["err"][m_src],
            centre, crval, order, clip, min_matches, distortion=header_sip)
        crval = model.crval
        if it == n_iter - 1:
            break
        radius = max(_MIN_RADIUS_PX, 2.0 * clip * sigma_px)
        new_src, new_ref = _rematch(model, src, ra_f, dec_f, scale_as, radius)
        new_order = _usable_order(len(new_src), sip_order)
        logger.debug("astrometry iteration %d: %d matches within %.2f px, "
                     "sigma %.3f px, next order %d", it, len(new_src), radius,
                     sigma_px, new_order)
        if (new_order == order and np.array_equal(new_src, m_src)
                and np.array_equal(new_ref, m_ref)):
            break
        m_src, m_ref, order = new_src, new_ref, new_order
    if model.distortion is not None:
        model = _absorb_distortion(model, centre, shape)
    return model, keep, tau2, m_src, m_ref


def _absorb_distortion(model, centre, shape, n_grid=25):
    """Re-express header SIP + polynomial fit as one TAN-SIP polynomial.

    A linear map of an order-p polynomial is an order-p polynomial, so a fit
    on a grid over the image is exact for a linear fit on top of the header.
    An order-q fit on top of it composes to order p * q; it is refitted at
    order ``max(p, q)`` (at most 5), which leaves only the products of the
    fit's own non-linear terms with the header's (logged).
    """
    ny, nx = shape
    sip = model.distortion.sip
    order = min(max(sip.a_order, sip.b_order, model.order), 5)
    gx, gy = np.meshgrid(np.linspace(0, nx - 1, n_grid), np.linspace(0, ny - 1, n_grid))
    xi, eta = _poly_eval(model, gx.ravel(), gy.ravel())
    ra, dec = _gnomonic_inverse(xi, eta, model.crval)
    out = _fit_poly(gx.ravel(), gy.ravel(), ra, dec, centre, model.crval, order)
    if model.order > 1:
        rx, ry = _residuals_px(out, gx.ravel(), gy.ravel(), ra, dec)
        logger.info("astrometry: order-%d fit on the header's order-%d SIP refitted at order "
                    "%d, largest error %.1e px", model.order, max(sip.a_order, sip.b_order),
                    order, float(np.max(np.hypot(rx, ry))))
    return out


def _check_count(n, min_matches, what):
    if n < min_matches:
        raise AstrometryError(
            f"Only {n} sources were {what} to the reference catalog (at least "
            f"{min_matches} are needed); the astrometric fit is not reliable.")


def _rematch(model, src, ra, dec, scale_as, radius_px):
    """Match sources and references on the model's tangent plane."""
    sxi, seta = _poly_eval(model, src["x"], src["y"])
    rxi, reta = _gnomonic(ra, dec, model.crval)
    to_px = _ARCSEC_PER_DEG / scale_as
    m_src, m_ref, _ = match_catalogs(sxi * to_px, seta * to_px, rxi * to_px,
                                     reta * to_px, radius_px=radius_px)
    return m_src, m_ref


def _fit_clipped(x, y, ra, dec, err, centre, crval, order, clip, min_matches, *,
                 distortion=None, n_iter=5):
    """Fit the polynomial model with iterative clipping of normalised residuals.

    Every order from ``order`` down to 2 (or ``order`` alone when it is 1)
    is fitted and clipped on its own (:func:`_clip_at_order`); with a header
    ``distortion``, so is every order from ``order`` down to 1 on top of it
    (the header's SIP is the camera's distortion model, and a low order on
    top of it can describe what no low order alone can: an independent
    simulator's 15 px radial distortion, with 30-50 matches per 1000 x 1040
    image, allowed order 2 alone and left 140-150 mas).  The one whose
    leave-one-out residuals over *all* the matches have the smallest robust
    scatter wins; the simplest within :data:`_ORDER_GAIN` of it, by number of
    coefficients, the header-based one first at the same order.  (When
    ``order`` is 1 only the header-based linear fit is made.)  The residuals
    are weighted for that comparison by ``1 / (err^2 + tau^2)`` with one
    ``tau^2`` for every order (that of the highest order fitted), so an order
    is not judged by its own estimate of how well it fits.  An order whose clipping keeps fewer than
    :data:`_KEPT_PER_TERM` matches per coefficient is not considered.
    (Re-judging the order on the number of clipped matches made order and
    clipping chase each other: 70 matches of an image with 3 px of
    distortion at the corners ended at order 2 and 85 mas, where order 3
    gives 39 mas; with ~35 matches order 3 overfits.)

    Returns the model, the mask of kept matches, the robust per-axis
    residual sigma of the kept matches in pixels and their ``tau^2``
    (:func:`_match_scatter`).
    """
    specs = _candidate_fits(order, distortion)
    candidates = []   # (model, keep, sigma, tau2), most coefficients first
    for n, (q, dist) in enumerate(specs):
        try:
            fit = _clip_at_order(x, y, ra, dec, err, centre, crval, q, clip,
                                 min_matches, dist, n_iter)
        except AstrometryError:   # clipped to too few at this order: try a lower one
            if n == len(specs) - 1 and not candidates:
                raise
            continue
        if q > 1 and fit[1].sum() < _KEPT_PER_TERM * (q + 1) * (q + 2) // 2:
            continue
        candidates.append(fit)
    if not candidates:  # no order keeps enough: the lowest one tried
        return fit
    score_var = err**2 + candidates[0][3]
    scores = [_loo_scatter(model, keep, x, y, ra, dec, err**2 + tau2, score_var)
              for model, keep, _, tau2 in candidates]
    best = min(scores)
    chosen = next(c for c, sc in zip(reversed(candidates), reversed(scores))
                  if sc <= (1.0 + _ORDER_GAIN) * best)
    return chosen


def _candidate_fits(order, distortion) -> list:
    """``(order, distortion)`` of the fits :func:`_fit_clipped` compares, most
    coefficients first (at the same order the plain fit before the one on top
    of the header's ``distortion``)."""
    if order <= 1:
        return [(1, distortion)]
    specs = []
    for q in range(order, 0, -1):
        if q >= 2:
            specs.append((q, None))
        if distortion is not None:
            specs.append((q, distortion))
    return specs


def _clip_at_order(x, y, ra, dec, err, centre, crval, order, clip, min_matches,
                   distortion, n_iter):
    """Fit at a fixed order, weighted, clipping at ``clip`` robust sigma until stable.

    The first fit weights every match the same and keeps them all; it only
    gives the first ``tau^2`` (:func:`_match_scatter`).  Every later fit
    weights by ``1 / (err^2 + tau^2)`` and clips residuals beyond ``clip``
    times the robust scatter of ``r / sqrt(err^2 + tau^2)``.  Clipping after
    an unweighted fit went wrong on the independent simulator's 1000 x 1040
    images: where only faint stars (S/N ~5, 0.4 px errors) were matched
    near an edge, they bent the order-3 polynomial, and the bright stars
    there, 0.25 px off the bent fit and 10 sigma by the scatter of the
    precise stars elsewhere, were clipped; the template made from that
    visit was 0.3 px off at those stars.  With ``err`` all zero the weights
    are all the same and this is the plain clipped fit.

    With errors given, the clipping scale is never below what ``err`` and
    ``tau`` predict (``r / sqrt(err^2 + tau^2)`` has a robust scatter of at
    least 1).  Clipping at the kept matches' own scatter spiralled where the
    errors do not describe the residuals: on a 512 x 512 test image with an
    8.6 px PSF (bright stars 0.1-0.4 px off through blending, faint ones
    with errors up to 5 px) the faint matches, whose errors exceed their
    residuals, set a scale far below 1; the bright stars were clipped,
    ``tau`` shrank with them to its floor, the fit kept 28 of 60 matches and
    its order-3 WCS was 3 px off at a corner.  With the floor ``tau`` is
    0.27 px, 59 matches are kept and the WCS is within 0.32 px inside the
    outer tenth of the image.  Without errors the scale is the kept
    matches' own, as in any sigma clipping.

    Returns ``(model, keep, sigma, tau2)``: ``sigma`` the robust per-axis
    scatter (pixels) of the kept matches' residuals.
    """
    keep = np.ones(len(x), bool)
    weights = None
    floor = 1.0 if np.any(err > 0) else 1e-6
    for _ in range(n_iter + 1):
        _check_count(int(keep.sum()), min_matches, "left after clipping matched")
        model = _fit_poly(x[keep], y[keep], ra[keep], dec[keep], centre, crval, order,
                          distortion=distortion,
                          weights=None if weights is None else weights[keep])
        rx, ry = _residuals_px(model, x, y, ra, dec)
        lev = _leverage(model, x[keep], y[keep], None if weights is None else weights[keep])
        tau2 = _match_scatter(rx[keep], ry[keep], err[keep], lev)
        total = np.sqrt(err**2 + tau2)
        scale = robust_std(np.concatenate([rx[keep], ry[keep]]) / np.tile(total[keep], 2))
        limit = clip * max(scale, floor) * total
        new_keep = keep if weights is None else (np.abs(rx) <= limit) & (np.abs(ry) <= limit)
        converged = weights is not None and np.array_equal(new_keep, keep)
        keep, weights = new_keep, 1.0 / total**2
        if converged:
            break
    sigma = max(float(robust_std(np.concatenate([rx[keep], ry[keep]]))), 1e-4)
    return model, keep, sigma, tau2


#: Smallest scatter of the matches beyond their errors, pixels (noiseless
#: inputs would otherwise get zero variance and infinite weights).
_MIN_TAU_PX = 1e-4


def _match_scatter(rx, ry, err, lev) -> float:
    """``tau^2`` (pixels^2): the matches' scatter about the fit beyond their ``err``.

    A reference position and a centroid disagree by more than the
    centroid's noise (the catalogue's own errors, a neighbour, a colour
    term): ``tau^2`` is the random-effect variance of the residuals, each
    scaled by ``1 / sqrt(1 - h)`` (``h`` its leverage) so that a fit of many
    coefficients to few matches does not shrink it, per axis pooled, with
    outliers left out (:func:`diffim.residuals.random_effect`).
    """
    scale = 1.0 / np.sqrt(np.clip(1.0 - lev, 1e-3, None))
    values = np.concatenate([rx * scale, ry * scale])
    tau2, _ = random_effect(values, np.tile(err**2, 2), many_outliers=True)
    return max(float(tau2), _MIN_TAU_PX**2)


def _leverage(model, x, y, weights=None):
    """Diagonal of the (weighted) hat matrix of the fit at the matches ``x, y``."""
    fx, fy = _apply_distortion(model.distortion, x, y)
    design = _design(fx - model.crpix[0], fy - model.crpix[1], model.order, model.norm)
    if weights is not None:
        design = design * np.sqrt(weights)[:, None]
    q, _ = np.linalg.qr(design)
    return np.minimum((q**2).sum(axis=1), 0.99)


def _residuals_px(model, x, y, ra, dec):
    """Source minus reference per axis, in pixels of the model's mean scale."""
    dxi, deta = _residuals_deg(model, x, y, ra, dec)
    scale_deg = np.sqrt(abs(np.linalg.det(_cd_matrix(model))))
    return dxi / scale_deg, deta / scale_deg


def _loo_scatter(model, keep, x, y, ra, dec, fit_var, score_var) -> float:
    """Robust scatter of the leave-one-out residuals of every match, normalised.

    Matches in the fit (``keep``, weights ``1 / fit_var``) get their
    leave-one-out residual ``r / (1 - h)`` (``h``: the leverage, the
    diagonal of the weighted hat matrix); the clipped ones their plain
    residual.  Each is divided by ``sqrt(score_var)``.
    """
    rx, ry = _residuals_px(model, x, y, ra, dec)
    lev = _leverage(model, np.asarray(x)[keep], np.asarray(y)[keep], 1.0 / fit_var[keep])
    rx[keep] /= 1.0 - lev
    ry[keep] /= 1.0 - lev
    norm = np.sqrt(score_var)
    return float(robust_std(np.concatenate([rx / norm, ry / norm])))


def _monomials(order):
    """Exponent pairs ``(i, j)`` with ``i + j <= order``, by total degree."""
    return [(d - j, j) for d in range(order + 1) for j in range(d + 1)]


def _design(u, v, order, norm):
    """Columns ``(u / norm)**i (v / norm)**j`` in :func:`_monomials` order."""
    terms = _monomials(order)
    un, vn = u / norm, v / norm
    return np.column_stack([un**i * vn**j for i, j in terms])


def _fit_poly(x, y, ra, dec, centre, crval, order, *, distortion=None, weights=None,
              n_iter=3):
    """Linear least-squares TAN-SIP fit with CRPIX fixed at ``centre``.

    The constant term moves the tangent point; two repeats bring it onto
    CRPIX to machine precision.  ``distortion``: see :class:`_PolyModel`.
    ``weights``: per match (both axes), default all 1.
    """
    x, y = _apply_distortion(distortion, x, y)
    norm = max(float(np.max(np.abs(np.concatenate([x - centre[0],
                                                   y - centre[1]])))), 1.0)
    design = _design(x - centre[0], y - centre[1], order, norm)
    for _ in range(n_iter):
        xi, eta = _gnomonic(ra, dec, crval)
        coef = _lstsq(design, np.column_stack([xi, eta]), weights)
        ra0, dec0 = _gnomonic_inverse(coef[0, 0], coef[0, 1], crval)
        crval = np.array([ra0[0], dec0[0]])
    xi, eta = _gnomonic(ra, dec, crval)
    coef = _lstsq(design, np.column_stack([xi, eta]), weights)
    coef[0] = 0.0  # residual constant is < 1e-12 deg after the repeats
    return _PolyModel(crval=crval, crpix=np.asarray(centre, float), norm=norm,
                      order=order, coef=coef.T.copy(), distortion=distortion)


def _apply_distortion(distortion, x, y):
    """Header SIP pixel -> focal-plane coordinates (identity without one)."""
    if distortion is None:
        return np.asarray(x, float), np.asarray(y, float)
    fx, fy = distortion.sip_pix2foc(np.asarray(x, float), np.asarray(y, float), 0)
    return np.asarray(fx, float), np.asarray(fy, float)


def _lstsq(design, rhs, weights=None):
    """(Weighted) least-squares solution via the normal equations.

    Written out because ``numpy.linalg.lstsq`` (SVD) is ~100x slower on these
    tall, thin systems (8 ms vs 0.05 ms for 1600 x 10 here).  The columns are
    monomials of coordinates scaled to about [-1, 1], so the normal matrix is
    well conditioned for the orders used; otherwise fall back to SVD.
    """
    if weights is not None:
        root = np.sqrt(np.asarray(weights, float))[:, None]
        design, rhs = design * root, rhs * root
    normal = design.T @ design
    if np.linalg.cond(normal) > 1e10:
        return np.linalg.lstsq(design, rhs, rcond=None)[0]
    return np.linalg.solve(normal, design.T @ rhs)


def _poly_eval(model, x, y):
    x, y = _apply_distortion(model.distortion, x, y)
    design = _design(np.asarray(x) - model.crpix[0],
                     np.asarray(y) - model.crpix[1], model.order, model.norm)
    return design @ model.coef[0], design @ model.coef[1]


def _residuals_deg(model, x, y, ra, dec):
    """Source minus reference in intermediate world coordinates, degrees."""
    sxi, seta = _poly_eval(model, x, y)
    rxi, reta = _gnomonic(ra, dec, model.crval)
    return sxi - rxi, seta - reta


def _cd_matrix(model):
    """CD matrix (deg / pixel) from the linear terms of the model."""
    # terms 1 and 2 are u and v (divided by norm)
    return model.coef[:, 1:3] / model.norm


# ----------------------------------------------------------------------------
# conversion to an astropy WCS and the result


def _to_astropy(model, shape):
    """Build an :class:`astropy.wcs.WCS` (TAN or TAN-SIP) from the model."""
    ny, nx = shape
    cd = _cd_matrix(model)
    w = WCS(naxis=2)
    sip = model.order >= 2
    w.wcs.ctype = ["RA---TAN-SIP", "DEC--TAN-SIP"] if sip else ["RA---TAN", "DEC--TAN"]
    w.wcs.crval = model.crval
    w.wcs.crpix = model.crpix + 1.0  # FITS is 1-based
    w.wcs.cd = cd
    w.wcs.radesys = "ICRS"
    w.wcs.cunit = ["deg", "deg"]
    if sip:
        w.sip = _sip_from_model(model, cd, shape)
    w.wcs.set()
    w.pixel_shape = (nx, ny)
    return w


def _sip_from_model(model, cd, shape):
    """Forward SIP (A, B) from the polynomial and a fitted inverse (AP, BP)."""
    p = model.order
    a = np.zeros((p + 1, p + 1))
    b = np.zeros((p + 1, p + 1))
    cd_inv = np.linalg.inv(cd)
    for n, (i, j) in enumerate(_monomials(p)):
        if i + j >= 2:
            a[i, j], b[i, j] = cd_inv @ (model.coef[:, n] / model.norm ** (i + j))
    ap, bp = _fit_inverse_sip(a, b, shape, model.crpix, p + 1)
    return Sip(a, b, ap, bp, model.crpix + 1.0)


def _fit_inverse_sip(a, b, shape, crpix, order, n_grid=40):
    """Least-squares inverse SIP polynomials on a grid over the image."""
    ny, nx = shape
    gx, gy = np.meshgrid(np.linspace(-0.05 * nx, 1.05 * nx, n_grid),
                         np.linspace(-0.05 * ny, 1.05 * ny, n_grid))
    u, v = gx.ravel() - crpix[0], gy.ravel() - crpix[1]
    fu, fv = u.copy(), v.copy()
    for i in range(a.shape[0]):
        for j in range(a.shape[1]):
            fu += a[i, j] * u**i * v**j
            fv += b[i, j] * u**i * v**j
    norm = max(nx, ny) / 2.0
    terms = _monomials(order)
    design = _design(fu, fv, order, norm)
    coef = _lstsq(design, np.column_stack([u - fu, v - fv]))
    ap = np.zeros((order + 1, order + 1))
    bp = np.zeros((order + 1, order + 1))
    for n, (i, j) in enumerate(terms):
        ap[i, j] = coef[n, 0] / norm ** (i + j)
        bp[i, j] = coef[n, 1] / norm ** (i + j)
    return ap, bp


def _make_result(wcs, approx_wcs, src, ref, i_ref, m_src, m_ref, n_in, order,
                 votes, bkg, shape, max_rms_arcsec, weights):
    """Residual table, (weighted) RMS check and the header comparison."""
    xs, ys = src["x"][m_src], src["y"][m_src]
    ra, dec = ref["ra"][i_ref[m_ref]], ref["dec"][i_ref[m_ref]]
    sra, sdec = wcs.all_pix2world(xs, ys, 0)
    dra = ((sra - ra + 180.0) % 360.0 - 180.0) * np.cos(np.radians(dec)) * _ARCSEC_PER_DEG
    ddec = (sdec - dec) * _ARCSEC_PER_DEG
    rpx, rpy = _sky_to_pixel(wcs, ra, dec)
    rms = float(np.sqrt(np.average(dra**2 + ddec**2, weights=weights)))
    if rms > max_rms_arcsec:
        raise AstrometryError(
            f"The astrometric fit residuals are too large: RMS {rms:.3f} arcsec "
            f"over {len(m_src)} matched stars exceeds {max_rms_arcsec} arcsec. "
            "The matches may be spurious or the distortion too strong for the "
            "SIP order.")
    table = pd.DataFrame({
        "src_index": src["index"][m_src], "ref_index": i_ref[m_ref],
        "x": xs, "y": ys, "ref_x": rpx, "ref_y": rpy,
        "dx_px": xs - rpx, "dy_px": ys - rpy,
        "dra_arcsec": dra, "ddec_arcsec": ddec})
    shift, rot, scale = _compare_to_header(wcs, approx_wcs, shape)
    logger.info("astrometry: %d matches, RMS %.1f mas, SIP order %d; header off "
                "by %.2f arcsec, %.4f deg, scale %+.5f", len(m_src), rms * 1e3,
                order, shift, rot, scale)
    return AstrometryResult(
        wcs=wcs, rms_arcsec=rms, n_matched=len(m_src), n_ref_in_field=n_in,
        shift_arcsec=shift, rotation_deg=rot, scale_change=scale,
        sip_order=order, search_votes=votes, search_background=bkg,
        matches=table)


def _compare_to_header(wcs, approx_wcs, shape):
    """Shift (arcsec), rotation (deg) and scale change of fitted vs header WCS.

    A similarity transform ``p_fit = c + k R(theta) (p_header - c) + t`` is
    fitted to where a grid of sky points falls in both WCSs.
    """
    ny, nx = shape
    c = np.array([(nx - 1) / 2.0, (ny - 1) / 2.0])
    gx, gy = np.meshgrid(np.linspace(0, nx - 1, 7), np.linspace(0, ny - 1, 7))
    ra, dec = wcs.all_pix2world(gx.ravel(), gy.ravel(), 0)
    hx, hy = _sky_to_pixel(approx_wcs, ra, dec)
    zf = (gx.ravel() - c[0]) + 1j * (gy.ravel() - c[1])
    zh = (hx - c[0]) + 1j * (hy - c[1])
    design = np.column_stack([zh, np.ones_like(zh)])
    (kr, _), *_ = np.linalg.lstsq(design, zf, rcond=None)
    ra_c, dec_c = wcs.all_pix2world([c[0]], [c[1]], 0)
    ra_h, dec_h = approx_wcs.all_pix2world([c[0]], [c[1]], 0)
    shift = float(_separation_deg(ra_h[0], dec_h[0], ra_c[0], dec_c[0])[()]) \
        * _ARCSEC_PER_DEG
    return shift, float(np.degrees(np.angle(kr))), float(1.0 / abs(kr) - 1.0)
