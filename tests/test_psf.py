"""diffim.psf: analytic profiles, adaptive-moment FWHM and the PsfModel."""

import numpy as np
import pytest

from diffim.psf import PsfModel, gaussian_kernel, moffat_kernel, moments_fwhm, poly_terms


@pytest.mark.parametrize("fwhm", [2.5, 4.0, 7.0])
def test_gaussian_moments_fwhm_is_exact(fwhm):
    # adaptive moments of a sampled Gaussian give its FWHM (sampling error < 0.5 %)
    assert moments_fwhm(gaussian_kernel(fwhm, 41)) == pytest.approx(fwhm, rel=5e-3)


@pytest.mark.parametrize("fwhm", [1.2, 1.4, 1.6, 1.8, 2.0, 2.2])
def test_undersampled_moments_fwhm_is_defined(fwhm):
    """Below ~2 px the adaptive weight used to collapse onto one pixel (FWHM NaN or 0
    for most sub-pixel centres, which failed 3 of 10 visits of a 0.7"/px run).  The
    de-weighted moments size every centre.  Sampling alone makes a narrow sampled
    Gaussian look narrower when centred on a pixel (its discrete second moment is
    low): measured -3.6 % at 1.6 px, -8 % at 1.4 px, -17 % at 1.2 px (under 1 % at
    2.2 px), over centres offset by 0, 0.25 and 0.5 px."""
    rel = {1.2: 0.2, 1.4: 0.1}.get(fwhm, 0.04)
    for dx in (0.0, 0.25, 0.5):
        for dy in (0.0, 0.5):
            got = moments_fwhm(gaussian_kernel(fwhm, 21, dx=dx, dy=dy))
            assert got == pytest.approx(fwhm, rel=rel), (dx, dy)
    # a Moffat core is defined too, and larger than the Gaussian of the same FWHM (wings)
    assert fwhm < moments_fwhm(moffat_kernel(fwhm, 21, beta=3.0, dx=0.5)) < 1.4 * fwhm


def test_ellipticity_keeps_the_geometric_mean_size():
    round_ = moments_fwhm(moffat_kernel(5.0, 41))
    elliptical = moments_fwhm(moffat_kernel(5.0, 41, e1=0.06, e2=-0.03))
    assert elliptical == pytest.approx(round_, rel=2e-3)  # det-preserving shape matrix


def test_psf_model_polynomial_variation():
    # PSF(u, v) = C0 + u C1: at the left edge (u = -1) C0 - C1, at the right (u = +1) C0 + C1
    a, b = gaussian_kernel(3.0, 15), gaussian_kernel(4.0, 15)
    c0, c1 = (a + b) / 2, (b - a) / 2
    model = PsfModel(coeffs=np.stack([c0, c1, np.zeros_like(c0)]), order=1, width=101, height=51)
    np.testing.assert_allclose(model.at(0, 25), a / a.sum(), atol=1e-12)
    np.testing.assert_allclose(model.at(100, 25), b / b.sum(), atol=1e-12)
    assert model.at(50, 25).sum() == pytest.approx(1.0)
    assert poly_terms(0.5, -0.5, 2).tolist() == [1.0, 0.5, -0.5, 0.25, -0.25, 0.25]


def test_invalid_models_are_refused():
    with pytest.raises(ValueError, match="odd"):
        gaussian_kernel(3.0, 20)
    with pytest.raises(ValueError, match="order 1 needs 3"):
        PsfModel(coeffs=np.zeros((2, 15, 15)), order=1, width=10, height=10)


def test_padded_model_is_the_same_psf():
    from diffim.psf import PsfModel, moffat_kernel

    model = PsfModel.constant(moffat_kernel(3.0, 21, beta=3.0), 100, 100)
    big = model.padded(31)
    assert big.kernel_size == 31
    np.testing.assert_array_equal(big.at()[5:26, 5:26], model.at())  # exact: zeros added only
    assert big.at().sum() == pytest.approx(1.0)
    assert model.padded(21) is model
    with pytest.raises(ValueError, match="cannot pad"):
        model.padded(11)


def test_kernel_size_for_holds_four_fwhm():
    from diffim.psf import MAX_FWHM_FRACTION, kernel_size_for
    assert MAX_FWHM_FRACTION == 0.25
    assert kernel_size_for(5.0, 41) == 41             # 4 x 5 = 20 px fit easily
    assert kernel_size_for(10.25, 41) == 41           # exactly 41 / 4
    assert kernel_size_for(10.3, 41) == 43            # 41.2 -> next odd size
    assert kernel_size_for(14.0, 21, margin=1.2) == 69  # 4 x 16.8 = 67.2 -> 69
    for fwhm in np.linspace(0.5, 40.0, 80):
        k = kernel_size_for(fwhm, 11)
        assert k % 2 == 1 and k >= 11 and fwhm <= MAX_FWHM_FRACTION * k
        assert k == 11 or fwhm > MAX_FWHM_FRACTION * (k - 2)  # the smallest that holds it
    with pytest.raises(ValueError):
        kernel_size_for(float("nan"), 41)
