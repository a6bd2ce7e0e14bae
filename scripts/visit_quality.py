"""Rule `visit_quality`: the per-visit table and plot of the report."""

import pandas as pd

from diffim.io import atomic_path, read_json, read_table, write_table
from diffim.plots import plot_visit_quality
from diffim.runlog import setup_logging

QA_COLUMNS = ["visit", "detector", "band", "midpoint_mjd", "fwhm_arcsec", "zeropoint",
              "astrometry_rms_arcsec", "astrometry_n_stars", "psf_n_stars", "zeropoint_n_stars",
              "sky_electrons"]


def quality_table(qa_files, status, coadd_inputs, diff_status_files) -> pd.DataFrame:
    qa = pd.DataFrame([read_json(f) for f in qa_files])
    qa = qa.reindex(columns=QA_COLUMNS)
    diff = pd.DataFrame([read_json(f) for f in diff_status_files],
                        columns=["visit", "detector", "noise_ratio", "mode"])
    coadd = (coadd_inputs.groupby(["visit", "detector"])
             .agg(in_coadd=("included", "any"),
                  coadd_reason=("reason", lambda r: "; ".join(sorted({x for x in r if x}))))
             .reset_index())
    table = status.merge(qa.drop(columns=["band"]), on=["visit", "detector"], how="left")
    table = table.merge(coadd, on=["visit", "detector"], how="left")
    table = table.merge(diff, on=["visit", "detector"], how="left")
    return table.sort_values(["visit", "detector"]).reset_index(drop=True)


def main(inp, out, log=None):
    logger = setup_logging(log)
    table = quality_table(inp.qa, read_table(inp.visit_status), read_table(inp.coadd_inputs),
                          inp.diff_status)
    write_table(out.table, table)
    with atomic_path(out.html) as tmp:
        tmp.write_text(table.to_html(index=False, float_format=lambda v: f"{v:.3f}",
                                     na_rep="", classes="visit-table", border=0))
    fig = plot_visit_quality(table)
    with atomic_path(out.plot) as tmp:
        fig.savefig(tmp, format="png", dpi=90)
    logger.info("visit quality table: %d rows", len(table))


if "snakemake" in globals():
    main(snakemake.input, snakemake.output, snakemake.log[0])
