"""Schemas of the contract's tables (CONTRACT.md) and DIASource ids."""

from __future__ import annotations

import numpy as np
import pyarrow as pa

DIA_SOURCE_SCHEMA = pa.schema([
    ("diaSourceId", pa.int64()), ("visit", pa.int64()), ("detector", pa.int32()),
    ("band", pa.string()), ("midpointMjdTai", pa.float64()),
    ("ra", pa.float64()), ("dec", pa.float64()), ("x", pa.float64()), ("y", pa.float64()),
    ("psfFlux", pa.float64()), ("psfFluxErr", pa.float64()), ("snr", pa.float64()),
    ("isNegative", pa.bool_()), ("isDipole", pa.bool_()),
    ("pixelFlags_edge", pa.bool_()), ("pixelFlags_saturated", pa.bool_()),
    ("pixelFlags_bad", pa.bool_()),
])

VISIT_STATUS_SCHEMA = pa.schema([
    ("file", pa.string()), ("visit", pa.int64()), ("detector", pa.int32()),
    ("band", pa.string()), ("status", pa.string()), ("reason", pa.string()),
])

COADD_INPUTS_SCHEMA = pa.schema([
    ("band", pa.string()), ("patch", pa.string()), ("visit", pa.int64()),
    ("detector", pa.int32()), ("included", pa.bool_()), ("weight", pa.float64()),
    ("reason", pa.string()),
])

_DET_BITS, _ROW_BITS = 10, 20


def dia_source_ids(visit: int, detector: int, n: int) -> np.ndarray:
    """Unique, reproducible int64 ids: ``((visit << 10 | detector) << 20) | row``.

    Raises
    ------
    ValueError
        If visit, detector or n do not fit their bit fields (visit < 2**33,
        detector < 1024, n < 2**20).
    """
    if not (0 <= visit < 2 ** (63 - _DET_BITS - _ROW_BITS)):
        raise ValueError(f"visit {visit} does not fit in a DIASource id")
    if not (0 <= detector < 2**_DET_BITS) or n >= 2**_ROW_BITS:
        raise ValueError(f"detector {detector} or {n} sources do not fit in DIASource ids")
    base = ((int(visit) << _DET_BITS) | int(detector)) << _ROW_BITS
    return base + np.arange(n, dtype=np.int64)
