"""Robust summary statistics shared by the library modules."""

from __future__ import annotations

import numpy as np
from astropy.stats import mad_std


def robust_std(values) -> float:
    """Robust standard deviation: 1.4826 x the median absolute deviation.

    Parameters
    ----------
    values : array_like
        Any shape; non-finite values (NaN, +-inf) are ignored.

    Returns
    -------
    float
        In the unit of ``values``; NaN when no value is finite.  Equals the
        standard deviation for Gaussian values (to sampling error).
    """
    v = np.asarray(values, float).ravel()
    v = v[np.isfinite(v)]
    return float(mad_std(v)) if v.size else float("nan")
