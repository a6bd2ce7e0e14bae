"""Association of DIASources across visits and bands into DIAObjects.

Visits are processed in time order (``midpointMjdTai``, then ``visit``).  The
sources of one visit (all its detectors) are matched to the existing objects
by nearest neighbour on the unit sphere (``scipy.spatial.cKDTree`` on unit
vectors, chord distance) within ``radius_arcsec``: all candidate (source,
object) pairs within the radius are taken closest first, each object and
each source at most once per visit.  Unmatched sources start new objects.

An object's position is the weighted mean of its sources' unit vectors,
weight ``max(|psfFlux / psfFluxErr|, 1)^2`` (inverse variance of a centroid
scales with S/N^2), renormalised to the sphere; it is updated after each visit.

Ids are deterministic: ``diaObjectId`` counts from 1 in order of creation
(visits in time order, sources of a visit by ``diaSourceId``).
"""

from __future__ import annotations

import logging

import numpy as np
import pandas as pd
from scipy.spatial import cKDTree

from .evaluate import chord, greedy_one_to_one, unit_vectors

logger = logging.getLogger(__name__)

_REQUIRED = ("diaSourceId", "visit", "band", "midpointMjdTai", "ra", "dec")

#: Columns and dtypes of the objects table.
OBJECT_COLUMNS: dict[str, str] = {
    "diaObjectId": "int64", "ra": "float64", "dec": "float64", "nDiaSources": "int64",
    "firstMjd": "float64", "lastMjd": "float64", "bands": "str", "maxAbsSnr": "float64",
}


def _weights(dia: pd.DataFrame) -> np.ndarray:
    """Position weights ``max(|psfFlux/psfFluxErr|, 1)^2`` (1 when unmeasured)."""
    if not {"psfFlux", "psfFluxErr"} <= set(dia.columns):
        return np.ones(len(dia))
    with np.errstate(divide="ignore", invalid="ignore"):
        snr = np.abs(dia["psfFlux"].to_numpy(float) / dia["psfFluxErr"].to_numpy(float))
    snr = np.where(np.isfinite(snr), snr, 1.0)
    return np.maximum(snr, 1.0) ** 2


def _match_visit(obj_vec: np.ndarray, src_vec: np.ndarray, radius: float) -> np.ndarray:
    """Object index of each source of one visit (-1: new object), one to one."""
    if len(obj_vec) == 0 or len(src_vec) == 0:
        return np.full(len(src_vec), -1, dtype=np.int64)
    norm = obj_vec / np.linalg.norm(obj_vec, axis=1, keepdims=True)
    sdm = cKDTree(src_vec).sparse_distance_matrix(cKDTree(norm), radius, output_type="ndarray")
    order = np.lexsort((sdm["j"], sdm["i"], sdm["v"]))
    return greedy_one_to_one(sdm["i"][order], sdm["j"][order], len(src_vec))


def _visits_in_time_order(dia: pd.DataFrame):
    """Row indices of each visit's sources (by ``diaSourceId``), visits by first MJD."""
    d = dia.assign(_row=np.arange(len(dia)))
    t0 = d.groupby("visit")["midpointMjdTai"].transform("min").fillna(np.inf)
    d = d.assign(_t0=t0).sort_values(["_t0", "visit", "diaSourceId"])
    for _, g in d.groupby(["_t0", "visit"], sort=True):
        yield g["_row"].to_numpy()


def _check(dia: pd.DataFrame, radius_arcsec: float) -> None:
    missing = [c for c in _REQUIRED if c not in dia.columns]
    if missing:
        raise ValueError(f"the DIASource table lacks the column(s) {missing}")
    if not radius_arcsec > 0:
        raise ValueError(f"radius_arcsec must be positive, got {radius_arcsec}")
    if dia["diaSourceId"].duplicated().any():
        raise ValueError("diaSourceId must be unique in the DIASource table")


def associate(dia: pd.DataFrame, *, radius_arcsec: float = 0.7
              ) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Group DIASources into DIAObjects (see module docstring).

    Parameters
    ----------
    dia : DataFrame
        DIASources with ``diaSourceId, visit, band, midpointMjdTai, ra, dec``
        (degrees); ``psfFlux, psfFluxErr`` (position weights) and ``snr`` are
        used when present.
    radius_arcsec : float
        Association radius.

    Returns
    -------
    dia : DataFrame
        The input rows (same order) with a ``diaObjectId`` column (int64).
    objects : DataFrame
        One row per DIAObject, columns :data:`OBJECT_COLUMNS`: ``ra, dec``
        (weighted mean, degrees), ``nDiaSources``, ``firstMjd``/``lastMjd``
        (MJD TAI), ``bands`` (sorted, comma separated), ``maxAbsSnr``
        (largest ``|snr|``, NaN without an ``snr`` column).
    """
    _check(dia, radius_arcsec)
    radius = chord(radius_arcsec)
    vec = unit_vectors(dia["ra"], dia["dec"])
    w = _weights(dia)
    obj_sum = np.zeros((0, 3))
    labels = np.full(len(dia), -1, dtype=np.int64)
    for rows in _visits_in_time_order(dia):
        m = _match_visit(obj_sum, vec[rows], radius)
        new = m < 0
        m[new] = len(obj_sum) + np.arange(new.sum())
        obj_sum = np.vstack([obj_sum, np.zeros((new.sum(), 3))])
        np.add.at(obj_sum, m, vec[rows] * w[rows, None])
        labels[rows] = m
    out = dia.copy()
    out["diaObjectId"] = labels + 1
    logger.info("associated %d DIASources into %d DIAObjects", len(dia), len(obj_sum))
    return out, _objects_table(out, obj_sum)


def _objects_table(dia: pd.DataFrame, obj_sum: np.ndarray) -> pd.DataFrame:
    """The DIAObject summary table from the labelled sources and position sums."""
    if len(obj_sum) == 0:
        return pd.DataFrame({c: pd.Series(dtype=t) for c, t in OBJECT_COLUMNS.items()})
    v = obj_sum / np.linalg.norm(obj_sum, axis=1, keepdims=True)
    ra = np.degrees(np.arctan2(v[:, 1], v[:, 0])) % 360.0
    dec = np.degrees(np.arcsin(np.clip(v[:, 2], -1, 1)))
    snr = dia["snr"].abs() if "snr" in dia.columns else pd.Series(np.nan, index=dia.index)
    g = dia.assign(_asnr=snr).groupby("diaObjectId")
    obj = pd.DataFrame({
        "diaObjectId": np.arange(1, len(v) + 1), "ra": ra, "dec": dec,
        "nDiaSources": g.size().to_numpy(), "firstMjd": g["midpointMjdTai"].min().to_numpy(),
        "lastMjd": g["midpointMjdTai"].max().to_numpy(),
        "bands": g["band"].agg(lambda b: ",".join(sorted(set(map(str, b))))).to_numpy(),
        "maxAbsSnr": g["_asnr"].max().to_numpy()})
    return obj.astype(OBJECT_COLUMNS)
