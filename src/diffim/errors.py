"""Typed exceptions for expected failures.

A caller (a rule script) catches :class:`DiffimError` subclasses and records a
failed status with ``str(exc)`` as the reason, so messages must be sentences a
person understands: what is wrong, with which file or visit, and what to do.
"""


class DiffimError(Exception):
    """Base class of every expected, reportable failure."""


class InputError(DiffimError):
    """An input file is unreadable, corrupt, or lacks required content."""


class ConfigError(DiffimError):
    """The configuration is inconsistent (names the key and the fix)."""


class NoUsableStarsError(DiffimError):
    """Too few isolated, unsaturated stars to model the PSF or calibrate."""


class PsfFitError(DiffimError):
    """The PSF model could not be fitted."""


class PsfKernelTooSmallError(PsfFitError):
    """The fitted PSF is too broad for its kernel; ``needed`` is the smallest size that holds it."""

    def __init__(self, message: str, needed: int):
        super().__init__(message)
        self.needed = int(needed)


class AstrometryError(DiffimError):
    """No astrometric solution matching the reference catalog was found."""


class CalibrationError(DiffimError):
    """The photometric zero point could not be determined."""


class InsufficientKernelSourcesError(DiffimError):
    """Too few kernel candidates to fit a PSF-matching kernel."""


class NoOverlapError(DiffimError):
    """An exposure does not overlap the sky map, a patch or the template."""
