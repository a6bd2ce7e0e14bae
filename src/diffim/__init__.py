"""diffim: difference-image analysis for time-domain astronomy.

The library works on arrays: images, WCS objects and PSF models in, arrays and
tables out.  File I/O lives in :mod:`diffim.io` and in the workflow's rule
scripts.

Conventions used everywhere in the package
------------------------------------------
* Arrays are indexed ``[y, x]``; pixel ``(0, 0)`` is the *centre* of the first
  pixel (numpy / astropy convention, 0-based).  FITS headers are 1-based and
  only :mod:`diffim.io` translates.
* Calibrated exposures (calexps) are in electrons, background subtracted.
  Warps, coadds and difference images are in nJy per pixel.  The single
  conversion is :func:`diffim.photometry.njy_per_electron`.
* Masks are ``int32`` bit fields whose bits are defined once in
  :mod:`diffim.masks`.
"""

__version__ = "0.1.0"
