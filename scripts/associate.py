"""Rule `associate`: DIASources across visits and bands -> DIAObjects."""

from diffim.associate import associate
from diffim.io import read_table, write_table
from diffim.runlog import setup_logging


def main(dia_path, out, radius_arcsec, log=None):
    logger = setup_logging(log)
    dia = read_table(dia_path)
    members, objects = associate(dia, radius_arcsec=radius_arcsec)
    write_table(out.objects, objects)
    write_table(out.membership, members[["diaSourceId", "diaObjectId"]])
    logger.info("%d DIASources -> %d DIAObjects (radius %.2f arcsec)", len(dia), len(objects),
                radius_arcsec)


if "snakemake" in globals():
    main(snakemake.input.dia_sources, snakemake.output, snakemake.params.radius_arcsec,
         snakemake.log[0])
