# Stage 4: the contract's merged tables.


def ok_visit_pairs():
    return list(overlap_lookup()[0])


def coadd_targets(name):
    return [path("coadd", b, p, name) for b, p in overlap_lookup()[1]]


rule merge_tables:
    input:
        index=path("index", "exposures.parquet"),
        overlaps=path("skymap", "overlaps.parquet"),
        qa=calexp_qa_files,
        diff_status=lambda wc: [path("diff", f"v{v}-d{d}.status.json") for v, d in ok_visit_pairs()],
        dia_sources=lambda wc: [path("diff", f"v{v}-d{d}.dia_sources.parquet") for v, d in ok_visit_pairs()],
        coadd_inputs=lambda wc: coadd_targets("coadd_inputs.parquet"),
    output:
        dia_sources=path("dia_sources.parquet"),
        visit_status=path("visit_status.parquet"),
        coadd_inputs=path("coadd_inputs.parquet"),
    log:
        path("logs", "merge_tables.log"),
    threads: 1
    resources:
        mem_mb=mem(2000),
        runtime=10,
    script:
        "../../scripts/merge_tables.py"
