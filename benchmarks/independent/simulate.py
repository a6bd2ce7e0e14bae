#!/usr/bin/env python
"""Independent simulator of raw-ish "eimages" for the diffim data contract.

Written from scratch, without reading diffim.simulate (nor anything in
src/diffim).  Only numpy, scipy, astropy and pandas are used.

What it makes (see README.md next to this file):

* a mosaic camera (one or more CCDs per visit, each with its own WCS and
  DETECTOR keyword), pixel values in ADU (BUNIT='ADU', GAIN), integer or
  float32 pixels, sky not subtracted, Poisson + read noise, saturation with
  bleed trails, hot pixels, a bad column, cosmic rays and a few NaN pixels;
* a Kolmogorov (atmospheric) PSF, approximated by a mixture of Gaussians fitted
  to the exact long-exposure Kolmogorov profile, convolved with a Gaussian
  optics term, elliptical, with FWHM and ellipticity varying over the focal
  plane, integrated over pixels by sub-pixel sampling;
* a true WCS that is TAN plus a radial + decentering focal-plane distortion;
  the header carries only an approximate TAN (or TAN-SIP) WCS, shifted,
  rotated and scaled within the contract's tolerances;
* stars (power-law luminosity function), Sersic galaxies (exponential and de
  Vaucouleurs mixtures of Gaussians, convolved analytically with the PSF),
  transients (Bazin light curves, on hosts or hostless) and periodic variable
  stars;
* a reference catalogue (stars only, noisy, incomplete) and truth tables.

Usage:  python simulate.py --outdir DIR [--seed N] [--preset small|wide|lsst]
"""
import argparse
import json
import math
import os
import time

import numpy as np
import pandas as pd
from astropy.io import fits
from scipy import optimize, special
from scipy.optimize import nnls

NJY_ZP = 31.4  # AB mag of 1 nJy
NEAR_DEFECT_PX = 8.0  # truth flag: variable this close to a NaN/hot/bad/saturated pixel

# Photometric system of the simulated camera: zp1s = AB magnitude that gives
# 1 electron per second above the atmosphere; sky in AB mag / arcsec^2 (dark
# time); ext = extinction coefficient (mag / airmass).
BANDS = {
    "r": dict(zp1s=27.05, sky_mag=21.0, ext=0.10, var_amp=1.15),
    "i": dict(zp1s=26.90, sky_mag=20.2, ext=0.07, var_amp=1.00),
    "z": dict(zp1s=26.50, sky_mag=19.2, ext=0.05, var_amp=0.90),
}

PRESETS = {
    "small": dict(
        bands=["i"],
        n_visits=8,
        nx=1000, ny=1040,
        # detector id -> focal-plane offset of pixel (0, 0) in pixels; two CCDs
        # side by side with a 60 px gap, the optical axis in the gap
        detectors={5: (-1030.0, -519.5), 6: (30.0, -519.5)},
        pixel_scale=0.26,
        ra0=95.0, dec0=-20.0,
        star_density=33000.0,  # per deg^2, 14 < i < 25.5
        gal_density=15000.0,   # per deg^2, 18 < i < 24
        n_bright=6,            # extra bright (saturating) stars
        n_transients=30, n_varstars=10,
        central_radius=140.0,  # arcsec: where variables are put
        dither=80.0,           # arcsec, max boresight offset
        seeing=(0.8, 1.5),
        exptime=(30.0, 90.0),
        distortion_px=3.0,     # radial distortion at the mosaic corner
        mjd0=60310.0, span=45.0,
        first_visit=412000,
    ),
    "wide": dict(
        bands=["r", "z"],
        n_visits=12,
        nx=2048, ny=2048,
        detectors={22: (-1023.5, -1023.5)},
        pixel_scale=0.26,
        ra0=214.9, dec0=52.6,
        star_density=15000.0,
        gal_density=12000.0,
        n_bright=6,
        n_transients=40, n_varstars=12,
        central_radius=220.0,
        dither=130.0,
        seeing=(0.7, 1.4),
        exptime=(30.0, 90.0),
        distortion_px=3.0,
        mjd0=60420.0, span=60.0,
        first_visit=7100,
    ),
    "lsst": dict(
        # one LSST-sized sensor (4000 x 4072 px, 0.2"/px), the cookbook's eimage size
        bands=["r"],
        n_visits=8,
        nx=4000, ny=4072,
        detectors={94: (-1999.5, -2035.5)},
        pixel_scale=0.2,
        ra0=53.0, dec0=-28.1,
        star_density=15000.0,
        gal_density=12000.0,
        n_bright=8,
        n_transients=60, n_varstars=15,
        central_radius=300.0,
        dither=150.0,
        seeing=(0.6, 1.2),
        exptime=(15.0, 30.0),
        distortion_px=3.0,
        mjd0=60600.0, span=40.0,
        first_visit=2290000,
    ),
}

# Variants of 'small' (and one of 'wide') that change one condition each, to see
# how the pipeline copes with data these presets do not make (thirty-second
# session).  The names seed the random numbers: renaming one changes its data.
_SMALL = PRESETS["small"]
PRESETS.update({
    "few": dict(_SMALL, n_visits=3, first_visit=515000),              # 3 visits
    "two": dict(_SMALL, n_visits=2, first_visit=520000),              # 2 visits
    "badseeing": dict(_SMALL, seeing=(1.6, 2.6), first_visit=516000),  # FWHM 6-10 px
    "under": dict(_SMALL, pixel_scale=0.45, seeing=(0.6, 1.0), nx=800, ny=832,  # FWHM 1.3-2.2 px
                  detectors={5: (-830.0, -415.5), 6: (30.0, -415.5)}, first_visit=517000),
    "sparse": dict(_SMALL, star_density=3000.0, gal_density=3000.0,   # ~16 stars per CCD
                   first_visit=518000),
    "crowded": dict(_SMALL, star_density=200000.0, first_visit=519000),
    "distort": dict(_SMALL, distortion_px=15.0, first_visit=521000),  # 15 px at the corner
    "bigdither": dict(_SMALL, dither=300.0, n_visits=10,              # beyond the contract's
                      first_visit=522000),                           # quarter-field dithers
    "rect": dict(PRESETS["wide"], nx=1024, ny=3072, detectors={22: (-511.5, -1535.5)},
                 first_visit=523000),                                # a 1024 x 3072 CCD
})


# ----------------------------------------------------------------------------
# spherical geometry (gnomonic projection), written out by hand


def tan_project(ra, dec, ra0, dec0):
    """(ra, dec) deg -> standard coordinates (xi east, eta north) in degrees."""
    a = np.radians(np.asarray(ra, float))
    d = np.radians(np.asarray(dec, float))
    a0, d0 = math.radians(ra0), math.radians(dec0)
    cosc = math.sin(d0) * np.sin(d) + math.cos(d0) * np.cos(d) * np.cos(a - a0)
    xi = np.cos(d) * np.sin(a - a0) / cosc
    eta = (math.cos(d0) * np.sin(d) - math.sin(d0) * np.cos(d) * np.cos(a - a0)) / cosc
    return np.degrees(xi), np.degrees(eta)


def tan_deproject(xi, eta, ra0, dec0):
    """standard coordinates (deg) -> (ra, dec) deg."""
    x = np.radians(np.asarray(xi, float))
    y = np.radians(np.asarray(eta, float))
    a0, d0 = math.radians(ra0), math.radians(dec0)
    rho = np.hypot(x, y)
    dec = np.arcsin((math.sin(d0) + y * math.cos(d0)) / np.sqrt(1.0 + rho**2))
    ra = a0 + np.arctan2(x, math.cos(d0) - y * math.sin(d0))
    return np.degrees(ra) % 360.0, np.degrees(dec)


def angsep_arcsec(ra1, dec1, ra2, dec2):
    r1, d1, r2, d2 = map(np.radians, (ra1, dec1, ra2, dec2))
    s = np.sin((d2 - d1) / 2) ** 2 + np.cos(d1) * np.cos(d2) * np.sin((r2 - r1) / 2) ** 2
    return np.degrees(2 * np.arcsin(np.sqrt(s))) * 3600.0


class CameraWCS:
    """True pixel <-> sky mapping of one detector in one visit.

    pixel (x, y) -> focal plane (u, v) = (x + ox, y + oy) -> distorted (radial
    k1 and decentering p1, p2 terms, in pixels) -> rotate/scale to standard
    coordinates about the boresight -> gnomonic deprojection.
    """

    def __init__(self, ra_b, dec_b, rot_deg, scale, offset, k1, p1, p2):
        self.ra_b, self.dec_b = ra_b, dec_b
        self.ox, self.oy = offset
        self.k1, self.p1, self.p2 = k1, p1, p2
        t = math.radians(rot_deg)
        rot = np.array([[math.cos(t), -math.sin(t)], [math.sin(t), math.cos(t)]])
        # east is to the left for rot=0 (the usual sky parity)
        self.M = scale / 3600.0 * rot @ np.array([[-1.0, 0.0], [0.0, 1.0]])
        self.Minv = np.linalg.inv(self.M)

    def _distort(self, u, v):
        r2 = u * u + v * v
        du = self.k1 * u * r2 + self.p1 * (r2 + 2 * u * u) + 2 * self.p2 * u * v
        dv = self.k1 * v * r2 + self.p2 * (r2 + 2 * v * v) + 2 * self.p1 * u * v
        return u + du, v + dv

    def focal(self, x, y):
        return np.asarray(x, float) + self.ox, np.asarray(y, float) + self.oy

    def pix2sky(self, x, y):
        u, v = self.focal(x, y)
        ud, vd = self._distort(u, v)
        xi = self.M[0, 0] * ud + self.M[0, 1] * vd
        eta = self.M[1, 0] * ud + self.M[1, 1] * vd
        return tan_deproject(xi, eta, self.ra_b, self.dec_b)

    def sky2pix(self, ra, dec):
        xi, eta = tan_project(ra, dec, self.ra_b, self.dec_b)
        ud = self.Minv[0, 0] * xi + self.Minv[0, 1] * eta
        vd = self.Minv[1, 0] * xi + self.Minv[1, 1] * eta
        u, v = ud.copy(), vd.copy()
        for _ in range(30):  # fixed-point inversion of a tiny distortion
            fu, fv = self._distort(u, v)
            u, v = u + (ud - fu), v + (vd - fv)
        return u - self.ox, v - self.oy

    def jacobian(self, ra, dec):
        """d(x, y)/d(east, north) in pixels per arcsec, shape (n, 2, 2)."""
        ra = np.atleast_1d(ra).astype(float)
        dec = np.atleast_1d(dec).astype(float)
        h = 0.5  # arcsec
        cosd = np.cos(np.radians(dec))
        xe1, ye1 = self.sky2pix(ra + h / 3600 / cosd, dec)
        xe0, ye0 = self.sky2pix(ra - h / 3600 / cosd, dec)
        xn1, yn1 = self.sky2pix(ra, dec + h / 3600)
        xn0, yn0 = self.sky2pix(ra, dec - h / 3600)
        J = np.empty((len(ra), 2, 2))
        J[:, 0, 0] = (xe1 - xe0) / (2 * h)
        J[:, 1, 0] = (ye1 - ye0) / (2 * h)
        J[:, 0, 1] = (xn1 - xn0) / (2 * h)
        J[:, 1, 1] = (yn1 - yn0) / (2 * h)
        return J


# ----------------------------------------------------------------------------
# profiles as mixtures of Gaussians (fitted here, by NNLS)


def _fit_mog(r, prof, sigmas):
    """Non-negative unit-flux 2-D Gaussians fitting a radial profile (area-weighted)."""
    basis = np.exp(-0.5 * (r[:, None] / sigmas[None, :]) ** 2) / (2 * np.pi * sigmas**2)
    w = np.sqrt(r * np.gradient(r))  # sqrt of the annulus area element
    A = basis * w[:, None]
    b = prof * w
    # an extra row pinning the total flux to 1
    big = 30.0 * np.abs(b).max()
    A = np.vstack([A, big * np.ones(len(sigmas))])
    b = np.append(b, big * 1.0)
    amp, _ = nnls(A, b)
    keep = amp > 1e-3 * amp.sum()
    amp, sig = amp[keep], sigmas[keep]
    return amp / amp.sum(), sig


def kolmogorov_mog():
    """Long-exposure Kolmogorov PSF, in units of lambda/r0, as a Gaussian mixture.

    PSF(theta) = 2 pi Int f MTF(f) J0(2 pi f theta) df, MTF = exp(-3.44 f^(5/3)).
    Its FWHM is ~0.976 lambda/r0.
    """
    f = np.linspace(0.0, 6.0, 6001)
    mtf = np.exp(-3.44 * f ** (5.0 / 3.0))
    theta = np.linspace(0.0, 6.0, 1201)
    integrand = 2 * np.pi * f[None, :] * mtf[None, :] * special.j0(2 * np.pi * f[None, :] * theta[:, None])
    prof = np.trapezoid(integrand, f, axis=1)
    sig = np.geomspace(0.15, 4.0, 11)
    return _fit_mog(theta, prof, sig)


def sersic_mog(n):
    """Unit-flux circular Sersic profile with half-light radius 1, as a mixture."""
    bn = special.gammaincinv(2 * n, 0.5)
    rmax = 4.0 if n <= 1.5 else 8.0  # truncation (softened) as in survey codes
    r = np.concatenate([np.geomspace(1e-3, 0.05, 60), np.linspace(0.05, rmax * 1.3, 1200)[1:]])
    prof = np.exp(-bn * (r ** (1.0 / n) - 1.0))
    taper = np.where(r < rmax * 0.75, 1.0, np.clip(1 - ((r - 0.75 * rmax) / (0.25 * rmax)) ** 2, 0, 1) ** 2)
    prof = prof * taper
    prof /= np.trapezoid(2 * np.pi * r * prof, r)
    sig = np.geomspace(0.006 if n > 2 else 0.05, 3.5 if n > 2 else 2.5, 11)
    return _fit_mog(r, prof, sig)


def mog_fwhm(amp, sig):
    peak = np.sum(amp / (2 * np.pi * sig**2))
    fn = lambda t: np.sum(amp / (2 * np.pi * sig**2) * np.exp(-0.5 * (t / sig) ** 2)) - 0.5 * peak
    return 2 * optimize.brentq(fn, 1e-6, 20 * sig.max())


class VisitPSF:
    """PSF of one visit: Kolmogorov mixture (x) optics Gaussian, field-dependent."""

    def __init__(self, kolmo, fwhm_arcsec, pixel_scale, rng, r_fp):
        amp, sig = kolmo
        sig_opt = 0.22 / pixel_scale  # optics + charge diffusion, pixels
        target = fwhm_arcsec / pixel_scale

        def fw(scale):
            return mog_fwhm(amp, np.sqrt((sig * scale) ** 2 + sig_opt**2)) - target

        scale = optimize.brentq(fw, 1e-3, 50.0)
        self.amp = amp
        self.sig = np.sqrt((sig * scale) ** 2 + sig_opt**2)  # pixels, at field centre
        self.fwhm_px = target
        self.r_fp = r_fp
        # field dependence: FWHM grows towards the edge; ellipticity = constant
        # (wind shake / tracking) + a tangential (astigmatism-like) pattern
        self.c_fwhm = rng.uniform(0.04, 0.12)
        e = rng.uniform(0.0, 0.07)
        phi = rng.uniform(0, np.pi)
        self.e0 = (e * math.cos(2 * phi), e * math.sin(2 * phi))
        self.c_ell = rng.uniform(0.02, 0.06)

    def shape_at(self, u, v):
        """Per-position (scale factor, g1, g2) from focal-plane position (px)."""
        rho2 = (u * u + v * v) / self.r_fp**2
        fac = 1.0 + self.c_fwhm * rho2
        ang = np.arctan2(v, u)
        g1 = self.e0[0] - self.c_ell * rho2 * np.cos(2 * ang)
        g2 = self.e0[1] - self.c_ell * rho2 * np.sin(2 * ang)
        return fac, g1, g2

    def covariances(self, u, v):
        """List of (amp, cov[n,2,2]) for positions u, v (arrays)."""
        fac, g1, g2 = self.shape_at(np.atleast_1d(u), np.atleast_1d(v))
        g = np.clip(np.hypot(g1, g2), 0, 0.5)
        q = (1 - g) / (1 + g)
        beta = 0.5 * np.arctan2(g2, g1)
        c, s = np.cos(beta), np.sin(beta)
        # unit-determinant shape matrix with the major axis at angle beta
        S = np.empty((len(q), 2, 2))
        S[:, 0, 0] = c * c / q + s * s * q
        S[:, 1, 1] = s * s / q + c * c * q
        S[:, 0, 1] = S[:, 1, 0] = c * s * (1 / q - q)
        out = []
        for a, sg in zip(self.amp, self.sig):
            out.append((a, (sg * fac)[:, None, None] ** 2 * S))
        return out


# ----------------------------------------------------------------------------
# rendering


def render(img, x0, y0, amps, covs, flux_tol):
    """Add a sum of 2-D Gaussians (amps in electrons, covs in px^2) centred on
    (x0, y0) (0-based, pixel centres at integers), integrated over pixels by
    sub-pixel sampling. Each component gets its own stamp, large enough that
    the flux it loses outside the stamp is below flux_tol electrons (or 1e-4 of
    its own flux), and its own sub-sampling (finer for narrow components)."""
    ny, nx = img.shape
    ix, iy = int(round(x0)), int(round(y0))
    for a, C in zip(amps, covs):
        if a <= 0:
            continue
        det = C[0, 0] * C[1, 1] - C[0, 1] ** 2
        tr = C[0, 0] + C[1, 1]
        lmax = 0.5 * tr + math.sqrt(max(0.25 * tr * tr - det, 0.0))
        lmin = det / lmax
        smax, smin = math.sqrt(lmax), math.sqrt(lmin)
        tol = max(flux_tol, 1e-4 * a)
        R = 3 if a <= tol else int(math.ceil(smax * math.sqrt(2 * math.log(a / tol)))) + 1
        R = min(max(R, 3), 200)
        xlo, xhi = max(ix - R, 0), min(ix + R + 1, nx)
        ylo, yhi = max(iy - R, 0), min(iy + R + 1, ny)
        if xlo >= xhi or ylo >= yhi:
            continue
        os_ = 7 if smin < 0.8 else 5 if smin < 1.5 else 3 if smin < 3.0 else 2 if smin < 6.0 else 1
        sub = (np.arange(os_) + 0.5) / os_ - 0.5
        dx = (np.arange(xlo, xhi)[:, None] + sub[None, :]).ravel() - x0
        dy = (np.arange(ylo, yhi)[:, None] + sub[None, :]).ravel() - y0
        i00, i11, i01 = C[1, 1] / det, C[0, 0] / det, -C[0, 1] / det
        q = (i00 * dx * dx)[None, :] + (i11 * dy * dy)[:, None] + (2 * i01) * np.outer(dy, dx)
        val = np.exp(-0.5 * q)
        if os_ > 1:
            val = val.reshape(yhi - ylo, os_, xhi - xlo, os_).sum(axis=(1, 3))
        img[ylo:yhi, xlo:xhi] += (a / (2 * np.pi * math.sqrt(det) * os_**2)) * val


def bleed(img, full_well):
    """Move charge above full well along columns (both directions)."""
    cols = np.where((img > full_well).any(axis=0))[0]
    boxes = []
    for c in cols:
        col = img[:, c]
        over = col > full_well
        # connected runs
        idx = np.where(over)[0]
        runs = np.split(idx, np.where(np.diff(idx) > 1)[0] + 1)
        for run in runs:
            lo, hi = run[0], run[-1]
            excess = float(np.sum(col[lo:hi + 1] - full_well))
            col[lo:hi + 1] = full_well
            up, down = excess / 2, excess / 2
            j = hi + 1
            while up > 0 and j < len(col):
                room = max(full_well - col[j], 0)
                take = min(room, up)
                col[j] += take
                up -= take
                j += 1
            top = j - 1
            j = lo - 1
            while down > 0 and j >= 0:
                room = max(full_well - col[j], 0)
                take = min(room, down)
                col[j] += take
                down -= take
                j -= 1
            bottom = j + 1
            boxes.append((c, bottom, c, top))
        img[:, c] = col
    return boxes


# ----------------------------------------------------------------------------
# the sky


def make_sky(p, rng):
    """Stars, galaxies, transients and variable stars over a disk."""
    scale = p["pixel_scale"]
    half_diag = max(math.hypot(max(abs(ox), abs(ox + p["nx"])), max(abs(oy), abs(oy + p["ny"])))
                    for ox, oy in p["detectors"].values()) * scale
    radius = half_diag + p["dither"] + 25.0  # arcsec
    area = math.pi * (radius / 3600.0) ** 2

    def disk(n, rmax):
        r = rmax * np.sqrt(rng.uniform(0, 1, n))
        t = rng.uniform(0, 2 * np.pi, n)
        return tan_deproject(r * np.cos(t) / 3600, r * np.sin(t) / 3600, p["ra0"], p["dec0"])

    # stars: dN/dm ~ 10^(0.2 m) between 14 and 25.5 (reference band i)
    n = rng.poisson(p["star_density"] * area)
    lo, hi, alpha = 14.0, 25.5, 0.2
    u = rng.uniform(0, 1, n)
    imag = np.log10(10 ** (alpha * lo) + u * (10 ** (alpha * hi) - 10 ** (alpha * lo))) / alpha
    ra, dec = disk(n, radius)
    # a few bright, saturating stars, near the middle so they land on CCDs
    nb = p["n_bright"]
    rab, decb = disk(nb, 0.8 * half_diag)
    imag = np.concatenate([imag, rng.uniform(11.5, 14.0, nb)])
    ra, dec = np.concatenate([ra, rab]), np.concatenate([dec, decb])
    n = len(imag)
    r_i = np.clip(0.12 + rng.gamma(2.0, 0.2, n), 0.05, 1.8)
    i_z = 0.04 + 0.55 * r_i + rng.normal(0, 0.03, n)
    stars = pd.DataFrame(dict(star_id=np.arange(n), ra=ra, dec=dec,
                              r_mag=imag + r_i, i_mag=imag, z_mag=imag - i_z))

    # galaxies: dN/dm ~ 10^(0.33 m), 18 < i < 24
    ng = rng.poisson(p["gal_density"] * area)
    lo, hi, alpha = 18.0, 24.0, 0.33
    u = rng.uniform(0, 1, ng)
    gi = np.log10(10 ** (alpha * lo) + u * (10 ** (alpha * hi) - 10 ** (alpha * lo))) / alpha
    gra, gdec = disk(ng, radius)
    kind = rng.choice(["exp", "dev", "bd"], ng, p=[0.65, 0.15, 0.20])
    # size-magnitude relation (circularised half-light radius, arcsec)
    re = np.clip(10 ** (rng.normal(0.0, 0.18, ng) - 0.12 * (gi - 20.0)) * 0.9, 0.25, 4.0)
    re_bulge = np.clip(re * rng.uniform(0.2, 0.5, ng), 0.15, 2.0)
    btf = np.where(kind == "exp", 0.0, np.where(kind == "dev", 1.0, rng.uniform(0.15, 0.6, ng)))
    q = rng.uniform(0.25, 1.0, ng)
    qb = np.clip(q + rng.uniform(0.1, 0.4, ng), 0.3, 1.0)
    pa = rng.uniform(0, 180, ng)
    g_ri = rng.uniform(0.25, 0.8, ng)
    g_iz = rng.uniform(0.15, 0.5, ng)
    gals = pd.DataFrame(dict(gal_id=np.arange(ng), ra=gra, dec=gdec, kind=kind,
                             r_mag=gi + g_ri, i_mag=gi, z_mag=gi - g_iz,
                             re_disk=re, re_bulge=np.where(kind == "dev", re, re_bulge),
                             bulge_frac=btf, q_disk=q, q_bulge=np.where(kind == "dev", q, qb), pa=pa))
    return stars, gals


def make_variables(p, stars, gals, rng, mjds):
    """Transients (Bazin) and periodic variable stars; returns meta table."""
    rc = p["central_radius"]
    t_lo, t_hi = mjds.min(), mjds.max()
    rows = []
    nt = p["n_transients"]
    sep_g = angsep_arcsec(gals.ra.values, gals.dec.values, p["ra0"], p["dec0"])
    hosts = gals[(sep_g < rc) & (gals.i_mag < 22.5) & (gals.i_mag > 18.5)]
    n_host = min(int(round(0.6 * nt)), len(hosts))
    host_pick = rng.choice(hosts.index.values, n_host, replace=False)
    for k in range(nt):
        peak_mag_i = rng.uniform(18.3, 24.3)
        t0 = rng.uniform(t_lo - 25, t_hi + 8)
        tau_r = rng.uniform(1.5, 7.0)
        tau_f = rng.uniform(8.0, 45.0)
        col_ri = rng.uniform(-0.25, 0.35)
        col_iz = rng.uniform(-0.15, 0.30)
        if k < n_host:
            g = gals.loc[host_pick[k]]
            # offset along the galaxy's ellipse, within ~1 half-light radius
            rr = g.re_disk * math.sqrt(rng.uniform(0, 1)) * 1.0
            th = rng.uniform(0, 2 * np.pi)
            a_ = rr / math.sqrt(g.q_disk) * math.cos(th)
            b_ = rr * math.sqrt(g.q_disk) * math.sin(th)
            pa = math.radians(g.pa)
            de = a_ * math.sin(pa) + b_ * math.cos(pa)
            dn = a_ * math.cos(pa) - b_ * math.sin(pa)
            ra = g.ra + de / 3600 / math.cos(math.radians(g.dec))
            dec = g.dec + dn / 3600
            host = int(g.gal_id)
            sub = "hosted"
        else:
            r = rc * math.sqrt(rng.uniform(0, 1))
            t = rng.uniform(0, 2 * np.pi)
            ra, dec = tan_deproject(r * math.cos(t) / 3600, r * math.sin(t) / 3600, p["ra0"], p["dec0"])
            ra, dec = float(ra), float(dec)
            host = -1
            sub = "hostless"
        rows.append(dict(id=1 + k, kind="transient", subtype=sub, ra=ra, dec=dec, host_id=host,
                         base_mag_i=peak_mag_i, t0=t0, tau_rise=tau_r, tau_fall=tau_f,
                         col_ri=col_ri, col_iz=col_iz, period=np.nan, amp=np.nan, phase=np.nan,
                         star_id=-1))
    # variable stars
    sep_s = angsep_arcsec(stars.ra.values, stars.dec.values, p["ra0"], p["dec0"])
    cand = stars[(sep_s < rc) & (stars.i_mag > 17.0) & (stars.i_mag < 22.0)]
    pick = rng.choice(cand.index.values, min(p["n_varstars"], len(cand)), replace=False)
    for k, sidx in enumerate(pick):
        s = stars.loc[sidx]
        sub = rng.choice(["rrlyr", "eclipsing", "sinusoid"], p=[0.35, 0.3, 0.35])
        if sub == "rrlyr":
            period, amp = rng.uniform(0.45, 0.8), rng.uniform(0.5, 1.0)
        elif sub == "eclipsing":
            period, amp = rng.uniform(0.8, 5.0), rng.uniform(0.3, 0.9)
        else:
            period, amp = rng.uniform(4.0, 30.0), rng.uniform(0.1, 0.5)
        rows.append(dict(id=1001 + k, kind="varstar", subtype=sub, ra=s.ra, dec=s.dec, host_id=-1,
                         base_mag_i=s.i_mag, t0=rng.uniform(0, period), tau_rise=np.nan, tau_fall=np.nan,
                         col_ri=s.r_mag - s.i_mag, col_iz=s.i_mag - s.z_mag, period=period, amp=amp,
                         phase=rng.uniform(0, 1), star_id=int(s.star_id)))
    return pd.DataFrame(rows)


def _varstar_shape(sub, ph):
    """Magnitude offset (>= 0 means fainter) vs phase in [0, 1), peak-to-peak 1."""
    ph = ph % 1.0
    if sub == "rrlyr":  # fast rise, slow decline: brightest at phase 0
        m = np.where(ph < 0.15, 1 - ph / 0.15, (ph - 0.15) / 0.85)
        return m
    if sub == "eclipsing":  # two eclipses, primary deeper
        w = 0.06
        prim = np.exp(-0.5 * (np.minimum(ph, 1 - ph) / w) ** 2)
        sec = 0.4 * np.exp(-0.5 * ((ph - 0.5) / w) ** 2)
        return prim + sec
    return 0.5 * (1 + np.sin(2 * np.pi * ph))


def variable_flux(row, band, mjd):
    """True flux (nJy) of a variable at mjd (scalar or array) in band."""
    mjd = np.asarray(mjd, float)
    off = {"i": 0.0, "r": row["col_ri"], "z": -row["col_iz"]}[band]
    if row["kind"] == "transient":
        peak = 10 ** (-0.4 * (row["base_mag_i"] + off - NJY_ZP))
        t = mjd - row["t0"]
        f = np.exp(-t / row["tau_fall"]) / (1 + np.exp(-t / row["tau_rise"]))
        # normalise so that the maximum of the curve is `peak`
        tt = np.linspace(-5 * row["tau_rise"], 5 * row["tau_fall"], 4001)
        fmax = np.max(np.exp(-tt / row["tau_fall"]) / (1 + np.exp(-tt / row["tau_rise"])))
        return peak * f / fmax
    base = 10 ** (-0.4 * (row["base_mag_i"] + off - NJY_ZP))  # brightest state
    amp = row["amp"] * BANDS[band]["var_amp"]
    dm = amp * _varstar_shape(row["subtype"], (mjd - 60000.0) / row["period"] + row["phase"])
    return base * 10 ** (-0.4 * dm)


def varstar_mean_mag(row, band):
    t = 60000.0 + np.linspace(0, row["period"], 2001)
    f = variable_flux(row, band, t)
    return NJY_ZP - 2.5 * np.log10(f.mean())


# ----------------------------------------------------------------------------
# header WCS (approximate) written by hand


def _poly_terms(order, min_order):
    return [(p_, q_) for tot in range(min_order, order + 1) for p_ in range(tot, -1, -1) for q_ in [tot - p_]]


def header_wcs(cam, nx, ny, rng, shift_vec, use_sip, use_cd, scale_err, rot_err):
    """Header cards of an approximate WCS for a detector."""
    cx, cy = (nx - 1) / 2.0, (ny - 1) / 2.0
    ra_c, dec_c = cam.pix2sky(cx, cy)
    ra_c, dec_c = float(ra_c), float(dec_c)
    gx, gy = np.meshgrid(np.linspace(0, nx - 1, 25), np.linspace(0, ny - 1, 25))
    gx, gy = gx.ravel(), gy.ravel()
    ra, dec = cam.pix2sky(gx, gy)
    xi, eta = tan_project(ra, dec, ra_c, dec_c)
    du, dv = gx - cx, gy - cy
    order = 3 if use_sip else 1
    terms = _poly_terms(order, 1)
    X = np.stack([du**p_ * dv**q_ for p_, q_ in terms], axis=1)
    cxi, *_ = np.linalg.lstsq(X, xi, rcond=None)
    ceta, *_ = np.linalg.lstsq(X, eta, rcond=None)
    CD = np.array([[cxi[0], cxi[1]], [ceta[0], ceta[1]]])  # terms[0]=(1,0), [1]=(0,1)
    cards = {}
    sip = {}
    if use_sip:
        CDi = np.linalg.inv(CD)
        for k, (p_, q_) in enumerate(terms[2:], start=2):
            sip[("A", p_, q_)] = CDi[0, 0] * cxi[k] + CDi[0, 1] * ceta[k]
            sip[("B", p_, q_)] = CDi[1, 0] * cxi[k] + CDi[1, 1] * ceta[k]
        # inverse: from U, V (= CD^-1 (xi, eta)) back to du, dv
        U = CDi[0, 0] * xi + CDi[0, 1] * eta
        V = CDi[1, 0] * xi + CDi[1, 1] * eta
        iterms = _poly_terms(3, 1)
        Y = np.stack([U**p_ * V**q_ for p_, q_ in iterms], axis=1)
        cap, *_ = np.linalg.lstsq(Y, du - U, rcond=None)
        cbp, *_ = np.linalg.lstsq(Y, dv - V, rcond=None)
        for k, (p_, q_) in enumerate(iterms):
            sip[("AP", p_, q_)] = cap[k]
            sip[("BP", p_, q_)] = cbp[k]
    # perturb: rotation and scale error of the linear part, shift of CRVAL
    t = math.radians(rot_err)
    R = np.array([[math.cos(t), -math.sin(t)], [math.sin(t), math.cos(t)]])
    CDh = (1.0 + scale_err) * R @ CD
    de, dn = shift_vec  # arcsec east, north
    crval1 = (ra_c + de / 3600 / math.cos(math.radians(dec_c))) % 360
    crval2 = dec_c + dn / 3600
    ctype = "-SIP" if use_sip else ""
    cards["WCSAXES"] = 2
    cards["CTYPE1"] = "RA---TAN" + ctype
    cards["CTYPE2"] = "DEC--TAN" + ctype
    cards["CUNIT1"] = "deg"
    cards["CUNIT2"] = "deg"
    cards["CRPIX1"] = cx + 1.0
    cards["CRPIX2"] = cy + 1.0
    cards["CRVAL1"] = crval1
    cards["CRVAL2"] = crval2
    if use_cd:
        cards["CD1_1"], cards["CD1_2"] = CDh[0, 0], CDh[0, 1]
        cards["CD2_1"], cards["CD2_2"] = CDh[1, 0], CDh[1, 1]
    else:
        cdelt = math.sqrt(abs(np.linalg.det(CDh)))
        cards["CDELT1"], cards["CDELT2"] = -cdelt, cdelt
        cards["PC1_1"], cards["PC1_2"] = CDh[0, 0] / -cdelt, CDh[0, 1] / -cdelt
        cards["PC2_1"], cards["PC2_2"] = CDh[1, 0] / cdelt, CDh[1, 1] / cdelt
    cards["RADESYS"] = "ICRS"
    cards["EQUINOX"] = 2000.0
    if use_sip:
        cards["A_ORDER"] = 3
        cards["B_ORDER"] = 3
        cards["AP_ORDER"] = 3
        cards["BP_ORDER"] = 3
        for (nm, p_, q_), val in sip.items():
            cards[f"{nm}_{p_}_{q_}"] = float(val)
    return cards, (ra_c, dec_c)


# ----------------------------------------------------------------------------
# main


def plan_visits(p, rng):
    bands = p["bands"]
    nv = p["n_visits"]
    # nights: sorted random, a band sequence interleaved
    nights = np.sort(rng.choice(np.arange(int(p["span"]) + 1), nv, replace=False))
    if len(bands) > 1:
        nights = np.sort(rng.choice(np.arange(int(p["span"]) + 1), (nv + 1) // 2, replace=False))
        nights = np.repeat(nights, 2)[:nv]
    vis = []
    vid = p["first_visit"]
    for k in range(nv):
        band = bands[k % len(bands)]
        mjd = p["mjd0"] + nights[k] + rng.uniform(0.05, 0.35) + (0.02 * (k % 2))
        vid += int(rng.integers(1, 40))
        vis.append(dict(visit=vid, band=band, mjd=mjd))
    vis = pd.DataFrame(vis)
    n = len(vis)
    vis["exptime"] = np.round(rng.uniform(*p["exptime"], n), 1)
    vis["fwhm_arcsec"] = rng.uniform(*p["seeing"], n)
    vis["airmass"] = np.round(1.0 + rng.exponential(0.18, n).clip(0, 0.9), 3)
    cloud = np.where(rng.uniform(0, 1, n) < 0.3, rng.uniform(0.05, 0.35, n), rng.uniform(0, 0.03, n))
    vis["cloud_mag"] = cloud
    vis["sky_factor"] = rng.uniform(0.8, 2.2, n)  # moon / twilight
    vis["rot_deg"] = rng.uniform(0, 360, n)
    r = p["dither"] * np.sqrt(rng.uniform(0, 1, n))
    t = rng.uniform(0, 2 * np.pi, n)
    bra, bdec = tan_deproject(r * np.cos(t) / 3600, r * np.sin(t) / 3600, p["ra0"], p["dec0"])
    vis["boresight_ra"], vis["boresight_dec"] = bra, bdec
    # header/file styles
    style = rng.permutation(np.arange(n)) % 3
    vis["pixel_type"] = np.array(["float32", "int32", "int16+bzero"])[style]
    vis["layout"] = np.where(rng.uniform(0, 1, n) < 0.35, "extension", "primary")
    vis["wcs_type"] = np.where(rng.uniform(0, 1, n) < 0.4, "TAN-SIP", "TAN")
    vis["wcs_matrix"] = np.where(rng.uniform(0, 1, n) < 0.5, "CD", "PC")
    variants = {"i": ["i", "I", " i", "i  "], "r": ["r", "R", " r", "r "], "z": ["z", "Z ", " z", "z"]}
    off = int(rng.integers(0, 4))
    vis["filter_header"] = [variants[b][(k // len(bands) + off) % 4] for k, b in enumerate(vis.band)]
    # header WCS errors of the visit (pointing), within the contract
    ang = rng.uniform(0, 2 * np.pi, n)
    mag = rng.uniform(0.5, 4.0, n)
    vis["hdr_shift_e"], vis["hdr_shift_n"] = mag * np.cos(ang), mag * np.sin(ang)
    vis["hdr_rot_deg"] = rng.uniform(-0.08, 0.08, n)
    vis["hdr_scale_err"] = rng.uniform(-0.004, 0.004, n)
    return vis


def detector_properties(p):
    """Fixed per detector: gain, read noise, full well, defects."""
    props = {}
    for det in p["detectors"]:
        rng = np.random.default_rng([det, 777])
        nx, ny = p["nx"], p["ny"]
        nhot = 40
        hot = dict(x=rng.integers(0, nx, nhot), y=rng.integers(0, ny, nhot),
                   rate=10 ** rng.uniform(0.5, 2.5, nhot))  # e-/s
        badcol = dict(x=int(rng.integers(100, nx - 100)), y0=int(rng.integers(0, ny // 2)),
                      kind="hot", level=rng.uniform(300, 1500))
        deadcol = dict(x=int(rng.integers(100, nx - 100)), kind="dead", qe=0.05)
        props[det] = dict(gain=float(np.round(rng.uniform(1.7, 4.0), 3)),
                          rdnoise=float(np.round(rng.uniform(4.5, 9.0), 2)),
                          full_well=float(np.round(rng.uniform(110000, 180000), -2)),
                          hot=hot, badcol=badcol, deadcol=deadcol)
    return props


def simulate(outdir, seed=1, preset="small", verbose=True):
    t_start = time.time()
    p = dict(PRESETS[preset])
    ss = np.random.SeedSequence([seed, sum(map(ord, preset))])
    rng_sky, rng_vis, rng_var, rng_img = [np.random.default_rng(s) for s in ss.spawn(4)]
    os.makedirs(os.path.join(outdir, "images"), exist_ok=True)
    os.makedirs(os.path.join(outdir, "truth"), exist_ok=True)

    kolmo = kolmogorov_mog()
    gal_mog = {1: sersic_mog(1.0), 4: sersic_mog(4.0)}
    stars, gals = make_sky(p, rng_sky)
    vis = plan_visits(p, rng_vis)
    mids = vis.mjd.values + vis.exptime.values / 2 / 86400
    var = make_variables(p, stars, gals, rng_var, mids)
    dets = detector_properties(p)
    scale = p["pixel_scale"]
    nx, ny = p["nx"], p["ny"]
    r_fp = max(math.hypot(max(abs(ox), abs(ox + nx)), max(abs(oy), abs(oy + ny)))
               for ox, oy in p["detectors"].values())
    k1 = p["distortion_px"] / r_fp**3
    p1, p2 = 0.3 / r_fp**2 / 3, -0.2 / r_fp**2 / 3

    # variable stars: their static star entry is replaced by the variable model
    var_star_ids = set(var.loc[var.kind == "varstar", "star_id"].astype(int))
    lc_rows = []
    for _, v in vis.iterrows():
        mid = v.mjd + v.exptime / 2 / 86400
        for _, row in var.iterrows():
            lc_rows.append(dict(id=int(row["id"]), visit=int(v.visit), band=v.band, mjd_mid=mid,
                                flux_njy=float(variable_flux(row, v.band, mid))))
    lc = pd.DataFrame(lc_rows)

    truth_rows, visit_rows, art_rows = [], [], []
    for vi, v in vis.iterrows():
        band = v.band
        bp = BANDS[band]
        mid = v.mjd + v.exptime / 2 / 86400
        psf = VisitPSF(kolmo, v.fwhm_arcsec, scale, np.random.default_rng([seed, int(v.visit), 1]), r_fp)
        # zero point: AB mag giving 1 electron in this exposure
        zp_e = bp["zp1s"] + 2.5 * math.log10(v.exptime) - bp["ext"] * v.airmass - v.cloud_mag
        e_per_njy = 10 ** (0.4 * (zp_e - NJY_ZP))
        sky_rate = 10 ** (-0.4 * (bp["sky_mag"] - bp["zp1s"])) * scale**2  # e/s/pix
        sky_e = sky_rate * v.exptime * v.sky_factor * 10 ** (-0.4 * v.cloud_mag * 0.5)
        grng = np.random.default_rng([seed, int(v.visit), 2])
        grad = grng.uniform(-0.03, 0.03, 2)
        for det, (ox, oy) in p["detectors"].items():
            dp = dets[det]
            cam = CameraWCS(v.boresight_ra, v.boresight_dec, v.rot_deg, scale, (ox, oy), k1, p1, p2)
            rng = np.random.default_rng([seed, int(v.visit), int(det), 3])
            img = np.zeros((ny, nx))
            margin = 40
            # --- stars
            sx, sy = cam.sky2pix(stars.ra.values, stars.dec.values)
            on = (sx > -margin) & (sx < nx + margin) & (sy > -margin) & (sy < ny + margin)
            on &= ~stars.star_id.isin(var_star_ids).values
            mags = stars[f"{band}_mag"].values
            for j in np.where(on)[0]:
                flux_e = 10 ** (-0.4 * (mags[j] - zp_e))
                u, vv = cam.focal(sx[j], sy[j])
                comps = psf.covariances(u, vv)
                render(img, sx[j], sy[j], [a * flux_e for a, _ in comps], [c[0] for _, c in comps],
                       flux_tol=max(2e-4 * flux_e, 0.3))
            # --- galaxies
            gx, gy = cam.sky2pix(gals.ra.values, gals.dec.values)
            gon = np.where((gx > -margin) & (gx < nx + margin) & (gy > -margin) & (gy < ny + margin))[0]
            if len(gon):
                J = cam.jacobian(gals.ra.values[gon], gals.dec.values[gon])
            for jj, j in enumerate(gon):
                g = gals.iloc[j]
                flux_e = 10 ** (-0.4 * (g[f"{band}_mag"] - zp_e))
                u, vv = cam.focal(gx[j], gy[j])
                pcomps = psf.covariances(u, vv)
                amps, covs = [], []
                for frac, n_s, re, qg in ((1 - g.bulge_frac, 1, g.re_disk, g.q_disk),
                                         (g.bulge_frac, 4, g.re_bulge, g.q_bulge)):
                    if frac <= 0:
                        continue
                    pa = math.radians(g.pa)
                    maj = np.array([math.sin(pa), math.cos(pa)])
                    mnr = np.array([math.cos(pa), -math.sin(pa)])
                    ga, gs = gal_mog[n_s]
                    for a_g, s_g in zip(ga, gs):
                        s2 = (re * s_g) ** 2
                        Csky = s2 / qg * np.outer(maj, maj) + s2 * qg * np.outer(mnr, mnr)
                        Cpix = J[jj] @ Csky @ J[jj].T
                        for a_p, cp in pcomps:
                            amps.append(flux_e * frac * a_g * a_p)
                            covs.append(Cpix + cp[0])
                render(img, gx[j], gy[j], amps, covs, flux_tol=max(2e-4 * flux_e, 0.3))
            # --- variables
            for _, row in var.iterrows():
                x, y = cam.sky2pix(row.ra, row.dec)
                x, y = float(x), float(y)
                if not (-margin < x < nx + margin and -margin < y < ny + margin):
                    continue
                f_njy = float(variable_flux(row, band, mid))
                flux_e = f_njy * e_per_njy
                u, vv = cam.focal(x, y)
                comps = psf.covariances(u, vv)
                render(img, x, y, [a * flux_e for a, _ in comps], [c[0] for _, c in comps],
                       flux_tol=max(2e-4 * flux_e, 0.3))
                if 0 <= x <= nx - 1 and 0 <= y <= ny - 1:
                    truth_rows.append(dict(visit=int(v.visit), detector=int(det), band=band, id=int(row["id"]),
                                           kind=row.kind, subtype=row.subtype, ra=row.ra, dec=row.dec,
                                           x=x, y=y, flux_njy=f_njy, mjd_mid=mid, host_id=int(row.host_id),
                                           edge_dist=float(min(x, y, nx - 1 - x, ny - 1 - y))))
            # --- sky background with a gentle gradient, over the focal plane
            yy, xx = np.mgrid[0:ny, 0:nx]
            uu, vv = cam.focal(xx, yy)
            sky = sky_e * (1 + grad[0] * uu / r_fp + grad[1] * vv / r_fp)
            # dead column: low QE for both sky and sources
            dc = dp["deadcol"]
            img[:, dc["x"]] *= dc["qe"]
            sky[:, dc["x"]] *= dc["qe"]
            model = img + sky
            # hot pixels and hot column (dark current)
            hot = dp["hot"]
            model[hot["y"], hot["x"]] += hot["rate"] * v.exptime
            bc = dp["badcol"]
            model[bc["y0"]:, bc["x"]] += bc["level"] * v.exptime / 60.0
            elec = rng.poisson(np.clip(model, 0, None)).astype(np.float64)
            # cosmic rays (~1.5 / cm^2 / min on 15 um pixels, plus noise hits)
            area_cm2 = nx * ny * (15e-4) ** 2
            ncr = rng.poisson(1.5 * area_cm2 * v.exptime / 60 * 4)
            for _ in range(ncr):
                if rng.uniform() < 0.35:
                    cxp, cyp = int(rng.integers(0, nx)), int(rng.integers(0, ny))
                    dep = rng.uniform(300, 6000)
                    elec[cyp, cxp] += dep
                    art_rows.append((int(v.visit), det, "cr", cxp, cyp, cxp, cyp))
                else:
                    L = rng.uniform(2, 25)
                    th = rng.uniform(0, np.pi)
                    x0, y0 = rng.uniform(0, nx), rng.uniform(0, ny)
                    dpl = rng.uniform(200, 2500)  # e- per pixel length
                    ts = np.linspace(0, L, int(L * 5) + 2)
                    px = np.floor(x0 + ts * math.cos(th)).astype(int)
                    py = np.floor(y0 + ts * math.sin(th)).astype(int)
                    ok = (px >= 0) & (px < nx) & (py >= 0) & (py < ny)
                    np.add.at(elec, (py[ok], px[ok]), dpl * L / len(ts))
                    for qx, qy in set(zip(px[ok].tolist(), py[ok].tolist())):
                        art_rows.append((int(v.visit), det, "cr", qx, qy, qx, qy))
            # saturation: charge above full well bleeds along columns
            gain = dp["gain"]
            digital_max = 65535.0 if v.pixel_type == "int16+bzero" else 2.0**31 - 1
            clip_e = min(dp["full_well"], digital_max * gain * 0.999)
            for b in bleed(elec, clip_e):
                art_rows.append((int(v.visit), det, "saturated", *b))
            elec += rng.normal(0, dp["rdnoise"], elec.shape)
            adu = np.clip(elec, None, clip_e) / gain
            # defects in the truth table
            for hx, hy in zip(hot["x"], hot["y"]):
                art_rows.append((int(v.visit), det, "hot", int(hx), int(hy), int(hx), int(hy)))
            art_rows.append((int(v.visit), det, "badcol", bc["x"], bc["y0"], bc["x"], ny - 1))
            art_rows.append((int(v.visit), det, "deadcol", dc["x"], 0, dc["x"], ny - 1))
            clip_adu = math.floor(clip_e / gain)
            if v.pixel_type == "float32":
                data = adu.astype(np.float32)
                # no-data pixels: a small blob and scattered single pixels
                bx, by = int(rng.integers(50, nx - 60)), int(rng.integers(50, ny - 60))
                data[by:by + 4, bx:bx + 7] = np.nan
                art_rows.append((int(v.visit), det, "nan", bx, by, bx + 6, by + 3))
                for _ in range(15):
                    qx, qy = int(rng.integers(0, nx)), int(rng.integers(0, ny))
                    data[qy, qx] = np.nan
                    art_rows.append((int(v.visit), det, "nan", qx, qy, qx, qy))
            elif v.pixel_type == "int32":
                data = np.clip(np.round(adu), -(2**31), clip_adu).astype(np.int32)
            else:
                data = np.clip(np.round(adu), 0, min(clip_adu, 65535)).astype(np.uint16)
            saturate_e = float(np.round(clip_adu * gain * 0.97, 0))
            hw, (ra_c, dec_c) = header_wcs(
                cam, nx, ny, rng,
                (v.hdr_shift_e + rng.uniform(-0.4, 0.4), v.hdr_shift_n + rng.uniform(-0.4, 0.4)),
                v.wcs_type == "TAN-SIP", v.wcs_matrix == "CD", v.hdr_scale_err, v.hdr_rot_deg)
            hdr = fits.Header()
            hdr["TELESCOP"] = ("INDEPSIM", "independent test simulator")
            hdr["INSTRUME"] = "MOSAIC2" if len(p["detectors"]) > 1 else "BIGCCD"
            hdr["OBJECT"] = "indep-field"
            hdr["VISIT"] = int(v.visit)
            hdr["DETECTOR"] = int(det)
            hdr["FILTER"] = v.filter_header
            hdr["MJD-OBS"] = (float(v.mjd), "exposure start, TAI days")
            hdr["TIMESYS"] = "TAI"
            hdr["EXPTIME"] = (float(v.exptime), "s")
            hdr["AIRMASS"] = float(v.airmass)
            hdr["BUNIT"] = "ADU"
            hdr["GAIN"] = (gain, "e-/ADU")
            hdr["RDNOISE"] = (dp["rdnoise"], "e-")
            hdr["SATURATE"] = (saturate_e, "e-")
            for kk, val in hw.items():
                hdr[kk] = val
            fname = f"exp{int(v.visit):07d}_ccd{int(det):02d}.fits"
            fpath = os.path.join(outdir, "images", fname)
            if v.layout == "extension":
                ph = fits.PrimaryHDU()
                for kk in ("TELESCOP", "INSTRUME", "OBJECT", "VISIT", "FILTER", "MJD-OBS", "EXPTIME", "AIRMASS"):
                    ph.header[kk] = hdr[kk]
                ih = fits.ImageHDU(data=data, header=hdr, name="SCI")
                fits.HDUList([ph, ih]).writeto(fpath, overwrite=True)
            else:
                fits.PrimaryHDU(data=data, header=hdr).writeto(fpath, overwrite=True)
            visit_rows.append(dict(
                visit=int(v.visit), detector=int(det), band=band, filter_header=v.filter_header,
                mjd=float(v.mjd), mjd_mid=mid, exptime=float(v.exptime), fwhm_arcsec=float(v.fwhm_arcsec),
                zp_e=zp_e, zp_adu=zp_e - 2.5 * math.log10(gain), e_per_njy=e_per_njy,
                gain=gain, rdnoise=dp["rdnoise"], saturate_e=saturate_e, clip_e=clip_e,
                sky_e=float(np.median(sky)), airmass=float(v.airmass), cloud_mag=float(v.cloud_mag),
                pixel_type=v.pixel_type, layout=v.layout, wcs_type=v.wcs_type, wcs_matrix=v.wcs_matrix,
                boresight_ra=float(v.boresight_ra), boresight_dec=float(v.boresight_dec),
                rot_deg=float(v.rot_deg), center_ra=ra_c, center_dec=dec_c,
                hdr_shift_e=float(v.hdr_shift_e), hdr_shift_n=float(v.hdr_shift_n),
                hdr_rot_deg=float(v.hdr_rot_deg), hdr_scale_err=float(v.hdr_scale_err),
                psf_c_fwhm=psf.c_fwhm, psf_e1=psf.e0[0], psf_e2=psf.e0[1], psf_c_ell=psf.c_ell,
                k1=k1, p1=p1, p2=p2, det_ox=ox, det_oy=oy, nx=nx, ny=ny, pixel_scale=scale,
                file=os.path.join("images", fname)))
            if verbose:
                print(f"  visit {int(v.visit)} det {det} band {band} fwhm {v.fwhm_arcsec:.2f}\" "
                      f"exptime {v.exptime:.0f}s dtype {v.pixel_type} {v.layout} {v.wcs_type} "
                      f"[{time.time() - t_start:.1f}s]", flush=True)

    truth = pd.DataFrame(truth_rows)
    arts = pd.DataFrame(art_rows, columns=["visit", "detector", "kind", "x0", "y0", "x1", "y1"])
    # flag variables sitting on/near a defect in that image
    near = []
    for _, t in truth.iterrows():
        a = arts[(arts.visit == t.visit) & (arts.detector == t.detector) & (arts.kind != "cr")]
        dx = np.maximum(np.maximum(a.x0 - t.x, t.x - a.x1), 0)
        dy = np.maximum(np.maximum(a.y0 - t.y, t.y - a.y1), 0)
        near.append(bool(np.any(np.hypot(dx, dy) < NEAR_DEFECT_PX)))
    truth["near_defect"] = near if len(truth) else []
    td = os.path.join(outdir, "truth")
    truth.to_csv(os.path.join(td, "variables.csv"), index=False)
    lc.to_csv(os.path.join(td, "variable_lightcurves.csv"), index=False)
    var.to_csv(os.path.join(td, "variables_meta.csv"), index=False)
    pd.DataFrame(visit_rows).to_csv(os.path.join(td, "visits.csv"), index=False)
    arts.to_csv(os.path.join(td, "artifacts.csv"), index=False)
    gals.to_csv(os.path.join(td, "galaxies.csv"), index=False)
    st = stars.copy()
    st["is_variable"] = st.star_id.isin(var_star_ids)
    for b in ("r", "i", "z"):  # variable stars: mean magnitude
        for _, row in var[var.kind == "varstar"].iterrows():
            st.loc[st.star_id == row.star_id, f"{b}_mag"] = varstar_mean_mag(row, b)
    st.to_csv(os.path.join(td, "stars.csv"), index=False)

    # reference catalogue: stars only, noisy, complete to 1.5 mag above the
    # faintest star, 3 % missing at random
    rrng = np.random.default_rng([seed, 99])
    ref = st[(st.i_mag < 24.0) & (rrng.uniform(0, 1, len(st)) > 0.03)].copy()
    out = pd.DataFrame(dict(ra=ref.ra.values, dec=ref.dec.values))
    for b in p["bands"]:
        m = ref[f"{b}_mag"].values
        err = np.sqrt(0.004**2 + (0.02 * 10 ** (0.4 * (m - 21.0))) ** 2)
        out[f"{b}_mag"] = np.round(m + rrng.normal(0, err), 4)
        out[f"{b}_magErr"] = np.round(err, 4)
    out.to_csv(os.path.join(outdir, "refcat.csv"), index=False, float_format="%.8f")
    meta = dict(preset=preset, seed=seed, params={k: (v if not isinstance(v, dict) else {str(a): b for a, b in v.items()})
                                                   for k, v in p.items()},
                kolmogorov_mog=dict(amp=kolmo[0].tolist(), sigma_lambda_over_r0=kolmo[1].tolist()),
                n_stars=len(stars), n_galaxies=len(gals), n_refcat=len(out))
    with open(os.path.join(td, "meta.json"), "w") as fh:
        json.dump(meta, fh, indent=1, default=float)
    if verbose:
        print(f"wrote {len(visit_rows)} images, {len(stars)} stars, {len(gals)} galaxies, "
              f"{len(var)} variables, refcat {len(out)} rows in {time.time() - t_start:.1f}s")


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--outdir", required=True)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--preset", default="small", choices=sorted(PRESETS))
    ap.add_argument("--quiet", action="store_true")
    a = ap.parse_args()
    simulate(a.outdir, a.seed, a.preset, verbose=not a.quiet)


if __name__ == "__main__":
    main()
