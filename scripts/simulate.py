"""Rule `simulate`: write the built-in synthetic dataset (the embedded default)."""

from diffim.runlog import setup_logging
from diffim.simulate import simulate_dataset


def main(outdir, settings, log=None):
    logger = setup_logging(log)
    paths = simulate_dataset(outdir, dict(settings))
    logger.info("simulated dataset in %s: %s", outdir, paths)


if "snakemake" in globals():
    main(snakemake.params.outdir, snakemake.params.settings, snakemake.log[0])
