"""Tests of diffim.subtract on synthetic science/template pairs with injected truth.

The pair generator (``make_pair``) is also used by ``test_detect.py``.
Scene: Moffat (beta 3), elliptical, spatially varying science PSF (measured
model = order-1 polynomial fit, i.e. not exact); circular Gaussian template
PSF; template calibrated 4 % differently (kernel sum 1 / 0.96); linear sky
gradient left in the science image; several hundred static stars up to S/N
~3000 with Poisson noise in the variance; transients on a jittered grid.
"""

from __future__ import annotations

import numpy as np
import pytest

from diffim import masks
from diffim.errors import InsufficientKernelSourcesError
from diffim.exposure import Exposure
from diffim.psf import PsfModel, gaussian_kernel, moffat_kernel, poly_terms
from diffim import subtract as sub

K = 41                    # the project's default psf.kernel_size
SKY_VAR = 1000.0          # science sky + read variance per pixel, nJy^2 (1 nJy = 1 e-)
TMPL_SCALE = 0.96         # template flux / science flux of the same source
RENDER = 61               # stars are drawn in a box > K: real PSF wings extend beyond the model


def _sci_fwhm(x, y, n, fwhm0, dfwhm):
    u = 2 * x / (n - 1) - 1
    v = 2 * y / (n - 1) - 1
    return fwhm0 + dfwhm * (0.7 * u + 0.3 * v)


def moffat_psf_model(n, fwhm0, dfwhm, beta=3.0, e1=0.06, e2=0.04):
    """Order-1 PsfModel fitted to the true Moffat PSFs on a 3x3 grid ("measured" PSF)."""
    xs = np.linspace(0, n - 1, 3)
    pts = [(x, y) for x in xs for y in xs]
    stack = np.array([moffat_kernel(_sci_fwhm(x, y, n, fwhm0, dfwhm), K, beta=beta, e1=e1, e2=e2)
                      for x, y in pts])
    u = np.array([2 * x / (n - 1) - 1 for x, _ in pts])
    v = np.array([2 * y / (n - 1) - 1 for _, y in pts])
    coef, *_ = np.linalg.lstsq(poly_terms(u, v, 1).T, stack.reshape(9, -1), rcond=None)
    return PsfModel(coeffs=coef.reshape(3, K, K), order=1, width=n, height=n)


def _add(img, kern, x, y, flux):
    ix, iy = int(np.round(x)), int(np.round(y))
    h = kern.shape[0] // 2
    ny, nx = img.shape
    y0, y1, x0, x1 = iy - h, iy + h + 1, ix - h, ix + h + 1
    ky0, kx0 = max(0, -y0), max(0, -x0)
    ky1 = kern.shape[0] - max(0, y1 - ny)
    kx1 = kern.shape[1] - max(0, x1 - nx)
    img[max(y0, 0):min(y1, ny), max(x0, 0):min(x1, nx)] += flux * kern[ky0:ky1, kx0:kx1]


def make_pair(*, n=1024, seed=1, sci_fwhm=4.0, dfwhm=0.4, tmpl_fwhm=3.0, beta=3.0,
              n_static=700, n_coadd=10, transients=True, spacing=64, sky_gradient=True,
              sci_e=(0.06, 0.04), noise=1.0):
    """Synthetic (science, template, truth) with known transients.

    Returns the two Exposures and a dict with arrays ``x, y, flux`` (science
    nJy, negative = faded) of the transients and ``static`` (x, y, flux).
    """
    rng = np.random.default_rng(seed)
    tmpl_var = SKY_VAR / n_coadd
    sci_model = np.zeros((n, n))
    tmpl_model = np.zeros((n, n))
    # transients on a jittered grid, 75 % brightening and 25 % fading
    tx, ty, tf = [], [], []
    if transients:
        g = np.arange(spacing // 2 + 16, n - 16 - spacing // 2 + 1, spacing, dtype=float)
        gx, gy = np.meshgrid(g, g)
        tx = gx.ravel() + rng.uniform(-8, 8, gx.size)
        ty = gy.ravel() + rng.uniform(-8, 8, gx.size)
        snr = np.where(rng.random(tx.size) < 0.4, rng.uniform(4, 8, tx.size),
                       np.exp(rng.uniform(np.log(8), np.log(150), tx.size)))
        neff = 1.0 / (moffat_kernel(sci_fwhm, K, beta=beta) ** 2).sum()
        tf = snr * np.sqrt(SKY_VAR * neff) * np.where(rng.random(tx.size) < 0.25, -1, 1)
    tx, ty, tf = np.asarray(tx), np.asarray(ty), np.asarray(tf)
    # static stars, none within 12 px of a transient
    sx = rng.uniform(5, n - 5, 3 * n_static)
    sy = rng.uniform(5, n - 5, 3 * n_static)
    if tx.size:
        d2 = ((sx[:, None] - tx[None]) ** 2 + (sy[:, None] - ty[None]) ** 2).min(axis=1)
        keep = d2 > 12**2
        sx, sy = sx[keep], sy[keep]
    sx, sy = sx[:n_static], sy[:n_static]
    sf = np.exp(rng.uniform(np.log(1.0e3), np.log(7.0e5), sx.size))
    e1, e2 = sci_e
    for x, y, f in zip(np.concatenate([sx, tx]), np.concatenate([sy, ty]),
                       np.concatenate([sf, tf])):
        dx, dy = x - np.round(x), y - np.round(y)
        fw = _sci_fwhm(x, y, n, sci_fwhm, dfwhm)
        ks = moffat_kernel(fw, RENDER, beta=beta, e1=e1, e2=e2, dx=dx, dy=dy, oversample=3)
        kt = gaussian_kernel(tmpl_fwhm, K, dx=dx, dy=dy)
        if f > 0:
            _add(sci_model, ks, x, y, f)
            is_static = not np.any((tx == x) & (ty == y))
            if is_static:
                _add(tmpl_model, kt, x, y, f * TMPL_SCALE)
        else:  # faded: only in the template
            _add(tmpl_model, kt, x, y, -f * TMPL_SCALE)
    uu, vv = np.meshgrid(np.linspace(-1, 1, n), np.linspace(-1, 1, n))
    bg = (3.0 + 8.0 * uu - 5.0 * vv) if sky_gradient else 0.0
    sci_var = SKY_VAR + sci_model
    tmpl_var_img = tmpl_var + tmpl_model / n_coadd
    sci_img = sci_model + bg + noise * rng.normal(size=(n, n)) * np.sqrt(sci_var)
    tmpl_img = tmpl_model + noise * rng.normal(size=(n, n)) * np.sqrt(tmpl_var_img)
    m0 = np.zeros((n, n), np.int32)
    sci = Exposure(sci_img, sci_var, m0.copy(), psf=moffat_psf_model(n, sci_fwhm, dfwhm, beta, e1, e2))
    tmpl = Exposure(tmpl_img, tmpl_var_img, m0.copy(),
                    psf=PsfModel.gaussian(tmpl_fwhm, K, n, n))
    truth = {"x": tx, "y": ty, "flux": tf, "static": (sx, sy, sf)}
    return sci, tmpl, truth


def source_free(n, truth, radius=14):
    """Boolean image: pixels farther than ``radius`` from every star and transient."""
    sx, sy, _ = truth["static"]
    xs = np.concatenate([sx, truth["x"]])
    ys = np.concatenate([sy, truth["y"]])
    far = np.ones((n, n), bool)
    for x, y in zip(xs, ys):
        x0, x1 = int(max(x - radius, 0)), int(min(x + radius + 1, n))
        y0, y1 = int(max(y - radius, 0)), int(min(y + radius + 1, n))
        far[y0:y1, x0:x1] = False
    return far


@pytest.fixture(scope="module")
def normal_pair():
    return make_pair(seed=3)


@pytest.fixture(scope="module")
def normal_result(normal_pair):
    sci, tmpl, _ = normal_pair
    return sub.subtract_images(sci, tmpl)
