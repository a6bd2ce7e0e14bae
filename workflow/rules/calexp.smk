# Stage 1: calibrated exposure per (visit, detector), like processEimage.py.
# Always writes its three outputs; a visit that cannot be calibrated gets a
# failed status in its QA record and is skipped downstream.


rule calexp:
    input:
        image=exposure_file,
        refcat=REFCAT,
    output:
        calexp=path("calexp", "v{visit}-d{detector}.fits"),
        sources=path("calexp", "v{visit}-d{detector}.sources.parquet"),
        qa=path("calexp", "v{visit}-d{detector}.qa.json"),
    params:
        psf=config["psf"],
        calexp=config["calexp"],
    log:
        path("logs", "calexp", "v{visit}-d{detector}.log"),
    benchmark:
        path("benchmarks", "calexp", "v{visit}-d{detector}.tsv")
    threads: 1
    resources:
        mem_mb=mem(2000),
        runtime=20,
    script:
        "../../scripts/calexp.py"
