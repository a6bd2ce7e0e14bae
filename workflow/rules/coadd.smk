# Stage 2: one sky map for all bands (a checkpoint: the patches a visit
# touches are known only once every calexp's WCS is fitted), per-visit
# PSF-matched warps, and one coadd per (band, patch).


checkpoint skymap:
    input:
        qa=calexp_qa_files,
    output:
        skymap=path("skymap", "skymap.json"),
        overlaps=path("skymap", "overlaps.parquet"),
    params:
        skymap=config["skymap"],
        coadd=config["coadd"],
    log:
        path("logs", "skymap.log"),
    threads: 1
    resources:
        mem_mb=mem(1000),
        runtime=10,
    script:
        "../../scripts/skymap.py"


def _warp_output(name):
    target = path("warp", "{band}", "{patch}", name)
    return target if config["coadd"]["keep_warps"] else temp(target)


rule warp:
    input:
        calexp=path("calexp", "v{visit}-d{detector}.fits"),
        # params read the sky map checkpoint; on a cluster they need it as an input.
        # ancient(): its new timestamp after a rebuild must not redo every job.
        skymap_done=ancient(path("skymap", "skymap.json")),
    output:
        warp=_warp_output("v{visit}-d{detector}.fits"),
    params:
        skymap=skymap_json,
        model_fwhm_arcsec=band_model_fwhm,
    log:
        path("logs", "warp", "{band}", "{patch}", "v{visit}-d{detector}.log"),
    benchmark:
        path("benchmarks", "warp", "{band}", "{patch}", "v{visit}-d{detector}.tsv")
    threads: 1
    resources:
        mem_mb=mem(3000),
        runtime=20,
    script:
        "../../scripts/warp.py"


def coadd_warps(wildcards):
    return [path("warp", wildcards.band, wildcards.patch, f"v{r.visit}-d{r.detector}.fits")
            for r in patch_overlaps(wildcards.band, wildcards.patch) if r.included]


def coadd_candidates(wildcards):
    """Every visit overlapping the patch in the band, with its selection verdict."""
    return [dict(visit=r.visit, detector=r.detector, included=r.included, reason=str(r.reason))
            for r in patch_overlaps(wildcards.band, wildcards.patch)]


rule coadd:
    input:
        warps=coadd_warps,
        # params read the sky map checkpoint; on a cluster they need it as an input.
        # ancient(): its new timestamp after a rebuild must not redo every job.
        skymap_done=ancient(path("skymap", "skymap.json")),
    output:
        coadd=path("coadd", "{band}", "{patch}", "coadd.fits"),
        inputs=path("coadd", "{band}", "{patch}", "coadd_inputs.parquet"),
    params:
        coadd=config["coadd"],
        candidates=coadd_candidates,
        skymap=skymap_json,
        model_fwhm_arcsec=band_model_fwhm,
        kernel_size=config["psf"]["kernel_size"],
    log:
        path("logs", "coadd", "{band}", "{patch}.log"),
    benchmark:
        path("benchmarks", "coadd", "{band}", "{patch}.tsv")
    threads: 1
    resources:
        mem_mb=mem(3000),
        runtime=30,
    script:
        "../../scripts/coadd.py"
