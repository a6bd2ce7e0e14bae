"""Rule `forced_photometry`: PSF photometry at every DIAObject on one difference image."""

from diffim.io import (read_exposure, read_extension, read_json, read_optional_extension,
                       read_table, write_table)
from diffim.lightcurves import empty_light_curves, forced_photometry
from diffim.noisescale import BlockMap
from diffim.runlog import setup_logging


def main(diff_path, status_path, objects_path, output, log=None):
    logger = setup_logging(log)
    status = read_json(status_path)
    if status["status"] != "ok":
        logger.info("no difference image (%s): empty light-curve table", status["reason"])
        write_table(output, empty_light_curves())
        return
    diff = read_exposure(diff_path)
    m = diff.meta
    stored = read_optional_extension(diff_path, "TSHARE")  # the template's variance share
    share = None if stored is None else BlockMap(stored[0], int(stored[1]["SHAREBIN"]))
    scene = read_extension(diff_path, "TEMPLATE")
    own = read_optional_extension(diff_path, "OWNSHARE")  # the full coadd as template
    if own is not None:
        scene = (1.0 - own[0]) * scene
    table = forced_photometry(diff, read_table(objects_path), int(m["VISIT"]), int(m["DETECTOR"]),
                              str(m["BAND"]), float(m["MIDMJD"]), scene=scene,
                              template_share=share)
    write_table(output, table)
    logger.info("forced photometry of %d DIAObjects on visit %s", len(table), m["VISIT"])


if "snakemake" in globals():
    main(snakemake.input.diff, snakemake.input.status, snakemake.input.objects,
         snakemake.output.forced, snakemake.log[0])
