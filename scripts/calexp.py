"""Rule `calexp`: calibrate one (visit, detector) exposure.

Always writes the three outputs.  A file that cannot be calibrated gets a QA
record with ``status: failed`` and the reason, a calexp FITS holding only a
header that says so, and an empty source table; downstream rules skip it.
"""

import traceback

import pandas as pd
from astropy.io import fits

from diffim.calexp import CalexpConfig, process_exposure
from diffim.errors import DiffimError
from diffim.io import (atomic_path, header_meta, header_wcs, read_eimage, read_refcat,
                       write_exposure, write_json, write_table)
from diffim.runlog import setup_logging


def main(image_path, refcat_path, out, psf_cfg, calexp_cfg, wildcards, log=None):
    logger = setup_logging(log)
    visit, detector = int(wildcards["visit"]), int(wildcards["detector"])
    try:
        image, header = read_eimage(image_path)
        meta = header_meta(header, image_path)
        wcs = header_wcs(header, image_path)
        refcat = read_refcat(refcat_path, bands=[meta["band"]])
        config = CalexpConfig.from_workflow(psf_cfg, calexp_cfg)
        result = process_exposure(image, meta, wcs, refcat, config=config, path=str(image_path))
    except Exception as exc:  # one bad visit must not stop the others
        reason = str(exc) if isinstance(exc, DiffimError) else \
            f"{image_path}: internal error in calexp ({type(exc).__name__}: {exc})"
        logger.error("calexp failed: %s\n%s", reason, traceback.format_exc())
        write_failed(out, visit, detector, str(image_path), reason)
        return
    result.exposure.meta["FILE"] = str(image_path)[-68:]
    write_exposure(out.calexp, result.exposure)
    write_table(out.sources, result.sources)
    write_json(out.qa, {**result.qa, "file": str(image_path)})
    logger.info("calexp v%d d%d: FWHM %.2f px, zp %.3f, astrometry %.1f mas on %d stars",
                visit, detector, result.qa["fwhm_px"], result.qa["zeropoint"],
                1000 * result.qa["astrometry_rms_arcsec"], result.qa["astrometry_n_stars"])


def write_failed(out, visit, detector, file, reason):
    """The three outputs of a failed visit: a status, a header-only FITS, no sources."""
    hdu = fits.PrimaryHDU()
    hdu.header["VISIT"], hdu.header["DETECTOR"] = visit, detector
    hdu.header["STATUS"] = "failed"
    hdu.header.add_comment(f"calexp failed: {reason}"[:2000])
    with atomic_path(out.calexp) as tmp:
        hdu.writeto(tmp)
    write_table(out.sources, pd.DataFrame({"x": pd.Series(dtype=float), "y": pd.Series(dtype=float)}))
    write_json(out.qa, {"status": "failed", "reason": reason, "visit": visit,
                        "detector": detector, "file": file})


if "snakemake" in globals():
    main(snakemake.input.image, snakemake.input.refcat, snakemake.output, snakemake.params.psf,
         snakemake.params.calexp, dict(snakemake.wildcards), snakemake.log[0])
