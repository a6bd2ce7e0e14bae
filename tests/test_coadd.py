"""Tests of diffim.coadd: visit selection, weights and the streaming assembly."""

import math
import tracemalloc

import numpy as np
import pandas as pd
import pytest

from diffim.coadd import (CHUNK_ELEMENTS, assemble_coadd, auto_model_fwhm, check_seeing_config,
                          choose_block_rows, select_inputs, typical_variance, visit_weights)
from diffim.errors import ConfigError
from diffim.masks import any_set, bit


def _reader(images, variances, masks):
    """read_block backed by in-memory lists; records the row slices asked for."""
    calls = []

    def read_block(i, rows):
        calls.append((i, rows.start, rows.stop))
        return images[i][rows], variances[i][rows], masks[i][rows]

    read_block.calls = calls
    return read_block


def _noise_inputs(n, shape, sigmas, seed, signal=None):
    rng = np.random.default_rng(seed)
    images, variances, masks = [], [], []
    for s in sigmas[:n]:
        img = rng.standard_normal(shape).astype(np.float32) * np.float32(s)
        if signal is not None:
            img += signal
        images.append(img)
        variances.append(np.full(shape, s * s, np.float32))
        masks.append(np.zeros(shape, np.int32))
    return images, variances, masks


# ----------------------------------------------------------------------------
# selection and configuration
# ----------------------------------------------------------------------------
def _visit_table():
    return pd.DataFrame({
        "visit": [1, 2, 3, 4, 5, 6],
        "detector": [0] * 6,
        "band": ["r"] * 6,
        "fwhm_px": [3.9, 4.2, 5.31, 4.0, np.nan, 4.6],
        "mjd": [60000.1, 60000.2, 60000.3, 60010.0, 60000.5, 60000.6],
        "status": ["ok", "ok", "ok", "ok", "failed", "ok"],
        "reason": ["", "", "", "", "astrometry failed: no match", ""],
    })


def test_select_inputs_reasons():
    out = select_inputs(_visit_table(), model_fwhm_px=4.85, max_fwhm_px=4.5,
                        mjd_range=(60000.0, 60001.0), visit_list=[1, 2, 3, 4, 5])
    assert list(out["included"]) == [True, True, False, False, False, False]
    reasons = list(out["reason"])
    assert reasons[:2] == ["", ""]
    assert reasons[2] == ("PSF FWHM 5.31 px broader than the model PSF FWHM 4.85 px "
                          "(would need deconvolution)")
    assert reasons[3] == "outside template MJD range [60000, 60001]"
    assert reasons[4] == "calexp failed: astrometry failed: no match"
    table = _visit_table().drop(columns="reason")
    out = select_inputs(table, model_fwhm_px=4.85)
    assert out["reason"][4] == "calexp failed: status failed"
    # visit 6: two reasons, both reported
    assert "not in template visit list" in reasons[5]
    assert "PSF FWHM 4.60 px above the seeing limit coadd.max_fwhm 4.50 px" in reasons[5]
    assert out["included"].dtype == bool


def test_select_inputs_refuses_bad_config_and_tables():
    with pytest.raises(ConfigError, match="exceeds the model PSF FWHM"):
        select_inputs(_visit_table(), model_fwhm_px=4.0, max_fwhm_px=4.5)
    with pytest.raises(ValueError, match="lacks columns"):
        select_inputs(_visit_table().drop(columns="mjd"), model_fwhm_px=5.0)


def test_check_seeing_config_message():
    check_seeing_config(4.85, 4.85)  # equal is allowed
    with pytest.raises(ConfigError) as info:
        check_seeing_config(4.85, 5.2)
    assert str(info.value) == (
        "coadd.max_fwhm (5.2 arcsec) exceeds the model PSF FWHM (4.85 arcsec): visits "
        "between them would need deconvolution. Set coadd.max_fwhm <= coadd.model_fwhm "
        "or use model_fwhm: auto.")
    with pytest.raises(ConfigError, match="positive number"):
        check_seeing_config(float("nan"), 1.0)


def test_auto_model_fwhm_admits_the_requested_fraction():
    fwhms = np.random.default_rng(1).uniform(3.0, 6.0, 200)
    model = auto_model_fwhm(fwhms, percentile=75.0, margin=1.02)
    assert model == pytest.approx(1.02 * np.percentile(fwhms, 75.0))
    assert np.mean(fwhms <= model) >= 0.75
    assert auto_model_fwhm([np.nan, 4.0]) == pytest.approx(4.08)  # NaN ignored
    with pytest.raises(ValueError, match="none is finite"):
        auto_model_fwhm([np.nan])
    with pytest.raises(ValueError, match="margin"):
        auto_model_fwhm([4.0], margin=0.9)


def test_visit_weights_and_typical_variance():
    w = visit_weights([1.0, 2.0, 4.0])
    np.testing.assert_allclose(w, np.array([4, 2, 1]) / 7.0, rtol=1e-12)
    with pytest.raises(ValueError, match="finite and > 0"):
        visit_weights([1.0, 0.0])
    var = np.full((40, 40), 9.0, np.float32)
    var[:10] = np.nan
    mask = np.zeros((40, 40), np.int32)
    mask[10:20] = bit("SAT")
    var[10:20] = 1e6  # masked: must not count
    assert typical_variance(var, mask) == 9.0


def test_choose_block_rows_keeps_memory_independent_of_inputs():
    budget = 64 * 1024**2
    for n in (5, 10, 40, 80):
        rows = choose_block_rows(4000, n, max_block_bytes=budget)
        assert rows * 4000 * n * 12 <= budget
        assert (rows + 1) * 4000 * n * 12 > budget  # and it uses the budget
    assert choose_block_rows(4000, 10, max_block_bytes=budget, block_rows=7) == 7


# ----------------------------------------------------------------------------
# assembly
# ----------------------------------------------------------------------------
SIGMAS = np.linspace(0.5, 3.0, 24)


@pytest.mark.parametrize("method", ["meanclip", "mean"])
def test_coadd_noise_matches_prediction(method):
    shape = (200, 200)
    imgs, vars_, masks = _noise_inputs(24, shape, SIGMAS, seed=11)
    w = visit_weights(SIGMAS**2)
    res = assemble_coadd(_reader(imgs, vars_, masks), 24, shape, w, method=method)
    # 40000 pixels: the std is known to 0.35 %; 3-sigma clipping of Gaussian noise
    # changes it by ~1 % (measured), well inside the required 5 %
    ratio = np.std(res.image) / math.sqrt(np.mean(res.variance))
    assert abs(ratio - 1) < 0.05
    # the variance plane is the analytic one: 1 / sum(1/sigma^2) (within float32 rounding,
    # plus < 1 % from pixels where 3-sigma clipping dropped an input)
    predicted = 1.0 / np.sum(1.0 / SIGMAS**2)
    assert np.mean(res.variance) == pytest.approx(predicted, rel=0.01)
    assert np.all(res.mask == 0) and not np.isnan(res.image).any()
    if method == "mean":
        assert res.n_clipped.max() == 0 and np.all(res.n_inputs_image == 24)
    else:  # a 3-sigma clip rejects ~0.3 % of Gaussian inputs, not more than 1 %
        assert res.n_clipped.mean() / 24 < 0.01


def test_weighted_mean_is_exact_without_noise():
    shape = (30, 20)
    values = [1.0, 2.0, 4.0]
    variances = [1.0, 2.0, 4.0]
    imgs = [np.full(shape, v, np.float32) for v in values]
    vars_ = [np.full(shape, v, np.float32) for v in variances]
    masks = [np.zeros(shape, np.int32) for _ in values]
    w = visit_weights(variances)
    res = assemble_coadd(_reader(imgs, vars_, masks), 3, shape, w, method="mean")
    expect = np.dot(w, values) / w.sum()
    expect_var = np.dot(w**2, variances) / w.sum() ** 2
    np.testing.assert_allclose(res.image, expect, rtol=1e-6)  # float32 arithmetic
    np.testing.assert_allclose(res.variance, expect_var, rtol=1e-6)


def test_artifact_in_one_visit_is_rejected():
    shape = (120, 120)
    yy, xx = np.mgrid[:120, :120]
    star = (5000.0 * np.exp(-((xx - 60) ** 2 + (yy - 60) ** 2) / (2 * 2.0**2))).astype(np.float32)
    sigmas = np.linspace(0.8, 1.5, 8)
    imgs, vars_, masks = _noise_inputs(8, shape, sigmas, seed=5, signal=star)
    clean = [im.copy() for im in imgs]
    streak = np.abs(yy - (0.5 * xx + 20)) < 1.5       # a satellite trail, 30 sigma
    cosmic = (np.abs(yy - 90) <= 1) & (np.abs(xx - 30) <= 1)   # a cosmic ray, 1000 sigma
    imgs[3] = imgs[3] + np.where(streak, 30.0, 0.0).astype(np.float32)
    imgs[3][cosmic] += 1000.0
    w = visit_weights(sigmas**2)
    res = assemble_coadd(_reader(imgs, vars_, masks), 8, shape, w, method="meanclip")
    truth = assemble_coadd(_reader(clean, vars_, masks), 8, shape, w, method="mean")
    bad = streak | cosmic
    z = (res.image - truth.image)[bad] / np.sqrt(truth.variance[bad])
    # removing 1 of 8 inputs moves a pixel by ~0.4 sigma of the coadd: demand |z| < 5 everywhere
    # and a mean offset below 3 standard errors of the ~0.4-sigma scatter
    assert np.abs(z).max() < 5.0
    assert abs(z.mean()) < 3 * 0.5 / math.sqrt(bad.sum())
    assert np.all(res.n_clipped[bad] >= 1)
    assert res.input_pixels_clipped[3] >= bad.sum()
    # without clipping the streak would show (30 / 8 ~ 4 sigma... per pixel: mean > 5 sigma)
    plain = assemble_coadd(_reader(imgs, vars_, masks), 8, shape, w, method="mean")
    assert np.mean((plain.image - truth.image)[streak] / np.sqrt(truth.variance[streak])) > 5
    # the star itself (present in every visit) is not clipped: < 2 % of its core inputs
    core = (xx - 60) ** 2 + (yy - 60) ** 2 <= 9
    assert res.n_clipped[core].sum() / (8 * core.sum()) < 0.02
    np.testing.assert_allclose(res.image[60, 60], truth.image[60, 60],
                               atol=5 * math.sqrt(truth.variance[60, 60]))


def test_no_data_nan_and_masked_inputs():
    shape = (60, 50)
    n = 3
    imgs = [np.full(shape, v, np.float32) for v in (1.0, 2.0, 3.0)]
    vars_ = [np.ones(shape, np.float32) for _ in range(n)]
    masks = [np.zeros(shape, np.int32) for _ in range(n)]
    # rows 0-9: no input at all (NaN in two, NO_DATA in the third)
    imgs[0][:10] = np.nan
    imgs[1][:10] = np.nan
    masks[2][:10] = bit("NO_DATA")
    # rows 10-19: only input 2 has data
    imgs[0][10:20] = np.nan
    vars_[1][10:20] = np.nan
    # rows 20-29: SAT in every input
    for m in masks:
        m[20:30] = bit("SAT")
    # rows 30-39: CR in input 0 only -> excluded there, mean of inputs 1 and 2
    masks[0][30:40] = bit("CR")
    res = assemble_coadd(_reader(imgs, vars_, masks), n, shape, [1, 1, 1], method="meanclip",
                         block_rows=7)  # blocks of 7 rows cut through every region
    assert np.isnan(res.image[:10]).all() and np.isnan(res.variance[:10]).all()
    assert np.all(res.mask[:10] == bit("NO_DATA")) and np.all(res.n_inputs_image[:10] == 0)
    np.testing.assert_array_equal(res.image[10:20], 3.0)
    np.testing.assert_array_equal(res.variance[10:20], 1.0)
    assert np.all(res.n_inputs_image[10:20] == 1) and np.all(res.mask[10:20] == 0)
    assert np.isnan(res.image[20:30]).all()
    assert np.all(res.mask[20:30] == bit("NO_DATA") | bit("SAT"))
    np.testing.assert_allclose(res.image[30:40], 2.5, rtol=1e-7)
    np.testing.assert_allclose(res.variance[30:40], 0.5, rtol=1e-7)
    assert np.all(res.mask[30:40] == 0)
    np.testing.assert_allclose(res.image[40:], 2.0, rtol=1e-7)
    assert not any_set(res.mask[10:20], "CR").any() and res.n_clipped.max() == 0
    assert list(res.input_pixels_used) == [20 * 50, 30 * 50, 40 * 50]


def test_median_option():
    shape = (200, 200)
    sigmas = np.full(25, 2.0)
    imgs, vars_, masks = _noise_inputs(25, shape, sigmas, seed=21)
    imgs[4][50:60] += 1e4   # an outlier the median ignores
    res = assemble_coadd(_reader(imgs, vars_, masks), 25, shape, visit_weights(sigmas**2),
                         method="median")
    stack = np.stack(imgs)
    np.testing.assert_array_equal(res.image, np.median(stack, axis=0).astype(np.float32))
    predicted = math.pi / 2 * 4.0 / 25
    np.testing.assert_allclose(res.variance, predicted, rtol=1e-5)
    # the large-n formula pi/2 sigma^2/n slightly overestimates at n = 25 (measured
    # std ratio 0.992); 40000 pixels pin the std to 0.35 %, so 0.95-1.02 is > 5 sigma wide
    ratio = np.std(res.image) / math.sqrt(predicted)
    assert 0.95 < ratio < 1.02
    # an even number of valid inputs: mean of the two middle values
    odd = [np.full((4, 4), v, np.float32) for v in (1.0, 2.0, 7.0, 100.0)]
    ones = [np.ones((4, 4), np.float32)] * 4
    zeros = [np.zeros((4, 4), np.int32)] * 4
    res4 = assemble_coadd(_reader(odd, ones, zeros), 4, (4, 4), [1] * 4, method="median")
    np.testing.assert_array_equal(res4.image, 4.5)


def test_blocking_does_not_change_the_result():
    shape = (97, 64)
    imgs, vars_, masks = _noise_inputs(6, shape, np.linspace(1, 2, 6), seed=2)
    imgs[2][10:20, 5:9] = np.nan
    w = visit_weights(np.linspace(1, 2, 6) ** 2)
    read_small = _reader(imgs, vars_, masks)
    small = assemble_coadd(read_small, 6, shape, w, block_rows=5)
    big = assemble_coadd(_reader(imgs, vars_, masks), 6, shape, w)
    np.testing.assert_array_equal(small.image, big.image)
    np.testing.assert_array_equal(small.n_inputs_image, big.n_inputs_image)
    assert max(stop - start for _, start, stop in read_small.calls) == 5
    assert small.block_rows == 5 and big.block_rows == 97


def test_peak_memory_does_not_grow_with_inputs():
    """tracemalloc peak of the assembly with 4 vs 32 inputs under a 2 MB block budget."""
    shape = (256, 256)
    budget = 2 * 1024**2
    peaks = {}
    for n in (4, 32):
        # every input reads the same arrays, so the inputs themselves cost nothing
        img = np.random.default_rng(n).standard_normal(shape).astype(np.float32)
        var = np.ones(shape, np.float32)
        msk = np.zeros(shape, np.int32)

        def read_block(i, rows):
            return img[rows], var[rows], msk[rows]

        tracemalloc.start()
        assemble_coadd(read_block, n, shape, np.ones(n), max_block_bytes=budget)
        peaks[n] = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
    outputs = 16 * shape[0] * shape[1]  # 1 MB of result planes
    # block buffers <= budget; the per-chunk temporaries are bounded by ~16 bytes per
    # chunk element whatever n (measured peaks: 6.4 MB for n=4, 5.2 MB for n=32)
    bound = outputs + budget + 16 * CHUNK_ELEMENTS
    assert peaks[4] < bound and peaks[32] < bound
    assert peaks[32] < 1.1 * peaks[4]  # 8x the inputs, no more memory


def test_bad_arguments():
    read = _reader([np.zeros((4, 4), np.float32)], [np.ones((4, 4), np.float32)],
                   [np.zeros((4, 4), np.int32)])
    with pytest.raises(ValueError, match="unknown coadd method"):
        assemble_coadd(read, 1, (4, 4), [1.0], method="sum")
    with pytest.raises(ValueError, match="weights must be 1 finite positive"):
        assemble_coadd(read, 1, (4, 4), [0.0])
    with pytest.raises(ValueError, match="expected"):
        assemble_coadd(read, 1, (5, 4), [1.0])
