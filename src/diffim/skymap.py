"""Discrete sky map: one tangent-plane tract cut into square patches.

The equivalent of LSST's ``makeDiscreteSkyMap``: a single tract centred on the
data, with a gnomonic (TAN) projection, north up and east left, divided into
``n_patches_x * n_patches_y`` patches of ``patch_inner`` x ``patch_inner``
pixels.  Each patch is grown by ``patch_border`` pixels on every side (its
*outer* box), so neighbouring patches overlap by ``2 * patch_border`` pixels.

Pixel conventions (see :mod:`diffim`): 0-based, pixel ``(0, 0)`` is the centre
of the first pixel, arrays are ``[y, x]``.  In *tract pixels* the inner region
of patch ``(ix, iy)`` is the pixels ``ix * patch_inner <= x < (ix + 1) *
patch_inner`` (and the same in y), so patch ``"0x0"``'s inner region starts at
tract pixel 0 and the tract covers ``-0.5 <= x < n_patches_x * patch_inner -
0.5``.  Outer boxes are *not* clipped to the tract (unlike LSST), so every
patch has the same shape ``(patch_inner + 2 * patch_border,) * 2``; the border
of an edge patch simply extends past the tract.

A patch's WCS is the tract WCS with ``CRPIX`` shifted by the patch's outer-box
origin, so patch pixel ``p`` is tract pixel ``p + (x0, y0)`` exactly.

Patch names are ``"{ix}x{iy}"`` (``"0x0"``, ``"3x1"``).  LSST writes ``"3,1"``,
but a comma in a wildcard value breaks Snakemake's cluster job submission
(it passes wildcards as a comma-separated list), so patch names have none.
"""

from __future__ import annotations

import json
import logging
import math
from dataclasses import asdict, dataclass

import numpy as np
from astropy.wcs import WCS

from .errors import ConfigError, NoOverlapError

logger = logging.getLogger(__name__)

#: Format tag written into the JSON so a reader can refuse files it does not know.
SKYMAP_FORMAT = "diffim.skymap/1"

#: A tangent-plane projection is only usable well inside 90 degrees of its
#: centre; data spread wider than this cannot go into one tract.
MAX_TRACT_RADIUS_DEG = 30.0


@dataclass(frozen=True)
class BBox:
    """Integer pixel box ``x0 <= x < x1``, ``y0 <= y < y1`` (0-based, end exclusive)."""

    x0: int
    y0: int
    x1: int
    y1: int

    @property
    def shape(self) -> tuple[int, int]:
        """``(ny, nx)``."""
        return (self.y1 - self.y0, self.x1 - self.x0)

    @property
    def slices(self) -> tuple[slice, slice]:
        """``(slice_y, slice_x)`` selecting the box from an array indexed the same way."""
        return (slice(self.y0, self.y1), slice(self.x0, self.x1))

    def contains(self, x, y) -> np.ndarray:
        """True where pixel position ``(x, y)`` falls in a pixel of the box.

        Pixel ``k`` covers ``k - 0.5 <= coordinate < k + 0.5``.
        """
        x = np.asarray(x, dtype=float)
        y = np.asarray(y, dtype=float)
        return ((x >= self.x0 - 0.5) & (x < self.x1 - 0.5)
                & (y >= self.y0 - 0.5) & (y < self.y1 - 0.5))


def parse_patch_name(name: str) -> tuple[int, int]:
    """``"ix,iy"`` -> ``(ix, iy)``; raises ``ValueError`` on a malformed name."""
    try:
        ix_text, iy_text = str(name).split("x")
        return int(ix_text), int(iy_text)
    except ValueError:
        raise ValueError(f"patch name {name!r} is not of the form 'IXxIY' (e.g. '0x0')") from None


def _tan_wcs(ra: float, dec: float, scale_arcsec: float, crpix: tuple[float, float],
             shape: tuple[int, int] | None = None) -> WCS:
    """TAN WCS, north up, east left; ``crpix`` is FITS 1-based ``(x, y)``."""
    wcs = WCS(naxis=2)
    wcs.wcs.ctype = ["RA---TAN", "DEC--TAN"]
    wcs.wcs.crval = [ra % 360.0, dec]
    wcs.wcs.crpix = [crpix[0], crpix[1]]
    scale = scale_arcsec / 3600.0
    wcs.wcs.cd = np.array([[-scale, 0.0], [0.0, scale]])
    wcs.wcs.cunit = ["deg", "deg"]
    wcs.wcs.radesys = "ICRS"
    wcs.wcs.set()
    if shape is not None:
        wcs.pixel_shape = (shape[1], shape[0])
    return wcs


def _unit_vectors(ra, dec) -> np.ndarray:
    """(N, 3) Cartesian unit vectors of ``(ra, dec)`` in degrees."""
    ra_r = np.radians(np.asarray(ra, dtype=float).ravel())
    dec_r = np.radians(np.asarray(dec, dtype=float).ravel())
    return np.column_stack([np.cos(dec_r) * np.cos(ra_r), np.cos(dec_r) * np.sin(ra_r),
                            np.sin(dec_r)])


def _angular_distance_deg(ra0, dec0, ra, dec) -> np.ndarray:
    """Great-circle distance in degrees from ``(ra0, dec0)`` to each ``(ra, dec)``."""
    v0 = _unit_vectors([ra0], [dec0])[0]
    cosd = np.clip(_unit_vectors(ra, dec) @ v0, -1.0, 1.0)
    return np.degrees(np.arccos(cosd))


@dataclass(frozen=True)
class SkyMap:
    """One TAN tract of ``n_patches_x * n_patches_y`` square patches.

    Attributes
    ----------
    ra, dec : float
        Tract centre (tangent point), degrees ICRS.
    pixel_scale : float
        Arcsec per pixel.
    patch_inner : int
        Side of a patch's inner (non-overlapping) region, pixels.
    patch_border : int
        Overlap border added on each side of the inner region, pixels.
    n_patches_x, n_patches_y : int
        Number of patches along x (east-west) and y (north-south).
    margin_arcsec : float
        Default safety margin of :meth:`patches_overlapping`, arcsec.
    """

    ra: float
    dec: float
    pixel_scale: float
    patch_inner: int
    patch_border: int
    n_patches_x: int
    n_patches_y: int
    margin_arcsec: float = 0.0

    def __post_init__(self):
        for key in ("ra", "dec", "pixel_scale", "margin_arcsec"):   # plain floats for JSON
            object.__setattr__(self, key, float(getattr(self, key)))
        if not (math.isfinite(self.ra) and math.isfinite(self.dec) and -90 < self.dec < 90):
            raise ValueError(f"tract centre ({self.ra}, {self.dec}) deg is not a valid position")
        if not (math.isfinite(self.pixel_scale) and self.pixel_scale > 0):
            raise ValueError(f"pixel_scale must be > 0 arcsec, got {self.pixel_scale}")
        if int(self.patch_inner) != self.patch_inner or self.patch_inner < 1:
            raise ValueError(f"patch_inner must be a positive integer, got {self.patch_inner}")
        if int(self.patch_border) != self.patch_border or self.patch_border < 0:
            raise ValueError(f"patch_border must be an integer >= 0, got {self.patch_border}")
        for key in ("n_patches_x", "n_patches_y"):
            value = getattr(self, key)
            if int(value) != value or value < 1:
                raise ValueError(f"{key} must be a positive integer, got {value}")
        for key in ("patch_inner", "patch_border", "n_patches_x", "n_patches_y"):
            object.__setattr__(self, key, int(getattr(self, key)))
        if not (math.isfinite(self.margin_arcsec) and self.margin_arcsec >= 0):
            raise ValueError(f"margin_arcsec must be >= 0, got {self.margin_arcsec}")

    # -- geometry -------------------------------------------------------------
    @property
    def tract_shape(self) -> tuple[int, int]:
        """``(ny, nx)`` of the union of the patches' inner regions, pixels."""
        return (self.n_patches_y * self.patch_inner, self.n_patches_x * self.patch_inner)

    @property
    def tract_crpix(self) -> tuple[float, float]:
        """FITS (1-based) ``CRPIX`` ``(x, y)``: the tangent point at the tract centre."""
        ny, nx = self.tract_shape
        return ((nx - 1) / 2.0 + 1.0, (ny - 1) / 2.0 + 1.0)

    @property
    def wcs(self) -> WCS:
        """The tract WCS (a new object on every call, so callers may modify it)."""
        return _tan_wcs(self.ra, self.dec, self.pixel_scale, self.tract_crpix, self.tract_shape)

    def patch_names(self) -> list[str]:
        """All patch names, ``"IXxIY"``, iy-major (row by row from the south)."""
        return [f"{ix}x{iy}" for iy in range(self.n_patches_y) for ix in range(self.n_patches_x)]

    def _patch_index(self, name: str) -> tuple[int, int]:
        ix, iy = parse_patch_name(name)
        if not (0 <= ix < self.n_patches_x and 0 <= iy < self.n_patches_y):
            raise ValueError(f"patch {name!r} is outside this sky map "
                             f"({self.n_patches_x} x {self.n_patches_y} patches)")
        return ix, iy

    def patch_bbox(self, name: str) -> tuple[BBox, BBox]:
        """``(outer, inner)`` boxes of a patch in tract pixels.

        The outer box is the inner box grown by ``patch_border`` on every side
        (not clipped to the tract).
        """
        ix, iy = self._patch_index(name)
        n, b = self.patch_inner, self.patch_border
        inner = BBox(ix * n, iy * n, (ix + 1) * n, (iy + 1) * n)
        outer = BBox(inner.x0 - b, inner.y0 - b, inner.x1 + b, inner.y1 + b)
        return outer, inner

    def patch_shape(self, name: str) -> tuple[int, int]:
        """``(ny, nx)`` of a patch's outer box (inner plus border), pixels."""
        return self.patch_bbox(name)[0].shape

    def patch_inner_slices(self, name: str) -> tuple[slice, slice]:
        """Slices selecting the inner region from an outer-box patch array."""
        outer, inner = self.patch_bbox(name)
        return (slice(inner.y0 - outer.y0, inner.y1 - outer.y0),
                slice(inner.x0 - outer.x0, inner.x1 - outer.x0))

    def patch_wcs(self, name: str) -> WCS:
        """WCS of a patch array (its outer box): the tract WCS with CRPIX shifted."""
        outer, _ = self.patch_bbox(name)
        cx, cy = self.tract_crpix
        return _tan_wcs(self.ra, self.dec, self.pixel_scale, (cx - outer.x0, cy - outer.y0),
                        outer.shape)

    # -- overlaps -------------------------------------------------------------
    def sky_to_tract_pixels(self, ra, dec) -> tuple[np.ndarray, np.ndarray]:
        """Tract pixel ``(x, y)`` of sky positions (degrees).

        Raises
        ------
        NoOverlapError
            If a position is more than ``MAX_TRACT_RADIUS_DEG`` from the tract
            centre, where the tangent-plane projection is unusable.
        """
        ra = np.asarray(ra, dtype=float).ravel()
        dec = np.asarray(dec, dtype=float).ravel()
        if ra.shape != dec.shape or ra.size == 0:
            raise ValueError(f"ra and dec must be non-empty and of equal length, got "
                             f"{ra.size} and {dec.size} values")
        if not (np.all(np.isfinite(ra)) and np.all(np.isfinite(dec))):
            raise ValueError("footprint coordinates contain NaN or infinite values")
        far = _angular_distance_deg(self.ra, self.dec, ra, dec)
        if np.any(far > MAX_TRACT_RADIUS_DEG):
            raise NoOverlapError(
                f"a footprint lies {far.max():.1f} deg from the tract centre "
                f"({self.ra:.4f}, {self.dec:.4f}); the sky map only covers positions within "
                f"{MAX_TRACT_RADIUS_DEG:.0f} deg of it")
        x, y = self.wcs.world_to_pixel_values(ra, dec)
        return np.asarray(x, dtype=float), np.asarray(y, dtype=float)

    def patches_overlapping(self, corners_ra, corners_dec, *,
                            margin_arcsec: float | None = None) -> list[str]:
        """Patches whose outer box overlaps a footprint polygon on the sky.

        Parameters
        ----------
        corners_ra, corners_dec : array_like
            Vertices of the footprint (degrees), e.g. the exposure's 4 corners
            and edge midpoints.  The test uses their convex hull.
        margin_arcsec : float, optional
            Safety margin: the patch boxes are grown by this much before the
            test.  Defaults to the sky map's ``margin_arcsec``.

        Returns
        -------
        names : list of str
            Overlapping patch names in :meth:`patch_names` order; empty when
            the footprint misses the tract.
        """
        margin = self.margin_arcsec if margin_arcsec is None else float(margin_arcsec)
        if not (math.isfinite(margin) and margin >= 0):
            raise ValueError(f"margin_arcsec must be >= 0, got {margin_arcsec}")
        x, y = self.sky_to_tract_pixels(corners_ra, corners_dec)
        hull = _convex_hull(np.column_stack([x, y]))
        grow = margin / self.pixel_scale + 0.5  # +0.5: box edges are pixel edges
        names = []
        for name in self.patch_names():
            outer, _ = self.patch_bbox(name)
            box = (outer.x0 - grow, outer.y0 - grow, outer.x1 - 1 + grow, outer.y1 - 1 + grow)
            if _convex_polygon_hits_box(hull, box):
                names.append(name)
        return names

    # -- serialisation --------------------------------------------------------
    def to_json(self) -> str:
        """Small, human-readable JSON holding every field (the WCS is derived)."""
        fields = asdict(self)
        doc = {"format": SKYMAP_FORMAT, "projection": "TAN", **fields,
               "comment": "pixel_scale in arcsec/px; patch sizes in px; ra, dec of the "
                          "tract centre in deg; patch names are 'ix,iy'"}
        return json.dumps(doc, indent=2)

    @classmethod
    def from_json(cls, text: str) -> "SkyMap":
        """Inverse of :meth:`to_json`."""
        try:
            doc = json.loads(text)
        except json.JSONDecodeError as exc:
            raise ValueError(f"sky map JSON is not valid JSON: {exc}") from None
        if not isinstance(doc, dict) or doc.get("format") != SKYMAP_FORMAT:
            raise ValueError(f"not a diffim sky map (expected format {SKYMAP_FORMAT!r}, "
                             f"got {doc.get('format') if isinstance(doc, dict) else doc!r})")
        names = ("ra", "dec", "pixel_scale", "patch_inner", "patch_border",
                 "n_patches_x", "n_patches_y", "margin_arcsec")
        missing = [k for k in names if k not in doc]
        if missing:
            raise ValueError(f"sky map JSON lacks the fields {missing}")
        return cls(ra=float(doc["ra"]), dec=float(doc["dec"]),
                   pixel_scale=float(doc["pixel_scale"]), patch_inner=int(doc["patch_inner"]),
                   patch_border=int(doc["patch_border"]), n_patches_x=int(doc["n_patches_x"]),
                   n_patches_y=int(doc["n_patches_y"]),
                   margin_arcsec=float(doc["margin_arcsec"]))


def _convex_hull(points: np.ndarray) -> np.ndarray:
    """Vertices of the convex hull, counter-clockwise (monotone chain).

    Written here instead of ``scipy.spatial.ConvexHull`` because Qhull refuses
    degenerate inputs (a single point, collinear points), which a footprint
    test must still accept.
    """
    pts = sorted(set(map(tuple, np.asarray(points, dtype=float))))
    if len(pts) <= 2:
        return np.array(pts, dtype=float)

    def cross(o, a, b):
        return (a[0] - o[0]) * (b[1] - o[1]) - (a[1] - o[1]) * (b[0] - o[0])

    lower, upper = [], []
    for p in pts:
        while len(lower) >= 2 and cross(lower[-2], lower[-1], p) <= 0:
            lower.pop()
        lower.append(p)
    for p in reversed(pts):
        while len(upper) >= 2 and cross(upper[-2], upper[-1], p) <= 0:
            upper.pop()
        upper.append(p)
    return np.array(lower[:-1] + upper[:-1], dtype=float)


def _convex_polygon_hits_box(poly: np.ndarray, box: tuple[float, float, float, float]) -> bool:
    """Separating-axis test: does a convex polygon intersect an axis-aligned box?

    ``box = (xmin, ymin, xmax, ymax)``; touching counts as intersecting.
    """
    xmin, ymin, xmax, ymax = box
    if (poly[:, 0].max() < xmin or poly[:, 0].min() > xmax
            or poly[:, 1].max() < ymin or poly[:, 1].min() > ymax):
        return False
    if len(poly) < 3:
        if len(poly) == 1:
            return True
        # a segment: test its normal as the remaining axis
        edges = [(poly[0], poly[1])]
    else:
        edges = [(poly[i], poly[(i + 1) % len(poly)]) for i in range(len(poly))]
    corners = np.array([[xmin, ymin], [xmax, ymin], [xmax, ymax], [xmin, ymax]])
    for a, b in edges:
        normal = np.array([a[1] - b[1], b[0] - a[0]])
        proj_poly = poly @ normal
        proj_box = corners @ normal
        if proj_poly.max() < proj_box.min() or proj_box.max() < proj_poly.min():
            return False
    return True


def make_skymap(footprints, *, pixel_scale_arcsec: float, patch_inner: int,
                patch_border: int, margin_arcsec: float) -> SkyMap:
    """A tract centred on the data and just big enough for every footprint.

    Parameters
    ----------
    footprints : list of (ra_array, dec_array)
        Footprint polygons (degrees) of every calexp of every band.
    pixel_scale_arcsec : float
        Tract pixel scale, arcsec/px.
    patch_inner, patch_border : int
        Patch inner side and overlap border, pixels.
    margin_arcsec : float
        Extra sky kept around the footprints' bounding box on every side, and
        the default margin of :meth:`SkyMap.patches_overlapping`.

    Returns
    -------
    SkyMap
        Centred (in the tangent plane) on the bounding box of the union of the
        footprints; RA wrap at 0/360 is handled by working with unit vectors.

    Raises
    ------
    ConfigError
        If there are no footprints, or they spread over more than
        ``MAX_TRACT_RADIUS_DEG`` from their centre (no single tangent plane).
    """
    if len(footprints) == 0:
        raise ConfigError("make_skymap got no footprints: no calexp succeeded, so there is "
                          "no sky to map. Check visit_status.parquet for the failures.")
    ra = np.concatenate([np.asarray(f[0], dtype=float).ravel() for f in footprints])
    dec = np.concatenate([np.asarray(f[1], dtype=float).ravel() for f in footprints])
    if ra.shape != dec.shape or not (np.all(np.isfinite(ra)) and np.all(np.isfinite(dec))):
        raise ValueError("footprint ra/dec arrays must be finite and of equal length")
    if not pixel_scale_arcsec > 0 or not margin_arcsec >= 0:
        raise ValueError(f"pixel_scale_arcsec must be > 0 and margin_arcsec >= 0, got "
                         f"{pixel_scale_arcsec} and {margin_arcsec}")
    # First guess: direction of the mean unit vector (no RA wrap problem).
    mean = _unit_vectors(ra, dec).mean(axis=0)
    ra0 = math.degrees(math.atan2(mean[1], mean[0])) % 360.0
    dec0 = math.degrees(math.atan2(mean[2], math.hypot(mean[0], mean[1])))
    spread = _angular_distance_deg(ra0, dec0, ra, dec).max()
    if spread > MAX_TRACT_RADIUS_DEG:
        raise ConfigError(
            f"the exposures spread {spread:.1f} deg from their centre ({ra0:.3f}, {dec0:.3f}); "
            f"one tangent-plane tract covers at most {MAX_TRACT_RADIUS_DEG:.0f} deg. "
            "Process distant fields separately.")
    # Re-centre on the middle of the bounding box in the tangent plane.
    probe = _tan_wcs(ra0, dec0, pixel_scale_arcsec, (1.0, 1.0))
    x, y = probe.wcs_world2pix(ra, dec, 0)
    ra_c, dec_c = probe.wcs_pix2world(0.5 * (x.min() + x.max()), 0.5 * (y.min() + y.max()), 0)
    ra_c, dec_c = float(ra_c) % 360.0, float(dec_c)
    centred = _tan_wcs(ra_c, dec_c, pixel_scale_arcsec, (1.0, 1.0))
    x, y = centred.wcs_world2pix(ra, dec, 0)
    margin_px = margin_arcsec / pixel_scale_arcsec
    half_x = np.abs(x).max() + margin_px + 0.5
    half_y = np.abs(y).max() + margin_px + 0.5
    n_x = max(1, math.ceil(2 * half_x / patch_inner))
    n_y = max(1, math.ceil(2 * half_y / patch_inner))
    skymap = SkyMap(ra=ra_c, dec=dec_c, pixel_scale=float(pixel_scale_arcsec),
                    patch_inner=int(patch_inner), patch_border=int(patch_border),
                    n_patches_x=n_x, n_patches_y=n_y, margin_arcsec=float(margin_arcsec))
    logger.info("sky map: tract at (%.5f, %.5f) deg, %d x %d patches of %d px (+%d border), "
                "%.3f arcsec/px", ra_c, dec_c, n_x, n_y, patch_inner, patch_border,
                pixel_scale_arcsec)
    return skymap
