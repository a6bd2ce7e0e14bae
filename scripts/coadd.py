"""Rule `coadd`: assemble the PSF-homogenized coadd of one (band, patch).

Reads the warps through memory maps, one block of rows at a time, so memory
does not grow with the number of visits.  Writes the coadd (IMAGE, MASK,
VARIANCE, PSF, NIMAGE = inputs per pixel, WEIGHTSUM = summed visit weight per
pixel) and its ``coadd_inputs`` table (one row per candidate visit).
"""

import numpy as np
import pandas as pd
from astropy.io import fits

from diffim.calexp import pixel_scale_arcsec
from diffim.coadd import assemble_coadd, typical_variance, visit_weights
from diffim.exposure import Exposure
from diffim.masks import bit
from diffim.io import WarpRowReader, read_header, write_exposure, write_table
from diffim.psf import PsfModel, kernel_size_for
from diffim.runlog import setup_logging
from diffim.skymap import SkyMap
from diffim.tables import COADD_INPUTS_SCHEMA


def usable_warps(warp_paths):
    """Split warps into usable ones and (visit, detector) -> reason for the others."""
    usable, excluded = [], {}
    for p in warp_paths:
        h = read_header(p, 0)
        key = (int(h["VISIT"]), int(h["DETECTOR"]))
        if h.get("INCLUDED", False):
            usable.append((key, p))
        else:
            excluded[key] = str(h.get("REASON", "warp failed"))
    return usable, excluded


def warp_variances(paths):
    out = []
    for p in paths:
        with fits.open(p, memmap=True) as hdul:
            out.append(typical_variance(hdul["VARIANCE"].data, hdul["MASK"].data))
    return out


def inputs_table(candidates, band, patch, usable_keys, weights, excluded):
    weight_of = dict(zip(usable_keys, weights))
    rows = []
    for c in candidates:
        key = (c["visit"], c["detector"])
        reason = c["reason"] if not c["included"] else excluded.get(key, "")
        included = key in weight_of
        rows.append(dict(band=band, patch=patch, visit=c["visit"], detector=c["detector"],
                         included=included, weight=float(weight_of.get(key, 0.0)),
                         reason="" if included else reason))
    return pd.DataFrame(rows, columns=COADD_INPUTS_SCHEMA.names)


def main(warp_paths, out, coadd_cfg, candidates, skymap_text, model_fwhm_arcsec, kernel_size,
         band, patch, log=None):
    logger = setup_logging(log)
    skymap = SkyMap.from_json(skymap_text)
    shape = skymap.patch_shape(patch)
    wcs = skymap.patch_wcs(patch)
    usable, excluded = usable_warps(warp_paths)
    keys = [k for k, _ in usable]
    paths = [p for _, p in usable]
    variances = warp_variances(paths)
    for key, v in zip(list(keys), variances):
        if not (np.isfinite(v) and v > 0):  # e.g. only its EDGE strip falls in this patch
            excluded[key] = "no usable pixel in this patch (all masked or edge)"
    kept = [i for i, v in enumerate(variances) if np.isfinite(v) and v > 0]
    keys, paths = [keys[i] for i in kept], [paths[i] for i in kept]
    if paths:
        weights = visit_weights([variances[i] for i in kept])
        reader = WarpRowReader(paths, shape)
        result = assemble_coadd(reader, len(paths), shape, weights, method=coadd_cfg["method"],
                                clip_sigma=coadd_cfg["clip_sigma"],
                                clip_rel=coadd_cfg["clip_rel"])
        image, variance, mask = result.image, result.variance, result.mask
        extra = [fits.ImageHDU(result.n_inputs_image, name="NIMAGE"),
                 fits.ImageHDU(result.weight_sum.astype(np.float32), name="WEIGHTSUM")]
        if result.clip_centre is not None:  # what leave-one-out templates need
            extra += [fits.ImageHDU(result.clip_centre, name="CLIPCEN"),
                      fits.ImageHDU(result.clip_centre_variance, name="CLIPCVAR")]
    else:
        weights = []
        image = np.full(shape, np.nan, np.float32)
        variance = np.full(shape, np.nan, np.float32)
        mask = np.full(shape, bit("NO_DATA"), np.int32)
        extra = [fits.ImageHDU(np.zeros(shape, np.int16), name="NIMAGE"),
                 fits.ImageHDU(np.zeros(shape, np.float32), name="WEIGHTSUM")]
        logger.warning("coadd %s %s: no usable input visit", band, patch)
    model_px = model_fwhm_arcsec / pixel_scale_arcsec(wcs)
    psf = PsfModel.model(model_px, kernel_size_for(model_px, kernel_size),
                          width=shape[1], height=shape[0])
    meta = dict(BAND=band, PATCH=patch, BUNIT="nJy", NINPUTS=len(paths),
                MODELFWH=model_fwhm_arcsec, METHOD=coadd_cfg["method"],
                CLIPSIG=float(coadd_cfg["clip_sigma"]), CLIPREL=float(coadd_cfg["clip_rel"]))
    for i, ((v, d), w) in enumerate(zip(keys, weights)):
        meta[f"IN{i:05d}"] = f"{v},{d},{w:.10g}"
    write_exposure(out.coadd, Exposure(image=image, variance=variance, mask=mask, wcs=wcs,
                                       psf=psf, meta=meta), extra_hdus=extra)
    write_table(out.inputs, inputs_table(candidates, band, patch, keys, weights, excluded),
                schema=COADD_INPUTS_SCHEMA)
    logger.info("coadd %s %s: %d inputs, %d candidates", band, patch, len(paths), len(candidates))


if "snakemake" in globals():
    main(snakemake.input.warps, snakemake.output, snakemake.params.coadd,
         snakemake.params.candidates, snakemake.params.skymap,
         snakemake.params.model_fwhm_arcsec, snakemake.params.kernel_size, snakemake.wildcards.band,
         snakemake.wildcards.patch, snakemake.log[0])
