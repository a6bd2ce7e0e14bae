"""Checkpoint `skymap`: one sky map for all bands, the model PSF of each band,
the coadd selection of every visit, and which patches each visit overlaps.

``overlaps.parquet`` has one row per (ok visit, detector, patch) with the
band's model PSF FWHM and whether the visit enters that band's coadds.
"""

import numpy as np
import pandas as pd

from diffim.coadd import select_inputs
from diffim.config import resolve_model_fwhm
from diffim.io import atomic_path, read_json, write_table
from diffim.runlog import setup_logging
from diffim.skymap import make_skymap

#: Footprints come from the fitted WCS; this margin (arcsec) only absorbs rounding.
FOOTPRINT_MARGIN_ARCSEC = 2.0


#: Columns of ``overlaps.parquet`` and their types (for the table without rows).
OVERLAP_COLUMNS = {"visit": "int64", "detector": "int64", "band": "str", "patch": "str",
                   "included": "bool", "reason": "str", "fwhm_px": "float64",
                   "model_fwhm_arcsec": "float64", "max_fwhm_arcsec": "float64"}


def load_ok_qa(files) -> pd.DataFrame:
    rows = [read_json(f) for f in files]
    return pd.DataFrame([r for r in rows if r["status"] == "ok"])


def write_empty(out, logger) -> None:
    """No exposure was calibrated: no sky map, no patches, and so no warps, coadds or
    differences; the merged tables still list every file with its reason."""
    logger.error("no exposure was calibrated successfully: no sky map, coadds or difference "
                 "images; visit_status.parquet gives each file's reason")
    write_table(out.overlaps, pd.DataFrame({c: pd.Series(dtype=t)
                                            for c, t in OVERLAP_COLUMNS.items()}))
    with atomic_path(out.skymap) as tmp:
        tmp.write_text('{"patches": null, "reason": "no exposure was calibrated"}\n')


def model_fwhms(qa: pd.DataFrame, coadd_cfg: dict) -> dict:
    """Per band: (model FWHM in arcsec, seeing cut in arcsec).

    Any model FWHM goes: the warps, coadds and templates widen their kernels to
    hold it (:func:`diffim.psf.kernel_size_for`).
    """
    out = {}
    for band, rows in qa.groupby("band"):
        scale = float(np.median(rows["pixel_scale"]))
        model_px, cut_px = resolve_model_fwhm(coadd_cfg, rows["fwhm_px"].to_numpy(), scale)
        out[band] = (model_px * scale, cut_px * scale)
    return out


def overlap_rows(qa, skymap, fwhms, coadd_cfg) -> pd.DataFrame:
    rows = []
    for band, group in qa.groupby("band"):
        model_arcsec, cut_arcsec = fwhms[band]
        scale = group["pixel_scale"].to_numpy()
        visits = pd.DataFrame({"visit": group["visit"], "detector": group["detector"],
                               "band": band, "fwhm_px": group["fwhm_px"],
                               "mjd": group["midpoint_mjd"], "status": "ok"})
        sel = select_inputs(visits, model_fwhm_px=model_arcsec / np.median(scale),
                            max_fwhm_px=cut_arcsec / np.median(scale),
                            mjd_range=coadd_cfg["mjd_range"], visit_list=coadd_cfg["visits"])
        for q, s in zip(group.itertuples(index=False), sel.itertuples(index=False)):
            patches = skymap.patches_overlapping(q.footprint_ra, q.footprint_dec,
                                                 margin_arcsec=FOOTPRINT_MARGIN_ARCSEC)
            for patch in patches:
                rows.append(dict(visit=int(q.visit), detector=int(q.detector), band=band,
                                 patch=patch, included=bool(s.included), reason=s.reason,
                                 fwhm_px=float(q.fwhm_px), model_fwhm_arcsec=model_arcsec,
                                 max_fwhm_arcsec=cut_arcsec))
    return pd.DataFrame(rows, columns=list(OVERLAP_COLUMNS))


def main(qa_files, out, skymap_cfg, coadd_cfg, log=None):
    logger = setup_logging(log)
    qa = load_ok_qa(qa_files)
    if qa.empty:
        write_empty(out, logger)
        return
    scale = skymap_cfg["pixel_scale"] or float(np.median(qa["pixel_scale"]))
    skymap = make_skymap(list(zip(qa["footprint_ra"], qa["footprint_dec"])),
                         pixel_scale_arcsec=scale, patch_inner=skymap_cfg["patch_inner"],
                         patch_border=skymap_cfg["patch_border"],
                         margin_arcsec=FOOTPRINT_MARGIN_ARCSEC)
    fwhms = model_fwhms(qa, coadd_cfg)
    table = overlap_rows(qa, skymap, fwhms, coadd_cfg)
    for band, (model, cut) in fwhms.items():
        logger.info("band %s: model PSF FWHM %.3f arcsec, seeing cut %.3f arcsec", band, model, cut)
    logger.info("sky map: %d patches, %d (visit, detector, patch) overlaps",
                len(skymap.patch_names()), len(table))
    write_table(out.overlaps, table)
    with atomic_path(out.skymap) as tmp:
        tmp.write_text(skymap.to_json())


if "snakemake" in globals():
    main(snakemake.input.qa, snakemake.output, snakemake.params.skymap,
         snakemake.params.coadd, snakemake.log[0])
