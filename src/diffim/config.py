"""Semantic checks of the workflow configuration.

The JSON schema (``config/schema.yaml``) checks types, bounds, unknown keys and
fills defaults; :func:`check_config` then checks what a schema cannot: rules
that tie several keys together.  Every message names the key and the fix.
"""

from __future__ import annotations

import os

from .errors import ConfigError
from .index import expand_globs


def check_config(config: dict) -> None:
    """Refuse an inconsistent configuration before any job runs.

    Raises
    ------
    ConfigError
        With a message naming the offending key(s) and how to fix them.
    """
    problems = []
    problems += _check_inputs(config)
    problems += _check_psf(config.get("psf", {}))
    problems += _check_seeing(config.get("coadd", {}))
    problems += _check_simulate(config)
    if problems:
        raise ConfigError("invalid configuration:\n  - " + "\n  - ".join(problems))


def _check_inputs(config) -> list[str]:
    images, refcat = config.get("images"), config.get("refcat")
    if images is None:
        if config.get("simulate") is None:
            return ["neither `images` (glob of input exposures) nor `simulate` (settings of "
                    "the built-in simulator) is set: set one of them"]
        return []
    out = []
    if not expand_globs(images):
        out.append(f"`images` = {images!r} matches no file (relative globs resolve against "
                   f"the working directory {os.getcwd()})")
    if not refcat:
        out.append("`refcat` is required with `images`: set refcat: path/to/refcat.parquet "
                   "(FITS, CSV or Parquet with ra, dec, {band}_mag)")
    elif not os.path.isfile(refcat):
        out.append(f"`refcat` = {refcat!r} does not exist (relative paths resolve against "
                   f"the working directory {os.getcwd()})")
    return out


def _check_psf(psf) -> list[str]:
    size = psf.get("kernel_size", 41)
    if size % 2 == 0:
        return [f"`psf.kernel_size` = {size} must be odd (the PSF is centred on a pixel): "
                f"use {size + 1}"]
    return []


def _check_seeing(coadd) -> list[str]:
    model, cut = coadd.get("model_fwhm", "auto"), coadd.get("max_fwhm")
    if cut is not None and model != "auto" and cut > model:
        unit = coadd.get("fwhm_unit", "arcsec")
        return [f"`coadd.max_fwhm` = {cut} {unit} exceeds `coadd.model_fwhm` = {model} {unit}: "
                f"visits between the two would need their PSF deconvolved to reach the model "
                f"PSF. Set coadd.max_fwhm <= coadd.model_fwhm, or model_fwhm: auto"]
    mjd = coadd.get("mjd_range")
    if mjd is not None and mjd[0] > mjd[1]:
        return [f"`coadd.mjd_range` = {mjd} is empty: give [min, max]"]
    return []


def _check_simulate(config) -> list[str]:
    settings = config.get("simulate")
    if config.get("images") is not None or not settings:
        return []
    from .simulate import DEFAULT_SETTINGS

    unknown = sorted(set(settings) - set(DEFAULT_SETTINGS))
    if unknown:
        return [f"`simulate` has unknown setting(s) {unknown}; known: {sorted(DEFAULT_SETTINGS)}"]
    return []


def resolve_model_fwhm(coadd: dict, fwhms_px, pixel_scale_arcsec: float) -> tuple[float, float]:
    """Model PSF FWHM and seeing cut, both in pixels, for one band.

    ``auto`` takes ``auto_margin`` x the ``auto_percentile``-th percentile of
    the measured FWHMs, and never less than ``max_fwhm``: so
    ``model FWHM >= seeing cut`` holds by construction.
    """
    import numpy as np

    to_px = 1.0 if coadd.get("fwhm_unit", "arcsec") == "pixel" else 1.0 / pixel_scale_arcsec
    cut = coadd.get("max_fwhm")
    cut_px = None if cut is None else cut * to_px
    model = coadd.get("model_fwhm", "auto")
    if model == "auto":
        fwhms = np.asarray(fwhms_px, float)
        fwhms = fwhms[np.isfinite(fwhms)]
        if fwhms.size == 0:
            raise ConfigError("model_fwhm auto: no measured visit FWHM to choose from")
        model_px = float(np.percentile(fwhms, coadd.get("auto_percentile", 75.0))
                         * coadd.get("auto_margin", 1.05))
        if cut_px is not None:
            model_px = max(model_px, cut_px)
    else:
        model_px = float(model) * to_px
    return model_px, (model_px if cut_px is None else cut_px)
