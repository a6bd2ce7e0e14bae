"""Tests of diffim.artifacts: cosmic-ray residue told from point sources in the science image.

Synthetic science images with an undersampled Moffat PSF (FWHM 1.6 px, the
0.7"/px case where the calexp stage's pixel test misses most tracks), point
transients at S/N 6-60 and cosmic-ray tracks of 1-6 pixels at 7-12 sigma per
pixel, all at known positions.
"""

import numpy as np
import pandas as pd
import pytest

from diffim.artifacts import unresolved_artifacts
from diffim.exposure import Exposure
from diffim.psf import PsfModel, moffat_kernel

N, SIGMA, FWHM, K = 512, 10.0, 1.6, 15


def _psf_model():
    k = moffat_kernel(FWHM, K, beta=3.0)
    return PsfModel(coeffs=(k / k.sum())[None], order=0, width=N, height=N)


def _scene(seed):
    rng = np.random.default_rng(seed)
    img = np.zeros((N, N))
    grid = [(x, y) for x in range(24, N - 24, 32) for y in range(24, N - 24, 32)]
    rng.shuffle(grid)
    rows = []
    for i, (x, y) in enumerate(grid):
        x, y = x + rng.uniform(-0.5, 0.5), y + rng.uniform(-0.5, 0.5)
        if i % 2 == 0:  # a point source (peak S/N 6-60 in the matched filter)
            snr = np.exp(rng.uniform(np.log(6), np.log(60)))
            k = moffat_kernel(FWHM, K, beta=3.0, e1=0.05, dx=x - round(x), dy=y - round(y))
            k /= k.sum()
            flux = snr * SIGMA / np.sqrt((k**2).sum())
            ix, iy = int(round(x)), int(round(y))
            img[iy - K // 2:iy + K // 2 + 1, ix - K // 2:ix + K // 2 + 1] += flux * k
            rows.append((x, y, "point", snr))
        else:  # a cosmic-ray track of 1-6 pixels
            n = int(rng.integers(1, 7))
            ang = rng.uniform(0, np.pi)
            t = np.arange(n) - (n - 1) / 2
            xs = np.rint(x + t * np.cos(ang)).astype(int)
            ys = np.rint(y + t * np.sin(ang)).astype(int)
            img[ys, xs] += rng.uniform(7, 12, n) * SIGMA
            rows.append((float(xs.mean()), float(ys.mean()), "cr", n))
    img += rng.normal(0, SIGMA, img.shape)
    sci = Exposure(image=img, variance=np.full(img.shape, SIGMA**2), mask=np.zeros(img.shape, np.int32),
                   psf=_psf_model())
    src = pd.DataFrame(rows, columns=["x", "y", "kind", "size"])
    src["isNegative"] = False
    src["isDipole"] = False
    return sci, src


@pytest.fixture(scope="module")
def judged():
    sci, src = _scene(1)
    tmpl = np.random.default_rng(2).normal(0, SIGMA, sci.shape)
    flags = unresolved_artifacts(src, sci, tmpl, np.full(sci.shape, SIGMA**2))
    return src.assign(flag=flags)


def test_point_sources_are_kept(judged):
    points = judged[judged.kind == "point"]
    assert len(points) > 60
    # requirement: no point source rejected, from S/N 6 to 60
    assert not points.flag.any()


def test_cosmic_ray_tracks_are_rejected(judged):
    crs = judged[judged.kind == "cr"]
    assert len(crs) > 60
    # requirement: >= 80 % of the 1-6 pixel hits (7-12 sigma per pixel) rejected
    assert crs.flag.mean() >= 0.8


def test_sources_on_template_signal_and_negatives_are_not_judged():
    sci, src = _scene(3)
    crs = src[src.kind == "cr"].reset_index(drop=True)
    # the same hits, but each on a static source of the template (a variable star)
    tmpl = np.zeros(sci.shape)
    for x, y in zip(crs.x, crs.y):
        tmpl[int(round(y)), int(round(x))] += 50 * SIGMA
    flags = unresolved_artifacts(crs, sci, tmpl, np.full(sci.shape, SIGMA**2))
    assert not flags.any()
    flags = unresolved_artifacts(crs.assign(isNegative=True), sci, np.zeros(sci.shape),
                                 np.full(sci.shape, SIGMA**2))
    assert not flags.any()
    assert len(unresolved_artifacts(crs.iloc[:0], sci, tmpl, tmpl)) == 0
