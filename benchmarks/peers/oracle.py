"""Oracle subtraction: proper image subtraction (Zackay, Ofek & Gal-Yam 2016, ApJ 830, 27)
with the TRUE PSFs, true flux scale, true sky and true noise levels.

Written from the paper's equations (their eqs. 13-15 for D, P_D and F_D; 12/17 for S;
25-29 for the source-noise-corrected S_corr; 41-42 for the PSF flux).  Notation, with
F_n = 1 (science scale) and F_r the reference's flux scale:

    den   = sigma_n^2 F_r^2 |P_r|^2 + sigma_r^2 |P_n|^2                (Fourier space)
    D     = (F_r P_r N - P_n R) / sqrt(den)            unit white noise where sigma is right
    F_D   = F_r / sqrt(sigma_n^2 F_r^2 + sigma_r^2)
    D'    = D / F_D                                    science flux scale, PSF P_D:
    P_D   = F_r P_r P_n / (F_D sqrt(den))              (unit sum)
    S     = k_n * N - k_r * R,  k_n = F_r^2 conj(P_n) |P_r|^2 / den,  k_r = F_r conj(P_r) |P_n|^2 / den
    V_S   = V_n (x) k_n^2 + V_r (x) k_r^2,   S_corr = S / sqrt(V_S)
    var(D') = V_n (x) d_n^2 + V_r (x) d_r^2,  d_n = F_r P_r / (F_D sqrt(den)), d_r = P_n / (F_D sqrt(den))

The field is processed in GRID_STEP x GRID_STEP cells (each with the true PSFs at its centre and
its own local sigma), padded by PAD pixels; only each cell's core is kept.
"""

from __future__ import annotations

import numpy as np
from scipy import fft

from simulate import GRID_STEP, HALF

PAD = 48


def embed_centred(stamp: np.ndarray, shape) -> np.ndarray:
    """Place an odd stamp in an array of ``shape`` with its centre pixel at index (0, 0) (wrapped)."""
    out = np.zeros(shape)
    h = stamp.shape[0] // 2
    out[:stamp.shape[0], :stamp.shape[1]] = stamp
    return np.roll(out, (-h, -h), axis=(0, 1))


def zogy_kernels(pn: np.ndarray, pr: np.ndarray, sn2: float, sr2: float, fr: float, shape) -> dict:
    """Fourier-space ZOGY quantities for PSF stamps ``pn``, ``pr`` on a tile of ``shape``."""
    Pn, Pr = fft.fft2(embed_centred(pn, shape)), fft.fft2(embed_centred(pr, shape))
    an, ar = np.abs(Pn) ** 2, np.abs(Pr) ** 2
    den = sn2 * fr * fr * ar + sr2 * an
    den = np.maximum(den, 1e-30 * den.max())   # guard: both PSF transforms ~0 at the same frequency
    sq = np.sqrt(den)
    fd = fr / np.sqrt(sn2 * fr * fr + sr2)
    return dict(Pn=Pn, Pr=Pr, sq=sq, fd=fd,
                kn=fr * fr * np.conj(Pn) * ar / den, kr=fr * np.conj(Pr) * an / den,
                dn=fr * Pr / (fd * sq), dr=Pn / (fd * sq),
                PD=fr * Pr * Pn / (fd * sq),
                fs=np.sum(fr * fr * an * ar / den) / (shape[0] * shape[1]))


def _conv(a_hat: np.ndarray, img: np.ndarray) -> np.ndarray:
    return fft.irfft2(fft.rfft2(img) * a_hat[:, :a_hat.shape[1] // 2 + 1], s=img.shape)


def _sq_kernel_hat(k_hat: np.ndarray) -> np.ndarray:
    """Fourier transform of the squared real-space kernel (for variance propagation)."""
    k = np.real(fft.ifft2(k_hat))
    return fft.fft2(k * k)


def zogy_tile(N, R, Vn, Vr, pn, pr, sn2, sr2, fr) -> dict:
    """ZOGY on one (padded) tile; returns D' (science scale), var(D'), S, S_corr and the P_D stamp."""
    k = zogy_kernels(pn, pr, sn2, sr2, fr, N.shape)
    Nh, Rh = fft.fft2(N), fft.fft2(R)
    Dp = np.real(fft.ifft2((fr * k["Pr"] * Nh - k["Pn"] * Rh) / (k["sq"] * k["fd"])))
    S = np.real(fft.ifft2(k["kn"] * Nh - k["kr"] * Rh))
    vs = _conv(_sq_kernel_hat(k["kn"]), Vn) + _conv(_sq_kernel_hat(k["kr"]), Vr)
    vd = _conv(_sq_kernel_hat(k["dn"]), Vn) + _conv(_sq_kernel_hat(k["dr"]), Vr)
    pd = np.fft.fftshift(np.real(fft.ifft2(k["PD"])))
    c0, c1 = N.shape[0] // 2, N.shape[1] // 2
    return dict(diff=Dp, var=np.maximum(vd, 1e-30), S=S, scorr=S / np.sqrt(np.maximum(vs, 1e-30)),
                flux=S / k["fs"], psf=pd[c0 - HALF:c0 + HALF + 1, c1 - HALF:c1 + HALF + 1], fd=k["fd"])


def run_oracle(N, R, Vn, Vr, psf_n_grid, psf_r_grid, grid, fr: float) -> dict:
    """Proper subtraction of the whole field cell by cell.

    Parameters
    ----------
    N, R : ndarray
        Sky-subtracted science and reference images (ADU), same grid.
    Vn, Vr : ndarray
        True per-pixel variances (ADU^2) of N and R, including source Poisson noise.
    psf_n_grid, psf_r_grid : ndarray (n_nodes, K, K)
        True PSFs at the grid nodes ``grid`` (n_nodes, 2) of x, y cell centres.
    fr : float
        Reference flux scale relative to the science image.

    Returns
    -------
    dict with ``diff`` (science-scale D', ADU), ``sigma`` (propagated std of D'), ``scorr``,
    ``flux`` (PSF-flux image S/F_S), ``psf`` (P_D stamps per node), ``fd`` (F_D per node).
    """
    ny, nx = N.shape
    out = {k: np.zeros((ny, nx)) for k in ("diff", "sigma", "scorr", "flux", "sigma_unit")}
    psfs, fds = [], []
    for i, (gx, gy) in enumerate(grid):
        x0, y0 = int(gx - GRID_STEP / 2), int(gy - GRID_STEP / 2)
        x1, y1 = min(x0 + GRID_STEP, nx), min(y0 + GRID_STEP, ny)
        sl = (slice(max(y0 - PAD, 0), min(y1 + PAD, ny)), slice(max(x0 - PAD, 0), min(x1 + PAD, nx)))
        core = (slice(y0 - sl[0].start, y1 - sl[0].start), slice(x0 - sl[1].start, x1 - sl[1].start))
        # Local background-only sigma^2: the median variance of the cell (sky-dominated).
        sn2, sr2 = float(np.median(Vn[y0:y1, x0:x1])), float(np.median(Vr[y0:y1, x0:x1]))
        t = zogy_tile(N[sl], R[sl], Vn[sl], Vr[sl], psf_n_grid[i], psf_r_grid[i], sn2, sr2, fr)
        dst = (slice(y0, y1), slice(x0, x1))
        out["diff"][dst] = t["diff"][core]
        out["sigma"][dst] = np.sqrt(t["var"][core])
        out["sigma_unit"][dst] = np.sqrt(t["var"][core]) * t["fd"]
        out["scorr"][dst] = t["scorr"][core]
        out["flux"][dst] = t["flux"][core]
        psfs.append(t["psf"]); fds.append(t["fd"])
    out["psf"] = np.array(psfs)
    out["fd"] = np.array(fds)
    return out
