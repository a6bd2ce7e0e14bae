"""The in-memory exposure: image, variance, mask, WCS, PSF and metadata.

Every stage passes :class:`Exposure` objects; :mod:`diffim.io` reads and writes
them as multi-extension FITS (IMAGE, MASK, VARIANCE, PSF).
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

import numpy as np
from astropy.wcs import WCS

from .masks import MASK_DTYPE
from .psf import PsfModel


@dataclass
class Exposure:
    """An image with its per-pixel variance and mask, WCS, PSF and metadata.

    Attributes
    ----------
    image : ndarray (ny, nx) float32
        Pixel values; units in ``meta["BUNIT"]`` (``electron`` for calexps,
        ``nJy`` for warps, coadds and difference images).
    variance : ndarray (ny, nx) float32
        Per-pixel variance, in image units squared.
    mask : ndarray (ny, nx) int32
        Bit mask, planes from :mod:`diffim.masks`.
    wcs : astropy.wcs.WCS or None
        Celestial WCS mapping 0-based pixel ``(x, y)`` to ``(ra, dec)``.
    psf : PsfModel or None
        The PSF of ``image``.
    meta : dict
        FITS-style metadata (upper-case keys <= 8 characters): ``VISIT``,
        ``DETECTOR``, ``BAND``, ``MJD-OBS``, ``EXPTIME``, ``ZEROPT`` ...
    """

    image: np.ndarray
    variance: np.ndarray
    mask: np.ndarray
    wcs: WCS | None = None
    psf: PsfModel | None = None
    meta: dict = field(default_factory=dict)

    def __post_init__(self):
        self.image = np.asarray(self.image, dtype=np.float32)
        self.variance = np.asarray(self.variance, dtype=np.float32)
        self.mask = np.asarray(self.mask, dtype=MASK_DTYPE)
        if not (self.image.shape == self.variance.shape == self.mask.shape):
            raise ValueError(
                f"image {self.image.shape}, variance {self.variance.shape} and "
                f"mask {self.mask.shape} must have the same shape")
        if self.image.ndim != 2:
            raise ValueError(f"image must be 2-D, got shape {self.image.shape}")

    @property
    def shape(self) -> tuple[int, int]:
        """``(ny, nx)``."""
        return self.image.shape

    def cropped(self, x0: int, y0: int, x1: int, y1: int) -> "Exposure":
        """The sub-exposure ``[y0:y1, x0:x1]`` (planes are views), WCS and PSF shifted to it."""
        ny, nx = self.shape
        if not (0 <= x0 < x1 <= nx and 0 <= y0 < y1 <= ny):
            raise ValueError(f"crop box x {x0}:{x1}, y {y0}:{y1} is not inside the "
                             f"{nx} x {ny} exposure")
        sl = (slice(y0, y1), slice(x0, x1))
        part = replace(self, image=self.image[sl], variance=self.variance[sl],
                       mask=self.mask[sl], meta=dict(self.meta))
        return part.with_geometry_of(self.wcs, self.psf, x0, y0)

    def with_geometry_of(self, wcs, psf, x0: int, y0: int) -> "Exposure":
        """This exposure as the part at ``(x0, y0)`` of one with ``wcs`` and ``psf``.

        The WCS and PSF (either may be None) are shifted so that this
        exposure's pixel ``(0, 0)`` is their pixel ``(x0, y0)``.
        """
        ny, nx = self.shape
        return replace(self, wcs=None if wcs is None else wcs[y0:y0 + ny, x0:x0 + nx],
                       psf=None if psf is None else psf.cropped(x0, y0, nx, ny))

    def copy(self, **changes) -> "Exposure":
        """A copy with array planes copied and the given attributes replaced."""
        new = replace(self, image=self.image.copy(), variance=self.variance.copy(),
                      mask=self.mask.copy(), meta=dict(self.meta))
        return replace(new, **changes) if changes else new
