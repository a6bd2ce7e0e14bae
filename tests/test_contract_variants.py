"""Legal variants of the data contract give the same science as the canonical files.

The tiny dataset of ``tiny_run`` is rewritten in encodings that CONTRACT.md
allows but the built-in simulator never writes -- integer pixels in ADU with
``BZERO``/``GAIN``, the image in the first extension with the keywords split
between the headers, ``PC`` + ``CDELT`` instead of ``CD``, no ``VISIT``
keyword, float64 pixels, a padded mixed-case ``FILTER``, a CSV reference
catalog with its columns in another order -- and the real workflow is run on
it.  Every file must be processed, and the DIASources must be the canonical
run's to within the noise that the variants themselves add (integer rounding).
"""

import numpy as np
import pandas as pd
import pytest
from astropy.io import fits
from scipy.spatial import cKDTree

from conftest import TINY_SIMULATION, run_snakemake

from diffim.simulate import simulate_dataset

pytestmark = pytest.mark.slow

WCS_PREFIXES = ("CTYPE", "CRVAL", "CRPIX", "CD1_", "CD2_", "CUNIT", "WCSAXES", "LONPOLE",
                "LATPOLE", "RADESYS", "EQUINOX")


def _read(path):
    with fits.open(path) as hdul:
        return hdul[0].data.astype(np.float32), hdul[0].header.copy()


def _int16_adu(path, gain=2.0):
    """Pixels in ADU, rounded, stored as int16 with BZERO = 32768 (unsigned 16 bit)."""
    data, header = _read(path)
    adu = np.clip(np.round(data / gain), 0, 65535)
    header["BUNIT"], header["GAIN"] = "ADU", gain
    hdu = fits.PrimaryHDU(adu.astype(np.float32), header=header)
    hdu.scale("int16", bzero=32768)
    hdu.writeto(path, overwrite=True)
    return fits.getheader(path)["BITPIX"]


def _in_extension(path):
    """Empty primary HDU with the exposure keywords; the image and its WCS in extension 1."""
    data, header = _read(path)
    primary, ext = fits.Header(), fits.Header()
    for card in header.cards:
        if card.keyword in ("SIMPLE", "BITPIX", "NAXIS", "NAXIS1", "NAXIS2", "EXTEND", ""):
            continue
        (ext if card.keyword.startswith(WCS_PREFIXES) else primary).append(card)
    fits.HDUList([fits.PrimaryHDU(header=primary),
                  fits.ImageHDU(data, header=ext, name="IMAGE")]).writeto(path, overwrite=True)


def _pc_cdelt_no_visit(path):
    """CD matrix rewritten as PC x CDELT; the VISIT keyword removed (it is in the name)."""
    data, header = _read(path)
    cd = np.array([[header["CD1_1"], header["CD1_2"]], [header["CD2_1"], header["CD2_2"]]])
    scale = float(np.sqrt(abs(np.linalg.det(cd))))
    for key in ("CD1_1", "CD1_2", "CD2_1", "CD2_2", "VISIT"):
        header.remove(key, ignore_missing=True)
    header["CDELT1"], header["CDELT2"] = scale, scale
    for i in range(2):
        for j in range(2):
            header[f"PC{i + 1}_{j + 1}"] = cd[i, j] / scale
    fits.PrimaryHDU(data, header=header).writeto(path, overwrite=True)


def _float64_padded_filter(path):
    data, header = _read(path)
    header["FILTER"] = " " + header["FILTER"].upper() + "  "
    fits.PrimaryHDU(data.astype(np.float64), header=header).writeto(path, overwrite=True)


@pytest.fixture(scope="module")
def variant_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("variants")
    sim = simulate_dataset(root / "sim", dict(TINY_SIMULATION))
    images = sorted(sim["images"])
    assert len(images) == 5
    assert _int16_adu(images[0]) == 16
    _in_extension(images[1])
    _pc_cdelt_no_visit(images[2])
    _float64_padded_filter(images[3])  # images[4] stays canonical
    ref = pd.read_parquet(sim["refcat"])
    ref["id"] = np.arange(len(ref))
    csv = root / "refcat.csv"
    ref[["id", "r_magErr", "dec", "r_mag", "ra"]].to_csv(csv, index=False)
    config = {"outdir": "out", "images": str(root / "sim" / "images" / "*.fits"),
              "refcat": str(csv), "skymap": {"patch_inner": 300, "patch_border": 20}}
    run_snakemake(root, config=config)
    return root / "out"


def test_every_variant_is_processed(variant_run):
    status = pd.read_parquet(variant_run / "visit_status.parquet")
    assert len(status) == 5
    assert (status["status"] == "ok").all(), status[["file", "status", "reason"]]
    assert sorted(status["visit"]) == [1, 2, 3, 4, 5]  # visit 3 from its file name
    assert set(status["band"]) == {"r"}                # " R  " -> "r"


def _matches(a, b, radius=1.0):
    """For each row of ``a``: distance to and index of the nearest row of ``b`` (same visit)."""
    d = np.full(len(a), np.inf)
    j = np.zeros(len(a), int)
    for visit in np.unique(a.visit):
        ia, ib = np.flatnonzero(a.visit == visit), np.flatnonzero(b.visit == visit)
        if len(ib):
            dd, jj = cKDTree(np.c_[b.x.iloc[ib], b.y.iloc[ib]]).query(np.c_[a.x.iloc[ia], a.y.iloc[ia]])
            d[ia], j[ia] = dd, ib[jj]
    return d < radius, j


def test_variants_give_the_canonical_dia_sources(variant_run, tiny_run):
    workdir, config, _ = tiny_run
    canon = pd.read_parquet(workdir / config["outdir"] / "dia_sources.parquet")
    var = pd.read_parquet(variant_run / "dia_sources.parquet")
    assert len(canon) >= 3
    hit, j = _matches(canon, var)
    # Near the 5-sigma threshold a few DIASources come and go: the variants add only
    # rounding noise, but discrete choices (coadd clipping, PSF and kernel stars) can
    # amplify it.  Until the twelfth session the canonical run had 22-50 DIASources,
    # nearly all false (one visit's kernel sum was -2.2); now it has 4, all true
    # variables (S/N 5.7-22), and the three at S/N >= 7 must be found again.
    strong = canon.snr.to_numpy() >= 7
    assert strong.sum() >= 3 and hit[strong].all(), canon[strong & ~hit]
    assert hit.mean() >= 0.7, hit.mean()
    # the same pixels give the same fluxes, to a small fraction of their errors:
    # measured |difference| / psfFluxErr median 0.06, max 0.23
    z = (var.psfFlux.to_numpy()[j[hit]] - canon.psfFlux.to_numpy()[hit]) \
        / canon.psfFluxErr.to_numpy()[hit]
    assert np.median(np.abs(z)) < 0.25 and np.all(np.abs(z) < 1.0), z
