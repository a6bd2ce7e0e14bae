"""Rule `exposure_index`: one row per input file, from its header (cached)."""

import os

from diffim.index import INDEX_SCHEMA, build_index, expand_globs
from diffim.io import read_table, write_table
from diffim.runlog import setup_logging


def main(patterns, output, log=None):
    """Index the files matching ``patterns``; headers already read are cached.

    Snakemake removes a job's outputs before it runs, so the header cache is a
    separate, undeclared file next to the index.
    """
    logger = setup_logging(log)
    files = expand_globs(patterns)
    cache = os.path.join(os.path.dirname(output), ".header_cache.parquet")
    previous = read_table(cache) if os.path.exists(cache) else None
    table = build_index(files, previous=previous)
    write_table(cache, table, schema=INDEX_SCHEMA)
    write_table(output, table, schema=INDEX_SCHEMA)
    n_bad = int((table["status"] != "ok").sum())
    logger.info("indexed %d files (%d unusable)", len(table), n_bad)
    for reason in table.loc[table["status"] != "ok", "reason"]:
        logger.warning("%s", reason)


if "snakemake" in globals():
    main(snakemake.params.patterns, snakemake.output.index, snakemake.log[0])
