"""Seeing broader than the configured PSF kernel holds is handled, not refused.

At 0.1"/px and 1.0-1.4" seeing the PSF FWHM is 12-16 px, more than the
default ``psf.kernel_size = 41`` can hold (4 x FWHM).  The cookbook makes the
user raise the kernel size by hand; here every stage widens its kernel
(:func:`diffim.psf.kernel_size_for`): each visit's PSF model, the model PSF
of the coadd, the warps and the templates.  Before that, this dataset
stopped the workflow (every calexp refused, then the sky map).
"""

import pandas as pd
import pytest
from astropy.io import fits

from conftest import run_snakemake

from diffim.calexp import pixel_scale_arcsec
from diffim.io import read_exposure

pytestmark = pytest.mark.slow

BROAD = {"seed": 7, "n_visits": 4, "bands": ["r"], "shape": [768, 768], "pixel_scale": 0.1,
         "fwhm_range_arcsec": [1.0, 1.4], "fwhm_median_arcsec": 1.2, "n_stars": 600,
         "n_galaxies": 40, "n_variable_stars": 3, "n_transients": 3, "n_saturated": 1}


@pytest.fixture(scope="module")
def broad_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("broad")
    run_snakemake(root, config={"outdir": "results", "simulate": BROAD,
                                "skymap": {"patch_inner": 400, "patch_border": 20}})
    return root / "results"


def test_every_visit_gets_a_psf_model_that_holds_it(broad_run):
    status = pd.read_parquet(broad_run / "visit_status.parquet")
    assert (status["status"] == "ok").all(), status[["file", "reason"]]
    for visit in status["visit"]:
        with fits.open(broad_run / "calexp" / f"v{visit}-d0.fits") as hdul:
            fwhm, k = hdul[0].header["FWHM"], hdul["PSF"].data.shape[-1]
        assert fwhm > 41 / 4 and k % 2 == 1 and k >= 4 * fwhm, (visit, fwhm, k)


def test_coadds_and_differences_use_kernels_that_hold_the_model_psf(broad_run):
    coadds = sorted((broad_run / "coadd").glob("*/*/coadd.fits"))
    assert coadds
    for path in coadds:
        exp = read_exposure(path)
        model_px = exp.meta["MODELFWH"] / pixel_scale_arcsec(exp.wcs)
        assert exp.psf.kernel_size >= 4 * model_px > 41, (path, model_px, exp.psf.kernel_size)
    inputs = pd.read_parquet(broad_run / "coadd_inputs.parquet")
    in_coadd = set(inputs.loc[inputs["included"], "visit"])
    dia = pd.read_parquet(broad_run / "dia_sources.parquet")
    assert len(in_coadd) >= 3
    # at most 20 DIASources per visit in the coadd (measured 0-1; the broadest visit,
    # left out of the coadd, is the known poor case: docs/quality.md, seventh session)
    counts = dia["visit"].value_counts()
    for visit in in_coadd:
        assert counts.get(visit, 0) <= 20, (visit, counts.to_dict())
    # and their differences are sane: kernel sums within 5 % of 1 (measured
    # 0.994-1.004; the eleventh session's code gave 0.73 on visit 2, its PSF model's
    # centroid drifting by up to 0.6 px across the detector) and noise ratios below
    # 1.5 (measured 1.07-1.38)
    status = pd.read_parquet(broad_run / "visit_status.parquet")
    for visit in in_coadd:
        qa = pd.read_json(broad_run / "diff" / f"v{visit}-d0.status.json", typ="series")
        assert abs(qa["kernel_sum"] - 1) < 0.05 and qa["noise_ratio"] < 1.5, (visit, qa)
    assert len(status) == 4
