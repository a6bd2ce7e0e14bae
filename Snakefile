# diffim: difference-image analysis, from eimages to DIASources.
#
#   eimages --index--> calexps --skymap--> PSF-matched warps --> coadds
#           --> difference images + DIASources --> merged tables
#
# This file only wires the stages; each lives in workflow/rules/<stage>.smk.
import os

from snakemake.utils import min_version

min_version("9.0")


configfile: os.path.join(workflow.basedir, "config", "config.yaml")


report: "report/workflow.rst"


include: "workflow/rules/common.smk"
include: "workflow/rules/index.smk"
include: "workflow/rules/calexp.smk"
include: "workflow/rules/coadd.smk"
include: "workflow/rules/diff.smk"
include: "workflow/rules/merge.smk"
include: "workflow/rules/report.smk"


rule all:
    input:
        final_products(),
    default_target: True
