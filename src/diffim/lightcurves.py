"""Forced PSF photometry of DIAObjects on difference images: full light curves.

Every DIAObject position that falls on a difference image is measured there,
detected or not, with :func:`diffim.detect.forced_psf_photometry` (PSF fit at a
fixed position, errors from the variance plane and the measured noise
correlation).  Fluxes in nJy; pixel ``(0, 0)`` is the centre of the first
pixel, so an image covers ``-0.5 <= x < nx - 0.5``.
"""

from __future__ import annotations

import logging

import numpy as np
import pandas as pd

from .detect import forced_psf_photometry, noise_terms
from .exposure import Exposure
from .noisescale import BlockMap, LocalNoiseScale
from .residuals import Systematics

logger = logging.getLogger(__name__)

#: Output columns and dtypes of :func:`forced_photometry`.
COLUMNS: dict[str, str] = {
    "diaObjectId": "int64", "visit": "int64", "detector": "int32", "band": "str",
    "midpointMjdTai": "float64", "x": "float64", "y": "float64",
    "psfFlux": "float64", "psfFluxErr": "float64",
}


def empty_light_curves() -> pd.DataFrame:
    """An empty forced-photometry table with the columns of :data:`COLUMNS`."""
    return pd.DataFrame({c: pd.Series(dtype=t) for c, t in COLUMNS.items()})


def object_pixels(wcs, objects: pd.DataFrame, shape) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Pixel positions of objects and whether they fall on an image of ``shape``.

    Returns
    -------
    x, y : ndarray
        0-based pixel positions (NaN where the WCS cannot map them).
    inside : ndarray of bool
        Finite and within ``-0.5 <= x < nx - 0.5``, ``-0.5 <= y < ny - 0.5``.
    """
    ra = objects["ra"].to_numpy(float)
    dec = objects["dec"].to_numpy(float)
    if ra.size == 0:
        return np.zeros(0), np.zeros(0), np.zeros(0, bool)
    with np.errstate(invalid="ignore", divide="ignore"):
        x, y = wcs.world_to_pixel_values(ra, dec)
    x, y = np.asarray(x, float), np.asarray(y, float)
    ny, nx = shape
    with np.errstate(invalid="ignore"):
        inside = (np.isfinite(x) & np.isfinite(y) & (x >= -0.5) & (x < nx - 0.5)
                  & (y >= -0.5) & (y < ny - 0.5))
    return x, y, inside


def forced_photometry(diff_exposure: Exposure, objects: pd.DataFrame, visit: int,
                      detector: int, band: str, mjd: float, *,
                      scene: np.ndarray | None = None,
                      template_share: BlockMap | None = None) -> pd.DataFrame:
    """PSF fluxes (nJy) of every DIAObject that falls on one difference image.

    Parameters
    ----------
    diff_exposure : Exposure
        Difference image (nJy) with variance, mask, WCS and PSF.
    objects : DataFrame
        ``diaObjectId, ra, dec`` (degrees).
    visit, detector, band, mjd
        Copied into every row (``mjd``: exposure midpoint, MJD TAI).
    scene : ndarray, optional
        The template on the difference's grid: the systematic residual terms
        recorded in the difference's header (:class:`diffim.residuals.Systematics`)
        are added to the errors.
    template_share : BlockMap, optional
        The difference's template-share map (its ``TSHARE`` extension), which
        the local noise scale recorded in the header follows
        (:class:`diffim.noisescale.LocalNoiseScale`).

    Returns
    -------
    DataFrame
        One row per object on the image: ``diaObjectId, visit, detector,
        band, midpointMjdTai, x, y, psfFlux, psfFluxErr`` (:data:`COLUMNS`).
        Objects off the image are skipped; a position whose PSF overlaps no
        usable pixel is dropped too (NaN flux).
    """
    if diff_exposure.wcs is None:
        raise ValueError(f"the difference image of visit {visit} detector {detector} has no "
                         "WCS, so object positions cannot be placed on it")
    for col in ("diaObjectId", "ra", "dec"):
        if col not in objects.columns:
            raise ValueError(f"objects table lacks the column {col!r}")
    x, y, inside = object_pixels(diff_exposure.wcs, objects, diff_exposure.shape)
    if not inside.any():
        return empty_light_curves()
    meta = diff_exposure.meta
    noise = noise_terms(diff_exposure, systematics=Systematics.from_meta(meta),
                        local_scale=LocalNoiseScale.from_meta(meta, diff_exposure.shape,
                                                              share=template_share))
    flux, err = forced_psf_photometry(diff_exposure, x[inside], y[inside], noise=noise,
                                      scene=scene)
    out = pd.DataFrame({
        "diaObjectId": objects["diaObjectId"].to_numpy()[inside], "visit": visit,
        "detector": detector, "band": band, "midpointMjdTai": mjd,
        "x": x[inside], "y": y[inside], "psfFlux": flux, "psfFluxErr": err})
    out = out[np.isfinite(out["psfFlux"]) & np.isfinite(out["psfFluxErr"])]
    logger.info("forced photometry of %d objects on visit %s detector %s",
                len(out), visit, detector)
    return out.astype(COLUMNS).reset_index(drop=True)


def mark_detections(forced: pd.DataFrame, dia: pd.DataFrame) -> pd.DataFrame:
    """Add ``detected`` (bool): the object has a DIASource in that visit and detector.

    ``dia`` must carry ``diaObjectId`` (from :func:`diffim.associate.associate`).
    """
    keys = ["diaObjectId", "visit", "detector"]
    hits = dia[keys].drop_duplicates().assign(detected=True)
    hits["detector"] = hits["detector"].astype(forced["detector"].dtype)
    out = forced.merge(hits, on=keys, how="left")
    out["detected"] = out["detected"].astype("boolean").fillna(False).astype(bool)
    return out
