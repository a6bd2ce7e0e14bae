# Stage 3: per (visit, detector), the coadd resampled into the visit frame is
# subtracted and DIASources are detected and measured. Always writes its
# outputs; a visit without a template gets a failed status, not a crash.


def _visit_rows(wildcards):
    return visit_overlaps(wildcards.visit, wildcards.detector)


def diff_coadds(wildcards):
    return [path("coadd", r.band, r.patch, "coadd.fits") for r in _visit_rows(wildcards)]


def diff_coadd_inputs(wildcards):
    return [path("coadd", r.band, r.patch, "coadd_inputs.parquet") for r in _visit_rows(wildcards)]


def diff_own_warps(wildcards):
    """The visit's own warps: removed from its template (leave-one-out), or their share of it."""
    return [path("warp", r.band, r.patch, f"v{wildcards.visit}-d{wildcards.detector}.fits")
            for r in _visit_rows(wildcards) if r.included]


rule diff:
    input:
        calexp=path("calexp", "v{visit}-d{detector}.fits"),
        coadds=diff_coadds,
        # params read the sky map checkpoint; on a cluster they need it as an input.
        # ancient(): its new timestamp after a rebuild must not redo every job.
        skymap_done=ancient(path("skymap", "skymap.json")),
        coadd_inputs=diff_coadd_inputs,
        own_warps=diff_own_warps,
    output:
        diff=path("diff", "v{visit}-d{detector}.fits"),
        sources=path("diff", "v{visit}-d{detector}.dia_sources.parquet"),
        status=path("diff", "v{visit}-d{detector}.status.json"),
        regions=path("diff", "v{visit}-d{detector}.reg"),
    params:
        diff=config["diff"],
        skymap=skymap_json,
        patches=lambda wc: [r.patch for r in _visit_rows(wc)],
    log:
        path("logs", "diff", "v{visit}-d{detector}.log"),
    benchmark:
        path("benchmarks", "diff", "v{visit}-d{detector}.tsv")
    threads: 1
    resources:
        mem_mb=mem(3000),
        runtime=30,
    script:
        "../../scripts/diff.py"
