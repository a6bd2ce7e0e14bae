"""Tests of diffim.skymap: tract/patch geometry, overlaps, JSON round trip."""

import numpy as np
import pytest
from astropy.wcs.utils import proj_plane_pixel_scales

from diffim.errors import ConfigError, NoOverlapError
from diffim.skymap import SkyMap, make_skymap, parse_patch_name

SCALE = 0.2  # arcsec / px


def _square_footprint(ra, dec, half_deg, n_side=3):
    """Vertices (corners + edge midpoints) of a square of half-side ``half_deg``."""
    t = np.linspace(-1, 1, n_side)
    xs = np.concatenate([t, np.ones_like(t), t[::-1], -np.ones_like(t)]) * half_deg
    ys = np.concatenate([-np.ones_like(t), t, np.ones_like(t), t[::-1]]) * half_deg
    dec_v = dec + ys
    ra_v = (ra + xs / np.cos(np.radians(dec_v))) % 360.0
    return ra_v, dec_v


def _dithered_footprints(ra, dec, n=5, half_deg=0.05, seed=3):
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        dra, ddec = rng.uniform(-0.03, 0.03, 2)
        out.append(_square_footprint(ra + dra / np.cos(np.radians(dec)), dec + ddec, half_deg))
    return out


@pytest.fixture(scope="module")
def skymap():
    return make_skymap(_dithered_footprints(150.0, 2.0), pixel_scale_arcsec=SCALE,
                       patch_inner=400, patch_border=50, margin_arcsec=10.0)


def test_json_round_trip(skymap):
    text = skymap.to_json()
    again = SkyMap.from_json(text)
    assert again == skymap
    # the rebuilt WCS maps pixels identically (1e-9 px: only float rounding)
    x = np.array([0.0, 1234.5, -10.0])
    y = np.array([0.0, 77.0, 3000.0])
    r1, d1 = skymap.wcs.pixel_to_world_values(x, y)
    x2, y2 = again.wcs.world_to_pixel_values(r1, d1)
    np.testing.assert_allclose(x2, x, atol=1e-9)
    np.testing.assert_allclose(y2, y, atol=1e-9)
    assert '"patch_inner": 400' in text  # human readable, one field per key


def test_from_json_rejects_other_documents():
    with pytest.raises(ValueError, match="not a diffim sky map"):
        SkyMap.from_json('{"format": "other"}')
    with pytest.raises(ValueError, match="not valid JSON"):
        SkyMap.from_json("{")


def test_tract_wcs_orientation_and_scale(skymap):
    w = skymap.wcs
    # 1e-9 arcsec: the CD matrix is exact by construction
    np.testing.assert_allclose(proj_plane_pixel_scales(w) * 3600, [SCALE, SCALE], rtol=1e-9)
    cy, cx = (np.array(skymap.tract_shape) - 1) / 2
    ra_c, dec_c = w.pixel_to_world_values(cx, cy)
    assert abs(ra_c - skymap.ra) < 1e-10 and abs(dec_c - skymap.dec) < 1e-10
    ra_e, _ = w.pixel_to_world_values(cx - 100, cy)   # left is east: larger RA
    _, dec_n = w.pixel_to_world_values(cx, cy + 100)  # up is north
    assert ra_e > skymap.ra and dec_n > skymap.dec


def test_patch_geometry(skymap):
    names = skymap.patch_names()
    assert len(names) == skymap.n_patches_x * skymap.n_patches_y
    assert names[0] == "0x0" and parse_patch_name(names[-1]) == (skymap.n_patches_x - 1,
                                                                 skymap.n_patches_y - 1)
    outer, inner = skymap.patch_bbox("0x0")
    assert (inner.x0, inner.y0) == (0, 0)  # patch 0,0 inner region starts at pixel 0
    assert (outer.x0, outer.y0) == (-50, -50)
    assert skymap.patch_shape("1x0") == (500, 500)
    sy, sx = skymap.patch_inner_slices("1x0")
    assert (sy, sx) == (slice(50, 450), slice(50, 450))
    with pytest.raises(ValueError, match="outside this sky map"):
        skymap.patch_bbox(f"{skymap.n_patches_x}x0")
    with pytest.raises(ValueError, match="not of the form"):
        skymap.patch_bbox("patch-3")


def test_patch_wcs_tiles_the_tract(skymap):
    """The same sky position lands at tract pixel = patch pixel + patch origin."""
    rng = np.random.default_rng(0)
    ny, nx = skymap.tract_shape
    xt = rng.uniform(-40, nx + 40, 50)
    yt = rng.uniform(-40, ny + 40, 50)
    ra, dec = skymap.wcs.pixel_to_world_values(xt, yt)
    for name in skymap.patch_names():
        outer, _ = skymap.patch_bbox(name)
        xp, yp = skymap.patch_wcs(name).world_to_pixel_values(ra, dec)
        # 1e-7 px: round-off of the TAN inversion only; any CRPIX slip would be >= 1 px
        np.testing.assert_allclose(xp + outer.x0, xt, atol=1e-7)
        np.testing.assert_allclose(yp + outer.y0, yt, atol=1e-7)


def test_every_footprint_vertex_is_in_an_inner_region(skymap):
    footprints = _dithered_footprints(150.0, 2.0)
    for ra, dec in footprints:
        x, y = skymap.sky_to_tract_pixels(ra, dec)
        inside = np.zeros(x.size, bool)
        for name in skymap.patch_names():
            inside |= skymap.patch_bbox(name)[1].contains(x, y)
        assert inside.all()
        # and the footprint overlaps at least one patch
        assert skymap.patches_overlapping(ra, dec)


def test_margin_is_kept_around_the_data(skymap):
    footprints = _dithered_footprints(150.0, 2.0)
    x, y = skymap.sky_to_tract_pixels(np.concatenate([f[0] for f in footprints]),
                                      np.concatenate([f[1] for f in footprints]))
    ny, nx = skymap.tract_shape
    margin_px = 10.0 / SCALE
    assert x.min() - margin_px >= -0.5 and x.max() + margin_px <= nx - 0.5
    assert y.min() - margin_px >= -0.5 and y.max() + margin_px <= ny - 0.5
    # and not absurdly big: fewer than one extra patch on each axis
    assert nx - (x.max() - x.min() + 2 * margin_px) < skymap.patch_inner + 1


def test_footprint_at_a_patch_corner_overlaps_four_patches():
    sm = SkyMap(ra=10.0, dec=-30.0, pixel_scale=SCALE, patch_inner=300, patch_border=20,
                n_patches_x=3, n_patches_y=3)
    # a small square (20 px) centred on the corner shared by patches 0,0 1,0 0,1 1,1
    ra, dec = sm.wcs.pixel_to_world_values(np.array([290, 310, 310, 290]) - 0.5,
                                           np.array([290, 290, 310, 310]) - 0.5)
    assert sorted(sm.patches_overlapping(ra, dec, margin_arcsec=0)) == ["0x0", "0x1", "1x0",
                                                                        "1x1"]
    # a footprint well inside patch 1,1's inner region touches only it...
    ra, dec = sm.wcs.pixel_to_world_values(np.array([430, 470, 470, 430]),
                                           np.array([430, 430, 470, 470]))
    assert sm.patches_overlapping(ra, dec, margin_arcsec=0) == ["1x1"]
    # ...until the margin (150 px = 30 arcsec) reaches all neighbours' borders (130 px away)
    assert sm.patches_overlapping(ra, dec, margin_arcsec=20.0) == ["1x1"]
    near = sm.patches_overlapping(ra, dec, margin_arcsec=30.0)
    assert len(near) == 9
    # a footprint off the tract overlaps nothing
    ra, dec = sm.wcs.pixel_to_world_values(np.array([2000, 2100, 2100]),
                                           np.array([2000, 2000, 2100]))
    assert sm.patches_overlapping(ra, dec) == []


def test_triangle_footprint_misses_the_far_corner_patch():
    """Convex-hull test, not bounding box: a triangle whose box covers patch 1,1 misses it."""
    sm = SkyMap(ra=10.0, dec=0.0, pixel_scale=SCALE, patch_inner=100, patch_border=0,
                n_patches_x=2, n_patches_y=2)
    # hypotenuse x + y = 190 stays below patch 1,1 (x + y >= 199 there)
    ra, dec = sm.wcs.pixel_to_world_values(np.array([10, 180, 10]), np.array([10, 10, 180]))
    assert sorted(sm.patches_overlapping(ra, dec, margin_arcsec=0)) == ["0x0", "0x1", "1x0"]
    # a margin of 2 arcsec (10 px) closes the 9 px gap / sqrt(2)
    assert len(sm.patches_overlapping(ra, dec, margin_arcsec=2.0)) == 4


def test_ra_wrap():
    """Data straddling RA = 0: the tract is centred near 0, not near 180."""
    fps = [_square_footprint(359.95, 5.0, 0.04), _square_footprint(0.05, 5.0, 0.04)]
    sm = make_skymap(fps, pixel_scale_arcsec=0.5, patch_inner=500, patch_border=10,
                     margin_arcsec=5.0)
    dra = (sm.ra + 180.0) % 360.0 - 180.0
    assert abs(dra) < 1e-3 and abs(sm.dec - 5.0) < 1e-3
    # width 0.1 cos(5 deg) + 2 * 0.04 = 0.18 deg = 1295 px (+20 margin): 3 patches;
    # height 0.08 deg = 576 px (+20): 2 patches
    assert sm.n_patches_x == 3 and sm.n_patches_y == 2
    for ra, dec in fps:
        x, y = sm.sky_to_tract_pixels(ra, dec)
        ny, nx = sm.tract_shape
        assert np.all((x > -0.5) & (x < nx - 0.5) & (y > -0.5) & (y < ny - 0.5))
    # east is left: footprint 1 (RA 0.05) spans tract x ~ 102..678, footprint 0
    # (RA 359.95) x ~ 821..1397; both y ~ 211..787
    assert sm.patches_overlapping(*fps[1]) == ["0x0", "1x0", "0x1", "1x1"]
    assert sm.patches_overlapping(*fps[0]) == ["1x0", "2x0", "1x1", "2x1"]


def test_bad_inputs():
    with pytest.raises(ConfigError, match="no footprints"):
        make_skymap([], pixel_scale_arcsec=0.2, patch_inner=100, patch_border=10,
                    margin_arcsec=0)
    with pytest.raises(ConfigError, match="spread"):
        make_skymap([_square_footprint(0, 0, 0.1), _square_footprint(120, 0, 0.1)],
                    pixel_scale_arcsec=0.2, patch_inner=100, patch_border=10, margin_arcsec=0)
    sm = SkyMap(ra=10.0, dec=0.0, pixel_scale=SCALE, patch_inner=100, patch_border=0,
                n_patches_x=1, n_patches_y=1)
    with pytest.raises(NoOverlapError, match="from the tract centre"):
        sm.patches_overlapping([190.0], [0.0])
    with pytest.raises(ValueError, match="patch_inner"):
        SkyMap(ra=0, dec=0, pixel_scale=0.2, patch_inner=0, patch_border=0, n_patches_x=1,
               n_patches_y=1)
