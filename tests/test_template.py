"""Leave-one-out templates: removing a visit from a coadd equals coadding the others."""

import numpy as np

from diffim import masks
from diffim.coadd import assemble_coadd, visit_weights
from diffim.exposure import Exposure


def _inputs(n=4, shape=(60, 70), seed=3):
    rng = np.random.default_rng(seed)
    sigmas = np.linspace(1.0, 2.0, n)
    images = [rng.normal(10.0, s, shape).astype(np.float32) for s in sigmas]
    variances = [np.full(shape, s**2, np.float32) for s in sigmas]
    mask = [np.zeros(shape, np.int32) for _ in sigmas]
    return images, variances, mask, visit_weights(sigmas**2)


def _coadd(images, variances, mask, weights):
    def read(i, rows):
        return images[i][rows], variances[i][rows], mask[i][rows]
    r = assemble_coadd(read, len(images), images[0].shape, weights, method="mean")
    return r


def test_removing_one_input_equals_coadding_the_rest():
    from diffim.template import remove_own_contribution

    images, variances, mask, w = _inputs()
    full = _coadd(images, variances, mask, w)
    coadd = Exposure(image=full.image, variance=full.variance, mask=full.mask)
    own = Exposure(image=images[0], variance=variances[0], mask=mask[0])
    # a plain mean (no clipping record): the visit entered every usable pixel
    loo = remove_own_contribution(coadd, full.weight_sum, own, w[0])
    rest = _coadd(images[1:], variances[1:], mask[1:], w[1:] / w[1:].sum())
    # float32 arithmetic on values ~10: agreement to 1e-5 relative
    np.testing.assert_allclose(loo.image, rest.image, rtol=1e-5)
    np.testing.assert_allclose(loo.variance, rest.variance, rtol=1e-4)


def test_pixels_only_the_visit_covered_become_no_data():
    from diffim.template import remove_own_contribution

    images, variances, mask, w = _inputs(n=2)
    mask[1][:10] = masks.bit("NO_DATA")  # second visit has no data in the first rows
    images[1][:10] = np.nan
    full = _coadd(images, variances, mask, w)
    coadd = Exposure(image=full.image, variance=full.variance, mask=full.mask)
    own = Exposure(image=images[0], variance=variances[0], mask=mask[0])
    loo = remove_own_contribution(coadd, full.weight_sum, own, w[0])
    assert np.all(np.isnan(loo.image[:10]))
    assert np.all(loo.mask[:10] & masks.bit("NO_DATA"))
    np.testing.assert_allclose(loo.image[10:], images[1][10:], rtol=1e-5)



def test_leave_one_out_of_a_clipped_coadd_equals_coadding_the_rest():
    """A variable source in the left-out visit, at amplitudes from below to far above
    the clip threshold: whatever the coadd decided, removing the visit gives the
    coadd of the others (which keeps all their pixels: their noise is 0.3x the
    declared sigma, so nothing of theirs is clipped)."""
    from diffim.template import remove_own_contribution

    rng = np.random.default_rng(8)
    n, shape = 6, (40, 60)
    images = [(10.0 + 0.3 * rng.standard_normal(shape)).astype(np.float32) for _ in range(n)]
    variances = [np.ones(shape, np.float32) for _ in range(n)]
    mask = [np.zeros(shape, np.int32) for _ in range(n)]
    # visit 0 brightens by 0.5-30 sigma along the columns (a variable star's profile)
    images[0] += np.linspace(0.5, 30.0, shape[1], dtype=np.float32)[None, :]
    w = visit_weights(np.ones(n))

    def coadd(idx):
        def read(i, rows):
            j = idx[i]
            return images[j][rows], variances[j][rows], mask[j][rows]
        return assemble_coadd(read, len(idx), shape, w[idx] / w[idx].sum(), method="meanclip",
                              clip_sigma=3.0)

    full = coadd(list(range(n)))
    assert full.n_clipped.any() and not full.n_clipped.all()  # both regimes present
    loo = remove_own_contribution(
        Exposure(image=full.image, variance=full.variance, mask=full.mask), full.weight_sum,
        Exposure(image=images[0], variance=variances[0], mask=mask[0]), w[0] / w.sum(),
        clip_centre=full.clip_centre, clip_centre_variance=full.clip_centre_variance,
        clip_sigma=3.0)
    rest = coadd(list(range(1, n)))
    assert rest.n_clipped.max() == 0
    # float32 sums of values ~10-40: 1e-5 relative
    np.testing.assert_allclose(loo.image, rest.image, rtol=1e-5)


def test_own_weight_share_rebuilds_the_coadd_from_the_rest():
    """``a T_v + (1 - a) T'`` is the coadd wherever the visit entered it (``a`` its
    weight share there); where it did not (masked rows), ``a = 0`` and ``T' = T``."""
    from diffim.template import own_weight_share, remove_own_contribution

    images, variances, mask, w = _inputs(n=3)
    mask[0][:8] = masks.bit("CR")   # the visit is kept out of the first rows
    full = _coadd(images, variances, mask, w)
    coadd = Exposure(image=full.image, variance=full.variance, mask=full.mask)
    own = Exposure(image=images[0], variance=variances[0], mask=mask[0])
    a = own_weight_share(coadd, full.weight_sum, own, w[0])
    loo = remove_own_contribution(coadd, full.weight_sum, own, w[0])
    assert np.all(a[:8] == 0)
    np.testing.assert_allclose(a[8:], w[0] / w.sum(), rtol=1e-6)
    np.testing.assert_allclose(a * images[0] + (1 - a) * loo.image, full.image, rtol=1e-5)


def _tan(crval, crpix, scale_arcsec, rot_deg=0.0):
    from astropy.wcs import WCS
    t = np.radians(rot_deg)
    s = scale_arcsec / 3600.0
    w = WCS(naxis=2)
    w.wcs.ctype = ["RA---TAN", "DEC--TAN"]
    w.wcs.crval, w.wcs.crpix = crval, crpix
    w.wcs.cd = s * np.array([[-np.cos(t), np.sin(t)], [np.sin(t), np.cos(t)]])
    return w


def test_a_template_from_the_needed_box_equals_one_from_the_whole_patch():
    """The diff job reads only ``template_box`` of each patch; the template must not change."""
    from diffim.psf import PsfModel
    from diffim.template import TEMPLATE_MARGIN, stitch_template, template_box
    from diffim.warp import footprint_bbox
    rng = np.random.default_rng(5)
    shape = (300, 320)
    patch_wcs = _tan([150.0, 2.0], [160.5, 150.5], 0.2)
    yy, xx = np.mgrid[:shape[0], :shape[1]]
    image = (np.sin(xx / 7.0) * np.cos(yy / 5.0) + rng.normal(0, 0.1, shape)).astype(np.float32)
    image[:12, :] = np.nan  # a patch edge without data inside the box
    mask = np.where(np.isfinite(image), 0, masks.bit("NO_DATA")).astype(masks.MASK_DTYPE)
    patch = Exposure(image=image, variance=np.full(shape, 0.01, np.float32), mask=mask,
                     wcs=patch_wcs, psf=PsfModel.gaussian(3.0, 15, width=shape[1], height=shape[0]),
                     meta={})
    # a rotated visit at a slightly different scale, off one corner of the patch
    visit_shape = (110, 130)
    visit_wcs = _tan([150.0 - 100 * 0.2 / 3600, 2.0 - 120 * 0.2 / 3600], [65.0, 55.0], 0.21, 27.0)
    box = template_box(visit_wcs, visit_shape, patch_wcs, shape)
    sl_y, sl_x = box
    assert 0 < (sl_y.stop - sl_y.start) * (sl_x.stop - sl_x.start) < 0.5 * image.size
    psf = PsfModel.gaussian(3.0, 15, width=visit_shape[1], height=visit_shape[0])
    whole = stitch_template([patch], visit_wcs, visit_shape, psf)
    part = stitch_template([patch.cropped(sl_x.start, sl_y.start, sl_x.stop, sl_y.stop)],
                           visit_wcs, visit_shape, psf)
    covered = np.isfinite(whole.image)
    assert covered.sum() > 0.3 * covered.size and (~covered).sum() > 0
    np.testing.assert_array_equal(np.isfinite(part.image), covered)
    np.testing.assert_array_equal(part.mask, whole.mask)
    np.testing.assert_allclose(part.image[covered], whole.image[covered], rtol=0, atol=1e-6)
    np.testing.assert_allclose(part.variance[covered], whole.variance[covered], rtol=1e-6)
    # without the margin the crop cuts into the resampling's taps at the visit's edge
    assert TEMPLATE_MARGIN >= 3 * 3 + 4
    ty, tx = footprint_bbox(visit_wcs, visit_shape, patch_wcs, shape, margin=0)
    cut = stitch_template([patch.cropped(tx.start, ty.start, tx.stop, ty.stop)],
                          visit_wcs, visit_shape, psf)
    assert np.isfinite(cut.image).sum() < covered.sum()
