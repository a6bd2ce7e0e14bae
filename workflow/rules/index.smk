# Stage 0: the input exposures. Simulated when `images` is not given, then
# indexed from their headers (one cached table; a checkpoint, so the DAG is
# re-evaluated once after it, not once per visit).


rule simulate:
    output:
        dataset=path("sim", "dataset.yaml"),
        refcat=path("sim", "refcat.parquet"),
    params:
        settings=config["simulate"] or {},
        outdir=path("sim"),
    log:
        path("logs", "simulate.log"),
    benchmark:
        path("benchmarks", "simulate.tsv")
    threads: 1
    resources:
        mem_mb=mem(4000),
        runtime=60,
    script:
        "../../scripts/simulate.py"


checkpoint exposure_index:
    input:
        images=[] if SIMULATE else expand_globs(config["images"]),
        dataset=[path("sim", "dataset.yaml")] if SIMULATE else [],
    output:
        index=path("index", "exposures.parquet"),
    params:
        patterns=[path("sim", "images", "*.fits")] if SIMULATE else config["images"],
    log:
        path("logs", "exposure_index.log"),
    threads: 1
    resources:
        mem_mb=mem(1000),
        runtime=30,
    script:
        "../../scripts/exposure_index.py"
