"""Rule `evaluate`: score the DIASources against the simulator's truth."""

from pathlib import Path

from diffim.cli import evaluation_inputs
from diffim.evaluate import evaluate_detections, score
from diffim.io import atomic_path, write_json
from diffim.plots import plot_completeness, plot_false_positives, plot_flux_pull
from diffim.runlog import setup_logging


def save(fig, path):
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=80)


def main(outdir, truth, out, log=None):
    logger = setup_logging(log)
    dia, expected, static, visits = evaluation_inputs(Path(outdir), Path(truth))
    scores = score(dia, expected, static, visits)
    write_json(out.scores, scores)
    keep = set(visits["visit"])
    truth_rows, labelled = evaluate_detections(dia[dia["visit"].isin(keep)],
                                               expected[expected["visit"].isin(keep)], static)
    save(plot_completeness(truth_rows), out.completeness)
    save(plot_flux_pull(truth_rows), out.pull)
    save(plot_false_positives(labelled, visits), out.false_positives)
    c = scores["overall"]["completeness"]
    logger.info("completeness at S/N>=10: %s; 50%% at S/N %s; false positives per visit: %s",
                c["at_snr_ge"].get("10"), c["snr50"],
                scores["overall"]["false_positives"]["per_visit"])


if "snakemake" in globals():
    main(snakemake.params.outdir, snakemake.params.truth, snakemake.output, snakemake.log[0])
