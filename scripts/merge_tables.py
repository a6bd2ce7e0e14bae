"""Rule `merge_tables`: the contract's dia_sources, visit_status and coadd_inputs."""

import os

import pandas as pd

from diffim.io import read_json, read_table, write_table
from diffim.runlog import setup_logging
from diffim.tables import COADD_INPUTS_SCHEMA, DIA_SOURCE_SCHEMA, VISIT_STATUS_SCHEMA


def visit_status(index: pd.DataFrame, qa_files, diff_status_files) -> pd.DataFrame:
    """One row per input file: failed at indexing, at calexp, at diff, or ok."""
    stages = {}
    for f in qa_files:
        qa = read_json(f)
        stages[(qa["visit"], qa["detector"])] = qa
    for f in diff_status_files:
        st = read_json(f)
        key = (st["visit"], st["detector"])
        if stages.get(key, {}).get("status") == "ok":
            stages[key] = {**stages[key], **{k: st[k] for k in ("status", "reason")},
                           "n_dia_sources": st.get("n_dia_sources", 0)}
    rows = []
    for r in index.itertuples(index=False):
        row = dict(file=r.file, visit=int(r.visit), detector=int(r.detector), band=r.band,
                   status=r.status, reason=r.reason)
        if r.status == "ok":
            st = stages.get((int(r.visit), int(r.detector)))
            if st is None:
                row.update(status="failed", reason="not processed: no calexp status found")
            else:
                row.update(status=st["status"], reason=st.get("reason", ""))
                row["n_dia_sources"] = st.get("n_dia_sources", 0)
        rows.append(row)
    table = pd.DataFrame(rows, columns=VISIT_STATUS_SCHEMA.names + ["n_dia_sources"])
    table["n_dia_sources"] = table["n_dia_sources"].fillna(0).astype("int64")
    return table


def concat(files, schema) -> pd.DataFrame:
    frames = [read_table(f) for f in files if os.path.getsize(f) > 0]
    frames = [f for f in frames if len(f)]
    if not frames:
        return pd.DataFrame({n: pd.Series(dtype=t.to_pandas_dtype()) for n, t in
                             zip(schema.names, schema.types)})
    return pd.concat(frames, ignore_index=True)


def main(inp, out, log=None):
    logger = setup_logging(log)
    status = visit_status(read_table(inp.index), inp.qa, inp.diff_status)
    write_table(out.visit_status, status, schema=VISIT_STATUS_SCHEMA)
    dia = concat(inp.dia_sources, DIA_SOURCE_SCHEMA)
    if len(dia) and dia["diaSourceId"].duplicated().any():
        raise RuntimeError("duplicate diaSourceId in the merged DIASource table")
    write_table(out.dia_sources, dia, schema=DIA_SOURCE_SCHEMA)
    write_table(out.coadd_inputs, concat(inp.coadd_inputs, COADD_INPUTS_SCHEMA),
                schema=COADD_INPUTS_SCHEMA)
    logger.info("%d files (%d failed), %d DIASources", len(status),
                int((status["status"] != "ok").sum()), len(dia))


if "snakemake" in globals():
    main(snakemake.input, snakemake.output, snakemake.log[0])
