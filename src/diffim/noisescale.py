"""Local calibration of the detection significance of a difference image.

The significance (:func:`diffim.detect.significance_maps`) is normalised
with one noise correlation for the whole image, but the correlation is not
the same everywhere: the matching kernel varies over the field, and so do the
shares of the convolved and the unconvolved image in the noise (a sky
gradient, a template deeper in some parts).  Measured on the 4096^2 peer
pair with the science image sharper, the robust standard deviation of the
significance in source-free 512-px tiles ran from 0.87 to 1.09, and the
false detections gathered where it was above 1; on the default simulated
visits it ran from 0.90 to 1.15 in 256-px tiles.

:func:`measure` takes the robust standard deviation of the statistical
significance in tiles (usable pixels away from static-source residuals,
iteratively clipped so that sources barely count) and fits a low-order
polynomial surface through them (:class:`LocalNoiseScale`).
Detection divides the significance by it and multiplies PSF-flux errors by
it, so both are right where the noise is.

Beside the smooth surface, the scale follows the template's share ``f`` of
the difference's per-pixel variance (:class:`BlockMap`, from
:attr:`diffim.subtract.SubtractionResult.template_share`).  The template's
noise is correlated (a PSF-matched coadd, convolved again by the matching
kernel), so its share of the *filtered* noise is many times its share of the
per-pixel variance, and ``scale^2`` is linear in ``f`` (:func:`fit_share`).
Near the template's edges, where fewer visits cover it, ``f`` rises from 2 %
to 13 % within ~150 px on an independent-simulator image, and the
significance width rose from 0.97 to 1.42: a tile surface cannot follow
that, and 16 of 46 false positives of that set sat there.

Pixel convention as everywhere: arrays ``[y, x]``, ``(0, 0)`` the centre of
the first pixel.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, replace

import numpy as np

from .psf import n_poly_terms, poly_terms
from .subtract import poly_field

logger = logging.getLogger(__name__)

#: Tile side (pixels): a quarter of the shorter image side, within these bounds.
MIN_TILE, MAX_TILE = 256, 512
#: Usable samples a tile needs to be measured.
MIN_SAMPLES = 2000
#: Every how many pixels a tile is sampled (plenty for a robust width, and fast).
SUBSAMPLE = 3
#: Clipping (sigma) of the iterated robust standard deviation.
CLIP = 4.0
#: Range of the scale; the fitted surface is clamped to it.
SCALE_RANGE = (0.7, 1.5)
#: Quantiles (%) of the template share that bound the bins of :func:`fit_share`:
#: fine at the top, where the few pixels near the template's edges are.
SHARE_QUANTILES = (0, 50, 80, 90, 95, 98, 99, 99.5, 99.8, 100)
#: Samples a share bin needs, and the smallest spread of the share (1st to
#: 99.9th percentile) worth a fit.
MIN_BIN_SAMPLES, MIN_SHARE_SPREAD = 300, 0.01
#: The share term is kept when its slope is this many times its error.
SHARE_SIGMA = 3.0
#: At most about this many samples enter :func:`fit_share` (evenly thinned).
MAX_SHARE_SAMPLES = 500_000


@dataclass(frozen=True)
class BlockMap:
    """A map in ``bin`` x ``bin`` pixel blocks: block ``[j, i]`` covers pixels
    ``[bin j : bin (j + 1), bin i : bin (i + 1)]``; pixels beyond the last
    block take the last one."""

    values: np.ndarray
    bin: int

    def _index(self, x, y):
        ny, nx = self.values.shape
        i = np.clip(np.asarray(x, float) // self.bin, 0, nx - 1).astype(int)
        j = np.clip(np.asarray(y, float) // self.bin, 0, ny - 1).astype(int)
        return j, i

    def at(self, x, y) -> np.ndarray:
        """Values at pixel positions ``(x, y)`` (arrays of equal shape)."""
        j, i = self._index(x, y)
        return self.values[j, i]

    def on_grid(self, rows: np.ndarray, cols: np.ndarray) -> np.ndarray:
        """Values at every ``(row, col)`` pair, shape ``(len(rows), len(cols))``."""
        j = np.clip(np.asarray(rows) // self.bin, 0, self.values.shape[0] - 1)
        i = np.clip(np.asarray(cols) // self.bin, 0, self.values.shape[1] - 1)
        return self.values[np.ix_(j, i)]

    def full(self, shape) -> np.ndarray:
        """The map at every pixel of an image of ``shape``."""
        return self.on_grid(np.arange(shape[0]), np.arange(shape[1]))


@dataclass(frozen=True)
class ShareTerm:
    """``scale^2`` factor ``(a + b f) / (a + b f_ref)`` of the template share ``f``."""

    a: float
    b: float
    ref: float
    share: BlockMap | None = None

    def factor(self, f: np.ndarray) -> np.ndarray:
        """The factor (1 where ``f`` is NaN), clamped to the square of :data:`SCALE_RANGE`."""
        f = np.asarray(f, dtype=np.float64)
        f = np.where(np.isfinite(f), f, self.ref)
        out = (self.a + self.b * f) / (self.a + self.b * self.ref)
        return np.clip(out, SCALE_RANGE[0] ** 2, SCALE_RANGE[1] ** 2)


@dataclass(frozen=True)
class LocalNoiseScale:
    """Smooth map of the measured / predicted noise of the significance.

    A 2-D polynomial in the scaled coordinates ``u, v`` in [-1, 1] of
    :meth:`diffim.psf.PsfModel.scaled_uv` (terms ``1, u, v, u^2, uv, v^2``),
    times ``sqrt`` of the share term's factor when there is one, clamped to
    :data:`SCALE_RANGE` where evaluated.

    Attributes
    ----------
    coeffs : ndarray (n_terms,)
        Polynomial coefficients (``[1.0]`` with order 0: no correction).
    order : int
        Polynomial order.
    shape : (ny, nx)
        Shape of the image the coordinates are scaled to.
    share_term : ShareTerm or None
        The template-share term (:func:`fit_share`) with its map.
    """

    coeffs: np.ndarray
    order: int
    shape: tuple[int, int]
    share_term: ShareTerm | None = None

    def at(self, x, y) -> np.ndarray:
        """The scale at pixel positions ``(x, y)`` (float or arrays; returns at least 1-D)."""
        ny, nx = self.shape
        x = np.atleast_1d(np.asarray(x, float))
        y = np.atleast_1d(np.asarray(y, float))
        u = 2.0 * x / max(nx - 1, 1) - 1.0
        v = 2.0 * y / max(ny - 1, 1) - 1.0
        value = np.tensordot(self.coeffs, poly_terms(u, v, self.order), axes=(0, 0))
        term = self.share_term
        if term is not None and term.share is not None:
            value = value * np.sqrt(term.factor(term.share.at(x, y)))
        return np.clip(value, *SCALE_RANGE)

    def image(self) -> np.ndarray:
        """The scale at every pixel, float32 array of ``shape``."""
        out = poly_field(np.asarray(self.coeffs, float), self.order, self.shape)
        term = self.share_term
        if term is not None and term.share is not None:
            root = np.sqrt(term.factor(term.share.values)).astype(np.float32)
            out *= BlockMap(root, term.share.bin).full(self.shape)
        return np.clip(out, np.float32(SCALE_RANGE[0]), np.float32(SCALE_RANGE[1]))

    def header_cards(self) -> dict:
        """FITS cards: ``NSCLORD`` (order), ``NSCLC1`` ... (coefficients) and, with a
        share term, ``NSCLSA``, ``NSCLSB``, ``NSCLSF`` (its ``a``, ``b``, ``f_ref``)."""
        cards = {"NSCLORD": int(self.order)}
        cards.update({f"NSCLC{i + 1}": round(float(c), 6) for i, c in enumerate(self.coeffs)})
        if self.share_term is not None:
            t = self.share_term
            cards.update(NSCLSA=float(t.a), NSCLSB=float(t.b), NSCLSF=float(t.ref))
        return cards

    @classmethod
    def from_meta(cls, meta: dict, shape, share: BlockMap | None = None) -> "LocalNoiseScale | None":
        """Read back :meth:`header_cards`; None if the header has none.

        ``share`` is the template-share map the share term needs (stored beside
        the difference image); without it the term is left out.
        """
        if "NSCLORD" not in meta:
            return None
        order = int(meta["NSCLORD"])
        keys = [f"NSCLC{i + 1}" for i in range(n_poly_terms(order))]
        missing = [k for k in keys if k not in meta]
        if missing:
            raise ValueError(f"the header has NSCLORD = {order} but lacks {', '.join(missing)} "
                             "(a local noise scale written incompletely)")
        coeffs = np.array([float(meta[k]) for k in keys])
        term = None
        if share is not None and all(k in meta for k in ("NSCLSA", "NSCLSB", "NSCLSF")):
            term = ShareTerm(a=float(meta["NSCLSA"]), b=float(meta["NSCLSB"]),
                             ref=float(meta["NSCLSF"]), share=share)
        return cls(coeffs=coeffs, order=order, shape=tuple(int(n) for n in shape),
                   share_term=term)


def _edges(n: int, g: int) -> np.ndarray:
    return np.round(np.linspace(0, n, g + 1)).astype(int)


def robust_width(values: np.ndarray, clip: float = CLIP, n_iter: int = 3) -> float:
    """1.4826 MAD of ``values``, iteratively clipped at ``clip`` times itself (NaN if empty)."""
    if values.size == 0:
        return float("nan")
    centre = float(np.median(values))
    scale = 1.4826 * float(np.median(np.abs(values - centre)))
    for _ in range(n_iter):
        kept = values[np.abs(values - centre) < clip * scale]
        if kept.size == 0:
            break
        centre = float(np.median(kept))
        scale = 1.4826 * float(np.median(np.abs(kept - centre)))
    return scale


def tile_grid(shape) -> tuple[int, int]:
    """Number of tiles ``(gy, gx)`` for an image of ``shape``."""
    side = int(np.clip(min(shape) // 4, MIN_TILE, MAX_TILE))
    return max(1, round(shape[0] / side)), max(1, round(shape[1] / side))


def surface_order(gy: int, gx: int) -> int:
    """Polynomial order for a ``gy x gx`` tile grid: 0 below 3 tiles a side, 1 below 6, else 2.

    Each tile's width is uncertain by 1-3 %; a low-order surface through all
    tiles averages that down (a random error of the scale raises the false
    detections more where it is low than it lowers them where it is high).
    """
    g = min(gy, gx)
    return 0 if g < 3 else 1 if g < 6 else 2


@dataclass(frozen=True)
class SampleGrid:
    """The pixels the tiles are measured on: every :data:`SUBSAMPLE`-th row and
    column of each tile, gathered so that only they need computing.

    Attributes
    ----------
    shape : (ny, nx)
        Full image shape.
    rows, cols : ndarray of int
        Sampled full-resolution rows and columns, tile after tile.
    row_bounds, col_bounds : ndarray of int
        Tile ``i`` holds sampled rows ``row_bounds[i]:row_bounds[i + 1]``.
    edges_y, edges_x : ndarray of int
        Tile edges in full-resolution pixels.
    """

    shape: tuple[int, int]
    rows: np.ndarray
    cols: np.ndarray
    row_bounds: np.ndarray
    col_bounds: np.ndarray
    edges_y: np.ndarray
    edges_x: np.ndarray

    @classmethod
    def for_shape(cls, shape) -> "SampleGrid":
        ny, nx = (int(n) for n in shape)
        gy, gx = tile_grid((ny, nx))

        def axis(n, g):
            e = _edges(n, g)
            idx = [np.arange(e[k], e[k + 1], SUBSAMPLE) for k in range(g)]
            return np.concatenate(idx), np.cumsum([0] + [len(i) for i in idx]), e

        rows, rb, ey = axis(ny, gy)
        cols, cb, ex = axis(nx, gx)
        return cls((ny, nx), rows, cols, rb, cb, ey, ex)

    def take(self, a: np.ndarray) -> np.ndarray:
        """The sampled pixels of a full-resolution array, shape ``(len(rows), len(cols))``."""
        return a[np.ix_(self.rows, self.cols)]


def tile_widths(significance: np.ndarray, usable: np.ndarray, grid: SampleGrid):
    """Robust width, centre ``(x, y)`` and sample count of each tile (NaN width if too few).

    ``significance`` and ``usable`` are sampled on ``grid`` (:meth:`SampleGrid.take`).
    """
    ey, ex, rb, cb = grid.edges_y, grid.edges_x, grid.row_bounds, grid.col_bounds
    rows = []
    for i in range(len(ey) - 1):
        for j in range(len(ex) - 1):
            cut = (slice(rb[i], rb[i + 1]), slice(cb[j], cb[j + 1]))
            v = significance[cut][usable[cut]]
            width = robust_width(v.astype(np.float64)) if v.size >= MIN_SAMPLES else np.nan
            width = width if width > 0 else np.nan   # no noise at all (a noiseless test image)
            rows.append((width, 0.5 * (ex[j] + ex[j + 1] - 1), 0.5 * (ey[i] + ey[i + 1] - 1),
                         v.size))
    return np.array(rows, float).reshape(-1, 4), (len(ey) - 1, len(ex) - 1)


def fit_share(significance: np.ndarray, usable: np.ndarray, share: np.ndarray) -> ShareTerm | None:
    """Fit ``width^2 = a + b f`` of the significance against the template share ``f``.

    The usable samples are binned at :data:`SHARE_QUANTILES` of ``f``; each
    bin with at least :data:`MIN_BIN_SAMPLES` gives a robust width, and a
    least-squares line through the squared widths (weighted by sample
    count) gives ``a`` and ``b``; ``f_ref`` is the median share.  None when
    ``f`` hardly varies, fewer than 3 bins count, or ``b`` is within
    :data:`SHARE_SIGMA` of its error of 0.
    """
    ok = usable & np.isfinite(share)
    step = max(1, int(ok.sum()) // MAX_SHARE_SAMPLES)     # plenty, and fast on a 4k image
    f, z = share[ok][::step].astype(np.float64), significance[ok][::step].astype(np.float64)
    if f.size < 3 * MIN_BIN_SAMPLES:
        return None
    lo, hi = np.percentile(f, [1.0, 99.9])
    if hi - lo < MIN_SHARE_SPREAD:
        return None
    edges = np.unique(np.percentile(f, SHARE_QUANTILES))
    which = np.clip(np.searchsorted(edges, f, side="right") - 1, 0, len(edges) - 2)
    rows = []
    for k in range(len(edges) - 1):
        sel = which == k
        if sel.sum() >= MIN_BIN_SAMPLES:
            rows.append((float(np.mean(f[sel])), robust_width(z[sel]) ** 2, float(sel.sum())))
    if len(rows) < 3:
        return None
    fb, w2, n = (np.array(c) for c in zip(*rows))
    a_mat = np.column_stack([np.ones_like(fb), fb]) * np.sqrt(n)[:, None]
    (a, b), *_ = np.linalg.lstsq(a_mat, w2 * np.sqrt(n), rcond=None)
    resid = w2 - (a + b * fb)
    dof = max(len(fb) - 2, 1)
    cov = np.linalg.pinv(a_mat.T @ a_mat) * float((n * resid**2).sum() / dof)
    b_err = float(np.sqrt(max(cov[1, 1], 0.0)))
    ref = float(np.median(f))
    if not (a + b * ref > 0 and abs(b) > SHARE_SIGMA * max(b_err, 1e-12)):
        return None
    return ShareTerm(a=float(a), b=float(b), ref=ref)


def measure(significance: np.ndarray, usable: np.ndarray,
            grid: SampleGrid | None = None, share: BlockMap | None = None) -> LocalNoiseScale:
    """Fit a :class:`LocalNoiseScale` to the tile-by-tile robust width of ``significance``.

    Parameters
    ----------
    significance : ndarray
        Statistical detection significance (sigma units): the full image, or
        only its pixels on ``grid`` (:meth:`SampleGrid.take`).
    usable : ndarray of bool
        Pixels that measure the noise (not masked, not at static-source
        residuals), on the same pixels as ``significance``.
    grid : SampleGrid, optional
        Given when the arrays are already sampled on it.
    share : BlockMap, optional
        The template's share of the per-pixel variance; its term
        (:func:`fit_share`) is fitted first and divided out before the tiles.

    Returns
    -------
    LocalNoiseScale
        Weighted (by sample count) least squares of the tile widths, one
        3-sigma rejection of outlying tiles; order :func:`surface_order`, lower
        when fewer tiles could be measured.  No correction (1) without any.
    """
    if grid is None:
        grid = SampleGrid.for_shape(significance.shape)
        significance, usable = grid.take(significance), grid.take(usable)
    term = None
    if share is not None:
        term = fit_share(significance, usable, share.on_grid(grid.rows, grid.cols))
        if term is not None:
            term = replace(term, share=share)
            significance = significance / np.sqrt(
                term.factor(share.on_grid(grid.rows, grid.cols))).astype(np.float32)
            logger.info("significance noise follows the template share: width^2 = %.3f + "
                        "%.2f f (f_ref %.3f)", term.a, term.b, term.ref)
    shape = grid.shape
    ny, nx = shape
    tiles, (gy, gx) = tile_widths(significance, usable, grid)
    tiles = tiles[np.isfinite(tiles[:, 0])]
    order = surface_order(gy, gx)
    while order > 0 and len(tiles) < 2 * n_poly_terms(order):
        order -= 1
    if len(tiles) == 0:
        logger.warning("no tile has enough noise pixels: significance left as it is")
        return LocalNoiseScale(coeffs=np.array([1.0]), order=0, shape=shape, share_term=term)
    u = 2.0 * tiles[:, 1] / max(nx - 1, 1) - 1.0
    v = 2.0 * tiles[:, 2] / max(ny - 1, 1) - 1.0
    a = poly_terms(u, v, order).T
    w = np.sqrt(tiles[:, 3])
    keep = np.ones(len(tiles), bool)
    for _ in range(2):
        coeffs = np.linalg.lstsq(a[keep] * w[keep, None], tiles[keep, 0] * w[keep], rcond=None)[0]
        resid = tiles[:, 0] - a @ coeffs
        spread = 1.4826 * np.median(np.abs(resid[keep]))
        new = np.abs(resid) <= 3 * max(spread, 1e-3)
        if new.sum() < n_poly_terms(order) or (new == keep).all():
            break
        keep = new
    scale = LocalNoiseScale(coeffs=coeffs, order=order, shape=shape, share_term=term)
    logger.info("significance noise over %d tiles: %.3f-%.3f (order-%d surface %.3f-%.3f)",
                len(tiles), tiles[:, 0].min(), tiles[:, 0].max(), order,
                float(scale.at(tiles[:, 1], tiles[:, 2]).min()),
                float(scale.at(tiles[:, 1], tiles[:, 2]).max()))
    return scale
