"""Tests of diffim.psfshape: size and shear fields of a PSF model from few stars."""

import numpy as np
import pytest

from diffim.psf import gaussian_kernel, moffat_kernel, moments_fwhm, poly_terms
from diffim.psffit import fit_psf
from diffim.psfshape import deformation_images, fit_field, fit_field_cv

K = 31


def _gauss(sigma, size=K):
    y, x = np.mgrid[:size, :size] - size // 2
    return np.exp(-0.5 * (x * x + y * y) / sigma**2) / (2 * np.pi * sigma**2), x, y


def test_deformation_images_are_the_analytic_derivatives_of_a_gaussian():
    # d/d(eps) of a Gaussian of sigma s (1 + eps), and of its shears, at eps = 0:
    # size: (r^2 / s^2 - 2) G; e1: (x^2 - y^2) / s^2 G; e2: 2 x y / s^2 G
    s = 2.5
    g, x, y = _gauss(s)
    d = deformation_images(g)
    expect = [(x * x + y * y) / s**2 - 2.0, (x * x - y * y) / s**2, 2.0 * x * y / s**2]
    for got, e in zip(d, expect):
        assert np.abs(got - e * g).max() < 2e-3 * g.max()
    # against a finite deformation, a 1 % larger PSF: the first-order term takes
    # up all but the second-order part (~eps^2 = 1e-4 of the peak)
    g2, _, _ = _gauss(s * 1.01)
    assert np.abs(g - g2).max() > 0.015 * g.max()
    assert np.abs(g + 0.01 * d[0] - g2).max() < 5e-4 * g.max()


def test_field_fit_recovers_a_quadratic_and_cross_validation_picks_its_order():
    rng = np.random.default_rng(4)
    u, v = rng.uniform(-1, 1, (2, 30))
    truth = 0.02 + 0.03 * u * u + 0.02 * v * v - 0.01 * u
    sig = np.full(u.size, 0.004)
    values = truth + rng.normal(0, sig)
    coef, order = fit_field_cv(values, sig**2, u, v, 2)
    assert order == 2
    # prediction at two corners, the extrapolation that matters
    pred = coef @ poly_terms(np.array([-1.0, 1.0]), np.array([1.0, -1.0]), 2)
    assert pred == pytest.approx([0.02 + 0.05 + 0.01, 0.02 + 0.05 - 0.01], abs=0.012)
    # pure noise around a constant: over 200 draws, cross-validation keeps the
    # constant field most of the time, and the field it picks predicts the
    # corners within 2 sigma of one star's noise (a free quadratic through
    # 30 points misses them by ~3 sigma: its corner terms are extrapolated)
    orders, worst = [], []
    corners = poly_terms(np.array([-1.0, 1.0, -1.0, 1.0]), np.array([-1.0, -1.0, 1.0, 1.0]), 2)
    for _ in range(200):
        flat = 0.01 + rng.normal(0, sig)
        coef, order = fit_field_cv(flat, sig**2, u, v, 2)
        orders.append(order)
        worst.append(np.abs(coef @ corners - 0.01).max())
    assert np.mean(np.array(orders) == 0) > 0.6
    assert np.median(worst) < 2 * sig[0]


def test_too_few_usable_stars_give_no_deformation():
    u, v = np.array([0.1, -0.5]), np.array([0.3, 0.2])
    coef, order = fit_field_cv(np.array([0.05, 0.02]), np.array([1e-4, 1e-4]), u, v, 2)
    assert order == 0 and coef.shape == (6,) and not coef.any()
    # unusable measurements (no weight) do not count as stars
    u, v = np.linspace(-1, 1, 6), np.linspace(1, -1, 6)
    values = np.r_[0.01, 0.02, np.full(4, np.nan)]
    coef, order = fit_field_cv(values, np.full(6, 1e-4), u, v, 1)
    assert order == 0 and not coef.any()


def test_scatter_beyond_the_noise_is_estimated():
    # stars that scatter by 0.02 with quoted errors of 0.002: the fit's tau^2
    # keeps one wild star from owning the field
    rng = np.random.default_rng(7)
    u, v = rng.uniform(-1, 1, (2, 40))
    values = rng.normal(0.0, 0.02, u.size)
    values[0] = 0.5
    coef, _ = fit_field(values, np.full(u.size, 0.002**2), u, v, 1)
    assert np.abs(coef).max() < 0.03


def _few_star_image(seed, n_stars=16, n=1024, sky=300.0):
    """Stars whose FWHM grows quadratically towards the corners (+12 %) and
    whose ellipticity follows a tangential pattern, like seeing plus optics."""
    rng = np.random.default_rng(seed)
    img = np.zeros((n, n))
    size, h = 61, 30

    def params(x, y):
        u, v = 2 * x / (n - 1) - 1, 2 * y / (n - 1) - 1
        rho2 = 0.5 * (u * u + v * v)
        ang = np.arctan2(v, u)
        return 4.0 * (1 + 0.12 * rho2), -0.05 * rho2 * np.cos(2 * ang), -0.05 * rho2 * np.sin(2 * ang)

    xs, ys = rng.uniform(h + 2, n - 3 - h, (2, n_stars))
    flux = 10 ** rng.uniform(4.5, 5.5, n_stars)
    for x, y, f in zip(xs, ys, flux):
        ix, iy = int(round(x)), int(round(y))
        fw, e1, e2 = params(x, y)
        img[iy - h:iy + h + 1, ix - h:ix + h + 1] += f * moffat_kernel(
            fw, size, beta=3.0, e1=e1, e2=e2, dx=x - ix, dy=y - iy)
    data = rng.poisson(img + sky) - sky + rng.normal(0, 5.0, img.shape)
    import pandas as pd
    stars = pd.DataFrame({"x": xs, "y": ys})
    return data.astype(np.float32), (img + sky + 25.0).astype(np.float32), stars, params


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_few_stars_follow_a_curved_psf_pattern(seed):
    # 16 stars: the pixelized model could only be linear (order 1) and was ~1 %
    # too broad at the centre and too narrow at the edges; the size field is
    # quadratic when the stars say so.  Requirement: FWHM within 1.5 % of the
    # truth at the centre and at 100 px from the corners, and the profile within
    # 3 % of the peak.
    data, var, stars, params = _few_star_image(seed)
    res = fit_psf(data, var, None, stars, kernel_size=K, order=2)
    assert res.n_stars >= 14
    n = data.shape[0]
    for x, y in [(n / 2, n / 2), (100, 100), (n - 100, 100), (100, n - 100), (n - 100, n - 100)]:
        fw, e1, e2 = params(x, y)
        t = moffat_kernel(fw, K, beta=3.0, e1=e1, e2=e2)
        m = res.psf.at(x, y)
        assert moments_fwhm(m) == pytest.approx(moments_fwhm(t), rel=0.015), (x, y)
        assert np.abs(m - t).max() < 0.03 * t.max(), (x, y)


def test_a_constant_psf_stays_constant():
    # no spatial variation and few stars: the model must not invent one
    rng = np.random.default_rng(11)
    n, size, h = 1024, 61, 30
    img = np.zeros((n, n))
    xs, ys = rng.uniform(h + 2, n - 3 - h, (2, 15))
    for x, y in zip(xs, ys):
        ix, iy = int(round(x)), int(round(y))
        img[iy - h:iy + h + 1, ix - h:ix + h + 1] += 3e4 * gaussian_kernel(
            4.0, size, dx=x - ix, dy=y - iy)
    data = (rng.poisson(img + 300.0) - 300.0).astype(np.float32)
    import pandas as pd
    res = fit_psf(data, (img + 300.0).astype(np.float32), None,
                  pd.DataFrame({"x": xs, "y": ys}), kernel_size=K, order=2)
    fw = [moments_fwhm(res.psf.at(x, y)) for x in (0, n - 1) for y in (0, n - 1)]
    assert np.ptp(fw) < 0.02 * 4.0
