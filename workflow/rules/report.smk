# Stage 5: know how good it is. DIAObjects and forced light curves, the
# per-visit quality table, scoring against truth (when the dataset has it, as
# the simulator's does) and the figures of `snakemake --report report.html`.


rule associate:
    input:
        dia_sources=path("dia_sources.parquet"),
    output:
        objects=path("dia_objects.parquet"),
        membership=path("dia_source_objects.parquet"),
    params:
        radius_arcsec=config["association"]["radius_arcsec"],
    log:
        path("logs", "associate.log"),
    threads: 1
    resources:
        mem_mb=mem(2000),
        runtime=10,
    script:
        "../../scripts/associate.py"


rule forced_photometry:
    input:
        diff=path("diff", "v{visit}-d{detector}.fits"),
        status=path("diff", "v{visit}-d{detector}.status.json"),
        objects=path("dia_objects.parquet"),
    output:
        forced=path("forced", "v{visit}-d{detector}.parquet"),
    log:
        path("logs", "forced", "v{visit}-d{detector}.log"),
    threads: 1
    resources:
        mem_mb=mem(2000),
        runtime=10,
    script:
        "../../scripts/forced_photometry.py"


rule merge_forced:
    input:
        forced=lambda wc: [path("forced", f"v{v}-d{d}.parquet") for v, d in ok_visit_pairs()],
    output:
        forced=path("dia_forced_sources.parquet"),
    log:
        path("logs", "merge_forced.log"),
    threads: 1
    resources:
        mem_mb=mem(2000),
        runtime=10,
    script:
        "../../scripts/merge_forced.py"


rule visit_quality:
    input:
        qa=calexp_qa_files,
        visit_status=path("visit_status.parquet"),
        coadd_inputs=path("coadd_inputs.parquet"),
        diff_status=lambda wc: [path("diff", f"v{v}-d{d}.status.json") for v, d in ok_visit_pairs()],
    output:
        table=path("visit_quality.parquet"),
        html=report(path("report", "visit_table.html"), category="1. Visits",
                    caption="../../report/visit_table.rst"),
        plot=report(path("report", "visit_quality.png"), category="1. Visits",
                    caption="../../report/visit_quality.rst"),
    log:
        path("logs", "visit_quality.log"),
    threads: 1
    resources:
        mem_mb=mem(1000),
        runtime=10,
    script:
        "../../scripts/visit_quality.py"


rule report_images:
    input:
        coadds=lambda wc: coadd_targets("coadd.fits"),
        dia_sources=path("dia_sources.parquet"),
        forced=path("dia_forced_sources.parquet"),
        objects=path("dia_objects.parquet"),
        diffs=lambda wc: [path("diff", f"v{v}-d{d}.fits") for v, d in ok_visit_pairs()],
        calexps=lambda wc: [path("calexp", f"v{v}-d{d}.fits") for v, d in ok_visit_pairs()],
    output:
        coadd=report(path("report", "coadds.png"), category="2. Coadds",
                     caption="../../report/coadds.rst"),
        brightest=report(path("report", "cutouts_brightest.png"), category="3. DIASources",
                         caption="../../report/cutouts_brightest.rst"),
        random=report(path("report", "cutouts_random.png"), category="3. DIASources",
                      caption="../../report/cutouts_random.rst"),
        light_curves=report(path("report", "light_curves.png"), category="4. Light curves",
                            caption="../../report/light_curves.rst"),
    params:
        n_cutouts=config["report"]["n_cutouts"],
        seed=config["report"]["seed"],
        n_light_curves=config["association"]["n_light_curves"],
    log:
        path("logs", "report_images.log"),
    threads: 1
    resources:
        mem_mb=mem(3000),
        runtime=10,
    script:
        "../../scripts/report_images.py"


rule evaluate:
    input:
        dia_sources=path("dia_sources.parquet"),
        coadd_inputs=path("coadd_inputs.parquet"),
        dataset=path("sim", "dataset.yaml"),
        diffs=lambda wc: [path("diff", f"v{v}-d{d}.fits") for v, d in ok_visit_pairs()],
    output:
        scores=path("evaluation", "scores.json"),
        completeness=report(path("evaluation", "completeness.png"), category="5. Scores",
                            caption="../../report/completeness.rst"),
        pull=report(path("evaluation", "flux_pull.png"), category="5. Scores",
                    caption="../../report/flux_pull.rst"),
        false_positives=report(path("evaluation", "false_positives.png"), category="5. Scores",
                               caption="../../report/false_positives.rst"),
    params:
        outdir=OUT,
        truth=path("sim", "truth"),
    log:
        path("logs", "evaluate.log"),
    threads: 1
    resources:
        mem_mb=mem(3000),
        runtime=20,
    script:
        "../../scripts/evaluate.py"
