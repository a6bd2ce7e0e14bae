"""Rule `diff`: subtract the template from one (visit, detector) and find DIASources.

The template is the band's coadd patches without this visit's own
contribution, resampled into the visit's frame.  With ``diff.leave_one_out:
false`` the difference is then scaled to the full coadd's
(:func:`diffim.subtract.with_own_share`).
Always writes its three outputs; a visit without template coverage gets a
failed status with the reason and an empty DIASource table.
"""

import traceback
from dataclasses import replace

import numpy as np
import pandas as pd
from astropy.io import fits

from diffim.artifacts import unresolved_artifacts
from diffim.detect import detect_dia_sources, noise_terms, significance_maps
from diffim.errors import DiffimError, InputError, NoOverlapError
from diffim.io import (atomic_path, read_exposure, read_planes, read_table, read_warp,
                       write_ds9_regions, write_exposure, write_json, write_table)
from diffim.psf import kernel_size_for
from diffim.psfmatch import to_njy
from diffim.register import header_cards as registration_cards
from diffim.register import registered_wcs
from diffim.runlog import setup_logging
from diffim.skymap import SkyMap
from diffim.subtract import SHARE_BIN, subtract_images, with_own_share
from diffim.tables import DIA_SOURCE_SCHEMA, dia_source_ids
from diffim.template import (own_weight_share, remove_own_contribution, stitch_template,
                             template_box, template_psf)


def load_patch(coadd_path, inputs_path, own_warp, visit, detector, patch_shape, box,
               with_share):
    """The part ``box`` of one coadd patch without the visit's own contribution, and its share.

    Returns ``(patch, removed, share)``: ``patch`` covers ``box`` (patch
    pixels ``(slice_y, slice_x)``, the region the visit's template needs);
    ``share`` is the visit's share of the coadd's weight per pixel there when
    ``with_share`` (None where the visit is not in the coadd, or not asked).
    """
    coadd = read_exposure(coadd_path, box=box)
    if own_warp is None:
        return coadd, False, None
    inputs = read_table(inputs_path)
    row = inputs[(inputs["visit"] == visit) & (inputs["detector"] == detector) & inputs["included"]]
    if row.empty:
        return coadd, False, None
    planes = read_planes(coadd_path, ("WEIGHTSUM", "CLIPCEN", "CLIPCVAR"), box=box)
    if "WEIGHTSUM" not in planes:
        raise InputError(f"{coadd_path}: no WEIGHTSUM extension")
    weight_sum = planes["WEIGHTSUM"].astype(np.float64)
    clip = {}
    if "CLIPCEN" in planes:  # a sigma-clipped coadd: its last clipping centre
        clip = dict(clip_centre=planes["CLIPCEN"].astype(np.float32),
                    clip_centre_variance=planes["CLIPCVAR"].astype(np.float32),
                    clip_sigma=float(coadd.meta["CLIPSIG"]),
                    clip_rel=float(coadd.meta.get("CLIPREL", 0.0)))
    warp = read_warp(own_warp, patch_shape, box=box)
    weight = float(row["weight"].iloc[0])
    share = own_weight_share(coadd, weight_sum, warp, weight, **clip) if with_share else None
    return remove_own_contribution(coadd, weight_sum, warp, weight, **clip), True, share


def own_share_in_frame(patches, shares, wcs, shape, psf):
    """The visit's share of the template's weight, resampled into its frame (0 where none)."""
    planes = [replace(p, image=s if s is not None else np.zeros(p.shape, np.float32),
                      variance=np.ones(p.shape, np.float32))
              for p, s in zip(patches, shares)]
    share = stitch_template(planes, wcs, shape, psf).image
    return np.clip(np.nan_to_num(share, nan=0.0), 0.0, 1.0)


def dia_table(sources, calexp, visit, detector):
    meta = calexp.meta
    out = sources.copy()
    ra, dec = calexp.wcs.pixel_to_world_values(out["x"].to_numpy(), out["y"].to_numpy())
    out.insert(0, "diaSourceId", dia_source_ids(visit, detector, len(out)))
    out["visit"], out["detector"], out["band"] = visit, detector, meta["BAND"]
    out["midpointMjdTai"] = float(meta["MIDMJD"])
    out["ra"], out["dec"] = np.asarray(ra, float), np.asarray(dec, float)
    return out


def main(inp, out, params, wildcards, log=None):
    logger = setup_logging(log)
    visit, detector = int(wildcards["visit"]), int(wildcards["detector"])
    cfg = params.diff
    calexp = read_exposure(inp.calexp)
    try:
        skymap = SkyMap.from_json(params.skymap)
        own = {w.split("/")[-2]: w for w in inp.own_warps}
        patches, shares, n_loo = [], [], 0
        for coadd_path, inputs_path, patch in zip(inp.coadds, inp.coadd_inputs, params.patches):
            box = template_box(calexp.wcs, calexp.shape, skymap.patch_wcs(patch),
                               skymap.patch_shape(patch))
            if box is None:  # the sky map's overlap test is looser than the footprint
                continue
            exp, loo, share = load_patch(coadd_path, inputs_path, own.get(patch), visit,
                                         detector, skymap.patch_shape(patch), box,
                                         with_share=not cfg["leave_one_out"])
            if exp.meta.get("NINPUTS", 0) > 0:
                patches.append(exp)
                shares.append(share)
                n_loo += loo
        if not patches:
            raise NoOverlapError(f"visit {visit} detector {detector}: no coadd of band "
                                 f"{calexp.meta['BAND']} with any input covers it (see coadd_inputs)")
        science = to_njy(calexp)
        # the model PSF may need a larger kernel than this visit's PSF: both get the larger
        size = kernel_size_for(patches[0].meta["MODELFWH"] / calexp.meta["PIXSCALE"],
                               calexp.psf.kernel_size)
        science = replace(science, psf=science.psf.padded(size))
        psf = template_psf(patches[0].meta["MODELFWH"], calexp.meta["PIXSCALE"], size,
                           calexp.shape)
        template = stitch_template(patches, calexp.wcs, calexp.shape, psf)
        field, registered = None, False
        if cfg["register"]:
            wcs, field = registered_wcs(science, template)
            if wcs is not None:  # the template again, on the science image's stars
                template = stitch_template(patches, wcs, calexp.shape, psf)
                science, calexp = replace(science, wcs=wcs), replace(calexp, wcs=wcs)
                registered = True
        result = subtract_images(science, template, mode=cfg["mode"],
                                 kernel_spatial_order=cfg["kernel_spatial_order"],
                                 background_order=cfg["background_order"],
                                 decorrelate=cfg["decorrelate"])
        own_share, scene = None, template.image
        if not cfg["leave_one_out"] and n_loo:
            # the full coadd as template: (1 - a) x the leave-one-out difference, and so
            # the static light that residuals scale with
            own_share = own_share_in_frame(patches, shares, calexp.wcs, calexp.shape, psf)
            result = replace(result, difference=with_own_share(result.difference, own_share))
            scene = (1.0 - own_share) * template.image
            n_loo = 0
        noise = noise_terms(result.difference, scene, template_share=result.share_map)
        significance = significance_maps(result.difference, noise, scene)
        sources = detect_dia_sources(result.difference, threshold=cfg["detect_threshold"],
                                     noise=noise, significance=significance)
        n_unresolved = 0
        if cfg["reject_unresolved"]:
            unresolved = unresolved_artifacts(sources, science, template.image,
                                              template.variance)
            sources = sources[~unresolved].reset_index(drop=True)
            n_unresolved = int(unresolved.sum())
    except Exception as exc:
        reason = str(exc) if isinstance(exc, DiffimError) else \
            f"internal error in diff ({type(exc).__name__}: {exc})"
        logger.error("diff failed: %s\n%s", reason, traceback.format_exc())
        write_failed(out, visit, detector, reason)
        return
    table = dia_table(sources, calexp, visit, detector)
    diff = result.difference
    diff.meta.update({k: calexp.meta[k] for k in ("VISIT", "DETECTOR", "BAND", "MIDMJD")})
    reg_cards = registration_cards(field, registered)
    diff.meta.update(MODE=result.mode, KSUM=float(result.kernel_sum), NLOO=n_loo,
                     **noise.systematics.header_cards(),
                     **reg_cards,
                     **significance.local_scale.header_cards())
    # the template in the visit frame, for cutouts and for users checking a detection
    template_hdu = fits.ImageHDU(template.image, name="TEMPLATE")
    template_hdu.header["BUNIT"] = "nJy"
    extra = [template_hdu]
    if result.template_share is not None:  # for the local noise scale of forced photometry
        share_hdu = fits.ImageHDU(result.template_share, name="TSHARE")
        share_hdu.header["SHAREBIN"] = (SHARE_BIN, "pixels per block side")
        share_hdu.header["COMMENT"] = "template share of the per-pixel variance, 0-1"
        extra.append(share_hdu)
    if own_share is not None:  # diff.leave_one_out: false
        own_hdu = fits.ImageHDU(own_share.astype(np.float32), name="OWNSHARE")
        own_hdu.header["COMMENT"] = ("the visit's share a of the coadd's weight; IMAGE is (1 - a) x "
                                     "(science - matched TEMPLATE), TEMPLATE without the visit")
        extra.append(own_hdu)
    write_exposure(out.diff, diff, extra_hdus=extra)
    write_table(out.sources, table, schema=DIA_SOURCE_SCHEMA)
    write_ds9_regions(out.regions, table)
    write_json(out.status, {"status": "ok", "reason": "", "visit": visit, "detector": detector,
                            "n_dia_sources": len(table), "mode": result.mode,
                            "kernel_sum": float(result.kernel_sum),
                            "noise_ratio": float(result.noise_ratio),
                            "scale_error": noise.systematics.scale_error,
                            "shift_error": noise.systematics.shift_error,
                            "wing_error": noise.systematics.wing_error,
                            "width_error": noise.systematics.width_error,
                            "shear_error": noise.systematics.shear_error,
                            "flux_factor": noise.systematics.flux_factor,
                            "registration_applied": registered,
                            "registration_pairs": reg_cards["REGNPAIR"],
                            "registration_rms_px": reg_cards["REGRMS"],
                            "registration_max_px": reg_cards["REGMAX"],
                            "leave_one_out_patches": n_loo,
                            "own_share_max": (0.0 if own_share is None
                                              else float(np.max(own_share))),
                            "n_unresolved_rejected": n_unresolved})
    logger.info("diff v%d d%d: mode %s, %d DIASources", visit, detector, result.mode, len(table))


def write_failed(out, visit, detector, reason):
    hdu = fits.PrimaryHDU()
    hdu.header["VISIT"], hdu.header["DETECTOR"] = visit, detector
    hdu.header["STATUS"] = "failed"
    hdu.header["REASON"] = reason
    with atomic_path(out.diff) as tmp:
        hdu.writeto(tmp)
    empty = pd.DataFrame({n: pd.Series(dtype=t.to_pandas_dtype())
                          for n, t in zip(DIA_SOURCE_SCHEMA.names, DIA_SOURCE_SCHEMA.types)})
    write_table(out.sources, empty, schema=DIA_SOURCE_SCHEMA)
    write_ds9_regions(out.regions, empty)
    write_json(out.status, {"status": "failed", "reason": reason, "visit": visit,
                            "detector": detector, "n_dia_sources": 0})


if "snakemake" in globals():
    main(snakemake.input, snakemake.output, snakemake.params, dict(snakemake.wildcards),
         snakemake.log[0])
