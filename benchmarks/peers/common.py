"""Shared helpers of the peer benchmark: reading a pair, true variance maps, PSF look-ups.

Conventions: arrays [y, x]; pixel (0, 0) is the centre of the first pixel; images in ADU.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
from astropy.io import fits
from scipy import fft, ndimage

import simulate


def read_image(path: Path) -> np.ndarray:
    """Primary-HDU image as float64."""
    with fits.open(path, memmap=False) as hdul:
        return np.asarray(hdul[0].data, dtype=np.float64)


def write_image(path: Path, arr: np.ndarray) -> None:
    """Write a float32 image (NaN kept)."""
    fits.writeto(path, np.asarray(arr, dtype=np.float32), overwrite=True)


def load_params(pairdir: Path) -> dict:
    return json.loads((Path(pairdir) / "truth" / "params.json").read_text())


def load_truth(pairdir: Path) -> dict:
    """Truth of a pair: params, transients, stars, noiseless star maps (ADU) and true variances (ADU^2).

    ``var_sci`` includes the transients' Poisson noise, as the injected S/N does."""
    pairdir = Path(pairdir)
    p = load_params(pairdir)
    g, rn2 = p["gain"], p["read_noise_e"] ** 2
    n = p["n"]
    t = dict(params=p, n=n)
    t["transients"] = pd.read_csv(pairdir / "truth" / "transients.csv")
    t["stars"] = pd.read_csv(pairdir / "truth" / "stars.csv")
    sci_st = read_image(pairdir / "truth" / "sci_stars_e.fits")
    ref_st = read_image(pairdir / "truth" / "ref_stars_e.fits")
    sky_s, sky_r = simulate.sky_map("sci", n), simulate.sky_map("ref", n)
    t["sky_sci"], t["sky_ref"] = sky_s / g, sky_r / g
    t["star_sci"], t["star_ref"] = sci_st / g, ref_st / g
    t["bgvar_sci"], t["bgvar_ref"] = (sky_s + rn2) / g ** 2, (sky_r + rn2) / g ** 2
    sci_tr = read_image(pairdir / "truth" / "sci_trans_e.fits")
    t["var_sci"] = (sky_s + sci_st + sci_tr + rn2) / g ** 2   # includes the transients' own noise
    t["var_ref"] = (sky_r + ref_st + rn2) / g ** 2
    return t


def psf_grid(pairdir: Path, which: str) -> tuple[np.ndarray, np.ndarray]:
    """True PSF cube and its (n, 2) grid of x, y node positions."""
    with fits.open(Path(pairdir) / "truth" / f"psf_{which}.fits") as hdul:
        cube = np.asarray(hdul[0].data, dtype=np.float64)
        grid = np.c_[hdul[1].data["x"], hdul[1].data["y"]]
    return cube, grid


def nearest_node(grid: np.ndarray, x: float, y: float) -> int:
    return int(np.argmin((grid[:, 0] - x) ** 2 + (grid[:, 1] - y) ** 2))


def shift_stamp(stamp: np.ndarray, dx: float, dy: float) -> np.ndarray:
    """Sub-pixel shift of a centred stamp by (dx, dy) px (Fourier shift, padded to limit wrap)."""
    pad = stamp.shape[0] // 2
    big = np.pad(stamp, pad)
    out = np.real(fft.ifft2(ndimage.fourier_shift(fft.fft2(big), (dy, dx))))
    return out[pad:-pad, pad:-pad]


def matching_kernel_sumsq(p_target: np.ndarray, p_source: np.ndarray, scale: float) -> float:
    """Sum of squares of the kernel K with K (x) (scale p_source) = p_target (Wiener-regularised)."""
    size = 128
    from oracle import embed_centred   # local import: oracle imports simulate only
    T = fft.fft2(embed_centred(p_target, (size, size)))
    S = fft.fft2(embed_centred(p_source, (size, size))) * scale
    eps = 1e-6 * np.max(np.abs(S) ** 2)
    K = T * np.conj(S) / (np.abs(S) ** 2 + eps)
    return float(np.sum(np.abs(K) ** 2) / size ** 2)
