"""Command-line entry point ``diffim`` (one sub-command per function).

Usage::

    diffim simulate --outdir DIR [--config settings.yaml] [--set key=value ...]

``main`` only parses the arguments, sets up logging and dispatches to the
``cmd_*`` function registered by each ``_add_*_parser``.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from .errors import ConfigError, DiffimError

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
# dispatcher
# --------------------------------------------------------------------------

def build_parser() -> argparse.ArgumentParser:
    """The ``diffim`` argument parser with every sub-command."""
    parser = argparse.ArgumentParser(prog="diffim", description="Difference-image analysis tools.")
    parser.add_argument("-v", "--verbose", action="count", default=0, help="more log output")
    parser.add_argument("-q", "--quiet", action="store_true", help="only warnings and errors")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    _add_simulate_parser(sub)
    return parser


def main(argv=None) -> int:
    """Entry point: parse ``argv`` (default ``sys.argv[1:]``) and run the sub-command."""
    args = build_parser().parse_args(argv)
    level = logging.WARNING if args.quiet else (logging.DEBUG if args.verbose else logging.INFO)
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        return int(args.func(args))
    except DiffimError as exc:
        logger.error("%s", exc)
        return 2


if __name__ == "__main__":
    sys.exit(main())
