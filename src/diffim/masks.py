"""Named mask bits shared by every stage.

One table, written into every FITS MASK header (``MP_<NAME> = bit``) and used by
detection to set the DIASource pixel flags.  Bits are OR-ed, never cleared.
"""

from __future__ import annotations

import numpy as np

#: name -> bit number.  Order is part of the file format: append, never reorder.
MASK_BITS: dict[str, int] = {
    "NO_DATA": 0,      # no pixel value (NaN in the input, outside a footprint)
    "BAD": 1,          # bad detector column / pixel found in the data
    "SAT": 2,          # saturated, including bleed trails
    "CR": 3,           # cosmic ray
    "EDGE": 4,         # within a PSF half-width of the image edge
    "DETECTED": 5,     # inside a positive detection footprint
    "DETECTED_NEGATIVE": 6,  # inside a negative detection footprint
    "NO_TEMPLATE": 7,  # difference image pixel without template coverage
    "CLIPPED": 8,      # pixel rejected as an outlier in a coadd input
    "INTRP": 9,        # pixel value interpolated (not measured)
}

#: Docstrings of the bits, written into FITS headers as comments.
MASK_DOC: dict[str, str] = {
    "NO_DATA": "no data (NaN input or outside footprint)",
    "BAD": "bad detector column or pixel",
    "SAT": "saturated or bleed trail",
    "CR": "cosmic ray",
    "EDGE": "near image edge (PSF half-width)",
    "DETECTED": "positive detection footprint",
    "DETECTED_NEGATIVE": "negative detection footprint",
    "NO_TEMPLATE": "no template coverage",
    "CLIPPED": "rejected as outlier in a coadd input",
    "INTRP": "interpolated pixel",
}

#: Bits that make a pixel unusable for fitting or measurement.
BAD_FOR_FIT = ("NO_DATA", "BAD", "SAT", "CR", "NO_TEMPLATE")

MASK_DTYPE = np.int32


def bit(name: str) -> int:
    """Return the integer value (``1 << bit``) of the named mask plane.

    Raises
    ------
    KeyError
        If ``name`` is not a known mask plane; the message lists the known ones.
    """
    try:
        return 1 << MASK_BITS[name]
    except KeyError:
        raise KeyError(f"unknown mask plane {name!r}; known: {sorted(MASK_BITS)}") from None


def bits(*names: str) -> int:
    """Return the OR of several named mask planes."""
    value = 0
    for name in names:
        value |= bit(name)
    return value


def any_set(mask: np.ndarray, *names: str) -> np.ndarray:
    """Boolean array: True where any of the named planes is set in ``mask``."""
    return (mask & bits(*names)) != 0


def header_cards() -> list[tuple[str, str, str]]:
    """FITS cards ``(MSKBITn, NAME, comment)`` describing every mask plane.

    Bit ``n`` of the MASK extension means plane ``NAME``.
    """
    return [(f"MSKBIT{b}", name, MASK_DOC[name]) for name, b in MASK_BITS.items()]


def planes_from_header(header) -> dict[str, int]:
    """Inverse of :func:`header_cards`: ``{NAME: bit}`` read from a header."""
    out = {}
    for key, value in header.items():
        if key.startswith("MSKBIT") and key[6:].isdigit():
            out[str(value)] = int(key[6:])
    return out
