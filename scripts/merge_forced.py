"""Rule `merge_forced`: the full light curves, `dia_forced_sources.parquet`."""

import pandas as pd

from diffim.io import read_table, write_table
from diffim.lightcurves import empty_light_curves
from diffim.runlog import setup_logging


def main(files, output, log=None):
    logger = setup_logging(log)
    frames = [t for t in (read_table(f) for f in files) if len(t)]
    table = pd.concat(frames, ignore_index=True) if frames else empty_light_curves()
    table = table.sort_values(["diaObjectId", "midpointMjdTai", "visit"]).reset_index(drop=True)
    write_table(output, table)
    logger.info("%d forced measurements of %d DIAObjects", len(table),
                table["diaObjectId"].nunique() if len(table) else 0)


if "snakemake" in globals():
    main(snakemake.input.forced, snakemake.output.forced, snakemake.log[0])
