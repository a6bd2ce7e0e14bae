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
    # a huge clip threshold: this test is about the algebra, not outlier handling
    loo = remove_own_contribution(coadd, full.weight_sum, own, w[0], clip_sigma=1e9)
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
    loo = remove_own_contribution(coadd, full.weight_sum, own, w[0], clip_sigma=1e9)
    assert np.all(np.isnan(loo.image[:10]))
    assert np.all(loo.mask[:10] & masks.bit("NO_DATA"))
    np.testing.assert_allclose(loo.image[10:], images[1][10:], rtol=1e-5)

