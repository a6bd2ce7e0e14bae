"""Stand-alone difference imaging of one image pair (the HOTPANTS use case).

:func:`subtract_pair` takes two raw images on the same pixel grid -- a
science image and a reference -- and runs the same library steps as the
workflow's ``calexp`` and ``diff`` rules, without astrometry or photometric
calibration: sky, variance, defects and a PSF model for each
(:func:`diffim.calexp.characterize`), then PSF matching and subtraction
(:func:`diffim.subtract.subtract_images`, the convolution direction chosen
per pair so that nothing is deconvolved) and detection and measurement
(:mod:`diffim.detect`).

Units: inputs in ADU with the sky *not* subtracted and ``gain`` electrons per
ADU; outputs in the science image's ADU (``DIFF = SCIENCE - matched
REFERENCE``, a brightening is positive).  Pixel convention as everywhere in
diffim: arrays ``[y, x]``, ``(0, 0)`` is the centre of the first pixel.
"""

from __future__ import annotations

import logging
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace

import numpy as np
import pandas as pd

from . import detect
from .calexp import CalexpConfig, Characterization, characterize
from .exposure import Exposure
from .subtract import SubtractionResult, subtract_images

logger = logging.getLogger(__name__)

#: Detection threshold (sigma) of the sources offered to the PSF fit: the
#: faintest PSF stars have S/N 15 (:data:`diffim.calexp.PSF_STAR_TIERS`), and
#: without astrometry nothing fainter is needed (a 5-sigma pass finds 7x more
#: sources on a crowded 4k image and takes ~1 s longer per image).
PSF_DETECT_SIGMA = 10.0
#: Flux-like columns of the DIASource table converted from electrons to ADU.
_FLUX_COLUMNS = ("psfFlux", "psfFluxErr", "dipoleNegFlux", "dipoleNegFluxErr")


@dataclass(frozen=True)
class PairResult:
    """Result of :func:`subtract_pair`.

    Attributes
    ----------
    difference : Exposure
        ``SCIENCE - matched REFERENCE`` in science ADU, its variance (ADU^2),
        mask and PSF model.
    significance : ndarray (ny, nx)
        The detection significance (sigma) that is thresholded
        (:func:`diffim.detect.detection_significance`).
    sources : pandas.DataFrame
        DIASources (:data:`diffim.detect.COLUMNS`; fluxes in science ADU).
    subtraction : SubtractionResult
        Kernel, mode, fit quality of the subtraction (kernel in electrons);
        its ``difference`` is the exposure above.
    science, reference : Characterization
        What was measured on each input (PSF fit, sources, stars; electrons).
        Their pixel planes (``image``, ``variance``, ``mask``, ``background``)
        are ``None`` unless ``subtract_pair(..., keep_images=True)``.
    timings : dict
        Seconds per step: ``characterize``, ``subtract``, ``detect``, ``total``.
    """

    difference: Exposure
    significance: np.ndarray
    sources: pd.DataFrame
    subtraction: SubtractionResult
    science: Characterization
    reference: Characterization
    timings: dict = field(default_factory=dict)


def _check_pair(science, reference, gain, reference_gain):
    science = np.asarray(science)
    reference = np.asarray(reference)
    if science.ndim != 2 or science.shape != reference.shape:
        raise ValueError(f"science {science.shape} and reference {reference.shape} must be "
                         "2-D images on the same pixel grid (resample the reference first)")
    for name, g in (("gain", gain), ("reference_gain", reference_gain)):
        if not (np.isfinite(g) and g > 0):
            raise ValueError(f"{name} must be a positive number of electrons per ADU, got {g}")
    return science, reference


def _exposure(ch: Characterization, psf) -> Exposure:
    return Exposure(image=ch.image, variance=ch.variance, mask=ch.mask, psf=psf)


def _without_pixels(ch: Characterization) -> Characterization:
    """``ch`` without its full-size planes (4 x 67 MB for a 4k image)."""
    return replace(ch, image=None, variance=None, mask=None, background=None)


def _electrons(image: np.ndarray, gain: float) -> np.ndarray:
    """``image * gain`` as float32 (a float64 input is not copied at double size first)."""
    return np.multiply(image, np.float32(gain), dtype=np.float32)


def _to_adu(diff: Exposure, sources: pd.DataFrame, gain: float):
    """Difference exposure and DIASource fluxes from electrons to ADU.

    The planes of ``diff`` are divided in place (no second 4k copy).
    """
    diff.image /= np.float32(gain)
    diff.variance /= np.float32(gain**2)
    out = replace(diff, meta={**diff.meta, "BUNIT": "adu"})
    src = sources.copy()
    for col in _FLUX_COLUMNS:
        if col in src.columns:
            src[col] = src[col] / gain
    return out, src


def subtract_pair(science: np.ndarray, reference: np.ndarray, *, gain: float = 1.0,
                  reference_gain: float | None = None, read_noise: float = 0.0,
                  reference_read_noise: float | None = None, saturation: float | None = None,
                  threshold: float = 5.0, mode: str = "auto",
                  kernel_spatial_order: int = 1, background_order: int = 1,
                  psf_max_order: int = 2, keep_images: bool = False,
                  threads: int = 2) -> PairResult:
    """Subtract ``reference`` from ``science`` and detect the changes.

    Parameters
    ----------
    science, reference : ndarray (ny, nx)
        Images in ADU on the same pixel grid, sky not subtracted, NaN = no data.
    gain, reference_gain : float
        Electrons per ADU (``reference_gain`` defaults to ``gain``).
    read_noise, reference_read_noise : float
        Read noise in electrons (``reference_read_noise`` defaults to
        ``read_noise``).  For a stacked reference with a known variance use
        the effective value.
    saturation : float, optional
        Saturation level in ADU (both images); default: nothing saturated.
    threshold : float
        Detection threshold (sigma).
    mode : {"auto", "convolve_template", "convolve_science"}
        Convolution direction (:func:`diffim.subtract.subtract_images`);
        ``"auto"`` convolves the sharper image.
    kernel_spatial_order, background_order : int
        Spatial orders of the matching kernel (upper bound; chosen by
        cross-validation) and of the differential background.
    psf_max_order : int
        Largest spatial order of the PSF models.
    keep_images : bool
        Return the sky-subtracted inputs, their variance, mask and sky in
        ``PairResult.science`` and ``.reference``.  By default each plane is
        released as soon as no later step needs it, which lowers the peak
        memory of a 4096 x 4096 pair by about 0.4 GB.
    threads : int
        Characterize the two images in this many threads (1 or 2).  Their
        numpy and FFT work releases the GIL: two threads took a 4096 x 4096
        pair's characterisation from 4.7-6.7 s to 3.6-5.1 s on 2 cores, for
        0.05-0.1 GB more peak memory (with one malloc arena, :mod:`diffim.malloc`).  The
        results are identical either way.

    Returns
    -------
    PairResult

    Raises
    ------
    ValueError
        Bad shapes or gains.
    diffim.errors.InputError, diffim.errors.NoUsableStarsError
        An image is empty, broken or has too few stars for a PSF model.
    """
    reference_gain = gain if reference_gain is None else reference_gain
    reference_read_noise = read_noise if reference_read_noise is None else reference_read_noise
    science, reference = _check_pair(science, reference, gain, reference_gain)
    t0 = time.perf_counter()
    cfg = CalexpConfig(kernel_size=None, psf_max_order=psf_max_order, read_noise=read_noise,
                       detect_threshold=PSF_DETECT_SIGMA)
    sat_s = None if saturation is None else saturation * gain
    sat_r = None if saturation is None else saturation * reference_gain
    jobs = ((science, gain, read_noise, sat_s, "science"),
            (reference, reference_gain, reference_read_noise, sat_r, "reference"))

    def one(job):
        image, g, rn, sat, name = job
        return characterize(_electrons(image, g), config=cfg, read_noise=rn, saturation=sat,
                            path=name, overwrite=True, keep_background=keep_images)

    if threads > 1:
        with ThreadPoolExecutor(max_workers=2, thread_name_prefix="characterize") as pool:
            chars = list(pool.map(one, jobs))
    else:
        chars = [one(job) for job in jobs]
    k = max(ch.psf_fit.psf.kernel_size for ch in chars)
    sci, ref = (_exposure(ch, ch.psf_fit.psf.padded(k)) for ch in chars)
    ch_s, ch_r = chars if keep_images else (_without_pixels(ch) for ch in chars)
    del chars
    # after the subtraction only the reference image is needed: it is the static scene,
    # whose bright sources calibrate the systematic terms
    static = ref.image if keep_images else ref.image.copy()
    t1 = time.perf_counter()
    sub = subtract_images(sci, ref, mode=mode, kernel_spatial_order=kernel_spatial_order,
                          background_order=background_order, overwrite_inputs=not keep_images)
    del sci, ref
    t2 = time.perf_counter()
    noise = detect.noise_terms(sub.difference, static, template_share=sub.share_map)
    sig = detect.significance_maps(sub.difference, noise, static)
    sources = detect.detect_dia_sources(sub.difference, threshold=threshold, noise=noise,
                                        significance=sig)
    t3 = time.perf_counter()
    diff, sources = _to_adu(sub.difference, sources, gain)
    sub = replace(sub, difference=diff)  # one copy of the difference, in ADU
    timings = {"characterize": t1 - t0, "subtract": t2 - t1, "detect": t3 - t2,
               "total": t3 - t0}
    logger.info("pair: mode %s, %d DIASources, %.2f s", sub.mode, len(sources), t3 - t0)
    return PairResult(difference=diff, significance=sig.image, sources=sources, subtraction=sub,
                      science=ch_s, reference=ch_r, timings=timings)
