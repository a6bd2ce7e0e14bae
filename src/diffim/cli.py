"""Command-line entry point ``diffim`` (one sub-command per function).

Usage::

    diffim simulate --outdir DIR [--config settings.yaml] [--set key=value ...]
    diffim evaluate --outdir DIR [--truth DIR] [--output scores.json]
    diffim subtract SCIENCE.fits REFERENCE.fits --out DIFF.fits [--sources T.parquet]

``main`` only parses the arguments, sets up logging and dispatches to the
``cmd_*`` function registered by each ``_add_*_parser``.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from .errors import ConfigError, DiffimError
from .malloc import retain_freed_memory

logger = logging.getLogger(__name__)


# --------------------------------------------------------------------------
# simulate
# --------------------------------------------------------------------------

def _parse_set(items) -> dict:
    """``["key=value", ...]`` -> dict, values parsed as YAML (numbers, lists, bools)."""
    import yaml

    out = {}
    for item in items or []:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"--set expects key=value, got {item!r}.")
        out[key.strip()] = yaml.safe_load(value)
    return out


def load_simulate_settings(path) -> dict:
    """Simulation settings from a YAML file.

    The file is either a plain settings mapping or a workflow config whose
    ``simulate:`` key holds them (other keys are then ignored).
    """
    import yaml

    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError) as exc:
        raise ConfigError(f"Cannot read the settings file {path}: {exc}") from exc
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"The settings file {path} must hold a YAML mapping.")
    if "simulate" in data:
        data = data["simulate"] or {}
        if not isinstance(data, dict):
            raise ConfigError(f"The 'simulate' key of {path} must be a mapping of settings.")
    return data


def _add_simulate_parser(sub) -> None:
    p = sub.add_parser("simulate", help="write a synthetic dataset (eimages, refcat, truth)",
                       description="Simulate a DIA dataset following CONTRACT.md.")
    p.add_argument("--outdir", required=True, help="output directory of the dataset")
    p.add_argument("--config", help="YAML settings (plain mapping or a workflow config "
                                    "with a 'simulate:' key)")
    p.add_argument("--set", action="append", metavar="KEY=VALUE", default=[],
                   help="override one setting (value parsed as YAML); repeatable")
    p.add_argument("--seed", type=int, help="master random seed")
    p.add_argument("--n-visits", type=int, help="number of visits")
    p.add_argument("--bands", nargs="+", help="bands the visits cycle through")
    p.add_argument("--shape", type=int, nargs=2, metavar=("NY", "NX"), help="detector shape")
    p.add_argument("--n-detectors", type=int, help="detectors per visit")
    p.add_argument("--no-defects", action="store_true", help="no cosmic rays, bad columns, bleeds")
    p.add_argument("--processes", type=int, default=1, help="worker processes (default 1)")
    p.set_defaults(func=cmd_simulate)


def cmd_simulate(args) -> int:
    """Run ``diffim simulate``; returns the exit status."""
    from .simulate import simulate_dataset

    settings = load_simulate_settings(args.config) if args.config else {}
    flags = {"seed": args.seed, "n_visits": args.n_visits, "bands": args.bands,
             "shape": args.shape, "n_detectors": args.n_detectors}
    settings.update({k: v for k, v in flags.items() if v is not None})
    if args.no_defects:
        settings["defects"] = False
    settings.update(_parse_set(args.set))
    paths = simulate_dataset(args.outdir, settings, processes=args.processes)
    logger.info("wrote %d images, refcat %s", len(paths["images"]), paths["refcat"])
    return 0


# --------------------------------------------------------------------------
# evaluate
# --------------------------------------------------------------------------

def _add_evaluate_parser(sub) -> None:
    p = sub.add_parser("evaluate", help="score DIASources of a finished run against truth",
                       description="Score a finished run (completeness, false positives, "
                                   "flux and astrometry) against simulated truth.")
    p.add_argument("--outdir", required=True, help="results directory of a finished run")
    p.add_argument("--truth", help="truth directory (default OUTDIR/sim/truth)")
    p.add_argument("--output", required=True, help="scores JSON file to write")
    p.add_argument("--radius", type=float, default=1.0, help="match radius, arcsec (default 1)")
    p.add_argument("--bright-star-mag", type=float, default=18.0,
                   help="static stars brighter than this (AB) count as bright (default 18)")
    p.add_argument("--bright-star-radius", type=float, default=5.0,
                   help="radius around bright stars, arcsec (default 5)")
    p.set_defaults(func=cmd_evaluate)


def _exposure_truth(exposure, variables, visit, detector, band, mjd):
    """Truth rows of one difference image: positions, observability, forced flux."""
    import numpy as np
    import pandas as pd

    from . import masks
    from .lightcurves import forced_photometry, object_pixels

    objects = variables.rename(columns={"id": "diaObjectId"})
    x, y, inside = object_pixels(exposure.wcs, objects, exposure.shape)
    rows = pd.DataFrame({"visit": visit, "detector": detector, "id": variables["id"].to_numpy(),
                         "covered": inside})
    ix = np.clip(np.round(np.nan_to_num(x)).astype(int), 0, exposure.shape[1] - 1)
    iy = np.clip(np.round(np.nan_to_num(y)).astype(int), 0, exposure.shape[0] - 1)
    no_data = masks.any_set(exposure.mask[iy, ix], "NO_DATA", "NO_TEMPLATE")
    rows["observable"] = inside & ~no_data
    forced = forced_photometry(exposure, objects[rows["observable"].to_numpy()], visit,
                               detector, band, mjd)
    forced = forced.rename(columns={"diaObjectId": "id", "psfFlux": "forcedFlux",
                                    "psfFluxErr": "forcedFluxErr"})
    rows = rows.merge(forced[["id", "forcedFlux", "forcedFluxErr"]], on="id", how="left")
    rows["observable"] &= np.isfinite(rows["forcedFluxErr"].to_numpy(float))
    return rows.assign(noise_njy=rows["forcedFluxErr"])


def evaluation_inputs(outdir: Path, truth_dir: Path):
    """Read a run and its truth; return ``(dia, expected, static, visit_table)``.

    ``expected`` has one row per (visit, variable) with the expected
    difference flux, and ``clean``: the truth model holds there (the
    template has the inputs it assumes, and no other variable is blended).
    """
    import pandas as pd

    from .errors import InputError
    from .evaluate import expected_difference_flux, isolated, restrict_coverage
    from .io import read_exposure, read_json, read_table

    variables = read_table(truth_dir / "variables.parquet")
    diffs, coverage, visit_rows, loo = [], [], [], False
    for status_path in sorted((outdir / "diff").glob("v*-d*.status.json")):
        status = read_json(status_path)
        stem = status_path.name[: -len(".status.json")]
        calexp = read_exposure(outdir / "calexp" / f"{stem}.fits", memmap=True)
        cov = _exposure_truth_coverage(calexp, variables, status["visit"], status["detector"])
        coverage.append(cov)
        if status.get("status") != "ok":
            continue
        loo |= int(status.get("leave_one_out_patches", 0)) > 0
        diff = read_exposure(outdir / "diff" / f"{stem}.fits")
        m = diff.meta
        diffs.append(_exposure_truth(diff, variables, int(m["VISIT"]), int(m["DETECTOR"]),
                                     str(m["BAND"]), float(m["MIDMJD"])))
        qa = read_json(outdir / "calexp" / f"{stem}.qa.json")
        visit_rows.append({"visit": int(m["VISIT"]), "detector": int(m["DETECTOR"]),
                           "band": str(m["BAND"]), "ny": diff.shape[0], "nx": diff.shape[1],
                           "pixel_scale": float(qa["pixel_scale"])})
    if not visit_rows:
        raise InputError(f"{outdir}: no successful difference image to evaluate "
                         "(no diff/*.status.json with status ok).")
    fluxes = read_table(truth_dir / "variable_fluxes.parquet")
    coadd_inputs = read_table(outdir / "coadd_inputs.parquet")
    # the coadd drops inputs pixel by pixel (defects, clipping): where its
    # weight sum around a variable is uniform and only one subset of the
    # inputs adds up to it, the template is the mean over that subset;
    # elsewhere (or where another variable blends in) the expected flux is
    # only approximate, and such rows are scored apart (evaluate.summarise)
    box_sums, fwhm_arcsec = _template_box_sums(outdir, variables)
    coverage, known = restrict_coverage(pd.concat(coverage), box_sums, coadd_inputs)
    expected = expected_difference_flux(fluxes, coadd_inputs, coverage, leave_one_out=loo)
    per_visit = pd.concat(diffs).drop(columns=["covered"])
    expected = per_visit.merge(expected, on=["visit", "id"]).merge(
        variables[["id", "ra", "dec"]], on="id")
    alone = variables[["id"]].assign(
        alone=isolated(variables["ra"], variables["dec"], 2.0 * fwhm_arcsec))
    expected = expected.merge(known, on=["band", "id"], how="left").merge(alone, on="id")
    template_ok = expected.pop("template_known").fillna(False).astype(bool)
    expected["clean"] = template_ok & expected.pop("alone").astype(bool)
    return (read_table(outdir / "dia_sources.parquet"), expected,
            read_table(truth_dir / "static_sources.parquet"), pd.DataFrame(visit_rows))


def _template_box_sums(outdir: Path, variables):
    """``band, id, weight_sum`` (:func:`diffim.evaluate.box_weight_sum`) per coadd band.

    A source counts in the first patch of its band (sorted by name) that
    holds it ``radius`` (the model PSF's FWHM, at least 2 px) inside its
    border; sources in no patch are left out.  Returns the table and the
    largest model-PSF FWHM (arcsec).
    """
    import numpy as np
    import pandas as pd
    from astropy.io import fits

    from .calexp import pixel_scale_arcsec
    from .evaluate import box_weight_sum
    from .io import header_wcs

    rows, fwhm_max = [], 0.0
    for band_dir in sorted(p for p in (outdir / "coadd").glob("*") if p.is_dir()):
        done = np.zeros(len(variables), bool)
        for path in sorted(band_dir.glob("*/coadd.fits")):
            with fits.open(path, memmap=True) as hdul:
                if "WEIGHTSUM" not in hdul:
                    continue
                wcs = header_wcs(hdul["IMAGE"].header, path)
                fwhm = float(hdul[0].header.get("MODELFWH", 0.0))
                fwhm_max = max(fwhm_max, fwhm)
                radius = max(int(np.ceil(fwhm / pixel_scale_arcsec(wcs))), 2)
                ws = np.asarray(hdul["WEIGHTSUM"].data, np.float64)
            x, y = wcs.world_to_pixel_values(variables["ra"].to_numpy(float),
                                             variables["dec"].to_numpy(float))
            ny, nx = ws.shape
            inside = ((x >= radius) & (y >= radius) & (x < nx - radius - 1)
                      & (y < ny - radius - 1) & ~done)
            total = box_weight_sum(ws, x[inside], y[inside], radius=radius)
            rows.append(pd.DataFrame({"band": band_dir.name,
                                      "id": variables["id"].to_numpy()[inside],
                                      "weight_sum": total}))
            done |= inside
    if not rows:
        return pd.DataFrame({"band": pd.Series(dtype=str), "id": pd.Series(dtype=np.int64),
                             "weight_sum": pd.Series(dtype=float)}), fwhm_max
    return pd.concat(rows, ignore_index=True), fwhm_max


def _exposure_truth_coverage(calexp, variables, visit, detector):
    """``visit, id, covered``: which variables fall on a calexp (template coverage)."""
    import pandas as pd

    from .lightcurves import object_pixels

    _, _, inside = object_pixels(calexp.wcs, variables, calexp.shape)
    return pd.DataFrame({"visit": int(visit), "id": variables["id"].to_numpy(),
                         "covered": inside})


def cmd_evaluate(args) -> int:
    """Run ``diffim evaluate``; returns the exit status."""
    from .errors import InputError
    from .evaluate import score
    from .io import write_json

    outdir = Path(args.outdir)
    truth_dir = Path(args.truth) if args.truth else outdir / "sim" / "truth"
    if not (truth_dir / "variable_fluxes.parquet").exists():
        raise InputError(f"No truth tables in {truth_dir}; pass --truth with the simulator's "
                         "truth directory.")
    dia, expected, static, visits = evaluation_inputs(outdir, truth_dir)
    scores = score(dia, expected, static, visits, radius_arcsec=args.radius,
                   bright_star_mag=args.bright_star_mag,
                   bright_star_radius_arcsec=args.bright_star_radius)
    write_json(args.output, scores)
    c = scores["overall"]["completeness"]
    logger.info("completeness %s at S/N >= 10, 50%% at S/N %s; %s false positives per visit",
                c["at_snr_ge"].get("10"), c["snr50"],
                scores["overall"]["false_positives"]["per_visit"])
    return 0


# --------------------------------------------------------------------------
# subtract (one image pair, HOTPANTS-style)
# --------------------------------------------------------------------------

def _add_subtract_parser(sub) -> None:
    p = sub.add_parser("subtract", help="subtract a reference image from a science image and "
                       "detect the changes (same pixel grid)")
    p.add_argument("science", type=Path, help="science image (FITS, sky not subtracted)")
    p.add_argument("reference", type=Path, help="reference image on the same pixel grid")
    p.add_argument("--out", type=Path, required=True,
                   help="difference FITS: IMAGE, MASK, VARIANCE, PSF, SIGNIF extensions")
    p.add_argument("--sources", type=Path, help="DIASource table (Parquet)")
    p.add_argument("--gain", type=float, help="science e-/ADU (default: header GAIN, or 1)")
    p.add_argument("--reference-gain", type=float, help="reference e-/ADU (default: as science)")
    p.add_argument("--read-noise", type=float, default=0.0, help="read noise, electrons")
    p.add_argument("--threshold", type=float, default=5.0, help="detection threshold, sigma")
    p.add_argument("--mode", default="auto",
                   choices=("auto", "convolve_template", "convolve_science"),
                   help="which image is convolved (auto: the sharper one)")
    p.add_argument("--threads", type=int, default=2,
                   help="threads: the two images are characterized in parallel (default 2)")
    p.set_defaults(func=cmd_subtract)


def _gain(header, given) -> float:
    """e-/ADU of pixels read by :func:`diffim.io.read_eimage` (already e- if BUNIT = ADU)."""
    if str(header.get("BUNIT", "")).strip().lower().startswith("adu"):
        return 1.0
    return float(given if given is not None else header.get("GAIN", 1.0))


def cmd_subtract(args) -> int:
    """Run ``diffim subtract``; returns the exit status."""
    if args.threads < 1:
        raise DiffimError(f"--threads must be at least 1, got {args.threads}")
    from astropy.io import fits

    from .io import header_wcs, read_eimage, write_exposure, write_table
    from .pair import subtract_pair

    sci, sci_header = read_eimage(args.science)
    ref, ref_header = read_eimage(args.reference)
    gain = _gain(sci_header, args.gain)
    ref_gain = _gain(ref_header, args.reference_gain if args.reference_gain is not None
                     else args.gain)
    res = subtract_pair(sci, ref, gain=gain, reference_gain=ref_gain,
                        read_noise=args.read_noise, threshold=args.threshold, mode=args.mode,
                        threads=args.threads)
    try:
        wcs = header_wcs(sci_header, args.science)
    except DiffimError:
        wcs = None
    diff = res.difference
    diff.wcs = wcs
    diff.meta.update(MODE=res.subtraction.mode, KSUM=float(res.subtraction.kernel_sum),
                     NOISERAT=float(res.subtraction.noise_ratio))
    write_exposure(args.out, diff, extra_hdus=[fits.ImageHDU(res.significance, name="SIGNIF")])
    if args.sources:
        table = res.sources.copy()
        if wcs is not None:
            table["ra"], table["dec"] = wcs.pixel_to_world_values(table["x"], table["y"])
        write_table(args.sources, table)
    logger.info("%s - %s: mode %s, %d DIASources -> %s", args.science, args.reference,
                res.subtraction.mode, len(res.sources), args.out)
    return 0


# --------------------------------------------------------------------------
# dispatcher
# --------------------------------------------------------------------------

def build_parser() -> argparse.ArgumentParser:
    """The ``diffim`` argument parser with every sub-command."""
    parser = argparse.ArgumentParser(prog="diffim", description="Difference-image analysis tools.")
    parser.add_argument("-v", "--verbose", action="count", default=0, help="more log output")
    parser.add_argument("-q", "--quiet", action="store_true", help="only warnings and errors")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    _add_simulate_parser(sub)
    _add_evaluate_parser(sub)
    _add_subtract_parser(sub)
    return parser


def main(argv=None) -> int:
    """Entry point: parse ``argv`` (default ``sys.argv[1:]``) and run the sub-command."""
    args = build_parser().parse_args(argv)
    level = logging.WARNING if args.quiet else (logging.DEBUG if args.verbose else logging.INFO)
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    retain_freed_memory()
    try:
        return int(args.func(args))
    except DiffimError as exc:
        logger.error("%s", exc)
        return 2


if __name__ == "__main__":
    sys.exit(main())
