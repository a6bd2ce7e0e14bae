"""Rule `warp`: PSF-match one calexp to the band's model PSF and warp it to a patch.

Always writes the warp.  When the visit cannot be matched (its PSF is broader
than the model PSF somewhere on the detector) or does not reach the patch,
the file holds only a header with ``INCLUDED = F`` and ``REASON``; the coadd
records that reason in ``coadd_inputs``.
"""

import traceback

from astropy.io import fits

from diffim.errors import DiffimError
from diffim.io import atomic_path, read_exposure, write_exposure
from diffim.psfmatch import has_data, make_warp
from diffim.runlog import setup_logging
from diffim.skymap import SkyMap


def main(calexp_path, warp_path, skymap_text, model_fwhm_arcsec, patch, log=None):
    logger = setup_logging(log)
    skymap = SkyMap.from_json(skymap_text)
    calexp = read_exposure(calexp_path)
    try:
        warp = make_warp(calexp, model_fwhm_arcsec, skymap.patch_wcs(patch),
                         skymap.patch_shape(patch))
        if not has_data(warp):
            raise DiffimError("no usable pixel of the exposure falls in this patch")
    except DiffimError as exc:
        logger.warning("warp of %s into patch %s left out: %s", calexp_path, patch, exc)
        write_excluded(warp_path, calexp.meta, str(exc))
        return
    except Exception as exc:
        logger.error("%s", traceback.format_exc())
        write_excluded(warp_path, calexp.meta, f"internal error in warp ({type(exc).__name__}: {exc})")
        return
    warp.meta["INCLUDED"] = True
    write_exposure(warp_path, warp)
    logger.info("warp %s -> patch %s: box %s, %d good pixels", calexp_path, patch,
                warp.shape, warp.meta["NGOOD"])


def write_excluded(path, meta, reason):
    hdu = fits.PrimaryHDU()
    for key in ("VISIT", "DETECTOR", "BAND"):
        hdu.header[key] = meta.get(key, "")
    hdu.header["INCLUDED"] = False
    hdu.header["REASON"] = reason  # long strings use CONTINUE cards
    with atomic_path(path) as tmp:
        hdu.writeto(tmp)


if "snakemake" in globals():
    main(snakemake.input.calexp, snakemake.output.warp, snakemake.params.skymap,
         snakemake.params.model_fwhm_arcsec, snakemake.wildcards.patch, snakemake.log[0])
