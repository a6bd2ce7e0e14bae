"""The exposure index: one row per input file, built from FITS headers.

Snakemake needs the list of (visit, detector) jobs before running them.  The
index reads each file's header once and caches the result keyed by
``(path, size, mtime)``: rebuilding it after a file is added or touched reads
only that file's header.
"""

from __future__ import annotations

import glob as globmod
import logging
import os

import pandas as pd
import pyarrow as pa

from .errors import InputError
from .io import first_line, header_meta, header_wcs, read_header

logger = logging.getLogger(__name__)

INDEX_SCHEMA = pa.schema([
    ("file", pa.string()), ("visit", pa.int64()), ("detector", pa.int32()),
    ("band", pa.string()), ("mjd_obs", pa.float64()), ("exptime", pa.float64()),
    ("midpoint_mjd", pa.float64()), ("status", pa.string()), ("reason", pa.string()),
    ("size", pa.int64()), ("mtime_ns", pa.int64()),
])


def expand_globs(patterns) -> list[str]:
    """Sorted, de-duplicated files matching one glob or a list of globs.

    Directories are skipped.  Relative patterns resolve against the working
    directory; returned paths keep the form of the pattern.
    """
    if patterns is None:
        return []
    if isinstance(patterns, (str, os.PathLike)):
        patterns = [patterns]
    files = set()
    for pattern in patterns:
        files.update(p for p in globmod.glob(str(pattern), recursive=True) if os.path.isfile(p))
    return sorted(files)


def index_row(path) -> dict:
    """One index row for ``path``: its metadata, or a failed row with the reason."""
    st = os.stat(path)
    row = dict(file=str(path), visit=-1, detector=-1, band="", mjd_obs=float("nan"),
               exptime=float("nan"), midpoint_mjd=float("nan"), status="ok", reason="",
               size=int(st.st_size), mtime_ns=int(st.st_mtime_ns))
    try:
        if st.st_size == 0:
            raise InputError(f"{path}: file is empty (0 bytes)")
        header = _read_primary_header(path)
        meta = header_meta(header, path)
        header_wcs(header, path)
    except InputError as exc:
        row.update(status="failed", reason=str(exc))
        return row
    row.update({k: meta[k] for k in ("visit", "detector", "band", "mjd_obs", "exptime",
                                     "midpoint_mjd")})
    return row


def _read_primary_header(path):
    """Header of the image HDU (primary, or first extension when primary is empty)."""
    try:
        header = read_header(path, 0)
        if header.get("NAXIS", 0) == 0:
            header.update(read_header(path, 1))
    except Exception as exc:  # astropy raises OSError, ValueError, IndexError, ...
        raise InputError(f"{path}: not a readable FITS file ({first_line(exc)})") from None
    return header


def build_index(files, *, previous: pd.DataFrame | None = None) -> pd.DataFrame:
    """Index ``files``, reusing rows of ``previous`` whose size and mtime match.

    Duplicate ``(visit, detector)`` pairs are marked failed (all but the first
    file in sorted order), naming the file that was kept.
    """
    cache = {}
    if previous is not None and len(previous):
        cache = {r.file: r._asdict() for r in previous.itertuples(index=False)}
    rows, n_read = [], 0
    for path in files:
        st = os.stat(path)
        old = cache.get(str(path))
        if old is not None and old["size"] == st.st_size and old["mtime_ns"] == st.st_mtime_ns:
            rows.append(old)
            continue
        rows.append(index_row(path))
        n_read += 1
    logger.info("exposure index: %d files, %d headers read, %d from cache",
                len(rows), n_read, len(rows) - n_read)
    table = pd.DataFrame(rows, columns=INDEX_SCHEMA.names)
    return _mark_duplicates(table)


def _mark_duplicates(table: pd.DataFrame) -> pd.DataFrame:
    table = table.copy()
    ok = table["status"] == "ok"
    seen: dict[tuple[int, int], str] = {}
    for i in table.index[ok]:
        key = (int(table.at[i, "visit"]), int(table.at[i, "detector"]))
        if key in seen:
            table.at[i, "status"] = "failed"
            table.at[i, "reason"] = (f"{table.at[i, 'file']}: visit {key[0]} detector {key[1]} "
                                     f"duplicates {seen[key]}, which is used instead")
        else:
            seen[key] = table.at[i, "file"]
    return table
